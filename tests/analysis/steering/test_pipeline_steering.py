"""The steering pipeline (``analysis.steering.pipeline``) on the runner: round trips through the store, entries
written under the keys of the former ``app/api_steering.py`` served as they are, one model cache for every
booted model, the deprecated names, and reading back by key.

Independent truths: the analysis functions run directly on a freshly booted bridge; store keys built from
literal params dicts (the former code's, written out here, including its vector digest); the model cache's
own record of what it booted.
"""

from __future__ import annotations

import hashlib
import inspect
import json

import numpy as np
import pandas as pd
import pytest

from _tiny_llama import make_tiny_llama

from analysis import model_cache
from analysis.errors import ConfigError
from analysis.run import NotStoredError
from analysis.sources import open_source
from analysis.steering import effect as eff
from analysis.steering import extract as S
from analysis.steering import pipeline
from analysis.steering import pipeline_vectors as pv
from analysis.steering.contrasts import load_contrasts
from analysis.store import Result

CPU_KEY = ("cpu", "torch.float32")  # the model cache's device and dtype for a CPU run


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("steer-pipeline") / "llama")


@pytest.fixture
def fresh_cache():
    """An empty model cache, and a list of the fingerprints booted from now on."""
    model_cache.clear()
    booted: list[str] = []
    original = model_cache._default_boot

    def counting(src, device, dtype):
        booted.append(src.fingerprint)
        return original(src, device, dtype)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(model_cache, "_default_boot", counting)
        yield booted
    model_cache.clear()


