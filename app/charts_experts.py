"""Figure builders for expert analyses (pure: tables/arrays in, figures out; no Streamlit).

Plotly (dashboard): ``expert_class_heatmap``, ``load_histogram``, ``specialisation_curve``,
``accuracy_curve``, ``routing_heatmap`` (layer x expert usage, co-activation, domain usage).
Matplotlib: ``save_curve_png`` writes the specialisation figure as a small PNG (README, CLI).
Nothing here computes a metric: every value is read from what the analyses stored.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from analysis.errors import ConfigError, ShapeError
from app.charts import note_zoom

FLIP, EFFECT = "#4c78a8", "#e45756"


def expert_order(expert_class: np.ndarray) -> np.ndarray:
    """Experts sorted by their top class (by mean gate), then by that class's coefficient, descending."""
    m = np.nan_to_num(np.asarray(expert_class, dtype=float), nan=-1.0)
    top = m.argmax(1)
    return np.lexsort((-m[np.arange(len(m)), top], top))


def expert_class_heatmap(expert_class: np.ndarray, classes: Sequence[str], *, sort: bool = True) -> go.Figure:
    """Heatmap of the mean gate coefficient of each expert (rows) on each class (columns).

    ``expert_class`` (N, C). With ``sort`` the experts are grouped by their top class, so a
    block diagonal means class-specialised experts. Row labels are expert indices.
    """
    m = np.asarray(expert_class, dtype=float)
    if m.ndim != 2 or m.shape[1] != len(classes):
        raise ShapeError(f"expert x class matrix must be (n_experts, {len(classes)}), got {m.shape}")
    order = expert_order(m) if sort else np.arange(len(m))
    fig = go.Figure(go.Heatmap(z=m[order], x=list(classes), y=[f"e{k}" for k in order], colorscale="Blues",
                               colorbar={"title": {"text": "mean a"}},
                               hovertemplate="expert %{y}<br>class %{x}<br>mean gate %{z:.3f}<extra></extra>"))
    fig.update_layout(title={"text": f"mean gate coefficient: {len(m)} experts x {len(classes)} classes"},
                      xaxis={"title": {"text": "class"}, "type": "category"},
                      yaxis={"title": {"text": "expert (grouped by top class)"}, "type": "category",
                             "autorange": "reversed", "showticklabels": len(m) <= 64},
                      height=min(900, max(320, 12 * len(m) + 120)), margin={"l": 10, "r": 10, "t": 50, "b": 40})
    return fig


def load_histogram(load: np.ndarray, threshold: float = 0.5) -> go.Figure:
    """Histogram over experts of their load (samples with coefficient >= ``threshold``)."""
    load = np.asarray(load)
    fig = go.Figure(go.Histogram(x=load, nbinsx=min(40, max(5, int(load.max(initial=0)) + 1)),
                                 marker={"color": FLIP}, hovertemplate="load %{x}<br>%{y} experts<extra></extra>"))
    fig.update_layout(title={"text": f"expert load (samples with a ≥ {threshold:g})"},
                      xaxis={"title": {"text": "samples"}}, yaxis={"title": {"text": "experts"}}, height=320,
                      margin={"l": 10, "r": 10, "t": 50, "b": 40}, bargap=0.05)
    return fig


def _need(table: pd.DataFrame, cols: Sequence[str]) -> None:
    if missing := sorted(set(cols) - set(table.columns)):
        raise ConfigError(f"the curve table lacks {missing}; pass the table stored by `lenslab mmoe analyze`")


def specialisation_curve(table: pd.DataFrame) -> go.Figure:
    """Mean class-level polysemanticity (bits) against the number of experts, with size-matched nulls.

    Traces: "effect-weighted", "effect null", "flip-based", "flip null" (dashed = null).
    """
    cols = ["n_experts", "mean_effect_polysemanticity", "mean_null_effect_polysemanticity",
            "mean_polysemanticity", "mean_null_polysemanticity", "n_experts_counted", "n_experts_counted_effect"]
    _need(table, cols)
    t = table.sort_values("n_experts")
    fig = go.Figure()
    for col, null, name, color, counted in (
            ("mean_effect_polysemanticity", "mean_null_effect_polysemanticity", "effect-weighted", EFFECT,
             "n_experts_counted_effect"),
            ("mean_polysemanticity", "mean_null_polysemanticity", "flip-based", FLIP, "n_experts_counted")):
        fig.add_trace(go.Scatter(x=t["n_experts"], y=t[col], mode="lines+markers", name=name, line={"color": color},
                                 customdata=t[counted],
                                 hovertemplate="%{x} experts<br>%{y:.3f} bits<br>%{customdata} experts counted"
                                               "<extra></extra>"))
        fig.add_trace(go.Scatter(x=t["n_experts"], y=t[null], mode="lines", name=f"{name.split('-')[0]} null",
                                 line={"color": color, "dash": "dash"},
                                 hovertemplate="%{x} experts<br>null %{y:.3f} bits<extra></extra>"))
    fig.update_layout(title={"text": "class-level polysemanticity per expert (lower = more specialised)"},
                      xaxis={"title": {"text": "number of experts"}, "type": "log", "tickvals": list(t["n_experts"])},
                      yaxis={"title": {"text": "mean entropy of classes affected (bits)"}, "rangemode": "tozero"},
                      legend={"orientation": "h", "y": -0.25}, height=400, margin={"l": 10, "r": 10, "t": 50, "b": 10})
    return fig


