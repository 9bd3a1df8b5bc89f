"""Helpers shared by several test modules (imported as ``from _support import ...``)."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

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
