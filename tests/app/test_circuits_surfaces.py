"""Circuits surfaces: the ``app.api`` re-exports, ``lenslab circuits`` (a subprocess, and in-process for the JSON
and the errors) and the Attention circuits page (AppTest), each checked against the stored result, which
tests/analysis/circuits checks against dense float64 products."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from _support import figure_array, run_cli

DASHBOARD = str(Path(__file__).resolve().parents[2] / "app" / "dashboard.py")
TIMEOUT = 120
N_LAYERS, N_HEADS = 2, 4  # make_tiny_llama's


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    from _tiny_llama import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("circuits-llama") / "llama")


def test_api_re_exports_the_pipeline_functions():
    from analysis.circuits import pipeline
    from app import api

    for name in ("circuits", "stored_circuits", "load_circuits", "find_circuits"):
        assert getattr(api, name) is getattr(pipeline, name)


# ------------------------------------------------------------------------------------------------ CLI
def _cells(stdout: str) -> list[list[str]]:
    """The body rows of a rich table: cells of each line that starts with │."""
    lines = [line for line in stdout.splitlines() if line.startswith("│")]
    return [[c.strip() for c in line.strip("│").split("│")] for line in lines]


def test_cli_prints_a_layer_by_head_table_of_the_stored_metric(llama, tmp_path):
    from app import api

    store = tmp_path / "store"
    out = run_cli("circuits", str(llama), "--circuit", "OV", "--metric", "stable_rank", "--device", "cpu",
                  store=store)
    cs = api.find_circuits(api.stored_circuits(store=store)[0].fingerprint, store)
    grid = cs.grid("stable_rank", "OV")
    assert f"stable_rank of the OV circuits of {llama}: {N_LAYERS} layers x {N_HEADS} heads" in " ".join(
        out.stdout.split())
    assert _cells(out.stdout) == [[str(layer)] + [f"{v:.4g}" for v in row] for layer, row in grid.iterrows()]
    again = run_cli("circuits", str(llama), store=store)  # default QK kappa, served from the store
    assert _cells(again.stdout) == [[str(layer)] + [f"{v:.4g}" for v in row]
                                    for layer, row in cs.grid("kappa", "QK").iterrows()]
    assert len(api.stored_circuits(store=store)) == 1


def _main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    from app import cli

    monkeypatch.setattr(sys, "argv", ["lenslab", *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def test_cli_json_rows_are_the_stored_rows_of_the_circuit(llama, tmp_path, monkeypatch, capsys):
    from app import api

    store = tmp_path / "store"
    code, out, _ = _main(monkeypatch, capsys, "circuits", str(llama), "--json", "--circuit", "qk", "--store",
                         str(store))
    assert code == 0
    rows = json.loads(out)
    cs = api.load_circuits(api.stored_circuits(store=store)[0].key, store)
    want = cs.table[cs.table["circuit"] == "QK"].to_dict(orient="records")
    assert len(rows) == N_LAYERS * N_HEADS and [r["circuit"] for r in rows] == ["QK"] * len(rows)
    for got, ref in zip(rows, want):
        assert got.keys() == ref.keys()
        for k, v in ref.items():
            assert got[k] == ("inf" if isinstance(v, float) and math.isinf(v) else v), k


@pytest.mark.parametrize("args, message", [
    (("--circuit", "VO"), "unknown circuit 'VO'; choose one of QK, OV"),
    (("--metric", "alpha"), "unknown metric 'alpha'; choose one of kappa, stable_rank"),
    (("--device", "tpu"), "unknown device 'tpu'"),
])
def test_cli_bad_options_exit_2_with_one_line(tmp_path, monkeypatch, capsys, args, message):
    code, out, err = _main(monkeypatch, capsys, "circuits", "minilm", *args, "--store", str(tmp_path / "s"))
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("error: ") and message in lines[-1], err
    assert "Traceback" not in err and not list((tmp_path / "s").glob("blobs/*/*"))


# ------------------------------------------------------------------------------------------- dashboard
def open_page() -> AppTest:
    at = AppTest.from_file(DASHBOARD, default_timeout=TIMEOUT).run()
    at.switch_page("views/circuits.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert [t.value for t in at.title] == ["Attention circuits"]
    return at


def heatmaps(at: AppTest) -> list[dict]:
    return [t for el in at.get("plotly_chart") for t in json.loads(el.proto.spec)["data"] if t["type"] == "heatmap"]


def test_page_empty_store_says_which_command_fills_it(dashboard_store):
    at = open_page()
    assert any("lenslab circuits minilm" in i.value for i in at.info)
    assert not at.get("plotly_chart")
    assert at.text_input(key="circuits_source").value == "minilm"


def test_page_model_without_circuits_says_how_to_compute_them(dashboard_store):
    from analysis.store import Result

    dashboard_store.put("f" * 32, "other", {}, "0", Result(meta={"note": "not circuits"}))
    dashboard_store.register_model("f" * 32, "some-model", "safetensors")
    at = open_page()
    assert any("No circuit spectra stored for some-model yet. Run `lenslab circuits some-model`" in i.value
               for i in at.info)
    assert not at.get("plotly_chart")


def test_page_heatmap_has_one_cell_per_layer_and_head(dashboard_store, llama):
    from app import api

    cs = api.circuits(llama, store=dashboard_store)
    at = open_page()
    (heat,) = heatmaps(at)
    z = figure_array(heat["z"])
    assert z.shape == (N_LAYERS, N_HEADS) and heat["x"] == [f"h{h}" for h in range(N_HEADS)]
    np.testing.assert_allclose(z, np.log10(cs.grid("kappa", "QK").to_numpy()), rtol=1e-12)  # log10 κ by default
    at.radio(key="circuits_circuit").set_value("OV").run()
    at.selectbox(key="circuits_metric").set_value("effective_rank").run()
    assert not at.exception
    (heat,) = heatmaps(at)
    np.testing.assert_allclose(figure_array(heat["z"]), cs.grid("effective_rank", "OV").to_numpy(), rtol=1e-12)
    (table,) = [df.value for df in at.dataframe]
    assert len(table) == N_LAYERS * N_HEADS and set(table["circuit"]) == {"OV"}
    assert list(table["effective_rank"]) == sorted(table["effective_rank"], reverse=True)


def test_page_form_computes_and_shows_the_model(dashboard_store, llama):
    at = open_page()
    at.text_input(key="circuits_source").input(str(llama))
    at.button(key="circuits_compute").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("circuits of" in s.value and "done in" in s.value for s in at.success)
    assert [e.analysis for e in dashboard_store.list()] == ["circuits"]
    (heat,) = heatmaps(at)
    assert figure_array(heat["z"]).shape == (N_LAYERS, N_HEADS)


@pytest.mark.parametrize("target", ["model", "missing"])
def test_page_form_refuses_a_path_outside_the_allowed_root(dashboard_store, tmp_path, monkeypatch, target):
    from _refusal import check_form_refuses

    check_form_refuses(open_page, field="circuits_source", button="Compute circuits", store=dashboard_store,
                       tmp_path=tmp_path, monkeypatch=monkeypatch, target=target)
