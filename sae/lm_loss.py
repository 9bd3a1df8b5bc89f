"""Loss functions for loss recovered: ``loss_fn(patch) -> mean loss`` with hook_z patched.

- ``causal_lm_loss_fn(bridge, layer, texts)``: next-token cross-entropy (nats per predicted
  token) of a causal LM (bilinear-lm, tiny-mixtral, any ``*ForCausalLM``) on held-out texts,
  tokenised as the harvest does (``sae.harvest.tokenize``), right-padded, padding excluded.
- ``masked_lm_loss_fn(bridge, layer, texts)``: masked-token cross-entropy of a BERT-style
  encoder with a trained MLM head attached (``analysis.models.mlm_head.mlm_bridge``), via
  ``analysis.models.masked_lm.mask_tokens`` / ``masked_token_loss``.
- ``loss_fn_for(source, layer, texts)``: boots the right bridge for the source and picks one.

``patch`` receives hook_z [batch, pos, n_heads, d_head] and returns the replacement; ``None``
means the clean model. The forward pass runs under ``torch.inference_mode``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from analysis.errors import ConfigError, SourceError
from sae.harvest import check_layer, model_device, pack_batches, pad_batch, pad_id_of, tokenize
from sae.metrics import LossFn, Patch


def _hooks(name: str, patch: Patch | None) -> list[tuple[str, Any]]:
    if patch is None:
        return []
    if hasattr(patch, "hooks"):  # a patch that needs several hooks (sae.transcoder.Splice)
        return patch.hooks()

    def fn(z: torch.Tensor, hook: Any) -> torch.Tensor:
        return patch(z)

    return [(name, fn)]


def causal_lm_loss_fn(bridge: Any, layer: int, texts: Sequence[str], *, max_tokens: int = 64,
                      batch_tokens: int = 4096, site: str = "hook_z") -> LossFn:
    """Mean next-token cross-entropy (nats) over ``texts`` with hook_z (or ``site``) of ``layer`` patched."""
    name = check_layer(bridge, layer, site)
    ids = [x for x in tokenize(bridge.tokenizer, [t for t in texts if t.strip()], max_tokens) if len(x) >= 2]
    if not ids:
        raise ConfigError("no held-out text with >= 2 tokens for the next-token loss; pass longer texts")
    pad = pad_id_of(bridge.tokenizer)
    dev = model_device(bridge)
    batches = [tuple(t.to(dev) for t in pad_batch([ids[i] for i in b], pad))
               for b in pack_batches([len(x) for x in ids], batch_tokens)]

    def loss_fn(patch: Patch | None) -> float:
        total, count = 0.0, 0
        with torch.inference_mode():
            for input_ids, mask in batches:
                logits = bridge.run_with_hooks(input_ids, fwd_hooks=_hooks(name, patch), attention_mask=mask,
                                               return_type="logits")
                logits = getattr(logits, "logits", logits)
                target = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
                total += float(F.cross_entropy(logits[:, :-1].float().flatten(0, 1), target.flatten(),
                                               ignore_index=-100, reduction="sum"))
                count += int((target != -100).sum())
        return total / count

    return loss_fn


def masked_lm_loss_fn(bridge: Any, layer: int, texts: Sequence[str], *, max_tokens: int = 128,
                      mask_rate: float = 0.15, seed: int = 0, batch_size: int = 32, site: str = "hook_z") -> LossFn:
    """Mean masked-token cross-entropy (nats) over ``texts``; ``bridge`` must carry a trained MLM
    head (``analysis.models.mlm_head.mlm_bridge(source)``)."""
    from analysis.models.masked_lm import mask_tokens, masked_token_loss

    name = check_layer(bridge, layer, site)
    batch = mask_tokens(bridge.tokenizer, list(texts), mask_rate=mask_rate, seed=seed, max_tokens=max_tokens)

    def loss_fn(patch: Patch | None) -> float:
        with torch.inference_mode():
            return masked_token_loss(bridge, batch, fwd_hooks=_hooks(name, patch), batch_size=batch_size)

    return loss_fn


def model_kind(bridge: Any) -> str:
    """"causal" for a causal LM, "masked" for a BERT-style MLM; SourceError otherwise."""
    model = getattr(bridge, "original_model", bridge)
    cls = type(model).__name__
    if cls.endswith("ForCausalLM"):
        return "causal"
    if cls.endswith("ForMaskedLM"):
        return "masked"
    raise SourceError(f"{cls}: loss recovered needs a causal LM or a masked LM; this model is neither")


def loss_fn_for(source: Any, layer: int, texts: Sequence[Any], *, bridge: Any = None,
                mlm: Callable[[Any], Any] | None = None, **kwargs: Any) -> LossFn:
    """The loss function suited to ``source``: next-token loss for causal LMs, masked-token loss
    (with the trained MLM head, trained on first use) for BERT-style encoders such as MiniLM.
    ``bridge`` reuses an already booted bridge (of a causal LM, or to tell the kind); ``mlm(src)``
    returns the bridge with the MLM head attached (default ``analysis.models.mlm_head.mlm_bridge``)."""
    from analysis.sources import open_source
    from sae.harvest import _texts_of, boot

    text_list = _texts_of(texts)
    src = open_source(source)
    if bridge is None:
        src, bridge = boot(src)
    if model_kind(bridge) == "causal":
        return causal_lm_loss_fn(bridge, layer, text_list, **kwargs)
    if mlm is None:
        from analysis.models.mlm_head import mlm_bridge as mlm

    return masked_lm_loss_fn(mlm(src), layer, text_list, **kwargs)
