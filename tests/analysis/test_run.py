"""The runner (analysis/run.py): caching, registration, reading back, cancelling, device, model cache."""

from __future__ import annotations

import threading

import numpy as np
import pandas as pd
import pytest
import torch

from analysis import model_cache
from analysis import run as R
from analysis.device import resolve_device, resolve_dtype
from analysis.errors import ConfigError
from analysis.store import Result, Store


@pytest.fixture(autouse=True)
def _registry_restored():
    """Analyses these tests register leave the process's registry as it was."""
    before = dict(R.REGISTRY)
    yield
    R.REGISTRY.clear()
    R.REGISTRY.update(before)


def _analysis(calls: list, name: str = "test.square", version: str = "t-1") -> R.Analysis:
    def compute(subject, params, ctx):
        n = R.store_params(params)["n"]
        calls.append((subject.fingerprint, n))
        for i in range(3):
            ctx.tick(i + 1, 3, f"step {i}")
        x = np.arange(n, dtype=np.float64)
        return Result(table=pd.DataFrame({"x": x, "sq": x * x}), arrays={"x": x}, meta={"device": str(ctx.device)})

    return R.Analysis(name=name, code_version=version, compute=compute, from_result=lambda r: r.table)


def test_run_computes_once_then_serves_the_store(tmp_path):
    calls: list = []
    a = _analysis(calls)
    seen: list = []
    t1 = R.run(a, "fp1", {"n": 4}, store=tmp_path, device="cpu", progress=lambda d, t, s: seen.append((d, t, s)))
    t2 = R.run(a, "fp1", {"n": 4}, store=tmp_path, device="cpu")
    assert len(calls) == 1 and seen == [(1, 3, "step 0"), (2, 3, "step 1"), (3, 3, "step 2")]
    pd.testing.assert_frame_equal(t1, t2)
    np.testing.assert_array_equal(t2["sq"].to_numpy(), np.arange(4.0) ** 2)
    R.run(a, "fp1", {"n": 4}, store=tmp_path, refresh=True)
    R.run(a, "fp1", {"n": 5}, store=tmp_path)
    assert len(calls) == 3


def test_stored_find_load_agree(tmp_path):
    a = R.register(_analysis([], name="test.readback"))
    R.run(a, "fpA", {"n": 3}, store=tmp_path)
    R.run(a, "fpB", {"n": 2}, store=tmp_path)
    rows = R.stored(a, store=tmp_path)
    assert {e.fingerprint for e in rows} == {"fpA", "fpB"}
    assert [e.fingerprint for e in R.stored("test.readback", "fpA", store=tmp_path)] == ["fpA"]
    key = R.stored(a, "fpB", store=tmp_path)[0].key
    assert len(R.load(key, store=tmp_path)) == 2
    assert len(R.load(key[:10], store=tmp_path, analysis=a)) == 2
    assert len(R.find(a, "fpA", {"n": 3}, store=tmp_path)) == 3
    assert R.find(a, "fpA", {"n": 4}, store=tmp_path) is None
    assert R.has(a, "fpA", {"n": 3}, store=tmp_path) and not R.has(a, "fpA", {"n": 9}, store=tmp_path)


def test_load_errors_are_typed(tmp_path):
    a = R.register(_analysis([], name="test.errors"))
    with pytest.raises(R.NotStoredError, match="no stored result has key 'deadbeef00'"):
        R.load("deadbeef00", store=tmp_path)
    R.run(a, "fp", {"n": 1}, store=tmp_path)
    other = R.Analysis(name="test.other", code_version="o-1", compute=None, from_result=lambda r: r)
    key = R.stored(a, store=tmp_path)[0].key
    with pytest.raises(R.NotStoredError, match="holds a 'test.errors' result, not 'test.other'"):
        R.load(key, store=tmp_path, analysis=other)
    newer = R.Analysis(name="test.errors", code_version="t-2", compute=None, from_result=lambda r: r)
    with pytest.raises(R.NotStoredError, match="code version 't-1'"):
        R.load(key, store=tmp_path, analysis=newer)
    assert R.stored(newer, store=tmp_path) == []
    with pytest.raises(ConfigError, match="unknown analysis 'nope'"):
        R.stored("nope", store=tmp_path)


