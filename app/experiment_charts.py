"""Plotly figure builders for stored experiments (pure: DataFrames in, figures out; no Streamlit).

- ``forgetting_scatter(summary, runs)``: KappaTune forgetting experiment: held-out embedding
  drift (x) against task accuracy (y), one marker per arm at its mean over seeds with ±1 std
  error bars, and each seed's run as a small faint marker of the same colour.
"""

from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go

from analysis.errors import ConfigError
from app.charts import note_zoom

ARM_COLORS = {"lowest_kappa": "#e45756", "highest_kappa": "#4c78a8", "random": "#f58518", "full": "#54a24b",
              "head_only": "#9d9da1"}
ARM_LABELS = {"lowest_kappa": "lowest κ (KappaTune)", "highest_kappa": "highest κ", "random": "random",
              "full": "full fine-tuning", "head_only": "head only"}
_SUMMARY_COLUMNS = ("arm", "drift_mean", "drift_std", "accuracy_mean", "accuracy_std")


def _std(v: float) -> float:
    return 0.0 if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def forgetting_scatter(summary: pd.DataFrame, runs: pd.DataFrame | None = None) -> go.Figure:
    """Drift (mean 1 − cos on held-out text) vs test accuracy per arm, with ±1 std error bars.

    ``summary``: ``ForgettingResult.summary`` (columns arm, drift_mean/std, accuracy_mean/std;
    a NaN std, from a single seed, draws no bar). ``runs``: optional per-seed rows (arm, seed,
    drift, accuracy) drawn as faint points. One trace per arm named by ``ARM_LABELS``.
    """
    missing = [c for c in _SUMMARY_COLUMNS if c not in summary.columns]
    if missing:
        raise ConfigError(f"forgetting_scatter needs the columns {missing} of the experiment summary; "
                          "pass ForgettingResult.summary")
    fig = go.Figure()
    hi = max([float(v) for v in summary["drift_mean"] + summary["drift_std"].fillna(0)]
             + ([float(runs["drift"].max())] if runs is not None and len(runs) else []) + [1e-6])
    for row in summary.to_dict(orient="records"):
        arm = row["arm"]
        color = ARM_COLORS.get(arm, "#72b7b2")
        name = ARM_LABELS.get(arm, arm)
        if runs is not None and len(runs):
            mine = runs[runs["arm"] == arm]
            fig.add_trace(go.Scatter(
                x=mine["drift"], y=mine["accuracy"], mode="markers", name=f"{name}: seeds", legendgroup=arm,
                showlegend=False, marker={"color": color, "size": 6, "opacity": 0.35},
                customdata=mine["seed"],
                hovertemplate=f"{name} seed %{{customdata}}<br>drift %{{x:.4f}}<br>accuracy %{{y:.3f}}<extra></extra>"))
        fig.add_trace(go.Scatter(
            x=[row["drift_mean"]], y=[row["accuracy_mean"]], mode="markers+text", name=name, legendgroup=arm,
            text=[name], textposition="top center", marker={"color": color, "size": 13, "line": {"width": 1}},
            error_x={"type": "data", "array": [_std(row["drift_std"])], "visible": True, "color": color},
            error_y={"type": "data", "array": [_std(row["accuracy_std"])], "visible": True, "color": color},
            hovertemplate=(f"{name}<br>drift %{{x:.4f}} ± {_std(row['drift_std']):.4f}"
                           f"<br>accuracy %{{y:.3f}} ± {_std(row['accuracy_std']):.3f}<extra></extra>")))
    fig.update_layout(title={"text": "Forgetting vs task accuracy (mean ± std over seeds)"},
                      xaxis={"title": {"text": "held-out embedding drift, mean 1 − cos (lower = less forgetting)"},
                             "range": [-0.06 * hi, 1.08 * hi]},  # room for the label of a zero-drift arm
                      yaxis={"title": {"text": "task accuracy (test split)"}},
                      legend={"orientation": "h", "y": -0.2}, margin={"l": 10, "r": 10, "t": 50, "b": 10},
                      height=480)
    return note_zoom(fig, [v for tr in fig.data for v in tr.y], "accuracy")
