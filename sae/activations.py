"""The encoders' nonlinearities, one per architecture: pure functions on tensors, no I/O.

With pre = (x - b_dec) W_enc + b_enc [..., d_sae] (``SAE.pre_acts``):

- relu:      f = ReLU(pre)
- topk:      f = ReLU(pre) on the k largest entries of each row (exactly k positions)
- jumprelu:  f = ReLU(pre) * H(pre - threshold)    (threshold [d_sae] >= 0, learned; Rajamanoharan
             et al. 2024b; SAELens's inference encoder)
- batchtopk, matryoshka_batchtopk: in training, the k * n_rows largest ReLU(pre) of the whole batch
             (``batch_topk_mask``); at inference a JumpReLU whose threshold is the same for every
             latent (what SAELens saves them as)
- gated:     pre is the gate pi = (x - b_dec) W_enc + b_gate (b_gate stored as ``b_enc``);
             magnitude m = (x - b_dec) (W_enc * exp(r_mag)) + b_mag = (pi - b_gate) * exp(r_mag) + b_mag;
             f = 1[pi > 0] * ReLU(m)    (Rajamanoharan et al. 2024a)

H is the Heaviside step (H(0) = 0, as SAELens's ``x > threshold``).
"""

from __future__ import annotations

import torch


def relu(pre: torch.Tensor) -> torch.Tensor:
    return torch.relu(pre)


def topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    """ReLU of the k largest entries per row; zeros elsewhere. pre: [..., d_sae]."""
    values, indices = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter_(-1, indices, values.relu())


def jumprelu(pre: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """ReLU(pre) where pre > threshold, else 0. pre: [..., d_sae]; threshold: [d_sae] or scalar."""
    return torch.relu(pre) * (pre > threshold.to(pre.dtype))


def batch_topk_count(k: float, n_rows: int, d_sae: int) -> int:
    """Entries a BatchTopK batch of ``n_rows`` keeps: int(k * n_rows) (SAELens's rounding), at most
    the batch's size."""
    return min(int(k * n_rows), n_rows * d_sae)


def batch_topk_mask(pre: torch.Tensor, k: float) -> torch.Tensor:
    """Bool [n_rows, d_sae]: the int(k * n_rows) largest entries of ReLU(pre) over the whole batch
    (positions whose ReLU is 0 may be among them when fewer entries are positive; their f is 0)."""
    flat = pre.reshape(-1, pre.shape[-1])
    n = batch_topk_count(k, flat.shape[0], flat.shape[1])
    idx = flat.relu().reshape(-1).topk(n, sorted=False)[1]
    return torch.zeros(flat.numel(), dtype=torch.bool, device=pre.device).index_fill_(0, idx, True).view(flat.shape)


def batch_topk(pre: torch.Tensor, k: float) -> torch.Tensor:
    """Training-time BatchTopK codes: ReLU(pre) at ``batch_topk_mask``, 0 elsewhere."""
    flat = pre.reshape(-1, pre.shape[-1])
    return (flat.relu() * batch_topk_mask(flat, k)).reshape(pre.shape)


def gated_magnitude(pre: torch.Tensor, b_gate: torch.Tensor, r_mag: torch.Tensor, b_mag: torch.Tensor) -> torch.Tensor:
    """Magnitude pre-activation from the gate's: (pi - b_gate) * exp(r_mag) + b_mag."""
    return (pre - b_gate) * r_mag.exp() + b_mag


def gated(pre: torch.Tensor, b_gate: torch.Tensor, r_mag: torch.Tensor, b_mag: torch.Tensor) -> torch.Tensor:
    """Gated codes 1[pi > 0] * ReLU(magnitude); pre = pi, the gate pre-activation [..., d_sae]."""
    return (pre > 0) * torch.relu(gated_magnitude(pre, b_gate, r_mag, b_mag))
