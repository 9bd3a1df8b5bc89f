"""Masked-token loss on MiniLM: masking rule, the trained head, loss under hooks vs an HF reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from analysis.errors import ConfigError, ShapeError, SourceError
from analysis.models.masked_lm import IGNORE, attach_mlm_head, head_parameters, mask_tokens, masked_token_loss
from analysis.models.mlm_head import MLMHeadConfig, train_mlm_head

TEXTS = ["Return the indices of the maximum values along an axis.",
         "Read a comma-separated values file into a DataFrame.",
         "Compute the singular value decomposition of a matrix.",
         "ok"]
TINY = MLMHeadConfig(n_texts=40, epochs=2, max_tokens=48, batch_size=128)


@pytest.fixture(scope="module")
def head(minilm, models_root):
    return train_mlm_head(minilm, TINY)


@pytest.fixture(scope="module")
def bridge(minilm, head):
    b = minilm.boot_bridge()
    attach_mlm_head(b, head.path)
    return b


def test_masking_rule(minilm):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm.hf_dir)
    a = mask_tokens(tok, TEXTS, mask_rate=0.3, seed=3)
    b = mask_tokens(tok, TEXTS, mask_rate=0.3, seed=3)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    plain = tok(TEXTS, padding=True, return_tensors="pt", return_special_tokens_mask=True)
    masked = a.labels != IGNORE
    assert masked.any(1).all()  # at least one per text, also the 1-token "ok"
    assert not (masked & (plain["special_tokens_mask"] == 1)).any()  # never [CLS]/[SEP]
    assert not (masked & (plain["attention_mask"] == 0)).any()  # never padding
    assert torch.equal(a.labels[masked], plain["input_ids"][masked])
    assert (a.input_ids[masked] == tok.mask_token_id).all()
    assert torch.equal(a.input_ids[~masked], plain["input_ids"][~masked])
    assert not torch.equal(mask_tokens(tok, TEXTS, mask_rate=0.3, seed=4).labels, a.labels)


def test_head_training_learns_and_is_cached(minilm, head):
    m = head.metrics
    assert m["train_loss"] < m["initial_train_loss"] - 0.1
    again = train_mlm_head(minilm, TINY)
    assert again.reused and again.path == head.path and again.metrics == m


def test_loss_matches_hf_reference(minilm, head, bridge):
    """Bridge + attached head vs an independent BertForMaskedLM with the head loaded, and a
    manual cross-entropy over the masked positions."""
    from analysis.models.mlm_head import _load_mlm_model

    hf, tok = _load_mlm_model(minilm.hf_dir)
    attach_mlm_head(hf, head.path)
    batch = mask_tokens(tok, TEXTS, seed=1)
    with torch.no_grad():
        logits = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    keep = batch.labels != IGNORE
    want = float(F.cross_entropy(logits[keep], batch.labels[keep]))
    assert masked_token_loss(bridge, batch, batch_size=2) == pytest.approx(want, rel=1e-4)
    assert masked_token_loss(hf, batch) == pytest.approx(want, rel=1e-4)


def test_hooks_apply_and_are_removed(bridge):
    tok = bridge.tokenizer
    batch = mask_tokens(tok, TEXTS, seed=2)
    clean = masked_token_loss(bridge, batch)
    same = masked_token_loss(bridge, batch, fwd_hooks=[("blocks.2.attn.hook_z", lambda z, hook: z)])
    ablated = masked_token_loss(bridge, batch, fwd_hooks=[("blocks.2.attn.hook_z", lambda z, hook: torch.zeros_like(z))])
    assert same == pytest.approx(clean, rel=1e-6)
    assert abs(ablated - clean) > 1e-3
    assert masked_token_loss(bridge, batch) == pytest.approx(clean, rel=1e-6)  # nothing left attached


def test_bad_input(minilm, bridge, head, tmp_path):
    tok = bridge.tokenizer
    with pytest.raises(ConfigError, match="mask_rate=0"):
        mask_tokens(tok, TEXTS, mask_rate=0)
    with pytest.raises(ConfigError, match="no non-empty texts"):
        mask_tokens(tok, ["", "  "])
    with pytest.raises(ConfigError, match="n_texts=5"):
        MLMHeadConfig(n_texts=5)
    bad = {n: p.detach().clone() for n, p in head_parameters(bridge).items()}
    bad["bias"] = bad["bias"][:10]
    with pytest.raises(ShapeError, match="another model"):
        attach_mlm_head(bridge, bad)
    (tmp_path / "h.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(SourceError, match="retrain"):
        attach_mlm_head(bridge, tmp_path / "h.safetensors")
    with pytest.raises(SourceError, match="no cls.predictions head"):
        attach_mlm_head(torch.nn.Linear(2, 2), head.path)
