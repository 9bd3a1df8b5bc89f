"""Statistics of the parameter-matched KappaTune experiment (pure: DataFrames in, DataFrames out).

- ``bootstrap_ci``: percentile bootstrap 95% interval of a mean (resampling seeds with
  replacement, ``n_boot`` resamples from ``numpy.random.default_rng(seed)``); one value gives
  the degenerate interval (v, v), no value (NaN, NaN).
- ``summarise_arms``: one row per arm: ``n_seeds`` and, per metric, ``<m>_mean``, ``<m>_std``
  (ddof=1; NaN for one seed), ``<m>_lo`` / ``<m>_hi`` (the bootstrap interval).
- ``paired_comparison``: lowest κ against each other arm, seed by seed (every arm of a seed
  sees the same batches and head initialisation; the random arm is a new draw per seed):
  per metric the mean of the per-seed differences (lowest κ minus the control) with its
  bootstrap interval, and how many seeds lowest κ forgot less / gained more.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

N_BOOT = 2000
LEVEL = 0.95


def bootstrap_ci(values: Sequence[float] | np.ndarray, *, n_boot: int = N_BOOT, level: float = LEVEL,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values``."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan, math.nan
    if v.size == 1:
        return float(v[0]), float(v[0])
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def summarise_arms(runs: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """One row per arm (first-appearance order): n_seeds and mean / std / bootstrap interval per metric."""
    rows = []
    for arm, g in runs.groupby("arm", sort=False):
        row: dict[str, Any] = {"arm": arm, "n_seeds": len(g)}
        for m in metrics:
            v = g[m].to_numpy(dtype=np.float64)
            lo, hi = bootstrap_ci(v)
            row |= {f"{m}_mean": float(v.mean()), f"{m}_std": float(v.std(ddof=1)) if len(v) > 1 else math.nan,
                    f"{m}_lo": lo, f"{m}_hi": hi}
        rows.append(row)
    return pd.DataFrame(rows)


def paired_comparison(runs: pd.DataFrame, *, reference: str = "lowest_kappa",
                      metrics: Sequence[str] = ("gain", "forgetting")) -> pd.DataFrame:
    """One row per control arm: per metric, mean difference (reference − control) over the seeds
    both ran, its bootstrap interval, and ``n_seeds``; ``forgets_less`` / ``gains_more``: seeds where
    the reference's forgetting is lower / its gain higher. Empty when the reference did not run."""
    ref = runs[runs["arm"] == reference].set_index("seed")
    rows = []
    if ref.empty:
        return pd.DataFrame(rows)
    for arm, g in runs[runs["arm"] != reference].groupby("arm", sort=False):
        g = g.set_index("seed")
        seeds = sorted(set(g.index) & set(ref.index))
        if not seeds:
            continue
        row: dict[str, Any] = {"reference": reference, "control": arm, "n_seeds": len(seeds)}
        for m in metrics:
            d = ref.loc[seeds, m].to_numpy(dtype=np.float64) - g.loc[seeds, m].to_numpy(dtype=np.float64)
            lo, hi = bootstrap_ci(d)
            row |= {f"{m}_diff": float(d.mean()), f"{m}_diff_lo": lo, f"{m}_diff_hi": hi}
        if "forgetting" in metrics:
            row["forgets_less"] = int((ref.loc[seeds, "forgetting"].to_numpy() < g.loc[seeds, "forgetting"].to_numpy()).sum())
        if "gain" in metrics:
            row["gains_more"] = int((ref.loc[seeds, "gain"].to_numpy() > g.loc[seeds, "gain"].to_numpy()).sum())
        rows.append(row)
    return pd.DataFrame(rows)
