"""Plotly figure builders for the Steering page (pure: stored tables in, figures out; no Streamlit).

- ``separability(table)``: held-out AUC of each method's projection per layer, and the vector
  norm relative to the typical activation norm (``analysis.steering.extract`` columns).
- ``dose_response(table, kind)``: the measured effect over α (``analysis.steering.effect``): for an
  LM the concept log-probabilities and the KL to the unsteered model; for an encoder the cosine
  shift toward the target class and the masked-token loss.
- ``layer_sweep(table)``: the effect at one α with each layer's own vector.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.errors import ShapeError

COLORS = {"mean_diff": "#2166ac", "pca": "#b2182b", "logistic": "#1b7837"}
POS, NEG, COST = "#d6604d", "#4393c3", "#636363"
_MARGIN = {"l": 10, "r": 10, "t": 60, "b": 40}


def _need(table: pd.DataFrame, columns: tuple[str, ...], what: str) -> None:
    if table is None or table.empty or (missing := [c for c in columns if c not in table.columns]):
        raise ShapeError(f"{what}: expected a non-empty table with columns {list(columns)}"
                         + (f"; missing {missing}" if table is not None and not table.empty else ""))


def separability(table: pd.DataFrame, title: str = "Held-out separability per layer") -> go.Figure:
    """AUC (left) and ‖v‖ / mean ‖h‖ (right) against layer, one line per method."""
    _need(table, ("layer", "method", "auc_test", "rel_norm"), "separability")
    fig = make_subplots(rows=1, cols=2, subplot_titles=("held-out AUC of h·v̂", "‖v‖ / mean ‖h‖"))
    for method, g in table.groupby("method", sort=False):
        g = g.sort_values("layer")
        color = COLORS.get(str(method), None)
        fig.add_trace(go.Scatter(x=g["layer"], y=g["auc_test"], mode="lines+markers", name=str(method),
                                 line={"color": color}, legendgroup=str(method),
                                 hovertemplate="layer %{x}<br>AUC %{y:.3f}<extra>" + str(method) + "</extra>"), 1, 1)
        fig.add_trace(go.Scatter(x=g["layer"], y=g["rel_norm"], mode="lines+markers", name=str(method),
                                 line={"color": color, "dash": "dot"}, legendgroup=str(method), showlegend=False,
                                 hovertemplate="layer %{x}<br>%{y:.3f}<extra>" + str(method) + "</extra>"), 1, 2)
    fig.add_hline(y=0.5, line={"color": "#999", "dash": "dash"}, row=1, col=1)
    fig.update_xaxes(title_text="layer", dtick=1)
    fig.update_yaxes(range=[0, 1.02], row=1, col=1)
    fig.update_layout(title={"text": title}, height=340, margin=_MARGIN)
    return fig


def dose_response(table: pd.DataFrame, kind: str, title: str = "Dose-response") -> go.Figure:
    """Effect against α: LM (logp_pos, logp_neg | kl, nll) or encoder (shift, margin | masked_loss)."""
    if kind == "lm":
        _need(table, ("alpha", "logp_pos", "logp_neg", "kl", "nll"), "LM dose-response")
        left = (("logp_pos", "log p(positive concept)", POS), ("logp_neg", "log p(negative concept)", NEG))
        right = (("kl", "KL to unsteered", COST), ("nll", "next-token NLL", "#8c510a"))
        titles = ("concept log-probability (nats)", "capability cost (nats)")
    elif kind == "encoder":
        _need(table, ("alpha", "shift", "margin", "masked_loss"), "encoder dose-response")
        left = (("shift", "Δ cos to target class", POS), ("margin", "cos(target) − cos(other)", NEG))
        right = (("masked_loss", "masked-token loss", COST),)
        titles = ("embedding shift toward the target class", "capability cost (nats per masked token)")
    else:
        raise ShapeError(f"kind {kind!r} must be 'lm' or 'encoder'")
    t = table.sort_values("alpha")
    fig = make_subplots(rows=1, cols=2, subplot_titles=titles)
    for col, series in ((1, left), (2, right)):
        for name, label, color in series:
            y = t[name].to_numpy(dtype=np.float64)
            if np.isfinite(y).any():
                fig.add_trace(go.Scatter(x=t["alpha"], y=y, mode="lines+markers", name=label, line={"color": color},
                                         hovertemplate="α %{x:+g}<br>%{y:.4g}<extra>" + label + "</extra>"), 1, col)
    fig.add_vline(x=0, line={"color": "#999", "dash": "dash"})
    fig.update_xaxes(title_text="α")
    fig.update_layout(title={"text": title}, height=340, margin=_MARGIN)
    return fig


def layer_sweep(table: pd.DataFrame, title: str = "Layer sweep") -> go.Figure:
    """Bars of the effect per layer (LM: delta_pos, kl; encoder: shift, masked_loss)."""
    cols = [c for c in ("delta_pos", "delta_neg", "kl", "shift", "margin", "masked_loss") if c in table.columns]
    _need(table, ("layer", *cols[:1]), "layer sweep")
    fig = go.Figure()
    for c in cols:
        y = table[c].to_numpy(dtype=np.float64)
        if np.isfinite(y).any():
            fig.add_trace(go.Bar(x=table["layer"], y=y, name=c))
    fig.update_layout(title={"text": title}, barmode="group", height=320, margin=_MARGIN,
                      xaxis={"title": {"text": "layer"}, "dtick": 1})
    return fig
