"""Resampling dead latents of a ReLU SAE during training (Anthropic 2023), on a ``TrainState``.

Latents that fired on no token since max(last resample, step - dead window) are dead. Score
``resample_sample`` random training tokens by squared reconstruction error, draw one token per
dead latent with probability proportional to error^2, set the decoder row to the token's
centred direction (x - b_dec, unit norm), the encoder column to that direction times
``resample_encoder_scale`` x the mean encoder-column norm of live latents, b_enc to 0, and reset
their Adam moments. The draws come from a CPU generator seeded by (seed, step), so a run is the
same on every device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from sae.dense_relu import encoder_matrix, with_columns

if TYPE_CHECKING:
    from sae.train_state import TrainState


@torch.no_grad()
def resample_dead(tr: TrainState, step: int) -> int:
    """Resample the latents of ``tr`` dead at 1-based ``step``; returns how many."""
    c, p, dev = tr.cfg, tr.p, tr.device
    since = max(tr.prev_resample, step - c.dead_window_steps)
    dead = tr.last_fired <= since
    tr.prev_resample = step
    idx = dead.nonzero(as_tuple=True)[0]
    if idx.numel() == 0:
        return 0
    g = torch.Generator().manual_seed(c.seed * 7_919 + step)
    sample = torch.randint(0, tr.n, (min(c.resample_sample, max(tr.n, 1)),), generator=g)
    losses = torch.empty(sample.shape[0])
    W1, W_dec_cd = encoder_matrix(p["W_encT"], p["b_enc"], tr.cd), p["W_dec"].to(tr.cd)
    buf, chunk = tr.ws.get("pre", (c.batch_size, c.d_sae), tr.cd, dev), c.batch_size
    for s in range(0, sample.shape[0], chunk):
        xc = tr.x.index_select(0, sample[s:s + chunk].to(dev)) - p["b_dec"]
        f = torch.matmul(with_columns(xc, (1.0,), tr.cd), W1.T, out=buf[:xc.shape[0]]).relu_()
        losses[s:s + chunk] = (f @ W_dec_cd).float().sub_(xc).pow_(2).sum(1).cpu()  # ||x_hat - x||^2
    weights = losses.pow(2)
    if not bool(weights.sum() > 0):
        weights = torch.ones_like(weights)
    n_pos = int((weights > 0).sum())
    pick = torch.multinomial(weights, idx.numel(), replacement=idx.numel() > n_pos, generator=g)
    dirs = tr.x.index_select(0, sample[pick].to(dev)) - p["b_dec"]
    dirs /= dirs.norm(dim=1, keepdim=True).clamp_min(1e-12)
    alive = ~dead
    enc_norm = float(p["W_encT"][alive].norm(dim=1).mean()) if bool(alive.any()) else 1.0
    p["W_dec"][idx] = dirs
    p["W_encT"][idx] = dirs * (enc_norm * c.resample_encoder_scale)
    p["b_enc"][idx] = 0.0
    for state in (tr.m, tr.v):
        state["W_dec"][idx] = 0.0
        state["W_encT"][idx] = 0.0
        state["b_enc"][idx] = 0.0
    tr.last_fired[idx] = step
    tr.n_resampled += int(idx.numel())
    return int(idx.numel())
