"""Figures of a steering search (pure: the stored table in, a figure out; no Streamlit).

- ``pareto(table, side)``: every evaluated setting, effect against the side effect (KL per token
  for an LM, embedding drift for an encoder), one colour per source, the Pareto front as a line
  and the chosen setting circled (plotly, for the dashboard);
- ``pareto_png(table, side, path)``: the same as a PNG (matplotlib, for ``lenslab steer search --plot``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from analysis.errors import ShapeError

PALETTE = ("#2166ac", "#b2182b", "#1b7837", "#762a83", "#e08214", "#35978f", "#8c510a", "#c51b7d")
SIDE_LABEL = {"kl": "KL to the unsteered model on neutral text (nats / token)",
              "drift": "embedding drift on neutral text (1 − cos)"}


def _check(table: pd.DataFrame, side: str) -> None:
    need = ("source", "layer", "alpha", "effect", side, "on_front", "chosen")
    if table is None or table.empty or (missing := [c for c in need if c not in table.columns]):
        raise ShapeError(f"steering search table: expected columns {list(need)}")


def pareto(table: pd.DataFrame, side: str) -> go.Figure:
    _check(table, side)
    fig = go.Figure()
    for i, (source, g) in enumerate(table.groupby("source", sort=False)):
        fig.add_trace(go.Scatter(x=g[side], y=g["effect"], mode="markers", name=str(source),
                                 marker={"color": PALETTE[i % len(PALETTE)], "size": 7},
                                 text=[f"L{int(r.layer)} α={r.alpha:+.3g} ({r.stage})" for r in g.itertuples()],
                                 hovertemplate="%{text}<br>effect %{y:.4g}<br>side %{x:.4g}<extra>%{fullData.name}"
                                               "</extra>"))
    front = table[table["on_front"]].sort_values(side)
    fig.add_trace(go.Scatter(x=front[side], y=front["effect"], mode="lines", name="Pareto front",
                             line={"color": "#444", "dash": "dot"}))
    c = table[table["chosen"]]
    fig.add_trace(go.Scatter(x=c[side], y=c["effect"], mode="markers", name="chosen",
                             marker={"symbol": "circle-open", "size": 16, "color": "black", "line": {"width": 2}}))
    fig.update_layout(xaxis_title=SIDE_LABEL.get(side, side), yaxis_title="behaviour effect", height=420,
                      margin={"l": 10, "r": 10, "t": 30, "b": 40})
    return fig


def pareto_png(table: pd.DataFrame, side: str, path: str | os.PathLike, title: str = "") -> Path:
    _check(table, side)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (source, g) in enumerate(table.groupby("source", sort=False)):
        ax.scatter(g[side], g["effect"], s=18, color=PALETTE[i % len(PALETTE)], label=str(source))
    front = table[table["on_front"]].sort_values(side)
    ax.plot(front[side], front["effect"], ":", color="#444", label="Pareto front")
    c = table[table["chosen"]]
    ax.scatter(c[side], c["effect"], s=160, facecolors="none", edgecolors="black", linewidths=1.5, label="chosen")
    ax.set_xlabel(SIDE_LABEL.get(side, side))
    ax.set_ylabel("behaviour effect")
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
