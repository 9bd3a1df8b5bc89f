"""Sentence encoders (BERT-style, e.g. the bundled all-MiniLM-L6-v2): load one offline, tokenize,
pad, and embed sentences the way sentence-transformers does (pure torch; no store I/O).

- ``load_encoder(hf_dir)``: (model, tokenizer) of a local Hugging Face encoder directory, in eval
  mode, without the pooler (mean pooling never uses it);
- ``tokenize`` / ``collate``: token ids per text (special tokens included, truncated), right-padded
  into (batch, pos) int64 ids and attention mask;
- ``mean_pool``: L2-normalised mean of the last hidden states over the tokens the mask keeps;
- ``sentence_embeddings``: unit-norm (n, d_model) float32 embeddings, computed in batches on the
  model's device and returned as CPU numpy.

Used by the KappaTune forgetting experiment (``analysis.weights.forgetting``), the docstring probes
(``probes.training.embed_texts``) and the steering effect measure (``analysis.steering.effect``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from analysis.errors import ShapeError, SourceError

EVAL_BATCH = 64  # texts per forward pass of ``sentence_embeddings``


def load_encoder(hf_dir: str | Path) -> tuple[nn.Module, Any]:
    """(model, tokenizer) of a local BERT-style encoder directory, offline, without the pooler;
    weights from safetensors only unless the directory's pickle was opened with the trust flag.

    The model is on the CPU in eval mode (dropout off). Raises SourceError when the directory
    holds no loadable encoder and tokenizer."""
    import os

    from analysis.source_layout import from_pretrained_kwargs

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_dir = Path(hf_dir)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the unused pooler weights are expected
    try:
        tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        try:
            model = AutoModel.from_pretrained(hf_dir, add_pooling_layer=False, **from_pretrained_kwargs(hf_dir))
        except TypeError:
            model = AutoModel.from_pretrained(hf_dir, **from_pretrained_kwargs(hf_dir))
    except (OSError, ValueError, KeyError) as exc:
        raise SourceError(f"{hf_dir}: cannot load an encoder and tokenizer from this directory ({exc}); the "
                          "forgetting experiment needs a Hugging Face encoder directory such as 'minilm'") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    model.eval()
    return model, tokenizer


def tokenize(tokenizer: Any, texts: Sequence[str], max_tokens: int) -> list[list[int]]:
    """Token ids per text, truncated to ``max_tokens`` (special tokens included)."""
    return tokenizer(list(texts), truncation=True, max_length=max_tokens)["input_ids"]


def collate(ids: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence: (input_ids (batch, pos) int64, attention_mask (batch, pos)), on the CPU."""
    width = max(len(x) for x in ids)
    out = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        out[i, :len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, :len(x)] = 1
    return out, mask


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """L2-normalised mean of ``hidden`` (batch, pos, d_model) over positions where the mask is 1.

    Returns (batch, d_model) in float32, on ``hidden``'s device."""
    if hidden.ndim != 3 or attention_mask.shape != hidden.shape[:2]:
        raise ShapeError(f"expected hidden (batch, pos, d_model) and mask (batch, pos), got "
                         f"{tuple(hidden.shape)} and {tuple(attention_mask.shape)}")
    m = attention_mask.unsqueeze(-1).to(torch.float32)
    summed = (hidden.to(torch.float32) * m).sum(dim=1)
    mean = summed / m.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(mean, p=2, dim=-1)


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (CPU for a model without parameters)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def sentence_embeddings(model: nn.Module, ids: Sequence[Sequence[int]], *, pad_id: int = 0,
                        batch_size: int = EVAL_BATCH) -> np.ndarray:
    """Unit-norm sentence embeddings (n, d_model), float32, no autocast, in batches of ``batch_size``.

    Batches run on the model's device; the result is CPU numpy."""
    device = model_device(model)
    out = []
    with torch.inference_mode():
        for start in range(0, len(ids), batch_size):
            x, mask = collate(ids[start:start + batch_size], pad_id)
            x, mask = x.to(device), mask.to(device)
            out.append(mean_pool(model(input_ids=x, attention_mask=mask).last_hidden_state, mask).cpu())
    return torch.cat(out).numpy()
