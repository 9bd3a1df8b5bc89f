"""The dense ReLU training step: gradients by hand while most latents still fire.

A ReLU SAE starts with about half of its latents active on every token, so for its first steps
(``sae.train`` switches to the sparse products of ``sae.sparse`` once L0 drops) the step is a
handful of dense [batch, d_sae] matrices. Half of that step used to be elementwise passes and
reductions over them; here the reductions ride along inside the GEMMs as extra columns, and the
[batch, d_sae] matrices are touched by three elementwise passes only (ReLU, the mask of firing
latents, ``threshold_backward``):

- encoder: ``f = ReLU([xc | 1] @ [W_enc^T | b_enc]^T)`` (b_enc folded into the GEMM);
- ``f^T @ [g | 1]`` gives grad W_dec and, in its last column, sum_b f (the L1 term);
- ``[g | 1 | c_hi | c_lo] @ [W_dec | 0 | 1 | 1]^T = g W_dec^T + c`` with c = l1 / batch split
  into two compute-dtype numbers (c_hi = c rounded, c_lo = the rest), so bfloat16 does not round
  the L1 gradient (a systematic 0.2% change of the coefficient otherwise);
- ``threshold_backward`` keeps that gradient where f > 0 (the ReLU mask) in place;
- ``g_pre^T @ [xc | 1]`` gives grad W_enc^T and, in its last column, grad b_enc = sum_b g_pre;
- firing counts: ``sae.sparse.column_counts(positive(f))`` (uint8 sums of 128-row blocks).

The two [batch, d_sae] matrices (``pre``, which becomes f, and the gradient) live in buffers the
caller keeps across steps (``Workspace``): a fresh 50 MB tensor costs its page faults on every
step (about a third of a GEMM's time here).

In bfloat16 the GEMM outputs are rounded to bfloat16 (as every bf16 GEMM output is); the
gradients agree with float32 autograd to bf16 precision (tested). Names: x, xc [batch, d_in]
(xc = x - b_dec), f [batch, d_sae], g = 2 (x_hat - x) / batch [batch, d_in].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sae.sparse import column_counts, positive

# A ReLU step runs the dense path while the previous step's L0 exceeds this fraction of d_sae
# (per compute dtype), else the sparse one. Measured crossover of the two paths' step times on this
# project's 2-core CPU (d_in 384, d_sae 6144, batch 4096; 1 and 2 threads): ~3.5-4% of d_sae in
# bfloat16, ~14% in float32 (its dense GEMMs cost ~5x the bf16 ones; the sparse products are float32
# in both). A fixed threshold (not timing at run time) keeps a run a function of (cfg, step, state).
DENSE_ABOVE_DENSITY = {"bfloat16": 0.035, "float32": 0.14}


class Workspace:
    """Buffers reused across training steps, by name (re-made when shape, dtype or device changes)."""

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype,
            device: torch.device | str = "cpu") -> torch.Tensor:
        buf = self._bufs.get(name)
        device = torch.device(device)
        if buf is None or tuple(buf.shape) != tuple(shape) or buf.dtype != dtype or buf.device != device:
            buf = self._bufs[name] = torch.empty(shape, dtype=dtype, device=device)
        return buf


def with_columns(a: torch.Tensor, values: tuple[float, ...], dtype: torch.dtype) -> torch.Tensor:
    """[a | values...]: ``a`` [n, m] with constant columns appended, in ``dtype`` (one copy)."""
    n, m = a.shape
    out = torch.empty(n, m + len(values), dtype=dtype, device=a.device)
    out[:, :m] = a
    for j, v in enumerate(values):
        out[:, m + j] = v
    return out


def encoder_matrix(W_encT: torch.Tensor, b_enc: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[W_enc^T | b_enc] [d_sae, d_in + 1] in ``dtype``: ``with_columns(xc, (1,)) @ it.T`` is the
    encoder pre-activation with its bias."""
    d_sae, d_in = W_encT.shape
    out = torch.empty(d_sae, d_in + 1, dtype=dtype, device=W_encT.device)
    out[:, :d_in] = W_encT
    out[:, d_in] = b_enc
    return out


