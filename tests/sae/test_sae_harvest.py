"""Harvesting hook_z (sae/harvest.py) and loss recovered on a real forward pass (sae/lm_loss.py).

Independent truths: a freshly loaded Hugging Face model run on each text alone (no padding,
no bridge) with a pre-hook on ``o_proj`` (its input is the flattened attention output
hook_z); the tokenizer's own ids; forward-call counters; a hand-built SAE that reconstructs
exactly (loss recovered 1) or outputs zeros (0).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _support import assert_close_f32
from analysis.errors import ConfigError, SourceError
from sae.config import SAEConfig, hook_name_for
from sae.harvest import boot, harvest, open_activation_cache, sae_corpus, tokenize
from sae.lm_loss import causal_lm_loss_fn, model_kind
from sae.metrics import loss_recovered, zero_patch
from sae.model import SAE

TEXTS = ["numpy arrays and pandas frames", "torch tensors", "json dumps " * 30, "pandas frames of numpy arrays",
         "   ", "tensors"]


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    from _tiny_mixtral import make_tiny_mixtral

    return make_tiny_mixtral(tmp_path_factory.mktemp("mixtral"))


@pytest.fixture(scope="module")
def mixtral(mixtral_dir):
    return boot(str(mixtral_dir))


def _reference_z(model_dir, layer, ids):
    """hook_z of each token list run alone through a fresh HF model: input of o_proj."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    got = []
    handle = model.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(
        lambda m, args: got.append(args[0][0].detach().clone()))
    try:
        with torch.no_grad():
            for x in ids:
                model(torch.tensor([x]))
    finally:
        handle.remove()
    return got


def test_harvest_matches_hf_forward_per_text(mixtral_dir, mixtral, tmp_path):
    src, bridge = mixtral
    cache = harvest(src, 1, TEXTS, max_tokens=24, batch_tokens=40, cache_dir=tmp_path, bridge=bridge)
    texts = [t for t in TEXTS if t.strip()]
    assert cache.texts == texts and (cache.n_heads, cache.d_head, cache.d_in) == (4, 8, 32)
    tok = bridge.tokenizer
    ids = [[tok.bos_token_id, *tok(t, add_special_tokens=False)["input_ids"]][:24] for t in texts]
    assert sum(map(len, ids)) == cache.n_tokens and max(map(len, ids)) == 24  # padding excluded, truncated
    ref = _reference_z(mixtral_dir, 1, ids)
    for i, (x, z) in enumerate(zip(ids, ref)):
        rows = cache.doc_ids == i
        np.testing.assert_array_equal(cache.token_ids[rows], x)
        np.testing.assert_array_equal(cache.positions[rows], np.arange(len(x)))
        assert_close_f32(cache.acts[rows], z.numpy())
    assert not cache.acts.flags.writeable


def test_harvest_stops_after_the_layer(mixtral, tmp_path):
    src, bridge = mixtral
    calls = []
    later = bridge.original_model.model.layers[1].mlp
    handle = later.register_forward_hook(lambda *a: calls.append(1))
    try:
        harvest(src, 0, TEXTS[:2], cache_dir=tmp_path, bridge=bridge)
        assert calls == []  # layer 1's MLP never ran
        with torch.no_grad():
            bridge(torch.tensor([[1, 5, 6]]))
        assert calls == [1]  # (the counter works)
    finally:
        handle.remove()


def test_cache_is_reused_and_keyed(mixtral, tmp_path):
    src, bridge = mixtral
    first = harvest(src, 1, TEXTS, cache_dir=tmp_path, bridge=bridge)

    class NoForward:  # a bridge that must not be run: the cached copy is returned
        hook_dict, tokenizer, cfg = bridge.hook_dict, bridge.tokenizer, bridge.cfg

        def run_with_hooks(self, *a, **k):
            raise AssertionError("the model ran although the cache holds these activations")

    again = harvest(src, 1, TEXTS, cache_dir=tmp_path, bridge=NoForward())
    assert again.path == first.path
    other = harvest(src, 1, TEXTS, max_tokens=8, cache_dir=tmp_path, bridge=bridge)
    assert other.path != first.path and other.n_tokens < first.n_tokens
    assert open_activation_cache(first.path).n_tokens == first.n_tokens


