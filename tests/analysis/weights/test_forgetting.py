"""The docstring corpus and the KappaTune forgetting experiment (analysis.corpus, analysis.weights.forgetting)."""

from __future__ import annotations

import importlib
import inspect
import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from analysis.models import encoder as enc
from analysis.weights import forgetting as fg
from analysis.corpus import PACKAGE_MODULES, DocText, docstring_corpus, normalise, split
from analysis.errors import ConfigError, ShapeError
from analysis.weights.selection import select_tensors

TINY = dict(task_packages=("json", "collections"), heldout_packages=("os", "pathlib"), per_class=12,
            heldout_per_package=8, steps=3, seeds=1, batch_size=4, max_tokens=16)
_CORPUS_SCRIPT = ("import json, sys; from analysis.corpus import docstring_corpus as c; "
                  "json.dump([[d.text, d.package, d.qualname] for d in c(*{args})], sys.stdout)")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a shared 2-core machine two OpenMP threads can make each small
    matmul 10x slower while another process holds a core. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- corpus -----------------------------------------------------------------------------------
def _rows(items: list[DocText]) -> list[list[str]]:
    return [[d.text, d.package, d.qualname] for d in items]


def test_corpus_is_identical_twice_and_in_a_fresh_process():
    """The default corpus is the same list in this process (which imported transformers, pytest,
    ...) and in a fresh interpreter that imports nothing else first."""
    first = docstring_corpus()
    assert _rows(first) == _rows(docstring_corpus())
    out = subprocess.run([sys.executable, "-c", _CORPUS_SCRIPT.format(args="()")], capture_output=True,
                         text=True, check=True, timeout=300)
    assert json.loads(out.stdout) == _rows(first)
    assert len(first) > 1000 and {d.package for d in first} == set(PACKAGE_MODULES)


def test_corpus_labels_and_texts_match_their_objects():
    """Each item's qualname resolves (by import + getattr) to an object of that package whose
    docstring, normalised, is the text; texts are unique; lengths respect the limits."""
    items = docstring_corpus(("numpy", "json", "collections", "pathlib"), min_chars=30, max_chars=200)
    assert len({d.text for d in items}) == len(items)
    assert all(30 <= len(d.text) <= 200 for d in items)
    rng = np.random.default_rng(0)
    for i in rng.choice(len(items), size=80, replace=False):
        d = items[int(i)]
        mod = next(m for m in sorted(PACKAGE_MODULES[d.package], key=len, reverse=True)
                   if d.qualname.startswith(m + "."))
        obj = importlib.import_module(mod)
        for part in d.qualname[len(mod) + 1:].split("."):
            obj = inspect.getattr_static(obj, part)
        if isinstance(obj, (classmethod, staticmethod)):
            obj = obj.__func__
        assert normalise(inspect.getdoc(obj), 200) == d.text, d.qualname
        owner = getattr(obj, "__module__", None) or getattr(getattr(obj, "fget", None), "__module__", None)
        if isinstance(owner, str) and "." not in d.qualname[len(mod) + 1:]:
            assert owner.split(".")[0] == PACKAGE_MODULES[d.package][0].split(".")[0], d.qualname


def test_corpus_per_package_subsample_is_seeded_and_ordered():
    full = docstring_corpus(("json", "collections", "os"))
    a = docstring_corpus(("json", "collections", "os"), per_package=5, seed=1)
    assert a == docstring_corpus(("json", "collections", "os"), per_package=5, seed=1)
    assert a != docstring_corpus(("json", "collections", "os"), per_package=5, seed=2)
    counts = {p: sum(d.package == p for d in a) for p in ("json", "collections", "os")}
    assert counts == {p: min(5, sum(d.package == p for d in full)) for p in counts}
    pos = [full.index(d) for d in a]
    assert pos == sorted(pos)  # walk order kept


def test_normalise_cuts_at_a_word_boundary():
    assert normalise("a  b\n\tc", 10) == "a b c"
    assert normalise("alpha beta gamma", 12) == "alpha beta"
    assert normalise("abcdefghij", 4) == "abcd"


