"""The weight analyses through the runner (analysis/weights/pipeline.py, batch_pipeline.py): store round
trips, keys written by earlier versions, devices, reading back, deprecated names, the experiment listing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from analysis import run as R
from analysis.device import resolve_device
from analysis.errors import ConfigError, CorruptEntryError
from analysis.sources import open_source
from analysis.store import Store
from analysis.weights import forgetting as fg
from analysis.weights import pipeline as W
from analysis.weights import singular_values as sv_mod
from analysis.weights import spectra as spectra_mod
from analysis.weights.selection import select_tensors

OLD_PARAMS = {"welore_tau": 0.175, "lrc_min_fraction": 0.5}  # what app/api.py spectra_params() gave
ON_CPU = resolve_device("auto").type == "cpu"


@pytest.fixture
def model_path(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    """A small safetensors checkpoint: a well-conditioned and an ill-conditioned matrix, a bias, NaNs."""
    rng = np.random.default_rng(3)
    weights = {
        "blocks.0.attn.weight": rng.standard_normal((24, 12)),
        "blocks.1.mlp.weight": rng.standard_normal((30, 12)) * np.linspace(1, 1e-6, 12),  # kappa ~1e6: SVD route
        "blocks.1.mlp.bias": rng.standard_normal(12),
        "blocks.2.mlp.weight": np.where(np.eye(6) > 0, np.nan, 1.0),
    }
    path = tmp_path / "model.safetensors"
    save_file({k: torch.from_numpy(v.astype(np.float32)) for k, v in weights.items()}, str(path))
    return path, weights


def _counting(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = spectra_mod.weight_spectra
    monkeypatch.setattr(spectra_mod, "weight_spectra", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def _kappa(w: np.ndarray) -> float:
    return float(np.linalg.cond(w.astype(np.float32).astype(np.float64)))


# -- spectra through the runner -----------------------------------------------------------------
def test_spectra_computed_once_then_served_from_the_store(tmp_path, model_path, monkeypatch):
    path, weights = model_path
    calls = _counting(monkeypatch)
    seen: list[tuple[int, int, str]] = []
    ws = W.analyze(path, store=tmp_path / "s", device="cpu", progress=lambda d, t, s: seen.append((d, t, s)))
    table = ws.table.set_index("tensor")
    for name in ("blocks.0.attn.weight", "blocks.1.mlp.weight"):
        assert table.loc[name, "kappa"] == pytest.approx(_kappa(weights[name]), rel=1e-7)
    assert table.loc["blocks.1.mlp.weight", "route"] == "svd" and table.loc["blocks.0.attn.weight", "route"] == "gram"
    assert table.loc["blocks.2.mlp.weight", "status"].startswith("nonfinite")
    assert [d for d, _, _ in seen] == [1, 2, 3, 4] and {t for _, t, _ in seen} == {4}

    again = W.analyze(path, store=tmp_path / "s", device="auto")
    assert calls == [1]  # served from the store, whatever the device
    pd.testing.assert_frame_equal(again.table, ws.table)
    st = Store(tmp_path / "s")
    [entry] = st.list(analysis="spectra")
    assert (entry.params, entry.code_version) == (OLD_PARAMS, "spectra-1")  # the key did not change
    assert [m.fingerprint for m in st.models()] == [open_source(path).fingerprint]  # the runner registered it


@pytest.mark.skipif(not ON_CPU, reason="device='auto' is the CPU only on a machine without a GPU")
def test_cpu_and_auto_agree_exactly_on_a_cpu_machine(tmp_path, model_path):
    path, _ = model_path
    cpu = W.analyze(path, store=tmp_path / "a", device="cpu")
    auto = W.analyze(path, store=tmp_path / "b", device="auto")
    pd.testing.assert_frame_equal(cpu.table, auto.table, check_exact=True)
    assert cpu.singular_values.keys() == auto.singular_values.keys()
    for k, v in cpu.singular_values.items():
        np.testing.assert_array_equal(v, auto.singular_values[k])


def test_an_entry_written_by_the_old_code_path_is_served_without_recomputing(tmp_path, model_path, monkeypatch):
    path, _ = model_path
    src = open_source(path)
    st = Store(tmp_path / "s")
    old = st.cached(src.fingerprint, "spectra", {"welore_tau": 0.175, "lrc_min_fraction": 0.5}, "spectra-1",
                    lambda: spectra_mod.to_result(spectra_mod.weight_spectra(src.iter_tensors()), {"label": "old"}))
    calls = _counting(monkeypatch)
    ws = W.analyze(path, store=st)
    assert calls == []
    pd.testing.assert_frame_equal(ws.table, old.table)
    assert W.has_spectra(src.fingerprint, st)
    pd.testing.assert_frame_equal(W.find_spectra(src.fingerprint, st).table, old.table)
    [entry] = W.list_spectra(src.fingerprint, st)
    pd.testing.assert_frame_equal(W.load_spectra(entry.key, st).table, old.table)
    pd.testing.assert_frame_equal(W.load_spectra(entry.key[:10], st).table, old.table)


def test_reading_back_when_nothing_is_stored(tmp_path):
    assert W.find_spectra("0" * 64, tmp_path) is None and not W.has_spectra("0" * 64, tmp_path)
    assert W.list_spectra(store=tmp_path) == []
    with pytest.raises(R.NotStoredError, match="no stored result has key"):
        W.load_spectra("0123456789abcdef", tmp_path)


def test_stored_spectra_is_a_deprecated_alias_with_its_old_behaviour(tmp_path, model_path):
    path, _ = model_path
    ws = W.analyze(path, store=tmp_path)
    fp = open_source(path).fingerprint
    with pytest.warns(DeprecationWarning, match="use find_spectra"):
        old = W.stored_spectra(fp, tmp_path)
    pd.testing.assert_frame_equal(old.table, ws.table)
    with pytest.warns(DeprecationWarning):
        assert W.stored_spectra("0" * 64, tmp_path) is None
    st = Store(tmp_path)
    blob = next(p for p in st.blob_dir.glob("*/*") if p.suffix == ".safetensors")
    blob.write_bytes(blob.read_bytes()[:-10])
    assert W.find_spectra(fp, tmp_path) is None  # the runner's convention: corrupt reads as missing
    with pytest.warns(DeprecationWarning), pytest.raises(CorruptEntryError):
        W.stored_spectra(fp, tmp_path)  # as it always did
    with pytest.raises(CorruptEntryError):
        W.load_spectra(W.list_spectra(fp, tmp_path)[0].key, tmp_path)
    assert W.analyze(path, store=tmp_path).table.equals(ws.table)  # recomputed, never served


def test_a_bad_device_fails_before_any_work(tmp_path, model_path, monkeypatch):
    path, _ = model_path
    calls = _counting(monkeypatch)
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        W.analyze(path, store=tmp_path, device="tpu")
    assert calls == [] and not (tmp_path / "index.sqlite").exists()  # the store was not even opened


def test_custom_spectra_params_are_refused_not_ignored(tmp_path, model_path):
    src = open_source(model_path[0])
    with pytest.raises(ConfigError, match="default WeLore settings"):
        R.run(W.SPECTRA, src, W.spectra_params(welore_tau=0.3), store=tmp_path)


# -- the accelerator route, checked on the CPU ----------------------------------------------------
@pytest.mark.parametrize("shape,decay", [((40, 16), 1.0), ((16, 40), 1.0), ((30, 30), 1e-7)], ids=str)
def test_torch_route_matches_numpy_and_takes_the_same_route(shape, decay, rng):
    w = rng.standard_normal(shape) * np.linspace(1, decay, shape[1])
    m = torch.from_numpy(w.astype(np.float32))
    got, route = sv_mod.spectrum_torch(m, "cpu")
    want = np.linalg.svd(w.astype(np.float32).astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-8 * want[0])
    assert route == sv_mod.spectrum(m)[1] == ("gram" if decay == 1.0 else "svd")
    assert got.dtype == np.float64 and isinstance(got, np.ndarray)


def test_torch_route_on_zero_and_nonfinite_matrices():
    s, route = sv_mod.spectrum_torch(torch.zeros(5, 3), "cpu")
    assert route == "svd" and np.array_equal(s, np.zeros(3))
    bad = torch.ones(4, 3)
    bad[1, 2] = float("inf")
    s, route = sv_mod.spectrum_torch(bad, "cpu")
    assert route == "nonfinite" and np.isnan(s).all() and s.shape == (3,)


def test_weight_spectra_on_an_accelerator_path_agrees_with_the_cpu_route(model_path, monkeypatch):
    path, _ = model_path
    src = open_source(path)
    cpu = spectra_mod.weight_spectra(src.iter_tensors())
    assert spectra_mod.accelerator("cpu") is None and spectra_mod.accelerator("mps") is None
    assert spectra_mod.accelerator("cuda:1") == torch.device("cuda:1")
    monkeypatch.setattr(spectra_mod, "accelerator", lambda device: torch.device("cpu"))  # the torch route, here
    acc = spectra_mod.weight_spectra(src.iter_tensors(), device="cpu")
    pd.testing.assert_frame_equal(acc.table.drop(columns=["kappa", "log10_kappa", "alpha", "alpha_weighted"]),
                                  cpu.table.drop(columns=["kappa", "log10_kappa", "alpha", "alpha_weighted"]),
                                  check_exact=False, rtol=1e-7)
    np.testing.assert_allclose(acc.table["kappa"], cpu.table["kappa"], rtol=1e-6)
    for k, v in cpu.singular_values.items():
        np.testing.assert_allclose(acc.singular_values[k], v, rtol=0, atol=1e-9 * v[0])


# -- selection and export ----------------------------------------------------------------------
def test_select_and_select_from_spectra_agree_with_select_tensors(tmp_path, model_path):
    path, _ = model_path
    sel = W.select(path, 1, store=tmp_path, device="cpu")
    ws = W.find_spectra(open_source(path).fingerprint, tmp_path)
    want = select_tensors(ws.table, 1, fingerprint=sel.fingerprint)
    assert sel.params == want.params == ("blocks.0.attn.weight",)  # the well-conditioned one
    assert W.select_from_spectra(ws, 1, fingerprint=sel.fingerprint).params == want.params
    assert W.select_from_spectra(ws.table, 1).params == want.params
    with pytest.raises(ConfigError, match="unknown ranker 'best'"):
        W.select(path, 1, ranker="best", store=tmp_path / "never")
    assert not (tmp_path / "never").exists() or Store(tmp_path / "never").list() == []


def test_export_text_writes_nothing_and_export_writes_the_same_text(tmp_path, model_path):
    path, _ = model_path
    sel = W.select(path, 2, store=tmp_path / "s")
    target = tmp_path / "out" / "params.txt"
    assert W.export_text(sel, "params") == "".join(p + "\n" for p in sel.params)
    assert not target.exists()
    assert W.export(sel, "params", target) == target.read_text() == W.export_text(sel, "params")
    assert not [p for p in target.parent.iterdir() if p.name != "params.txt"]  # no temp file left


# -- batch runs -------------------------------------------------------------------------------------
def test_analyze_many_writes_the_entry_analyze_reads(tmp_path, model_path, monkeypatch):
    from analysis.weights.batch_pipeline import analyze_many

    path, _ = model_path
    [item] = analyze_many([str(path)], executor="local", workers=1, mode="thread", store=tmp_path / "batch")
    assert item.status == "computed" and item.n_matrices == 3
    single = W.analyze(path, store=tmp_path / "single")
    pd.testing.assert_frame_equal(W.find_spectra(item.fingerprint, tmp_path / "batch").table, single.table)
    [model] = Store(tmp_path / "batch").models()
    assert (model.fingerprint, model.label) == (item.fingerprint, Store(tmp_path / "single").models()[0].label)
    calls = _counting(monkeypatch)
    assert W.analyze(path, store=tmp_path / "batch").table.equals(single.table) and calls == []
    [again] = analyze_many([str(path)], executor="local", workers=1, mode="thread", store=tmp_path / "batch")
    assert (again.status, again.n_matrices) == ("cached", 3)


# -- the KappaTune experiment: reading back, old entries, deprecated names --------------------------------
def _synthetic_experiment(seeds: int = 2) -> fg.ForgettingResult:
    rng = np.random.default_rng(5)
    runs = pd.DataFrame([{"arm": arm, "seed": s, "n_tensors": 7, "n_params": 1000, "n_changed": 7,
                          "accuracy": float(rng.uniform(0.6, 0.9)), "drift": float(rng.uniform(0, 0.2)),
                          "drift_max": 0.3, "spearman": float(rng.uniform(0.8, 1)), "train_loss": 0.5,
                          "seconds": 1.0, "tensors": "x"} for arm in fg.ARMS for s in range(seeds)])
    return fg.ForgettingResult(runs, fg.summarise(runs), fg.ForgettingConfig(seeds=seeds).params(),
                               {"classes": ["a", "b"]})


def test_experiment_listing_load_and_an_old_entry_served(tmp_path, minilm, monkeypatch):
    res = _synthetic_experiment()
    st = Store(tmp_path)
    # literally what the old app/api.py kappatune_experiment stored
    st.put(minilm.fingerprint, "experiment.kappatune_forgetting", fg.ForgettingConfig(seeds=2).params(),
           "forgetting-1", fg.to_result(res))
    st.put("f" * 64, "spectra", OLD_PARAMS, "spectra-1", spectra_mod.to_result(
        spectra_mod.weight_spectra([("w", torch.eye(3))])))
    [entry] = W.stored_experiments(store=st)
    assert entry.fingerprint == minilm.fingerprint and entry.params["seeds"] == 2
    assert W.stored_experiments(minilm.fingerprint, st) == [entry] and W.stored_experiments("f" * 64, st) == []
    loaded = W.load_experiment(entry.key, store=st)
    pd.testing.assert_frame_equal(loaded.runs, res.runs)
    pd.testing.assert_frame_equal(loaded.summary, res.summary)
    with pytest.raises(R.NotStoredError, match="holds a 'spectra' result"):
        W.load_experiment(st.list(analysis="spectra")[0].key, store=st)

    monkeypatch.setattr(fg, "kappatune_forgetting", lambda *a, **k: pytest.fail("the stored entry was not served"))
    served = W.experiment_forgetting("minilm", seeds=2, store=st, device="cpu")
    pd.testing.assert_frame_equal(served.runs, res.runs)
    with pytest.warns(DeprecationWarning, match="use experiment_forgetting"):
        old = W.kappatune_experiment("minilm", seeds=2, store=st)
    pd.testing.assert_frame_equal(old.runs, res.runs)
    with pytest.warns(DeprecationWarning, match="use stored_experiments"):
        pairs = W.stored_kappatune_experiments(st)
    assert [(e.key, r.summary.equals(res.summary)) for e, r in pairs] == [(entry.key, True)]


@pytest.mark.parametrize("experiment", ["experiment_forgetting", "experiment_kappatune"])
def test_experiment_settings_are_checked_before_any_work(tmp_path, experiment):
    with pytest.raises(ConfigError, match=r"unknown experiment setting\(s\) \['speed'\]"):
        getattr(W, experiment)("minilm", store=tmp_path, speed=2)
    with pytest.raises(ConfigError, match="unknown device"):
        getattr(W, experiment)("minilm", store=tmp_path, device="gpu")
    assert not (tmp_path / "index.sqlite").exists()


def test_deprecated_names_are_listed_and_exist():
    from app import api

    for old, new in W.DEPRECATED.items():
        assert callable(getattr(W, old)) and callable(getattr(W, new))
        assert getattr(api, old) is getattr(W, old) and getattr(api, new) is getattr(W, new)
    assert api.SPECTRA == W.SPECTRA.name == "spectra" and api.spectra_params() == OLD_PARAMS
    assert api.register is R.register_source and api.open_store is R.open_store
    assert R.REGISTRY["spectra"] is W.SPECTRA and R.REGISTRY[fg.ANALYSIS] is W.EXPERIMENT


def test_spectra_pass_over_mps_under_auto_and_refuse_it_when_asked(tmp_path, model_path, monkeypatch):
    """float64 has no MPS kernels: auto computes on the CPU there, an explicit mps is refused before any work."""
    from analysis import device as device_mod

    monkeypatch.setattr(device_mod.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device_mod, "_mps_available", lambda: True)
    assert resolve_device("auto").type == "mps"
    calls = _counting(monkeypatch)
    with pytest.raises(ConfigError, match="device 'mps' cannot compute spectra"):
        W.analyze(model_path[0], store=tmp_path, device="mps")
    with pytest.raises(ConfigError, match="device 'mps' cannot compute spectra"):
        W.select(model_path[0], 1, store=tmp_path, device="mps")
    assert calls == [] and not (tmp_path / "index.sqlite").exists()
    ws = W.analyze(model_path[0], store=tmp_path, device="auto")  # computed on the CPU
    assert calls == [1] and (ws.table["status"] == "ok").sum() == 2
