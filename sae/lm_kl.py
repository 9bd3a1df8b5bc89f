"""KL divergence recovered by splicing an SAE into hook_z (SAEBench's ``kl_div_score``).

With p the model's clean next-token (causal LM) or masked-token (MLM) distribution at a scored
position, q_sae the distribution with hook_z replaced by the SAE's reconstruction and q_zero with
hook_z zero-ablated::

    KL_sae  = mean over scored positions of KL(p || q_sae)  = sum_v p_v (log p_v - log q_sae_v)
    KL_zero = mean over scored positions of KL(p || q_zero)
    kl_recovered = (KL_zero - KL_sae) / KL_zero          (1: the SAE changes nothing; 0: as bad as zeros)

Scored positions: every real token's prediction of the next one (causal: positions 0..L-2 of each
text), or the masked positions (MLM, the same masking ``sae.lm_loss`` uses). Computed batch by batch
(clean, SAE and zero forward passes of the same batch), so no [tokens, vocab] tensor outlives a batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from analysis.errors import ConfigError
from sae.metrics import Patch

Run = Callable[[Patch | None], torch.Tensor]  # patch -> logits [batch, pos, vocab]
Batch = tuple[Run, torch.Tensor]  # (run, scored positions [batch, pos] bool)


@dataclass(frozen=True, slots=True)
class KLRecovered:
    """Mean KL (nats per scored position) with the SAE spliced in and with zeros, and the score."""

    sae: float
    zero: float
    recovered: float  # (zero - sae) / zero; nan when zero == 0
    n_positions: int


def kl_sum(clean_logits: torch.Tensor, logits: torch.Tensor, where: torch.Tensor) -> float:
    """sum over the positions ``where`` of KL(softmax(clean) || softmax(logits)), in float64."""
    p = F.log_softmax(clean_logits[where].double(), dim=-1)
    q = F.log_softmax(logits[where].double(), dim=-1)
    return float((p.exp() * (p - q)).sum())


def kl_recovered(batches: Sequence[Batch], sae_patch: Patch, zero_patch: Patch) -> KLRecovered:
    """KL of the SAE-spliced and zero-ablated model from the clean one over ``batches`` (module docstring)."""
    tot_sae = tot_zero = 0.0
    n = 0
    with torch.inference_mode():
        for run, where in batches:
            clean = run(None)
            tot_sae += kl_sum(clean, run(sae_patch), where)
            tot_zero += kl_sum(clean, run(zero_patch), where)
            n += int(where.sum())
    if n == 0:
        raise ConfigError("no scored positions for the KL divergence; pass longer held-out texts")
    sae, zero = tot_sae / n, tot_zero / n
    return KLRecovered(sae, zero, (zero - sae) / zero if zero > 0 else float("nan"), n)


def _hooks(name: str, patch: Patch | None) -> list[tuple[str, Any]]:
    if patch is not None and hasattr(patch, "hooks"):  # several hooks (sae.transcoder.Splice)
        return patch.hooks()
    return [] if patch is None else [(name, lambda z, hook: patch(z))]


def causal_batches(bridge: Any, layer: int, texts: Sequence[str], *, max_tokens: int = 64,
                   batch_tokens: int = 4096, site: str = "hook_z") -> list[Batch]:
    """Batches of a causal LM: scored positions are every real token followed by a real token."""
    from sae.harvest import check_layer, model_device, pack_batches, pad_batch, pad_id_of, tokenize

    name = check_layer(bridge, layer, site)
    ids = [x for x in tokenize(bridge.tokenizer, [t for t in texts if t.strip()], max_tokens) if len(x) >= 2]
    pad, dev = pad_id_of(bridge.tokenizer), model_device(bridge)
    out: list[Batch] = []
    for b in pack_batches([len(x) for x in ids], batch_tokens):
        input_ids, mask = (t.to(dev) for t in pad_batch([ids[i] for i in b], pad))
        where = torch.zeros_like(mask, dtype=torch.bool)
        where[:, :-1] = (mask[:, :-1] != 0) & (mask[:, 1:] != 0)

        def run(patch: Patch | None, input_ids=input_ids, mask=mask) -> torch.Tensor:
            logits = bridge.run_with_hooks(input_ids, fwd_hooks=_hooks(name, patch), attention_mask=mask,
                                           return_type="logits")
            return getattr(logits, "logits", logits)

        out.append((run, where))
    return out


def masked_batches(bridge: Any, layer: int, texts: Sequence[str], *, max_tokens: int = 128, mask_rate: float = 0.15,
                   seed: int = 0, batch_size: int = 32, site: str = "hook_z") -> list[Batch]:
    """Batches of a BERT-style MLM with a trained head (``analysis.models.mlm_head.mlm_bridge``): scored
    positions are the masked ones (``analysis.models.masked_lm.mask_tokens``, as the masked-token loss)."""
    from analysis.models.masked_lm import IGNORE, MaskedBatch, mask_tokens
    from sae.harvest import check_layer, model_device

    name = check_layer(bridge, layer, site)
    batch = mask_tokens(bridge.tokenizer, list(texts), mask_rate=mask_rate, seed=seed, max_tokens=max_tokens)
    dev = model_device(bridge)
    out: list[Batch] = []
    for start in range(0, batch.input_ids.shape[0], batch_size):
        part = batch.rows(start, start + batch_size)
        part = MaskedBatch(part.input_ids.to(dev), part.attention_mask.to(dev), part.labels.to(dev))

        def run(patch: Patch | None, part=part) -> torch.Tensor:
            logits = bridge.run_with_hooks(part.input_ids, fwd_hooks=_hooks(name, patch),
                                           attention_mask=part.attention_mask)
            return getattr(logits, "logits", logits)

        out.append((run, part.labels != IGNORE))
    return out