@pytest.mark.parametrize("fractions", [(0.5, 0.5), (0.7, 0.2, 0.1), (0.25,)], ids=str)
def test_split_is_a_seeded_partition(fractions):
    items = list(range(103))
    parts = split(items, fractions, seed=3)
    flat = [x for p in parts for x in p]
    assert len(flat) == len(set(flat))
    cum = np.floor(np.cumsum([0, *fractions]) * 103 + 1e-9).astype(int)
    assert [len(p) for p in parts] == list(np.diff(cum))
    if abs(sum(fractions) - 1) < 1e-12:
        assert sorted(flat) == items
    assert parts == split(items, fractions, seed=3) and parts != split(items, fractions, seed=4)


def test_split_stratified_keeps_group_shares():
    items = [("a", i) for i in range(40)] + [("b", i) for i in range(20)]
    train, test = split(items, (0.75, 0.25), seed=0, by=lambda t: t[0])
    assert sum(t[0] == "a" for t in test) == 10 and sum(t[0] == "b" for t in test) == 5
    assert not set(train) & set(test)


def test_corpus_and_split_errors():
    with pytest.raises(ConfigError, match="unknown corpus package 'nope'"):
        docstring_corpus(("nope",))
    with pytest.raises(ConfigError, match="min_chars <= max_chars"):
        docstring_corpus(("json",), min_chars=50, max_chars=10)
    with pytest.raises(ConfigError, match="per_package=0 must be >= 1"):
        docstring_corpus(("json",), per_package=0)
    with pytest.raises(ConfigError, match="must be positive and sum to at most 1"):
        split([1, 2, 3], (0.8, 0.4))


# -- metrics ----------------------------------------------------------------------------------
def test_cosine_drift_matches_a_hand_computation(rng):
    a, b = rng.standard_normal((7, 5)), rng.standard_normal((7, 5))
    want = [1 - sum(a[i, k] * b[i, k] for k in range(5)) / (np.sqrt((a[i] ** 2).sum()) * np.sqrt((b[i] ** 2).sum()))
            for i in range(7)]
    np.testing.assert_allclose(fg.cosine_drift(a, b), want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(fg.cosine_drift(a, 3.0 * a), 0.0, atol=1e-12)  # scale-free
    np.testing.assert_allclose(fg.cosine_drift(a, -a), 2.0, atol=1e-12)
    with pytest.raises(ShapeError, match=r"same shape"):
        fg.cosine_drift(a, b[:3])


def test_similarity_spearman_matches_ranked_pearson(rng):
    from scipy.stats import rankdata

    a = rng.standard_normal((9, 4))
    b = a + 0.5 * rng.standard_normal((9, 4))
    an, bn = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (a, b))
    iu = np.triu_indices(9, 1)
    want = np.corrcoef(rankdata((an @ an.T)[iu]), rankdata((bn @ bn.T)[iu]))[0, 1]
    assert fg.similarity_spearman(a, b) == pytest.approx(want, abs=1e-12)
    q, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    assert fg.similarity_spearman(a, a @ q) == pytest.approx(1.0, abs=1e-12)  # rotation keeps the structure
    assert fg.cosine_drift(a, a @ q).mean() > 0.1  # ...while every embedding moves


# -- the encoder ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def encoder(minilm):
    return enc.load_encoder(minilm.hf_dir)


@pytest.fixture(scope="module")
def spectra_table(minilm):
    from analysis.weights.spectra import weight_spectra

    return weight_spectra(minilm.iter_tensors()).table


@pytest.fixture(scope="module")
def tiny_data():
    return fg.build_task_data(fg.ForgettingConfig(**TINY))


def test_untouched_model_has_zero_drift_and_unit_spearman(encoder, tiny_data):
    model, tok = encoder
    ids = enc.tokenize(tok, [d.text for d in tiny_data.heldout], 16)
    e1 = enc.sentence_embeddings(model, ids)
    e2 = enc.sentence_embeddings(fg.train_arm(model, "head_only", 0, ids[:8], np.zeros(8, dtype=np.int64), 2,
                                             fg.ForgettingConfig(**TINY)).model, ids)
    np.testing.assert_array_equal(e1, e2)
    assert fg.cosine_drift(e1, e2).max() <= 1e-7
    assert fg.similarity_spearman(e1, e2) == pytest.approx(1.0, abs=1e-12)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arm", ["lowest_kappa", "random"])