def accuracy_curve(table: pd.DataFrame, linear_probe: float | None = None, matched_linear: float | None = None
                   ) -> go.Figure:
    """Test accuracy of the MMoE probes against the number of experts, with the baselines as lines."""
    _need(table, ["n_experts", "accuracy"])
    t = table.sort_values("n_experts")
    fig = go.Figure(go.Scatter(x=t["n_experts"], y=t["accuracy"], mode="lines+markers", name="MMoE",
                               hovertemplate="%{x} experts<br>accuracy %{y:.4f}<extra></extra>"))
    for value, name, dash in ((matched_linear, "parameter-matched linear layer", "dash"),
                              (linear_probe, "linear probe", "dot")):
        if value is not None and np.isfinite(value):
            fig.add_trace(go.Scatter(x=[t["n_experts"].min(), t["n_experts"].max()], y=[value, value], mode="lines",
                                     name=name, line={"dash": dash},
                                     hovertemplate=f"{name}: {value:.4f}<extra></extra>"))
    fig.update_layout(title={"text": "test accuracy"}, xaxis={"title": {"text": "number of experts"}, "type": "log",
                                                               "tickvals": list(t["n_experts"])},
                      yaxis={"title": {"text": "accuracy"}}, legend={"orientation": "h", "y": -0.25}, height=400,
                      margin={"l": 10, "r": 10, "t": 50, "b": 10})
    return note_zoom(fig, [v for tr in fig.data for v in tr.y], "accuracy")


def routing_heatmap(z: np.ndarray, *, x: Sequence[str], y: Sequence[str], title: str, zlabel: str,
                    zmax: float | None = None) -> go.Figure:
    """A labelled heatmap (rows ``y``, columns ``x``) for routing statistics; NaN cells blank."""
    z = np.asarray(z, dtype=float)
    if z.shape != (len(y), len(x)):
        raise ShapeError(f"heatmap values {z.shape} do not match {len(y)} rows x {len(x)} columns")
    text = np.where(np.isnan(z), "", np.vectorize(lambda v: f"{v:.2f}", otypes=[str])(z)) if z.size else z
    fig = go.Figure(go.Heatmap(z=z, x=list(x), y=list(y), text=text, texttemplate="%{text}" if z.size <= 200 else None,
                               colorscale="Viridis", zmin=0, zmax=zmax, colorbar={"title": {"text": zlabel}},
                               hovertemplate=f"%{{y}}<br>%{{x}}<br>{zlabel} %{{z:.3f}}<extra></extra>"))
    fig.update_layout(title={"text": title}, xaxis={"type": "category"},
                      yaxis={"type": "category", "autorange": "reversed"},
                      height=max(260, 30 * len(y) + 140), margin={"l": 10, "r": 10, "t": 50, "b": 40})
    return fig


def save_curve_png(table: pd.DataFrame, path: str | os.PathLike, *, title: str = "MMoE expert specialisation",
                   linear_probe: float | None = None, matched_linear: float | None = None, dpi: int = 110) -> None:
    """Write the specialisation figure (polysemanticity and accuracy vs experts) as a PNG."""
    _need(table, ["n_experts", "accuracy", "mean_effect_polysemanticity", "mean_null_effect_polysemanticity",
                  "mean_polysemanticity", "mean_null_polysemanticity"])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = table.sort_values("n_experts")
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(8.4, 3.2), gridspec_kw={"width_ratios": [1.6, 1]})
    for col, null, name, color in (("mean_effect_polysemanticity", "mean_null_effect_polysemanticity",
                                    "effect-weighted", EFFECT),
                                   ("mean_polysemanticity", "mean_null_polysemanticity", "flip-based", FLIP)):
        ax.plot(t["n_experts"], t[col], "o-", color=color, label=name)
        ax.plot(t["n_experts"], t[null], "--", color=color, alpha=0.7, label=f"{name.split('-')[0]} null")
    for a in (ax, ax2):
        a.set_xscale("log", base=2)
        a.set_xticks(list(t["n_experts"]), [str(n) for n in t["n_experts"]])
        a.set_xlabel("number of experts")
        a.grid(alpha=0.3)
    ax.set_ylabel("polysemanticity (bits)")
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    ax2.plot(t["n_experts"], t["accuracy"], "o-", color="black", label="MMoE")
    for value, name, style in ((matched_linear, "matched linear", "--"), (linear_probe, "linear probe", ":")):
        if value is not None and np.isfinite(value):
            ax2.axhline(value, linestyle=style, color="gray", label=name)
    ax2.set_ylabel("test accuracy")
    ax2.set_title("accuracy", fontsize=10)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    target = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    fig.savefig(target, dpi=dpi)
    plt.close(fig)