def test_interrupted_harvest_leaves_no_cache(mixtral, tmp_path):
    src, bridge = mixtral

    def stop(done, total, label):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        harvest(src, 1, TEXTS, batch_tokens=16, cache_dir=tmp_path, bridge=bridge, progress=stop)
    assert list(tmp_path.iterdir()) == []
    assert harvest(src, 1, TEXTS, batch_tokens=16, cache_dir=tmp_path, bridge=bridge).n_tokens > 0


def test_bfloat16_harvest_is_close(mixtral, tmp_path):
    src, bridge = mixtral
    a = harvest(src, 1, TEXTS, cache_dir=tmp_path, bridge=bridge)
    b = harvest(src, 1, TEXTS, cache_dir=tmp_path, bridge=bridge, dtype="bfloat16")
    assert a.path != b.path
    rel = np.linalg.norm(b.acts - a.acts) / np.linalg.norm(a.acts)
    assert 0 < rel < 0.03


def test_bad_inputs(mixtral, tmp_path):
    src, bridge = mixtral
    with pytest.raises(ConfigError, match="layer 7 has no attention hook_z; valid layers are \\[0, 1\\]"):
        harvest(src, 7, TEXTS, cache_dir=tmp_path, bridge=bridge)
    with pytest.raises(ConfigError, match="the corpus is empty"):
        harvest(src, 0, ["", "  "], cache_dir=tmp_path, bridge=bridge)
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    with pytest.raises(SourceError, match="attention-output SAEs need a model with attention layers"):
        harvest(mlp, 0, TEXTS, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_sae_corpus_split_is_disjoint_and_deterministic():
    train, held = sae_corpus("train"), sae_corpus("eval")
    assert len(held) > 100 and len(train) > 8 * len(held)
    assert not {d.text for d in train} & {d.text for d in held}
    assert [d.text for d in sae_corpus("eval")] == [d.text for d in held]
    assert {d.package for d in held} == {d.package for d in train}


# ------------------------------------------------------------------------ loss recovered
def _exact_sae(d_in: int, layer: int) -> SAE:
    """x_hat = ReLU(x) - ReLU(-x) = x: W_enc = [I, -I], W_dec = [I; -I], biases 0."""
    sae = SAE(SAEConfig(d_in=d_in, d_sae=2 * d_in, layer=layer, hook_name=hook_name_for(layer), b_dec_init="zero"))
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_loss_recovered_on_a_causal_lm(mixtral):
    src, bridge = mixtral
    assert model_kind(bridge) == "causal"
    loss_fn = causal_lm_loss_fn(bridge, 1, TEXTS)
    clean = loss_fn(None)
    assert loss_fn(lambda z: z.clone()) == pytest.approx(clean, abs=1e-6)
    assert loss_fn(zero_patch) != pytest.approx(clean, abs=1e-3)
    exact = loss_recovered(_exact_sae(32, 1), loss_fn)
    assert exact.recovered == pytest.approx(1.0, abs=1e-4) and exact.sae == pytest.approx(clean, abs=1e-5)
    dead = _exact_sae(32, 1)
    with torch.no_grad():
        dead.b_enc.fill_(-1e6)  # nothing fires: x_hat = b_dec = 0, the zero ablation
    assert loss_recovered(dead, loss_fn).recovered == pytest.approx(0.0, abs=1e-6)
    # the reference: next-token cross-entropy of the bare HF model on the same ids
    import torch.nn.functional as F

    ids = [x for x in tokenize(bridge.tokenizer, [t for t in TEXTS if t.strip()], 64) if len(x) >= 2]
    total = count = 0
    with torch.no_grad():
        for x in ids:
            logits = bridge.original_model(torch.tensor([x])).logits[0, :-1]
            total += float(F.cross_entropy(logits, torch.tensor(x[1:]), reduction="sum"))
            count += len(x) - 1
    assert clean == pytest.approx(total / count, rel=1e-5)
