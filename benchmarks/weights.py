"""Timed runs of the weight analysis: LensLab, bare ``torch.linalg.svdvals``, WeightWatcher,
the results store, and the agreement between LensLab and WeightWatcher.

Every function times one thing with ``time.perf_counter`` and returns seconds (best of the
repeats asked for) with whatever it computed, so the table can show all figures of one run.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from analysis.weights.matrices import weight_matrices
from analysis.sources import Source
from analysis.weights.spectra import WeightSpectra, weight_spectra


@dataclass(frozen=True, slots=True)
class Timing:
    """Wall-clock seconds of ``repeats`` runs; ``best`` is the minimum."""

    runs: tuple[float, ...]

    @property
    def best(self) -> float:
        return min(self.runs)

    @property
    def policy(self) -> str:
        return f"best of {len(self.runs)}" if len(self.runs) > 1 else "1 run"


def timed(fn: Callable[[], Any], repeats: int = 1) -> tuple[Timing, Any]:
    """Run ``fn`` ``repeats`` times; (timings, last result)."""
    runs, out = [], None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = fn()
        runs.append(time.perf_counter() - t0)
    return Timing(tuple(runs)), out


def lenslab_cold(src: Source, repeats: int, names: set[str] | None = None) -> tuple[Timing, WeightSpectra]:
    """``weight_spectra(src.iter_tensors())`` with no store (optionally only ``names``)."""
    pick = sorted(names) if names is not None else None
    return timed(lambda: weight_spectra(src.iter_tensors(pick)), repeats)


def matrices_of(src: Source) -> list[torch.Tensor]:
    """The matrices LensLab analyses (reshape policy applied), in the stored dtype."""
    out = []
    for name, t in src.iter_tensors():
        if t.is_floating_point() and t.ndim >= 2 and 0 not in t.shape:
            out.extend(v.matrix for v in weight_matrices(name, t))
    return out


def svdvals_floor(src: Source, dtype: torch.dtype) -> Timing:
    """Bare ``torch.linalg.svdvals`` over every matrix (read + upcast to ``dtype`` + SVD),
    torch's default threads: the cost of the plain route with no metrics."""
    def run() -> None:
        for m in matrices_of(src):
            torch.linalg.svdvals(m.to(dtype))

    return timed(run)[0]


def float64_core(src: Source, names: set[str] | None = None) -> Timing:
    """Only the float64 singular values (Gram product + eigenvalues, ``analysis.weights.singular_values.
    spectrum``) of every matrix (optionally only those of tensors in ``names``), read and held in
    memory beforehand, spread over LensLab's worker pool: no I/O, no metrics, no store. This is
    the float64 arithmetic of LensLab's route (m·n² for the Gram, ~4/3·n³ for the tridiagonal
    reduction; an SVD does more), so WeightWatcher's time over this one caps the speed-up any
    change to I/O, metrics or scheduling can bring."""
    from analysis.weights.singular_values import n_workers, parallel, spectrum

    mats = [v.matrix for name, t in src.iter_tensors()
            if (names is None or name in names) and t.is_floating_point() and t.ndim >= 2 and 0 not in t.shape
            for v in weight_matrices(name, t)]

    def run() -> None:
        with parallel(min(n_workers(), len(mats))) as pool:
            list(pool.map(spectrum, mats))

    return timed(run, 3)[0]


@contextlib.contextmanager
def _quiet() -> Any:
    """Silence WeightWatcher's prints and logging and transformers' progress bars."""
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        yield


def weightwatcher_analyze(model: torch.nn.Module, repeats: int, *, blas_threads: int | None = None,
                          ) -> tuple[Timing, pd.DataFrame]:
    """``weightwatcher.WeightWatcher(model=model).analyze()`` with its defaults (float64 scipy
    SVD; min_evals 8, max_evals 15000, max_N 50000). ``blas_threads``: hold OpenBLAS to this
    many threads (None: its default, one per core), which only changes speed."""
    from threadpoolctl import threadpool_limits

    limits = threadpool_limits(blas_threads, user_api="blas") if blas_threads else contextlib.nullcontext()
    with _quiet(), limits:
        import weightwatcher

        return timed(lambda: weightwatcher.WeightWatcher(model=model).analyze(), repeats)


