"""The expert analyses through the runner (analysis/experts/pipeline.py): round trips, reading back,
entries written under the keys of earlier versions (literal names, params and code versions), the
device option and the shared model cache.

Tiny settings (digits, 2 epochs, hidden 32): seconds. The "old key" tests build each entry with
``Store.cached`` and the literal key parts earlier LensLab versions used, then call the new API with
the maths replaced by a function that fails: the entry must be served, not recomputed.
"""

from __future__ import annotations

import hashlib
import platform
import warnings
from importlib.metadata import version

import numpy as np
import pandas as pd
import pytest

from analysis import model_cache
from analysis import run as runner
from analysis.errors import ConfigError
from analysis.experts import pipeline as pl
from analysis.run import NotStoredError
from analysis.store import Result, entry_key

TINY = {"epochs": 2, "hidden": 32}
DIGITS = {"data": "digits", "test_fraction": 0.2, "seed": 0}  # DataSpec().params() as stored
SETTINGS = {"eval_on": "all", "top_k": 5, "load_threshold": 0.5, "min_flips": 3, "min_effect": 1.0, "null_draws": 32}


def probe_params(**kw) -> dict:
    """ProbeClassifier.params() written out: the probe part of old keys."""
    return {"layer": "cp", "n_experts": None, "hidden": 32, "gate": "entmax15", "budget": None, "epochs": 2,
            "batch_size": 128, "lr": 2e-3, "weight_decay": 1e-4, "seed": 0, **kw}


def old_data_id(X, y) -> str:
    """The dataset hash as earlier versions computed it (blake2b-128 of shapes and float32 / int64 bytes)."""
    h = hashlib.blake2b(digest_size=16)
    for a in (np.ascontiguousarray(X, dtype=np.float32), np.ascontiguousarray(y, dtype=np.int64)):
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def fail(*args, **kwargs):
    raise AssertionError("recomputed an entry that is in the store")


@pytest.fixture(scope="module")
def digits():
    from probes.training import digits_features

    fs = digits_features()
    return fs, old_data_id(fs.X, fs.y)


@pytest.fixture(scope="module")
def tiny_mixtral(tmp_path_factory):
    from _tiny_mixtral import make_tiny_mixtral

    return make_tiny_mixtral(tmp_path_factory.mktemp("mixtral"))


@pytest.fixture
def no_compute(monkeypatch):
    """Every expensive computation of the pipeline fails when called."""
    import probes.training as tr
    from analysis.experts import routing, specialisation

    monkeypatch.setattr(tr.ProbeClassifier, "fit", fail)
    monkeypatch.setattr(tr, "embed_texts", fail)
    monkeypatch.setattr(routing, "collect_routing", fail)
    monkeypatch.setattr(specialisation, "specialisation", fail)
    monkeypatch.setattr(specialisation, "bias_correction", fail)


def trained_probe(fs, params: dict) -> Result:
    """A probe entry as the old code stored it: state arrays and the meta it wrote."""
    from probes.training import ProbeClassifier

    clf = ProbeClassifier(**params).fit(*fs.train)
    (Xtr, ytr), (Xte, yte) = fs.train, fs.test
    meta = {"describe": clf.describe(), "test_accuracy": clf.score(Xte, yte), "train_accuracy": clf.score(Xtr, ytr),
            "n_params": int(clf.n_params_), "layer_params": int(clf.layer_params_), "budget": int(clf.budget_),
            "rank": clf.rank_, "n_classes": int(clf.n_classes_), "seconds": 0.5, "classes": list(fs.classes)}
    return Result(arrays=clf.state_arrays(), meta=meta)


# ------------------------------------------------------------------------------------- round trips
def test_curve_and_reports_round_trip(store, digits):
    fs, fp = digits
    curve = pl.mmoe_analyze("digits", "4,8", store=store, **TINY)
    assert [e.key for e in pl.stored_mmoe_curves(store=store)] == [curve.key]
    assert pl.stored_mmoe_curves(fingerprint="0" * 8, store=store) == []
    params = {"experts": [4, 8], "probe": {"layer": "cp", "gate": "entmax15", "hidden": 32, "epochs": 2, "budget": None},
              "data": DIGITS, "analysis": SETTINGS}
    assert curve.key == entry_key(fp, "mmoe.curve", params, "mmoe-1")
    back = pl.load_mmoe_curve(curve.key[:12], store=store)  # a unique prefix names the entry too
    assert back.key == curve.key and back.keys == curve.keys
    pd.testing.assert_frame_equal(back.table, curve.table)
    assert {e.key for e in pl.stored_expert_reports(fp, store=store)} == set(curve.keys.values())
    for n, key in curve.keys.items():
        report = pl.load_expert_report(key, store=store)
        assert report.n_experts == n and report.expert_class.shape == (n, 10)
        assert isinstance(runner.load(key, store=store), type(report))  # the runner dispatches on the name
        row = curve.table.set_index("n_experts").loc[n]
        assert row["mean_polysemanticity"] == report.summary["mean_polysemanticity"] or \
            np.isnan(row["mean_polysemanticity"]) and np.isnan(report.summary["mean_polysemanticity"])
    # one report in detail: its top class per expert is the argmax of the expert x class matrix
    report = pl.load_expert_report(curve.keys[4], store=store)
    assert [report.top_class(k) for k in range(4)] == [str(c) for c in np.argmax(report.expert_class, 1)]
    img = report.example_image(0, 0, zoom=3)
    assert img.shape == (24, 24) and np.array_equal(img[::3, ::3], np.clip(report.images[0, 0], 0, 1))


