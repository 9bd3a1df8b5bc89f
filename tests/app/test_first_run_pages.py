"""The store `make run` builds (``lenslab quickstart``, app/first_run.py) opens every dashboard page on a result.

One store per module, built by the whole job (``api.quickstart``) into a temp dir; the models it trains come
from the model cache as in ``make run`` (``~/.cache/lenslab/models``: trained the first time, reused after).
Building it takes minutes, so these tests are slow. The pages are enumerated from ``PAGES`` in app/dashboard.py,
so a new page is covered (and fails here until a quickstart step fills it). Each page is opened as a user opens
it: its default picks, no click, except the SAE prompt page, whose result is the prompt's (never stored):
it is run once with its default prompt.
"""

from __future__ import annotations

import ast
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from analysis.store import Store

pytestmark = pytest.mark.slow

DASHBOARD = Path(__file__).resolve().parents[2] / "app" / "dashboard.py"


def registered_pages() -> list[tuple[str, str, bool]]:
    """(path, title, default) of every ``st.Page`` in app/dashboard.py (read from the source)."""
    tree = ast.parse(DASHBOARD.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "Page":
            kw = {k.arg: k.value for k in node.keywords}
            default = isinstance(kw.get("default"), ast.Constant) and kw["default"].value is True
            out.append((node.args[0].value, kw["title"].value, default))
    return out


PAGES = registered_pages()
ACTIONS: dict[str, Callable[[AppTest], None]] = {  # pages whose result needs one click: press it
    "sae_prompt": lambda at: at.button[0].click().run(),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Iterator[tuple[Store, list, float]]:
    from app import api

    store = Store(tmp_path_factory.mktemp("quickstart") / "store")
    start = time.perf_counter()
    outcomes = api.quickstart(store)
    yield store, outcomes, time.perf_counter() - start


@pytest.fixture
def page_store(built, monkeypatch, streamlit_caches_cleared) -> Store:
    store = built[0]
    monkeypatch.setenv("LENSLAB_STORE", str(store.root))
    return store


def _open(path: str) -> AppTest:
    at = AppTest.from_file(str(DASHBOARD), default_timeout=180).run()
    at.switch_page(path).run()
    if (action := ACTIONS.get(Path(path).stem)) is not None:
        action(at)
    assert not at.exception, [e.value for e in at.exception]
    return at


def _figures(at: AppTest) -> dict[str, dict]:
    figs = [json.loads(el.proto.spec) for el in at.get("plotly_chart")]
    return {f["layout"].get("title", {}).get("text", ""): f for f in figs}


def _table(at: AppTest, column: str):
    return next(df.value for df in at.dataframe if column in df.value.columns)


def test_the_job_stored_results_and_a_second_run_computes_nothing(built):
    from app import api

    store, outcomes, seconds = built
    print(f"quickstart built the store in {seconds:.0f} s: "
          + ", ".join(f"{o.name} {o.seconds:.0f} s" for o in outcomes))
    assert all(o.new_entries >= 1 for o in outcomes), outcomes
    before = {(e.key, e.created) for e in store.list()}
    again = api.quickstart(store)
    assert [o.new_entries for o in again] == [0] * len(again)
    assert {(e.key, e.created) for e in store.list()} == before
    assert store.check().ok
    assert store.models()[0].label == "minilm"  # the pickers' default model (most recently seen)


@pytest.mark.parametrize("path", [p for p, _, _ in PAGES], ids=[Path(p).stem for p, _, _ in PAGES])
def test_every_page_shows_a_result(page_store, path):
    at = _open(path)
    assert not at.error, [e.value for e in at.error]
    assert not at.info and not at.warning, [m.value for m in (*at.info, *at.warning)]  # no empty state
    assert at.get("plotly_chart") or at.dataframe, "neither a chart nor a table"
    check = PAGE_CHECKS.get(Path(path).stem)
    if check is not None:
        check(at, page_store)


# -- what each page shows is the step's stored result -----------------------------------------------------
def _spectra(at: AppTest, store: Store) -> None:
    from app import api

    ws = api.find_spectra(api.open_source("minilm").fingerprint, store=store)
    shown = _table(at, "kappa")
    assert dict(zip(shown["matrix"], shown["kappa"])) == pytest.approx(dict(zip(ws.table["matrix"], ws.table["kappa"])))


def _selection(at: AppTest, store: Store) -> None:
    from app import api

    sel = api.select("minilm", "20%", ranker="lowest_kappa", store=store)  # the quickstart's selection
    assert sorted(_table(at, "rank")["tensor"]) == sorted(sel.params)


def _experiments(at: AppTest, store: Store) -> None:
    from app import api

    res = api.load_experiment(api.stored_experiments(store=store)[0].key, store=store)
    assert len(_table(at, "task gain")) == len(res.summary) == 9  # every arm of the parameter-matched design
    assert res.config["seeds"] == 2 and res.config["steps"] == 50
    assert any(t.startswith("Task gain vs forgetting") for t in _figures(at))


def _steering(at: AppTest, store: Store) -> None:
    from app import api, first_run

    lm = api.open_source(first_run.LM).fingerprint  # the search's extraction of another LM is stored too
    ext = api.load_extraction(next(e.key for e in api.stored_extractions(store=store) if e.fingerprint == lm),
                              store=store)
    vec = api.steer_vector(ext, ext.best_layer(first_run.STEER_METHOD), first_run.STEER_METHOD)
    dr = api.find_dose_response(vec.fingerprint, vec, first_run.CONTRASTS, alphas=first_run.STEER_ALPHAS,
                                scale=first_run.STEER_SCALE, store=store)
    assert dr is not None
    shown = _table(at, "alpha")
    np.testing.assert_array_equal(shown["alpha"].to_numpy(), dr.table["alpha"].to_numpy())
    assert any(t.startswith("Dose-response") for t in _figures(at))
    assert any(t.startswith("Layer sweep") for t in _figures(at))


def _sae(at: AppTest, store: Store) -> None:
    from app import api

    key = api.sae_list(store)["key"][0]
    ev = api.find_sae_eval(key, loss=False, store=store)
    assert {m.label: m.value for m in at.metric}["L0"] == f"{ev.metrics['l0']:.1f}"
    assert any(t.startswith("Feature density") for t in _figures(at))


def _circuits(at: AppTest, store: Store) -> None:
    assert len(_table(at, "head")) == 6 * 12  # MiniLM: 6 layers x 12 heads of the picked circuit


def _experts(at: AppTest, store: Store) -> None:
    assert list(_table(at, "n_experts")["n_experts"]) == [8, 16, 32, 64]
    assert len(_table(at, "load_balance")) == 2  # tiny-mixtral's two routed layers


def _steering_search(at: AppTest, store: Store) -> None:
    from app import api

    res = api.load_search(api.stored_searches(store=store)[0].key, store=store)
    assert len(_table(at, "effect")) >= 1 and len(res.front) >= 1
    assert len(_table(at, "effect_retained")) == 3  # the audit: original, orthogonalised, norm-preserving


def _sae_compare(at: AppTest, store: Store) -> None:
    from sae.config import ARCHITECTURES

    assert sorted(_table(at, "mcc")["architecture"]) == sorted(ARCHITECTURES)  # every architecture scored


PAGE_CHECKS: dict[str, Callable[[AppTest, Store], None]] = {
    "spectra": _spectra, "selection": _selection, "experiments": _experiments, "steering": _steering,
    "sae": _sae, "circuits": _circuits, "experts": _experts, "steering_search": _steering_search,
    "sae_compare": _sae_compare,
}


# -- the same store in a real browser ----------------------------------------------------------------------
@pytest.mark.browser
def test_every_page_draws_a_chart_or_table_in_chromium(built, tmp_path):
    from _dashboard_server import CHROMIUM, CHROMIUM_ARGS, VIEWPORT, require_chromium, serve_dashboard
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    require_chromium()
    seen = {}
    with serve_dashboard(built[0].root, tmp_path / "streamlit.log") as base, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            for path, title, default in PAGES:
                stem = Path(path).stem
                page.goto(f"{base}/{'' if default else stem}", wait_until="domcontentloaded")
                page.wait_for_selector(f"h1:has-text('{title.split()[0]}')", timeout=90_000)
                if stem == "sae_prompt":
                    page.get_by_role("button", name="Run").click()
                try:  # a chart or a table drawn (some sit in collapsed expanders: attached, not visible)
                    page.wait_for_selector(".js-plotly-plot .main-svg, [data-testid='stDataFrame']",
                                           state="attached", timeout=120_000)
                except PlaywrightTimeout:
                    page.screenshot(path=str(tmp_path / f"{stem}.png"), full_page=True)
                    pytest.fail(f"page {stem}: no chart or table after 120 s (screenshot {tmp_path / stem}.png)")
                page.wait_for_timeout(1000)
                page.wait_for_selector("[data-testid='stStatusWidgetRunningIcon'], "
                                       "[data-testid='stStatusWidgetRunningManIcon']", state="detached",
                                       timeout=120_000)  # the page's script has finished
                seen[stem] = {
                    "charts": page.locator(".js-plotly-plot").count(),
                    "tables": page.locator("[data-testid='stDataFrame']").count(),
                    "empty": page.locator("[data-testid='stAlertContentInfo'], "
                                          "[data-testid='stAlertContentWarning']").all_inner_texts(),
                    "errors": page.locator("[data-testid='stException'], "
                                           "[data-testid='stAlertContentError']").count(),
                }
                page.screenshot(path=str(tmp_path / f"{stem}.png"), full_page=True)
        finally:
            browser.close()
    assert list(seen) == [Path(p).stem for p, _, _ in PAGES]
    for stem, s in seen.items():
        assert s["charts"] + s["tables"] >= 1 and not s["empty"] and not s["errors"], (stem, s)
