"""Singular values of weight matrices in float64, fast (pure functions, no I/O).

Fast route: eigenvalues of the float64 Gram matrix on the smaller side (BLAS ``dsyrk`` +
LAPACK ``dsyevd``, eigenvalues only): single-threaded here ~2.5x cheaper than a float64
SVD (``gesdd``) of a 3072x768 matrix, ~1.5x for a square one. Its error in s_min grows
like eps·kappa², so matrices whose Gram-route kappa exceeds ``GRAM_KAPPA_LIMIT`` (or that
are singular) are recomputed with a float64 SVD (``route`` says which was used) without a
float64 copy of the matrix: a tall matrix is reduced to its n x n R factor by a blocked
Householder QR (LAPACK ``dtpqrt`` over row blocks upcast one at a time, TSQR), and the SVD
of R (same singular values; Householder QR is backward stable) runs in place in the
Gram's own buffer, so the fall-back needs O(n² + block) memory (a square matrix is copied
into that buffer instead). Measured
on matrices with known singular values (fp32-stored, 384² to 30522x384): kappa agrees with
the SVD to < 6e-8 relative at kappa = 1e4, every singular value to < 1e-8·s_max.
Matrices are spread over a small thread pool with one BLAS thread each (see ``parallel``);
``analysis.weights.spectra.weight_spectra`` sums a very large matrix's Gram from a fixed number of
row ranges formed in parallel. Rows are upcast to float64 a block at a time (no full float64
copy). Every matrix is computed by one thread with one BLAS thread, in an order fixed by its
shape, so results are bitwise the same whatever the number of workers (or processes, or
Ray tasks) a run uses.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import lru_cache

import numpy as np
import scipy.linalg
import torch
from scipy.linalg import blas, lapack

from analysis.errors import ShapeError

GRAM_KAPPA_LIMIT = 1e4  # above this the Gram route's s_min would lose more than ~1e-7 relative accuracy
MAX_WORKERS = 8  # matrices analysed in parallel (capped by the usable CPUs)
GRAM_BLOCK_ELEMENTS = 1 << 18  # rows upcast to float64 at a time while forming a Gram (2 MiB)
QR_BLOCK_ELEMENTS = 1 << 18  # rows upcast to float64 at a time by the SVD fall-back's blocked QR (2 MiB)


def singular_values(matrix: torch.Tensor) -> np.ndarray:
    """Singular values of one matrix (rows, cols), float64, descending (exact float64 SVD)."""
    if matrix.ndim != 2 or 0 in matrix.shape:
        raise ShapeError(f"expected a non-empty 2-D matrix, got shape {tuple(matrix.shape)}")
    return torch.linalg.svdvals(matrix.detach().to(torch.float64)).numpy()


def n_workers() -> int:
    """Threads for matrix work: the usable CPUs, at most ``MAX_WORKERS`` (or ``$LENSLAB_THREADS``)."""
    env = os.environ.get("LENSLAB_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cpus))


@contextmanager
def parallel(n_workers: int) -> Iterator[ThreadPoolExecutor]:
    """A thread pool of ``n_workers``, BLAS/LAPACK held to one thread each while it runs.

    Parallelism over matrices beats threaded LAPACK here: the tridiagonal and bidiagonal
    reductions scale poorly with threads at d_model sizes, and threaded BLAS degrades badly
    when other processes share the cores. One BLAS thread also makes every result independent
    of the machine's thread count. The limit applies process-wide while a call runs.
    """
    from threadpoolctl import threadpool_limits

    limits = threadpool_limits(limits=1, user_api="blas")
    pool = ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="lenslab-spectra")
    try:
        with limits:
            yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def tall(matrix: torch.Tensor) -> torch.Tensor:
    """The matrix (rows >= cols) or its transposed view: same singular values, Gram on cols."""
    m = matrix.detach().cpu()
    return m if m.shape[0] >= m.shape[1] else m.mT


def _as_float64(block: torch.Tensor) -> np.ndarray:
    """C-contiguous float64 copy of a (possibly strided) CPU block: an exact upcast done by
    numpy (single-threaded, releases the GIL); bfloat16 via its bit pattern (bf16 = top
    half of a float32)."""
    if block.dtype == torch.bfloat16:
        bits = block.view(torch.int16).numpy().view(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).astype(np.float64)
    if block.dtype in (torch.float64, torch.float32, torch.float16):
        return np.ascontiguousarray(block.numpy(), dtype=np.float64)
    return np.ascontiguousarray(block.to(torch.float64).numpy())


def gram_rows(tall: torch.Tensor, start: int, stop: int) -> np.ndarray:
    """Σ tᵢᵀtᵢ over rows ``start:stop`` of ``tall`` (n_rows, n) as a float64 (n, n) array
    (upper triangle set), upcast a block of rows at a time (no full float64 copy)."""
    step = max(1, GRAM_BLOCK_ELEMENTS // tall.shape[1])
    by_rows = tall.stride(-1) == 1 or tall.shape[1] == 1  # else a transposed view: copy it as stored
    gram = None
    for a in range(start, stop, step):
        block = tall[a:min(a + step, stop)]
        if by_rows:  # (b, n) C order, so block.T is (n, b) Fortran and trans=0 gives blockᵀ·block
            arr, trans = _as_float64(block), 0
        else:  # (n, b) C order, so arr.T is (b, n) Fortran and trans=1 gives arr·arrᵀ = blockᵀ·block
            arr, trans = _as_float64(block.mT), 1
        if gram is None:
            gram = blas.dsyrk(1.0, arr.T, trans=trans)
        else:
            gram = blas.dsyrk(1.0, arr.T, beta=1.0, c=gram, trans=trans, overwrite_c=1)
    return gram


@lru_cache(maxsize=64)
def _syevd_lwork(n: int) -> int:
    # The wrapper's default workspace (2n+1) forces LAPACK's unblocked tridiagonal reduction,
    # ~1.5x slower at n = 768; ask LAPACK for its preferred size instead.
    work, _, info = lapack.dsyevd_lwork(n, compute_v=0)
    return max(int(work), 2 * n + 1) if info == 0 else 2 * n + 1


def _square_factor(t: torch.Tensor, work: np.ndarray) -> np.ndarray:
    """An n x n float64 matrix (Fortran order, in ``work``) with the singular values of the
    tall ``t`` (rows, n): ``t`` itself when square, else the R factor of its QR.

    R is built by TSQR: blocks of ``QR_BLOCK_ELEMENTS`` (at least 64 rows) are upcast to
    float64 one at a time and folded in with LAPACK ``dtpqrt`` (QR of [R; block]), so no
    float64 copy of ``t`` is made. Block sizes depend only on the shape (reproducible).
    """
    rows, n = t.shape
    if rows == n:
        step = max(1, QR_BLOCK_ELEMENTS // n)
        for a in range(0, rows, step):
            work[a:a + step] = _as_float64(t[a:a + step])
        return work
    work[...] = 0.0
    step = max(64, QR_BLOCK_ELEMENTS // n)
    nb = min(32, n)
    for a in range(0, rows, step):
        block = _as_float64(t[a:a + step].mT).T  # (b, n) in Fortran order, as dtpqrt wants
        # dtpqrt overwrites it: a float64 input's "upcast" can be a view of the caller's matrix
        block = block.copy(order="F") if t.dtype == torch.float64 else np.asfortranarray(block)
        r, _, _, info = lapack.dtpqrt(0, nb, work, block, overwrite_a=1, overwrite_b=1)
        if info != 0 or r is not work:  # pragma: no cover - an illegal argument; never in place otherwise
            raise RuntimeError(f"LAPACK dtpqrt failed (info={info})")
    for j in range(n - 1):  # R is the upper triangle; dtpqrt leaves the rest as given (zero), make sure
        work[j + 1:, j] = 0.0
    return work


def svd_fallback(matrix: torch.Tensor, work: np.ndarray | None = None) -> np.ndarray:
    """Descending singular values of ``matrix`` by a float64 LAPACK SVD (gesdd, then gesvd if
    it fails) of its n x n square factor (``_square_factor``), n = min(rows, cols).

    Memory: the n x n float64 factor (``work`` when given: an F-ordered (n, n) float64 array
    whose contents may be destroyed, e.g. the Gram already consumed by ``dsyevd``), one row
    block and LAPACK's O(n) workspace: never a float64 copy of a tall matrix.
    """
    t = tall(matrix)
    n = t.shape[1]
    if work is None or work.shape != (n, n) or work.dtype != np.float64 or not work.flags.f_contiguous:
        work = np.empty((n, n), dtype=np.float64, order="F")
    for driver in ("gesdd", "gesvd"):  # gesdd can fail to converge; its failure overwrote the factor
        factor = _square_factor(t, work)
        try:
            return scipy.linalg.svd(factor, compute_uv=False, check_finite=False, overwrite_a=True,
                                    lapack_driver=driver)
        except np.linalg.LinAlgError:
            if driver == "gesvd":
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def spectrum_from_gram(matrix: torch.Tensor, gram: np.ndarray) -> tuple[np.ndarray, str]:
    """(singular values descending, route) of ``matrix`` given its float64 Gram (F-ordered,
    upper triangle set; consumed: its buffer is reused by the fall-back).

    Route "gram" when the Gram eigenvalues give s_max/s_min <= GRAM_KAPPA_LIMIT; "svd"
    (float64 LAPACK SVD, see ``svd_fallback``) when kappa is larger, W is singular or LAPACK
    failed; "nonfinite" (all NaN) when W holds NaN or Inf.
    """
    # diag(Gram) = squared norms of W's columns (rows): finite iff W is (barring overflow).
    if np.isfinite(np.diagonal(gram)).all():
        evals, _, info = lapack.dsyevd(gram, compute_v=0, lower=0, lwork=_syevd_lwork(len(gram)), overwrite_a=1)
        if info == 0:
            s = np.sqrt(np.clip(evals[::-1], 0.0, None))
            if s[-1] > 0 and s[0] <= GRAM_KAPPA_LIMIT * s[-1]:
                return s, "gram"
    elif not bool(torch.isfinite(matrix).all()):
        return np.full(min(matrix.shape), math.nan), "nonfinite"
    return svd_fallback(matrix, work=gram), "svd"


def spectrum(matrix: torch.Tensor) -> tuple[np.ndarray, str]:
    """(singular values descending, route) of ``matrix`` on the CPU (see ``spectrum_from_gram``)."""
    t = tall(matrix)
    return spectrum_from_gram(matrix, gram_rows(t, 0, t.shape[0]))


def spectrum_torch(matrix: torch.Tensor, device: torch.device | str) -> tuple[np.ndarray, str]:
    """(singular values descending as CPU float64 numpy, route) of ``matrix`` computed by torch on
    ``device`` in float64, with the routes of ``spectrum_from_gram``.

    For accelerators (``analysis.weights.spectra.weight_spectra`` uses it when the run's device is
    not the CPU): the tall matrix is copied to ``device`` as float64 (rows x n, n = min(rows,
    cols)), its n x n Gram's eigenvalues (``torch.linalg.eigvalsh``) give the "gram" route when
    s_max/s_min <= GRAM_KAPPA_LIMIT; a larger kappa, a singular matrix or a failed eigensolver
    takes the "svd" route (``torch.linalg.svdvals`` of the float64 copy); NaN/Inf give
    "nonfinite" (all NaN). Same accuracy as the CPU routes; values agree with them to rounding,
    not bitwise (other kernels). The device needs float64 (CUDA has it; MPS does not).
    """
    x = tall(matrix).to(device=device, dtype=torch.float64)  # (rows, n) with rows >= n
    gram = x.mT @ x
    if bool(torch.isfinite(torch.diagonal(gram)).all()):
        try:
            evals = torch.linalg.eigvalsh(gram)  # ascending
        except RuntimeError:  # torch.linalg.LinAlgError is a RuntimeError: take the SVD route
            evals = None
        if evals is not None:
            s = evals.flip(0).clamp(min=0.0).sqrt()
            if bool(s[-1] > 0) and bool(s[0] <= GRAM_KAPPA_LIMIT * s[-1]):
                return s.cpu().numpy(), "gram"
    elif not bool(torch.isfinite(x).all()):
        return np.full(min(matrix.shape), math.nan), "nonfinite"
    del gram
    return torch.linalg.svdvals(x).cpu().numpy(), "svd"


def singular_values_batch(matrices: torch.Tensor) -> tuple[np.ndarray, list[str]]:
    """Singular values of a stack of same-shape matrices (batch, rows, cols).

    Returns (batch, min(rows, cols)) float64 descending, and the route used per matrix:
    "gram" (eigenvalues of the float64 Gram, |error| <= ~1e-8·s_max, kappa to ~1e-7
    relative), "svd" (float64 LAPACK SVD, for kappa > GRAM_KAPPA_LIMIT or a singular
    matrix), or "nonfinite" (a row of NaN for a matrix holding NaN/Inf). Any float dtype
    is upcast exactly. Matrices are spread over a thread pool, one LAPACK thread each.
    """
    if matrices.ndim != 3 or 0 in matrices.shape:
        raise ShapeError(f"expected (batch, rows, cols) with no empty axis, got {tuple(matrices.shape)}")
    with parallel(min(n_workers(), len(matrices))) as pool:
        out = list(pool.map(spectrum, matrices))
    return np.stack([s for s, _ in out]), [r for _, r in out]
