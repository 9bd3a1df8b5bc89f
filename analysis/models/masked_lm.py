"""Masked-token loss of a BERT-style encoder, with optional hooks spliced into the forward pass.

all-MiniLM-L6-v2 ships without its masked-language-model head (the checkpoint is the bare
encoder; a ``TransformerBridge`` boots ``BertForMaskedLM`` and fills ``cls.*`` with random
weights). ``analysis/models/mlm_head.py`` trains that head once on the frozen encoder; this module
masks text deterministically, attaches a trained head to a bridge or an HF model, and measures
the masked-token cross-entropy (nats per masked token) with any forward hooks in place: the
capability cost of steering and the loss-recovered metric of attention SAEs on MiniLM.

Masking rule (training and evaluation alike): among real, non-special tokens each position is
masked with probability ``mask_rate`` (at least one per text), always replaced by ``[MASK]``
(no 80/10/10 split: evaluation wants a fixed, comparable task). Positions are drawn from a
``numpy`` generator seeded by ``seed``: the same texts and seed give the same masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from analysis.errors import ConfigError, ShapeError, SourceError

IGNORE = -100  # label of positions that are not scored (torch cross_entropy's ignore_index)
# names of the trained tensors, relative to ``cls.predictions`` of a BertForMaskedLM
HEAD_TENSORS = ("transform.dense.weight", "transform.dense.bias", "transform.LayerNorm.weight",
                "transform.LayerNorm.bias", "bias")
Hook = tuple[str, Callable[..., Any]]


@dataclass(frozen=True, eq=False)
class MaskedBatch:
    """Masked token ids, right-padded.

    input_ids: (batch, pos) int64 with ``[MASK]`` at masked positions
    attention_mask: (batch, pos) int64, 1 on real tokens
    labels: (batch, pos) int64, the original id at masked positions, ``IGNORE`` elsewhere
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    @property
    def n_masked(self) -> int:
        return int((self.labels != IGNORE).sum())

    def rows(self, start: int, stop: int) -> "MaskedBatch":
        """Rows ``start:stop``, trimmed to their longest sequence."""
        width = max(int(self.attention_mask[start:stop].sum(1).max()), 1)
        return MaskedBatch(self.input_ids[start:stop, :width], self.attention_mask[start:stop, :width],
                           self.labels[start:stop, :width])


def mask_tokens(tokenizer: Any, texts: Sequence[str], *, mask_rate: float = 0.15, seed: int = 0,
                max_tokens: int = 128) -> MaskedBatch:
    """Tokenise ``texts`` (truncated to ``max_tokens``) and mask them by the module's rule."""
    if not 0 < mask_rate < 1:
        raise ConfigError(f"mask_rate={mask_rate} must be in (0, 1); 0.15 is BERT's rate")
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ConfigError("no non-empty texts to mask; pass at least one text")
    mask_id = getattr(tokenizer, "mask_token_id", None)
    if mask_id is None:
        raise SourceError("the tokenizer has no [MASK] token: masked-token loss needs a BERT-style "
                          "(masked language model) tokenizer")
    enc = tokenizer(list(texts), truncation=True, max_length=max_tokens, padding=True, return_tensors="pt",
                    return_special_tokens_mask=True)
    ids, attn = enc["input_ids"].long(), enc["attention_mask"].long()
    candidates = (attn == 1) & (enc["special_tokens_mask"] == 0)
    rng = np.random.default_rng(seed)
    draw = torch.from_numpy(rng.random(tuple(ids.shape)) < mask_rate) & candidates
    for i in np.flatnonzero(~draw.any(1).numpy() & candidates.any(1).numpy()):  # at least one per text
        pos = np.flatnonzero(candidates[i].numpy())
        draw[i, int(rng.choice(pos))] = True
    labels = torch.where(draw, ids, torch.full_like(ids, IGNORE))
    return MaskedBatch(torch.where(draw, torch.full_like(ids, mask_id), ids), attn, labels)


