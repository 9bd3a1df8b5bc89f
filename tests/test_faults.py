"""Fault tests of the results store (bounded in time): writers killed with SIGKILL at random
moments and at each step of a put, and several processes writing and reading at once."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from _store_writer import FP, PHASES, SHARED_BASE, expected, is_whole
from analysis.store import Store

WRITER = str(Path(__file__).with_name("_store_writer.py"))
KILL_ROUNDS = 20


def _writer(root: Path, start: int, n: int, size: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, WRITER, str(root), str(start), str(n), str(size), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _assert_consistent(root: Path, size: int, checked: set[str] | None = None) -> Store:
    """The store opens, SQLite finds no damage, and every visible entry (not in ``checked``,
    which is then updated) is whole."""
    store = Store(root)
    with sqlite3.connect(store.index_path) as con:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    entries = store.list()
    assert len({e.key for e in entries}) == len(entries)
    for e in entries:
        if checked is None or e.key not in checked:
            assert is_whole(store.get_by_key(e.key), e.params["i"], size), f"entry {e.params['i']} is not whole"
    if checked is not None:
        checked.update(e.key for e in entries)
    return store


def test_sigkill_at_random_moments_20_times_leaves_only_whole_entries(tmp_path):
    root, size = tmp_path / "store", 50_000  # 0.4 MB arrays: a put spends its time in blob writes and fsyncs
    Store(root)
    rng = np.random.default_rng(7)
    committed_before: set[int] = set()
    mid_put = 0  # kills that left a temp file or an unreferenced blob: they landed inside a put
    checked: set[str] = set()  # entries already read back whole (committed entries are immutable)
    t0 = time.perf_counter()
    for round_ in range(KILL_ROUNDS):
        p = _writer(root, round_ * 1000, 1000, size)
        assert p.stdout.readline().strip() == "ready", p.stderr.read()  # past start-up, first entry committed
        time.sleep(rng.uniform(0.0, 0.4))
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
        assert p.returncode == -signal.SIGKILL
        store = _assert_consistent(root, size, checked)
        now = {e.params["i"] for e in store.list()}
        assert committed_before <= now  # a kill never loses what an earlier writer committed
        assert round_ * 1000 in now
        referenced = {b for e in store.list() for b in _blobs(store, e.key)}
        mid_put += bool(any(store.tmp_dir.iterdir()) or {q.name for q in store.blob_dir.glob("*/*")} - referenced)
        store.gc(older_than_s=0)
        committed_before = now
    print(f"{KILL_ROUNDS} kills, {mid_put} inside a put, {len(committed_before)} entries committed, "
          f"{time.perf_counter() - t0:.1f} s")
    assert mid_put >= 1  # the test exercised interrupted puts, not only kills between puts
    # a fresh writer can still write, and gc clears the temp files of killed writers
    store = Store(root)
    store.put(FP, "entry", {"i": 10**7}, "v1", expected(10**7, size))
    assert is_whole(store.get(FP, "entry", {"i": 10**7}, "v1"), 10**7, size)
    _assert_consistent(root, size)


@pytest.mark.parametrize("phase", PHASES)
def test_sigkill_at_each_step_of_a_put(tmp_path, phase):
    root, size = tmp_path / "store", 1000
    Store(root)
    p = _writer(root, 0, 5, size, "--fault", phase)
    out, err = p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL, err  # the fault fired during the second put
    store = _assert_consistent(root, size)
    visible = {e.params["i"] for e in store.list()}
    assert visible == ({0, 1} if phase == "after-commit" else {0})  # committed = visible and whole, else absent
    assert store.get(FP, "entry", {"i": 1}, "v1") is None or phase == "after-commit"
    store.gc(older_than_s=0)  # orphan temp files and unreferenced blobs go
    referenced = {b for e in store.list() for b in _blobs(store, e.key)}
    assert {p.name for p in store.blob_dir.glob("*/*")} == referenced
    assert not any(store.tmp_dir.iterdir())
    store.put(FP, "entry", {"i": 1}, "v1", expected(1, size))  # the interrupted put can simply be redone
    assert is_whole(store.get(FP, "entry", {"i": 1}, "v1"), 1, size)


def _blobs(store: Store, key: str) -> list[str]:
    with sqlite3.connect(store.index_path) as con:
        row = con.execute("SELECT table_blob, arrays_blob FROM entries WHERE key=?", (key,)).fetchone()
    return [b for b in row if b]


def test_three_processes_writing_and_reading_200_entries_each(tmp_path):
    root, size, n, shared = tmp_path / "store", 256, 200, 20
    Store(root)
    procs = [_writer(root, start, n, size, "--shared", str(shared), "--check-reads") for start in (0, 1000, 2000)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, out + err  # exit 3 would mean a reader saw a partial entry
    store = _assert_consistent(root, size)
    got = sorted(e.params["i"] for e in store.list())
    want = sorted([*range(0, n), *range(1000, 1000 + n), *range(2000, 2000 + n),
                   *range(SHARED_BASE, SHARED_BASE + shared)])
    assert got == want  # nothing lost, nothing duplicated (the shared entries were written 3 times)
