"""The SVD fall-back for ill-conditioned matrices (kappa > 1e4): singular values against numpy's
float64 SVD and matrices with known singular values, and its peak memory measured in a child
process (no float64 copy of the matrix: a blocked QR, then the SVD of the n x n R factor)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from analysis.weights import singular_values as sv_mod

PROBE = (Path(__file__).resolve().parents[2] / "_peak_rss.py")
MIB = 1 << 20


def known(rng: np.random.Generator, rows: int, cols: int, kappa: float) -> tuple[np.ndarray, np.ndarray]:
    """(U diag(s) Vᵀ in float64, s) with s geometric from 2 down to 2/kappa."""
    k = min(rows, cols)
    s = np.geomspace(2.0, 2.0 / kappa, k)
    u, _ = np.linalg.qr(rng.standard_normal((rows, k)))
    v, _ = np.linalg.qr(rng.standard_normal((cols, k)))
    return (u * s) @ v.T, s


def check_against_numpy(w: torch.Tensor) -> np.ndarray:
    """The fall-back's values for ``w`` equal numpy's float64 SVD of its exact upcast (every value
    within 1e-10·s_max, kappa within 1e-6 of ``numpy.linalg.cond``); returns them."""
    ref64 = w.to(torch.float64).numpy()
    ref = np.linalg.svd(ref64, compute_uv=False)
    s, route = sv_mod.spectrum(w)
    assert route == "svd"
    assert s.shape == ref.shape and np.all(np.diff(s) <= 0)
    np.testing.assert_allclose(s, ref, rtol=0, atol=1e-10 * ref[0])
    np.testing.assert_allclose(s[0] / s[-1], np.linalg.cond(ref64), rtol=1e-6)
    return s


@pytest.mark.parametrize("shape", [(1000, 48), (49, 48), (48, 48), (48, 700), (130, 129)], ids=str)
def test_blocked_qr_route_matches_numpy_and_known_values(shape, rng, monkeypatch):
    monkeypatch.setattr(sv_mod, "QR_BLOCK_ELEMENTS", 48 * 70)  # many row blocks, a ragged last one
    w, s_true = known(rng, *shape, kappa=1e6)
    got = check_against_numpy(torch.from_numpy(w))
    np.testing.assert_allclose(got, s_true, rtol=1e-8)  # relative accuracy down to s_min


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_stored_dtypes_are_upcast_exactly(dtype, rng, monkeypatch):
    monkeypatch.setattr(sv_mod, "QR_BLOCK_ELEMENTS", 40 * 64)
    w, _ = known(rng, 900, 40, kappa=1e3)
    w = torch.from_numpy(w * np.logspace(0, -4, 40)).to(dtype)  # scaled columns: kappa ~1e7 after rounding
    check_against_numpy(w)


def test_transposed_and_strided_views(rng, monkeypatch):
    monkeypatch.setattr(sv_mod, "QR_BLOCK_ELEMENTS", 30 * 64)
    base = torch.from_numpy(known(rng, 30, 1500, kappa=1e7)[0]).to(torch.float32)
    for w in (base, base.T, base[:, ::3], base.T[::2]):
        check_against_numpy(w)


@pytest.mark.parametrize("shape", [(80, 200), (200, 80), (80, 80)], ids=str)
def test_the_callers_matrix_is_left_unchanged(shape, rng):
    w = torch.from_numpy(known(rng, *shape, kappa=1e6)[0])  # float64: its upcast could be a view of it
    before = w.clone()
    check_against_numpy(w)
    assert torch.equal(w, before)


def test_a_failing_gesdd_falls_back_to_gesvd_on_a_fresh_factor(rng, monkeypatch):
    real = scipy.linalg.svd
    drivers = []

    def flaky(a, *args, lapack_driver="gesdd", **kwargs):
        drivers.append(lapack_driver)
        if lapack_driver == "gesdd":
            a[...] = np.nan  # what a failed in-place LAPACK call may leave behind
            raise np.linalg.LinAlgError("SVD did not converge")
        return real(a, *args, lapack_driver=lapack_driver, **kwargs)

    monkeypatch.setattr(scipy.linalg, "svd", flaky)
    w, s_true = known(rng, 300, 50, kappa=1e8)
    got = check_against_numpy(torch.from_numpy(w))
    assert drivers == ["gesdd", "gesvd"]
    np.testing.assert_allclose(got, s_true, rtol=1e-7)


def _probe(*args: str) -> dict:
    out = subprocess.run([sys.executable, str(PROBE), *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("rows, cols", [(16000, 1024), (2048, 2048)], ids=["tall", "square"])
def test_fallback_peak_memory_has_no_float64_copy_of_the_matrix(rows, cols):
    """Peak resident growth of the whole spectrum call (Gram, eigenvalues, fall-back) stays within
    the n x n float64 Gram buffer + 16 MiB. Before the blocked QR it was 4.2x the fp32 matrix for
    the tall case (a float64 copy, and scipy's own copy of it): 262 MiB against this bound of 24."""
    report = _probe("svd", str(rows), str(cols), "float32")
    assert report["result"] == "svd"
    assert report["growth"] <= 8 * cols * cols + 16 * MIB, report