def test_failed_or_cancelled_compute_stores_nothing(tmp_path):
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(R.RunCancelled):
        R.run(_analysis([]), "fp", {"n": 2}, store=tmp_path, cancel=cancel)

    def boom(subject, params, ctx):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        R.run(R.Analysis("test.boom", "b-1", boom, lambda r: r), "fp", {}, store=tmp_path)
    assert Store(tmp_path).list() == []
    assert issubclass(R.RunCancelled, KeyboardInterrupt) and not issubclass(R.RunCancelled, Exception)


def test_sub_progress_prefixes_labels(tmp_path):
    seen = []
    ctx = R.context(store=tmp_path, progress=lambda d, t, s: seen.append((d, t, s)), device="cpu")
    ctx.sub("harvest")(2, 5, "batch")
    assert seen == [(2, 5, "harvest: batch")]


def test_params_objects_need_store_params(tmp_path):
    class P:
        def store_params(self):
            return {"n": 2}

    assert len(R.run(_analysis([]), "fp", P(), store=tmp_path)) == 2
    with pytest.raises(TypeError, match="store_params"):
        R.run(_analysis([]), "fp", object(), store=tmp_path)


def test_device_and_dtype_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in {"cpu", "cuda", "mps"}
    if not torch.cuda.is_available():
        assert resolve_device("auto").type != "cuda"
        with pytest.raises(ConfigError, match="pass --device cpu"):
            resolve_device("cuda")
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_dtype(None) is torch.float32
    with pytest.raises(ConfigError, match="not a floating-point"):
        resolve_dtype(torch.int64)


class _Src:
    def __init__(self, fp):
        self.fingerprint = fp


def test_model_cache_boots_once_and_evicts_least_recent():
    model_cache.clear()
    boots = []

    def boot(src, device, dtype):
        boots.append(src.fingerprint)
        return torch.nn.Linear(1, 1)

    a, b = _Src("a"), _Src("b")
    m1 = model_cache.bridge(a, boot=boot)
    assert model_cache.bridge(a, boot=boot) is m1 and boots == ["a"]
    model_cache.bridge(b, boot=boot)
    model_cache.bridge(a, boot=boot)  # a is now the most recent
    for fp in "cd":
        model_cache.bridge(_Src(fp), boot=boot)
    assert [k[0] for k in model_cache.cached_keys()] == ["a", "c", "d"]
    model_cache.bridge(a, variant="mlm-head", boot=boot)
    assert boots == ["a", "b", "c", "d", "a"]
    model_cache.clear()


def test_float64_device_passes_over_mps(monkeypatch):
    from analysis import device as D

    monkeypatch.setattr(D.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(D, "_mps_available", lambda: True)
    assert D.resolve_device("auto").type == "mps"
    assert D.resolve_float64_device("auto", "spectra") == torch.device("cpu")
    assert D.float64_home(torch.device("mps")) == torch.device("cpu")
    with pytest.raises(ConfigError, match="device 'mps' cannot compute spectra: .*pass --device cpu"):
        D.resolve_float64_device("mps", "spectra")
    assert D.resolve_float64_device("cpu", "spectra") == torch.device("cpu")


def test_record_stores_under_the_key_run_serves(tmp_path):
    calls: list = []
    a = _analysis(calls, name="test.record")
    x = np.arange(3.0)
    R.record(a, "fpR", {"n": 3}, Result(table=pd.DataFrame({"x": x, "sq": -x}), arrays={"x": x}), store=tmp_path)
    got = R.run(a, "fpR", {"n": 3}, store=tmp_path)
    assert calls == [] and got["sq"].tolist() == [0.0, -1.0, -2.0]  # served, not recomputed
