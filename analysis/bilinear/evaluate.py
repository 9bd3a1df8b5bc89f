"""A bilinear decomposition evaluated on inputs, and its eigenvectors read back in input space.

With Q(u) = Σ_i λ_i v_i v_iᵀ (``analysis.bilinear.decompose``), an input x (d_in,) with
x̃ = [x; 1] when the layer is biased gives

    uᵀ out(x) = Σ_i λ_i (v_i · x̃)²

- ``contributions``: every term λ_i (v_i · x̃)² for a batch of inputs (batch, k, n);
- ``truncation_curve``: outputs rebuilt from the top-k eigenvectors (by |λ|) of each direction,
  scored by accuracy, agreement with the full decomposition and relative error;
- ``through_embedding`` / ``token_scores``: eigenvectors mapped to the raw input space (an image
  model's pixels) or scored against every token's input (an LM's vocabulary);
- ``top_signed``: the most positive and most negative eigenvalues of one direction.

Pure numpy on the decomposition's CPU arrays; no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from analysis.bilinear.decompose import Decomposition, readonly
from analysis.errors import ConfigError, ShapeError


def augment(dec: Decomposition, x: np.ndarray | torch.Tensor) -> np.ndarray:
    """Layer inputs x (batch, d_in) -> x̃ (batch, n) float64 as the decomposition's space needs."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != dec.d_in:
        raise ShapeError(f"inputs must be (batch, d_in={dec.d_in}), got {x.shape}; pass the layer's inputs")
    return np.concatenate([x, np.ones((len(x), 1))], 1) if dec.biased else x


def contributions(dec: Decomposition, x: np.ndarray | torch.Tensor) -> np.ndarray:
    """λ_i (v_i · x̃)² for every input, direction and eigenvector: (batch, k, n).

    Summed over the last axis it equals uᵀ out(x) (the bilinear part's output along u).
    """
    xt = augment(dec, x)
    proj = np.einsum("kin,bn->bki", dec.eigenvectors, xt)
    return dec.eigenvalues[None] * proj**2


@dataclass(frozen=True, eq=False)
class TruncationCurve:
    """Keeping the top-k eigenvectors (by |λ|) of every direction, for k in ``ks``.

    accuracy: argmax over directions (+ offsets) equals ``labels`` (NaN without labels);
    agreement: argmax equals the full decomposition's argmax (NaN with one direction);
    relative_error: ‖truncated − full‖₂ / ‖full‖₂ over all inputs and directions.
    """

    ks: np.ndarray  # (m,) eigenvectors kept per direction
    accuracy: np.ndarray  # (m,)
    agreement: np.ndarray  # (m,)
    relative_error: np.ndarray  # (m,)


def truncation_curve(dec: Decomposition, x: np.ndarray | torch.Tensor, *, ks: Sequence[int] | None = None,
                     offsets: np.ndarray | None = None, labels: np.ndarray | None = None) -> TruncationCurve:
    """Outputs along each direction from the top-k eigenvectors only, for each k in ``ks``
    (default 0..n). ``offsets`` (k,) are added to every output (e.g. a class head's bias)."""
    contrib = contributions(dec, x)  # (batch, k, n)
    n = contrib.shape[2]
    ks_arr = np.arange(n + 1) if ks is None else np.asarray(sorted(set(int(k) for k in ks)))
    if ks_arr.size == 0 or ks_arr.min() < 0 or ks_arr.max() > n:
        raise ConfigError(f"truncation ks must lie in 0..{n}, got {list(ks_arr)}")
    cum = np.concatenate([np.zeros(contrib.shape[:2] + (1,)), np.cumsum(contrib, axis=2)], axis=2)
    off = np.zeros(contrib.shape[1]) if offsets is None else np.asarray(offsets, dtype=np.float64)
    full = cum[..., n] + off
    full_norm = np.linalg.norm(cum[..., n]) or 1.0
    acc, agree, rel = [], [], []
    for k in ks_arr:
        out = cum[..., k] + off
        acc.append(float((out.argmax(1) == labels).mean()) if labels is not None else np.nan)
        agree.append(float((out.argmax(1) == full.argmax(1)).mean()) if contrib.shape[1] > 1 else np.nan)
        rel.append(float(np.linalg.norm(out - full) / full_norm))
    return TruncationCurve(readonly(ks_arr), readonly(np.array(acc)), readonly(np.array(agree)),
                           readonly(np.array(rel)))


# -- back to input space ------------------------------------------------------------------
def through_embedding(eigenvectors: np.ndarray, embedding: np.ndarray) -> np.ndarray:
    """Eigenvectors (..., n) of a layer whose input is e = E x (+ b) mapped to the raw input
    space: Eᵀ v[:d_in] (..., d_raw), with ``embedding`` E (d_in, d_raw) as nn.Linear stores it.
    (v · e = (Eᵀ v) · x + v · b: the image shows how each raw input feature drives v.)"""
    emb = np.asarray(embedding, dtype=np.float64)
    vec = np.asarray(eigenvectors, dtype=np.float64)
    return vec[..., :emb.shape[0]] @ emb


def token_scores(vectors: np.ndarray, token_inputs: np.ndarray, *, biased: bool) -> np.ndarray:
    """v · x̃_t for eigenvectors ``vectors`` (m, n) and every token t: (m, vocab).

    ``token_inputs`` (vocab, d_in) are the layer inputs a token alone would give (for an LM:
    its embedding through the MLP's RMSNorm); x̃_t has a 1 appended when ``biased``.
    λ · score² is that token's contribution through the eigenvector.
    """
    x = np.asarray(token_inputs, dtype=np.float64)
    vec = np.asarray(vectors, dtype=np.float64)
    if vec.ndim != 2 or vec.shape[1] != x.shape[1] + int(biased):
        raise ShapeError(f"token_scores: eigenvectors {vec.shape} do not match token inputs {x.shape} "
                         f"(biased={biased}); pass eigenvectors of the same layer")
    if biased:
        x = np.concatenate([x, np.ones((len(x), 1))], 1)
    return vec @ x.T


def top_signed(eigenvalues: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the m most positive and the m most negative eigenvalues of one direction
    (each ordered by magnitude; fewer when there are fewer of that sign)."""
    lam = np.asarray(eigenvalues, dtype=np.float64)
    pos = np.flatnonzero(lam > 0)
    neg = np.flatnonzero(lam < 0)
    return pos[np.argsort(-lam[pos], kind="stable")][:m], neg[np.argsort(lam[neg], kind="stable")][:m]
