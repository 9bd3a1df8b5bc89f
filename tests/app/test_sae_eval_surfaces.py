"""Surfaces of the offline SAE evaluation: ``lenslab sae groundtruth`` / ``sae probe`` and the Compare SAEs page.

Independent truths: the API's stored results for the CLI's JSON, a brute-force dominance check for the Pareto
frontier, and the planted table for the page's figures.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from _support import figure_array, open_sae_compare

from app.charts_sae_compare import pareto_front

SMALL = ["--tokens", str(8 * 4096), "--n-train", "8000", "--json"]


def test_pareto_front_is_the_set_of_non_dominated_points(rng):
    x, y = rng.integers(0, 12, 60).astype(float), rng.standard_normal(60)
    x[3] = np.nan
    for minimise in (True, False):
        s = y if minimise else -y
        want = {i for i in range(60) if np.isfinite(x[i]) and not any(
            np.isfinite(x[j]) and x[j] <= x[i] and s[j] <= s[i] and (x[j] < x[i] or s[j] < s[i]) for j in range(60))}
        got = pareto_front(x, y, minimise)
        assert set(got.tolist()) == want and list(x[got]) == sorted(x[got])


def test_cli_groundtruth_runs_each_default_and_prints_the_ranking(monkeypatch):
    """No options: the CLI leaves k and l1 to each architecture's default (not one l1 for relu and gated) and
    prints the rows in rank order with each run's setting."""
    from app import api
    from app.cli import app

    seen = {}
    planted = pd.DataFrame({"architecture": ["relu", "topk", "jumprelu"], "k": [np.nan, 7.0, np.nan],
                            "l1_coefficient": [1.0, None, None], "l0_coefficient": [None, None, 0.25],
                            "l0": [7.5, 7.0, 6.6], "nmse": [0.34, 0.16, 0.2], "mcc": [0.926, 0.947, 0.95],
                            "rank": [3, 2, 1]})

    def fake_table(architectures=None, **settings):
        seen.update(settings, architectures=architectures)
        return planted

    monkeypatch.setattr(api, "sae_groundtruth_table", fake_table)
    res = CliRunner().invoke(app, ["sae", "groundtruth"], env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    assert seen["architectures"] is None and seen["k"] is None and seen["l1_coefficient"] is None
    lines = [ln for ln in res.stdout.splitlines() if any(a in ln for a in ("relu", "topk", "jumprelu"))]
    assert [next(a for a in ("jumprelu", "topk", "relu") if a in ln) for ln in lines] == ["jumprelu", "topk", "relu"]
    assert "l0 = 0.25" in lines[0] and "k = 7" in lines[1] and "l1 = 1" in lines[2]


def test_cli_groundtruth_json_is_the_stored_result(tmp_path, monkeypatch, capsys):
    from app import api
    from app.cli import app

    store = tmp_path / "store"
    res = CliRunner().invoke(app, ["sae", "groundtruth", "-a", "topk", "--store", str(store), *SMALL])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    stored = api.find_sae_groundtruth("topk", n_tokens=8 * 4096, n_train=8000, store=store)
    assert [r["architecture"] for r in rows] == ["topk"]
    assert rows[0]["mcc"] == pytest.approx(stored.metrics["mcc"]) and rows[0]["l0"] == pytest.approx(
        stored.metrics["l0"])
    from app import cli

    monkeypatch.setattr(sys, "argv", ["lenslab", "sae", "groundtruth", "-a", "nope", "--store", str(store), *SMALL])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # as the console script runs it: a typed error exits 2
        cli.main()
    assert exit_info.value.code == 2 and "architecture 'nope' is unknown" in capsys.readouterr().err


def test_page_empty_store_says_how_to_start(tmp_path, monkeypatch, streamlit_caches_cleared):
    at = open_sae_compare(monkeypatch, tmp_path / "empty")
    text = " ".join(i.value for i in at.info)
    assert "lenslab sae groundtruth" in text and "lenslab sae eval minilm" in text and not at.get("plotly_chart")


def test_page_plots_the_stored_runs_and_the_model_saes(tmp_path, monkeypatch, streamlit_caches_cleared):
    from app import api
    from sae.synthetic import SyntheticSpec

    store = tmp_path / "store"
    spec = SyntheticSpec(n_features=32, d_in=16, mean_l0=3.0, n_parents=2, n_children=2, n_correlated_pairs=2)
    api.sae_groundtruth_table(spec=spec, n_train=3000, n_eval=1000, n_tokens=30 * 256, batch_size=256, store=store,
                              device="cpu")
    saes = pd.DataFrame({"key": ["a" * 64, "b" * 64, "c" * 64], "name": ["s1", "s2", "s3"],
                         "model": ["tiny"] * 3, "layer": [1, 1, 1], "architecture": ["topk", "relu", "topk"],
                         "l0": [8.0, 20.0, 30.0], "nmse": [0.3, 0.2, 0.25], "explained_variance_saelens": [.7, .8, .75],
                         "loss_recovered": [0.5, 0.7, 0.6], "dead_fraction": [0.0, 0.1, 0.0]})
    at = open_sae_compare(monkeypatch, store, saes)
    assert not at.error, [e.value for e in at.error]
    import json as _json

    figs = {(_json.loads(el.proto.spec)["layout"]["title"]["text"], i): _json.loads(el.proto.spec)
            for i, el in enumerate(at.get("plotly_chart"))}
    titles = [t for t, _ in figs]
    assert titles.count("L0 vs NMSE") == 2 and "L0 vs loss recovered" in titles and "L0 vs MCC" in titles
    model_nmse = next(f for (t, i), f in sorted(figs.items(), key=lambda kv: kv[0][1]) if t == "L0 vs NMSE")
    frontier = next(tr for tr in model_nmse["data"] if tr["name"] == "Pareto frontier")
    assert figure_array(frontier["x"]).tolist() == [8.0, 20.0]  # s3 (L0 30, NMSE 0.25) is dominated by s2
    gt = [df.value for df in at.dataframe if "mcc" in df.value.columns][0]
    rows = api.groundtruth_rows(store=store)
    assert sorted(gt["architecture"]) == sorted(rows["architecture"])
    assert sorted(gt["mcc"]) == pytest.approx(sorted(rows["mcc"]))


def test_cli_probe_json_is_the_stored_result(tmp_path, monkeypatch):
    from _tiny_llama import make_tiny_llama

    from analysis import corpus
    from app import api
    from app.cli import app

    monkeypatch.setenv("LENSLAB_ACTIVATIONS", str(tmp_path / "acts"))
    words = ["tensor", "array", "frame", "model", "value", "index", "shape", "file"]
    docs = [corpus.DocText(f"Return the {a} of the {b}.", pkg, f"{pkg}.f{i}")
            for i, (a, b) in enumerate(zip(words * 2, words[::-1] * 2)) for pkg in ("numpy", "pandas")]
    monkeypatch.setattr(corpus, "docstring_corpus", lambda *a, **k: docs)  # walking the real packages takes ~10 s
    llama, store = str(make_tiny_llama(tmp_path / "llama")), tmp_path / "store"
    api.sae_train(llama, layer=0, texts=[f"the {a} of a {b}" for a in words for b in words], d_sae=32, k=4,
                  n_tokens=10 * 128, batch_size=128, store=store, device="cpu")
    res = CliRunner().invoke(app, ["sae", "probe", llama, "--layer", "0", "--task", "package", "--k", "1", "--k", "3",
                                   "--per-class", "8", "--store", str(store), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    stored = api.find_sae_probe(out["key"], task="package", ks=(1, 3), per_class=8, store=store)
    assert out["summary"] == pytest.approx(stored.summary) and set(out["summary"]) == {"sae k=1", "sae k=3", "raw"}
    assert len(out["rows"]) == 3  # two packages: one task, three probes
    rows = api.probe_rows(store=store)  # the index row the Compare page reads
    assert rows["sae_key"].tolist() == [out["key"]] and rows["task"].tolist() == ["package"]
    assert {c: rows.iloc[0][c] for c in stored.summary} == pytest.approx(stored.summary)


def test_page_shows_probing_and_kl_of_the_chosen_site(tmp_path, monkeypatch, streamlit_caches_cleared):
    """The probe plot's frontier and table come from the planted probe rows of the chosen model's SAEs only."""
    from app import api

    saes = pd.DataFrame({"key": ["a" * 64, "b" * 64, "c" * 64, "d" * 64], "name": ["s1", "s2", "s3", "other"],
                         "model": ["tiny"] * 3 + ["else"], "layer": [1, 1, 1, 1],
                         "architecture": ["topk", "relu", "gated", "topk"], "l0": [8.0, 20.0, 30.0, 5.0],
                         "nmse": [0.3, 0.2, 0.25, 0.1], "explained_variance_saelens": [.7, .8, .75, .9],
                         "loss_recovered": [0.5, 0.7, 0.6, 0.9], "kl_recovered": [0.4, 0.6, 0.65, 0.9],
                         "dead_fraction": [0.0, 0.1, 0.0, 0.0]})
    probes = pd.DataFrame({"key": ["p1", "p2", "p3", "p4"], "sae_key": ["a" * 64, "b" * 64, "c" * 64, "d" * 64],
                           "task": ["code"] * 4, "n_texts": [40] * 4, "sae k=1": [0.7, 0.65, 0.9, 0.99],
                           "sae k=5": [0.8, 0.85, 0.95, 0.99], "raw": [0.97] * 4})
    monkeypatch.setattr(api, "probe_rows", lambda store=None: probes)
    at = open_sae_compare(monkeypatch, tmp_path / "store", saes)
    at.selectbox(key="cmp_model").set_value("tiny").run()
    assert not at.error, [e.value for e in at.error]
    figs = [json.loads(el.proto.spec) for el in at.get("plotly_chart")]
    by_title = {f["layout"]["title"]["text"]: f for f in figs}
    assert {"L0 vs KL recovered", "L0 vs probe accuracy (k=1)", "L0 vs probe accuracy (k=5)"} <= set(by_title)
    frontier = next(t for t in by_title["L0 vs probe accuracy (k=1)"]["data"] if t["name"] == "Pareto frontier")
    assert figure_array(frontier["x"]).tolist() == [8.0, 30.0]  # s2 (L0 20, 0.65) is dominated by s1 (8, 0.7)
    table = next(df.value for df in at.dataframe if "sae k=1" in df.value.columns)
    assert table["name"].tolist() == ["s1", "s2", "s3"] and table["sae k=5"].tolist() == [0.8, 0.85, 0.95]