def skipped_by_ww(ours: pd.DataFrame, ww: pd.DataFrame) -> list[str]:
    """Our matrices with no WeightWatcher row, each with WW's rule that skips it
    (defaults: N > max_N = 50000, M < min_evals = 8, M > max_evals = 15000)."""
    have = {f"{n}.weight" for n in ww["longname"]}
    out = []
    for _, r in ours[~ours["tensor"].isin(have)].iterrows():
        big, small = max(r["rows"], r["cols"]), min(r["rows"], r["cols"])
        why = ("N > max_N 50000" if big > 50000 else "M < min_evals 8" if small < 8
               else "M > max_evals 15000" if small > 15000 else "not a layer type WW handles")
        out.append(f"{r['matrix']} ({r['shape']}: {why})")
    return out


@dataclass(frozen=True, slots=True)
class Agreement:
    """Largest differences over the layers both tools analysed."""

    n_matched: int
    max_abs_alpha: float
    max_rel_stable_rank: float
    max_rel_spectral_norm: float  # WW's spectral_norm is λ_max = σ_max²: compared with ours squared


def agreement(ours: pd.DataFrame, ww: pd.DataFrame) -> Agreement:
    """Match WW rows to ours by module name (``longname`` + ``.weight``) and shape (N, M)."""
    by_name = ours.set_index("tensor")
    da, dsr, dsn, n = [], [], [], 0
    for _, r in ww.iterrows():
        name = f"{r['longname']}.weight"
        if name not in by_name.index:
            continue
        o = by_name.loc[name]
        if (max(o["rows"], o["cols"]), min(o["rows"], o["cols"])) != (int(r["N"]), int(r["M"])):
            continue
        n += 1
        da.append(abs(o["alpha"] - r["alpha"]))
        dsr.append(abs(o["stable_rank"] - r["stable_rank"]) / abs(r["stable_rank"]))
        dsn.append(abs(o["spectral_norm"] ** 2 - r["spectral_norm"]) / abs(r["spectral_norm"]))
    top = lambda xs: float(np.nanmax(xs)) if xs else math.nan  # noqa: E731
    return Agreement(n, top(da), top(dsr), top(dsn))


@dataclass(frozen=True, slots=True)
class StoreTimes:
    """Store figures: the first (computing) call, the cache hit, a bare get, a fresh fingerprint."""

    first_call: float
    hit: Timing
    bare_get: Timing
    fingerprint: float  # blake2b over every tensor's bytes, as a new process pays once


def store_times(src: Source, repeats: int) -> StoreTimes:
    """``app.api.analyze(src, store=tmp)`` twice (second call timed) and ``Store.get`` alone."""
    from analysis.weights import spectra as spectra_mod
    from app import api

    fp_time, _ = timed(lambda: Source._compute_fingerprint(src))  # the hash itself, memo bypassed
    with tempfile.TemporaryDirectory(prefix="lenslab-bench-") as tmp:
        st = api.open_store(tmp)
        first, _ = timed(lambda: api.analyze(src, store=st))
        hit, ws = timed(lambda: api.analyze(src, store=st), repeats)
        if not len(ws.table):
            raise RuntimeError("the cache hit returned an empty table")
        fp = src.fingerprint
        bare, res = timed(lambda: st.get(fp, api.SPECTRA, api.spectra_params(), spectra_mod.CODE_VERSION), repeats)
        if res is None:
            raise RuntimeError("Store.get missed an entry api.analyze had just stored")
    return StoreTimes(first.best, hit, bare, fp_time.best)