def _head_module(model: Any) -> torch.nn.Module:
    original = getattr(model, "original_model", model)  # a TransformerBridge wraps the HF model
    head = getattr(getattr(original, "cls", None), "predictions", None)
    if head is None:
        raise SourceError(f"{type(original).__name__} has no cls.predictions head: masked-token loss needs a "
                          "BERT-style model booted as BertForMaskedLM (e.g. the bundled 'minilm')")
    return head


def head_parameters(model: Any) -> dict[str, torch.nn.Parameter]:
    """The trainable MLM-head parameters of a BertForMaskedLM (or a bridge around one), by
    ``HEAD_TENSORS`` name. The decoder matrix is tied to the word embeddings and not included."""
    params = {n.replace("._original_component", "").replace("_original_component.", ""): p
              for n, p in _head_module(model).named_parameters()}
    missing = [n for n in HEAD_TENSORS if n not in params]
    if missing:
        raise SourceError(f"the model's MLM head lacks {missing}; expected BERT's cls.predictions layout")
    return {n: params[n] for n in HEAD_TENSORS}


def attach_mlm_head(model: Any, head: dict[str, torch.Tensor] | str | Path) -> None:
    """Copy a trained head (tensors by ``HEAD_TENSORS`` name, or the path of the safetensors file
    ``analysis.models.mlm_head`` writes) into ``model``'s ``cls.predictions`` in place."""
    if not isinstance(head, dict):
        from safetensors.torch import load_file

        try:
            head = load_file(str(head))
        except (OSError, Exception) as exc:  # safetensors raises its own error types
            raise SourceError(f"{head}: cannot read the MLM head ({exc}); retrain it with "
                              "analysis.models.mlm_head.train_mlm_head(..., force=True)") from exc
    params = head_parameters(model)
    for name, p in params.items():
        if name not in head:
            raise SourceError(f"MLM head file lacks {name!r}; retrain it with train_mlm_head(..., force=True)")
        if tuple(head[name].shape) != tuple(p.shape):
            raise ShapeError(f"MLM head tensor {name}: shape {tuple(head[name].shape)} does not fit the model's "
                             f"{tuple(p.shape)}; the head was trained for another model")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(head[name].to(p.dtype))


def _model_device(model: Any) -> torch.device:
    try:
        return next(iter(model.parameters())).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


def masked_token_loss(model: Any, batch: MaskedBatch, *, fwd_hooks: Sequence[Hook] = (),
                      batch_size: int = 32) -> float:
    """Mean cross-entropy (nats) over the masked positions of ``batch``.

    ``model`` is a TransformerBridge around a BertForMaskedLM with a trained head attached
    (``attach_mlm_head``); ``fwd_hooks`` are ``(hook_name, fn)`` pairs applied during the
    forward pass (``bridge.run_with_hooks``) and removed afterwards. The batch is moved to the
    model's device (its first parameter's) one chunk at a time.
    """
    if batch.n_masked == 0:
        raise ConfigError("the batch has no masked positions; build it with mask_tokens()")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1")
    total, count = 0.0, 0
    device = _model_device(model)
    with torch.no_grad():
        for start in range(0, batch.input_ids.shape[0], batch_size):
            part = batch.rows(start, start + batch_size)
            if (n := int((part.labels != IGNORE).sum())) == 0:
                continue
            part = MaskedBatch(part.input_ids.to(device), part.attention_mask.to(device), part.labels.to(device))
            if fwd_hooks:
                logits = model.run_with_hooks(part.input_ids, fwd_hooks=list(fwd_hooks),
                                              attention_mask=part.attention_mask)
            else:
                logits = model(part.input_ids, attention_mask=part.attention_mask)
            logits = getattr(logits, "logits", logits)  # an HF model returns an output object
            loss = F.cross_entropy(logits.float().flatten(0, 1), part.labels.flatten(), ignore_index=IGNORE,
                                   reduction="sum")
            total += float(loss)
            count += n
    return total / count
