"""Dashboard pages through Streamlit's AppTest, and the plotly figure builders of app/charts.py.

The populated store holds a small synthetic safetensors model (2 blocks, 7 matrices, one of
them with a NaN, 3 1-D tensors); what the pages show is checked against numpy references
computed here from the same weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from streamlit.testing.v1 import AppTest

from analysis.errors import ConfigError
from _support import figure_array

from analysis.weights.spectra import spectrum_metrics
from analysis.store import Result, Store

DASHBOARD = str(Path(__file__).resolve().parents[2] / "app" / "dashboard.py")
TIMEOUT = 90  # seconds per AppTest run; the first run imports torch, plotly and peft
NAN_TENSOR = "model.layers.1.mlp.down_proj.weight"


# --------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """A tiny Llama-named checkpoint and its weights (float32 values, float64 copies)."""
    rng = np.random.default_rng(11)
    shapes = {"model.embed_tokens.weight": (50, 16), "model.norm.weight": (16,)}
    for i in range(2):
        shapes |= {f"model.layers.{i}.self_attn.q_proj.weight": (16, 16),
                   f"model.layers.{i}.mlp.up_proj.weight": (32, 16),
                   f"model.layers.{i}.mlp.down_proj.weight": (16, 32),
                   f"model.layers.{i}.input_layernorm.weight": (16,)}
    weights = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    weights[NAN_TENSOR][3, 5] = np.nan
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_file({n: torch.from_numpy(w) for n, w in weights.items()}, str(path))
    return path, {n: w.astype(np.float64) for n, w in weights.items()}


def _finite_matrices(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {n: w for n, w in weights.items() if w.ndim == 2 and np.isfinite(w).all()}


pytestmark = pytest.mark.usefixtures("streamlit_caches_cleared")


@pytest.fixture
def populated_store(dashboard_store, model_file) -> Store:
    from app import api

    api.analyze(str(model_file[0]), store=dashboard_store)
    return dashboard_store


@pytest.fixture
def downloads(monkeypatch) -> dict[str, bytes]:
    """Bytes behind every download button, by media file id (AppTest discards its media store)."""
    from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage

    seen: dict[str, bytes] = {}
    original = MemoryMediaFileStorage.load_and_get_id

    def spy(self, path_or_data, mimetype, kind, filename=None):
        file_id = original(self, path_or_data, mimetype, kind, filename)
        seen[file_id] = path_or_data
        return file_id

    monkeypatch.setattr(MemoryMediaFileStorage, "load_and_get_id", spy)
    return seen


def run_page(page: str | None = None) -> AppTest:
    at = AppTest.from_file(DASHBOARD, default_timeout=TIMEOUT).run()
    if page is not None:
        at.switch_page(f"views/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    # the entry script ran (page list and sidebar), not the page on its own
    assert any("Store:" in c.value for c in at.sidebar.caption)
    assert len(at.title) == 1
    return at


def figures(at: AppTest) -> list[dict]:
    return [json.loads(el.proto.spec) for el in at.get("plotly_chart")]


def frames(at: AppTest) -> list[pd.DataFrame]:
    return [df.value for df in at.dataframe]


# --------------------------------------------------------------------------------- empty store
def test_home_empty_store_shows_how_to_start(dashboard_store):
    at = run_page()
    assert any("lenslab analyze minilm" in i.value for i in at.info)
    assert not at.dataframe
    assert at.text_input[0].value == "minilm"


@pytest.mark.parametrize("page", ["spectra", "selection"])
def test_pages_empty_store_show_empty_state(dashboard_store, page):
    at = run_page(page)
    assert any("No models in the store" in i.value for i in at.info)
    assert not at.get("plotly_chart") and not at.get("download_button")


# ------------------------------------------------------------------------------ populated store
def test_home_lists_models(populated_store, model_file):
    at = run_page()
    (table,) = frames(at)
    assert len(table) == 1
    row = table.iloc[0]
    assert row["label"] == str(model_file[0].resolve())
    assert row["analyses"] == "spectra"
    assert row["params"] == sum(w.size for w in model_file[1].values())
    assert not at.info


def test_home_analyse_form_runs_and_lists_the_model(dashboard_store, model_file):
    at = run_page()
    at.text_input[0].input(str(model_file[0]))
    at.button[0].click().run()
    assert not at.exception
    n_matrices = sum(w.ndim == 2 for w in model_file[1].values())
    assert any(f"{n_matrices} matrices" in s.value for s in at.success)
    (table,) = frames(at)
    assert list(table["label"]) == [str(model_file[0].resolve())]


def test_home_analyse_bad_source_shows_error_not_traceback(dashboard_store, tmp_path):
    at = run_page()
    missing = tmp_path / "nope.safetensors"
    at.text_input[0].input(str(missing))
    at.button[0].click().run()
    assert not at.exception
    assert len(at.error) == 1 and "neither a bundled model name" in at.error[0].value
    assert str(missing) in at.error[0].value
    assert not dashboard_store.models()


def test_spectra_page_heatmaps_match_numpy(populated_store, model_file):
    at = run_page("spectra")
    weights = model_file[1]
    figs = figures(at)
    heat = {f["layout"]["title"]["text"]: f["data"][0] for f in figs if f["data"][0]["type"] == "heatmap"}
    assert len(heat) == 2
    kappa = heat["log10 κ by layer and module"]
    assert kappa["x"] == ["0", "1"]
    assert kappa["y"] == ["mlp.down_proj", "mlp.up_proj", "self_attn.q_proj"]
    z = figure_array(kappa["z"])
    assert z.shape == (3, 2)
    for i, mtype in enumerate(kappa["y"]):
        for j, layer in enumerate(kappa["x"]):
            w = weights[f"model.layers.{layer}.{mtype}.weight"]
            if np.isfinite(w).all():
                np.testing.assert_allclose(z[i, j], math.log10(np.linalg.cond(w)), rtol=1e-6)
            else:
                assert np.isnan(z[i, j])  # NaN weights: blank cell
    # the embedding is outside the blocks: named in the caption, not in the grid
    assert any("model.embed_tokens.weight" in c.value for c in at.caption)
    assert any("NaN/Inf" in w.value for w in at.warning)


def test_spectra_page_table_and_skipped(populated_store, model_file):
    at = run_page("spectra")
    weights = model_file[1]
    by_cols = {tuple(df.columns[:3]): df for df in frames(at)}
    table = by_cols[("matrix", "layer", "module_type")]
    assert sorted(table["matrix"]) == sorted(n for n, w in weights.items() if w.ndim == 2)
    assert dict(zip(table["matrix"], table["status"]))[NAN_TENSOR].startswith("nonfinite: 1 NaN")
    finite = _finite_matrices(weights)
    got = dict(zip(table["matrix"], table["kappa"]))
    for name, w in finite.items():
        np.testing.assert_allclose(got[name], np.linalg.cond(w), rtol=1e-6)
    skipped = by_cols[("tensor", "shape", "reason")]
    assert sorted(skipped["tensor"]) == sorted(n for n, w in weights.items() if w.ndim == 1)


def test_spectra_page_esd_chart_follows_matrix_picker(populated_store, model_file):
    at = run_page("spectra")
    picker = at.selectbox(key="spectra_matrix")
    assert picker.value == "model.layers.0.mlp.down_proj.weight"  # first fitted matrix inside a block
    name = "model.layers.1.mlp.up_proj.weight"
    picker.set_value(name).run()
    assert not at.exception
    (esd,) = [f for f in figures(at) if f["layout"]["title"]["text"].startswith("ESD of")]
    assert name in esd["layout"]["title"]["text"]
    w = model_file[1][name]
    big, small = max(w.shape), min(w.shape)
    sigma2 = (w**2).sum() / (big * small)
    mp_edge = big * sigma2 * (1 + math.sqrt(small / big)) ** 2  # independent MP bulk edge
    (mp,) = [t for t in esd["data"] if t["name"].startswith("MP edge")]
    np.testing.assert_allclose(figure_array(mp["x"]), [mp_edge, mp_edge], rtol=1e-9)
    hist = [t for t in esd["data"] if t["name"].startswith("ESD")][0]
    lam = np.linalg.svd(w, compute_uv=False) ** 2
    hx = figure_array(hist["x"])
    np.testing.assert_allclose([hx.min(), hx.max()], [lam.min(), lam.max()], rtol=1e-6)


def test_spectra_page_compute_button(dashboard_store, model_file):
    """A model known to the store without spectra gets a button that computes them."""
    from analysis.sources import open_source

    src = open_source(str(model_file[0]))
    dashboard_store.put(src.fingerprint, "other", {}, "0", Result(meta={"note": "not spectra"}))
    dashboard_store.register_model(src.fingerprint, src.label, src.kind)
    at = run_page("spectra")
    assert any("No spectra stored" in i.value for i in at.info)
    assert not at.get("plotly_chart")
    at.button[0].click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert len([f for f in figures(at) if f["data"][0]["type"] == "heatmap"]) == 2
    assert [e.analysis for e in dashboard_store.list(fingerprint=src.fingerprint)].count("spectra") == 1


def test_selection_page_preview_and_downloads(populated_store, model_file, downloads):
    from analysis.weights.export import FORMATS, export_selection
    from analysis.weights.selection import Budget, select_tensors
    from app import api

    at = run_page("selection")
    at.radio(key="budget_kind").set_value("count").run()
    at.number_input(key="budget_count").set_value(3).run()
    assert not at.exception
    # independent truth: the 3 finite linear weights (embeddings are opt-in) with the lowest numpy condition number
    conds = {n: np.linalg.cond(w) for n, w in _finite_matrices(model_file[1]).items() if "embed" not in n}
    expected = sorted(conds, key=conds.get)[:3]
    selected = at.dataframe[0].value
    assert list(selected["tensor"]) == expected
    assert list(selected["rank"]) == [1, 2, 3]
    assert any(m.value == f"3 of {len(conds)}" for m in at.metric)
    assert sum(1 for w in at.warning if NAN_TENSOR in w.value) == 1  # excluded, and said so

    buttons = at.get("download_button")
    assert len(buttons) == len(FORMATS) == 3
    texts = {b.proto.label.removeprefix("Download "): downloads[Path(b.proto.url).stem].decode() for b in buttons}
    assert texts["selected_params.txt"] == "".join(n + "\n" for n in expected)
    fp = populated_store.models()[0].fingerprint
    sel = select_tensors(api.find_spectra(fp, populated_store).table, Budget("count", 3), fingerprint=fp)
    assert texts["lora_config.json"] == export_selection(sel, "peft")
    assert json.loads(texts["lora_config.json"])["target_modules"] == [n.removesuffix(".weight") for n in expected]
    assert texts["axolotl_unfrozen.yaml"] == export_selection(sel, "axolotl")


def test_selection_page_bad_regex_shows_error(populated_store):
    at = run_page("selection")
    at.text_input(key="exclude").input("(").run()
    assert not at.exception
    assert len(at.error) == 1 and "exclude regex" in at.error[0].value
    assert not at.get("download_button")


def test_selection_page_without_spectra_points_to_spectra_page(dashboard_store):
    dashboard_store.put("f" * 32, "other", {}, "0", Result(meta={}))
    dashboard_store.register_model("f" * 32, "elsewhere", "safetensors")
    at = run_page("selection")
    assert any("No spectra stored for elsewhere" in i.value for i in at.info)
    assert not at.get("download_button")


# ------------------------------------------------------------------------------------ charts
@pytest.fixture(scope="module")
def esd_case():
    """A heavy-tailed 400 x 100 matrix, its singular values and its metrics row."""
    rng = np.random.default_rng(3)
    w = rng.standard_t(3, size=(400, 100))
    sv = np.linalg.svd(w, compute_uv=False)
    row = {"matrix": "w", "shape": "400x100", **spectrum_metrics(sv, 400, 100)}
    return sv, row


def _trace(fig, prefix: str):
    (t,) = [t for t in fig.data if t.name.startswith(prefix)]
    return t


def test_esd_fit_line_has_slope_minus_alpha(esd_case):
    from app.charts import esd_loglog

    sv, row = esd_case
    assert math.isfinite(row["alpha"]) and row["n_tail"] > 10
    fig = esd_loglog(sv, row)
    fit = _trace(fig, "power-law fit")
    slope, _ = np.polyfit(np.log10(fit.x), np.log10(fit.y), 1)
    np.testing.assert_allclose(slope, -row["alpha"], rtol=1e-9)
    # normalised as the histogram: the tail's share of the unit mass, spread as (alpha-1)/xmin (x/xmin)^-alpha
    n = int((sv**2 > 0).sum())
    np.testing.assert_allclose(fit.x[0], row["xmin"], rtol=1e-12)
    np.testing.assert_allclose(fit.y[0], row["n_tail"] / n * (row["alpha"] - 1) / row["xmin"], rtol=1e-9)
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"


def test_esd_mp_edge_and_xmin_lines(esd_case):
    from app.charts import esd_loglog

    sv, row = esd_case
    fig = esd_loglog(sv, row)
    np.testing.assert_array_equal(_trace(fig, "MP edge").x, [row["mp_edge"], row["mp_edge"]])
    np.testing.assert_array_equal(_trace(fig, "xmin").x, [row["xmin"], row["xmin"]])
    # MP edge of a 400 x 100 matrix: N sigma^2 (1 + 1/sqrt(Q))^2 with sigma^2 = ||W||_F^2 / (N M)
    np.testing.assert_allclose(row["mp_edge"], (sv**2).sum() / 100 * (1 + 0.5) ** 2, rtol=1e-12)


def test_esd_histogram_is_a_log_binned_density(esd_case):
    from app.charts import esd_histogram

    sv, _ = esd_case
    edges, density, n = esd_histogram(sv)
    lam = sv**2
    assert n == len(lam)
    np.testing.assert_allclose(np.diff(np.log(edges)), np.log(edges[1] / edges[0]), rtol=1e-9)  # log-spaced
    np.testing.assert_allclose([edges[0], edges[-1]], [lam.min(), lam.max()], rtol=1e-12)
    np.testing.assert_allclose((density * np.diff(edges)).sum(), 1.0, rtol=1e-12)
    counts = np.array([((lam >= a) & (lam < b)).sum() for a, b in zip(edges[:-1], edges[1:])])
    counts[-1] += (lam == edges[-1]).sum()
    np.testing.assert_allclose(density * n * np.diff(edges), counts, rtol=1e-9)


def test_esd_without_fit_draws_histogram_and_mp_only(rng):
    from app.charts import esd_loglog

    sv = np.sort(rng.uniform(1, 2, 5))[::-1]
    fig = esd_loglog(sv, {"matrix": "m", "alpha": math.nan, "xmin": math.nan, "n_tail": 0, "mp_edge": 3.0})
    assert {t.name.split(" ")[0] for t in fig.data} == {"ESD", "MP"}


def _grid_table() -> pd.DataFrame:
    rows = []
    for layer in range(3):
        for k, mtype in enumerate(["attn.q", "mlp.up"]):
            rows.append({"matrix": f"blocks.{layer}.{mtype}", "layer": layer, "module_type": mtype,
                         "log10_kappa": 10.0 * layer + k, "alpha": 2.0 + layer + k / 10})
    rows.append({"matrix": "blocks.1.experts.w[expert=1]", "layer": 1, "module_type": "experts.w",
                 "log10_kappa": 1.0, "alpha": 3.0})
    rows.append({"matrix": "blocks.1.experts.w[expert=0]", "layer": 1, "module_type": "experts.w",
                 "log10_kappa": 2.0, "alpha": 5.0})
    rows.append({"matrix": "blocks.2.attn.k", "layer": 2, "module_type": "attn.k", "log10_kappa": math.inf,
                 "alpha": math.nan})
    rows.append({"matrix": "embed", "layer": -1, "module_type": "embed", "log10_kappa": 0.5, "alpha": 4.0})
    return pd.DataFrame(rows)


def test_heatmap_grid_layer_by_module():
    from app.charts import heatmap, outside_blocks

    table = _grid_table()
    fig = heatmap(table, "log10_kappa")
    hm = fig.data[0]
    assert list(hm.x) == ["0", "1", "2"] and list(hm.y) == ["attn.q", "mlp.up", "experts.w", "attn.k"]
    z = np.array(hm.z, dtype=float)
    np.testing.assert_array_equal(z[:2], [[0, 10, 20], [1, 11, 21]])
    np.testing.assert_array_equal(z[2], [np.nan, 1.5, np.nan])  # experts averaged: (1 + 2) / 2
    assert np.isnan(z[3, 2]) and hm.text[3][2] == "inf"  # singular matrix: blank cell labelled inf
    np.testing.assert_array_equal(hm.customdata[2], [0, 2, 0])
    assert list(outside_blocks(table)["matrix"]) == ["embed"]
    alpha = np.array(heatmap(table, "alpha").data[0].z, dtype=float)
    np.testing.assert_allclose(alpha[1], [2.1, 3.1, 4.1])


def test_heatmap_without_blocks_uses_one_column():
    from app.charts import OUTSIDE_COLUMN, heatmap

    table = _grid_table()
    fig = heatmap(table[table["layer"] < 0], "alpha")
    assert list(fig.data[0].x) == [OUTSIDE_COLUMN] and list(fig.data[0].y) == ["embed"]
    np.testing.assert_array_equal(np.array(fig.data[0].z, dtype=float), [[4.0]])


def test_heatmap_rejects_unknown_value():
    from app.charts import heatmap

    with pytest.raises(ConfigError, match="heatmap value 'kappa' is not supported; choose one of log10_kappa"):
        heatmap(_grid_table().assign(kappa=1.0), "kappa")
    with pytest.raises(ConfigError, match=r"needs the columns \['alpha'\]"):
        heatmap(_grid_table().drop(columns="alpha"), "alpha")


def test_singular_value_curve_draws_stored_values(rng):
    from app.charts import singular_value_curve

    sv = np.sort(rng.uniform(0.1, 5, 20))[::-1]
    fig = singular_value_curve(sv)
    np.testing.assert_allclose(fig.data[0].y, sv, rtol=1e-12)
    np.testing.assert_array_equal(fig.data[0].x, np.arange(1, 21))
