"""Singular-value spectra and conditioning of weight matrices (pure functions, no I/O).

Conventions (units: those of the weights; eigenvalues in weight units squared):
- singular values ``s`` of W (rows x cols), float64, descending, length ``min(rows, cols)``;
- ESD = eigenvalues of WᵀW = s², not normalised (WeightWatcher's convention);
- kappa = s_max / s_min of the stored values (as ``numpy.linalg.cond`` of the float64
  upcast), ``inf`` when W is zero or singular to float64 precision (s_min <= s_max ·
  max(rows, cols) · eps64), never an exception;
- numerical rank = #(s > s_max · max(rows, cols) · eps(dtype)) as ``numpy.linalg.matrix_rank``
  on the stored dtype (16-bit weights use float32's eps);
- stable rank = Σs²/s_max²; effective rank (Roy & Vetterli 2007) = exp(−Σ p ln p), p = s/Σs;
- power law: Clauset continuous MLE over the ESD values > 1e-5, xmin chosen by minimal KS
  distance D among all candidates (as WeightWatcher's ``WWFit``); alpha_weighted = alpha ·
  log10(λ_max); sigma_alpha = (alpha − 1)/√n_tail;
- Marchenko-Pastur for N = max(rows, cols), M = min, Q = N/M: element variance
  σ² = ‖W‖_F²/(N·M), bulk edge of the ESD λ+ = N·σ²(1 + 1/√Q)² (in ESD units), spikes =
  eigenvalues above it;
- WeLore: spectrum normalised to [0, 1] by (s − s_min)/(s_max − s_min); the prunable
  fraction is the share below tau; a matrix with fraction >= ``lrc_min_fraction`` is a
  low-rank component (LRC).

Singular values come from ``analysis.weights.singular_values`` (float64 Gram route with an SVD
fall-back; see there for accuracy and threading). On the CPU (the default) they are computed by
LAPACK in a thread pool; with ``device=`` a CUDA device, each matrix is copied there and the same
routes run in torch float64 (``singular_values.spectrum_torch``), the values coming back as CPU
numpy. MPS has no float64, so spectra asked for on MPS are computed on the CPU.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from analysis.errors import ShapeError
from analysis.progress import Progress
from analysis.weights import singular_values as sv_mod
from analysis.weights.matrices import MatrixView, layer_index, module_type, weight_matrices
from analysis.weights.singular_values import GRAM_KAPPA_LIMIT, singular_values, singular_values_batch  # noqa: F401 (re-exported)

CODE_VERSION = "spectra-1"
EVALS_THRESH = 1e-5  # ESD values at or below this are left out of the power-law fit (as WeightWatcher)
WELORE_TAU = 0.175
LRC_MIN_FRACTION = 0.5
MIN_TAIL = 2
SPLIT_ELEMENTS = 1 << 22  # a matrix this large has its Gram formed from SPLIT_PARTS row ranges in parallel
SPLIT_PARTS = 2  # fixed (not the worker count) so that results do not depend on the machine
KS_GRID_ELEMENTS = 1 << 18  # entries of the power-law KS grid evaluated at a time
INFLIGHT_BYTES = 256 << 20  # default bound on matrices queued or running, counted as float64 (weight_spectra)


@dataclass(frozen=True, slots=True)
class PowerLawFit:
    """Clauset continuous power-law fit of an ESD tail."""

    alpha: float  # exponent of p(λ) ∝ λ^−alpha
    xmin: float  # start of the tail (ESD units)
    ks_distance: float  # KS distance D between the tail and the fit
    n_tail: int  # eigenvalues >= xmin
    sigma: float  # (alpha − 1)/√n_tail

    @staticmethod
    def failed() -> PowerLawFit:
        return PowerLawFit(math.nan, math.nan, math.nan, 0, math.nan)


def _eps(dtype: torch.dtype) -> float:
    return float(torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps)


def _ks_distances(lc: np.ndarray, alphas: np.ndarray, n: np.ndarray, rows: np.ndarray,
                  cols: np.ndarray) -> np.ndarray:
    """max over ``cols`` j >= i of |1 − (x_j/x_i)^(1−alpha_i) − (j − i)/n_i| for each row i.

    ``lc``: centred log of the sorted data; ``cols`` ascending. With every column this is
    the KS distance D_i; with a subset it is a lower bound of D_i (same arithmetic per entry).
    """
    out = np.zeros(len(rows))
    step = max(8, KS_GRID_ELEMENTS // max(len(cols), 1))
    for a in range(0, len(rows), step):
        r = rows[a:a + step]
        cc = cols[np.searchsorted(cols, r.min()):]  # columns left of every row in the chunk are all masked
        t = lc[cc][None, :] - lc[r][:, None]  # log(x_j / x_i)
        np.maximum(t, 0.0, out=t)
        grid = -np.expm1((1.0 - alphas[r])[:, None] * t)  # 1 − (x_j/x_i)^(1−alpha), the fitted CDF
        pos = cc[None, :] - r[:, None]  # j − i
        grid -= pos / n[r][:, None]  # minus the empirical CDF (j − i)/n_i
        np.abs(grid, out=grid)
        grid[pos < 0] = 0.0
        if grid.shape[1]:
            out[a:a + step] = grid.max(axis=1)
    return out


def powerlaw_fit(esd: np.ndarray, *, thresh: float = EVALS_THRESH, min_tail: int = MIN_TAIL) -> PowerLawFit:
    """Clauset continuous MLE of the ESD tail with the KS-minimising xmin.

    ``esd``: eigenvalues (any order, ESD units). Mirrors WeightWatcher's
    ``WWFit.fit_power_law_standard``: every value > ``thresh`` except the largest is a
    candidate xmin; alpha = 1 + n/Σ ln(λ/xmin) over the n values >= xmin; D = max |F_fit −
    F_emp| with F_emp = 0, 1/n, ..., (n−1)/n; fits with alpha <= 1 are rejected (D = 1); the
    first minimal D wins. Unlike WeightWatcher, which switches to a bias-corrected small-N
    fit when fewer than 20 values are left, the same estimator is used for every N.

    Speed: D on every 1/64th value is a lower bound of D; candidates are evaluated exactly
    in order of that bound, and a candidate whose bound exceeds the best exact D cannot win
    and is skipped. The result is the exhaustive search's (a few ms at N = 768).
    """
    x = np.sort(np.asarray(esd, dtype=np.float64))
    x = x[x > thresh]
    n_all = len(x)
    if n_all < max(min_tail, 2) + 1:
        return PowerLawFit.failed()
    logx = np.log(x)
    lc = logx - logx[n_all // 2]  # centred logs: same differences, less cancellation in the sums
    suffix = np.cumsum(lc[::-1])[::-1]  # suffix[i] = Σ_{j>=i} lc_j
    n = (n_all - np.arange(n_all - 1)).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        alphas = 1.0 + n / (suffix[:-1] - n * lc[:-1])
    cand = np.flatnonzero((alphas > 1.0) & np.isfinite(alphas) & (n >= min_tail))
    if not len(cand):
        return PowerLawFit.failed()
    ds = np.ones(n_all - 1)
    every = np.arange(n_all)
    if n_all <= 256:
        ds[cand] = _ks_distances(lc, alphas, n, cand, every)
    else:
        coarse = np.unique(np.r_[every[:: max(1, n_all // 64)], n_all - 1])
        bound = _ks_distances(lc, alphas, n, cand, coarse)
        order = np.argsort(bound, kind="stable")
        first = np.sort(cand[order[:32]])
        ds[first] = _ks_distances(lc, alphas, n, first, every)
        best = ds[first].min()
        rest = order[32:][bound[order[32:]] <= best * (1.0 + 1e-9)]  # slack: entries may differ by an ulp
        if len(rest):
            rows = np.sort(cand[rest])
            ds[rows] = _ks_distances(lc, alphas, n, rows, every)
    best = int(np.argmin(ds))
    if ds[best] >= 1.0:
        return PowerLawFit.failed()
    a = float(alphas[best])
    return PowerLawFit(a, float(x[best]), float(ds[best]), int(n[best]), (a - 1.0) / math.sqrt(n[best]))


def marchenko_pastur(sv: np.ndarray, rows: int, cols: int) -> tuple[float, float, int]:
    """(σ², bulk edge in ESD units, number of ESD values above it) for an i.i.d. reference
    matrix with the same shape and Frobenius norm."""
    big, small = max(rows, cols), min(rows, cols)
    esd = np.asarray(sv, dtype=np.float64) ** 2
    sigma2 = float(esd.sum() / (big * small))
    edge = big * sigma2 * (1.0 + 1.0 / math.sqrt(big / small)) ** 2
    return sigma2, edge, int((esd > edge * (1 + 1e-12)).sum()) if sigma2 > 0 else 0


def welore_fraction(sv: np.ndarray, tau: float = WELORE_TAU) -> float:
    """Share of singular values below ``tau`` after min-max normalisation to [0, 1]."""
    s = np.asarray(sv, dtype=np.float64)
    span = s.max() - s.min()
    if span <= 0:
        return 0.0
    return float(((s - s.min()) / span < tau).mean())


def spectrum_metrics(sv: np.ndarray, rows: int, cols: int, dtype: torch.dtype = torch.float64,
                     *, welore_tau: float = WELORE_TAU, lrc_min_fraction: float = LRC_MIN_FRACTION) -> dict:
    """Every scalar metric of one matrix from its singular values (see module docstring)."""
    s = np.asarray(sv, dtype=np.float64)
    smax = float(s[0]) if len(s) else 0.0
    smin = float(s[-1]) if len(s) else 0.0
    nrank = int((s > smax * max(rows, cols) * _eps(dtype)).sum())
    singular = smax == 0.0 or smin <= smax * max(rows, cols) * _eps(torch.float64)
    esd = s**2
    fro2 = float(esd.sum())
    total = float(s.sum())
    if total > 0:
        p = s[s > 0] / total
        eff = float(np.exp(-(p * np.log(p)).sum()))
    else:
        eff = 0.0
    fit = powerlaw_fit(esd)
    lam_max = float(esd[0]) if len(esd) else 0.0
    sigma2, edge, spikes = marchenko_pastur(s, rows, cols)
    frac = welore_fraction(s, welore_tau)
    return {
        "sigma_max": smax,
        "sigma_min": smin,
        "kappa": math.inf if singular else smax / smin,
        "log10_kappa": math.inf if singular else math.log10(smax / smin),
        "spectral_norm": smax,
        "frobenius_norm": math.sqrt(fro2),
        "stable_rank": fro2 / smax**2 if smax > 0 else 0.0,
        "effective_rank": eff,
        "numerical_rank": nrank,
        "alpha": fit.alpha,
        "alpha_weighted": fit.alpha * math.log10(lam_max) if lam_max > 0 else math.nan,
        "alpha_sigma": fit.sigma,
        "ks_distance": fit.ks_distance,
        "xmin": fit.xmin,
        "n_tail": fit.n_tail,
        "lambda_max": lam_max,
        "mp_sigma2": sigma2,
        "mp_edge": edge,
        "n_spikes": spikes,
        "welore_fraction": frac,
        "low_rank": bool(frac >= lrc_min_fraction),
    }


METRIC_COLUMNS = list(spectrum_metrics(np.array([2.0, 1.0]), 2, 2).keys())
CONDITIONING_COLUMNS = ["tensor", "shape", "sigma_max", "sigma_min", "kappa", "stable_rank", "alpha",
                        "spectral_norm", "frobenius_norm", "effective_rank", "numerical_rank"]


@dataclass(frozen=True, eq=False)
class WeightSpectra:
    """Spectra of every matrix of a model.

    ``table``: one row per matrix (columns: tensor, matrix, expert, layer, module_type, rows,
    cols, shape, dtype, n_params, status, route, and every metric of ``spectrum_metrics``);
    ``singular_values``: matrix label -> float64 (min(rows, cols),) descending;
    ``skipped``: tensors that are not matrices, with the reason.
    """

    table: pd.DataFrame
    singular_values: dict[str, np.ndarray]
    skipped: list[dict] = field(default_factory=list)


def _row(view: MatrixView, dtype: torch.dtype, n_params: int) -> dict:
    rows, cols = view.matrix.shape
    return {"tensor": view.tensor, "matrix": view.label, "expert": view.expert, "layer": layer_index(view.tensor),
            "module_type": module_type(view.tensor), "rows": rows, "cols": cols, "shape": f"{rows}x{cols}",
            "dtype": str(dtype).removeprefix("torch."), "n_params": n_params}


def _matrix_row(matrix: torch.Tensor, dtype: torch.dtype, parts: list[Future] | None = None,
                device: torch.device | None = None) -> tuple[dict, np.ndarray | None]:
    """Worker: status, route and metrics of one matrix, and its singular values.

    ``parts``: futures of partial Grams (``sv_mod.gram_rows`` over row ranges) submitted before
    this task; the pool runs tasks in submission order, so they are running or done.
    ``device``: compute the singular values there with torch (``sv_mod.spectrum_torch``).
    """
    if device is not None:
        sv, route = sv_mod.spectrum_torch(matrix, device)
    elif parts is None:
        sv, route = sv_mod.spectrum(matrix)
    else:
        gram = parts[0].result()
        for part in parts[1:]:
            gram += part.result()
        parts.clear()  # drop the other partial Grams before a possible SVD fall-back
        sv, route = sv_mod.spectrum_from_gram(matrix, gram)
    if route == "nonfinite":
        n_nan = int(torch.isnan(matrix).sum())
        n_inf = int(torch.isinf(matrix).sum())
        return {"status": f"nonfinite: {n_nan} NaN, {n_inf} Inf", "route": "none",
                **{k: math.nan for k in METRIC_COLUMNS}, "low_rank": False}, None
    rows, cols = matrix.shape
    return {"status": "ok", "route": route, **spectrum_metrics(sv, rows, cols, dtype)}, sv


def _submit(pool: ThreadPoolExecutor, matrix: torch.Tensor, dtype: torch.dtype) -> Future:
    """Queue one matrix; a large one has its Gram summed (in order) from ``SPLIT_PARTS`` row
    ranges formed in parallel, whatever the number of workers, so the sums are reproducible."""
    if matrix.numel() < SPLIT_ELEMENTS:
        return pool.submit(_matrix_row, matrix, dtype)
    tall = sv_mod.tall(matrix)
    edges = np.linspace(0, tall.shape[0], SPLIT_PARTS + 1).astype(int)
    parts = [pool.submit(sv_mod.gram_rows, tall, int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]
    return pool.submit(_matrix_row, matrix, dtype, parts)


def accelerator(device: str | torch.device | None) -> torch.device | None:
    """The device singular values are computed on with torch, or None for the CPU's LAPACK route
    (the CPU itself, and MPS, which has no float64)."""
    if device is None:
        return None
    device = torch.device(device)
    return None if device.type in ("cpu", "mps") else device


def _done(fn: Callable, *args) -> Future:
    """``fn(*args)`` computed now, as a finished Future (the accelerator path runs matrices in order)."""
    fut: Future = Future()
    fut.set_result(fn(*args))
    return fut


def weight_spectra(tensors: Iterable[tuple[str, torch.Tensor]], *, total: int | None = None,
                   progress: Progress | None = None, batch_bytes: int | None = None,
                   n_workers: int | None = None, device: str | torch.device | None = None) -> WeightSpectra:
    """Spectra of every >= 2-D floating tensor in ``tensors`` ((name, tensor) pairs).

    Tensors are read one at a time; their matrices are analysed in a pool of ``n_workers``
    threads (default ``analysis.weights.singular_values.n_workers()``) with at most ``batch_bytes``
    (default ``INFLIGHT_BYTES``) of matrices, counted as float64, queued or running; a larger
    one waits for the queue to drain and runs alone. Each matrix's working memory is of the
    order of that count whichever route it takes: an n x n float64 Gram (two partial ones for
    a split Gram) plus one upcast row block, and the SVD fall-back reuses the Gram's buffer
    (see ``analysis.weights.singular_values.svd_fallback``). 1-D tensors are skipped and listed;
    tensors with NaN/Inf get a row with status ``nonfinite: …`` and NaN metrics, and the rest
    of the model is still analysed. Rows keep the input order whatever order workers finish in, and every value is
    bitwise the same whatever ``n_workers`` is.

    ``device``: None or the CPU (the default) runs the CPU routes above, unchanged; a CUDA device
    computes each matrix's singular values there in torch float64, one matrix at a time
    (``accelerator``), with the metrics computed from them on the CPU as before.
    """
    rows: dict[str, dict] = {}
    svs: dict[str, np.ndarray] = {}
    skipped: list[dict] = []
    order: list[str] = []
    inflight: deque[tuple[str, int, Future]] = deque()
    held = [0]  # bytes (as float64) of matrices queued or running
    done = 0

    def collect(limit: int) -> None:
        while inflight and (held[0] > limit or inflight[0][2].done()):
            label, nbytes, fut = inflight.popleft()
            row, sv = fut.result()
            held[0] -= nbytes
            rows[label].update(row)
            if sv is not None:
                svs[label] = sv

    n_workers = n_workers or sv_mod.n_workers()
    batch_bytes = INFLIGHT_BYTES if batch_bytes is None else batch_bytes
    on = accelerator(device)
    with nullcontext() if on is not None else sv_mod.parallel(n_workers) as pool:
        for name, tensor in tensors:
            done += 1
            if progress is not None:
                progress(done, total or 0, name)
            if not tensor.is_floating_point():
                continue
            try:
                views = weight_matrices(name, tensor)
            except ShapeError as exc:
                skipped.append({"tensor": name, "shape": list(tensor.shape), "reason": str(exc).split(": ", 1)[1]})
                continue
            n_params = tensor.numel() // len(views)
            for view in views:
                order.append(view.label)
                rows[view.label] = _row(view, tensor.dtype, n_params)
                nbytes = view.matrix.numel() * 8
                collect(max(batch_bytes - nbytes, 0))
                fut = (_done(_matrix_row, view.matrix, tensor.dtype, None, on) if on is not None
                       else _submit(pool, view.matrix, tensor.dtype))
                inflight.append((view.label, nbytes, fut))
                held[0] += nbytes
        collect(-1)
    table = pd.DataFrame([rows[k] for k in order])
    if table.empty:
        table = pd.DataFrame(columns=list(_row(MatrixView("x", "x", -1, torch.zeros(1, 1)), torch.float32, 1))
                             + ["status", "route"] + METRIC_COLUMNS)
    return WeightSpectra(table=table, singular_values=svs, skipped=skipped)


def to_result(ws: WeightSpectra, meta: dict | None = None):
    """Pack for the store: the table, one array per matrix, skipped tensors in meta."""
    from analysis.store import Result

    return Result(table=ws.table, arrays=dict(ws.singular_values), meta={"skipped": ws.skipped, **(meta or {})})


def from_result(result) -> WeightSpectra:
    """Inverse of ``to_result``."""
    return WeightSpectra(table=result.table, singular_values=dict(result.arrays),
                         skipped=list(result.meta.get("skipped", [])))