def test_only_selected_tensors_change(arm, encoder, spectra_table, tiny_data):
    model, tok = encoder
    cfg = fg.ForgettingConfig(**TINY)
    base_state = _state(model)
    ids = enc.tokenize(tok, [d.text for d in tiny_data.train], cfg.max_tokens)
    out = fg.train_arm(model, arm, 1, ids, tiny_data.labels(tiny_data.train), 2, cfg, spectra_table=spectra_table)
    want = set(select_tensors(spectra_table, "20%", ranker=arm, exclude=fg.DEFAULT_EXCLUDE, seed=1).params)
    assert set(out.trained) == want and len(want) == 7
    after = out.model.state_dict()
    for name, before in base_state.items():
        if name in want:
            assert not torch.equal(after[name], before), f"{name} was selected but did not change"
        else:
            assert torch.equal(after[name], before), f"{name} was frozen but changed"
    for name, value in model.state_dict().items():  # the base model is never modified
        assert torch.equal(value, base_state[name])
    assert np.isfinite(out.losses).all()


def test_full_arm_changes_every_parameter(encoder, tiny_data):
    model, tok = encoder
    cfg = fg.ForgettingConfig(**TINY)
    ids = enc.tokenize(tok, [d.text for d in tiny_data.train], cfg.max_tokens)
    out = fg.train_arm(model, "full", 0, ids, tiny_data.labels(tiny_data.train), 2, cfg)
    names = [n for n, _ in model.named_parameters()]
    assert list(out.trained) == names
    before = dict(model.named_parameters())
    unchanged = [n for n, p in out.model.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == []
    assert sorted(fg.changed_tensors(model, out.model)) == sorted(names)


def test_experiment_is_deterministic_and_consistent(encoder, spectra_table, tiny_data):
    model, tok = encoder
    cfg = fg.ForgettingConfig(**TINY)
    calls = []
    res = fg.kappatune_forgetting(model, tok, spectra_table, cfg, data=tiny_data,
                                  progress=lambda d, t, label: calls.append((d, t)))
    again = fg.kappatune_forgetting(model, tok, spectra_table, cfg, data=tiny_data)
    cols = [c for c in res.runs.columns if c != "seconds"]
    assert res.runs[cols].equals(again.runs[cols])
    runs = res.runs.set_index("arm")
    assert list(runs.index) == list(fg.ARMS)
    assert (runs["n_changed"] == runs["n_tensors"]).all()  # exactly the trained tensors moved
    assert runs.loc["head_only", "drift"] == pytest.approx(0.0, abs=1e-7)
    assert runs.loc["head_only", "spearman"] == pytest.approx(1.0, abs=1e-12)
    assert (runs.drop(index="head_only")["drift"] > 0).all()
    assert runs["accuracy"].between(0, 1).all() and runs["spearman"].between(-1, 1).all()
    assert calls[-1][0] == calls[-1][1] == len(fg.ARMS) * (cfg.steps + 1) + 1
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert list(res.summary["arm"]) == list(fg.ARMS) and res.summary["n_seeds"].eq(1).all()


def test_threads_setting_is_restored(encoder, tiny_data):
    model, tok = encoder
    seen = []
    cfg = fg.ForgettingConfig(**{**TINY, "steps": 1}, arms=("head_only",), threads=2)
    res = fg.kappatune_forgetting(model, tok, None, cfg, data=tiny_data,
                                  progress=lambda *a: seen.append(torch.get_num_threads()))
    assert set(seen) == {2} and res.meta["threads"] == 2
    assert torch.get_num_threads() == 1  # the module fixture's setting is back


def test_build_task_data_is_disjoint_and_labelled(tiny_data):
    texts = lambda xs: {d.text for d in xs}  # noqa: E731
    assert not texts(tiny_data.train) & texts(tiny_data.test)
    assert not (texts(tiny_data.train) | texts(tiny_data.test)) & texts(tiny_data.heldout)
    assert {d.package for d in tiny_data.heldout} <= {"os", "pathlib"}
    y = tiny_data.labels(tiny_data.train)
    assert [tiny_data.classes[i] for i in y] == [d.package for d in tiny_data.train]


def test_summary_mean_and_std():
    import pandas as pd

    runs = pd.DataFrame({"arm": ["a", "a", "b"], "seed": [0, 1, 0], "accuracy": [0.5, 0.7, 0.9],
                         "drift": [0.1, 0.3, 0.0], "spearman": [0.9, 0.7, 1.0], "n_params": [3, 3, 0],
                         "n_tensors": [1, 1, 0], "seconds": [1.0, 1.0, 1.0]})
    s = fg.summarise(runs).set_index("arm")
    assert s.loc["a", "accuracy_mean"] == pytest.approx(0.6)
    assert s.loc["a", "drift_std"] == pytest.approx(np.std([0.1, 0.3], ddof=1))
    assert np.isnan(s.loc["b", "drift_std"]) and s.loc["b", "n_seeds"] == 1


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"steps": 0}, r"steps=0 must be an integer >= 1"),
    ({"arms": ("lowest_kappa", "best")}, r"arms \['lowest_kappa', 'best'\] must be distinct names"),
    ({"task_packages": ("json", "os"), "heldout_packages": ("os",)}, r"\['os'\] are both task and held-out"),
    ({"budget": "120%"}, r"outside \(0, 1\]"),
    ({"lr": float("nan")}, r"lr=nan must be a finite number > 0"),
    ({"test_fraction": 1.0}, r"test_fraction=1.0 must lie in \(0, 1\)"),
    ({"threads": -1}, r"threads=-1 must be an integer >= 0"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        fg.ForgettingConfig(**kwargs)


# -- API and CLI ------------------------------------------------------------------------------
def test_api_caches_and_ctrl_c_stores_nothing(store):
    from app import api

    def interrupt(done, total, label):
        if "step 2" in label:
            raise KeyboardInterrupt

    small = {k: v for k, v in TINY.items() if k not in ("steps", "seeds")}
    with pytest.raises(KeyboardInterrupt):
        api.experiment_forgetting("minilm", seeds=1, steps=3, store=store, progress=interrupt, **small)
    assert store.list(analysis=fg.ANALYSIS) == []
    res = api.experiment_forgetting("minilm", seeds=1, steps=3, store=store, arms=("random", "head_only"), **small)
    entries = store.list(analysis=fg.ANALYSIS)
    assert len(entries) == 1 and entries[0].params["arms"] == ["random", "head_only"]
    t0 = time.perf_counter()
    hit = api.experiment_forgetting("minilm", seeds=1, steps=3, store=store, arms=("random", "head_only"), **small)
    assert time.perf_counter() - t0 < 5
    assert hit.runs.equals(res.runs)
    stored = api.stored_experiments(store=store)
    assert len(stored) == 1 and api.load_experiment(stored[0].key, store=store).summary.equals(res.summary)
    with pytest.raises(ConfigError, match=r"unknown experiment setting\(s\) \['speed'\]"):
        api.experiment_forgetting("minilm", store=store, speed=2)


def test_cli_experiment_forgetting(tmp_path):
    from typer.testing import CliRunner

    from app.cli import app

    args = ["experiment", "forgetting", "--seeds", "1", "--steps", "2", "--per-class", "8",
            "--arms", "lowest_kappa,head_only", "--store", str(tmp_path / "s")]
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["arm"] for r in rows] == ["lowest_kappa", "head_only"]
    assert rows[0]["n_tensors_mean"] == 7 and rows[1]["drift_mean"] == pytest.approx(0.0, abs=1e-7)
    table = CliRunner().invoke(app, args)  # served from the store
    assert table.exit_code == 0, table.output
    assert "lowest_kappa" in table.stdout and "drift" in table.stdout
    bad = CliRunner().invoke(app, ["experiment", "forgetting", "--arms", "nope", "--store", str(tmp_path / "s")])
    assert bad.exit_code != 0 and "must be distinct names" in str(bad.exception)


