"""Results store: round trips, keys, cache, corruption (process faults: tests/analysis/test_faults.py)."""

from __future__ import annotations

import os
import sqlite3
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



def test_model_keeps_its_first_label_and_lists_other_paths_as_aliases(store):
    store.put(FP, "x", {}, "v1", _result(1))
    store.register_model(FP, "bilinear-lm", "safetensors", n_tensors=3, info={"hf_dir": "/cache/bilinear-lm"})
    for label in ("/work/runs/ckpt-100", "bilinear-lm", "/work/runs/ckpt-100", "/elsewhere/copy"):
        store.register_model(FP, label, "safetensors", n_tensors=3, info={"hf_dir": label})
    (m,) = store.models()
    assert m.label == "bilinear-lm"
    assert m.aliases == ("/work/runs/ckpt-100", "/elsewhere/copy")  # once each, oldest first
    assert m.info["hf_dir"] == "/elsewhere/copy"  # the rest of the record is refreshed
    store.register_model(FP, "sae-owner", "sae-source", replace=False)  # kept as it is
    assert store.models()[0].aliases == ("/work/runs/ckpt-100", "/elsewhere/copy")


def test_store_written_before_aliases_opens_with_the_same_labels(tmp_path):
    """A model table as the code before aliases wrote it (label replaced by the last path, info without
    aliases) lists the same labels; registering another path from then on adds an alias."""
    root = tmp_path / "old"
    Store(root).put(FP, "x", {}, "v1", _result(1))
    _sql(Store(root), "INSERT INTO models VALUES (?,?,?,?,?,?,?)", FP, "/runs/ckpt-100", "safetensors", 3, 10,
         time.time(), '{"hf_dir":"/runs/ckpt-100"}')
    store = Store(root)
    (m,) = store.models()
    assert (m.label, m.aliases, m.info) == ("/runs/ckpt-100", (), {"hf_dir": "/runs/ckpt-100"})
    store.register_model(FP, "/runs/ckpt-100", "safetensors", n_tensors=3, n_params=10,
                         info={"hf_dir": "/runs/ckpt-100"})  # unchanged: nothing written
    assert store.models()[0].info == {"hf_dir": "/runs/ckpt-100"}
    store.register_model(FP, "bilinear-lm", "safetensors", n_tensors=3, n_params=10, info={"hf_dir": "/b"})
    assert (store.models()[0].label, store.models()[0].aliases) == ("/runs/ckpt-100", ("bilinear-lm",))
    _sql(store, "UPDATE models SET info='{\"aliases\": [\"a\", 3]}' WHERE fingerprint=?", FP)
    assert store.models()[0].aliases == ("a",)  # a damaged alias list reads as the strings it holds

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
# reading at once: tests/analysis/test_faults.py.


# ------------------------------------------------------------------------- prefixes matched literally
@pytest.mark.parametrize("prefix", ["____", "%%%%", "_%_%", "0123%", "%abc"])
def test_delete_and_list_match_prefixes_literally(store, prefix):
    for i in range(3):
        store.put(FP, f"a{i}", {}, "v1", _result(i))
    assert store.list(fingerprint=prefix) == []
    assert store.delete(prefix) == 0  # SQL LIKE would have read _ and % as wildcards and deleted everything
    assert len(store.list()) == 3
    for i in range(3):
        _check(store.get(FP, f"a{i}", {}, "v1"), i)


# ------------------------------------------------------------------------- corrupt index rows and pages
def _sql(store: Store, statement: str, *args) -> None:
    con = sqlite3.connect(store.index_path)
    try:
        con.execute(statement, args)
        con.commit()
    finally:
        con.close()


@pytest.mark.parametrize("column, value", [("meta", '{"i": 3'), ("params", "not json"), ("meta", "[1, 2]")])
def test_corrupt_row_json_is_a_typed_error_treated_as_missing_and_recomputed(store, column, value):
    store.put(FP, "x", {"p": 1}, "v1", _result(3))
    store.put(FP, "y", {}, "v1", _result(4))
    key = entry_key(FP, "x", {"p": 1}, "v1")
    _sql(store, f"UPDATE entries SET {column}=? WHERE key=?", value, key)
    with pytest.raises(CorruptEntryError, match=f"entry {key[:12]}: its params or meta .* not valid JSON.*recomputed"):
        store.get(FP, "x", {"p": 1}, "v1")
    assert [e.analysis for e in store.list()] == ["y"]  # left out of listings, not a crash
    assert store.unreadable_keys() == [key]
    calls = []
    got = store.cached(FP, "x", {"p": 1}, "v1", lambda: calls.append(1) or _result(3))
    assert calls == [1]
    _check(got, 3)
    _check(store.get(FP, "x", {"p": 1}, "v1"), 3)  # the row was rewritten
    assert store.unreadable_keys() == [] and len(store.list()) == 2


