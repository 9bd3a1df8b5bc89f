"""The dashboard keeps the user's place (issue 16): the model chosen on one page opens the next page, a
``?model=`` query parameter links a view, pages without a choice open on a model holding what they show,
a model's first label stays (other paths are aliases). AppTest over a store with two small checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from streamlit.testing.v1 import AppTest

from analysis.store import Result, Store

DASHBOARD = str(Path(__file__).resolve().parents[2] / "app" / "dashboard.py")
TIMEOUT = 90

pytestmark = pytest.mark.usefixtures("streamlit_caches_cleared")


def _checkpoint(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    weights = {f"model.layers.{i}.mlp.up_proj.weight": rng.standard_normal((12, 8)) for i in range(2)}
    save_file({n: torch.from_numpy(w.astype(np.float32)) for n, w in weights.items()}, str(path))
    return path


@pytest.fixture
def two_models(dashboard_store, tmp_path, monkeypatch) -> tuple[Store, str, str]:
    """Model A (spectra stored first) and model B (spectra stored later: the newest); their fingerprints."""
    from app import api

    from analysis.sources import open_source

    monkeypatch.chdir(tmp_path)  # the checkpoints lie inside the dashboard's allowed roots
    a, b = (open_source(str(_checkpoint(tmp_path / f"{n}.safetensors", seed))) for n, seed in (("a", 1), ("b", 2)))
    api.analyze(a, store=dashboard_store)
    api.analyze(b, store=dashboard_store)
    assert [m.fingerprint for m in dashboard_store.models()] == [b.fingerprint, a.fingerprint]  # newest first
    return dashboard_store, a.fingerprint, b.fingerprint


def _app(**query: str) -> AppTest:
    at = AppTest.from_file(DASHBOARD, default_timeout=TIMEOUT)
    at.query_params.update(query)
    return at


def _open(at: AppTest, page: str) -> AppTest:
    at.switch_page(f"views/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_the_model_chosen_on_one_page_opens_the_others(two_models):
    _, fp_a, fp_b = two_models
    at = _open(_app().run(), "spectra")
    assert at.selectbox(key="spectra_model").value == fp_b  # no choice yet: the newest model
    at.selectbox(key="spectra_model").set_value(fp_a).run()
    assert at.query_params["model"] == fp_a[:12]  # the view can be linked
    for page, key in (("selection", "selection_model"), ("circuits", "circuits_model"),
                      ("spectra", "spectra_model")):
        _open(at, page)
        assert at.selectbox(key=key).value == fp_a, page
        assert at.query_params["model"] == fp_a[:12], page


def test_a_page_opened_by_default_does_not_change_the_choice(two_models):
    """A page whose picker lacks the chosen model (only B has an experiment) shows another one but keeps
    the choice for the other pages; picking there is a choice."""
    import pandas as pd

    from analysis.weights import forgetting as fg

    store, fp_a, fp_b = two_models
    runs = pd.DataFrame([{"arm": arm, "seed": 0, "n_tensors": 1, "n_params": 10, "n_changed": 1, "accuracy": 0.9,
                          "drift": 0.1, "drift_max": 0.2, "spearman": 0.9, "train_loss": 0.5, "seconds": 1.0,
                          "tensors": "x"} for arm in fg.ARMS])
    cfg = fg.ForgettingConfig(seeds=1).params()
    res = fg.ForgettingResult(runs, fg.summarise(runs), cfg, {"classes": ["a", "b"]})
    store.put(fp_b, fg.ANALYSIS, cfg, fg.CODE_VERSION, fg.to_result(res))
    at = _open(_app().run(), "selection")
    at.selectbox(key="selection_model").set_value(fp_a).run()
    _open(at, "experiments")
    assert at.selectbox(key="experiment_pick").value == 0 and at.query_params["model"] == fp_b[:12]
    at.run()  # a rerun on that page (any widget) reads its own ?model= back: still not a choice
    assert at.selectbox(key="experiment_pick").value == 0 and not at.warning
    _open(at, "spectra")
    assert at.selectbox(key="spectra_model").value == fp_a
    at.selectbox(key="spectra_model").set_value(fp_b).run()
    _open(at, "selection")
    assert at.selectbox(key="selection_model").value == fp_b


@pytest.mark.parametrize("how", ["fingerprint", "label", "alias"])
def test_a_query_parameter_links_a_view(two_models, tmp_path, how):
    store, fp_a, _ = two_models
    label_a = next(m.label for m in store.models() if m.fingerprint == fp_a)
    store.register_model(fp_a, "linked-name", "safetensors")  # a second path to the same weights
    value = {"fingerprint": fp_a[:10], "label": label_a, "alias": "linked-name"}[how]
    at = _open(_app(model=value).run(), "selection")
    assert at.selectbox(key="selection_model").value == fp_a
    assert not at.warning
    _open(at, "spectra")  # remembered for the rest of the session
    assert at.selectbox(key="spectra_model").value == fp_a


def test_a_query_parameter_naming_no_model_says_so(two_models):
    _, _, fp_b = two_models
    at = _open(_app(model="no-such-model").run(), "spectra")
    assert at.selectbox(key="spectra_model").value == fp_b
    assert any("?model=no-such-model names no model" in w.value for w in at.warning)


def test_pages_open_on_a_model_holding_what_they_show(two_models):
    """After another analysis of a newer model (here: no spectra), the spectra and selection pages still
    open on the model with spectra; the newer one stays in the picker."""
    store, fp_a, _ = two_models
    fp_c = "c" * 64
    store.put(fp_c, "bilinear", {}, "0", Result(meta={}))
    store.register_model(fp_c, "bilinear-lm", "safetensors")
    for page, key in (("spectra", "spectra_model"), ("selection", "selection_model")):
        at = _open(_app().run(), page)
        picker = at.selectbox(key=key)
        assert picker.options[0].startswith("bilinear-lm") and picker.value in {fp_a, two_models[2]}, page
        assert picker.value != fp_c
        assert not any("No spectra stored" in i.value for i in at.info)


def test_home_page_keeps_the_first_label_and_lists_aliases(two_models):
    store, fp_a, _ = two_models
    first = next(m.label for m in store.models() if m.fingerprint == fp_a)
    store.register_model(fp_a, "/runs/ckpt-100", "safetensors")
    at = _app().run()
    assert not at.exception
    table = at.dataframe[0].value
    row = table[table["fingerprint"] == fp_a].iloc[0]
    assert row["label"] == first and row["also seen as"] == "/runs/ckpt-100"


def test_analysing_the_same_weights_by_another_path_keeps_the_first_label(dashboard_store, tmp_path):
    """End to end through the runner (analysis.run.register_source): the same checkpoint analysed again from a
    copy under runs/ keeps its first label; the copy's path is an alias; the spectra page names the first."""
    import shutil

    from app import api

    first = _checkpoint(tmp_path / "bilinear-lm.safetensors", 3)
    (tmp_path / "runs").mkdir()
    again = Path(shutil.copy(first, tmp_path / "runs" / "ckpt-100.safetensors"))
    api.analyze(str(first), store=dashboard_store)
    api.analyze(str(again), store=dashboard_store, refresh=True)
    (m,) = dashboard_store.models()
    assert (m.label, m.aliases) == (str(first.resolve()), (str(again.resolve()),))
    at = _open(_app().run(), "spectra")
    assert at.selectbox(key="spectra_model").options == [f"{first.resolve()} ({m.fingerprint[:8]})"]