@pytest.mark.slow
def test_default_experiment(store):
    from app import api

    res = api.experiment_forgetting("minilm", store=store)
    s = res.summary.set_index("arm")
    assert list(s.index) == list(fg.ARMS) and (s["n_seeds"] == 3).all()
    assert (s.loc[list(fg.SELECTION_ARMS), "n_tensors_mean"] == 7).all()
    assert s.loc["head_only", "drift_mean"] == pytest.approx(0.0, abs=1e-7)
    assert (res.runs["n_changed"] == res.runs["n_tensors"]).all()
    assert s.loc["full", "drift_mean"] > s.loc["head_only", "drift_mean"]


# -- dashboard page and figure ----------------------------------------------------------------
def _synthetic_result() -> fg.ForgettingResult:
    import pandas as pd

    rng = np.random.default_rng(5)
    rows = [{"arm": arm, "seed": s, "n_tensors": 7, "n_params": 1000 * (i + 1), "n_changed": 7,
             "accuracy": float(rng.uniform(0.6, 0.9)), "drift": float(rng.uniform(0, 0.2)), "drift_max": 0.3,
             "spearman": float(rng.uniform(0.8, 1)), "train_loss": 0.5, "seconds": 1.0, "tensors": "x"}
            for i, arm in enumerate(fg.ARMS) for s in range(2)]
    runs = pd.DataFrame(rows)
    cfg = fg.ForgettingConfig(seeds=2).params()
    return fg.ForgettingResult(runs, fg.summarise(runs), cfg, {"classes": ["a", "b"], "n_train": 8, "n_test": 2,
                                                               "n_heldout": 5, "heldout_packages": ["os"]})


