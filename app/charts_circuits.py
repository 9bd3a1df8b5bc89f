"""Plotly figure builder for the Attention circuits page (pure: a grid in, a figure out; no Streamlit).

``head_heatmap(grid, metric, circuit)``: one cell per (layer, head) of a ``CircuitSpectra.grid``. kappa is
drawn as log10 κ (its range spans decades); an infinite κ (a rank-deficient circuit) leaves its cell
blank with the text "inf"; the hover and cell text show the stored value.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from analysis.errors import ConfigError

LABELS = {"kappa": "log10 κ", "stable_rank": "stable rank", "effective_rank": "effective rank",
          "s_max": "σ_max", "s_min": "σ_min"}
_MAX_CELL_TEXT = 600  # above this many cells the numbers are left to the hover


def plotted(grid: pd.DataFrame, metric: str) -> np.ndarray:
    """The z values drawn for ``grid`` (layers, heads): log10 of kappa, the values themselves otherwise;
    non-finite values as NaN (blank cells)."""
    z = grid.to_numpy(dtype=float)
    if metric == "kappa":
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.log10(z)
    return np.where(np.isfinite(z), z, np.nan)


def head_heatmap(grid: pd.DataFrame, metric: str = "kappa", circuit: str = "QK", title: str = "") -> go.Figure:
    """Heatmap of ``grid`` (index layer, columns head) of ``metric`` for the ``circuit`` circuits."""
    if metric not in LABELS:
        raise ConfigError(f"no heatmap for metric {metric!r}; choose one of {', '.join(LABELS)}")
    values = grid.to_numpy(dtype=float)
    text = np.vectorize(lambda v: "inf" if np.isinf(v) else "" if np.isnan(v) else f"{v:.3g}", otypes=[str])(values) \
        if values.size else values.astype(str)
    label = LABELS[metric]
    fig = go.Figure(go.Heatmap(
        z=plotted(grid, metric), x=[f"h{h}" for h in grid.columns], y=[str(layer) for layer in grid.index],
        text=text, texttemplate="%{text}" if values.size <= _MAX_CELL_TEXT else None,
        colorscale="Viridis", colorbar={"title": {"text": label}}, xgap=1, ygap=1,
        hovertemplate=f"layer %{{y}}, head %{{x}}<br>{metric} = %{{text}}<extra></extra>",
    ))
    fig.update_layout(title={"text": title or f"{label} of the {circuit} circuits by layer and head"},
                      xaxis={"title": {"text": "head"}, "type": "category"},
                      yaxis={"title": {"text": "layer"}, "autorange": "reversed", "type": "category"},
                      height=max(280, 40 * len(grid) + 120), margin={"l": 10, "r": 10, "t": 50, "b": 40})
    return fig
