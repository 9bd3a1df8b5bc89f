"""Singular values of per-head attention circuits from their factors, exactly, in float64 (pure: tensors in,
tensors and arrays out, no I/O).

The circuits (TransformerLens's ``FactoredMatrix`` view; biases are not part of them, as in TransformerLens):

- QK of head h: W_QK = W_Q[h] @ W_K[g]ᵀ, (d_model, d_model): the bilinear form that scores a query
  residual vector against a key residual vector (scores = x_q W_QK x_kᵀ / sqrt(d_head));
- OV of head h: W_OV = W_V[g] @ W_O[h], (d_model, d_model): what the head writes to the residual stream
  for a unit of attention on a residual vector (residual row-vector convention, x @ W_OV);

with W_Q, W_K, W_V (·, d_model, d_head), W_O (n_heads, d_head, d_model) and g = kv_head[h] the key/value
head that query head h reads (g = h without grouped-query attention; see ``analysis.circuits.weights``).
Both have rank <= d_head.

Exact factored singular values, never forming d_model x d_model: for A (d_model, d_head) and
B (d_head, d_model) take the reduced QR factorisations A = Q_A R_A and Bᵀ = Q_B R_B (Q orthonormal
columns (d_model, d_head), R (d_head, d_head)). Then A B = Q_A (R_A R_Bᵀ) Q_Bᵀ and, Q_A and Q_B having
orthonormal columns, the singular values of A B are those of the small M = R_A R_Bᵀ (d_head, d_head)
plus d_model - d_head exact zeros. Householder QR and the SVD are backward stable in float64, so every
singular value has an absolute error of a few eps64 · s_max. Measured against a dense float64 SVD of the
product (``tests/analysis/circuits``, which require 1e-10): every nonzero singular value agrees to
< 3e-14 relative on random factors (d_model 8 to 1024, d_head 4 to 128, rank-deficient ones included) and
to 2e-15 on MiniLM's 144 QK and OV circuits. Work and
memory: O(d_model · d_head²) and O(d_model · d_head) per head (TransformerLens's ``FactoredMatrix.svd``
gives the same values from SVDs of A and B instead of QRs). With grouped-query attention the QR of a
shared K (or V) factor is done once per key/value head.

Metrics of the d_head-long spectrum s (descending; the nonzero-rank part, the zeros beyond d_head are
left out, so a full-rank head has a finite kappa):

- s_max = s[0], s_min = s[-1];
- kappa = s_max / s_min; ``inf`` (never an exception) when s_min is zero to float64 precision,
  s_min <= s_max · max(d_model, d_head) · eps64 (``numpy.linalg.matrix_rank``'s tolerance for the dense
  product), and when the circuit is zero (s_max = 0): a head whose factors are rank-deficient has an
  infinite kappa;
- stable rank = Σ s² / s_max² in [1, d_head] (0 for a zero circuit);
- effective rank (Roy & Vetterli 2007) = exp(-Σ p ln p), p = s / Σ s over s > 0, in [1, d_head]
  (0 for a zero circuit).

Device: the maths runs in float64 on the given device; MPS has no float64, so on an MPS device it runs
in float64 on the CPU (``compute_device``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from analysis.errors import ShapeError

CIRCUIT_KINDS = ("QK", "OV")
METRICS = ("kappa", "stable_rank", "effective_rank", "s_max", "s_min")
EPS64 = float(np.finfo(np.float64).eps)


def compute_device(device: torch.device | str | None) -> torch.device:
    """Where the float64 maths runs: ``device`` itself, or the CPU for MPS (no float64 there) and None."""
    if device is None:
        return torch.device("cpu")
    device = torch.device(device)
    return torch.device("cpu") if device.type == "mps" else device


def _float64(x: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    return x.detach().to(device=compute_device(device if device is not None else x.device), dtype=torch.float64)


def r_factor(x: torch.Tensor) -> torch.Tensor:
    """R of the reduced QR factorisation of ``x`` (..., rows, cols) in float64: (..., min(rows, cols), cols),
    with x = Q R and Q's columns orthonormal, so x and R have the same singular values and xᵀx = RᵀR."""
    if x.ndim < 2 or 0 in x.shape[-2:]:
        raise ShapeError(f"expected factors (..., rows, cols) with no empty axis, got shape {tuple(x.shape)}")
    return torch.linalg.qr(x.to(torch.float64), mode="r").R


def singular_values_of_factors(r_left: torch.Tensor, r_right: torch.Tensor) -> torch.Tensor:
    """Singular values (..., k) of A @ B, descending, from ``r_left`` = R of A (..., k_a, d_head) and
    ``r_right`` = R of Bᵀ (..., k_b, d_head): those of r_left @ r_rightᵀ (..., k_a, k_b), k = min(k_a, k_b)."""
    if r_left.shape[-1] != r_right.shape[-1]:
        raise ShapeError(f"the factors' inner dimensions differ: R of A is {tuple(r_left.shape)}, R of Bᵀ is "
                         f"{tuple(r_right.shape)}; A (d_model, d_head) and B (d_head, d_model) must share d_head")
    return torch.linalg.svdvals(r_left @ r_right.transpose(-2, -1))


