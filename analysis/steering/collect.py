"""Activations of a contrast set at one hook, reduced to one vector per text: hook names,
position rules, tokenisation and the batched collection that ``analysis.steering.extract`` extracts
directions from (re-exported there).

The texts run through the model ``batch_size`` contrast pairs at a time (both texts of each
pair in the same forward pass; default ``DEFAULT_BATCH_PAIRS``), so memory holds one batch's
activations, never the whole set's: a 5,000-pair file is 157 forward passes of 64 texts, not
one of 10,000. A *position rule* reduces each text's (pos, d_model) activations to one d_model
vector:

- ``last``: the last real (non-padding) token;
- ``mean``: the mean over real tokens;
- ``index:K``: the K-th real token (Python indexing; ``index:-2`` is the second to last). It
  compares the same token slot of both texts of a pair, so every pair must have the same
  number of tokens.

Padding may sit on either side (``padding_side``): positions are found from the attention
mask, and the bridge derives position ids from the mask, so a text's activations do not depend
on its batch neighbours, the batch size or the padding side (to float32 rounding).

Device: the forward passes run where the bridge's weights are (``model_device``); token ids are
moved there and the reduced activations come back to CPU numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from analysis.steering.contrasts import ContrastSet
from analysis.errors import ConfigError, ShapeError
from analysis.forward import forward_until
from analysis.progress import Progress

HOOKS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
PADDING_SIDES = ("right", "left")
DEFAULT_BATCH_PAIRS = 32  # contrast pairs per forward pass: 64 texts of <= max_tokens tokens


# -- hooks and positions ------------------------------------------------------------------------
def model_device(bridge: Any) -> torch.device:
    """The device of the bridge's weights (its first parameter); CPU for a model without parameters."""
    try:
        return next(iter(bridge.parameters())).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


def n_layers(bridge: Any) -> int:
    return int(bridge.cfg.n_layers)


def hook_name(bridge: Any, layer: int, hook: str) -> str:
    """``blocks.{layer}.hook_{hook}``, validated against the bridge's hooks (ConfigError lists the valid ones)."""
    if hook not in HOOKS:
        raise ConfigError(f"unknown hook {hook!r}; choose one of {', '.join(HOOKS)}")
    n = n_layers(bridge)
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= int(layer) < n:
        raise ConfigError(f"layer {layer!r} does not exist: this model has layers 0..{n - 1}")
    name = f"blocks.{int(layer)}.hook_{hook}"
    if name not in bridge.hook_dict:
        valid = sorted({k.split(".hook_")[-1] for k in bridge.hook_dict if k.startswith(f"blocks.{int(layer)}.hook_")})
        raise ConfigError(f"this model has no hook {name!r}; hooks of block {int(layer)}: {', '.join(valid)}")
    return name


def check_layers(bridge: Any, layers: Sequence[int] | None) -> tuple[int, ...]:
    """The layers as a sorted tuple (None = all), each validated."""
    n = n_layers(bridge)
    if layers is None:
        return tuple(range(n))
    out = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= int(layer) < n:
            raise ConfigError(f"layer {layer!r} does not exist: this model has layers 0..{n - 1}")
        out.append(int(layer))
    if not out:
        raise ConfigError(f"no layers given; name at least one of 0..{n - 1}")
    return tuple(sorted(set(out)))


@dataclass(frozen=True, slots=True)
class PositionRule:
    """How a text's activations (pos, d_model) become one vector: ``last``, ``mean`` or ``index:K``."""

    kind: str
    index: int = 0

    @classmethod
    def parse(cls, spec: str | int | PositionRule) -> PositionRule:
        if isinstance(spec, PositionRule):
            return spec
        if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
            return cls("index", int(spec))
        if isinstance(spec, str):
            s = spec.strip().lower()
            if s in ("last", "mean"):
                return cls(s)
            if s.startswith("index:"):
                try:
                    return cls("index", int(s[6:]))
                except ValueError:
                    pass
        raise ConfigError(f"unknown position rule {spec!r}; use last, mean or index:K (e.g. index:0, index:-2)")

    @property
    def needs_equal_lengths(self) -> bool:
        return self.kind == "index"

    def __str__(self) -> str:
        return f"index:{self.index}" if self.kind == "index" else self.kind


