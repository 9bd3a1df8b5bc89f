"""The Bilinear MLPs page in headless Chromium: `streamlit run` on 127.0.0.1 with a store holding
the digits model's class decomposition; the top eigenvectors must render as 8×8 images.
(Same set-up as tests/app/test_browser.py: Debian chromium via Playwright.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from _dashboard_server import (CHROMIUM, CHROMIUM_ARGS, VIEWPORT, distinct_colours, require_chromium,
                               serve_dashboard)

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def dashboard_url(tmp_path_factory) -> Iterator[str]:
    require_chromium()
    from analysis.models import tiny_lm as tiny_models
    from app import api

    tmp = tmp_path_factory.mktemp("browser-bilinear")
    digits = tiny_models.train_digits(tmp / "digits", steps=400)
    store = tmp / "store"
    api.bilinear_decompose(digits.path, direction="class:all", store=store)
    with serve_dashboard(store, tmp / "streamlit.log") as base:
        yield base


def test_bilinear_page_draws_digit_eigenvectors(dashboard_url, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(f"{dashboard_url}/bilinear", wait_until="domcontentloaded")
            page.wait_for_selector("text=class 0: top positive", timeout=90_000)
            # spectrum, positive and negative eigenvector images, truncation, digit, contributions
            page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length >= 5", timeout=60_000)
            page.wait_for_selector(".js-plotly-plot .heatmaplayer image, .js-plotly-plot .hm image",
                                   state="attached", timeout=30_000)
            page.wait_for_timeout(1500)  # let plotly finish its first transition
            assert page.locator("[data-testid='stException']").count() == 0
            nav = [t.strip().split("\n")[-1] for t in page.locator("[data-testid='stSidebarNav'] a").all_inner_texts()]
            assert "Bilinear MLPs" in nav, nav
            images = page.locator(".js-plotly-plot").filter(has_text="class 0: top positive")
            n_images = images.locator(".heatmaplayer image, .hm image").count()
            shot = tmp_path / "eigenvectors.png"
            images.first.screenshot(path=str(shot))
            full = tmp_path / "bilinear.png"
            page.screenshot(path=str(full), full_page=True)
        finally:
            browser.close()
    assert n_images == 4  # the top four positive eigenvectors of class 0
    for png, min_bytes in ((shot, 8_000), (full, 40_000)):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size > min_bytes, (png, png.stat().st_size)
        assert distinct_colours(png) > 100, png  # a blank or error page has a handful of colours
