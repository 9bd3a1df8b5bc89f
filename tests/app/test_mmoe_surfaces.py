"""MMoE / experts surfaces: the API (cache), the CLI as a user runs it, and the Experts page (AppTest).

Tiny settings throughout (digits, 2 epochs, hidden 32): seconds, not minutes. Values shown on
the page are compared with numpy recomputations from the stored probe.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from _support import run_cli as run

from analysis.store import Store

DASHBOARD = str(Path(__file__).resolve().parents[2] / "app" / "dashboard.py")
TINY = {"epochs": 2, "hidden": 32}


@pytest.fixture(scope="module")
def tiny_mixtral(tmp_path_factory):
    from _tiny_mixtral import make_tiny_mixtral

    return make_tiny_mixtral(tmp_path_factory.mktemp("mixtral"))


# ------------------------------------------------------------------------------------------ API
def test_analyze_caches_and_stores_what_it_reports(store):
    from analysis.experts.specialisation import expert_class_matrix
    from app import api

    curve = api.mmoe_analyze("digits", "4,8", store=store, **TINY)
    assert list(curve.table["n_experts"]) == [4, 8]
    assert (curve.table["layer_params"] <= 65 * 32).all()  # parameter-matched to Linear(64, 32)
    n_entries = len(store.list())
    again = api.mmoe_analyze("digits", [8, 4], store=store, **TINY)  # same request: served from the store
    assert again.keys == curve.keys and len(store.list()) == n_entries
    report = api.load_expert_report(curve.keys[8], store)
    fs, fp = api.mmoe_features(api.DataSpec(data="digits"), store=store)
    probe, _ = api.mmoe_probe(fs, fp, {"layer": "cp", "n_experts": 8, "gate": "entmax15", **TINY}, store=store)
    gates = probe.gates(fs.X)
    np.testing.assert_allclose(report.expert_class, expert_class_matrix(gates, fs.y, 10), atol=1e-6)
    want = [np.mean(gates[fs.y == c], axis=0) for c in range(10)]  # numpy: mean gate per class
    np.testing.assert_allclose(report.expert_class, np.array(want).T, atol=1e-6)
    np.testing.assert_array_equal(report.experts["load"], (gates >= 0.5).sum(0))
    assert len(report.examples) == 8 * 5 and report.images.shape == (8, 5, 8, 8)
    top = report.examples[(report.examples["expert"] == 3) & (report.examples["rank"] == 0)].iloc[0]
    assert top["gate"] == pytest.approx(gates[:, 3].max(), abs=1e-6)
    assert again.key == curve.key and api.load_mmoe_curve(again.key, store).table.equals(again.table)


def test_bias_demo_reports_per_class_change(store):
    from app import api

    demo = api.mmoe_bias("digits", 8, target="3", keep=0.1, store=store, **TINY)
    assert demo.target == "3" and list(demo.table["class"]) == [str(c) for c in range(10)]
    np.testing.assert_allclose(demo.table["change"], demo.table["after"] - demo.table["before"])
    from probes.training import digits_features

    assert demo.meta["n_select"] + demo.meta["n_eval"] == int(digits_features().is_test.sum())
    assert demo.table["n_samples"].sum() == demo.meta["n_eval"]
    (entry,) = api.stored_mmoe_bias(store=store)
    assert api.load_mmoe_bias(entry.key, store).experts == demo.experts


def test_bad_requests_are_typed(store):
    from analysis.errors import ConfigError, SourceError
    from app import api

    with pytest.raises(ConfigError, match="comma-separated integers"):
        api.mmoe_analyze("digits", "8,x", store=store)
    with pytest.raises(ConfigError, match="unknown data 'mnist'"):
        api.mmoe_analyze("mnist", store=store)
    with pytest.raises(ConfigError, match="target class 'nope' is not one of"):
        api.mmoe_bias("digits", 8, target="nope", store=store, **TINY)
    with pytest.raises(SourceError, match="no expert routers"):
        api.experts_routing("minilm", store=store)


# ------------------------------------------------------------------------------------------ CLI
def test_cli_train_json(tmp_path):
    out = run("mmoe", "train", "--experts", "8", "--epochs", "2", "--hidden", "32", "--json", store=tmp_path / "s")
    rows = {r["probe"]: r for r in json.loads(out.stdout)}
    assert set(rows) == {"linear probe", "linear layer (hidden 32)", "CP MMoE, 8 experts"}
    mm = rows["CP MMoE, 8 experts"]
    assert mm["budget"] == 65 * 32 == rows["linear layer (hidden 32)"]["layer_params"]
    assert mm["rank"] == (65 * 32 - 64 * 8) // (8 + 65 + 32)  # rank formula by hand
    assert mm["layer_params"] <= mm["budget"]
    assert all(0 <= r["test_accuracy"] <= 1 for r in rows.values())


def test_cli_analyze_writes_figure_and_table(tmp_path):
    fig = tmp_path / "curve.png"
    out = run("mmoe", "analyze", "--experts", "4,8", "--epochs", "2", "--hidden", "32", "--figure", str(fig),
              store=tmp_path / "s")
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and fig.stat().st_size < 200_000
    assert "expert specialisation on digits" in out.stdout and "stored as mmoe.curve" in out.stderr
    rows = [line.split("│")[1:-1] for line in out.stdout.splitlines() if line.startswith("│")]
    assert [int(r[0]) for r in rows if r[0].strip().isdigit()] == [4, 8]
    assert [e.analysis for e in Store(tmp_path / "s").list(analysis="mmoe.curve")] == ["mmoe.curve"]


def test_cli_too_many_experts_says_the_maximum(tmp_path):
    out = run("mmoe", "train", "--experts", "100", "--hidden", "8", "--epochs", "1", store=tmp_path / "s",
              check=False)
    from probes.mmoe import max_experts

    assert out.returncode == 2
    top = max_experts("cp", 64, 8, 65 * 8)
    assert top == (65 * 8 - 65 - 8) // 65 == 6  # 64 N + (N + 65 + 8) <= 520 at rank 1
    assert f"at most N = {top} experts fit" in out.stderr
    assert "Traceback" not in out.stderr


def test_cli_device_option(tmp_path):
    out = run("mmoe", "train", "--experts", "4", "--epochs", "1", "--hidden", "8", "--device", "cpu", "--json",
              store=tmp_path / "s")
    assert len(json.loads(out.stdout)) == 3
    bad = run("mmoe", "analyze", "--device", "tpu", store=tmp_path / "s", check=False)
    assert bad.returncode == 2 and "unknown device 'tpu'" in bad.stderr and "Traceback" not in bad.stderr


def test_cli_experts_on_a_model_without_routers(tmp_path):
    out = run("experts", "minilm", store=tmp_path / "s", check=False)
    assert out.returncode == 2 and "no expert routers found" in out.stderr and "Traceback" not in out.stderr


def test_cli_experts_on_a_routed_moe(tmp_path, tiny_mixtral):
    out = run("experts", str(tiny_mixtral), "--packages", "json,os", "--per-package", "4", "--json",
              store=tmp_path / "s")
    rows = json.loads(out.stdout)
    assert [r["layer"] for r in rows] == [0, 1]
    assert all(1.0 - 1e-9 <= r["load_balance"] <= 4.0 for r in rows)
    assert all(r["baseline_k_over_e"] == 0.5 for r in rows)
    st_ = Store(tmp_path / "s")
    assert [e.analysis for e in st_.list()] == ["experts.routing"]


# ---------------------------------------------------------------------------------------- page
def open_page() -> AppTest:
    at = AppTest.from_file(DASHBOARD, default_timeout=120).run()
    at.switch_page("views/experts.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_page_empty_store(dashboard_store):
    at = open_page()
    infos = " ".join(i.value for i in at.info)
    assert "lenslab mmoe analyze" in infos and "lenslab experts tiny-mixtral" in infos
    assert not at.get("plotly_chart")


def test_page_shows_stored_results(dashboard_store, tiny_mixtral):
    from app import api
    from app.charts_experts import expert_order

    curve = api.mmoe_analyze("digits", "4,8", store=dashboard_store, **TINY)
    stats = api.experts_routing(str(tiny_mixtral), packages=("numpy", "json"), per_package=3, store=dashboard_store)
    at = open_page()
    figs = {json.loads(f.proto.spec)["layout"]["title"]["text"]: json.loads(f.proto.spec)
            for f in at.get("plotly_chart")}
    poly = figs["class-level polysemanticity per expert (lower = more specialised)"]
    (effect,) = [t for t in poly["data"] if t["name"] == "effect-weighted"]
    np.testing.assert_allclose(_arr(effect["y"]), curve.table["mean_effect_polysemanticity"], equal_nan=True)
    # the detail view defaults to the largest count <= 64 present: 8 experts here
    report = api.load_expert_report(curve.keys[8], dashboard_store)
    heat = figs["mean gate coefficient: 8 experts x 10 classes"]["data"][0]
    np.testing.assert_allclose(_arr(heat["z"]), report.expert_class[expert_order(report.expert_class)], atol=1e-9)
    ablation = [df.value for df in at.dataframe if "n_flipped" in df.value.columns][0]
    assert sorted(ablation["expert"]) == list(range(8))
    usage = figs["expert usage (share of assignments)"]["data"][0]
    np.testing.assert_allclose(_arr(usage["z"]), stats.usage, atol=1e-9)
    # picking another expert count redraws the detail view
    at.selectbox(key="mmoe_n").set_value(4).run()
    assert not at.exception
    titles = [json.loads(f.proto.spec)["layout"]["title"]["text"] for f in at.get("plotly_chart")]
    assert "mean gate coefficient: 4 experts x 10 classes" in titles


def _arr(value) -> np.ndarray:
    import base64

    if isinstance(value, dict) and "bdata" in value:
        a = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        return a.reshape([int(s) for s in str(value.get("shape", len(a))).split(",")])
    return np.array(value, dtype=float)


@pytest.mark.parametrize("target", ["model", "missing"])
def test_routing_form_refuses_a_path_outside_the_allowed_root(dashboard_store, tmp_path, monkeypatch, target):
    from _refusal import check_form_refuses

    check_form_refuses(open_page, field="routing_source", button="Analyse routing", store=dashboard_store,
                       tmp_path=tmp_path, monkeypatch=monkeypatch, target=target)
