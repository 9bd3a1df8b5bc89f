"""Fault tests of the results store (bounded in time): writers killed with SIGKILL at random
moments and at each step of a put, several processes writing and reading at once, a full disk
and a read-only file system (small tmpfs mounts), and Ctrl-C through the command line."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from _store_writer import FP, PHASES, SHARED_BASE, expected, is_whole
from _support import remount_read_only, run_cli, tmpfs
from analysis.errors import StoreError
from analysis.store import Store
from app.cli.exit_codes import INTERRUPTED_DEFAULT

WRITER = str((Path(__file__).resolve().parents[1] / "_store_writer.py"))
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


# ------------------------------------------------------------------------- a full disk, a read-only store
def test_full_disk_is_a_typed_error_and_earlier_entries_stay_byte_identical(tmp_path):
    size = 20_000  # ~0.2 MB of blobs per entry
    with tmpfs(tmp_path / "mnt", "2m") as mnt:
        filler = mnt / "filler"
        filler.write_bytes(b"\0" * 300_000)
        store, stored = Store(mnt / "store"), []
        with pytest.raises(StoreError, match=f"store {mnt / 'store'} is full.*No space left on device.*free space "
                                             "on its disk or pass --store DIR.*results stored before are intact"):
            for i in range(100):
                store.put(FP, "entry", {"i": i}, "v1", expected(i, size))
                stored.append(i)
        assert len(stored) >= 2
        blobs = {p: p.read_bytes() for p in store.blob_dir.glob("*/*")}
        store = Store(mnt / "store")  # a full store still opens, lists and reads
        assert sorted(e.params["i"] for e in store.list()) == stored
        assert all(is_whole(store.get(FP, "entry", {"i": i}, "v1"), i, size) for i in stored)
        assert not any(store.tmp_dir.iterdir())
        filler.unlink()  # room again: the next write succeeds, the earlier blobs are untouched
        store.put(FP, "entry", {"i": 100}, "v1", expected(100, size))
        assert is_whole(store.get(FP, "entry", {"i": 100}, "v1"), 100, size)
        assert {p: p.read_bytes() for p in blobs} == blobs
        with sqlite3.connect(store.index_path) as con:
            assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_read_only_file_system_store_lists_and_reads_and_refuses_writes(tmp_path):
    size = 1000
    with tmpfs(tmp_path / "mnt", "8m") as mnt:
        root = mnt / "store"
        writer = Store(root)
        for i in range(2):
            writer.put(FP, "entry", {"i": i}, "v1", expected(i, size))
        writer.register_model(FP, "model-a", "safetensors")
        blobs = {p: p.read_bytes() for p in writer.blob_dir.glob("*/*")}
        remount_read_only(mnt)  # read-only even for root, unlike chmod
        store = Store(root)
        assert "Read-only file system" in store.read_only_reason
        assert sorted(e.params["i"] for e in store.list()) == [0, 1]
        assert all(is_whole(store.get(FP, "entry", {"i": i}, "v1"), i, size) for i in (0, 1))
        assert [m.label for m in store.models()] == ["model-a"]
        assert store.check().ok
        for call in (lambda: store.put(FP, "entry", {"i": 2}, "v1", expected(2, size)),
                     lambda: store.delete(FP[:8]), lambda: store.register_model(FP, "renamed", "safetensors")):
            with pytest.raises(StoreError, match=f"store {root} is read-only.*Read-only file system.*can still be "
                                                 "listed and read.*pass --store DIR"):
                call()
        listing = json.loads(run_cli("store", "ls", "--json", store=root).stdout)
        assert sorted(e["key"] for e in listing) == sorted(e.key for e in store.list())
        refused = run_cli("store", "rm", FP[:8], store=root, check=False)
        assert refused.returncode == 2 and refused.stderr.startswith(f"error: store {root} is read-only")
        assert len(refused.stderr.strip().splitlines()) == 1
        assert {p: p.read_bytes() for p in store.blob_dir.glob("*/*")} == blobs


# ------------------------------------------------------------------------- Ctrl-C through the command line
_ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")
# `lenslab` with each weight matrix slowed to 0.1 s, so there is time to interrupt it mid-analysis
# `lenslab ...` whose analysis blocks on its third tensor after saying so on stderr: the SIGINT then
# lands mid-work on a quiet machine as on a loaded one (waiting for a progress line raced: on a quiet
# machine the piped progress could first show up after the last tensor, and the command exited 0).
WORKING = "test: analysis blocked on its third tensor"
# If the command is still alive 60 s after it blocked (the SIGINT did not end it), faulthandler prints every
# thread's stack to stderr and exits, so the failure shows where it hung instead of a bare timeout.
SLOW_CLI = ("import faulthandler, sys, time\nimport analysis.weights.spectra as s\nreal = s.weight_matrices\n"
            "calls = []\ndef slow(*a, **k):\n    calls.append(1)\n    if len(calls) == 3:\n"
            "        faulthandler.dump_traceback_later(60, exit=True)\n"
            f"        sys.stderr.write('\\n{WORKING}\\n')\n        sys.stderr.flush()\n        time.sleep(300)\n"
            "    return real(*a, **k)\n"
            "s.weight_matrices = slow\nfrom app.cli import main\nmain()\n")


def _interrupt_when(cmd: list[str], env: dict, seen: Callable[[bytes], bool]) -> tuple[int, list[str]]:
    """Run ``cmd`` with rich's progress drawn on its (piped) stderr, send one SIGINT as soon as
    ``seen(stderr so far)``, and return its exit code and final screen lines."""
    env = {**os.environ, "COLUMNS": "200", "TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1", **env}
    # A process started in the background by a shell without job control (CI runners, `cmd &` in a script)
    # inherits SIGINT as ignored, and a Python child then never raises KeyboardInterrupt: give the command the
    # default disposition, as an interactive terminal would.
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    err = b""
    try:
        while not seen(err):
            chunk = os.read(p.stderr.fileno(), 65536)
            assert chunk, f"exited ({p.wait()}) before it was working: {err.decode(errors='replace')[-2000:]}"
            err += chunk
        p.send_signal(signal.SIGINT)
        _, rest = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    lines = [ln.split("\r")[-1].strip() for ln in _ANSI.sub(b"", err + rest).decode(errors="replace").split("\n")]
    return p.returncode, [ln for ln in lines if ln]


def test_ctrl_c_during_analyze_exits_130_with_one_line_and_keeps_the_store(tmp_path, rng):
    small, big = tmp_path / "small.safetensors", tmp_path / "big.safetensors"
    save_file({"w": torch.from_numpy(rng.standard_normal((8, 4)).astype(np.float32))}, str(small))
    save_file({f"t{i:03d}.weight": torch.from_numpy(rng.standard_normal((16, 16)).astype(np.float32))
               for i in range(100)}, str(big))
    store = tmp_path / "store"
    run_cli("analyze", str(small), store=store)
    before = Store(store).list()
    rc, lines = _interrupt_when([sys.executable, "-c", SLOW_CLI, "analyze", str(big)], {"LENSLAB_STORE": str(store)},
                                lambda err: WORKING.encode() in err)
    assert rc == 130, "\n".join(lines)  # on a hang: every thread's stack (faulthandler, see SLOW_CLI)
    assert lines[-1] == INTERRUPTED_DEFAULT and sum("interrupted" in ln for ln in lines) == 1
    assert not any("Traceback" in ln for ln in lines)
    after = _assert_consistent(store, 0, checked={e.key for e in before})
    assert after.list() == before  # nothing partial; the earlier entry as it was
    assert after.check().ok  # no orphan, no temp file
    out = run_cli("analyze", str(big), "--json", store=store)  # the same command then completes
    assert len(json.loads(out.stdout)) == 100


@pytest.mark.slow
def test_ctrl_c_during_sae_train_exits_130_and_keeps_its_checkpoint(tmp_path):
    from _tiny_llama import make_tiny_llama

    llama, texts, store, acts = make_tiny_llama(tmp_path / "model"), tmp_path / "t.txt", tmp_path / "s", tmp_path / "a"
    words = ["tensor", "array", "frame", "model", "value", "index", "shape", "file"]
    texts.write_text("\n".join(f"the {a} of a {b} returns a new {c}" for a in words for b in words for c in words[:3]))
    cmd = [sys.executable, "-m", "app.cli", "sae", "train", str(llama), "--layer", "1", "--architecture", "relu",
           "--d-sae", "32", "--tokens", str(10**8), "--batch-size", "128", "--checkpoint-every", "20",
           "--texts", str(texts)]

    def past_first_checkpoint(err: bytes) -> bool:
        return any(int(s) > 20 for s in re.findall(rb"step (\d+)/", err))

    rc, lines = _interrupt_when(cmd, {"LENSLAB_STORE": str(store), "LENSLAB_ACTIVATIONS": str(acts)},
                                past_first_checkpoint)
    assert rc == 130, "\n".join(lines)  # on a hang: every thread's stack (faulthandler, see SLOW_CLI)
    assert lines[-1].startswith("training interrupted; its last checkpoint (every 20 steps) is kept")
    assert sum("interrupted" in ln for ln in lines) == 1 and not any("Traceback" in ln for ln in lines)
    assert len(list((acts / "sae-checkpoints").glob("*.safetensors"))) == 1
    assert _assert_consistent(store, 0).list() == []  # no partial SAE entry
