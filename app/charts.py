"""Plotly figure builders for the dashboard (pure: DataFrames/arrays in, figures out; no Streamlit).

They draw only what an analysis stored: the spectra table (``analysis.weights.spectra``) and the
singular values of one matrix. Nothing here fits or recomputes a metric, except the plotting
density of the histogram and the fitted line evaluated from the stored ``alpha``/``xmin``.

- ``heatmap(table, value)``: layer x module_type grid of ``log10_kappa`` or ``alpha``.
- ``esd_loglog(singular_values, row)``: ESD histogram (λ = σ², log-spaced bins, density) on
  log-log axes, the fitted power law p(λ) ∝ λ^−alpha from xmin, the Marchenko-Pastur edge and xmin.
- ``singular_value_curve(singular_values, row)``: σ_i against rank i on a log y axis.

Shared by every chart module: ``log_axis(lo, hi)`` (a log axis whose ticks read as numbers: powers of
ten, with 2 and 5 between them when less than two powers fit; never plotly's "2 / 5 / 100µ") and
``note_zoom(fig, values)`` (says so when an axis autoscales to a narrow range, e.g. accuracies within 0.004).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from analysis.errors import ConfigError, ShapeError

HEATMAP_VALUES = {"log10_kappa": "log10 κ", "alpha": "power-law α"}
_COLORSCALES = {"log10_kappa": "Viridis", "alpha": "RdYlBu_r"}
_MAX_CELL_TEXT = 160  # print values in the cells only when the grid is at most this many cells
OUTSIDE_COLUMN = "outside blocks"


ZOOM_SPAN = 0.05  # an axis whose values span less than this (e.g. accuracies 0.996-1.000) gets a note


def tick_label(v: float) -> str:
    """A log-axis tick as a number: 0.001 ... 1000 written out, otherwise mantissa e exponent ("1e-4", "2.5e5")."""
    mantissa, exponent = f"{v:.1e}".split("e")
    return f"{v:g}" if -3 <= int(exponent) <= 3 else f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def log_ticks(lo: float, hi: float, max_ticks: int = 8) -> tuple[list[float], list[str]]:
    """Tick values and labels for a log axis over [lo, hi] (lo > 0): the powers of ten inside (every k-th
    when there are more than ``max_ticks``), with 2 and 5 between them when fewer than two powers fit."""
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
        return [], []
    e_lo, e_hi = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    inside = [10.0**e for e in range(e_lo, e_hi + 1) if lo <= 10.0**e <= hi]
    if len(inside) >= 2:
        step = math.ceil(len(inside) / max_ticks)
        values = inside[::step]
    else:
        values = [float(f"{m * 10.0**e:.12g}") for e in range(e_lo, e_hi + 1) for m in (1, 2, 5)
                  if lo <= m * 10.0**e <= hi]
        if len(values) < 2:
            values = sorted({float(f"{lo:.2g}"), float(f"{hi:.2g}")})
    return values, [tick_label(v) for v in values]


def log_axis(lo: float, hi: float, title: str) -> dict[str, Any]:
    """Layout of a log axis over [lo, hi] with readable ticks (``log_ticks``) and ``title``."""
    values, labels = log_ticks(lo, hi)
    return {"type": "log", "title": {"text": title}, "tickmode": "array", "tickvals": values, "ticktext": labels}


def note_zoom(fig: go.Figure, values: Any, what: str, axis: str = "y") -> go.Figure:
    """Add a note to ``fig`` when the finite ``values`` drawn on ``axis`` span less than ``ZOOM_SPAN``: plotly
    then zooms the axis to that narrow range, which makes small differences look large."""
    v = np.asarray(pd.to_numeric(pd.Series(np.ravel(np.asarray(values, dtype=object))), errors="coerce"), dtype=float)
    v = v[np.isfinite(v)]
    if len(v) < 2 or (span := float(v.max() - v.min())) >= ZOOM_SPAN:
        return fig
    fig.add_annotation(text=f"{axis} axis zoomed: {what} spans only {span:.2g} ({v.min():.4g}–{v.max():.4g})",
                       xref="paper", yref="paper", x=1, y=1, xanchor="right", yanchor="bottom", showarrow=False,
                       font={"size": 11, "color": "#b45309"}, name="zoom note")
    return fig


def outside_blocks(table: pd.DataFrame) -> pd.DataFrame:
    """Rows of ``table`` whose tensor is outside any numbered block (``layer == -1``), e.g.
    embeddings and poolers; ``heatmap`` leaves them out when the model has blocks."""
    return table[table["layer"] < 0]


def heatmap(table: pd.DataFrame, value: str = "log10_kappa") -> go.Figure:
    """Heatmap of ``value`` by module_type (rows) x layer (columns).

    ``table``: the spectra table (columns layer, module_type, matrix, ``value``). Several
    matrices in one cell (stacked experts) are averaged; an infinite value (a singular
    matrix's log10 κ) leaves the cell blank with the text "inf". Tensors outside blocks
    (``layer == -1``) are omitted (list them with ``outside_blocks``); a model with no
    numbered blocks at all is drawn as one column, "outside blocks".
    """
    missing = {"layer", "module_type", value} - set(table.columns)
    if missing:
        raise ConfigError(f"heatmap needs the columns {sorted(missing)} in the spectra table; "
                          "pass the table stored by the spectra analysis")
    if value not in HEATMAP_VALUES:
        raise ConfigError(f"heatmap value {value!r} is not supported; choose one of {', '.join(HEATMAP_VALUES)}")
    blocks = table[table["layer"] >= 0]
    if blocks.empty:
        data = table.assign(column=OUTSIDE_COLUMN)
    else:
        data = blocks.assign(column=blocks["layer"].astype(int))
    values = pd.to_numeric(data[value], errors="coerce").astype(float)
    data = data.assign(_v=values)
    row_order = list(dict.fromkeys(data["module_type"]))
    col_order = list(dict.fromkeys(sorted(data["column"], key=lambda c: (isinstance(c, str), c))))
    grouped = data.groupby(["module_type", "column"], sort=False)["_v"]
    mean = grouped.mean().unstack("column").reindex(index=row_order, columns=col_order)
    count = grouped.size().unstack("column").reindex(index=row_order, columns=col_order).fillna(0).astype(int)
    z = mean.to_numpy(dtype=float)
    fmt = np.vectorize(lambda v: f"{v:.2f}", otypes=[str])
    text = np.where(np.isinf(z), "inf", np.where(np.isnan(z), "", fmt(z))) if z.size else z.astype(str)
    z_plot = np.where(np.isfinite(z), z, np.nan)
    label = HEATMAP_VALUES[value]
    fig = go.Figure(go.Heatmap(
        z=z_plot, x=[str(c) for c in col_order], y=row_order, text=text, customdata=count.to_numpy(),
        texttemplate="%{text}" if z.size <= _MAX_CELL_TEXT else None,
        colorscale=_COLORSCALES[value], colorbar={"title": {"text": label}}, xgap=1, ygap=1,
        hovertemplate=f"%{{y}}<br>layer %{{x}}<br>{label} = %{{text}}<br>%{{customdata}} matrices<extra></extra>",
    ))
    fig.update_layout(title={"text": f"{label} by layer and module"},
                      xaxis={"title": {"text": "layer"}, "type": "category"},
                      yaxis={"title": {"text": "module"}, "autorange": "reversed", "type": "category"},
                      margin={"l": 10, "r": 10, "t": 50, "b": 40}, height=max(260, 40 * len(row_order) + 120))
    return fig


def _row_get(row: Mapping[str, Any] | pd.Series, key: str, default: float = math.nan) -> Any:
    try:
        v = row[key]
    except (KeyError, IndexError):
        return default
    return default if v is None else v


def _esd(singular_values: np.ndarray) -> np.ndarray:
    sv = np.asarray(singular_values, dtype=np.float64)
    if sv.ndim != 1 or sv.size == 0:
        raise ShapeError(f"expected a non-empty 1-D array of singular values, got shape {sv.shape}; "
                         "pass one matrix's stored singular values")
    return sv**2


def esd_histogram(singular_values: np.ndarray, n_bins: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Log-spaced histogram of the positive ESD values λ = σ².

    Returns (edges (n_bins + 1,), density (n_bins,), n) where density integrates to 1 over the
    n positive eigenvalues: density_i = count_i / (n · width_i). ``n_bins`` defaults to
    clip(2·√n, 10, 100).
    """
    esd = _esd(singular_values)
    pos = esd[esd > 0]
    n = len(pos)
    if n == 0:
        return np.array([]), np.array([]), 0
    if n_bins is None:
        n_bins = int(np.clip(round(2 * math.sqrt(n)), 10, 100))
    lo, hi = float(pos.min()), float(pos.max())
    if hi <= lo * (1 + 1e-12):
        lo, hi = lo / 1.1, hi * 1.1
    edges = np.logspace(math.log10(lo), math.log10(hi), n_bins + 1)
    edges[0], edges[-1] = lo, hi  # 10**log10(x) can round below x and drop the largest eigenvalue
    counts, _ = np.histogram(pos, bins=edges)
    return edges, counts / (n * np.diff(edges)), n


def powerlaw_line(alpha: float, xmin: float, x_max: float, tail_share: float,
                  n_points: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """The fitted tail density tail_share · (alpha − 1)/xmin · (λ/xmin)^−alpha on [xmin, x_max]
    (log-spaced points); ``tail_share`` = n_tail / n scales it to the histogram's density."""
    x = np.logspace(math.log10(xmin), math.log10(max(x_max, xmin)), n_points)
    return x, tail_share * (alpha - 1.0) / xmin * (x / xmin) ** (-alpha)


def esd_loglog(singular_values: np.ndarray, row: Mapping[str, Any] | pd.Series) -> go.Figure:
    """ESD of one matrix on log-log axes with its stored power-law fit and MP edge.

    ``singular_values``: (k,) of the matrix (the ESD is their squares, units of weights²);
    ``row``: its row of the spectra table (uses matrix, shape, alpha, xmin, n_tail, mp_edge).
    Traces: "ESD" (histogram steps), "power-law fit" (if alpha and xmin are finite), "MP edge"
    (vertical line at x = mp_edge), "xmin" (vertical line at x = xmin).
    """
    edges, density, n = esd_histogram(singular_values)
    alpha, xmin = float(_row_get(row, "alpha")), float(_row_get(row, "xmin"))
    n_tail, edge = int(_row_get(row, "n_tail", 0) or 0), float(_row_get(row, "mp_edge"))
    fig = go.Figure()
    if n:
        # step outline of the histogram; empty bins break the line (log axis has no zero)
        xs = np.repeat(edges, 2)[1:-1]
        ys = np.repeat(np.where(density > 0, density, np.nan), 2)
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name="ESD (λ = σ²)", line={"color": "#4c78a8"},
                                 fill="tozeroy", fillcolor="rgba(76,120,168,0.25)", connectgaps=False,
                                 hovertemplate="λ %{x:.3g}<br>density %{y:.3g}<extra></extra>"))
    positive = density[density > 0] if n else np.array([1.0])
    y_lo, y_hi = float(positive.min()) / 3, float(positive.max()) * 3
    if n and math.isfinite(alpha) and math.isfinite(xmin) and xmin > 0 and n_tail > 0:
        x, y = powerlaw_line(alpha, xmin, float(edges[-1]), n_tail / n)
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines", name=f"power-law fit α = {alpha:.2f}",
                                 line={"color": "#e45756", "width": 2.5},
                                 hovertemplate="λ %{x:.3g}<br>fit %{y:.3g}<extra></extra>"))
        y_lo = min(y_lo, float(y.min()) / 3)
    for x0, name, style in ((edge, f"MP edge λ+ = {edge:.3g}", {"color": "#54a24b", "dash": "dash", "width": 2}),
                            (xmin, f"xmin = {xmin:.3g}", {"color": "#b279a2", "dash": "dot", "width": 2})):
        if math.isfinite(x0) and x0 > 0:
            fig.add_trace(go.Scatter(x=[x0, x0], y=[y_lo, y_hi], mode="lines", name=name, line=style,
                                     hovertemplate=f"{name}<extra></extra>"))
    matrix, shape = _row_get(row, "matrix", ""), _row_get(row, "shape", "")
    xs_all = [v for t in fig.data for v in np.asarray(t.x, dtype=float) if np.isfinite(v) and v > 0]
    x_lo, x_hi = (min(xs_all), max(xs_all)) if xs_all else (1.0, 10.0)
    fig.update_layout(title={"text": f"ESD of {matrix} ({shape})"},
                      xaxis=log_axis(x_lo, x_hi, "eigenvalue λ of WᵀW (σ²)"),
                      yaxis={**log_axis(y_lo, y_hi, "density"), "range": [math.log10(y_lo), math.log10(y_hi)]},
                      legend={"orientation": "h", "y": -0.2}, margin={"l": 10, "r": 10, "t": 50, "b": 10},
                      height=460)
    return fig


def singular_value_curve(singular_values: np.ndarray, row: Mapping[str, Any] | pd.Series | None = None) -> go.Figure:
    """Singular values σ_i (descending) against their rank i = 1..k, log y axis."""
    sv = np.sqrt(_esd(singular_values))
    fig = go.Figure(go.Scatter(x=np.arange(1, len(sv) + 1), y=np.where(sv > 0, sv, np.nan), mode="lines",
                               name="σ", hovertemplate="i %{x}<br>σ %{y:.4g}<extra></extra>"))
    title = "singular values" if row is None else f"singular values of {_row_get(row, 'matrix', '')}"
    positive = sv[sv > 0]
    lo, hi = (float(positive.min()), float(positive.max())) if len(positive) else (1.0, 10.0)
    fig.update_layout(title={"text": title}, xaxis={"title": {"text": "rank i"}},
                      yaxis=log_axis(lo, hi, "σ_i"), height=320,
                      margin={"l": 10, "r": 10, "t": 50, "b": 40})
    return fig
