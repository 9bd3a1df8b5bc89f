"""Results store: round trips, keys, cache, corruption (process faults: tests/test_faults.py)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.errors import ConfigError, CorruptEntryError, StoreError
from analysis.store import Result, Store, entry_key

FP = "0123456789abcdef0123456789abcdef"


def _result(i: int, size: int = 64) -> Result:
    """A result whose whole content is determined by i, so readers can check it exactly."""
    rng = np.random.default_rng(i)
    table = pd.DataFrame({"name": [f"t{i}.{j}" for j in range(5)], "value": rng.standard_normal(5)})
    return Result(table=table, arrays={"sv": rng.standard_normal(size), "idx": np.arange(i, i + 3)},
                  meta={"i": i, "note": "ünïcode"})


def _check(result: Result, i: int, size: int = 64) -> None:
    want = _result(i, size)
    pd.testing.assert_frame_equal(result.table, want.table)
    for k, v in want.arrays.items():
        np.testing.assert_array_equal(result.arrays[k], v)
    assert dict(result.meta) == dict(want.meta)


def test_put_get_roundtrip_and_read_only_arrays(store):
    info = store.put(FP, "spectra", {"b": 1, "a": [1, 2]}, "v1", _result(7))
    got = store.get(FP, "spectra", {"a": [1, 2], "b": 1}, "v1")  # parameter order does not matter
    _check(got, 7)
    assert info.key == entry_key(FP, "spectra", {"b": 1, "a": [1, 2]}, "v1")
    with pytest.raises(ValueError):
        got.arrays["sv"][0] = 1.0
    assert store.has(FP, "spectra", {"a": [1, 2], "b": 1}, "v1")
    assert not store.has(FP, "spectra", {"a": [1, 2], "b": 2}, "v1")
    assert not store.has(FP, "spectra", {"a": [1, 2], "b": 1}, "v2")  # code version is part of the key
    assert store.get(FP, "other", {}, "v1") is None


def test_list_delete_and_models(store):
    for i in range(3):
        store.put(FP, f"analysis{i}", {}, "v1", _result(i))
    store.put("f" * 32, "analysis0", {}, "v1", _result(9))
    store.register_model(FP, "model-a", "safetensors", n_tensors=3, n_params=10)
    store.register_model("f" * 32, "model-b", "module")
    store.register_model(FP, "sae-owner", "sae-source", replace=False)  # keeps model-a's record
    assert [(m.label, m.kind, m.n_params) for m in store.models()] == [("model-b", "module", None),
                                                                        ("model-a", "safetensors", 10)]
    assert len(store.list()) == 4
    assert {e.analysis for e in store.list(fingerprint=FP)} == {"analysis0", "analysis1", "analysis2"}
    assert len(store.list(analysis="analysis0")) == 2
    key = store.list(fingerprint=FP, analysis="analysis1")[0].key
    assert store.delete(key[:10]) == 1
    assert store.delete(FP[:8]) == 2  # a fingerprint prefix deletes the model's entries
    assert [m.label for m in store.models()] == ["model-b"]
    _check(store.get("f" * 32, "analysis0", {}, "v1"), 9)
    with pytest.raises(ConfigError, match="too short"):
        store.delete("ab")


def test_shared_blob_survives_deleting_one_of_two_entries(store):
    store.put(FP, "a", {}, "v1", _result(1))
    store.put(FP, "b", {}, "v1", _result(1))  # same content -> same blobs
    store.delete(store.list(analysis="a")[0].key)
    _check(store.get(FP, "b", {}, "v1"), 1)


def test_cached_computes_once(store):
    calls = []

    def compute():
        calls.append(1)
        return _result(3)

    for _ in range(3):
        _check(store.cached(FP, "x", {"p": 1}, "v1", compute), 3)
    assert len(calls) == 1
    store.cached(FP, "x", {"p": 1}, "v1", compute, refresh=True)
    assert len(calls) == 2


def _blob_files(store: Store) -> list[Path]:
    return sorted(p for p in store.blob_dir.glob("*/*") if p.is_file())


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_corrupt_blob_is_detected_and_recomputed_never_served(store, damage):
    store.put(FP, "x", {}, "v1", _result(5))
    target = next(p for p in _blob_files(store) if p.suffix == ".safetensors")
    if damage == "flip":
        data = bytearray(target.read_bytes())
        data[-3] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-10])
    else:
        target.unlink()
    with pytest.raises(CorruptEntryError, match="recomputed"):
        store.get(FP, "x", {}, "v1")
    got = store.cached(FP, "x", {}, "v1", lambda: _result(5))
    _check(got, 5)
    _check(store.get(FP, "x", {}, "v1"), 5)  # repaired on disk


def test_failed_put_leaves_store_unchanged(store):
    store.put(FP, "x", {}, "v1", _result(1))
    with pytest.raises(ConfigError, match="JSON-serialisable"):
        store.put(FP, "y", {"bad": object()}, "v1", _result(2))

    def boom():
        raise RuntimeError("analysis failed")

    with pytest.raises(RuntimeError):
        store.cached(FP, "z", {}, "v1", boom)
    assert [e.analysis for e in store.list()] == ["x"]
    _check(store.get(FP, "x", {}, "v1"), 1)


def test_unwritable_store_directory_is_a_typed_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError, match="not writable.*LENSLAB_STORE"):
        Store(blocker / "store")


def test_default_store_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("LENSLAB_STORE", str(tmp_path / "envstore"))
    assert Store().root == tmp_path / "envstore"


def test_gc_removes_orphans_but_not_live_blobs(store):
    store.put(FP, "x", {}, "v1", _result(1))
    orphan_tmp = store.tmp_dir / "dead-writer.safetensors"
    orphan_tmp.write_bytes(b"partial")
    orphan_blob = store.blob_dir / "zz" / "zz-orphan.parquet"
    orphan_blob.parent.mkdir()
    orphan_blob.write_bytes(b"x")
    past = time.time() - 7200
    os.utime(orphan_tmp, (past, past))
    os.utime(orphan_blob, (past, past))
    for p in _blob_files(store):
        os.utime(p, (past, past))
    assert store.gc() == 2
    _check(store.get(FP, "x", {}, "v1"), 1)


# Writers killed with SIGKILL (20 times and at each step of a put) and several processes writing and
# reading at once: tests/test_faults.py.
