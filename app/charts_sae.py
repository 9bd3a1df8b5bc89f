"""Figures and HTML for the attention-SAE pages (pure: stored arrays in, figures / strings out).

- ``density_histogram(density)``: log10 feature density histogram (dead features counted in the title).
- ``activation_histogram(counts, edges, feature)``: one feature's nonzero-activation histogram.
- ``head_bars(weights, feature)``: a feature's weight-based head attribution (sums to 1; dotted line at
  the uniform share 1/n_heads).
- ``logit_bars(table, feature)``: top boosted (+) and suppressed (−) tokens of a feature.
- ``dfa_heatmap(dfa, tokens, feature)``: direct feature attribution [pos, n_heads] of one prompt.
- ``prompt_heatmap(acts, tokens, features)``: activations [pos, n_features] of the features that fired.
- ``context_html(tokens, acts, scale)``: one context as HTML, every token escaped, its background
  opacity = activation / scale (the feature's max activation).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from analysis.errors import ShapeError

POS, NEG, ACT = "#d6604d", "#4393c3", "255, 140, 0"  # ACT: rgb of the token highlight
_MARGIN = {"l": 10, "r": 10, "t": 50, "b": 40}


def density_histogram(density: np.ndarray, title: str = "Feature density") -> go.Figure:
    """Histogram of log10(density) over live features; the title counts the dead ones (density 0)."""
    d = np.asarray(density, dtype=np.float64)
    live = d[d > 0]
    fig = go.Figure(go.Histogram(x=np.log10(live), nbinsx=50, marker_color=NEG, name="features",
                                 hovertemplate="log10 density %{x}<br>%{y} features<extra></extra>"))
    fig.update_layout(title={"text": f"{title} ({len(d) - len(live)} dead of {len(d)})"},
                      xaxis={"title": {"text": "log10 firing frequency"}}, yaxis={"title": {"text": "features"}},
                      height=300, margin=_MARGIN, showlegend=False)
    return fig


def activation_histogram(counts: np.ndarray, edges: np.ndarray, feature: int) -> go.Figure:
    """Bars of the nonzero-activation counts (n_bins,) between ``edges`` (n_bins+1,)."""
    c, e = np.asarray(counts), np.asarray(edges, dtype=np.float64)
    if c.ndim != 1 or e.shape != (len(c) + 1,):
        raise ShapeError(f"histogram counts {c.shape} and edges {e.shape} do not match; need (n,) and (n+1,)")
    fig = go.Figure(go.Bar(x=(e[:-1] + e[1:]) / 2, y=c, width=np.diff(e), marker_color=POS, name="count",
                           hovertemplate="activation %{x:.3g}<br>%{y} tokens<extra></extra>"))
    fig.update_layout(title={"text": f"Activations of feature {feature}"}, xaxis={"title": {"text": "activation"}},
                      yaxis={"title": {"text": "tokens"}}, height=280, margin=_MARGIN, showlegend=False)
    return fig


def head_bars(weights: np.ndarray, feature: int, layer: int | None = None) -> go.Figure:
    """Bars of w_{i,h} over heads h (the normalised decoder norm per head slice)."""
    w = np.asarray(weights, dtype=np.float64)
    names = [f"{'' if layer is None else f'L{layer}'}H{h}" for h in range(len(w))]
    fig = go.Figure(go.Bar(x=names, y=w, marker_color=NEG, name="weight",
                           hovertemplate="%{x}: %{y:.3f}<extra></extra>"))
    if len(w):  # the share every head would get from a random direction: a legend entry, not a label on the bars
        fig.add_trace(go.Scatter(x=names, y=np.full(len(w), 1 / len(w)), mode="lines", name="uniform share 1/n_heads",
                                 line={"dash": "dot", "color": "grey"}, hovertemplate="uniform %{y:.3f}<extra></extra>"))
    fig.update_layout(title={"text": f"Head attribution of feature {feature}"}, yaxis={"title": {"text": "weight"},
                      "rangemode": "tozero"}, height=300, margin=_MARGIN, showlegend=True,
                      legend={"orientation": "h", "y": -0.2, "x": 0})
    return fig


def logit_bars(table: pd.DataFrame, feature: int) -> go.Figure:
    """Horizontal bars: boosted tokens (positive effect) above, suppressed (negative) below."""
    ys = [f"+ {t!r}" for t in table["boosted"]][::-1] + [f"− {t!r}" for t in table["suppressed"]]
    xs = list(table["boost"])[::-1] + list(table["suppression"])
    fig = go.Figure(go.Bar(x=xs, y=ys, orientation="h", marker_color=[POS if v >= 0 else NEG for v in xs],
                           name="effect", hovertemplate="%{y}: %{x:.3g}<extra></extra>"))
    fig.update_layout(title={"text": f"Logit effects of feature {feature}"},
                      xaxis={"title": {"text": "direct effect on the logit"}}, yaxis={"autorange": "reversed"},
                      height=max(280, 22 * len(ys)), margin=_MARGIN, showlegend=False)
    return fig


def _labels(tokens: list[str]) -> list[str]:
    return [f"{p}: {t!r}" for p, t in enumerate(tokens)]


def dfa_heatmap(dfa: np.ndarray, tokens: list[str], feature: int) -> go.Figure:
    """DFA of one feature [pos, n_heads]: rows tokens, columns heads, diverging colours around 0."""
    a = np.asarray(dfa, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != len(tokens):
        raise ShapeError(f"DFA of shape {a.shape} does not match {len(tokens)} tokens; need [pos, n_heads]")
    peak = float(np.abs(a).max()) or 1.0
    fig = go.Figure(go.Heatmap(z=a, x=[f"H{h}" for h in range(a.shape[1])], y=_labels(tokens), colorscale="RdBu_r",
                               zmin=-peak, zmax=peak, name="DFA",
                               colorbar={"title": {"text": "DFA"}},
                               hovertemplate="%{y} · %{x}<br>DFA %{z:.3g}<extra></extra>"))
    fig.update_layout(title={"text": f"Direct feature attribution by head, feature {feature}"},
                      yaxis={"autorange": "reversed"}, height=max(300, 20 * len(tokens) + 100), margin=_MARGIN)
    return fig


def prompt_heatmap(acts: np.ndarray, tokens: list[str], features: list[int]) -> go.Figure:
    """Feature activations [pos, n_features] on a prompt (columns = the given feature indices)."""
    a = np.asarray(acts, dtype=np.float64)
    if a.ndim != 2 or a.shape != (len(tokens), len(features)):
        raise ShapeError(f"activations of shape {a.shape} do not match {len(tokens)} tokens x {len(features)} features")
    fig = go.Figure(go.Heatmap(z=a, x=[f"f{i}" for i in features], y=_labels(tokens), colorscale="Oranges", zmin=0,
                               name="activation", colorbar={"title": {"text": "activation"}}, hovertemplate="%{y} · %{x}<br>%{z:.3g}<extra></extra>"))
    fig.update_layout(title={"text": "Features firing on the prompt"}, yaxis={"autorange": "reversed"},
                      xaxis={"type": "category"}, height=max(300, 20 * len(tokens) + 100), margin=_MARGIN)
    return fig


def _entities(text: str) -> str:
    """Every character except letters, digits and spaces as a numeric HTML entity: safe as HTML and
    inert as Markdown (no emphasis, escapes, LaTeX ``$`` or emoji ``:name:`` inside a token)."""
    return "".join(ch if ch.isalnum() or ch == " " else f"&#{ord(ch)};" for ch in text)


def context_html(tokens: list[str], acts: np.ndarray, scale: float, centre: int | None = None, sep: str = "") -> str:
    """Tokens as escaped ``<span>``s whose background opacity is act / scale (clipped to [0, 1]),
    joined by ``sep``; pass the texts of ``sae.features.Context.texts`` (joined as the tokenizer
    decodes them, ``analysis.detokenise``) with no ``sep``. The token at ``centre`` is underlined
    and hovering a token shows its activation."""
    a = np.asarray(acts, dtype=np.float64)
    if len(a) != len(tokens):
        raise ShapeError(f"{len(tokens)} tokens but {len(a)} activations; pass one activation per token")
    s = float(scale) if scale and scale > 0 else 1.0
    spans = []
    for p, (tok, v) in enumerate(zip(tokens, a)):
        alpha = min(max(v / s, 0.0), 1.0)
        style = f"background-color: rgba({ACT}, {alpha:.3f})"
        if p == centre:
            style += "; text-decoration: underline; font-weight: 600"
        text = _entities(tok.replace("\n", "⏎"))
        spans.append(f'<span title="{v:.3g}" style="{style}">{text}</span>')
    return ('<div style="font-family: monospace; white-space: pre-wrap; line-height: 1.7">'
            + _entities(sep).join(spans) + "</div>")
