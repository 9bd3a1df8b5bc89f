"""Bilinear surfaces: the API's store caching, the `lenslab bilinear` commands (subprocess) and
the dashboard page (AppTest), checked against numpy eigendecompositions of the stored weights."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from streamlit.testing.v1 import AppTest

from _support import figure_array, run_cli

from analysis.models import tiny_lm as tiny_models

DASHBOARD = str(Path(__file__).resolve().parents[2] / "app" / "dashboard.py")
TIMEOUT = 120


@pytest.fixture(scope="module")
def digits_dir(models_root) -> Path:
    return tiny_models.train_digits(steps=400).path


def reference(digits_dir: Path, cls: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """numpy: eigenvalues (|λ| descending), eigenvectors (rows) of Q for class ``cls``, and the embedding."""
    w = {k: v.astype(np.float64) for k, v in load_file(str(digits_dir / "model.safetensors")).items()}
    u = w["head.weight"][cls]
    q = w["bilinear.w.weight"].T @ np.diag(w["bilinear.p.weight"].T @ u) @ w["bilinear.v.weight"]
    lam, vec = np.linalg.eigh((q + q.T) / 2)
    order = np.argsort(-np.abs(lam), kind="stable")
    return lam[order], vec[:, order].T, w["embed.weight"]


def same_up_to_sign(a: np.ndarray, b: np.ndarray, atol: float) -> bool:
    return min(np.abs(a - b).max(), np.abs(a + b).max()) < atol


# ------------------------------------------------------------------------------------ API
def test_api_decompose_is_cached_in_the_store(digits_dir, store, monkeypatch):
    from analysis.bilinear import report as bilinear_report
    from app import api

    rep = api.bilinear_decompose(digits_dir, direction="class:all", store=store)
    lam, _, _ = reference(digits_dir, 4)
    np.testing.assert_allclose(rep.decomposition.eigenvalues[4], lam, rtol=1e-9, atol=1e-12)
    (entry,) = api.stored_bilinear(store=store)
    assert entry.params == {"layer": 0, "expert": None, "n_eval": 256, "direction": "class:all"}

    def boom(*a, **k):
        raise AssertionError("recomputed instead of served from the store")

    monkeypatch.setattr(bilinear_report, "build_report", boom)
    again = api.bilinear_decompose(digits_dir, direction="class", store=store)  # same canonical spec
    np.testing.assert_array_equal(again.decomposition.eigenvalues, rep.decomposition.eigenvalues)
    np.testing.assert_array_equal(again.images, rep.images)
    assert again.truncation.accuracy[-1] == rep.truncation.accuracy[-1]
    assert len(store.list()) == 1 and store.models()[0].fingerprint == entry.fingerprint


def test_api_vector_spec_key_follows_file_content(digits_dir, store, tmp_path, rng):
    from app import api

    path = tmp_path / "u.npy"
    np.save(path, rng.standard_normal(64))
    first = api.bilinear_decompose(digits_dir, direction=f"vector:{path}", store=store)
    np.save(path, rng.standard_normal(64))
    second = api.bilinear_decompose(digits_dir, direction=f"vector:{path}", store=store)
    assert len(store.list()) == 2
    assert not np.allclose(first.decomposition.directions, second.decomposition.directions)


# ------------------------------------------------------------------------------------ CLI
def run(*args: str, env_extra: dict, check: bool = True) -> subprocess.CompletedProcess:
    return run_cli("bilinear", *args, env=env_extra, check=check)


def test_cli_train_and_decompose(tmp_path, digits_dir):
    env = {"LENSLAB_STORE": str(tmp_path / "store"), tiny_models.MODELS_ENV: str(tmp_path / "models")}
    trained = json.loads(run("train", "digits", "--steps", "150", "--noise", "0.3", "--json", env_extra=env).stdout)
    assert trained["config"]["noise"] == 0.3 and not trained["reused"] and 0 < trained["metrics"]["test_accuracy"] <= 1
    assert Path(trained["path"]).parent == tmp_path / "models"

    out = json.loads(run("decompose", str(digits_dir), "--direction", "class:1,7", "--top", "3", "--json",
                         env_extra=env).stdout)
    assert [d["label"] for d in out["directions"]] == ["class 1", "class 7"] and out["exact"] is True
    for d, cls in zip(out["directions"], (1, 7)):
        lam, _, _ = reference(digits_dir, cls)
        np.testing.assert_allclose(d["eigenvalues"], lam[:3], rtol=1e-9)
        np.testing.assert_allclose(d["effective_rank"], np.abs(lam).sum() ** 2 / (lam**2).sum(), rtol=1e-9)
    assert out["truncation"]["64"]["agreement"] == 1.0


def test_cli_text_output_in_process(tmp_path, digits_dir, monkeypatch):
    """The human-readable output, through typer's runner (no subprocess start-up)."""
    from typer.testing import CliRunner

    from analysis.errors import ConfigError
    from app.cli import app

    monkeypatch.setenv(tiny_models.MODELS_ENV, str(digits_dir.parent))
    runner = CliRunner()
    res = runner.invoke(app, ["bilinear", "train", "digits", "--steps", "400"])
    assert res.exit_code == 0, res.output
    assert "test accuracy" in res.output and "reused from the cache" in res.output and str(digits_dir) in res.output
    res = runner.invoke(app, ["bilinear", "decompose", str(digits_dir), "-d", "class:1,7", "--store",
                              str(tmp_path / "store")], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "class 7" in res.output and "keep  64 eigenvectors per direction: accuracy" in res.output
    res = runner.invoke(app, ["bilinear", "train", "lm", "--noise", "0.1"])
    assert isinstance(res.exception, ConfigError) and "--noise applies to the digits model only" in str(res.exception)


def test_cli_device_option(tmp_path, digits_dir, monkeypatch):
    """--device reaches the API: cpu decomposes (numbers as numpy's), an unknown device is a typed error."""
    from typer.testing import CliRunner

    from analysis.errors import ConfigError
    from app.cli import app

    monkeypatch.setenv(tiny_models.MODELS_ENV, str(digits_dir.parent))
    runner = CliRunner()
    store = str(tmp_path / "store")
    res = runner.invoke(app, ["bilinear", "decompose", str(digits_dir), "-d", "class:2", "--device", "cpu", "--json",
                              "--store", store])
    assert res.exit_code == 0, res.output
    lam, _, _ = reference(digits_dir, 2)
    np.testing.assert_allclose(json.loads(res.stdout)["directions"][0]["eigenvalues"], lam[:4], rtol=1e-9)
    res = runner.invoke(app, ["bilinear", "decompose", str(digits_dir), "--device", "tpu", "--store", store])
    assert isinstance(res.exception, ConfigError) and "unknown device 'tpu'" in str(res.exception)
    res = runner.invoke(app, ["bilinear", "train", "digits", "--steps", "400", "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["reused"] and json.loads(res.stdout)["path"] == str(digits_dir)


def test_cli_errors_are_one_line(tmp_path):
    out = run("decompose", "minilm", env_extra={"LENSLAB_STORE": str(tmp_path / "store")}, check=False)
    assert out.returncode == 2 and "error:" in out.stderr and "its MLPs are not gated linear units" in out.stderr
    assert "Traceback" not in out.stderr


# ------------------------------------------------------------------------------------ dashboard
def open_page() -> AppTest:
    at = AppTest.from_file(DASHBOARD, default_timeout=TIMEOUT).run()
    at.switch_page("views/bilinear.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert [t.value for t in at.title] == ["Bilinear MLPs"]
    return at


def figures(at: AppTest) -> dict[str, dict]:
    out = {}
    for el in at.get("plotly_chart"):
        fig = json.loads(el.proto.spec)
        out[fig["layout"].get("title", {}).get("text", "")] = fig
    return out


def test_page_empty_store_shows_how_to_start(dashboard_store):
    at = open_page()
    assert any("lenslab bilinear decompose bilinear-digits" in i.value for i in at.info)
    assert not at.get("plotly_chart")
    assert at.text_input(key="bl_source").value == "bilinear-digits"


def test_page_digits_images_truncation_and_explorer(dashboard_store, digits_dir):
    from app import api

    rep = api.bilinear_decompose(digits_dir, direction="class:all", store=dashboard_store)
    at = open_page()
    at.selectbox(key="bl_direction_pick").set_value(3).run()
    assert not at.exception
    figs = figures(at)
    lam, vec, emb = reference(digits_dir, 3)
    pos = figs["class 3: top positive"]
    heat = [t for t in pos["data"] if t["type"] == "heatmap"]
    want_idx = [i for i in np.argsort(-lam) if lam[i] > 0][:4]
    assert [t["name"] for t in heat] == [f"v{i}" for i in want_idx]
    for trace, i in zip(heat, want_idx):
        img = (emb.T @ vec[i]).reshape(8, 8)
        assert same_up_to_sign(figure_array(trace["z"]), img / np.abs(img).max(), 1e-6)
    neg = [t for t in figs["class 3: top negative"]["data"] if t["type"] == "heatmap"]
    assert [t["name"] for t in neg] == [f"v{i}" for i in [i for i in np.argsort(lam) if lam[i] < 0][:4]]
    bars = figs["Eigenvalues of Q(class 3)"]["data"][0]
    np.testing.assert_allclose(figure_array(bars["y"]), lam, rtol=1e-9, atol=1e-12)
    trunc = {t["name"]: t for t in figs["Truncation"]["data"]}
    np.testing.assert_allclose(figure_array(trunc["accuracy"]["y"])[-1], rep.meta["model_accuracy"])
    # explorer: the prediction is the model's argmax logit for that test image (numpy forward)
    at.number_input(key="bl_input").set_value(7).run()
    assert not at.exception
    w = {k: v.astype(np.float64) for k, v in load_file(str(digits_dir / "model.safetensors")).items()}
    x = rep.explorer_x[7]
    e = w["embed.weight"] @ x
    logits = w["head.weight"] @ (w["bilinear.p.weight"] @ ((w["bilinear.w.weight"] @ e) * (w["bilinear.v.weight"] @ e))) \
        + w["head.bias"]
    assert any(f"class {logits.argmax()} ({logits.max():+.3g})" in m.value for m in at.markdown)
    assert f"What drives class {logits.argmax()}" in figures(at)


def test_page_lm_shows_top_tokens(dashboard_store, models_root):
    from app import api

    lm = tiny_models.train_tiny_lm("bilinear-llama", steps=6, vocab_size=300, d_model=32, n_layers=1, n_heads=2,
                                   d_mlp=32, ctx=32, batch_size=4, warmup=1, per_package=20,
                                   packages=("json", "pathlib"))
    rep = api.bilinear_decompose(lm.path, layer=0, direction="token:#30,#31", n_eval=24, store=dashboard_store)
    at = open_page()
    tokens = [df.value for df in at.dataframe if "token" in df.value.columns][0]
    first = rep.top_tokens[rep.top_tokens["direction"] == "token #30"]
    assert set(tokens["eigen"]) == set(first["eigen"])
    assert not figures(at).get("class 0: top positive")  # no images for an LM
    assert "Truncation" in figures(at)


def test_page_form_decomposes_and_reports_errors(dashboard_store, digits_dir):
    at = open_page()
    at.text_input(key="bl_source").input(str(digits_dir))
    at.text_input(key="bl_direction").input("class:0,1")
    at.button[0].click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("Decomposed" in s.value and "class:0,1" in s.value for s in at.success)
    assert at.selectbox(key="bl_spec").value is not None and len(dashboard_store.list()) == 1
    at.text_input(key="bl_direction").input("resid:500")
    at.button[0].click().run()
    assert not at.exception and any("must lie in 0..63" in e.value for e in at.error)


@pytest.mark.parametrize("target", ["model", "missing"])
def test_page_form_refuses_a_path_outside_the_allowed_root(dashboard_store, tmp_path, monkeypatch, target):
    from _refusal import check_form_refuses

    check_form_refuses(open_page, field="bl_source", button="Decompose", store=dashboard_store, tmp_path=tmp_path,
                       monkeypatch=monkeypatch, target=target)
