"""Readable charts (issue 16): log axes whose ticks read as numbers, a title on every colour bar, a note
when an accuracy axis zooms to a narrow range, the head-attribution reference line in the legend rather
than over the bars; and every table of every page shows a missing value as "–"."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

VIEWS = Path(__file__).resolve().parents[2] / "app" / "views"


# ------------------------------------------------------------------------------------------ log axes
@pytest.mark.parametrize("lo,hi", [(3e-5, 2.0), (1e-9, 1e9), (0.013, 0.09), (2.5, 7.0), (0.5, 40.0), (4.0, 4.0),
                                   (3.4e-5, 7.1e-5)],
                         ids=str)
def test_log_ticks_are_numbers_inside_the_range(lo, hi):
    from app.charts import log_ticks

    values, labels = log_ticks(lo, hi)
    assert len(values) >= 1 and len(values) == len(labels) <= 8
    for v, text in zip(values, labels):
        assert float(text) == pytest.approx(v, rel=1e-12)  # the label is the number, no SI prefix (µ, m, k)
        assert lo * (1 - 1e-9) <= v <= hi * (1 + 1e-9) or len(values) <= 2
    decades = [v for v in values if math.log10(v) == round(math.log10(v))]
    if math.floor(math.log10(hi)) - math.ceil(math.log10(lo)) >= 1:  # two or more powers of ten fit
        assert decades == values and np.all(np.diff(np.log10(values)) > 0)
    elif hi > lo:
        assert len(values) >= 2  # 1-2-5 steps (or the ends) when fewer than two powers fit


def test_tick_labels_read_plainly():
    from app.charts import tick_label

    assert [tick_label(v) for v in (1e-4, 2e-5, 3.4e-5, 0.002, 0.1, 0.5, 1.0, 20.0, 100.0, 1e3, 5e6, 2.5e5)] == \
        ["1e-4", "2e-5", "3.4e-5", "0.002", "0.1", "0.5", "1", "20", "100", "1000", "5e6", "2.5e5"]


def test_esd_and_singular_value_axes_have_readable_ticks(rng):
    from app.charts import esd_loglog, singular_value_curve
    from analysis.weights.spectra import spectrum_metrics

    w = rng.standard_t(3, size=(400, 100)) * 1e-3  # eigenvalues of WᵀW far below 1: plotly would write "100µ"
    sv = np.linalg.svd(w, compute_uv=False)
    row = {"matrix": "w", "shape": "400x100", **spectrum_metrics(sv, 400, 100)}
    for fig, axes in ((esd_loglog(sv, row), ("xaxis", "yaxis")), (singular_value_curve(sv), ("yaxis",))):
        for name in axes:
            axis = fig.layout[name]
            assert axis.type == "log" and axis.tickmode == "array" and len(axis.tickvals) >= 2, name
            assert [float(t) for t in axis.ticktext] == pytest.approx(list(axis.tickvals), rel=1e-12)
    lam = sv**2
    x_ticks = np.asarray(esd_loglog(sv, row).layout.xaxis.tickvals)
    assert ((x_ticks >= lam.min() * 0.999) & (x_ticks <= lam.max() * 1.001)).sum() >= 1


# ------------------------------------------------------------------------------------- colour bars
def _heatmaps():
    from app import charts, charts_circuits, charts_experts, charts_sae

    rng = np.random.default_rng(0)
    table = pd.DataFrame({"matrix": ["a", "b"], "layer": [0, 1], "module_type": ["m", "m"],
                          "log10_kappa": [1.0, 2.0], "alpha": [2.0, 3.0]})
    grid = pd.DataFrame(rng.uniform(1, 9, (2, 3)), index=[0, 1], columns=[0, 1, 2])
    tokens = ["a", "b", "c"]
    yield "spectra κ", charts.heatmap(table, "log10_kappa")
    yield "spectra α", charts.heatmap(table, "alpha")
    yield "circuits", charts_circuits.head_heatmap(grid, "kappa")
    yield "expert x class", charts_experts.expert_class_heatmap(rng.uniform(size=(4, 3)), ["x", "y", "z"])
    yield "routing", charts_experts.routing_heatmap(rng.uniform(size=(2, 3)), x=["e0", "e1", "e2"], y=["l0", "l1"],
                                                    title="t", zlabel="share")
    yield "DFA", charts_sae.dfa_heatmap(rng.standard_normal((3, 4)), tokens, 1)
    yield "prompt", charts_sae.prompt_heatmap(rng.uniform(size=(3, 2)), tokens, [4, 7])


def test_every_colour_bar_has_a_title():
    from app.charts_bilinear import eigenvector_images

    figs = [*_heatmaps(), ("eigenvector images", eigenvector_images(np.ones((2, 8, 8)), np.array([1.0, -1.0]), [0, 1]))]
    for name, fig in figs:
        for trace in fig.data:
            if trace.type != "heatmap" or trace.showscale is False:
                continue
            if trace.coloraxis:
                title = fig.layout[trace.coloraxis].colorbar.title.text
            else:
                title = trace.colorbar.title.text
            assert title, name


# ---------------------------------------------------------------------------------- zoomed axes
def test_accuracy_curve_says_when_its_axis_is_zoomed():
    from app.charts_experts import accuracy_curve

    narrow = pd.DataFrame({"n_experts": [8, 16, 32], "accuracy": [0.996, 0.998, 1.0]})
    notes = [a.text for a in accuracy_curve(narrow, linear_probe=0.997).layout.annotations]
    assert len(notes) == 1 and "zoomed" in notes[0] and "0.004" in notes[0]
    wide = narrow.assign(accuracy=[0.6, 0.8, 0.9])
    assert not accuracy_curve(wide, linear_probe=0.7).layout.annotations
    # the baseline counts: a probe far below the curve widens the axis, so nothing is zoomed
    assert not accuracy_curve(narrow, linear_probe=0.5).layout.annotations


def test_forgetting_and_truncation_charts_say_when_zoomed():
    from types import SimpleNamespace

    from app.charts_bilinear import truncation
    from app.experiment_charts import forgetting_scatter

    summary = pd.DataFrame({"arm": ["full", "random"], "drift_mean": [0.1, 0.02], "drift_std": [0.01, 0.0],
                            "accuracy_mean": [0.912, 0.915], "accuracy_std": [np.nan, np.nan]})
    (note,) = forgetting_scatter(summary).layout.annotations
    assert "accuracy spans only 0.003" in note.text
    assert not forgetting_scatter(summary.assign(accuracy_mean=[0.5, 0.9])).layout.annotations
    curve = SimpleNamespace(ks=[1, 2, 4], accuracy=[0.97, 0.975, 0.98], agreement=[0.99, 0.995, 1.0],
                            relative_error=[0.6, 0.3, 0.1])
    assert not truncation(curve).layout.annotations  # the error curve spans the axis
    curve.relative_error = [np.nan] * 3
    assert "zoomed" in truncation(curve).layout.annotations[0].text


def test_head_attribution_reference_is_a_legend_line_not_a_label_over_the_bars():
    from app.charts_sae import head_bars

    w = np.array([0.5, 0.2, 0.2, 0.1])
    fig = head_bars(w, 3, layer=1)
    assert not fig.layout.annotations and not fig.layout.shapes
    bars, uniform = fig.data
    np.testing.assert_allclose(bars.y, w)
    assert uniform.name.startswith("uniform") and fig.layout.showlegend
    np.testing.assert_allclose(uniform.y, 1 / len(w))
    assert list(uniform.x) == list(bars.x)


# ------------------------------------------------------------------------------------ tables
def test_every_table_on_every_page_shows_missing_values_as_a_dash():
    from app.state import MISSING

    assert MISSING == "–"
    calls = []
    for path in sorted(VIEWS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") in {"dataframe", "data_editor"}:
                kw = {k.arg: k.value for k in node.keywords}
                ok = "placeholder" in kw and ast.unparse(kw["placeholder"]) == "MISSING"
                calls.append((f"{path.name}:{node.lineno}", ok))
    assert len(calls) >= 20
    assert [where for where, ok in calls if not ok] == []
