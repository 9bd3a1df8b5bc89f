"""Surfaces of stored transcoders: ``lenslab sae transcoder`` stores and prints the key, ``lenslab sae
transcoders`` and ``lenslab store ls`` list it, and the Compare SAEs page draws the transcoders of a block
beside the SAEs at its mlp_out site. Independent truths: the API's stored entries and table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from _support import figure_array, open_sae_compare
from _tiny_llama import TOY_HELD as HELD
from _tiny_llama import TOY_TEXTS as TEXTS
from _tiny_llama import make_tiny_llama

SMALL = {"k": 4, "expansion": 2, "n_tokens": 10 * 128, "batch_size": 128, "texts": TEXTS, "eval_texts": HELD,
         "loss_docs": 8, "device": "cpu"}


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("llama") / "model")


def test_cli_stores_prints_the_key_and_lists_it(llama, tmp_path):
    from app import api
    from app.cli import app

    store, texts = tmp_path / "store", tmp_path / "t.txt"
    texts.write_text("\n".join(TEXTS))
    args = ["sae", "transcoder", str(llama), "--layer", "1", "--k", "4", "--expansion", "2", "--tokens", "1280",
            "--batch-size", "128", "--texts", str(texts), "--no-loss", "--store", str(store), "--device", "cpu"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, (res.output, repr(res.exception))
    (entry,) = api.stored_sae_transcoders(store=store)
    assert f"stored as {entry.key}" in res.stdout
    again = CliRunner().invoke(app, [*args, "--json"])  # served from the store: the same entry
    assert again.exit_code == 0 and json.loads(again.stdout)["key"] == entry.key
    assert [e.key for e in api.stored_sae_transcoders(store=store)] == [entry.key]
    listed = CliRunner().invoke(app, ["sae", "transcoders", "--store", str(store), "--json"])
    assert listed.exit_code == 0, listed.output
    (row,) = json.loads(listed.stdout)
    assert row["key"] == entry.key and row["kind"] == "transcoder" and row["layer"] == 1 and row["masked"] is False
    assert row["nmse"] == pytest.approx(entry.meta["metrics"]["nmse"]) and row["loss_recovered"] is None
    table = CliRunner().invoke(app, ["sae", "transcoders", "--store", str(store)])
    assert table.exit_code == 0 and entry.key[:12] in table.stdout and "1 stored transcoder(s)" in table.stdout
    ls = CliRunner().invoke(app, ["store", "ls", "--store", str(store), "--json"])
    assert any(e["key"] == entry.key and e["analysis"] == "sae-transcoder" for e in json.loads(ls.stdout))


def test_cli_refuses_mask_on_a_causal_lm(llama, tmp_path, capsys):
    from app import cli

    with pytest.raises(SystemExit) as exit_info:  # as the console script runs it: a typed error exits 2
        cli.main(["sae", "transcoder", str(llama), "--mask", "--store", str(tmp_path / "s")])
    assert exit_info.value.code == 2 and "is not a masked LM" in capsys.readouterr().err


def _transcoder_table(at) -> pd.DataFrame:
    (table,) = [df.value for df in at.dataframe if "nmse_mask" in df.value.columns]
    return table


def _figures(at) -> dict:
    return {json.loads(el.proto.spec)["layout"]["title"]["text"]: json.loads(el.proto.spec)
            for el in at.get("plotly_chart")[:2]}


def test_compare_page_draws_the_transcoders_beside_the_mlp_out_saes(llama, tmp_path, monkeypatch,
                                                                     streamlit_caches_cleared):
    from app import api

    store = tmp_path / "store"
    for skip in (False, True):
        api.sae_transcoder(str(llama), 1, skip=skip, store=store, **SMALL)
    tcs = api.sae_transcoders(store=store)
    model = str(tcs["model"].iloc[0])
    saes = pd.DataFrame({"key": [c * 64 for c in "abc"], "name": ["m1", "m2", "z1"], "model": [model] * 3,
                         "layer": [1, 1, 1], "site": ["mlp_out", "mlp_out", "hook_z"],
                         "architecture": ["topk", "relu", "topk"], "l0": [4.0, 9.0, 4.0], "nmse": [0.4, 0.2, 0.3],
                         "explained_variance_saelens": [0.6, 0.8, 0.7], "loss_recovered": [0.3, 0.5, np.nan],
                         "dead_fraction": [0.0] * 3})
    at = open_sae_compare(monkeypatch, store, saes)
    box = at.selectbox(key="cmp_layer")
    assert box.options == ["blocks.1.attn.hook_z", "layer 1 mlp_out"]
    assert not any(tr["name"].endswith("transcoder") for f in _figures(at).values() for tr in f["data"])
    assert any("stored at block(s) [1]" in c.value for c in at.caption)  # at hook_z: where to find them
    box.set_value((1, "mlp_out")).run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("2 evaluated SAE(s)" in c.value and "2 transcoder(s) of block 1" in c.value for c in at.caption)
    figs = _figures(at)
    for title, col in (("L0 vs NMSE", "nmse"), ("L0 vs loss recovered", "loss_recovered")):
        traces = {tr["name"]: tr for tr in figs[title]["data"]}
        for kind, label in (("transcoder", "transcoder"), ("skip_transcoder", "skip transcoder")):
            row = tcs[tcs["kind"] == kind].iloc[0]
            tr = traces[label]
            assert tr["marker"]["symbol"] == "diamond" and "transcoder" in tr["text"][0]
            np.testing.assert_allclose(figure_array(tr["x"]), [row["l0"]])
            np.testing.assert_allclose(figure_array(tr["y"]), [row[col]])
        frontier = figure_array(traces["Pareto frontier"]["x"]).tolist()
        assert frontier == [4.0, 9.0]  # the SAEs' frontier: transcoders are drawn beside it, not in it
    shown = _transcoder_table(at)
    assert sorted(shown["name"]) == sorted(tcs["name"]) and list(shown["nmse"]) == pytest.approx(
        list(tcs.set_index("name").loc[shown["name"], "nmse"]))


def test_compare_page_with_transcoders_and_no_sae(llama, tmp_path, monkeypatch, streamlit_caches_cleared):
    from app import api

    store = tmp_path / "store"
    api.sae_transcoder(str(llama), 0, store=store, **{**SMALL, "loss": False})
    at = open_sae_compare(monkeypatch, store)
    assert at.selectbox(key="cmp_layer").options == ["layer 0 mlp_out"]
    assert any("0 evaluated SAE(s)" in c.value and "1 transcoder(s) of block 0" in c.value for c in at.caption)
    assert "L0 vs NMSE" in _figures(at) and len(_transcoder_table(at)) == 1
