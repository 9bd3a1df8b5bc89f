"""Pareto figures of the SAE comparison page (pure: a table in, a plotly figure out).

- ``pareto_front(x, y, minimise_y)``: indices of the points no other point beats on both axes
  (lower L0 always better; lower y when ``minimise_y``, else higher), ordered by x.
- ``pareto_scatter(table, x, y, minimise_y, title, transcoders)``: one marker per SAE, coloured by
  architecture, hover text from the ``name`` column, the SAEs' frontier drawn as a dashed step line;
  ``transcoders`` (rows of ``api.sae_transcoders``) add diamond markers, one trace per kind, named
  "transcoder" / "skip transcoder" (with the architecture when it is not TopK), outside the frontier.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

_MARGIN = {"l": 10, "r": 10, "t": 50, "b": 40}
LABELS = {"l0": "L0 (active latents per token)", "nmse": "NMSE (lower is better)",
          "loss_recovered": "loss recovered (higher is better)", "mcc": "MCC with the true dictionary",
          "recall": "recall at |cos| >= 0.9", "absorption": "absorption (lower is better)",
          "explained_variance_saelens": "explained variance (1 - NMSE)"}


def pareto_front(x: np.ndarray, y: np.ndarray, minimise_y: bool = True) -> np.ndarray:
    """Indices of the non-dominated points (NaNs skipped), by ascending x."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.flatnonzero(np.isfinite(x) & np.isfinite(y))
    s = y if minimise_y else -y
    order = ok[np.lexsort((s[ok], x[ok]))]
    front, best = [], np.inf
    for i in order:
        if s[i] < best:
            front.append(i)
            best = s[i]
    return np.asarray(front, dtype=np.int64)


def transcoder_label(kind: str, architecture: str) -> str:
    """Legend name of a transcoder trace: "transcoder", "skip transcoder", "skip transcoder (relu)"."""
    base = str(kind).replace("_", " ")
    return base if architecture in ("topk", None, "") else f"{base} ({architecture})"


def pareto_scatter(table: pd.DataFrame, x: str, y: str, *, minimise_y: bool = True, title: str = "",
                   transcoders: pd.DataFrame | None = None) -> go.Figure:
    """Markers per architecture and the Pareto frontier of ``table[x]`` vs ``table[y]`` (plus
    ``transcoders`` as diamonds, module docstring)."""
    fig = go.Figure()
    names = table["name"] if "name" in table else table.get("architecture", pd.Series([""] * len(table)))
    for arch, part in table.groupby("architecture", sort=True):
        fig.add_trace(go.Scatter(x=part[x], y=part[y], mode="markers", name=str(arch), marker={"size": 10},
                                 text=names.loc[part.index], hovertemplate="%{text}<br>%{x:.3g}, %{y:.4g}"))
    if transcoders is not None and not transcoders.empty:
        labels = [transcoder_label(k, a) for k, a in zip(transcoders["kind"], transcoders["architecture"])]
        for label in sorted(set(labels)):
            part = transcoders[[lb == label for lb in labels]]
            fig.add_trace(go.Scatter(x=part[x], y=part[y], mode="markers", name=label, legendgroup="transcoders",
                                     marker={"size": 13, "symbol": "diamond", "line": {"width": 1, "color": "black"}},
                                     text=[f"{n} (transcoder: MLP input -> MLP output)" for n in part["name"]],
                                     hovertemplate="%{text}<br>%{x:.3g}, %{y:.4g}"))
    front = pareto_front(table[x].to_numpy(), table[y].to_numpy(), minimise_y)
    if len(front) > 1:
        fig.add_trace(go.Scatter(x=table[x].to_numpy()[front], y=table[y].to_numpy()[front], mode="lines",
                                 line={"dash": "dash", "color": "grey", "shape": "hv"}, name="Pareto frontier",
                                 hoverinfo="skip"))
    fig.update_layout(title=title, xaxis_title=LABELS.get(x, x), yaxis_title=LABELS.get(y, y), margin=_MARGIN,
                      height=380, legend_title_text="architecture")
    return fig
