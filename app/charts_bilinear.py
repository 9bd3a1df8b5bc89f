"""Plotly figure builders for the Bilinear MLPs page (pure: arrays in, figures out; no Streamlit).

They draw what ``analysis.bilinear.report`` stored; nothing is recomputed except scaling an
image to [-1, 1] for display.

- ``eigen_spectrum(eigenvalues, label)``: λ_i against i (sorted by |λ|), bars coloured by sign.
- ``eigenvector_images(images, eigenvalues, indices)``: eigenvectors through the embedding as
  8×8 images, each scaled to max |value| = 1, diverging colours (red +, blue −).
- ``truncation(curve)``: accuracy / agreement and relative error against eigenvectors kept.
- ``contribution_bars(explanation_table)``: the top λ_i (v_i·x̃)² of one input.
- ``digit(pixels)``: one 8×8 input image in grey.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.errors import ShapeError
from app.charts import note_zoom

if TYPE_CHECKING:
    from analysis.bilinear.evaluate import TruncationCurve

POS, NEG = "#d6604d", "#4393c3"


def eigen_spectrum(eigenvalues: np.ndarray, label: str = "") -> go.Figure:
    """Bars of the eigenvalues (n,) in stored order (|λ| descending)."""
    lam = np.asarray(eigenvalues, dtype=np.float64)
    if lam.ndim != 1 or lam.size == 0:
        raise ShapeError(f"expected a non-empty 1-D array of eigenvalues, got shape {lam.shape}")
    fig = go.Figure(go.Bar(x=np.arange(len(lam)), y=lam, marker_color=np.where(lam >= 0, POS, NEG),
                           name="λ", hovertemplate="eigenvector %{x}<br>λ = %{y:.4g}<extra></extra>"))
    fig.update_layout(title={"text": f"Eigenvalues of Q({label})" if label else "Eigenvalues"},
                      xaxis={"title": {"text": "eigenvector (sorted by |λ|)"}},
                      yaxis={"title": {"text": "λ"}}, height=320,
                      margin={"l": 10, "r": 10, "t": 50, "b": 40}, showlegend=False)
    return fig


def scaled(image: np.ndarray) -> np.ndarray:
    """An image divided by its max |value| (all zeros stay zeros)."""
    img = np.asarray(image, dtype=np.float64)
    peak = np.abs(img).max()
    return img / peak if peak > 0 else img


def eigenvector_images(images: np.ndarray, eigenvalues: np.ndarray, indices: np.ndarray | list[int],
                       title: str = "") -> go.Figure:
    """One heatmap per chosen eigenvector: ``images`` (n, h, w), ``eigenvalues`` (n,),
    ``indices`` which of them to draw (left to right). Red pixels push v·x̃ up, blue down; the
    eigenvalue's sign says whether (v·x̃)² raises (+) or lowers (−) the output."""
    imgs = np.asarray(images, dtype=np.float64)
    idx = [int(i) for i in indices]
    if imgs.ndim != 3 or not idx:
        raise ShapeError(f"expected images (n, h, w) and at least one index, got {imgs.shape} and {idx}")
    fig = make_subplots(rows=1, cols=len(idx), horizontal_spacing=0.02,
                        subplot_titles=[f"v{i}: λ = {eigenvalues[i]:+.3g}" for i in idx])
    for c, i in enumerate(idx, start=1):
        fig.add_trace(go.Heatmap(z=scaled(imgs[i]), coloraxis="coloraxis", name=f"v{i}",
                                 hovertemplate=f"v{i}<br>row %{{y}}, col %{{x}}<br>%{{z:.2f}}<extra></extra>"),
                      row=1, col=c)
        fig.update_xaxes(showticklabels=False, row=1, col=c)
        fig.update_yaxes(showticklabels=False, autorange="reversed", scaleanchor=f"x{'' if c == 1 else c}",
                         row=1, col=c)
    fig.update_layout(title={"text": title}, coloraxis={"colorscale": "RdBu_r", "cmin": -1, "cmax": 1,
                                                        "colorbar": {"title": {"text": "v (scaled)"}}},
                      height=260, margin={"l": 10, "r": 10, "t": 70, "b": 10})
    return fig


def truncation(curve: TruncationCurve, title: str = "Truncation") -> go.Figure:
    """Accuracy and agreement (when defined) and relative error against eigenvectors kept per direction."""
    fig = go.Figure()
    ks = np.asarray(curve.ks)
    for name, values, dash in (("accuracy", curve.accuracy, "solid"), ("agreement with full", curve.agreement, "dot"),
                               ("relative error", curve.relative_error, "dash")):
        v = np.asarray(values, dtype=np.float64)
        if np.isfinite(v).any():
            fig.add_trace(go.Scatter(x=ks, y=v, mode="lines+markers", name=name, line={"dash": dash},
                                     hovertemplate=f"k = %{{x}}<br>{name} %{{y:.4f}}<extra></extra>"))
    fig.update_layout(title={"text": title}, xaxis={"title": {"text": "eigenvectors kept per direction (top |λ|)"}},
                      yaxis={"title": {"text": "fraction"}}, height=340, legend={"orientation": "h", "y": -0.25},
                      margin={"l": 10, "r": 10, "t": 50, "b": 10})
    return note_zoom(fig, [v for tr in fig.data for v in tr.y], "accuracy, agreement and error")


def contribution_bars(table: pd.DataFrame, title: str = "") -> go.Figure:
    """Horizontal bars of λ_i (v_i·x̃)² (columns eigen, eigenvalue, contribution), largest at the top."""
    t = table.iloc[::-1]
    fig = go.Figure(go.Bar(x=t["contribution"], y=[f"v{i} (λ {lam:+.2g})" for i, lam in zip(t["eigen"], t["eigenvalue"])],
                           orientation="h", marker_color=np.where(t["contribution"] >= 0, POS, NEG),
                           hovertemplate="%{y}<br>contribution %{x:.4g}<extra></extra>"))
    fig.update_layout(title={"text": title}, xaxis={"title": {"text": "λ_i (v_i·x̃)²"}}, height=360,
                      yaxis={"type": "category"}, margin={"l": 10, "r": 10, "t": 50, "b": 40}, showlegend=False)
    return fig


def digit(pixels: np.ndarray, title: str = "") -> go.Figure:
    """An 8×8 input image (64 values in [0, 1]) in grey, white ink on black."""
    img = np.asarray(pixels, dtype=np.float64).reshape(8, 8)
    fig = go.Figure(go.Heatmap(z=img, colorscale="gray", zmin=0, zmax=1, showscale=False,
                               hovertemplate="row %{y}, col %{x}<br>%{z:.2f}<extra></extra>"))
    fig.update_layout(title={"text": title}, height=260, width=260, margin={"l": 10, "r": 10, "t": 40, "b": 10},
                      xaxis={"showticklabels": False}, yaxis={"showticklabels": False, "autorange": "reversed",
                                                               "scaleanchor": "x"})
    return fig
