"""Measured effect of steering: the concept log-probability of a trained tiny LM moves monotonically with
α, KL and the metrics match direct computations, and MiniLM's embeddings shift toward the target class."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _tiny_llama import make_tiny_llama

from analysis.steering import effect as E
from analysis.steering import extract as S
from analysis.models import tiny_lm as tiny_models
from analysis.steering.contrasts import load_contrasts
from analysis.errors import ConfigError
from analysis.sources import open_source
from analysis.steering.hooks import attached_hook_count, steering, steering_hooks
from analysis.steering.vectors import from_extraction

# Used when the bundled bilinear-lm is not in the model cache yet (it trains in ~2 min): a smaller
# bilinear Llama on the numpy/torch/pandas/scipy docstrings that trains in ~20 s and already tells
# np from torch.
FALLBACK_LM = dict(steps=500, vocab_size=1024, d_model=64, n_layers=2, n_heads=4, d_mlp=128, ctx=48, batch_size=16,
                   warmup=20, per_package=400, packages=("numpy", "torch", "pandas", "scipy"))
NORM_ALPHAS = (-0.6, -0.4, -0.2, -0.1, 0.0, 0.1, 0.2, 0.4, 0.6)


@pytest.fixture(scope="module")
def trained_lm(tmp_path_factory):
    """The bundled bilinear-lm when it is cached, otherwise the fallback trained into a temp dir."""
    cached = tiny_models.models_dir() / f"bilinear-llama-{tiny_models.config_key(tiny_models.TinyLMConfig().to_dict())}"
    if (cached / "model.safetensors").is_file() and (cached / tiny_models.INFO_FILE).is_file():
        path = cached
    else:
        path = tiny_models.train_tiny_lm("bilinear-llama", tmp_path_factory.mktemp("lm") / "lm", **FALLBACK_LM).path
    return open_source(path).boot_bridge()


@pytest.fixture(scope="module")
def random_lm(tmp_path_factory):
    return open_source(make_tiny_llama(tmp_path_factory.mktemp("llama") / "m")).boot_bridge()


def single_token(bridge, words):
    return [w for w in words if len(bridge.tokenizer(w, add_special_tokens=False)["input_ids"]) == 1]


def test_steering_a_trained_lm_moves_the_concept_log_prob_monotonically(trained_lm):
    cs = load_contrasts("numpy-torch")
    ext = S.extract(trained_lm, cs, hook="resid_post", position="last", layers=[0])
    assert ext.table.query("method == 'mean_diff'")["auc_test"].iloc[0] > 0.75  # the LM tells torch from numpy
    pos, neg = single_token(trained_lm, cs.concept_positive), single_token(trained_lm, cs.concept_negative)
    assert pos and neg
    dr = E.dose_response(trained_lm, from_extraction(ext, 0), cs, NORM_ALPHAS, scale="norm", concept_pos=pos,
                         concept_neg=neg)
    t = dr.table
    assert list(t["alpha"]) == list(NORM_ALPHAS)
    assert (np.diff(t["logp_pos"]) > 0).all(), t  # toward torch: log p(torch tokens) rises at every step
    assert (np.diff(t["logp_neg"]) < 0).all(), t  # ... and log p(numpy tokens) falls
    assert t["delta_pos"].iloc[-1] > 0.5 and t["delta_neg"].iloc[0] > 0.5  # by a visible margin (nats)
    kl = t.set_index("alpha")["kl"]
    assert kl[0.0] == pytest.approx(0.0, abs=1e-9)
    assert (np.diff(kl[kl.index >= 0]) > 0).all() and (np.diff(kl[kl.index <= 0]) < 0).all()
    assert attached_hook_count(trained_lm) == 0


def test_dose_response_matches_a_direct_computation(random_lm):
    cs = load_contrasts("numpy-torch")
    vec = from_extraction(S.extract(random_lm, cs, layers=[1]), 1)
    dr = E.dose_response(random_lm, vec, cs, (-2.0, 3.0), concept_pos=[" tensor", " torch"], concept_neg=[" array"])
    texts = [p.positive for p in cs.test] + [p.negative for p in cs.test]
    tok = random_lm.tokenizer
    pos_ids = [tok(w, add_special_tokens=False)["input_ids"][0] for w in (" tensor", " torch")]
    # independent path: one text at a time, no padding, explicit hooks, float64 softmax
    logp0, logp3, kls = [], [], []
    for text in texts:
        ids, _ = S.tokenize(random_lm, [text])
        with torch.no_grad():
            p0 = torch.log_softmax(random_lm(ids)[0].double(), -1)
            with random_lm.hooks(fwd_hooks=steering_hooks(random_lm, vec, alpha=3.0)):
                p3 = torch.log_softmax(random_lm(ids)[0].double(), -1)
        logp0.append(torch.logsumexp(p0[:, pos_ids], -1))
        logp3.append(torch.logsumexp(p3[:, pos_ids], -1))
        kls.append((p0.exp() * (p0 - p3)).sum(-1))
    row = dr.table.set_index("alpha").loc[3.0]
    assert row["logp_pos"] == pytest.approx(float(torch.cat(logp3).mean()), abs=1e-5)
    assert row["delta_pos"] == pytest.approx(float(torch.cat(logp3).mean() - torch.cat(logp0).mean()), abs=1e-5)
    assert row["kl"] == pytest.approx(float(torch.cat(kls).mean()), abs=1e-5)


def test_generation_and_layer_sweep(random_lm):
    cs = load_contrasts("numpy-torch")
    ext = S.extract(random_lm, cs)
    out = E.compare_generations(random_lm, from_extraction(ext, 0), "Return a new", alpha=0.8, scale="norm",
                                max_new_tokens=8)
    assert set(out) == {"unsteered", "steered"} and all(isinstance(v, str) and v for v in out.values())
    assert out["unsteered"] == E.greedy_generate(random_lm, "Return a new", max_new_tokens=8)  # deterministic
    assert out["steered"] != out["unsteered"]
    sweep = E.layer_sweep(random_lm, ext, cs, alpha=0.5, scale="norm")
    assert list(sweep["layer"]) == [0, 1] and (sweep["kl"] > 0).all()
    np.testing.assert_allclose(sweep["auc_test"], ext.table.query("method == 'mean_diff'")["auc_test"])
    assert attached_hook_count(random_lm) == 0


def test_effect_arguments_are_checked(random_lm):
    cs = load_contrasts("numpy-torch")
    vec = from_extraction(S.extract(random_lm, cs, layers=[0]), 0)
    with pytest.raises(ConfigError, match="alpha=nan must be a finite number"):
        E.dose_response(random_lm, vec, cs, (0.0, float("nan")))
    with pytest.raises(ConfigError, match="non-empty list"):
        E.dose_response(random_lm, vec, cs, ())
    with pytest.raises(ConfigError, match=r"concept token ' numpyish' encodes to \d+ tokens"):
        E.dose_response(random_lm, vec, cs, (1.0,), concept_pos=[" numpyish"])
    with pytest.raises(ConfigError, match="max_new_tokens=0"):
        E.greedy_generate(random_lm, "x", max_new_tokens=0)


def test_minilm_embeddings_shift_toward_the_target_class(minilm):
    from analysis.models.encoder import load_encoder, mean_pool
    from analysis.models.masked_lm import mask_tokens, masked_token_loss

    bridge = minilm.boot_bridge()  # its MLM head is random: fine for checking the loss plumbing, not its value
    assert all(S.hook_name(bridge, 5, hook) in bridge.hook_dict for hook in S.HOOKS)  # BERT has the same hook names
    cs = load_contrasts("positive-negative")
    ext = S.extract(bridge, cs, position="mean", layers=[3])
    assert ext.table.query("method == 'mean_diff'")["auc_test"].iloc[0] > 0.85
    vec = from_extraction(ext, 3)
    batch = mask_tokens(bridge.tokenizer, cs.texts("test")[0][:4], seed=0)
    dr = E.dose_response(bridge, vec, cs, (-2.0, -1.0, 1.0, 2.0), masked_batch=batch)
    t = dr.table
    assert dr.kind == "encoder" and (np.diff(t["shift"]) > 0).all() and (np.diff(t["margin"]) > 0).all(), t
    # the unsteered embeddings are sentence-transformers' mean pooling of the HF encoder
    model, tok = load_encoder(minilm.hf_dir)
    neg = cs.texts("test")[1]
    enc = tok(neg, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = mean_pool(model(**enc).last_hidden_state, enc["attention_mask"])
    torch.testing.assert_close(E.sentence_embeddings(bridge, neg), want, atol=1e-4, rtol=0)
    # masked loss under steering = masked_token_loss with the same hooks passed explicitly
    hooks = steering_hooks(bridge, vec, alpha=2.0)
    assert t.set_index("alpha").loc[2.0, "masked_loss"] == pytest.approx(masked_token_loss(bridge, batch,
                                                                                           fwd_hooks=hooks), rel=1e-5)
    with pytest.raises(ConfigError, match="needs a causal LM"):
        E.greedy_generate(bridge, "hello")
    with steering(bridge, vec, alpha=1.0):
        pass
    assert attached_hook_count(bridge) == 0
