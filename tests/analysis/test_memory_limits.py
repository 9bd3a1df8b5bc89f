"""Settings that size a big allocation are refused with a ConfigError before it happens, outside
SAE training (``tests/sae/test_sae_memory.py``): the MMoE / linear probes' width and parameter
budget (checked against ``analysis.memory.memory_limit``) and the number of SVD directions a
steering extraction pads every layer to (at most d_model).

Independent truth: the layers' constructors and the forward pass are replaced by functions that
fail the test, so the refusal provably comes first.
"""

from __future__ import annotations

import numpy as np
import pytest

from _tiny_llama import make_tiny_llama

from analysis import memory
from analysis.steering import collect as steer_collect
from analysis.steering import extract as S
from analysis.steering.contrasts import load_contrasts
from analysis.errors import ConfigError
from analysis.sources import open_source


@pytest.fixture
def no_layers(monkeypatch):
    """Building any probe layer fails the test."""
    from probes import training

    def boom(*a, **k):
        raise AssertionError("a layer was allocated before the memory check")

    monkeypatch.setattr(training.nn, "Linear", boom)
    monkeypatch.setattr(training, "build_mmoe", boom)
    monkeypatch.setenv(memory.ENV_VAR, "16G")


@pytest.mark.parametrize("kw, match", [
    (dict(layer="linear", hidden=10 ** 9), r"the probe \(linear layer \(hidden 1000000000\)\) would need at least "
                                            r"163\.9 GiB \(11,000,000,002 parameters x 16 bytes: weights, gradients, "
                                            r"AdamW moments\) but the memory limit is 16\.0 GiB "
                                            r"\(LENSLAB_MEMORY_LIMIT=16G\); lower hidden \(--hidden\) or budget"),
    (dict(layer="cp", n_experts=4, hidden=16, budget=10 ** 12), r"would need at least 14,901\.2 GiB"),
], ids=["hidden", "budget"])
def test_a_probe_too_big_for_memory_is_refused_before_any_layer_exists(kw, match, no_layers, rng):
    from probes.training import ProbeClassifier

    X, y = rng.standard_normal((20, 8)).astype(np.float32), np.arange(20) % 2
    with pytest.raises(ConfigError, match=match):
        ProbeClassifier(epochs=1, **kw).fit(X, y)


def test_a_probe_that_fits_still_trains(monkeypatch, rng):
    from probes.training import ProbeClassifier

    monkeypatch.setenv(memory.ENV_VAR, "1G")
    X, y = rng.standard_normal((20, 8)).astype(np.float32), np.arange(20) % 2
    assert ProbeClassifier(layer="cp", n_experts=4, hidden=16, epochs=1).fit(X, y).n_params_ > 0


@pytest.fixture(scope="module")
def bridge(tmp_path_factory):
    return open_source(make_tiny_llama(tmp_path_factory.mktemp("llama") / "m")).boot_bridge()


def test_more_svd_directions_than_d_model_are_refused_before_the_forward(bridge, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the forward pass ran before k was checked")

    monkeypatch.setattr(steer_collect, "run_activations", boom)
    with pytest.raises(ConfigError, match=r"k=1000000000 SVD directions per layer is more than a layer has \(at most "
                                          r"d_model=32\); ask for k <= 32 \(--k\)"):
        S.extract(bridge, load_contrasts("numpy-torch"), k=10 ** 9)


def test_extract_directions_checks_k_against_the_activations(bridge):
    acts = S.collect(bridge, load_contrasts("numpy-torch"), layers=[0])
    with pytest.raises(ConfigError, match=r"k=33 SVD directions per layer is more than a layer has"):
        S.extract_directions(acts, load_contrasts("numpy-torch"), k=33)
    assert S.extract_directions(acts, load_contrasts("numpy-torch"), k=32).svd_directions.shape == (1, 32, 32)


@pytest.mark.parametrize("k", [0, -1, 2.5, True], ids=repr)
def test_api_refuses_a_bad_k_before_booting(k, monkeypatch, store):
    from analysis import model_cache
    from analysis.steering import pipeline

    def boom(*a, **kw):
        raise AssertionError("the model was booted before k was checked")

    monkeypatch.setattr(model_cache, "bridge", boom)
    with pytest.raises(ConfigError, match=rf"k={k!r} must be an integer >= 1"):
        pipeline.steer_extract("minilm", "numpy-torch", k=k, store=store)
