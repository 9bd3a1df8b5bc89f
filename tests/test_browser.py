"""The real dashboard in headless Chromium: `streamlit run` on 127.0.0.1 with a store holding
MiniLM's spectra, driven by Playwright (Debian chromium, installed by `.ci/install-chromium`)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ROOT = Path(__file__).resolve().parents[1]
VIEWPORT = {"width": 1400, "height": 1000}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.3)
    raise RuntimeError(f"streamlit was not healthy after {timeout:.0f} s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def dashboard_url(tmp_path_factory) -> Iterator[str]:
    """Base URL of a dashboard serving a temp store with MiniLM's spectra; stopped afterwards."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is missing: run `bash .ci/install-chromium` (apt-get install chromium)")
    from app import api

    tmp = tmp_path_factory.mktemp("browser")
    store = tmp / "store"
    api.analyze("minilm", store=store)
    port = _free_port()
    env = dict(os.environ, LENSLAB_STORE=str(store), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    log = tmp / "streamlit.log"
    cmd = [sys.executable, "-m", "streamlit", "run", str(ROOT / "app" / "dashboard.py"),
           "--server.address", "127.0.0.1", "--server.port", str(port), "--server.headless", "true",
           "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_healthy(f"{base}/_stcore/health", proc, log)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def _distinct_colours(png: Path) -> int:
    from PIL import Image

    with Image.open(png) as im:
        return len(set(im.convert("RGB").getdata()))


def test_spectra_page_renders_charts_in_chromium(dashboard_url, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(f"{dashboard_url}/spectra", wait_until="domcontentloaded")
            page.wait_for_selector(".js-plotly-plot .main-svg", timeout=60_000)
            # both heatmaps and the ESD chart, with their cells / traces drawn
            page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length >= 3", timeout=60_000)
            page.wait_for_selector(".js-plotly-plot .heatmaplayer image, .js-plotly-plot .hm image",
                                   state="attached", timeout=30_000)
            page.wait_for_selector("text=log10 κ by layer and module", timeout=30_000)
            page.wait_for_timeout(1500)  # let plotly finish its first transition
            assert page.locator("[data-testid='stException']").count() == 0
            # the entry script's page list, not Streamlit's legacy listing of the pages/ folder
            nav = [t.strip() for t in page.locator("[data-testid='stSidebarNav'] a").all_inner_texts()]
            assert [t.split("\n")[-1] for t in nav] == _page_titles(), nav
            top = tmp_path / "spectra.png"
            page.screenshot(path=str(top))
            esd = tmp_path / "esd.png"
            page.locator(".js-plotly-plot").nth(2).screenshot(path=str(esd))
            esd_title = page.locator(".js-plotly-plot").nth(2).locator(".gtitle").text_content()
        finally:
            browser.close()
    assert esd_title.startswith("ESD of encoder.layer.0.")
    for png, min_bytes in ((top, 40_000), (esd, 15_000)):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size > min_bytes, (png, png.stat().st_size)
        assert _distinct_colours(png) > 200, png  # a blank or error page has a handful of colours


def _page_titles() -> list[str]:
    """Titles in app/dashboard.py's PAGES list, read from the source (importing it would run Streamlit)."""
    import ast

    tree = ast.parse((Path(__file__).parents[1] / "app" / "dashboard.py").read_text())
    return [kw.value.value for node in ast.walk(tree) if isinstance(node, ast.Call)
            and getattr(node.func, "attr", "") == "Page" for kw in node.keywords if kw.arg == "title"]
