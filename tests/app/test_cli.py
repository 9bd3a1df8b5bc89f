"""The `lenslab` console script, run as a user runs it (a subprocess of the installed entry point)."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _support import run_cli as run
from safetensors.torch import save_file


@pytest.fixture
def model_file(tmp_path, rng) -> tuple[Path, dict[str, np.ndarray]]:
    weights = {
        "blocks.0.mlp.weight": rng.standard_normal((24, 12)),
        "blocks.1.mlp.weight": rng.standard_normal((12, 24)) * np.linspace(1, 1e-3, 24),
        "blocks.1.mlp.bias": rng.standard_normal(12),
        "zero.weight": np.zeros((6, 6)),
        "broken.weight": np.where(np.eye(5) > 0, np.nan, 1.0),
    }
    path = tmp_path / "model.safetensors"
    save_file({k: torch.from_numpy(v.astype(np.float32)) for k, v in weights.items()}, str(path))
    return path, weights


def test_analyze_json_rows_match_numpy(tmp_path, model_file):
    path, weights = model_file
    out = run("analyze", str(path), "--analysis", "conditioning", "--json", store=tmp_path / "s")
    rows = {r["tensor"]: r for r in json.loads(out.stdout)}
    assert set(rows) == {"blocks.0.mlp.weight", "blocks.1.mlp.weight", "zero.weight", "broken.weight"}
    for r in rows.values():
        assert {"tensor", "shape", "sigma_max", "sigma_min", "kappa", "stable_rank", "alpha"} <= set(r)
    for name in ("blocks.0.mlp.weight", "blocks.1.mlp.weight"):
        w = weights[name].astype(np.float32).astype(np.float64)
        s = np.linalg.svd(w, compute_uv=False)
        assert math.isclose(rows[name]["kappa"], np.linalg.cond(w), rel_tol=1e-7)
        assert math.isclose(rows[name]["sigma_max"], s[0], rel_tol=1e-9)
        assert math.isclose(rows[name]["stable_rank"], (s**2).sum() / s[0] ** 2, rel_tol=1e-9)
        assert rows[name]["shape"] == "x".join(map(str, w.shape))
    assert rows["zero.weight"]["kappa"] == "inf"  # JSON has no infinity: spelled out
    assert rows["broken.weight"]["status"].startswith("nonfinite: 5 NaN")
    assert rows["broken.weight"]["kappa"] is None


def test_analyze_spectra_table_store_ls_and_rm(tmp_path, model_file):
    path, _ = model_file
    store = tmp_path / "s"
    out = run("analyze", str(path), "--analysis", "spectra", store=store)
    assert "blocks.0.mlp.weight" in out.stdout and "1 1-D tensors skipped" in out.stdout
    listing = json.loads(run("store", "ls", "--json", store=store).stdout)
    assert [e["analysis"] for e in listing] == ["spectra"]
    assert listing[0]["model"] == str(path.resolve())
    run("store", "rm", listing[0]["key"][:8], store=store)
    assert json.loads(run("store", "ls", "--json", store=store).stdout) == []


@pytest.mark.parametrize("args, message", [
    (("analyze", "no-such-model"), "neither a bundled model name"),
    (("analyze", "minilm", "--analysis", "bogus"), "unknown analysis 'bogus'"),
    (("store", "rm", "ab"), "too short"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, args, message):
    out = run(*args, store=tmp_path / "s", check=False)
    assert out.returncode == 2
    assert message in " ".join(out.stderr.split())
    assert "Traceback" not in out.stderr


def test_unwritable_store_is_reported(tmp_path, model_file):
    path, _ = model_file
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = run("analyze", str(path), store=blocker / "store", check=False)
    assert out.returncode == 2 and "not writable" in out.stderr


def _one_line_error(out, code: int, *fragments: str) -> None:
    """``out`` failed with ``code`` and a single ``error: …`` line holding every fragment, no traceback."""
    assert out.returncode == code, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run ``lenslab ARGS`` in this process (as the console script does); exit code, stdout, stderr."""
    from app import cli

    monkeypatch.setattr(sys, "argv", ["lenslab", *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def _fill(root: Path, n: int = 2):
    from analysis.store import Result, Store

    store = Store(root)
    for i in range(n):
        store.put("0123456789abcdef" * 2, f"a{i}", {}, "v1", Result(arrays={"x": np.arange(i + 3)}))
    return store


def test_store_rm_matches_wildcard_characters_literally(tmp_path, monkeypatch, capsys):
    store = _fill(tmp_path / "s", 3)
    for prefix in ("____", "%%%%", "%_%_"):
        code, out, _ = _main(monkeypatch, capsys, "store", "rm", prefix, "--store", str(store.root))
        assert code == 0 and out.startswith(f"deleted 0 entries (no entry key or model fingerprint starts with "
                                            f"'{prefix}'")
    assert len(store.list()) == 3  # LIKE would have read _ and % as wildcards and deleted everything
    code, out, _ = _main(monkeypatch, capsys, "store", "rm", "01234567", "--store", str(store.root))
    assert code == 0 and out.startswith("deleted 3 entries") and store.list() == []


@pytest.mark.parametrize("args, message", [
    (("analyze",), "Missing argument 'sources'. (see `lenslab analyze --help`)"),
    (("analyze", "minilm", "--bogus"), "No such option: --bogus"),
    (("store", "rm"), "Missing argument 'key'"),
])
def test_usage_errors_are_one_line_exit_2(tmp_path, args, message):
    _one_line_error(run(*args, store=tmp_path / "s", check=False), 2, message)


def test_no_command_prints_the_help_and_exits_2(tmp_path):
    out = run(store=tmp_path / "s", check=False)
    assert out.returncode == 2 and "Usage: lenslab" in out.stderr + out.stdout and "Traceback" not in out.stderr


def test_unexpected_error_is_one_line_exit_1(tmp_path, monkeypatch, capsys):
    from app import api, cli

    def broken(store=None):
        raise RuntimeError("disk controller on fire\nsecond line")

    monkeypatch.setattr(api, "open_store", broken)
    monkeypatch.setattr(sys, "argv", ["lenslab", "store", "ls"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: unexpected RuntimeError: disk controller on fire second "
                                                   "line (a bug; run again with LENSLAB_DEBUG=1")


def _busy_port():
    """A socket listening on 127.0.0.1 at a free port (the caller closes it)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def test_dashboard_on_a_busy_port_fails_at_once_with_one_line(tmp_path):
    with _busy_port() as sock:
        port = sock.getsockname()[1]
        out = run("dashboard", "--port", str(port), store=tmp_path / "s", check=False)
    _one_line_error(out, 2, f"port {port} on 127.0.0.1 is already in use; pass --port with a free port")


class _FakeStreamlit:
    """Stands for the streamlit child process: exits at once with ``code``."""

    code = 0
    calls: list = []

    def __init__(self, cmd, **kwargs) -> None:
        self.calls.append(cmd)
        self.returncode = None

    def wait(self, timeout=None) -> int:
        self.returncode = self.code
        return self.code

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


@pytest.mark.parametrize("code", [0, 1, 3])
def test_dashboard_passes_streamlit_exit_code_on(tmp_path, monkeypatch, capsys, code):
    from app import cli

    monkeypatch.setattr(_FakeStreamlit, "code", code)
    monkeypatch.setattr(_FakeStreamlit, "calls", [])
    monkeypatch.setattr(subprocess, "Popen", _FakeStreamlit)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(sys, "argv", ["lenslab", "dashboard", "--port", str(port), "--store", str(tmp_path / "s")])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == code
    assert len(_FakeStreamlit.calls) == 1 and "streamlit" in _FakeStreamlit.calls[0]
    if code:
        assert f"error: streamlit exited with code {code}" in capsys.readouterr().err


def test_store_check_reports_and_collects_orphans(tmp_path, monkeypatch, capsys):
    store = _fill(tmp_path / "s")
    root = str(store.root)
    assert _main(monkeypatch, capsys, "store", "check", "--store", root)[1].strip().endswith("ok")
    orphan = store.blob_dir / "ff" / ("ff" * 32 + ".parquet")
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"a blob whose index row was lost")
    code, out, _ = _main(monkeypatch, capsys, "store", "check", "--store", root)
    assert code == 1 and "orphaned blobs (no index row): 1" in out and "store check --fix" in out and orphan.exists()
    code, out, _ = _main(monkeypatch, capsys, "store", "check", "--fix", "--json", "--store", root)
    assert code == 0 and json.loads(out)["removed"] == [str(orphan)] and not orphan.exists()
    assert _main(monkeypatch, capsys, "store", "check", "--store", root)[0] == 0
    assert len(store.list()) == 2


def test_corrupt_index_and_rows_reach_the_cli_as_one_line(tmp_path, model_file, monkeypatch, capsys):
    import sqlite3

    path, _ = model_file
    store = _fill(tmp_path / "s")
    root = str(store.root)
    assert _main(monkeypatch, capsys, "analyze", str(path), "--json", "--store", root)[0] == 0
    with sqlite3.connect(store.index_path) as con:
        con.execute("UPDATE entries SET meta='{' WHERE analysis='spectra'")
    con.close()
    code, out, err = _main(monkeypatch, capsys, "store", "ls", "--json", "--store", root)
    assert code == 0 and len(json.loads(out)) == 2 and "1 entries with unreadable metadata are not listed" in err
    code, out, _ = _main(monkeypatch, capsys, "analyze", str(path), "--json", "--store", root)
    assert code == 0 and len(json.loads(out)) == 4  # the corrupt entry is recomputed, not a crash
    assert len(store.list()) == 3 and store.unreadable_keys() == []
    with open(store.index_path, "r+b") as f:
        f.write(b"garbage, not a SQLite header" * 4)
    for args in (("store", "ls"), ("analyze", str(path))):
        code, out, err = _main(monkeypatch, capsys, *args, "--store", root)
        # stderr is not a terminal here: progress is one plain line per stage before the error's one line
        lines = err.strip().splitlines()
        assert code == 2 and "Traceback" not in err and sum(ln.startswith("error:") for ln in lines) == 1
        assert lines[-1].startswith(f"error: store index {store.index_path} is damaged") and "store check" in lines[-1]
