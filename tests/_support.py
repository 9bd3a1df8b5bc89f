"""Helpers shared by several test modules (imported as ``from _support import ...``)."""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# the console script of the venv running the tests
LENSLAB = shutil.which("lenslab", path=str(Path(sys.executable).parent)) or "lenslab"


def run_cli(*args: str, store: Path | None = None, env: dict | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
    """Run ``lenslab ARGS`` as a user would (a subprocess); assert exit 0 unless ``check=False``."""
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    if store is not None:
        full_env["LENSLAB_STORE"] = str(store)
    out = subprocess.run([LENSLAB, *args], capture_output=True, text=True, env=full_env, timeout=300)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def figure_array(value) -> np.ndarray:
    """A figure-JSON array: a plain list or plotly's typed array {dtype, bdata, shape}."""
    if isinstance(value, dict) and "bdata" in value:
        a = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        shape = [int(s) for s in str(value.get("shape", len(a))).split(",")]
        return a.reshape(shape)
    return np.array(value, dtype=float)


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "2m"):
    """Mount a small tmpfs at ``path`` for the block (skips the test when mounting is not permitted);
    ``remount_read_only(path)`` makes it read-only even for root."""
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no `mount` command: cannot make a small or read-only file system")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here ({done.stderr.strip()}); the patched-writer tests "
                    "cover the same paths")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount_read_only(path: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True, capture_output=True)