def split_constant(c: float, dtype: torch.dtype) -> tuple[float, float]:
    """(hi, lo) representable in ``dtype`` with hi + lo = c to ~dtype precision squared."""
    hi = float(torch.tensor(c, dtype=torch.float64).to(dtype))
    lo = float(torch.tensor(c - hi, dtype=torch.float64).to(dtype))
    return hi, lo


@dataclass(frozen=True, eq=False)
class DenseGradients:
    """Gradients of the batch loss and what the step measured (all float32 except counts)."""

    W_dec: torch.Tensor  # [d_sae, d_in]
    W_encT: torch.Tensor  # [d_sae, d_in]
    b_enc: torch.Tensor  # [d_sae]
    b_dec: torch.Tensor  # [d_in]
    fired: torch.Tensor  # [d_sae] int32: tokens on which each latent fired
    sq_err: float  # sum ||x_hat - x||^2 over the batch
    l1_sum: float  # sum |f| over the batch


def dense_relu_gradients(xc: torch.Tensor, xc1: torch.Tensor, pre: torch.Tensor, W_dec: torch.Tensor,
                         W_encT: torch.Tensor, l1: float, ws: Workspace | None = None,
                         on_code_grad: Callable[[torch.Tensor], None] | None = None) -> DenseGradients:
    """Gradients of ``||x_hat - x||^2 + l1 * sum|f|`` (mean over the batch) of a ReLU SAE.

    ``xc`` = x - b_dec [batch, d_in] float32; ``xc1`` = [xc | 1] and ``pre`` [batch, d_sae]
    (the encoder pre-activation, bias included) in the compute dtype; ``pre`` is overwritten
    with f. ``W_dec``, ``W_encT``: the float32 master weights; ``ws``: reused buffers.
    ``on_code_grad(g_f)``: called with the loss gradient of the codes [batch, d_sae] before the
    ReLU mask is applied (the JumpReLU step reads its threshold gradient there). A ``pre`` that
    already holds codes (>= 0, e.g. a JumpReLU's) passes through the ReLU unchanged.
    """
    bsz, d_in = xc.shape
    cd = pre.dtype
    f = pre.relu_()
    hi, lo = split_constant(l1 / bsz, cd)
    W_dec_aug = with_columns(W_dec, (0.0, 1.0, 1.0), cd)  # [W_dec | 0 | 1 | 1]
    err = (f @ W_dec_aug[:, :d_in]).float().sub_(xc)  # f W_dec - (x - b_dec) = x_hat - x
    sq_err = float(torch.dot(err.view(-1), err.view(-1)))
    g = err.mul_(2.0 / bsz)
    G = with_columns(g, (1.0, hi, lo), cd)  # [g | 1 | c_hi | c_lo]
    t = (f.T @ G[:, :d_in + 1]).float()  # [grad W_dec | sum_b f]
    fired = column_counts(positive(f))
    ws = ws if ws is not None else Workspace()
    g_pre = torch.matmul(G, W_dec_aug.T, out=ws.get("g_pre", tuple(f.shape), cd, f.device))  # g W_dec^T + c
    if on_code_grad is not None:
        on_code_grad(g_pre)
    torch.ops.aten.threshold_backward.grad_input(g_pre, f, 0, grad_input=g_pre)  # zero where f == 0
    t2 = (g_pre.T @ xc1).float()  # [grad W_enc^T | grad b_enc]
    g_b_enc = t2[:, d_in].contiguous()
    return DenseGradients(W_dec=t[:, :d_in].contiguous(), W_encT=t2[:, :d_in].contiguous(), b_enc=g_b_enc,
                          b_dec=g.sum(0) - g_b_enc @ W_encT, fired=fired, sq_err=sq_err,
                          l1_sum=float(t[:, d_in].sum()))
