"""Steering search surfaces: `lenslab steer search` / `steer audit` (subprocess) against the API's stored results,
and the Steering search page (AppTest): its Pareto chart holds the stored front, its tables the comparison and the
audit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from _support import figure_array, run_cli
from _tiny_llama import make_tiny_llama

from analysis.steering.vectors import load_vector

DASHBOARD = str(Path(__file__).resolve().parents[2] / "app" / "dashboard.py")
TIMEOUT = 120


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("steer-search-surfaces") / "llama")


@pytest.mark.slow  # three subprocesses booting torch: ~70 s on two loaded cores
def test_cli_search_exports_and_audit_match_the_api(lm_dir, tmp_path, monkeypatch):
    from analysis import model_cache
    from app import api

    store = tmp_path / "store"
    vec, plot, gguf = tmp_path / "c.safetensors", tmp_path / "front.png", tmp_path / "c.gguf"
    out = run_cli("steer", "search", str(lm_dir), "numpy-torch", "--layer", "1", "--budget", "30", "--coarse", "3",
                  "--out", str(vec), "--plot", str(plot), "--gguf", str(gguf), "--json", store=store)
    report = json.loads(out.stdout)
    with monkeypatch.context() as mp:  # served from the store: no model boots
        mp.setattr(model_cache, "bridge", lambda *a, **k: pytest.fail("the stored search was not served"))
        res = api.steer_search(lm_dir, "numpy-torch", layers=[1], budget=30, n_coarse=3, store=store, device="cpu")
    assert report["meta"]["settings_computed"] == len(res.table) == res.meta["n_settings"]
    assert [r["effect"] for r in report["front"]] == res.front["effect"].tolist()
    assert report["chosen"]["alpha"] == res.chosen["alpha"] and report["chosen"]["layer"] == 1
    saved = load_vector(vec)
    np.testing.assert_array_equal(saved.vectors[0], np.asarray(res.chosen["vector"], dtype=np.float32))
    assert plot.stat().st_size > 1000 and gguf.is_file()

    out = run_cli("steer", "audit", str(lm_dir), str(vec), "numpy-torch", "--json", store=store)
    audit = json.loads(out.stdout)
    assert [r["edit"] for r in audit["summary"]] == ["original", "orthogonalized", "norm_preserving"]
    assert len(api.stored_audits(store=store)) == 1


def test_cli_search_bad_input_is_one_line_exit_2(lm_dir, tmp_path):
    out = run_cli("steer", "search", str(lm_dir), "numpy-torch", "--budget", "0", check=False, store=tmp_path / "s")
    assert out.returncode == 2 and "budget=0 forward passes must be an integer >= 1" in out.stderr
    out = run_cli("steer", "search", str(lm_dir), "numpy-torch", "--strengths=0.5,1", check=False,
                  store=tmp_path / "s")
    assert out.returncode == 2 and "does not contain 0" in out.stderr and "Traceback" not in out.stderr


def open_page() -> AppTest:
    at = AppTest.from_file(DASHBOARD, default_timeout=TIMEOUT).run()
    at.switch_page("views/steering_search.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert [t.value for t in at.title] == ["Steering search"]
    return at


def test_page_empty_store_shows_how_to_start(dashboard_store):
    at = open_page()
    assert any("lenslab steer search bilinear-lm numpy-torch" in i.value for i in at.info)
    assert not at.get("plotly_chart")


def test_page_shows_the_front_comparison_and_audit(dashboard_store, lm_dir, tmp_path):
    from app import api

    res = api.steer_search(lm_dir, "numpy-torch", layers=[1], budget=30, n_coarse=3, store=dashboard_store)
    at = open_page()
    fig = json.loads(at.get("plotly_chart")[0].proto.spec)
    front = [t for t in fig["data"] if t["name"] == "Pareto front"][0]
    np.testing.assert_allclose(figure_array(front["y"]), res.front["effect"])
    np.testing.assert_allclose(figure_array(front["x"]), res.front["kl"])
    shown = {tuple(df.value.columns): df.value for df in at.dataframe}
    assert any(c[0] == "source" and "wins_at" in c for c in shown)
    assert any("No audit stored" in i.value for i in at.info)
    api.save_steering_vector(api.load_steering_vector(api.steer_search_export(res, tmp_path / "v.safetensors")
                                                      ["vector"]), tmp_path / "v2.safetensors")
    api.steer_audit(lm_dir, tmp_path / "v2.safetensors", store=dashboard_store)
    at = open_page()
    assert not at.exception
    assert any("effect_retained" in df.value.columns for df in at.dataframe)
    assert any("kappa_after" in df.value.columns for df in at.dataframe)


def test_page_form_runs_a_search(dashboard_store, lm_dir):
    from app import api

    at = open_page()
    at.text_input(key="ss_source").input(str(lm_dir))
    at.number_input(key="ss_budget").set_value(30)
    at.multiselect(key="ss_methods").set_value(["mean_diff"])
    at.button[0].click().run()
    assert not at.exception and not at.error, [e.value for e in at.exception] + [e.value for e in at.error]
    assert len(api.stored_searches(store=dashboard_store)) == 1
    assert any("Searched 14 settings (14 new)" in s.value for s in at.success) and at.get("plotly_chart")