def test_same_request_is_served_and_refresh_retrains_only_the_mmoe_probes(store, monkeypatch):
    import probes.training as tr

    curve = pl.mmoe_analyze("digits", "4", store=store, **TINY)
    n_entries = len(store.list())
    fits = []
    original = tr.ProbeClassifier.fit
    monkeypatch.setattr(tr.ProbeClassifier, "fit", lambda self, *a, **k: fits.append(self.describe()) or
                        original(self, *a, **k))
    again = pl.mmoe_analyze("digits", [4], store=store, **TINY)
    assert fits == [] and again.key == curve.key and len(store.list()) == n_entries
    pl.mmoe_analyze("digits", [4], store=store, refresh=True, **TINY)
    assert fits == ["CP MMoE, 4 experts"]  # the baselines are reused, as before
    assert len(store.list()) == n_entries


def test_bias_round_trip_and_deprecated_alias(store):
    demo = pl.mmoe_bias("digits", 4, target="3", keep=0.1, store=store, **TINY)
    (entry,) = pl.stored_mmoe_bias(store=store)
    back = pl.load_mmoe_bias(entry.key, store=store)
    assert back.experts == demo.experts and back.target == "3"
    pd.testing.assert_frame_equal(back.table, demo.table)
    with pytest.warns(DeprecationWarning, match="stored_mmoe_bias"):
        (old,) = pl.stored_bias_demos(store)
    assert old.experts == demo.experts and old.accuracy_after == demo.accuracy_after
    with pytest.warns(DeprecationWarning, match="stored_mmoe_curves"):
        assert pl.mmoe_curves(store) == []


def test_routing_round_trip_uses_the_model_cache(store, tiny_mixtral, monkeypatch):
    model_cache.clear()
    boots = []
    original = model_cache._default_boot
    monkeypatch.setattr(model_cache, "_default_boot", lambda src, d, t: boots.append(src.fingerprint) or
                        original(src, d, t))
    stats = pl.experts_routing(str(tiny_mixtral), packages=("numpy", "json"), per_package=3, store=store)
    pl.experts_routing(str(tiny_mixtral), packages=("numpy", "json"), per_package=3, store=store, refresh=True)
    assert len(boots) == 1  # booted once, then served by the one model cache
    assert model_cache.cached_keys()[-1][1:] == ("", "cpu", "torch.float32")
    (entry,) = pl.stored_experts_routing(store=store)
    back = pl.load_experts_routing(entry.key, store=store)
    pd.testing.assert_frame_equal(back.layers, stats.layers)
    np.testing.assert_array_equal(back.coactivation, stats.coactivation)
    with pytest.warns(DeprecationWarning, match="stored_experts_routing"):
        ((old_entry, old_stats),) = pl.stored_routing(store)
    assert old_entry.key == entry.key and np.array_equal(old_stats.usage, stats.usage)
    model_cache.clear()


# ------------------------------------------------------------------------------------- reading back
def test_load_raises_not_stored(store):
    store.put("f" * 64, "mmoe.curve", {"experts": [1]}, "mmoe-1", Result(table=pd.DataFrame({"n_experts": [1]}),
                                                                       meta={"keys": {}}))
    curve_key = store.list()[0].key
    for load in (pl.load_mmoe_curve, pl.load_expert_report, pl.load_mmoe_bias, pl.load_experts_routing):
        with pytest.raises(NotStoredError, match="no stored result has key"):
            load("0" * 64, store=store)
    with pytest.raises(NotStoredError, match="holds a 'mmoe.curve' result, not 'mmoe.specialisation'"):
        pl.load_expert_report(curve_key, store=store)
    assert isinstance(NotStoredError("x"), KeyError)  # the page's "report deleted" branch catches KeyError
    assert pl.load_mmoe_curve(curve_key, store=store).key == curve_key