def test_corrupt_model_info_reads_as_empty(store):
    store.put(FP, "x", {}, "v1", _result(1))
    store.register_model(FP, "model-a", "safetensors", info={"hf_dir": "/m"})
    _sql(store, "UPDATE models SET info='{broken' WHERE fingerprint=?", FP)
    assert [(m.label, m.info) for m in store.models()] == [("model-a", {})]


def _damage_page(store: Store, table: str) -> None:
    """Overwrite the root page of ``table`` in the (checkpointed) index file with garbage."""
    con = sqlite3.connect(store.index_path)
    page_size = con.execute("PRAGMA page_size").fetchone()[0]
    root = con.execute("SELECT rootpage FROM sqlite_master WHERE name=?", (table,)).fetchone()[0]
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    with open(store.index_path, "r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(bytes([0xA5]) * page_size)


def test_corrupt_index_page_is_a_typed_error_naming_the_fix(store):
    for i in range(3):
        store.put(FP, f"a{i}", {}, "v1", _result(i))
    _damage_page(store, "entries")
    for call in (store.list, lambda: store.get(FP, "a0", {}, "v1"), lambda: store.delete(FP[:8]),
                 lambda: store.put(FP, "a9", {}, "v1", _result(9))):
        with pytest.raises(StoreError, match=r"index .*index.sqlite is damaged.*store check.*\.recover"):
            call()
    with pytest.raises(StoreError, match="is damaged"):  # cached does not paper over a damaged index
        store.cached(FP, "a0", {}, "v1", lambda: _result(0))


def test_index_that_is_not_a_database_is_a_typed_error(tmp_path):
    store = Store(tmp_path / "s")
    store.put(FP, "x", {}, "v1", _result(1))
    with open(store.index_path, "r+b") as f:
        f.write(b"this is not sqlite" * 8)  # the header page
    with pytest.raises(StoreError, match="is damaged"):
        Store(tmp_path / "s")


# ------------------------------------------------------------------------- read-only and full stores
def test_store_that_cannot_be_written_still_lists_and_reads(tmp_path, monkeypatch):
    root = tmp_path / "s"
    writer = Store(root)
    for i in range(2):
        writer.put(FP, f"a{i}", {}, "v1", _result(i))
    writer.register_model(FP, "model-a", "safetensors")
    before = {p: p.read_bytes() for p in _blob_files(writer)}

    def refuse(self):  # the write probe as a chmod -w directory answers it (root ignores chmod)
        raise PermissionError(13, "Permission denied", str(self.tmp_dir))

    monkeypatch.setattr(Store, "_prepare", refuse)
    store = Store(root)
    assert "Permission denied" in store.read_only_reason
    assert sorted(e.analysis for e in store.list()) == ["a0", "a1"]
    _check(store.get(FP, "a1", {}, "v1"), 1)
    assert [m.label for m in store.models()] == ["model-a"]
    store.register_model(FP, "model-a", "safetensors")  # unchanged: nothing to write, no error
    _check(store.cached(FP, "a0", {}, "v1", lambda: pytest.fail("a hit must not recompute")), 0)
    for call in (lambda: store.put(FP, "a2", {}, "v1", _result(2)), lambda: store.delete(FP[:8]), store.gc,
                 lambda: store.cached(FP, "a3", {}, "v1", lambda: pytest.fail("must fail before computing")),
                 lambda: store.register_model(FP, "renamed", "safetensors")):
        with pytest.raises(StoreError, match=f"store {root} is read-only.*make the directory writable or pass "
                                             "--store DIR"):
            call()
    assert {p: p.read_bytes() for p in _blob_files(store)} == before
    monkeypatch.undo()  # writable again: the same Store object writes once its probe passes
    store.put(FP, "a2", {}, "v1", _result(2))
    assert store.read_only_reason is None and len(store.list()) == 3


class _FullDisk:
    """A sqlite3 connection whose INSERTs fail as SQLite does on a full disk."""

    def __init__(self, con) -> None:
        self._con = con

    def execute(self, sql: str, *args):
        if sql.startswith("INSERT"):
            raise sqlite3.OperationalError("database or disk is full")
        return self._con.execute(sql, *args)

    def __getattr__(self, name: str):
        return getattr(self._con, name)


@pytest.mark.parametrize("where", ["blob", "index"])
def test_full_disk_is_a_typed_error_and_earlier_entries_stay_intact(store, monkeypatch, where):
    store.put(FP, "a0", {}, "v1", _result(0))
    before = {p: p.read_bytes() for p in _blob_files(store)}
    if where == "blob":
        def no_space(*a, **k):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr("analysis.store.os.fsync", no_space)
    else:
        real = Store._connect
        monkeypatch.setattr(Store, "_connect", lambda self: _FullDisk(real(self)))
    with pytest.raises(StoreError, match=f"store {store.root} is full.*free space on its disk or pass --store "
                                         "DIR.*results stored before are intact"):
        store.put(FP, "a1", {}, "v1", _result(1))
    monkeypatch.undo()
    assert [e.analysis for e in store.list()] == ["a0"]
    _check(store.get(FP, "a0", {}, "v1"), 0)
    assert {p: p.read_bytes() for p in before} == before
    assert not any(store.tmp_dir.iterdir())  # the failed write left no temp file


# ------------------------------------------------------------------------- store check
def test_check_reports_every_kind_of_damage_and_fix_collects_orphans(store):
    for i in range(3):
        store.put(FP, f"a{i}", {}, "v1", _result(i))
    keys = {e.analysis: e.key for e in store.list()}
    assert store.check().ok
    arrays = {e.analysis: store._row(e.key)[7] for e in store.list()}
    store._blob_path(arrays["a0"]).unlink()  # missing
    store._blob_path(arrays["a1"]).write_bytes(b"flipped")  # corrupt
    _sql(store, "UPDATE entries SET meta='{' WHERE key=?", keys["a2"])  # unreadable
    orphan = store.blob_dir / "ab" / ("ab" + "0" * 62 + ".parquet")
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"no row points here")
    old_tmp, new_tmp = store.tmp_dir / "dead.safetensors", store.tmp_dir / "running.safetensors"
    old_tmp.write_bytes(b"partial")
    new_tmp.write_bytes(b"partial")
    os.utime(old_tmp, (time.time() - 7200,) * 2)
    rep = store.check()
    assert rep.index == "ok" and rep.n_entries == 3
    assert rep.orphan_blobs == (orphan,)
    assert rep.missing_blobs == ((keys["a0"], arrays["a0"]),)
    assert rep.corrupt_blobs == ((keys["a1"], arrays["a1"]),)
    assert rep.unreadable_entries == (keys["a2"],)
    assert set(rep.temp_files) == {old_tmp, new_tmp} and rep.removed == () and rep.remaining == 6
    assert orphan.exists()  # a check without fix changes nothing
    fixed = store.check(fix=True)
    assert set(fixed.removed) == {orphan, old_tmp} and not orphan.exists() and not old_tmp.exists()
    assert new_tmp.exists()  # may belong to a writer still running
    assert fixed.remaining == 4  # missing, corrupt, unreadable, the young temp file


