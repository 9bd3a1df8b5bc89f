"""KL divergence recovered by splicing (sae/lm_kl.py) against torch's kl_div, closed forms and the model.

Independent truths: ``torch.nn.functional.kl_div`` on the same logits, an identity patch (KL exactly 0,
recovered 1), the HF model's own logits for the clean pass, and the evaluation pipeline's stored metrics.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _tiny_llama import make_tiny_llama

from analysis.errors import ConfigError
from sae.lm_kl import causal_batches, kl_recovered, kl_sum
from sae.metrics import zero_patch


def test_kl_sum_matches_torch_kl_div(rng):
    a = torch.from_numpy(rng.standard_normal((3, 5, 11)))
    b = torch.from_numpy(rng.standard_normal((3, 5, 11)))
    where = torch.from_numpy(rng.random((3, 5)) < 0.6)
    want = F.kl_div(F.log_softmax(b[where], -1), F.log_softmax(a[where], -1), log_target=True, reduction="sum")
    assert kl_sum(a, b, where) == pytest.approx(float(want), rel=1e-12)
    assert kl_sum(a, a, where) == 0.0


def test_kl_recovered_of_known_runs(rng):
    clean = torch.from_numpy(rng.standard_normal((2, 4, 7)))
    noisy = clean + torch.from_numpy(rng.standard_normal((2, 4, 7)))
    flat = torch.zeros_like(clean)
    where = torch.ones(2, 4, dtype=torch.bool)
    sae_patch = object()  # the fake run tells the patches apart by identity

    def run(patch):
        return clean if patch is None else noisy if patch is sae_patch else flat

    got = kl_recovered([(run, where)], sae_patch, zero_patch)
    k_sae, k_zero = kl_sum(clean, noisy, where) / 8, kl_sum(clean, flat, where) / 8
    assert (got.sae, got.zero, got.n_positions) == pytest.approx((k_sae, k_zero, 8))
    assert got.recovered == pytest.approx((k_zero - k_sae) / k_zero)
    with pytest.raises(ConfigError, match="no scored positions"):
        kl_recovered([(run, torch.zeros(2, 4, dtype=torch.bool))], sae_patch, zero_patch)


def test_causal_batches_on_a_tiny_llama(tmp_path):
    from sae.harvest import boot

    src, bridge = boot(str(make_tiny_llama(tmp_path / "llama")))
    texts = ["the tensor of a frame returns a new array", "a path", "x"]
    batches = causal_batches(bridge, 1, texts, max_tokens=16)
    got = kl_recovered(batches, lambda z: z, zero_patch)  # an exact "SAE": nothing changes
    assert got.sae == 0.0 and got.recovered == 1.0 and got.zero > 0
    # Scored positions: every real token followed by a real one (texts of one token score nothing).
    ids = [bridge.tokenizer(t)["input_ids"][:16] for t in texts]
    assert got.n_positions == sum(len(i) - 1 for i in ids if len(i) >= 2)
    run, where = batches[0]
    with torch.inference_mode():
        logits = run(None)
    assert torch.isfinite(logits).all() and where.shape == logits.shape[:2]
    noise = lambda z: z + 0.5 * torch.ones_like(z)  # noqa: E731
    half = kl_recovered(batches, noise, zero_patch)
    assert half.sae > 0 and half.zero == pytest.approx(got.zero, rel=1e-9)
    assert half.recovered == pytest.approx((got.zero - half.sae) / got.zero, rel=1e-9)
    assert np.isfinite(half.recovered)


def test_sae_eval_stores_kl_recovered(tmp_path, monkeypatch):
    from app import api
    from sae.harvest import boot
    from sae.metrics import sae_patch

    monkeypatch.setenv("LENSLAB_ACTIVATIONS", str(tmp_path / "acts"))
    llama = str(make_tiny_llama(tmp_path / "llama"))
    words = ["tensor", "array", "frame", "model", "value", "index", "shape", "file"]
    train = [f"the {a} of a {b} returns a new {c}" for a in words for b in words for c in words[:2]]
    held = [f"a {a} with the {b} of each {a}" for a in words for b in words[:3]]
    store = tmp_path / "store"
    key = api.sae_train(llama, layer=1, texts=train, d_sae=32, k=4, n_tokens=20 * 128, batch_size=128,
                        store=store, device="cpu").key
    ev = api.sae_eval(key, texts=held, loss_docs=8, store=store, device="cpu")
    _, bridge = boot(llama)
    trained = api.load_sae(key, store=store)
    want = kl_recovered(causal_batches(bridge, 1, held[:8], max_tokens=128), sae_patch(trained.sae), zero_patch)
    assert ev.metrics["kl_sae"] == pytest.approx(want.sae, rel=1e-6)
    assert ev.metrics["kl_zero"] == pytest.approx(want.zero, rel=1e-6)
    assert ev.metrics["kl_recovered"] == pytest.approx(want.recovered, rel=1e-6)
