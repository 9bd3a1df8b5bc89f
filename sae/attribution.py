"""Which attention heads an attention-output SAE feature belongs to (Kissane et al. 2024).

An SAE on ``blocks.L.attn.hook_z`` reads x = [z_0, ..., z_{H-1}] (head-major, d_in = n_heads*d_head;
head h owns columns ``h*d_head:(h+1)*d_head``). Two attributions:

- **weight-based** ``head_attribution(sae)`` [d_sae, n_heads]:
  w_{i,h} = ||W_dec[i, head h slice]|| / sum_h' ||W_dec[i, head h' slice]|| (sums to 1 per feature;
  a feature with an all-zero decoder row gets all zeros);
- **direct feature attribution** ``direct_feature_attribution(sae, z)`` [pos, d_sae, n_heads]:
  DFA_{p,i,h} = z_{p,h} . W_enc[head h slice, i]. Summed over heads it is x_p . W_enc[:, i]
  = pre_{p,i} - b_enc[i] + (b_dec . W_enc[:, i]): the encoder pre-activation without its bias terms.

**Polysemantic heads** (``polysemantic_heads``): the paper reads each head's top features and calls
a head polysemantic when they fall into several unrelated families. Our reproducible rule:

1. feature i *belongs* to head h when h = argmax_h' w_{i,h'} and w_{i,h} >= ``min_weight``
   (default 0.3: the head carries at least 30% of the decoder norm, 3.6x the uniform share of a
   12-head layer; on MiniLM layer 3 the median feature's top head holds only ~15%, so 0.5 leaves
   almost no features); dead features (density 0) never do;
2. a head's *top features*: its ``top_features`` (default 10) belonging features with the largest
   w_{i,h} (ties: lower index first);
3. two top features of a head are *related* when the Jaccard similarity of their context-token
   sets (the token ids at which each fired most, from ``sae.features``) is >= ``min_jaccard``
   (default 0.2) or their decoder rows have cosine >= ``min_cosine`` (default 0.5);
   a *feature family* is a connected component of that relation (single linkage);
4. a head is polysemantic when it has >= 2 families of at least ``min_family_size`` (default 1)
   features each; heads with fewer than 2 top features are "too few features" and not counted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from analysis.errors import ConfigError, ShapeError

CODE_VERSION = "sae-attribution-1"
POLYSEMANTIC_DEFAULTS = {"min_weight": 0.3, "top_features": 10, "min_jaccard": 0.2, "min_cosine": 0.5,
                         "min_family_size": 1}


def _heads(sae: Any) -> tuple[int, int]:
    cfg = sae.cfg
    if cfg.n_heads is None or cfg.d_head is None:
        raise ConfigError(f"SAE on {cfg.hook_name} does not record n_heads/d_head, so its columns cannot be "
                          "split into heads; rebuild its SAEConfig with n_heads and d_head of the hooked layer")
    return int(cfg.n_heads), int(cfg.d_head)


def _f64(t: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().to(torch.float64).cpu().numpy()
    return np.asarray(t, dtype=np.float64)


def head_norms(W_dec: torch.Tensor | np.ndarray, n_heads: int) -> np.ndarray:
    """||W_dec[i, head h slice]||: W_dec [d_sae, n_heads*d_head] -> [d_sae, n_heads] (float64)."""
    w = _f64(W_dec)
    if w.ndim != 2 or n_heads < 1 or w.shape[1] % n_heads:
        raise ShapeError(f"decoder of shape {w.shape} cannot be split into {n_heads} equal head slices; "
                         "pass W_dec [d_sae, n_heads*d_head] and the hooked layer's n_heads")
    return np.linalg.norm(w.reshape(w.shape[0], n_heads, -1), axis=2)


def head_attribution(sae: Any) -> np.ndarray:
    """Weight-based head attribution w [d_sae, n_heads] (float64), rows summing to 1.

    w_{i,h} = ||W_dec[i, h slice]|| / sum_h' ||W_dec[i, h' slice]||; all-zero decoder rows give zeros.
    """
    n_heads, _ = _heads(sae)
    norms = head_norms(sae.W_dec, n_heads)
    total = norms.sum(axis=1, keepdims=True)
    return np.divide(norms, total, out=np.zeros_like(norms), where=total > 0)


def _feature_index(features: Sequence[int] | np.ndarray | None, d_sae: int) -> np.ndarray:
    if features is None:
        return np.arange(d_sae)
    idx = np.asarray(features, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= d_sae):
        bad = int(idx[(idx < 0) | (idx >= d_sae)][0])
        raise ConfigError(f"feature index {bad} is out of range: this SAE has {d_sae} features (0..{d_sae - 1}); "
                          "pick an index in that range")
    return idx


def direct_feature_attribution(sae: Any, z: torch.Tensor | np.ndarray,
                               features: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """DFA [pos, n_features, n_heads] (float64): z_{p,h} . W_enc[h slice, i].

    z: [pos, n_heads, d_head] (one prompt's hook_z) or already flattened [pos, d_in].
    features: subset of feature indices (default all d_sae, in order).
    Summed over heads: pre_acts(z) - b_enc + b_dec W_enc (the encoder's bias terms removed).
    """
    n_heads, d_head = _heads(sae)
    zz = _f64(z)
    if zz.ndim == 2 and zz.shape[1] == n_heads * d_head:
        zz = zz.reshape(zz.shape[0], n_heads, d_head)
    if zz.ndim != 3 or zz.shape[1:] != (n_heads, d_head):
        raise ShapeError(f"z has shape {zz.shape}; this SAE ({sae.cfg.hook_name}) needs [pos, {n_heads}, {d_head}] "
                         f"or [pos, {n_heads * d_head}]")
    idx = _feature_index(features, sae.cfg.d_sae)
    w = _f64(sae.W_enc)[:, idx].reshape(n_heads, d_head, len(idx))
    return np.einsum("phd,hdi->pih", zz, w)


# -- polysemantic heads ---------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class PolysemanticHeads:
    """Feature families per head and the polysemantic-head count.

    table: one row per head: head, n_belonging (features belonging to it), n_top, n_families,
      family_sizes (e.g. "3+1+1"), polysemantic (bool), families (top tokens of each family, "a b | c").
    family: [d_sae] int64, the family id of each top feature (unique across heads), -1 elsewhere.
    settings: the rule's parameters (``POLYSEMANTIC_DEFAULTS`` with overrides).
    """

    table: pd.DataFrame
    family: np.ndarray
    settings: dict

    @property
    def n_polysemantic(self) -> int:
        return int(self.table["polysemantic"].sum())

    @property
    def n_counted(self) -> int:
        """Heads with at least 2 top features (the denominator of the polysemantic fraction)."""
        return int((self.table["n_top"] >= 2).sum())


def token_sets(context_tokens: np.ndarray) -> list[frozenset[int]]:
    """Per feature, the set of token ids in ``context_tokens`` [d_sae, n] (negative = padding)."""
    a = np.asarray(context_tokens)
    return [frozenset(int(t) for t in row if t >= 0) for row in a.reshape(a.shape[0], -1)]


def _components(n: int, related: np.ndarray) -> np.ndarray:
    """Connected components of an n x n boolean relation (labels in order of first member)."""
    label = -np.ones(n, dtype=np.int64)
    nxt = 0
    for s in range(n):
        if label[s] >= 0:
            continue
        stack, label[s] = [s], nxt
        while stack:
            u = stack.pop()
            for v in np.flatnonzero(related[u] & (label < 0)):
                label[v] = nxt
                stack.append(int(v))
        nxt += 1
    return label


def polysemantic_heads(attribution: np.ndarray, tokens: Sequence[frozenset[int]], W_dec: torch.Tensor | np.ndarray,
                       *, density: np.ndarray | None = None, decode: Callable[[int], str] | None = None,
                       **settings: Any) -> PolysemanticHeads:
    """Group each head's top features into families and flag polysemantic heads (rule: module docstring).

    attribution: [d_sae, n_heads] from ``head_attribution``; tokens: per feature, the set of token ids
    at its top activations (``token_sets``); W_dec: [d_sae, d_in]; density: [d_sae] firing
    frequency (0 = dead, excluded); decode: token id -> text for the ``families`` column.
    settings: overrides of ``POLYSEMANTIC_DEFAULTS``.
    """
    unknown = sorted(set(settings) - set(POLYSEMANTIC_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown polysemantic-head setting(s) {unknown}; valid: {', '.join(POLYSEMANTIC_DEFAULTS)}")
    s = {**POLYSEMANTIC_DEFAULTS, **settings}
    if not 0 <= s["min_weight"] <= 1 or s["top_features"] < 1 or s["min_family_size"] < 1:
        raise ConfigError(f"settings {s}: need 0 <= min_weight <= 1, top_features >= 1, min_family_size >= 1")
    w = np.asarray(attribution, dtype=np.float64)
    d_sae, n_heads = w.shape
    dec = _f64(W_dec)
    if len(tokens) != d_sae or dec.shape[0] != d_sae:
        raise ShapeError(f"attribution has {d_sae} features but tokens has {len(tokens)} and W_dec {dec.shape[0]}; "
                         "pass arrays of the same SAE")
    alive = np.ones(d_sae, bool) if density is None else np.asarray(density) > 0
    unit = dec / np.maximum(np.linalg.norm(dec, axis=1, keepdims=True), 1e-300)
    owner = w.argmax(axis=1)
    family = -np.ones(d_sae, dtype=np.int64)
    rows, next_id = [], 0
    for h in range(n_heads):
        mine = np.flatnonzero(alive & (owner == h) & (w[:, h] >= s["min_weight"]) & (w.sum(axis=1) > 0))
        top = mine[np.lexsort((mine, -w[mine, h]))][: s["top_features"]]
        n = len(top)
        jac = np.zeros((n, n))
        for a in range(n):
            for b in range(a + 1, n):
                ta, tb = tokens[top[a]], tokens[top[b]]
                union = len(ta | tb)
                jac[a, b] = jac[b, a] = len(ta & tb) / union if union else 0.0
        related = (jac >= s["min_jaccard"]) | (unit[top] @ unit[top].T >= s["min_cosine"])
        labels = _components(n, related)
        sizes = np.bincount(labels, minlength=labels.max() + 1 if n else 0)
        family[top] = labels + next_id
        next_id += len(sizes)
        big = sizes >= s["min_family_size"]
        order = np.argsort(-sizes, kind="stable")
        text = ""
        if decode is not None and n:
            parts = []
            for fam in order:
                toks = sorted({t for i in top[labels == fam] for t in tokens[i]})[:6]
                parts.append(" ".join(repr(decode(t)) for t in toks))
            text = " | ".join(parts)
        rows.append({"head": h, "n_belonging": len(mine), "n_top": n, "n_families": int(big.sum()),
                     "family_sizes": "+".join(str(int(sizes[f])) for f in order),
                     "polysemantic": bool(n >= 2 and big.sum() >= 2), "families": text})
    return PolysemanticHeads(pd.DataFrame(rows), family, s)


# -- one prompt ------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class PromptView:
    """An SAE on one prompt: tokens [pos], feature activations ``acts`` [pos, d_sae] and the
    prompt's hook_z ``z`` [pos, n_heads, d_head] (for ``dfa``)."""

    sae: Any
    tokens: list[str]
    acts: np.ndarray
    z: np.ndarray

    def top_features(self, n: int) -> list[int]:
        """Up to ``n`` features that fired, largest max activation over the prompt first (ties: lower index)."""
        peak = self.acts.max(axis=0) if len(self.acts) else np.zeros(self.acts.shape[1])
        idx = np.flatnonzero(peak > 0)
        return [int(i) for i in idx[np.lexsort((idx, -peak[idx]))][:n]]

    def dfa(self, feature: int) -> np.ndarray:
        """Direct feature attribution of ``feature`` by head: [pos, n_heads]; ConfigError for an SAE
        that does not read hook_z (heads do not apply to the residual stream or the MLP)."""
        site = getattr(self.sae.cfg, "site", "hook_z")
        if site != "hook_z":
            raise ConfigError(f"per-head attribution applies to hook_z SAEs only; this SAE reads {site!r} "
                              f"({self.sae.cfg.hook_name}), which has no heads: use its feature activations")
        return direct_feature_attribution(self.sae, self.z, [feature])[:, 0, :]

    def token_table(self, k: int = 5) -> pd.DataFrame:
        """One row per token: pos, token, n_active, top (its k strongest features as "f12 1.3, ...")."""
        rows = []
        for p, (tok, a) in enumerate(zip(self.tokens, self.acts)):
            on = np.flatnonzero(a > 0)
            best = on[np.lexsort((on, -a[on]))][:k]
            rows.append({"pos": p, "token": tok, "n_active": len(on),
                         "top": ", ".join(f"f{i} {a[i]:.3g}" for i in best)})
        return pd.DataFrame(rows)
