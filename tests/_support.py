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

ROOT = Path(__file__).resolve().parents[1]
# SAELens 6.x in its own venv (it pins TransformerLens 3): bash benchmarks/saelens_env.sh
SAELENS_PYTHON = Path(os.environ.get("SAELENS_PYTHON", ROOT / ".venv-saelens" / "bin" / "python"))

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


F32_EPS = float(np.finfo(np.float32).eps)  # 1.19e-7


def assert_close_f32(actual, desired, *, ulps: float = 64, per_leading_index: bool = False) -> None:
    """Assert two float32 computations of the same activations agree to ``ulps`` units of float32
    rounding *of their magnitude*: |actual - desired| <= ulps * eps32 * scale, elementwise, with
    scale = max |desired| (over each leading index, e.g. each layer, with ``per_leading_index``).

    Why this bound: padding, batching, thread count and hook order change the blocking and the
    summation order of the float32 GEMMs and reductions (lengths up to d_mlp) that produce an
    activation, and each of the ~2 per block rounds relative to the largest values it sums. Those
    differences were measured at up to ~6 eps32 of the magnitude on MiniLM (1.24e-5 on values near
    16 under CPU load), so a fixed ``atol=1e-5`` fails on larger activations while being loose on
    small ones. 64 eps32 (7.6e-6 of the magnitude) is ten times the measured worst and still four
    orders of magnitude below what a real bug gives (a padded token leaking into attention moves
    activations by >= 1e-2 of their magnitude).
    """
    actual, desired = np.asarray(actual, dtype=np.float64), np.asarray(desired, dtype=np.float64)
    assert actual.shape == desired.shape, (actual.shape, desired.shape)
    if per_leading_index and desired.ndim > 1:
        scale = np.abs(desired).reshape(len(desired), -1).max(1).reshape((-1,) + (1,) * (desired.ndim - 1))
    else:
        scale = np.abs(desired).max(initial=0.0)
    bound = ulps * F32_EPS * np.maximum(scale, np.finfo(np.float32).tiny)
    err = np.abs(actual - desired)
    worst = np.unravel_index(int(np.argmax(err - bound)), err.shape) if err.size else ()
    assert (err <= bound).all(), (f"float32 values differ by {err[worst]:.3e} at {worst} (value {desired[worst]:.4g}); "
                                  f"bound {ulps:g} eps32 x scale = {np.broadcast_to(bound, err.shape)[worst]:.3e}")


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


def saelens_load(directory: Path, x: np.ndarray, workdir: Path) -> tuple[dict, dict]:
    """SAELens's own ``SAE.load_from_disk(directory)`` in its venv (``benchmarks/saelens_peer.py load``) applied
    to ``x`` [n, d_in] float32: (its report: architecture, sizes, hook names, float64 checksums per weight;
    its outputs: ``feature_acts`` and ``sae_out``). Fails the test when the peer exits non-zero."""
    import json

    np.save(workdir / "x.npy", np.asarray(x, dtype=np.float32))
    proc = subprocess.run(
        [str(SAELENS_PYTHON), str(ROOT / "benchmarks" / "saelens_peer.py"), "load", str(directory),
         "--input", str(workdir / "x.npy"), "--output", str(workdir / "out.npz")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    with np.load(workdir / "out.npz") as out:
        return json.loads(proc.stdout.strip().splitlines()[-1]), dict(out)


def open_sae_compare(monkeypatch, store_dir: Path, saes=None):
    """The dashboard's Compare SAEs page (streamlit AppTest) on the store ``store_dir``; ``saes`` (a frame)
    stands in for ``api.sae_list``. Fails the test on a page exception."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("LENSLAB_STORE", str(store_dir))
    if saes is not None:
        from app import api

        monkeypatch.setattr(api, "sae_list", lambda store=None: saes)
    at = AppTest.from_file(str(ROOT / "app" / "dashboard.py"), default_timeout=120).run()
    at.switch_page("views/sae_compare.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at