def select_positions(acts: torch.Tensor, mask: torch.Tensor, rule: PositionRule | str) -> torch.Tensor:
    """Reduce activations (batch, pos, d_model) to (batch, d_model) by ``rule`` over real tokens.

    ``mask`` (batch, pos) is 1 on real tokens, 0 on padding (either side).
    """
    rule = PositionRule.parse(rule)
    if acts.ndim != 3 or mask.shape != acts.shape[:2]:
        raise ShapeError(f"expected acts (batch, pos, d_model) and mask (batch, pos), got {tuple(acts.shape)} and "
                         f"{tuple(mask.shape)}")
    m = mask.to(torch.bool)
    lengths = m.sum(1)
    if bool((lengths == 0).any()):
        raise ShapeError(f"row {int(torch.nonzero(lengths == 0)[0])} has no real tokens; drop empty texts")
    if rule.kind == "mean":
        w = m.unsqueeze(-1).to(acts.dtype)
        return (acts * w).sum(1) / lengths.unsqueeze(-1).to(acts.dtype)
    out = []
    for i in range(acts.shape[0]):
        real = torch.nonzero(m[i]).squeeze(-1)
        k = -1 if rule.kind == "last" else rule.index
        if not -len(real) <= k < len(real):
            raise ConfigError(f"position index:{k} is outside text {i}, which has {len(real)} tokens; "
                              "use a smaller index, or last / mean")
        out.append(acts[i, real[k]])
    return torch.stack(out)


# -- tokenisation and collection --------------------------------------------------------------
def token_rows(bridge: Any, texts: Sequence[str], *, max_tokens: int = 128) -> list[list[int]]:
    """Token ids of each text (unpadded), truncated to ``max_tokens``.

    Causal LMs get their BOS token prepended when the tokenizer does not add it (as the tiny
    LMs were trained, ``<s> text``); encoders get the tokenizer's own special tokens.
    """
    if not texts:
        raise ConfigError("no texts to tokenise")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 2:
        raise ConfigError(f"max_tokens={max_tokens!r} must be an integer >= 2")
    tok = bridge.tokenizer
    rows = [list(ids) for ids in tok(list(texts), add_special_tokens=True, truncation=True,
                                     max_length=max_tokens)["input_ids"]]
    bos = getattr(tok, "bos_token_id", None)
    if getattr(bridge.cfg, "attention_dir", "causal") == "causal" and bos is not None:
        rows = [r if r[:1] == [bos] else [bos, *r][:max_tokens] for r in rows]
    if any(len(r) == 0 for r in rows):
        raise ConfigError("a text tokenised to no tokens; drop empty texts")
    return rows


