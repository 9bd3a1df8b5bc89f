"""Output-mode HOSVD of a bilinear layer's interaction tensor: the output directions it uses most.

For a layer with (symmetrised) tensor B (d_out, n, n), the top left singular vectors of B
flattened to (d_out, n²) are the directions u whose interaction matrices Q(u) carry the most
Frobenius norm. They come from the (d_out, d_out) Gram matrix, so the n² axis is never formed.
Used as the default direction set (``hosvd:K``) of ``analysis.bilinear.loader``.

Pure: tensors in, a frozen dataclass of CPU numpy arrays out; float64 on the ``device`` given.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from analysis.bilinear.decompose import BilinearWeights, eigendecompose, interaction_matrices, one_lapack_thread, \
    readonly
from analysis.errors import ConfigError


@dataclass(frozen=True, eq=False)
class Hosvd:
    """Output-mode HOSVD of the symmetrised tensor B (d_out, n, n) flattened to (d_out, n²).

    ``directions[r]`` (unit, d_out) are its left singular vectors and ``singular_values[r]``
    = ‖Q(directions[r])‖_F, descending; the right singular vectors are vec(Q(u_r)) / σ_r.
    """

    singular_values: np.ndarray  # (r,)
    directions: np.ndarray  # (r, d_out)


def hosvd(layer: BilinearWeights, n_components: int | None = None, *,
          device: str | torch.device | None = None) -> Hosvd:
    """Top output directions of the layer's tensor, from its (d_out, d_out) Gram matrix
    G_ab = ⟨sym B_a, sym B_b⟩ = P M Pᵀ (+ bias terms), M = ½((W̃W̃ᵀ)⊙(ṼṼᵀ) + (W̃Ṽᵀ)⊙(ṼW̃ᵀ)),
    so the n² axis is never formed. The sign of u_r makes Q(u_r)'s top-|λ| eigenvalue positive.
    Computed in float64 on ``device`` (default CPU); the result holds CPU arrays.
    """
    dev = torch.device("cpu") if device is None else torch.device(device)
    w, v = (t.to(dev) for t in layer.folded())
    p = layer.p.to(dev)
    m = ((w @ w.T) * (v @ v.T) + (w @ v.T) * (v @ w.T)) / 2
    g = p @ m @ p.T
    if layer.p_bias is not None:
        b = layer.p_bias.to(dev)
        d = p @ (w[:, -1] * v[:, -1])  # (d_out,): the constant-constant entry of each B_a
        g = g + torch.outer(d, b) + torch.outer(b, d) + torch.outer(b, b)
    with one_lapack_thread(dev.type == "cpu" and layer.d_out <= 1024):
        lam, vec = torch.linalg.eigh((g + g.T) / 2)
    order = torch.argsort(lam, descending=True, stable=True)
    r = layer.d_out if n_components is None else int(n_components)
    if not 1 <= r <= layer.d_out:
        raise ConfigError(f"hosvd n_components={n_components} must lie in 1..d_out={layer.d_out}")
    sigma = lam[order[:r]].clamp(min=0).sqrt()
    u = vec[:, order[:r]].T.contiguous()  # (r, d_out)
    keep = sigma > 0
    if not keep.any():
        raise ConfigError(f"{layer.name}: the interaction tensor is zero; there is nothing to decompose")
    u, sigma = u[keep], sigma[keep]
    top, _ = eigendecompose(interaction_matrices(layer, u, device=dev))
    u = u * torch.where(top[:, 0] < 0, -1.0, 1.0)[:, None]
    return Hosvd(readonly(sigma.cpu().numpy()), readonly(u.cpu().numpy()))
