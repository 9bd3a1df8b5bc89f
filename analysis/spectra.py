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

Fast route: eigenvalues of the float64 Gram matrix (smaller side), batched over matrices of
one shape; the error in s_min grows like eps·kappa², so matrices with kappa above
``GRAM_KAPPA_LIMIT`` are recomputed with a float64 SVD (``route`` says which was used).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from analysis.errors import ShapeError
from analysis.matrices import MatrixView, layer_index, module_type, weight_matrices

CODE_VERSION = "spectra-1"
GRAM_KAPPA_LIMIT = 1e4  # above this the Gram route's s_min would lose more than ~1e-7 relative accuracy
EVALS_THRESH = 1e-5  # ESD values at or below this are left out of the power-law fit (as WeightWatcher)
WELORE_TAU = 0.175
LRC_MIN_FRACTION = 0.5
MIN_TAIL = 2

Progress = Callable[[int, int, str], None]  # (done, total, current label)


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


def singular_values(matrix: torch.Tensor) -> np.ndarray:
    """Singular values of one matrix (rows, cols), float64, descending (exact float64 SVD)."""
    if matrix.ndim != 2 or 0 in matrix.shape:
        raise ShapeError(f"expected a non-empty 2-D matrix, got shape {tuple(matrix.shape)}")
    return torch.linalg.svdvals(matrix.detach().to(torch.float64)).numpy()


def singular_values_batch(matrices: torch.Tensor) -> tuple[np.ndarray, list[str]]:
    """Singular values of a stack of same-shape matrices (batch, rows, cols).

    Returns (batch, min(rows, cols)) float64 descending, and the route used per matrix
    ("gram" or "svd"). Matches a float64 SVD to ~1e-6·s_max or better.
    """
    if matrices.ndim != 3 or 0 in matrices.shape:
        raise ShapeError(f"expected (batch, rows, cols) with no empty axis, got {tuple(matrices.shape)}")
    w = matrices.detach().to(torch.float64)
    gram = w.mT @ w if w.shape[1] >= w.shape[2] else w @ w.mT
    evals = torch.linalg.eigvalsh(gram).clamp_min_(0.0).flip(-1)  # descending
    sv = evals.sqrt().numpy()
    routes = ["gram"] * len(sv)
    for b in range(len(sv)):
        s = sv[b]
        if not (s[-1] > 0 and s[0] / s[-1] <= GRAM_KAPPA_LIMIT):
            sv[b] = torch.linalg.svdvals(w[b]).numpy()
            routes[b] = "svd"
    return sv, routes


def powerlaw_fit(esd: np.ndarray, *, thresh: float = EVALS_THRESH, min_tail: int = MIN_TAIL) -> PowerLawFit:
    """Clauset continuous MLE of the ESD tail with the KS-minimising xmin.

    ``esd``: eigenvalues (any order). Every value > ``thresh`` except the largest is a
    candidate xmin; fits with alpha <= 1 are rejected (D = 1).
    """
    x = np.sort(np.asarray(esd, dtype=np.float64))
    x = x[x > thresh]
    n_all = len(x)
    if n_all < max(min_tail, 2) + 1:
        return PowerLawFit.failed()
    logx = np.log(x)
    # suffix sums of log x: S[i] = Σ_{j>=i} ln x_j
    suffix = np.cumsum(logx[::-1])[::-1]
    idx = np.arange(n_all - 1)
    n = (n_all - idx).astype(np.float64)
    denom = suffix[:-1] - n * logx[:-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        alphas = 1.0 + n / denom
    ds = np.ones(n_all - 1)
    chunk = max(1, 4_000_000 // n_all)
    for start in range(0, n_all - 1, chunk):
        rows = idx[start:start + chunk]
        # (len(rows), n_all) grid: column j is x_j; entries left of each row's xmin are masked
        a = alphas[rows][:, None]
        ratio = x[None, :] / x[rows][:, None]
        theo = 1.0 - np.power(ratio, 1.0 - a, where=ratio >= 1.0, out=np.zeros_like(ratio))
        pos = np.arange(n_all)[None, :] - rows[:, None]
        emp = pos / n[rows][:, None]
        diff = np.abs(theo - emp)
        diff[pos < 0] = 0.0
        d = diff.max(axis=1)
        ok = (alphas[rows] > 1.0) & np.isfinite(alphas[rows]) & (n[rows] >= min_tail)
        ds[rows] = np.where(ok, d, 1.0)
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


def weight_spectra(tensors: Iterable[tuple[str, torch.Tensor]], *, total: int | None = None,
                   progress: Progress | None = None, batch_bytes: int = 256 << 20) -> WeightSpectra:
    """Spectra of every >= 2-D floating tensor in ``tensors`` ((name, tensor) pairs).

    Same-shape matrices are batched (at most ``batch_bytes`` of float64 at a time). 1-D
    tensors are skipped and listed; tensors with NaN/Inf get a row with status
    ``nonfinite: …`` and NaN metrics, and the rest of the model is still analysed.
    """
    rows: dict[str, dict] = {}
    svs: dict[str, np.ndarray] = {}
    skipped: list[dict] = []
    pending: dict[tuple[int, int], list[tuple[MatrixView, torch.dtype]]] = {}
    order: list[str] = []
    done = 0

    def flush(shape: tuple[int, int]) -> None:
        batch = pending.pop(shape, [])
        if not batch:
            return
        sv, routes = singular_values_batch(torch.stack([v.matrix for v, _ in batch]))
        for (view, dtype), s, route in zip(batch, sv, routes):
            r, c = shape
            rows[view.label].update(status="ok", route=route, **spectrum_metrics(s, r, c, dtype))
            svs[view.label] = s

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
            m = view.matrix
            finite = torch.isfinite(m)
            if not bool(finite.all()):
                n_nan = int(torch.isnan(m).sum())
                rows[view.label].update(status=f"nonfinite: {n_nan} NaN, {int((~finite).sum()) - n_nan} Inf",
                                        route="none", **{k: math.nan for k in METRIC_COLUMNS})
                rows[view.label]["low_rank"] = False
                continue
            shape = tuple(m.shape)
            pending.setdefault(shape, []).append((view, tensor.dtype))
            if sum(v.matrix.numel() for v, _ in pending[shape]) * 8 >= batch_bytes:
                flush(shape)
    for shape in list(pending):
        flush(shape)
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
