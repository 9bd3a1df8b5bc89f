"""What only a browser shows (issue 16), in headless Chromium against a real `streamlit run` on 127.0.0.1:
no request leaves the machine (the favicon is inline, not fetched from a font CDN), the model picked on a
page is in the URL (``?model=``) and a linked URL opens on its model, and steered text wraps instead of
running out of its box. The store holds a tiny checkpoint's spectra and a tiny Llama's steering directions.
(Same set-up as tests/app/test_browser.py: Debian chromium via Playwright.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import numpy as np
import pytest
import torch
from _dashboard_server import CHROMIUM, CHROMIUM_ARGS, VIEWPORT, require_chromium, serve_dashboard
from safetensors.torch import save_file

from _tiny_llama import make_tiny_llama

pytestmark = pytest.mark.browser
LONG_PROMPT = ("Returns a new array of the given shape and type, filled with zeros, after checking every argument "
               "against the documented constraints and converting each value to the requested dtype ") * 2


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[SimpleNamespace]:
    require_chromium()
    from analysis.sources import open_source
    from app import api

    tmp = tmp_path_factory.mktemp("browser-place")
    rng = np.random.default_rng(0)
    ckpt = tmp / "small.safetensors"
    save_file({f"model.layers.{i}.mlp.up_proj.weight": torch.from_numpy(rng.standard_normal((16, 8)).astype(np.float32))
               for i in range(2)}, str(ckpt))
    llama = make_tiny_llama(tmp / "llama")
    store = tmp / "store"
    api.analyze(str(ckpt), store=store)
    api.steer_extract(llama, "numpy-torch", store=store)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LENSLAB_ALLOWED_ROOT", str(tmp))
        with serve_dashboard(store, tmp / "streamlit.log") as base:
            yield SimpleNamespace(base=base, small=open_source(str(ckpt)), llama=open_source(str(llama)))


def _browse(fn):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            leaving: list[str] = []
            page.on("request", lambda r: leaving.append(r.url)
                    if urlsplit(r.url).scheme not in {"data", "blob", "about"}
                    and urlsplit(r.url).hostname != "127.0.0.1" else None)
            out = fn(page)
            page.wait_for_timeout(1000)
            return out, leaving
        finally:
            browser.close()


def test_no_request_leaves_the_machine_and_the_url_links_the_model(served):
    small, llama = served.small, served.llama

    def visit(page):
        page.goto(f"{served.base}/spectra", wait_until="domcontentloaded")
        page.wait_for_selector("text=log10 κ by layer and module", timeout=90_000)
        page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length >= 3", timeout=60_000)
        page.wait_for_timeout(1500)
        icon = page.evaluate("[...document.querySelectorAll(\"link[rel*='icon']\")].map(l => l.href)")
        first_url = page.url
        page.goto(f"{served.base}/selection?model={llama.fingerprint[:10]}", wait_until="domcontentloaded")
        page.wait_for_selector("text=No spectra stored for", timeout=90_000)  # the linked model, not the default
        return icon, first_url

    (icons, first_url), leaving = _browse(visit)
    assert leaving == [], leaving
    assert icons and all(h.startswith("data:image/svg+xml") or urlsplit(h).hostname == "127.0.0.1" for h in icons), icons
    assert f"model={small.fingerprint[:12]}" in first_url  # the only model with spectra, written to the URL


def test_steered_text_wraps_inside_its_box(served):
    def apply(page):
        page.goto(f"{served.base}/steering", wait_until="domcontentloaded")
        page.wait_for_selector("text=Held-out separability per layer", timeout=90_000)
        box = page.get_by_label("Prompt")
        box.fill(LONG_PROMPT)
        box.press("Enter")
        page.wait_for_timeout(1500)
        page.get_by_role("button", name="Apply").click()
        page.wait_for_selector("text=steered (α", timeout=90_000)
        codes = page.locator("[data-testid='stCode'] pre code")
        page.wait_for_function("document.querySelectorAll(\"[data-testid='stCode'] pre\").length >= 2",
                               timeout=60_000)
        return [codes.nth(i).evaluate("e => [e.scrollWidth, e.clientWidth, getComputedStyle(e).whiteSpace, "
                                      "e.innerText.length]") for i in range(2)]

    sizes, leaving = _browse(apply)
    assert leaving == [], leaving
    for scroll_width, client_width, white_space, n_chars in sizes:
        assert n_chars > len(LONG_PROMPT) // 2
        assert white_space in {"pre-wrap", "break-spaces"}, white_space
        assert scroll_width <= client_width + 1, (scroll_width, client_width)  # nothing hidden to the right
