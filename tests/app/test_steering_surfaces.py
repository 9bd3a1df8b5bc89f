"""Steering surfaces: the API's store caching, the `lenslab steer` commands (subprocess) and the
Steering dashboard page (AppTest), checked against the analysis functions run directly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from _support import assert_close_f32, figure_array, run_cli
from _tiny_llama import make_tiny_llama

from analysis.steering import extract as S
from analysis.steering.contrasts import load_contrasts
from analysis.sources import open_source
from analysis.steering.vectors import SteeringVector, load_vector, save_vector

DASHBOARD = str(Path(__file__).resolve().parents[2] / "app" / "dashboard.py")
TIMEOUT = 120


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("steer-surfaces") / "llama")


# ------------------------------------------------------------------------------------ API
def test_api_extraction_is_cached_and_matches_the_analysis(lm_dir, store, monkeypatch):
    from app import api

    ext = api.steer_extract(lm_dir, "numpy-torch", position="mean", store=store)
    direct = S.extract(open_source(lm_dir).boot_bridge(), load_contrasts("numpy-torch"), position="mean")
    assert_close_f32(ext.vectors, direct.vectors, per_leading_index=True)
    np.testing.assert_allclose(ext.table["auc_test"], direct.table["auc_test"])
    (entry,) = api.stored_extractions(store=store)
    assert entry.params["position"] == "mean" and entry.params["contrast"] == "numpy-torch"

    def boom(*a, **k):
        raise AssertionError("recomputed instead of served from the store")

    monkeypatch.setattr(S, "extract", boom)
    again = api.steer_extract(lm_dir, "numpy-torch", position="mean", store=store)
    np.testing.assert_array_equal(again.vectors, ext.vectors)
    vec = api.steer_vector(again, 1, "pca")
    assert vec.fingerprint == open_source(lm_dir).fingerprint and vec.layers == (1,) and vec.method == "pca"
    assert len(store.list()) == 1


def test_api_dose_response_is_stored_and_found_again(lm_dir, store):
    from app import api

    ext = api.steer_extract(lm_dir, "numpy-torch", store=store)
    vec = api.steer_vector(ext, 0)
    fp = open_source(lm_dir).fingerprint
    assert api.find_dose_response(fp, vec, "numpy-torch", alphas=(-1, 1), scale="norm", store=store) is None
    dr = api.steer_dose(lm_dir, vec, "numpy-torch", alphas=(-1, 1), scale="norm", store=store)
    assert list(dr.table["alpha"]) == [-1.0, 0.0, 1.0] and dr.kind == "lm"
    found = api.find_dose_response(fp, vec, "numpy-torch", alphas=(1, -1), scale="norm", store=store)
    assert found is not None and found.table.equals(dr.table)


def test_api_dose_response_checks_the_fingerprint_on_a_cache_hit(lm_dir, store):
    from dataclasses import replace

    from analysis.errors import ConfigError
    from app import api

    vec = api.steer_vector(api.steer_extract(lm_dir, "numpy-torch", store=store), 0)
    foreign = replace(vec, fingerprint="f" * 32, source="another model")
    dr = api.steer_dose(lm_dir, foreign, "numpy-torch", alphas=(1,), allow_foreign=True, store=store)
    assert api.find_dose_response("f" * 32, foreign, "numpy-torch", alphas=(1,), store=store) is None
    assert api.find_dose_response(vec.fingerprint, foreign, "numpy-torch", alphas=(1,), store=store) is not None
    with pytest.raises(ConfigError, match="extracted from model ffffffffffff"):  # stored, still refused
        api.steer_dose(lm_dir, foreign, "numpy-torch", alphas=(1,), store=store)
    again = api.steer_dose(lm_dir, foreign, "numpy-torch", alphas=(1,), allow_foreign=True, store=store)
    assert again.table.equals(dr.table)


# ------------------------------------------------------------------------------------ CLI
def test_cli_extract_apply_dose_layers_orthogonalize(lm_dir, tmp_path):
    store = tmp_path / "store"
    vec_path, gguf_path = tmp_path / "v.safetensors", tmp_path / "v.gguf"
    out = run_cli("steer", "extract", str(lm_dir), "numpy-torch", "--layer", "1", "--out", str(vec_path),
                  "--gguf", str(gguf_path), "--json", store=store)
    report = json.loads(out.stdout)
    assert len(report["layers"]) == 6 and report["meta"]["hook"] == "resid_post"
    vec = load_vector(vec_path)
    row = [r for r in report["layers"] if r["layer"] == 1 and r["method"] == "mean_diff"][0]
    assert vec.layers == (1,) and np.linalg.norm(vec.vectors[0]) == pytest.approx(row["norm"], rel=1e-5)
    assert gguf_path.is_file()

    out = run_cli("steer", "apply", str(lm_dir), str(vec_path), "--prompt", "Return a new", "--alpha", "0.8",
                  "--scale", "norm", "--max-new-tokens", "6", "--json", store=store)
    gen = json.loads(out.stdout)
    assert gen["steered"] != gen["unsteered"]

    out = run_cli("steer", "dose", str(lm_dir), "numpy-torch", "--vector", str(vec_path), "--alphas=-0.5,0.5",
                  "--scale", "norm", "--json", store=store)
    dose = json.loads(out.stdout)
    assert [r["alpha"] for r in dose["dose_response"]] == [-0.5, 0.0, 0.5] and dose["kind"] == "lm"
    out = run_cli("steer", "layers", str(lm_dir), "numpy-torch", "--alpha", "0.5", "--scale", "norm", "--json",
                  store=store)
    layers = json.loads(out.stdout)
    assert [r["layer"] for r in layers["layers"]] == [0, 1] and layers["alpha"] == 0.5

    out = run_cli("steer", "orthogonalize", str(lm_dir), str(vec_path), "--out", str(tmp_path / "orth"), store=store)
    assert "tensors projected" in out.stdout and (tmp_path / "orth" / "model.safetensors").is_file()


def test_cli_sweep_is_a_hidden_deprecated_alias_of_dose(lm_dir, tmp_path):
    from typer.testing import CliRunner

    from analysis.errors import ConfigError
    from app.cli import app

    store, vec_path = tmp_path / "store", tmp_path / "v.safetensors"
    common = [str(lm_dir), "numpy-torch", "--vector", str(vec_path), "--alphas=-0.5,0.5", "--scale", "norm", "--json",
              "--store", str(store), "--device", "cpu"]
    runner = CliRunner()
    res = runner.invoke(app, ["steer", "extract", str(lm_dir), "numpy-torch", "--layer", "1", "--out", str(vec_path),
                              "--store", str(store)])
    assert res.exit_code == 0, res.output
    dose = runner.invoke(app, ["steer", "dose", *common])
    sweep = runner.invoke(app, ["steer", "sweep", *common])
    assert dose.exit_code == 0 and sweep.exit_code == 0, dose.output + sweep.output
    assert json.loads(sweep.stdout) == {**json.loads(dose.stdout), "layers": None}  # the old output, unchanged
    with_layers = runner.invoke(app, ["steer", "sweep", *common, "--layer-alpha", "0.5"])
    layers = runner.invoke(app, ["steer", "layers", str(lm_dir), "numpy-torch", "--alpha", "0.5", "--scale", "norm",
                                 "--capability", "--json", "--store", str(store)])
    assert json.loads(with_layers.stdout)["layers"] == json.loads(layers.stdout)["layers"]
    listed = [line.strip("│ ").split(" ")[0] for line in runner.invoke(app, ["steer", "--help"]).stdout.splitlines()]
    assert [verb for verb in listed if verb in ("extract", "apply", "dose", "layers", "orthogonalize", "sweep")] == [
        "extract", "apply", "dose", "layers", "orthogonalize"]  # sweep works but is not listed
    bad = runner.invoke(app, ["steer", "dose", *common[:-2], "--device", "tpu"])  # the entry point makes it exit 2
    assert isinstance(bad.exception, ConfigError) and "unknown device 'tpu'" in str(bad.exception)


def test_cli_svd_subspace_extract_and_orthogonalize(lm_dir, tmp_path):
    store, path = tmp_path / "store", tmp_path / "svd.safetensors"
    run_cli("steer", "extract", str(lm_dir), "numpy-torch", "--method", "svd", "--k", "3", "--layer", "1", "--out",
            str(path), store=store)
    vec = load_vector(path)
    direct = S.extract(open_source(lm_dir).boot_bridge(), load_contrasts("numpy-torch"), layers=[1], k=3)
    assert vec.k == 3 and vec.method == "svd" and vec.layers == (1,)
    np.testing.assert_allclose(vec.vectors, direct.svd_directions[0], atol=1e-5)
    out = run_cli("steer", "orthogonalize", str(lm_dir), str(path), "--out", str(tmp_path / "orth"), store=store)
    assert "(3 direction(s))" in out.stdout
    out = run_cli("steer", "apply", str(lm_dir), str(path), "--prompt", "x", check=False, store=store)
    assert out.returncode == 2 and "holds k=3 directions per layer" in out.stderr and "--row I" in out.stderr


def test_cli_bad_input_is_one_line_and_exit_2(lm_dir, tmp_path):
    wide = save_vector(SteeringVector(np.ones((1, 384)), (0,), source="minilm"), tmp_path / "wide.safetensors")
    out = run_cli("steer", "apply", str(lm_dir), str(wide), "--prompt", "x", check=False)
    assert out.returncode == 2 and "d_model 384 but the model's d_model is 32" in out.stderr
    out = run_cli("steer", "extract", str(lm_dir), "numpy-torch", "--hook", "resid", check=False)
    assert out.returncode == 2 and "unknown hook 'resid'; choose one of resid_pre" in out.stderr
    out = run_cli("steer", "extract", str(lm_dir), "numpy-torch", "--layer", "0", "--gguf", str(tmp_path / "v.gguf"),
                  check=False)
    assert out.returncode == 2 and "which llama.cpp never steers" in out.stderr and not (tmp_path / "v.gguf").exists()
    assert "Traceback" not in out.stderr


# ------------------------------------------------------------------------------------ dashboard
def open_page() -> AppTest:
    at = AppTest.from_file(DASHBOARD, default_timeout=TIMEOUT).run()
    at.switch_page("views/steering.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert [t.value for t in at.title] == ["Steering vectors"]
    return at


def figures(at: AppTest) -> dict[str, dict]:
    return {json.loads(el.proto.spec)["layout"].get("title", {}).get("text", ""): json.loads(el.proto.spec)
            for el in at.get("plotly_chart")}


def test_page_empty_store_shows_how_to_start(dashboard_store):
    at = open_page()
    assert any("lenslab steer extract bilinear-lm numpy-torch" in i.value for i in at.info)
    assert not at.get("plotly_chart")


def test_page_shows_separability_dose_response_and_generations(dashboard_store, lm_dir):
    from app import api

    ext = api.steer_extract(lm_dir, "numpy-torch", store=dashboard_store)
    at = open_page()
    sep = figures(at)["Held-out separability per layer"]
    auc = {t["name"]: figure_array(t["y"]) for t in sep["data"] if t.get("xaxis", "x") == "x"}
    for method in ext.methods:
        np.testing.assert_allclose(auc[method], ext.table.query("method == @method")["auc_test"])
    at.selectbox(key="steer_layer").set_value(1).run()
    at.button(key="steer_dose").click().run()
    assert not at.exception and not at.error, [e.value for e in at.exception] + [e.value for e in at.error]
    dose = figures(at)["Dose-response · layer 1 · mean_diff · norm"]
    stored = api.stored_dose_responses(store=dashboard_store)
    assert len(stored) == 1
    dr = api.load_dose_response(stored[0].key, dashboard_store)
    logp = [t for t in dose["data"] if t["name"] == "log p(positive concept)"][0]
    np.testing.assert_allclose(figure_array(logp["y"]), dr.table.sort_values("alpha")["logp_pos"])
    assert any("No layer sweep stored" in c.value for c in at.caption)
    at.button(key="steer_layers").click().run()
    assert not at.exception and not at.error, [e.value for e in at.exception] + [e.value for e in at.error]
    sweep = api.find_layer_sweep(ext.meta["fingerprint"], "numpy-torch", alpha=0.4, scale="norm",
                                 store=dashboard_store)
    assert sweep is not None and list(sweep["layer"]) == [0, 1]
    from analysis.steering.effect import layer_sweep

    direct = layer_sweep(open_source(lm_dir).boot_bridge(), ext, load_contrasts("numpy-torch"), alpha=0.4,
                         scale="norm")
    np.testing.assert_allclose(sweep[["delta_pos", "kl"]], direct[["delta_pos", "kl"]], atol=1e-5)
    bars = {t["name"]: figure_array(t["y"]) for t in figures(at)["Layer sweep · α = +0.4 · mean_diff · norm"]["data"]}
    np.testing.assert_allclose(bars["delta_pos"], sweep["delta_pos"])
    np.testing.assert_allclose(bars["kl"], sweep["kl"])
    shown = [df.value for df in at.dataframe if "delta_pos" in df.value.columns and "layer" in df.value.columns]
    assert len(shown) == 1 and shown[0].equals(sweep)
    at.text_input(key="steer_prompt").input("Return a new").run()
    at.button(key="steer_apply").click().run()
    assert not at.exception, [e.value for e in at.exception]
    blocks = [c.value for c in at.code]
    assert len(blocks) == 2 and all(b.startswith("Return a new") for b in blocks)


def test_page_form_extracts_and_reports_errors(dashboard_store, lm_dir):
    at = open_page()
    at.text_input(key="steer_source").input(str(lm_dir))
    at.text_input(key="steer_contrast").input("code-prose")
    at.button[0].click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("Extracted 2 layers × 3 methods of code-prose" in s.value for s in at.success)
    at.text_input(key="steer_position").input("index:0")
    at.button[0].click().run()
    assert not at.exception and any("differ in token length" in e.value for e in at.error)
    at.text_input(key="steer_position").input("last")
    at.text_input(key="steer_contrast").input("/etc/passwd")
    at.button[0].click().run()
    assert not at.exception and any("outside the directories this dashboard may read" in e.value for e in at.error)


@pytest.mark.parametrize("target", ["model", "missing"])
def test_page_source_field_refuses_a_path_outside_the_allowed_root(dashboard_store, tmp_path, monkeypatch, target):
    from _refusal import check_form_refuses

    check_form_refuses(open_page, field="steer_source", button="Extract", store=dashboard_store, tmp_path=tmp_path,
                       monkeypatch=monkeypatch, target=target, inputs={"steer_contrast": "code-prose"})