def test_deprecated_names_are_listed_and_exported():
    from app import api

    for old, new in pl.DEPRECATED.items():
        assert callable(getattr(api, old)) and callable(getattr(api, new))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pl.stored_mmoe_curves(store=None)  # the conventional names do not warn


# ------------------------------------------------------------------------------- old literal keys
def test_old_probe_and_curve_entries_are_served(store, digits, no_compute):
    fs, fp = digits
    curve_params = {"experts": [4], "probe": {"layer": "cp", "gate": "entmax15", "hidden": 32, "epochs": 2,
                                              "budget": None}, "data": DIGITS, "analysis": SETTINGS}
    sentinel = Result(table=pd.DataFrame({"n_experts": [4], "accuracy": [0.123]}), meta={"keys": {"4": "k" * 64}})
    store.cached(fp, "mmoe.curve", curve_params, "mmoe-1", lambda: sentinel)
    curve = pl.mmoe_analyze("digits", 4, store=store, **TINY)
    assert curve.table["accuracy"].tolist() == [0.123] and curve.keys == {4: "k" * 64}
    assert curve.key == entry_key(fp, "mmoe.curve", curve_params, "mmoe-1")


def test_old_probe_and_report_entries_build_a_new_curve(store, digits):
    fs, fp = digits
    linear = probe_params(layer="linear", hidden=None, lr=1e-2)
    matched = probe_params(layer="linear")
    mmoe = probe_params(n_experts=4)
    for p in (linear, matched, mmoe):  # trained for real: the curve rebuilds the probes from their arrays
        store.cached(fp, "mmoe.probe", {"probe": p, "data_id": fp, "data": "digits"}, "mmoe-1",
                     lambda p=p: trained_probe(fs, p))
    names = ["accuracy", "mean_polysemanticity", "mean_null_polysemanticity", "n_experts_counted",
             "mean_effect_polysemanticity", "mean_null_effect_polysemanticity", "n_experts_counted_effect",
             "usage_entropy", "max_usage_entropy", "experts_loaded", "mean_active_experts", "mean_class_entropy"]
    summary = {k: float(i) for i, k in enumerate(names)} | {"n_experts": 4}
    report_params = {"probe": mmoe, "data_id": fp, "data": DIGITS, "analysis": SETTINGS}
    store.cached(fp, "mmoe.specialisation", report_params, "mmoe-1/experts-1",
                 lambda: Result(table=pd.DataFrame({"expert": range(4)}),
                                arrays={"expert_class": np.zeros((4, 10)), "per_class_drop": np.zeros((4, 10))},
                                meta={"summary": summary, "examples": [], "classes": list(fs.classes)}))
    n_entries = len(store.list())
    with pytest.MonkeyPatch.context() as mp:
        import probes.training as tr
        from analysis.experts import specialisation

        mp.setattr(tr.ProbeClassifier, "fit", fail)
        mp.setattr(specialisation, "specialisation", fail)
        curve = pl.mmoe_analyze("digits", 4, store=store, **TINY)
        clf, meta = pl.mmoe_probe(fs, fp, {"layer": "cp", "n_experts": 4, "gate": "entmax15", **TINY}, store=store)
    assert len(store.list()) == n_entries + 1  # only the curve is new
    assert curve.keys == {4: entry_key(fp, "mmoe.specialisation", report_params, "mmoe-1/experts-1")}
    row = curve.table.iloc[0]
    assert row["mean_class_entropy"] == summary["mean_class_entropy"] and row["eval_accuracy"] == 0.0
    probe_meta = store.get(fp, "mmoe.probe", {"probe": mmoe, "data_id": fp, "data": "digits"}, "mmoe-1").meta
    assert row["accuracy"] == probe_meta["test_accuracy"] and row["rank"] == probe_meta["rank"]
    lin_meta = store.get(fp, "mmoe.probe", {"probe": linear, "data_id": fp, "data": "digits"}, "mmoe-1").meta
    assert curve.meta["linear_probe"]["test_accuracy"] == lin_meta["test_accuracy"]
    # mmoe_probe rebuilt the stored probe: the logits of a probe trained the old way
    from probes.training import ProbeClassifier

    assert meta == probe_meta
    ref = ProbeClassifier(**mmoe).fit(*fs.train)
    np.testing.assert_array_equal(clf.logits(fs.X[:50]), ref.logits(fs.X[:50]))


