"""Exact 1.5-entmax (Peters, Niculae & Martins 2019), sort-based, with its closed-form gradient.

entmax15(z) = argmax_{p in simplex} <p, z> + H_1.5(p) has the closed form

    p_i = [z_i / 2 - tau]_+^2,   tau such that sum_i p_i = 1.

For a candidate support made of the k largest values (sorted z_(1) >= ... >= z_(k), halved),
sum_{i<=k} (z_(i)/2 - tau)^2 = 1 is a quadratic in tau whose smaller root is

    tau_k = mean_k - sqrt((1 - ss_k) / k),   ss_k = sum_{i<=k} (z_(i)/2 - mean_k)^2,

and the support size is the largest k with tau_k <= z_(k)/2. Unlike softmax the result is
exactly zero outside the support (sparse gates). Cost O(d log d) per row (one sort).

Gradient: on the support, with s = sqrt(p), the Jacobian is diag(s) - s s^T / sum(s)
(symmetric), so the vector-Jacobian product is g_z = s * g - s * <s, g> / sum(s).
"""

from __future__ import annotations

import torch

from analysis.errors import ShapeError


def _entmax15_forward(z: torch.Tensor, dim: int) -> torch.Tensor:
    x = z / 2
    x = x - x.amax(dim=dim, keepdim=True)  # shift invariance: p depends on z only up to a constant
    xs, _ = torch.sort(x, dim=dim, descending=True)
    d = x.shape[dim]
    shape = [1] * x.ndim
    shape[dim] = d
    k = torch.arange(1, d + 1, dtype=x.dtype, device=x.device).view(shape)
    mean = xs.cumsum(dim) / k
    mean_sq = (xs * xs).cumsum(dim) / k
    ss = k * (mean_sq - mean * mean)
    tau = mean - torch.sqrt(torch.clamp((1 - ss) / k, min=0))
    support = (tau <= xs).sum(dim=dim, keepdim=True)  # >= 1: tau_1 = x_(1) - 1 <= x_(1)
    tau_star = tau.gather(dim, support - 1)
    return torch.clamp(x - tau_star, min=0) ** 2


class _Entmax15(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: torch.Tensor, dim: int) -> torch.Tensor:  # type: ignore[override]
        p = _entmax15_forward(z, dim)
        ctx.save_for_backward(p)
        ctx.dim = dim
        return p

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (p,) = ctx.saved_tensors
        s = p.sqrt()
        gs = grad * s
        q = gs.sum(ctx.dim, keepdim=True) / s.sum(ctx.dim, keepdim=True)
        return gs - q * s, None


def entmax15(z: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """1.5-entmax of ``z`` along ``dim`` (same shape; rows sum to 1; exact zeros off the support).

    Raises ShapeError for a 0-d tensor or an empty ``dim``.
    """
    if z.ndim == 0 or z.shape[dim] == 0:
        raise ShapeError(f"entmax15 needs a non-empty axis {dim}, got shape {tuple(z.shape)}; "
                         "pass scores shaped (..., n_experts)")
    return _Entmax15.apply(z, dim % z.ndim)