def pad_rows(rows: Sequence[Sequence[int]], pad: int, padding_side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (batch, pos) int64 and attention mask (batch, pos), padded with ``pad`` on
    ``padding_side`` to the longest row."""
    if padding_side not in PADDING_SIDES:
        raise ConfigError(f"padding_side={padding_side!r} must be one of {', '.join(PADDING_SIDES)}")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if padding_side == "right" else slice(width - len(r), width)
        ids[i, sl] = torch.tensor(r, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def pad_id(bridge: Any) -> int:
    tok = bridge.tokenizer
    return tok.pad_token_id if tok.pad_token_id is not None else 0


def tokenize(bridge: Any, texts: Sequence[str], *, padding_side: str = "right",
             max_tokens: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (batch, pos) int64 and attention mask (batch, pos), padded on ``padding_side``
    (``token_rows`` then ``pad_rows``)."""
    if padding_side not in PADDING_SIDES:
        raise ConfigError(f"padding_side={padding_side!r} must be one of {', '.join(PADDING_SIDES)}")
    return pad_rows(token_rows(bridge, texts, max_tokens=max_tokens), pad_id(bridge), padding_side)


@torch.no_grad()
def run_activations(bridge: Any, ids: torch.Tensor, mask: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Activations (batch, pos, d_model) float32 at ``names`` from one forward pass that stops
    once the last of them has fired: no later blocks and no logits, which would cost batch x pos
    x vocab floats (MiniLM: 78 MB for 64 texts of 10 tokens, 6 GB for 4,000 such texts). ``ids``
    and ``mask`` are moved to the model's device; the activations stay there."""
    device = model_device(bridge)
    got = {n: t.to(torch.float32) for n, t in forward_until(bridge, ids.to(device), mask.to(device), names).items()}
    if missing := [n for n in names if n not in got]:
        raise ShapeError(f"{', '.join(missing)} did not fire during the forward pass; the bridge does not route "
                         "this model through those hooks: choose another hook")
    return {n: got[n] for n in names}


@dataclass(frozen=True, eq=False)
class Activations:
    """Reduced activations of a contrast set at one hook.

    pos / neg: (n_layers, n_pairs, d_model) float32 (the model's own precision; the direction
    maths converts one layer at a time to float64), pairs in ``ContrastSet.pairs`` order;
    act_norm: (n_layers,) mean ‖h‖ over every real token of every text; lengths: (2, n_pairs)
    token counts (positive, negative).
    """

    layers: tuple[int, ...]
    pos: np.ndarray
    neg: np.ndarray
    act_norm: np.ndarray
    lengths: np.ndarray


def check_batch_size(batch_size: int) -> int:
    """``batch_size`` (contrast pairs per forward pass) when it is an integer >= 1, else ConfigError."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} must be an integer >= 1: the contrast pairs run through the "
                          f"model per forward pass (default {DEFAULT_BATCH_PAIRS}; lower it to use less memory)")
    return int(batch_size)


def collect(bridge: Any, contrasts: ContrastSet, *, hook: str = "resid_post", layers: Sequence[int] | None = None,
            position: str | PositionRule = "last", padding_side: str = "right", max_tokens: int = 128,
            batch_size: int = DEFAULT_BATCH_PAIRS, progress: Progress | None = None) -> Activations:
    """Run every text of ``contrasts`` through ``bridge``, ``batch_size`` pairs (both of their
    texts) per forward pass, and reduce each text's activations by ``position``.

    Memory: one batch's activations (2 x batch_size texts of at most ``max_tokens`` tokens) plus
    the reduced (n_layers, n_pairs, d_model) result, whatever the size of the set. The result
    does not depend on ``batch_size`` beyond float32 rounding (positions come from the mask).
    """
    rule = PositionRule.parse(position)
    batch_size = check_batch_size(batch_size)
    if padding_side not in PADDING_SIDES:
        raise ConfigError(f"padding_side={padding_side!r} must be one of {', '.join(PADDING_SIDES)}")
    layers = check_layers(bridge, layers)
    names = [hook_name(bridge, layer, hook) for layer in layers]
    pos_texts, neg_texts = contrasts.texts()
    n = len(pos_texts)
    rows = token_rows(bridge, pos_texts + neg_texts, max_tokens=max_tokens)
    lengths = np.array([len(r) for r in rows]).reshape(2, n)
    if rule.needs_equal_lengths and (bad := np.flatnonzero(lengths[0] != lengths[1])).size:
        shown = ", ".join(f"{contrasts.pairs[i].id} ({lengths[0, i]} vs {lengths[1, i]} tokens)" for i in bad[:4])
        raise ConfigError(f"position rule {rule} compares the same token slot of both texts, but {bad.size} pair(s) "
                          f"differ in token length: {shown}; use position last or mean, or rewrite those pairs")
    pos = neg = None  # (n_layers, n_pairs, d_model) float32, allocated when d_model is known
    norm_sums, n_real = np.zeros(len(layers)), 0
    n_batches = -(-n // batch_size)
    for b, start in enumerate(range(0, n, batch_size)):
        stop = min(n, start + batch_size)
        if progress:
            progress(b, n_batches, f"forward pass: pairs {start + 1}-{stop} of {n}")
        ids, mask = pad_rows(rows[start:stop] + rows[n + start:n + stop], pad_id(bridge), padding_side)
        acts = run_activations(bridge, ids, mask, names)
        mask = mask.to(model_device(bridge))
        m = mask.to(torch.bool)
        n_real += int(m.sum())
        for li, name in enumerate(names):
            a = acts.pop(name)
            norm_sums[li] += float(a.norm(dim=-1)[m].cpu().to(torch.float64).sum())
            red = select_positions(a, mask, rule).cpu().numpy()
            if pos is None:
                pos = np.empty((len(layers), n, red.shape[1]), dtype=np.float32)
                neg = np.empty_like(pos)
            pos[li, start:stop], neg[li, start:stop] = red[:stop - start], red[stop - start:]
    out = Activations(layers, pos, neg, norm_sums / n_real, lengths)
    _check_pairs_differ(out, rule, hook)
    return out


def _check_pairs_differ(acts: Activations, rule: PositionRule, hook: str) -> None:
    """ConfigError when both texts of every pair have the same activations at every layer (to
    float32 rounding): the position sees only what the two texts share, e.g. ``index:0`` on a
    causal LM, which is the BOS token."""
    gap = np.abs(acts.pos - acts.neg).max()
    scale = max(float(np.abs(acts.pos).max()), float(np.abs(acts.neg).max()), 1e-30)
    if gap <= 1e-6 * scale:
        raise ConfigError(f"position {rule} gives both texts of every pair identical activations at {hook} of every "
                          f"layer (largest |positive − negative| = {gap:.1e}): that token sees only what the two texts "
                          "share (index:0 on a causal LM is the BOS token), so there is no direction to extract; use "
                          "position last or mean, or an index past the tokens the pairs share")
