"""Contrast extraction in bounded batches (``analysis.steering.collect.collect``): the forward pass
runs ceil(n / batch_size) times on at most 2 x batch_size texts, the batched activations and
directions equal one forward over the whole set (tiny Llama and MiniLM, both padding sides),
bad batch sizes are refused before any model boots, and (child process) 2,000 short pairs on
MiniLM grow the peak resident size by a bounded amount.

Independent truths: one forward pass over every text (the former implementation), the count of
forward calls, the measured peak resident size.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from _tiny_llama import make_tiny_llama

from analysis.steering import collect as steer_collect
from analysis.steering import extract as S
from analysis.steering.contrasts import load_contrasts, parse_contrasts
from analysis.errors import ConfigError
from analysis.sources import open_source

PROBE = (Path(__file__).resolve().parents[2] / "_peak_rss.py")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = make_tiny_llama(tmp_path_factory.mktemp("llama") / "m")
    return d, open_source(d).boot_bridge()


@pytest.fixture(scope="module")
def minilm_bridge(minilm):
    return minilm.boot_bridge().eval()


def synthetic(n: int):
    """n short pairs (every 4th held out)."""
    words = ["tensor", "array", "frame", "model", "value", "index", "shape", "file"]
    return parse_contrasts("\n".join(json.dumps({"positive": f"numpy returns an {words[i % 8]} {i}",
                                                 "negative": f"torch gives the {words[(i + 3) % 8]} {i}"})
                                     for i in range(n)))


def assert_same_activations(a, b) -> None:
    """Equal to float32 rounding, scaled to the activations' magnitude."""
    scale = max(float(np.abs(b.pos).max()), float(np.abs(b.neg).max()))
    np.testing.assert_allclose(a.pos, b.pos, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(a.neg, b.neg, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(a.act_norm, b.act_norm, rtol=1e-5)
    np.testing.assert_array_equal(a.lengths, b.lengths)
    assert a.layers == b.layers and a.pos.dtype == np.float32


@pytest.fixture
def forward_calls(monkeypatch):
    """Rows of every forward pass ``collect`` makes."""
    rows: list[int] = []
    real = steer_collect.run_activations

    def counting(bridge, ids, mask, names):
        rows.append(int(ids.shape[0]))
        return real(bridge, ids, mask, names)

    monkeypatch.setattr(steer_collect, "run_activations", counting)
    return rows


# ------------------------------------------------------------------------- chunks
@pytest.mark.parametrize("n, batch", [(200, 32), (49, 5), (7, 7), (7, 100)], ids=str)
def test_the_forward_runs_in_ceil_n_over_batch_chunks(llama, forward_calls, n, batch):
    _, bridge = llama
    cs = synthetic(n)
    acts = S.collect(bridge, cs, layers=[1], batch_size=batch)
    assert len(forward_calls) == math.ceil(n / batch)
    assert forward_calls == [2 * min(batch, n - s) for s in range(0, n, batch)]
    assert acts.pos.shape == (1, n, bridge.cfg.d_model)


def test_the_default_batch_is_32_pairs(llama, forward_calls):
    _, bridge = llama
    S.collect(bridge, synthetic(100), layers=[0])
    assert S.DEFAULT_BATCH_PAIRS == 32 and forward_calls == [64, 64, 64, 8]


def test_progress_reports_each_batch(llama):
    _, bridge = llama
    seen = []
    S.collect(bridge, synthetic(10), layers=[0], batch_size=4, progress=lambda d, t, s: seen.append((d, t, s)))
    assert seen == [(0, 3, "forward pass: pairs 1-4 of 10"), (1, 3, "forward pass: pairs 5-8 of 10"),
                    (2, 3, "forward pass: pairs 9-10 of 10")]


# ------------------------------------------------------------------------- batched == one forward
@pytest.mark.parametrize("position, padding_side", [("last", "right"), ("mean", "left"), ("index:-2", "right")],
                         ids=str)
def test_batched_activations_equal_one_forward_on_a_causal_lm(llama, position, padding_side):
    _, bridge = llama
    cs = load_contrasts("numpy-torch")
    if position.startswith("index"):  # index rules need pairs of equal token length
        keep = [p for p in cs.pairs if len(S.token_rows(bridge, [p.positive])[0]) ==
                len(S.token_rows(bridge, [p.negative])[0])]
        cs = parse_contrasts("\n".join(json.dumps({"positive": p.positive, "negative": p.negative,
                                                   "split": p.split}) for p in keep))
    n = len(cs.pairs)
    one = S.collect(bridge, cs, hook="resid_post", position=position, padding_side=padding_side, batch_size=n)
    for batch in (1, 3, 8):
        assert_same_activations(S.collect(bridge, cs, hook="resid_post", position=position,
                                          padding_side=padding_side, batch_size=batch), one)


@pytest.mark.parametrize("position", ["last", "mean"])
def test_batched_activations_equal_one_forward_on_minilm(minilm_bridge, position):
    cs = load_contrasts("positive-negative")
    kw = dict(hook="resid_post", position=position, layers=[0, 5])
    assert_same_activations(S.collect(minilm_bridge, cs, batch_size=5, **kw),
                            S.collect(minilm_bridge, cs, batch_size=len(cs.pairs), **kw))


def test_batched_extraction_equals_one_forward(llama):
    _, bridge = llama
    cs = load_contrasts("code-prose")
    one = S.extract(bridge, cs, methods=("mean_diff", "pca"), batch_size=len(cs.pairs))
    batched = S.extract(bridge, cs, methods=("mean_diff", "pca"), batch_size=4)
    scale = float(np.abs(one.vectors).max())
    np.testing.assert_allclose(batched.vectors, one.vectors, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(batched.svd_directions, one.svd_directions, rtol=0, atol=1e-4)
    for col in ("auc_test", "auc_train", "pair_acc_test"):
        np.testing.assert_array_equal(batched.table[col], one.table[col])
    np.testing.assert_allclose(batched.table["norm"], one.table["norm"], rtol=1e-5)


# ------------------------------------------------------------------------- bad batch sizes
BAD = [0, -3, 2.5, True, "8"]


@pytest.mark.parametrize("batch", BAD, ids=repr)
def test_a_bad_batch_size_is_refused_before_any_forward(llama, forward_calls, batch):
    _, bridge = llama
    with pytest.raises(ConfigError, match=rf"batch_size={batch!r} must be an integer >= 1: the contrast pairs run "
                                          r"through the model per forward pass \(default 32"):
        S.extract(bridge, load_contrasts("numpy-torch"), batch_size=batch)
    assert forward_calls == []


def test_api_refuses_a_bad_batch_size_before_booting(llama, monkeypatch, store):
    from analysis import model_cache
    from analysis.steering import pipeline

    def boom(*a, **k):
        raise AssertionError("the model was booted before batch_size was checked")

    monkeypatch.setattr(model_cache, "bridge", boom)
    with pytest.raises(ConfigError, match=r"batch_size=0 must be an integer >= 1"):
        pipeline.steer_extract(llama[0], "numpy-torch", batch_size=0, store=store)


def test_cli_passes_batch_size_and_batch_size_is_not_in_the_cache_key(llama, store):
    from app.cli import app

    res = CliRunner().invoke(app, ["steer", "extract", str(llama[0]), "numpy-torch", "--batch-size", "3", "--json",
                                   "--store", str(store.root)])
    assert res.exit_code == 0, res.output
    (entry,) = store.list()
    assert "batch_size" not in entry.params
    res = CliRunner().invoke(app, ["steer", "extract", str(llama[0]), "numpy-torch", "--batch-size", "0",
                                   "--store", str(store.root)])
    assert isinstance(res.exception, ConfigError) and "batch_size=0" in str(res.exception)


# ------------------------------------------------------------------------- dose-response in batches
def test_lm_dose_response_in_batches_equals_one_forward(llama, monkeypatch):
    from analysis.steering import effect as E
    from analysis.steering.vectors import from_extraction

    _, bridge = llama
    cs = load_contrasts("numpy-torch")
    vec = from_extraction(S.extract(bridge, cs, layers=[0], methods=("mean_diff",)), 0)
    texts = [t for p in cs.test for t in (p.positive, p.negative)]
    kw = dict(concept_pos=[" tensor", " torch"], concept_neg=[" array"], scale="norm")
    monkeypatch.setattr(E, "BATCH_TEXTS", len(texts))
    one = E.lm_dose_response(bridge, vec, texts, (-2.0, 3.0), **kw).table
    calls = []
    real = E._lm_logprobs
    monkeypatch.setattr(E, "_lm_logprobs", lambda b, ids, mask: calls.append(ids.shape[0]) or real(b, ids, mask))
    monkeypatch.setattr(E, "BATCH_TEXTS", 5)
    batched = E.lm_dose_response(bridge, vec, texts, (-2.0, 3.0), **kw).table
    n_batches = math.ceil(len(texts) / 5)
    assert len(calls) == 3 * n_batches and max(calls) == 5  # alpha 0 once, then -2 and 3, per batch
    for col in ("logp_pos", "logp_neg", "delta_pos", "kl", "nll"):
        np.testing.assert_allclose(batched[col], one[col], rtol=1e-5, atol=1e-6, err_msg=col)


def test_sentence_embeddings_in_batches_equal_one_forward(minilm_bridge, monkeypatch):
    from analysis.steering import effect as E

    texts = [p.positive for p in load_contrasts("positive-negative").pairs]
    monkeypatch.setattr(E, "BATCH_TEXTS", len(texts))
    one = E.sentence_embeddings(minilm_bridge, texts)
    calls = []
    real = E.run_activations
    monkeypatch.setattr(E, "run_activations", lambda b, ids, *a: calls.append(ids.shape[0]) or real(b, ids, *a))
    monkeypatch.setattr(E, "BATCH_TEXTS", 7)
    batched = E.sentence_embeddings(minilm_bridge, texts)
    assert calls == [min(7, len(texts) - s) for s in range(0, len(texts), 7)]
    np.testing.assert_allclose(batched.numpy(), one.numpy(), rtol=0, atol=1e-5)  # unit vectors


# ------------------------------------------------------------------------- bounded memory
def test_the_forward_stops_after_the_last_requested_hook_and_leaves_no_hook(llama):
    """No later block and no logits run (they would cost batch x pos x vocab floats)."""
    from analysis.steering.hooks import attached_hook_count

    _, bridge = llama
    later = []
    bridge.hook_dict["blocks.1.hook_resid_pre"].add_hook(lambda t, hook: later.append(1))
    try:
        acts = S.collect(bridge, synthetic(6), hook="resid_post", layers=[0], batch_size=2)
    finally:
        bridge.reset_hooks()
    assert later == [] and acts.pos.shape == (1, 6, bridge.cfg.d_model)
    assert attached_hook_count(bridge) == 0


STEER_PAIRS, STEER_BOUND = 2_000, 150 << 20


@pytest.mark.slow
def test_2000_minilm_pairs_grow_peak_memory_by_a_bounded_amount():
    """2,000 short pairs (4,000 texts) on MiniLM, all 6 layers, batches of 32 pairs: peak RSS
    growth stays below 150 MiB (measured 88 MiB; the result itself, 6 x 2,000 x 384 float32 x 2,
    is 35 MiB). One forward over the whole set, logits included, grew it by 6.0 GB. ~40 s."""
    out = subprocess.run([sys.executable, str(PROBE), "steer", str(STEER_PAIRS), "32"], capture_output=True,
                         text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    assert rep["result"] == [6, STEER_PAIRS, 384] and rep["growth"] < STEER_BOUND, rep