def _no_model(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a model was booted: the stored result was not served")

    monkeypatch.setattr(model_cache, "bridge", boom)


def _old_vector_digest(vec) -> str:
    """The dose-response key's vector digest as app/api_steering.py computed it."""
    h = hashlib.blake2b(digest_size=16)
    h.update(np.ascontiguousarray(vec.vectors, dtype=np.float32).tobytes())
    h.update(json.dumps([vec.layers, vec.hook]).encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------ round trips
def test_extract_round_trip_matches_the_analysis_and_reads_back(lm_dir, store, fresh_cache):
    ext = pipeline.steer_extract(lm_dir, "numpy-torch", position="mean", store=store, device="cpu")
    direct = S.extract(open_source(lm_dir).boot_bridge(), load_contrasts("numpy-torch"), position="mean")
    np.testing.assert_array_equal(ext.vectors, direct.vectors)  # same CPU arithmetic as the analysis itself
    pd.testing.assert_frame_equal(ext.table, direct.table)
    (entry,) = pipeline.stored_extractions(store=store)
    assert (entry.analysis, entry.code_version) == ("steering.extract", "steering-2")
    loaded = pipeline.load_extraction(entry.key, store)
    np.testing.assert_array_equal(loaded.vectors, ext.vectors)
    assert pipeline.load_extraction(entry.key[:10], store).meta == ext.meta  # a unique prefix is enough
    assert pipeline.stored_extractions("0" * 32, store=store) == []


def test_dose_and_layers_round_trip_match_the_analysis(lm_dir, store, fresh_cache):
    fp = open_source(lm_dir).fingerprint
    vec = pv.steer_vector(pipeline.steer_extract(lm_dir, "numpy-torch", store=store), 0)
    assert pipeline.find_dose_response(fp, vec, "numpy-torch", alphas=(-1, 1), scale="norm", store=store) is None
    dr = pipeline.steer_dose(lm_dir, vec, "numpy-torch", alphas=(-1, 1), scale="norm", store=store)
    direct = eff.dose_response(open_source(lm_dir).boot_bridge(), vec, load_contrasts("numpy-torch"), (-1, 1),
                               scale="norm")
    pd.testing.assert_frame_equal(dr.table, direct.table)
    (entry,) = pipeline.stored_dose_responses(fp, store=store)
    pd.testing.assert_frame_equal(pipeline.load_dose_response(entry.key, store).table, dr.table)
    found = pipeline.find_dose_response(fp, vec, "numpy-torch", alphas=(1, -1), scale="norm", store=store)
    pd.testing.assert_frame_equal(found.table, dr.table)

    assert pipeline.find_layer_sweep(fp, "numpy-torch", alpha=0.5, scale="norm", store=store) is None
    sweep = pipeline.steer_layers(lm_dir, "numpy-torch", alpha=0.5, scale="norm", store=store)
    ext = pipeline.steer_extract(lm_dir, "numpy-torch", store=store)
    direct = eff.layer_sweep(open_source(lm_dir).boot_bridge(), ext, load_contrasts("numpy-torch"), alpha=0.5,
                             scale="norm")
    pd.testing.assert_frame_equal(sweep, direct)
    (entry,) = pipeline.stored_layer_sweeps(fp, store=store)
    pd.testing.assert_frame_equal(pipeline.load_layer_sweep(entry.key, store), sweep)
    pd.testing.assert_frame_equal(pipeline.find_layer_sweep(fp, "numpy-torch", alpha=0.5, scale="norm",
                                                            store=store), sweep)
    assert len(pipeline.stored_extractions(store=store)) == 1  # the sweep reused the stored extraction


# ------------------------------------------------------------------------------------ old store keys
def test_an_extraction_stored_under_the_old_key_is_served(lm_dir, store, monkeypatch):
    src, cs = open_source(lm_dir), load_contrasts("numpy-torch")
    ext = S.extract(src.boot_bridge(), cs, layers=[1], position="mean", k=2)
    ext.meta.update({"fingerprint": src.fingerprint, "source": src.label, "contrast_origin": cs.origin})
    old_params = {"contrast": "numpy-torch", "contrast_fingerprint": cs.fingerprint, "hook": "resid_post",
                  "position": "mean", "methods": ["mean_diff", "pca", "logistic"], "layers": [1],
                  "padding_side": "right", "max_tokens": 128, "k": 2}
    store.cached(src.fingerprint, "steering.extract", old_params, "steering-2", lambda: S.to_result(ext))
    _no_model(monkeypatch)
    monkeypatch.setattr(S, "extract", lambda *a, **k: pytest.fail("recomputed"))
    got = pipeline.steer_extract(lm_dir, "numpy-torch", position="mean", layers=[1], k=2, batch_size=5, store=store)
    np.testing.assert_array_equal(got.vectors, ext.vectors)
    assert len(store.list()) == 1


def test_a_dose_response_and_a_layer_sweep_stored_under_the_old_keys_are_served(lm_dir, store, monkeypatch):
    src, cs = open_source(lm_dir), load_contrasts("numpy-torch")
    vec = pv.steer_vector(pipeline.steer_extract(lm_dir, cs, store=store), 1)
    marker = pd.DataFrame({"alpha": [-2.0, 0.0, 2.0], "logp_pos": [1.0, 2.0, 3.0]})  # what only the entry holds
    dose_params = {"vector": _old_vector_digest(vec), "contrast_fingerprint": cs.fingerprint,
                   "alphas": [-2.0, 0.0, 2.0], "layers": None, "scale": "norm", "capability": True}
    store.cached(src.fingerprint, "steering.dose", dose_params, "steering-2",
                 lambda: Result(table=marker, meta={"kind": "lm"}))
    sweep_params = {"extraction": ["resid_post", "last", cs.fingerprint], "alpha": 0.5, "method": "pca",
                    "scale": "absolute", "capability": False}
    store.cached(src.fingerprint, "steering.sweep", sweep_params, "steering-2", lambda: Result(table=marker))
    _no_model(monkeypatch)
    dr = pipeline.steer_dose(lm_dir, vec, "numpy-torch", alphas=(2, -2), scale="norm", store=store)
    assert dr.kind == "lm" and dr.table.equals(marker)
    assert pipeline.steer_layers(lm_dir, "numpy-torch", alpha=0.5, method="pca", store=store).equals(marker)
    assert pipeline.find_layer_sweep(src.fingerprint, "numpy-torch", alpha=0.5, method="pca",
                                     store=store).equals(marker)
    assert len(store.list()) == 3  # the extraction and the two entries written above: nothing new


# ------------------------------------------------------------------------------------ one model cache
def test_extract_dose_layers_and_apply_boot_the_model_once(lm_dir, store, fresh_cache):
    fp = open_source(lm_dir).fingerprint
    vec = pv.steer_vector(pipeline.steer_extract(lm_dir, "numpy-torch", store=store), 0)
    pipeline.steer_dose(lm_dir, vec, "numpy-torch", alphas=(1,), store=store)
    pipeline.steer_layers(lm_dir, "numpy-torch", alpha=1.0, store=store)
    pv.steer_apply(lm_dir, vec, "Return a", alpha=1.0, max_new_tokens=2)
    _, bridge = pv.bridge_for(lm_dir, device="cpu")
    assert fresh_cache == [fp]
    assert model_cache.cached_keys() == [(fp, "", *CPU_KEY)]
    assert bridge is model_cache.bridge(open_source(lm_dir))


def test_a_bad_device_is_refused_before_any_model_boots(lm_dir, store, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("booted before the device was checked")

    monkeypatch.setattr(model_cache, "bridge", boom)
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        pipeline.steer_extract(lm_dir, "numpy-torch", store=store, device="tpu")
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        pv.bridge_for(lm_dir, device="tpu")
    assert store.list() == []


@pytest.mark.parametrize("fn", [pipeline.steer_extract, pipeline.steer_dose, pipeline.steer_layers, pv.steer_apply,
                                pv.steer_orthogonalize, pv.bridge_for], ids=lambda f: f.__name__)
def test_every_function_that_runs_torch_takes_a_device(fn):
    assert inspect.signature(fn).parameters["device"].default == "auto"


# ------------------------------------------------------------------------------------ deprecated names
def test_deprecated_names_warn_and_behave_as_before(lm_dir, store):
    from app import api

    fp = open_source(lm_dir).fingerprint
    vec = pv.steer_vector(pipeline.steer_extract(lm_dir, "numpy-torch", store=store), 0)
    with pytest.deprecated_call(match="stored_dose_response is deprecated; use find_dose_response"):
        assert pipeline.stored_dose_response(fp, vec, "numpy-torch", alphas=(1,), store=store) is None
    with pytest.deprecated_call(match="steer_dose_response is deprecated; use steer_dose"):
        old = api.steer_dose_response(lm_dir, vec, "numpy-torch", alphas=(1,), store=store)
    assert old.table.equals(pipeline.steer_dose(lm_dir, vec, "numpy-torch", alphas=(1,), store=store).table)
    with pytest.deprecated_call(match="stored_dose_response is deprecated; use find_dose_response"):
        assert api.stored_dose_response(fp, vec, "numpy-torch", alphas=(1,), store=store).table.equals(old.table)
    with pytest.deprecated_call(match="stored_layer_sweep is deprecated; use find_layer_sweep"):
        assert api.stored_layer_sweep(fp, "numpy-torch", alpha=1.0, store=store) is None
    with pytest.deprecated_call(match="steer_sweep is deprecated; use steer_layers"):
        old_sweep = api.steer_sweep(lm_dir, "numpy-torch", alpha=1.0, store=store)
    assert old_sweep.equals(pipeline.steer_layers(lm_dir, "numpy-torch", alpha=1.0, store=store))
    with pytest.deprecated_call(match="stored_layer_sweep is deprecated; use find_layer_sweep"):
        assert api.stored_layer_sweep(fp, "numpy-torch", alpha=1.0, store=store).equals(old_sweep)
    with pytest.deprecated_call(match="steer_generate is deprecated; use steer_apply"):
        text = api.steer_generate(lm_dir, vec, "Return a", alpha=2.0, max_new_tokens=3)
    assert text == pv.steer_apply(lm_dir, vec, "Return a", alpha=2.0, max_new_tokens=3)
    for old_name, new_name in pipeline.DEPRECATED.items():
        assert callable(getattr(api, old_name)) and callable(getattr(api, new_name))


def test_new_names_do_not_warn(lm_dir, store, recwarn):
    fp = open_source(lm_dir).fingerprint
    pipeline.find_layer_sweep(fp, "numpy-torch", store=store)
    pipeline.stored_extractions(store=store)
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning)]


# ------------------------------------------------------------------------------------ reading by key
def test_load_raises_not_stored_for_a_missing_or_foreign_key(lm_dir, store):
    for load in (pipeline.load_extraction, pipeline.load_dose_response, pipeline.load_layer_sweep):
        with pytest.raises(NotStoredError, match="no stored result has key"):
            load("0" * 64, store)
    pipeline.steer_extract(lm_dir, "numpy-torch", store=store)
    (entry,) = pipeline.stored_extractions(store=store)
    with pytest.raises(NotStoredError, match="holds a 'steering.extract' result, not 'steering.dose'"):
        pipeline.load_dose_response(entry.key, store)