def factored_singular_values(a: torch.Tensor, b: torch.Tensor, *,
                             device: torch.device | str | None = None) -> torch.Tensor:
    """Singular values of A @ B without forming it: ``a`` (..., d_model, d_head), ``b`` (..., d_head, d_model)
    (batch dims broadcast) -> float64 (..., min(d_model, d_head)), descending, on ``compute_device(device)``
    (default: ``a``'s device, or the CPU for MPS). The d_model - d_head zero singular values are left out.

    Raises ShapeError when the inner dimensions differ or an axis is empty.
    """
    if a.ndim < 2 or b.ndim < 2 or a.shape[-1] != b.shape[-2]:
        raise ShapeError(f"expected A (..., d_model, d_head) and B (..., d_head, d_model), got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}; the last axis of A must match the second-to-last of B")
    a, b = _float64(a, device), _float64(b, device)
    return singular_values_of_factors(r_factor(a), r_factor(b.transpose(-2, -1)))


def circuit_singular_values(w_q: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor, w_o: torch.Tensor,
                            kv_head: np.ndarray | list[int], *, device: torch.device | str | None = None,
                            ) -> dict[str, torch.Tensor]:
    """Singular values of every head's QK and OV circuit of one layer.

    ``w_q`` (n_heads, d_model, d_head), ``w_k`` / ``w_v`` (n_kv_heads, d_model, d_head), ``w_o``
    (n_heads, d_head, d_model), ``kv_head`` (n_heads,) the key/value head each query head reads. Returns
    {"QK": (n_heads, k), "OV": (n_heads, k)} float64, descending, k = min(d_model, d_head), on
    ``compute_device(device)``. Each K/V factor is factorised once however many query heads share it.
    """
    kv = torch.as_tensor(np.asarray(kv_head, dtype=np.int64))
    n_heads, n_kv = w_q.shape[0], w_k.shape[0]
    if w_q.ndim != 3 or w_k.ndim != 3 or w_v.ndim != 3 or w_o.ndim != 3:
        raise ShapeError(f"expected 3-D per-head weights, got W_Q {tuple(w_q.shape)}, W_K {tuple(w_k.shape)}, "
                         f"W_V {tuple(w_v.shape)}, W_O {tuple(w_o.shape)}")
    if w_o.shape[0] != n_heads or w_v.shape[0] != n_kv or kv.shape != (n_heads,) or (
            n_heads and (int(kv.min()) < 0 or int(kv.max()) >= n_kv)):
        raise ShapeError(f"head counts disagree: W_Q {tuple(w_q.shape)}, W_O {tuple(w_o.shape)} need n_heads "
                         f"rows, W_K {tuple(w_k.shape)} and W_V {tuple(w_v.shape)} n_kv_heads rows, and kv_head "
                         f"{kv.tolist()} one index in [0, n_kv_heads) per query head")
    dev = device if device is not None else w_q.device
    r_q = r_factor(_float64(w_q, dev))                                      # (n_heads, k, d_head)
    r_k = r_factor(_float64(w_k, dev))[kv.to(compute_device(dev))]          # (n_kv -> n_heads, k, d_head)
    r_v = r_factor(_float64(w_v, dev))[kv.to(compute_device(dev))]
    r_o = r_factor(_float64(w_o, dev).transpose(-2, -1))                    # R of W_Oᵀ (n_heads, k, d_head)
    return {"QK": singular_values_of_factors(r_q, r_k), "OV": singular_values_of_factors(r_v, r_o)}


def spectrum_metrics(s: np.ndarray, *, d_model: int) -> dict[str, np.ndarray]:
    """s_max, s_min, kappa, stable_rank, effective_rank of each row of ``s`` (n, k), descending singular values
    of circuits that are d_model x d_model (the tolerance of kappa's ``inf``; see the module docstring).
    Every value is a float64 array (n,)."""
    s = np.asarray(s, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] == 0:
        raise ShapeError(f"expected singular values (n, k) with k >= 1, got shape {s.shape}")
    s_max, s_min = s[:, 0], s[:, -1]
    tol = s_max * max(d_model, s.shape[1]) * EPS64
    singular = (s_max == 0.0) | (s_min <= tol)
    with np.errstate(divide="ignore", invalid="ignore"):
        kappa = np.where(singular, math.inf, s_max / np.where(singular, 1.0, s_min))
        stable = np.where(s_max > 0, (s**2).sum(axis=1) / np.where(s_max > 0, s_max, 1.0) ** 2, 0.0)
        total = s.sum(axis=1, keepdims=True)
        p = np.where(s > 0, s / np.where(total > 0, total, 1.0), 0.0)
        entropy = -(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)).sum(axis=1)
    effective = np.where(total[:, 0] > 0, np.exp(entropy), 0.0)
    return {"s_max": s_max.copy(), "s_min": s_min.copy(), "kappa": kappa, "stable_rank": stable,
            "effective_rank": effective}
