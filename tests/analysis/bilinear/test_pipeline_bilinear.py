"""analysis.bilinear.pipeline: the decomposition through the runner (analysis.run), served from entries
written under the store key of the code before the runner, the reading-back convention
(stored_/load_/find_bilinear), devices, the helpers the dashboard calls instead of the maths, and
the page importing no analysis maths. References are numpy eigendecompositions of the stored weights."""

from __future__ import annotations

import ast
import hashlib
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from analysis import model_cache
from analysis.bilinear import pipeline
from analysis.bilinear import report as report_mod
from analysis.errors import ConfigError, LensLabError
from analysis.models import tiny_lm
from analysis.run import NotStoredError
from analysis.sources import open_source
from analysis.store import EntryInfo, Result

ROOT = Path(__file__).resolve().parents[3]
OLD_NAME = "bilinear.decompose"  # the analysis name and code version main stored before the runner
OLD_CODE_VERSION = "bilinear-1/report-1"
TINY_LM = dict(steps=6, vocab_size=300, d_model=32, n_layers=1, n_heads=2, d_mlp=32, ctx=32, batch_size=4, warmup=1,
               per_package=20, packages=("json", "pathlib"))


@pytest.fixture(scope="module")
def digits_dir(models_root) -> Path:
    return tiny_lm.train_digits(steps=300).path


def weights(digits_dir: Path) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float64) for k, v in load_file(str(digits_dir / "model.safetensors")).items()}


def reference_eigenvalues(digits_dir: Path, cls: int) -> np.ndarray:
    """numpy: eigenvalues of Q(head row ``cls``) sorted by |λ| descending."""
    w = weights(digits_dir)
    q = w["bilinear.w.weight"].T @ np.diag(w["bilinear.p.weight"].T @ w["head.weight"][cls]) @ w["bilinear.v.weight"]
    lam = np.linalg.eigvalsh((q + q.T) / 2)
    return lam[np.argsort(-np.abs(lam), kind="stable")]


