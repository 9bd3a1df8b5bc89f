"""The search's optimiser: a coarse grid, then refinement of the Pareto front by bisection of strength.

Objective: maximise ``effect`` and minimise ``side`` (KL for an LM, embedding drift for an
encoder) over settings (source, layer, α). The unsteered model (α = 0, effect 0, side 0) is a
known point of every (source, layer) line and costs nothing.

1. Coarse grid: every (source, layer) line at ``n_coarse`` strengths spread evenly over [lo, hi]
   (0 excluded), the strongest first, cut where the budget ends.
2. Refinement, one setting at a time until the budget is spent: on each (source, layer) line,
   sorted by α with the α = 0 point, every gap between neighbouring evaluated strengths is a
   candidate midpoint. A gap whose side effect brackets ``max_side`` (one end within it, the
   other beyond) and promises a gain comes first, the largest effect at the limit first (linear
   interpolation between its ends: that is where the chosen setting is decided); then gaps
   bracketing each comparison level (``levels``) on every line, so that sources are compared at
   equal side effect; then gaps next to a point of the Pareto front, widest first.
   The front counts the unsteered model as a point, so settings with no gain are never on it.
   Gaps narrower than ``min_gap`` (default (hi − lo)/128) are not split.

Each choice depends only on the settings evaluated before it, so the settings of a larger
budget extend those of a smaller one: with the points cached, a re-run computes only the new ones.

The chosen setting: the largest effect with side ≤ ``max_side``; none qualifying, the smallest
side among the settings with a gain (effect > 0), else the smallest side. ``compare_sources``:
per source, the best effect at side ≤ each level (NaN: no setting
that gentle), and the levels each source wins. Pure Python on rows; no model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

MIN_GAP_FRACTION = 1 / 128  # gaps narrower than this share of hi − lo are not split


def coarse_strengths(lo: float, hi: float, n: int) -> list[float]:
    """``n`` strengths spread over [lo, hi] without 0 (both ends kept when n >= 2)."""
    if n == 1:
        return [hi if hi > 0 else lo]
    grid = np.linspace(lo, hi, n + 1 if lo < 0 < hi else n)
    vals = [float(x) for x in grid if abs(x) > 1e-12]
    if len(vals) > n:  # lo < 0 < hi and 0 was not on the grid: drop the point closest to 0
        vals.remove(min(vals, key=abs))
    return [round(v, 10) for v in vals]


def pareto_mask(effect: np.ndarray, side: np.ndarray, *, origin: bool = True) -> np.ndarray:
    """True where no other point has effect >= and side <= with one strict (maximise effect, minimise side).
    ``origin``: the unsteered model (effect 0, side 0) counts as a point too, so a setting that only
    costs side effect for no gain (effect <= 0) is never on the front."""
    effect, side = np.asarray(effect, float), np.asarray(side, float)
    e_all = np.r_[effect, 0.0] if origin else effect
    s_all = np.r_[side, 0.0] if origin else side
    keep = np.ones(len(effect), bool)
    for i in range(len(effect)):
        dominated = (e_all >= effect[i]) & (s_all <= side[i]) & ((e_all > effect[i]) | (s_all < side[i]))
        keep[i] = not dominated.any()
    return keep


def choose(table: pd.DataFrame, side: str, max_side: float) -> int:
    """Index (label) of the chosen row (module docstring)."""
    ok = table[table[side] <= max_side]
    if len(ok):
        return int(ok["effect"].idxmax())
    gains = table[table["effect"] > 0]
    return int((gains if len(gains) else table)[side].idxmin())


def _lines(rows: list[dict], side: str) -> dict[tuple[str, int], list[tuple[float, float, float]]]:
    lines: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
    for r in rows:
        lines.setdefault((r["source"], r["layer"]), [(0.0, 0.0, 0.0)]).append((r["alpha"], r["effect"], r[side]))
    return {k: sorted(v) for k, v in lines.items()}


def next_candidate(rows: list[dict], side: str, max_side: float, min_gap: float,
                   tried: set | None = None, levels: Sequence[float] = ()) -> tuple[str, int, float] | None:
    """The next setting to evaluate (module docstring, step 2), or None when every gap is too narrow."""
    if not rows:
        return None
    tried = tried or set()
    limits = [max_side, *[lv for lv in levels if lv != max_side]]
    front = pareto_mask(np.array([r["effect"] for r in rows]), np.array([r[side] for r in rows]))
    on_front = {(r["source"], r["layer"], r["alpha"]) for r, f in zip(rows, front) if f}
    on_front |= {(r["source"], r["layer"], 0.0) for r in rows}  # the unsteered model is on every front
    best: tuple[tuple, tuple[str, int, float]] | None = None
    for (source, layer), pts in _lines(rows, side).items():
        for (a0, e0, s0), (a1, e1, s1) in zip(pts, pts[1:]):
            if a1 - a0 < min_gap:
                continue
            mid = round((a0 + a1) / 2, 10)
            if (source, layer, mid) in tried:
                continue
            (e_in, s_in), (e_out, s_out) = sorted([(e0, s0), (e1, s1)], key=lambda p: p[1])
            rank: tuple | None = None
            for i, limit in enumerate(limits):  # the chosen setting's limit first, then the comparison levels
                if s_in <= limit < s_out:
                    at_limit = e_in + (e_out - e_in) * (limit - s_in) / (s_out - s_in)
                    if at_limit > 0:
                        rank = (1, -i, at_limit, a1 - a0)
                        break
            # the unsteered end (α = 0) is always on the front; its gap matters only toward a gain
            near_front = ((source, layer, a0) in on_front and (a0 != 0.0 or e1 > 0)) or \
                ((source, layer, a1) in on_front and (a1 != 0.0 or e0 > 0))
            if rank is None and near_front:
                rank = (0, 0, a1 - a0, max(e0, e1))
            if rank is not None and (best is None or rank > best[0]):
                best = (rank, (source, layer, mid))
    return None if best is None else best[1]


def optimise(lines: Sequence[tuple[str, int]], lo: float, hi: float, n_settings: int,
             n_coarse: int, evaluate: Callable[[str, int, float, str], dict], side: str, max_side: float,
             min_gap: float | None = None, levels: Sequence[float] = ()) -> list[dict]:
    """Evaluate at most ``n_settings`` settings on the (source, layer) ``lines``: the coarse grid, then
    refinement. ``evaluate(source,
    layer, alpha, stage)`` returns the row (with ``effect`` and ``side``); rows come back in order."""
    min_gap = (hi - lo) * MIN_GAP_FRACTION if min_gap is None else min_gap
    rows: list[dict] = []
    tried: set = set()
    for alpha in sorted(coarse_strengths(lo, hi, n_coarse), key=lambda a: (-abs(a), -a)):
        for source, layer in lines:
            if len(rows) >= n_settings:
                return rows
            rows.append(evaluate(source, layer, alpha, "coarse"))
            tried.add((source, layer, alpha))
    while len(rows) < n_settings:
        cand = next_candidate(rows, side, max_side, min_gap, tried, levels)
        if cand is None:
            break
        tried.add(cand)
        rows.append(evaluate(*cand, "refine"))
    return rows


def compare_sources(table: pd.DataFrame, side: str, levels: Sequence[float]) -> pd.DataFrame:
    """One row per source: best effect at side ≤ each level (``effect@side<=L`` columns), its
    layer and α at the largest level, and ``wins_at``: the levels at which this source has the largest effect."""
    rows = []
    cols = [f"effect@{side}<={lv:g}" for lv in levels]
    for source, g in table.groupby("source", sort=False):
        row = {"source": source}
        for lv, col in zip(levels, cols):
            ok = g[g[side] <= lv]
            row[col] = float(ok["effect"].max()) if len(ok) else float("nan")
        ok = g[g[side] <= levels[-1]]
        best = ok.loc[ok["effect"].idxmax()] if len(ok) else g.loc[g[side].idxmin()]
        row.update({"layer": int(best["layer"]), "alpha": float(best["alpha"])})
        rows.append(row)
    out = pd.DataFrame(rows)
    wins = {src: [] for src in out["source"]}
    for lv, col in zip(levels, cols):
        if out[col].notna().any():
            wins[str(out.loc[out[col].idxmax(), "source"])].append(f"{lv:g}")
    out["wins_at"] = [",".join(wins[s]) for s in out["source"]]
    return out
