"""The per-layer attention weights of a booted TransformerBridge (TransformerLens 4.x), head by head.

Each block's attention bridge (``bridge.blocks[L].attn``) exposes, as TransformerLens 4 does:

- ``W_Q`` (n_heads, d_model, d_head) and ``W_O`` (n_heads, d_head, d_model), one slice per query head;
- ``W_K`` / ``W_V`` (n_key_value_heads, d_model, d_head): with grouped-query attention
  (``cfg.n_key_value_heads`` < ``cfg.n_heads``) one slice per key/value head, *not* repeated per query
  head (the bridge's stacked ``bridge.W_K`` is the same; only its ``QK`` / ``OV`` properties repeat it).
  A module that instead exposes the grouped weights as ``_W_K`` / ``_W_V`` (HookedTransformer's
  GroupedQueryAttention, whose ``W_K`` is already repeated) is read through those.

Query head h reads key/value head ``h // (n_heads // n_kv_heads)`` (``kv_groups``): the layout of
``repeat_interleave`` in TransformerLens's ``_expand_kv_heads`` and of Hugging Face's ``repeat_kv``.
The weights are read as the bridge holds them (no LayerNorm folding or centring; biases are not read).
Blocks without an ``attn`` component (hybrid models) are skipped.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from analysis.errors import ShapeError


@dataclass(frozen=True, slots=True, eq=False)
class LayerWeights:
    """The attention weights of one layer (detached, the bridge's dtype and device)."""

    layer: int
    w_q: torch.Tensor  # (n_heads, d_model, d_head)
    w_k: torch.Tensor  # (n_kv_heads, d_model, d_head)
    w_v: torch.Tensor  # (n_kv_heads, d_model, d_head)
    w_o: torch.Tensor  # (n_heads, d_head, d_model)
    kv_head: np.ndarray  # (n_heads,) the key/value head each query head reads

    @property
    def n_heads(self) -> int:
        return int(self.w_q.shape[0])

    @property
    def n_kv_heads(self) -> int:
        return int(self.w_k.shape[0])


def kv_groups(n_heads: int, n_kv_heads: int) -> np.ndarray:
    """kv_head[h] = h // (n_heads // n_kv_heads), (n_heads,) int64; ShapeError unless n_kv_heads divides n_heads."""
    if n_kv_heads < 1 or n_heads < 1 or n_heads % n_kv_heads:
        raise ShapeError(f"{n_heads} query heads cannot share {n_kv_heads} key/value heads: n_key_value_heads must "
                         "divide n_heads (check the model's config.json)")
    return np.arange(n_heads, dtype=np.int64) // (n_heads // n_kv_heads)


def _grouped(attn: Any, name: str, n_heads: int, n_kv: int) -> torch.Tensor:
    """W_K or W_V with one slice per key/value head."""
    grouped = getattr(attn, f"_{name}", None)
    w = grouped if isinstance(grouped, torch.Tensor) and grouped.ndim == 3 else getattr(attn, name)
    if w.shape[0] == n_kv:
        return w
    if w.shape[0] == n_heads:  # already repeated per query head: keep the first of each group
        return w[:: n_heads // n_kv]
    raise ShapeError(f"{name} has {w.shape[0]} heads; expected n_key_value_heads = {n_kv} (or n_heads = {n_heads})")


def layer_weights(attn: Any, layer: int, n_kv_heads: int | None = None) -> LayerWeights:
    """The weights of one attention bridge; ``n_kv_heads`` from the config (None: as many as W_K holds)."""
    w_q, w_o = attn.W_Q.detach(), attn.W_O.detach()
    n_heads = int(w_q.shape[0])
    n_kv = int(n_kv_heads) if n_kv_heads else int(attn.W_K.shape[0])
    groups = kv_groups(n_heads, n_kv)
    w_k, w_v = _grouped(attn, "W_K", n_heads, n_kv).detach(), _grouped(attn, "W_V", n_heads, n_kv).detach()
    if w_q.ndim != 3 or w_o.shape[0] != n_heads or w_k.shape[1:] != w_q.shape[1:] or w_v.shape[1] != w_q.shape[1] \
            or w_o.shape[1] != w_v.shape[2]:
        raise ShapeError(f"layer {layer}: attention weights do not fit together: W_Q {tuple(w_q.shape)}, W_K "
                         f"{tuple(w_k.shape)}, W_V {tuple(w_v.shape)}, W_O {tuple(w_o.shape)} (expected (n_heads, "
                         "d_model, d_head), (n_kv_heads, d_model, d_head) twice and (n_heads, d_head, d_model))")
    return LayerWeights(layer, w_q, w_k, w_v, w_o, groups)


def attention_layers(bridge: Any) -> list[int]:
    """Indices of the blocks that have an attention component."""
    return [i for i, block in enumerate(bridge.blocks) if getattr(block, "attn", None) is not None]


def iter_layer_weights(bridge: Any) -> Iterator[LayerWeights]:
    """``LayerWeights`` of every attention layer of a booted bridge, in layer order."""
    n_kv = getattr(bridge.cfg, "n_key_value_heads", None)
    for i in attention_layers(bridge):
        yield layer_weights(bridge.blocks[i].attn, i, n_kv)