def test_check_collects_blobs_orphaned_by_a_lost_wal(store):
    store.put(FP, "kept", {}, "v1", _result(0))  # checkpointed into index.sqlite when its connection closed
    holder = sqlite3.connect(store.index_path)  # an open reader: no checkpoint when the writers close
    holder.execute("SELECT count(*) FROM entries").fetchone()
    for i in (1, 2):
        store.put(FP, f"lost{i}", {}, "v1", _result(i))
    main_file = store.index_path.read_bytes()  # the database file without its -wal: the lost state
    holder.close()
    for suffix in ("-wal", "-shm"):
        Path(f"{store.index_path}{suffix}").unlink(missing_ok=True)
    store.index_path.write_bytes(main_file)
    store = Store(store.root)
    assert [e.analysis for e in store.list()] == ["kept"]
    rep = store.check()
    assert rep.index == "ok" and len(rep.orphan_blobs) == 4 and not rep.ok  # table + arrays of the 2 lost entries
    assert set(store.check(fix=True).removed) == set(rep.orphan_blobs)
    assert store.check().ok
    _check(store.get(FP, "kept", {}, "v1"), 0)
    store.put(FP, "lost1", {}, "v1", _result(1))  # the lost entry is simply recomputed
    _check(store.get(FP, "lost1", {}, "v1"), 1)


def test_check_deletes_no_blob_when_the_index_is_damaged(store):
    for i in range(2):
        store.put(FP, f"a{i}", {}, "v1", _result(i))
    blobs = _blob_files(store)
    _damage_page(store, "entries")
    rep = store.check(fix=True)
    assert "damaged" in rep.index or "malformed" in rep.index
    assert rep.orphan_blobs == () and rep.removed == () and not rep.ok
    assert _blob_files(store) == blobs