def test_forgetting_scatter_draws_the_summary():
    from app.experiment_charts import forgetting_scatter

    res = _synthetic_result()
    fig = forgetting_scatter(res.summary, res.runs)
    means = [t for t in fig.data if t.mode == "markers+text"]
    assert len(means) == len(fg.ARMS)
    for t, row in zip(means, res.summary.to_dict(orient="records")):
        assert t.x[0] == row["drift_mean"] and t.y[0] == row["accuracy_mean"]
        assert t.error_x.array[0] == pytest.approx(row["drift_std"]) and t.error_y.array[0] == pytest.approx(
            row["accuracy_std"])
    with pytest.raises(ConfigError, match="drift_mean"):
        forgetting_scatter(res.summary.drop(columns="drift_mean"))


@pytest.fixture
def _page_store(tmp_path, monkeypatch):
    import streamlit as st

    from analysis.store import Store

    st.cache_data.clear()
    st.cache_resource.clear()
    store = Store(tmp_path / "page-store")
    monkeypatch.setenv("LENSLAB_STORE", str(store.root))
    yield store
    st.cache_data.clear()
    st.cache_resource.clear()


def _run_experiments_page():
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(Path(__file__).resolve().parents[3] / "app" / "dashboard.py"), default_timeout=90)
    at.run()
    at.switch_page("views/experiments.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_experiments_page_empty_store(_page_store):
    at = _run_experiments_page()
    assert any("lenslab experiment kappatune" in i.value for i in at.info)
    assert not at.get("plotly_chart")


def test_experiments_page_shows_stored_experiment(_page_store):
    res = _synthetic_result()
    _page_store.put("f" * 32, fg.ANALYSIS, res.config, fg.CODE_VERSION, fg.to_result(res))
    _page_store.register_model("f" * 32, "tiny-encoder", "module")
    at = _run_experiments_page()
    shown = at.dataframe[0].value
    assert list(shown["arm"]) == [
        {"lowest_kappa": "lowest κ (KappaTune)", "highest_kappa": "highest κ", "random": "random",
         "full": "full fine-tuning", "head_only": "head only"}[a] for a in fg.ARMS]
    s = res.summary
    assert list(shown["drift (1 − cos)"]) == [f"{m:.4f} ± {d:.4f}" for m, d in zip(s["drift_mean"], s["drift_std"])]
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    means = [t for t in spec["data"] if t.get("mode") == "markers+text"]
    assert [t["x"][0] for t in means] == pytest.approx(list(s["drift_mean"]))
    assert "tiny-encoder" in at.selectbox[0].options[0] and "budget 20%" in at.selectbox[0].options[0]