def test_old_bias_entry_is_served(store, digits, no_compute):
    fs, fp = digits
    params = {"probe": probe_params(n_experts=4), "data": DIGITS, "target": 3, "keep": 0.1, "n_scaled": 3,
              "scale": 0.0, "data_id": fp}
    table = pd.DataFrame({"class": [str(c) for c in range(10)], "before": 0.5, "after": 0.6, "change": 0.1})
    store.cached(fp, "mmoe.bias", params, "mmoe-1/experts-1",
                 lambda: Result(table=table, meta={"target": "3", "experts": [2, 1], "n_errors": 7,
                                                   "accuracy_before": 0.5, "accuracy_after": 0.6}))
    demo = pl.mmoe_bias("digits", 4, target="3", keep=0.1, store=store, **TINY)
    assert demo.experts == (2, 1) and demo.n_errors == 7
    pd.testing.assert_frame_equal(demo.table, table)


def test_old_docstring_features_are_served(store, minilm, no_compute):
    from probes.training import docstring_items

    items = docstring_items(("json", "os"), per_package=6, seed=0)
    params = {"packages": ["json", "os"], "per_package": 6, "max_tokens": 16, "seed": 0, "pooling": "mean+l2",
              "versions": {"python": platform.python_version(), "json": "stdlib", "os": "stdlib"}}
    X = np.random.default_rng(0).standard_normal((len(items), 8)).astype(np.float32)
    table = pd.DataFrame({"text": [d.text for d in items], "package": [d.package for d in items],
                          "qualname": [d.qualname for d in items]})
    store.cached(minilm.fingerprint, "mmoe.features", params, "mmoe-1", lambda: Result(table=table, arrays={"X": X}))
    fs, fp = pl.mmoe_features(pl.DataSpec(data="docstrings", packages=("json", "os"), per_package=6, max_tokens=16),
                              store=store)
    assert fp == minilm.fingerprint and fs.classes == ("json", "os")
    np.testing.assert_array_equal(fs.X, X)


def test_old_routing_entry_is_served(store, tiny_mixtral, no_compute):
    from analysis.experts import routing
    from analysis.sources import open_source

    params = {"packages": ["numpy", "json"], "per_package": 3, "max_tokens": 64, "min_count": 5, "seed": 0,
              "versions": {"python": platform.python_version(), "numpy": version("numpy"), "json": "stdlib"}}
    log = routing.RoutingLog(np.array([5, 5, 7, 7]), np.array([0, 0, 1, 1]), np.array([0, 0, 1, 1]),
                             np.array([[[0, 1], [0, 2], [1, 3], [2, 3]]]), np.full((1, 4, 4), 0.25), ("a", "b"),
                             {5: "foo", 7: "bar"})
    stats = routing.routing_stats(log, min_count=2)
    store.cached(open_source(str(tiny_mixtral)).fingerprint, "experts.routing", params, "routing-1",
                 lambda: routing.to_result(stats))
    got = pl.experts_routing(str(tiny_mixtral), packages=("numpy", "json"), per_package=3, store=store)
    pd.testing.assert_frame_equal(got.layers, stats.layers)
    assert got.domains == ("a", "b")


# ------------------------------------------------------------------------------------------ device
@pytest.mark.parametrize("call", [lambda d, s: pl.mmoe_train("digits", 4, device=d, store=s, **TINY),
                                  lambda d, s: pl.mmoe_analyze("digits", 4, device=d, store=s, **TINY),
                                  lambda d, s: pl.mmoe_bias("digits", 4, target="3", device=d, store=s, **TINY),
                                  lambda d, s: pl.experts_routing("minilm", device=d, store=s)],
                         ids=["train", "analyze", "bias", "routing"])
def test_bad_device_is_a_config_error_before_any_work(store, call, no_compute):
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        call("tpu", store)
    assert store.list() == []


def test_probes_train_on_the_run_device(store, digits, monkeypatch):
    import torch

    import probes.training as tr

    seen = []
    original = tr.ProbeClassifier.fit
    monkeypatch.setattr(tr.ProbeClassifier, "fit", lambda self, *a, **k: seen.append(k.get("device")) or
                        original(self, *a, **k))
    table = pl.mmoe_train("digits", 4, device="cpu", store=store, **TINY)
    assert seen == [torch.device("cpu")] * 3 and len(table) == 3
    # a probe trained on the resolved "auto" device (the CPU here) is the same probe
    fs, fp = digits
    clf, _ = pl.mmoe_probe(fs, fp, {"layer": "cp", "n_experts": 4, **TINY}, store=store, device="auto")
    ref = original(tr.ProbeClassifier(**probe_params(n_experts=4)), *fs.train)
    np.testing.assert_array_equal(clf.gates(fs.X[:20]), ref.gates(fs.X[:20]))