def forbid_compute(monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("recomputed instead of served from the store")

    monkeypatch.setattr(report_mod, "build_report", boom)


def same_report(a, b) -> None:
    for name in ("eigenvalues", "eigenvectors", "directions"):
        np.testing.assert_array_equal(getattr(a.decomposition, name), getattr(b.decomposition, name))
    for name in ("images", "explorer_contrib", "offsets"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.decomposition.labels == b.decomposition.labels and a.direction == b.direction


# ------------------------------------------------------------------------------------ runner round trip
def test_round_trip_through_the_runner(digits_dir, store, monkeypatch):
    rep = pipeline.bilinear_decompose(digits_dir, direction="class:all", store=store, device="cpu")
    for cls in (0, 7):
        np.testing.assert_allclose(rep.decomposition.eigenvalues[cls], reference_eigenvalues(digits_dir, cls),
                                   rtol=1e-9, atol=1e-12)
    (entry,) = pipeline.stored_bilinear(store=store)
    assert isinstance(entry, EntryInfo)
    assert (entry.analysis, entry.code_version) == (OLD_NAME, OLD_CODE_VERSION)
    assert entry.params == {"layer": 0, "expert": None, "n_eval": 256, "direction": "class:all"}
    assert store.models()[0].fingerprint == entry.fingerprint == open_source(digits_dir).fingerprint

    same_report(pipeline.load_bilinear(entry.key, store=store), rep)
    same_report(pipeline.load_bilinear(entry.key[:10], store=store), rep)  # a unique prefix
    same_report(pipeline.find_bilinear(entry.fingerprint, direction="class", store=store), rep)
    assert pipeline.find_bilinear(entry.fingerprint, direction="class:1", store=store) is None
    assert pipeline.stored_bilinear(fingerprint="0" * 64, store=store) == []

    forbid_compute(monkeypatch)
    same_report(pipeline.bilinear_decompose(digits_dir, direction="class", store=store), rep)  # same canonical spec
    assert len(store.list()) == 1


def test_an_entry_written_under_the_old_key_is_served_without_recomputing(digits_dir, store, tmp_path, rng,
                                                                            monkeypatch):
    src = open_source(digits_dir)
    vec = tmp_path / "u.npy"
    np.save(vec, rng.standard_normal(64))
    old = {  # direction spec -> the params dict main put in the key, literally
        "class:all": {"layer": 0, "expert": None, "n_eval": 256, "direction": "class:all"},
        f"vector:{vec}": {"layer": 0, "expert": None, "n_eval": 256, "direction": f"vector:{vec}",
                          "file_sha256": hashlib.sha256(vec.read_bytes()).hexdigest()},
    }
    for spec, params in old.items():
        built = report_mod.to_result(report_mod.build_report(src, direction=spec))
        marked = Result(table=built.table, arrays=built.arrays, meta={**built.meta, "written_by": f"old {spec}"})
        store.cached(src.fingerprint, OLD_NAME, params, OLD_CODE_VERSION, lambda r=marked: r)
        assert pipeline.bilinear_params(direction=spec) == params

    forbid_compute(monkeypatch)
    for spec in old:
        rep = pipeline.bilinear_decompose(digits_dir, direction=spec, store=store)
        assert rep.meta["written_by"] == f"old {spec}"
    assert rep.decomposition.directions.shape == (1, 64)
    assert len(store.list()) == 2


def test_load_bilinear_raises_not_stored_for_an_unknown_key(store):
    with pytest.raises(NotStoredError, match="no stored result has key"):
        pipeline.load_bilinear("f" * 64, store=store)
    other = store.cached("0" * 64, "other.analysis", {}, "other-1", lambda: Result(meta={"x": 1}))
    assert other is not None
    (entry,) = store.list()
    with pytest.raises(NotStoredError, match="not 'bilinear.decompose'"):
        pipeline.load_bilinear(entry.key, store=store)
    with pytest.raises(KeyError):  # NotStoredError is a KeyError and a LensLabError
        pipeline.load_bilinear("e" * 64, store=store)


# ------------------------------------------------------------------------------------ devices
def test_device_is_checked_before_any_work_and_reaches_the_compute(digits_dir, store, monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match="unknown device"):  # before the (missing) source is opened
        pipeline.bilinear_decompose(tmp_path / "missing", device="tpu", store=store)
    with pytest.raises(ConfigError, match="mps"):  # no float64 on MPS (or no MPS here)
        pipeline.bilinear_decompose(digits_dir, device="mps", store=store)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            pipeline.bilinear_decompose(digits_dir, device="cuda", store=store)
        with pytest.raises(ConfigError, match="CUDA"):
            pipeline.bilinear_train("digits", device="cuda", steps=10)
    with pytest.raises(ConfigError, match="unknown model kind"):
        pipeline.bilinear_train("gpt")
    assert store.list() == []

    seen = []
    build = report_mod.build_report

    def spy(*args, **kwargs):
        seen.append(kwargs["device"])
        return build(*args, **kwargs)

    monkeypatch.setattr(report_mod, "build_report", spy)
    monkeypatch.setattr(pipeline, "resolve_device", lambda device="auto": torch.device("mps")
                        if device == "auto" else torch.device(device))
    rep = pipeline.bilinear_decompose(digits_dir, direction="class:0,1", store=store)  # auto on a Mac: the CPU
    assert seen == [torch.device("cpu")]
    np.testing.assert_allclose(rep.decomposition.eigenvalues[1], reference_eigenvalues(digits_dir, 1), rtol=1e-9,
                               atol=1e-12)


def test_lm_inputs_come_from_the_one_model_cache_on_the_run_device(store, models_root):
    lm = tiny_lm.train_tiny_lm("bilinear-llama", **TINY_LM)
    src = open_source(lm.path)
    model_cache.clear()
    try:
        rep = pipeline.bilinear_decompose(lm.path, direction="token:#30,#31", n_eval=16, store=store, device="cpu")
        assert (src.fingerprint, pipeline.HF_LM_VARIANT, "cpu", str(torch.float32)) in model_cache.cached_keys()
        free = []  # the lock held while hooks were attached is released afterwards

        def try_lock() -> None:
            got = model_cache.LOCK.acquire(timeout=5)
            if got:
                model_cache.LOCK.release()
            free.append(got)

        t = threading.Thread(target=try_lock)
        t.start()
        t.join()
        assert free == [True]
    finally:
        model_cache.clear()
    alone = report_mod.build_report(src, direction="token:#30,#31", n_eval=16)  # its own HF model, no cache
    np.testing.assert_array_equal(rep.explorer_contrib, alone.explorer_contrib)
    np.testing.assert_array_equal(rep.decomposition.eigenvalues, alone.decomposition.eigenvalues)
    assert list(rep.explorer_tokens["token"]) == list(alone.explorer_tokens["token"])


# ------------------------------------------------------------------------------------ page helpers
def test_top_and_explain_match_numpy(digits_dir, store):
    rep = pipeline.bilinear_decompose(digits_dir, direction="class:all", store=store)
    lam = reference_eigenvalues(digits_dir, 3)
    pos, neg = pipeline.bilinear_top(rep, 3, 4)
    np.testing.assert_allclose(rep.decomposition.eigenvalues[3, pos], np.sort(lam[lam > 0])[::-1][:4], rtol=1e-9)
    np.testing.assert_allclose(rep.decomposition.eigenvalues[3, neg], np.sort(lam[lam < 0])[:4], rtol=1e-9)

    w = weights(digits_dir)
    e = w["embed.weight"] @ rep.explorer_x[5]
    logits = w["head.weight"] @ (w["bilinear.p.weight"] @ ((w["bilinear.w.weight"] @ e) *
                                                           (w["bilinear.v.weight"] @ e))) + w["head.bias"]
    ex = pipeline.bilinear_explain(rep, 5, top=6)
    np.testing.assert_allclose(ex.outputs, logits, rtol=1e-4, atol=1e-4 * np.abs(logits).max())  # float32 terms
    assert ex.predicted == int(np.argmax(logits)) and ex.direction == ex.predicted and len(ex.contributions) == 6
    assert pipeline.bilinear_explain(rep, 5, direction=2).direction == 2
    with pytest.raises(ConfigError, match="out of range 0..9"):
        pipeline.bilinear_top(rep, 10)
    with pytest.raises(ConfigError, match="m=0"):
        pipeline.bilinear_top(rep, 0, 0)
    with pytest.raises(LensLabError, match="input index"):
        pipeline.bilinear_explain(rep, 10_000)


def test_app_api_reexports_the_pipeline():
    from app import api

    for name in ("BILINEAR", "BILINEAR_TRAIN_KINDS", "bilinear_train", "bilinear_params", "bilinear_decompose",
                 "stored_bilinear", "load_bilinear", "find_bilinear", "bilinear_top", "bilinear_explain"):
        assert getattr(api, name) is getattr(pipeline, name), name
    assert api.BILINEAR == OLD_NAME and pipeline.DECOMPOSE.code_version == OLD_CODE_VERSION


def test_the_page_imports_no_analysis_maths():
    tree = ast.parse((ROOT / "app" / "views" / "bilinear.py").read_text(encoding="utf-8"))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    maths = sorted(m for m in imported if m.split(".")[0] in ("analysis", "sae", "probes")
                   and m not in ("analysis.errors", "analysis.run"))  # exception types only
    assert not maths, f"the page imports analysis code: {maths}"
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert not names & {"top_signed", "explain", "contributions", "truncation_curve"}
    called = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and getattr(n.value, "id", "") == "api"}
    assert {"bilinear_top", "bilinear_explain", "load_bilinear", "bilinear_decompose"} <= called
