"""The real dashboard in headless Chromium: `streamlit run` on 127.0.0.1 with a store holding
MiniLM's spectra, driven by Playwright (Debian chromium, installed by `.ci/install-chromium`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from _dashboard_server import (CHROMIUM, CHROMIUM_ARGS, VIEWPORT, distinct_colours, require_chromium,
                               serve_dashboard)

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def dashboard_url(tmp_path_factory) -> Iterator[str]:
    """Base URL of a dashboard serving a temp store with MiniLM's spectra; stopped afterwards."""
    require_chromium()
    from app import api

    tmp = tmp_path_factory.mktemp("browser")
    store = tmp / "store"
    api.analyze("minilm", store=store)
    with serve_dashboard(store, tmp / "streamlit.log") as base:
        yield base


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
        assert distinct_colours(png) > 200, png  # a blank or error page has a handful of colours


def _page_titles() -> list[str]:
    """Titles in app/dashboard.py's PAGES list, read from the source (importing it would run Streamlit)."""
    import ast

    tree = ast.parse((Path(__file__).resolve().parents[2] / "app" / "dashboard.py").read_text())
    return [kw.value.value for node in ast.walk(tree) if isinstance(node, ast.Call)
            and getattr(node.func, "attr", "") == "Page" for kw in node.keywords if kw.arg == "title"]
