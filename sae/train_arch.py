"""Training steps of the jumprelu, batchtopk, matryoshka_batchtopk and gated SAEs (``TrainState``
calls ``gradients`` for them; relu and topk keep their own steps in ``sae.train_state``).

Losses (mean over the batch's B tokens; SAELens 6.54's maths, ``SAEConfig``'s docstring):

- jumprelu: ||x_hat - x||^2 + l0 * sum_i H(z_i - theta_i), f = z H(z - theta). H has no useful
  derivative, so theta gets SAELens's straight-through pseudo-derivatives with the rectangle kernel
  K(u) = 1{|u| < 1/2} and bandwidth eps: d f_i / d theta_i = -(theta_i / eps) K((z_i - theta_i) / eps),
  d H / d theta_i = -(1 / eps) K(...); z gets d f / d z = H(z - theta) and nothing from the L0 term
  (DeepMind's estimator, SAELens's default ``jumprelu_ste_to_input=False``). theta is projected to
  >= 0 before every step (SAELens).
- batchtopk: ||x_hat - x||^2 + AuxK, f = ReLU(z) at the int(k B) largest entries of the batch;
  afterwards threshold <- (1 - topk_threshold_lr) threshold + topk_threshold_lr * (smallest positive kept f),
  kept in float64 (SAELens's ``update_topk_threshold``).
- matryoshka_batchtopk: sum over the prefixes m_l of ||f[:m_l] W_dec[:m_l] + b_dec - x||^2, plus AuxK
  on the full reconstruction. With g_l = 2 (x_hat_l - x) / B, a latent of block j (m_{j-1} <= i < m_j)
  sees G_j = sum_{l >= j} g_l: its code's gradient is G_j . W_dec[i] and its decoder row's sum_b f G_j.
- gated: ||x_hat - x||^2 + l1 * sum_i ReLU(pi_i) ||W_dec[i]|| + ||ReLU(pi) W_dec + b_dec - x||^2, where
  the magnitude path's gradient reaches W_enc through W_enc * exp(r_mag) (SAELens 6.54 keeps W_dec and
  b_dec in the last term's graph, unlike the paper's frozen copy: we follow SAELens).

Routes that compute the same gradients: ``dense_gradients`` (autograd on dense [B, d_sae] tensors,
matmuls in the compute dtype: the reference; batchtopk's and matryoshka's route when forced dense),
``dense_jumprelu_gradients`` (jumprelu while more than ``DENSE_ABOVE_DENSITY`` of its latents fire:
``sae.dense_relu``'s GEMMs), ``sae.train_gated.dense_gated_gradients`` (gated while more than that
share of its gates are open: the same GEMMs, f and ReLU(pi) stacked) and ``sparse_gradients``
(hand-written over the active set, as ``sae.train_state``'s topk step: jumprelu's pattern also
holds the kernel's band theta - eps/2 < z < theta + eps/2, where theta's gradient lives; gated's is
the open gates pi > 0, where every one of its terms lives: ``sae.train_gated.gated_sparse``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from sae import activations
from sae.dense_relu import DENSE_ABOVE_DENSITY, dense_relu_gradients, encoder_matrix, with_columns
from sae.sparse import Pattern, _offsets, column_counts
from sae.train_gated import dense_gated_gradients, gated_sparse

TrainState = Any  # sae.train_state.TrainState (not imported: it imports this module)

NEW_ARCHITECTURES = ("jumprelu", "batchtopk", "matryoshka_batchtopk", "gated")
BATCH_TOPK = ("batchtopk", "matryoshka_batchtopk")


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """f = z * H(z - theta) with the straight-through gradient of theta (module docstring)."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        z, theta = ctx.saved_tensors
        ste = (theta / ctx.eps) * _rectangle((z - theta) / ctx.eps) * g
        return (z > theta) * g, -ste.sum(0), None


class _Step(torch.autograd.Function):
    """H(z - theta); gradient -(1/eps) K((z - theta)/eps) to theta only."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[None, torch.Tensor, None]:
        z, theta = ctx.saved_tensors
        return None, -((1.0 / ctx.eps) * _rectangle((z - theta) / ctx.eps) * g).sum(0), None


def jumprelu_loss_terms(z: torch.Tensor, theta: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(f, per-token L0) of a JumpReLU with straight-through gradients; z [B, d_sae] float32."""
    return _JumpReLU.apply(z, theta, eps), _Step.apply(z, theta, eps).sum(-1)


def l0_coefficient(cfg: Any, step: int) -> float:
    """jumprelu's L0 coefficient at 1-based ``step`` (linear warm-up over ``l0_warmup_steps``)."""
    w = cfg.l0_warmup_steps
    return cfg.l0_coefficient * (min(1.0, step / w) if w else 1.0)


def _auxk_dense(tr: TrainState, z: torch.Tensor, resid: torch.Tensor, W_dec: torch.Tensor, step: int) -> torch.Tensor:
    """AuxK loss (as ``TrainState._auxk``) on dense tensors: the top aux_k dead pre-activations
    reconstruct the detached residual x - x_hat."""
    c = tr.cfg
    dead = tr.last_fired <= step - 1 - c.dead_window_steps
    n_dead = int(dead.sum())
    if n_dead == 0:
        return z.new_zeros(())
    ka = min(c.aux_k_effective, n_dead)
    masked = torch.where(dead, z, torch.full_like(z, -torch.inf))
    vals, idx = masked.topk(ka, dim=-1, sorted=False)
    f_aux = torch.zeros_like(z).scatter(-1, idx, vals.relu())
    scale = c.aux_coefficient * min(1.0, n_dead / c.aux_k_effective)
    return scale * (f_aux @ W_dec - resid).pow(2).sum(-1).mean()


def dense_gradients(tr: TrainState, x: torch.Tensor, step: int
                    ) -> tuple[dict[str, torch.Tensor], dict[str, float], torch.Tensor]:
    """(gradients by parameter name, metrics, firings per latent) by autograd on dense tensors."""
    c, cd = tr.cfg, tr.cd
    arch = c.architecture
    p = {n: t.detach().clone().requires_grad_(True) for n, t in tr.p.items()}
    W_enc = p["W_encT"].T
    xc = x - p["b_dec"]
    z = (xc.to(cd) @ W_enc.to(cd)).float() + p["b_enc"]  # [B, d_sae]
    terms: dict[str, torch.Tensor] = {}
    if arch == "jumprelu":
        f, l0_tok = jumprelu_loss_terms(z, p["threshold"], c.jumprelu_bandwidth)
        terms["l0_loss"] = l0_coefficient(c, step) * l0_tok.mean()
    elif arch in BATCH_TOPK:
        f = z.relu() * activations.batch_topk_mask(z.detach(), c.k)
    else:  # gated: z is the gate pre-activation pi
        mag = (xc.to(cd) @ (W_enc * p["r_mag"].exp()).to(cd)).float() + p["b_mag"]
        f = (z.detach() > 0) * mag.relu()
        tr.extra_state["gate_l0"].fill_(float((z.detach() > 0).sum()) / x.shape[0])
        pi = z.relu()
        terms["l1_loss"] = tr.l1(step) * (pi * p["W_dec"].norm(dim=1)).sum(-1).mean()
        terms["aux"] = ((pi.to(cd) @ p["W_dec"].to(cd)).float() + p["b_dec"] - x).pow(2).sum(-1).mean()
    x_hat = (f.to(cd) @ p["W_dec"].to(cd)).float() + p["b_dec"]
    mse = (x_hat - x).pow(2).sum(-1).mean()
    if arch == "matryoshka_batchtopk":
        for m in c.matryoshka_widths[:-1]:
            inner = (f[:, :m].to(cd) @ p["W_dec"][:m].to(cd)).float() + p["b_dec"]
            terms[f"inner_mse_{m}"] = (inner - x).pow(2).sum(-1).mean()
    if arch in BATCH_TOPK:
        terms["aux"] = _auxk_dense(tr, z, (x - x_hat).detach(), p["W_dec"], step)
    loss = mse + sum(terms.values())
    loss.backward()
    fired = f.detach() > 0
    fired_counts = fired.sum(0)
    if arch in BATCH_TOPK:
        update_topk_threshold(tr, f.detach()[fired])
    mse_v = float(mse.detach())
    metrics = {"loss": float(loss.detach()), "mse": mse_v, "nmse": mse_v / max(tr.var_per_token, 1e-30),
               "l0": float(fired_counts.sum()) / x.shape[0], "aux": float(terms.get("aux", torch.zeros(())).detach()),
               "dense": 1.0}
    grads = {n: t.grad if t.grad is not None else torch.zeros_like(t) for n, t in p.items()}
    return grads, metrics, fired_counts


@torch.no_grad()
def update_topk_threshold(tr: TrainState, kept: torch.Tensor) -> None:
    """threshold <- (1 - lr) threshold + lr * min(kept positive codes), in float64 (SAELens)."""
    kept = kept[kept > 0]
    if kept.numel():
        lr = tr.cfg.topk_threshold_lr
        tr.extra_state["topk_threshold"].mul_(1 - lr).add_(lr * kept.min().to(torch.float64).cpu())


def gradients(tr: TrainState, x: torch.Tensor, step: int, dense: bool | None = None
              ) -> tuple[dict[str, torch.Tensor], dict[str, float], torch.Tensor]:
    """The step's gradients for a new architecture: sparse when it can (module docstring)."""
    c = tr.cfg
    if dense is None:  # gated: by the gate's count (pi > 0) of the last step, the size of its pattern
        l0 = float(tr.extra_state["gate_l0"]) if c.architecture == "gated" else tr.l0_est
        dense = c.architecture in ("jumprelu", "gated") and l0 > DENSE_ABOVE_DENSITY[c.dtype] * c.d_sae
    if dense:
        return dense_jumprelu_gradients(tr, x, step) if c.architecture == "jumprelu" else \
            dense_gated_gradients(tr, x, step)
    return sparse_gradients(tr, x, step)


def dense_jumprelu_gradients(tr: TrainState, x: torch.Tensor, step: int
                             ) -> tuple[dict[str, torch.Tensor], dict[str, float], torch.Tensor]:
    """JumpReLU's step while most latents fire: the dense ReLU step (``sae.dense_relu``: GEMMs in the
    compute dtype, reductions folded into them) on the codes z H(z - theta), with no L1 term; theta's
    gradient from the codes' gradient on the kernel's band (read before the mask). In bfloat16 the
    band and the mask come from the bfloat16 pre-activations, as the ReLU path's mask does."""
    c, p, cd = tr.cfg, tr.p, tr.cd
    bsz, eps = x.shape[0], c.jumprelu_bandwidth
    xc = x - p["b_dec"]
    xc1 = with_columns(xc, (1.0,), cd)
    pre = torch.matmul(xc1, encoder_matrix(p["W_encT"], p["b_enc"], cd).T,
                       out=tr.ws.get("pre", (bsz, c.d_sae), cd, x.device))
    theta = p["threshold"]
    band = ((pre - theta.to(cd)).abs_() < 0.5 * eps)  # [B, d_sae] bool
    n_band = column_counts(band).to(torch.float32)
    pre.mul_(pre > theta.to(cd))  # z H(z - theta) in place
    lam = l0_coefficient(c, step)
    band_sum: list[torch.Tensor] = []

    def threshold_grad(g_f: torch.Tensor) -> None:
        band_sum.append(torch.where(band, g_f, 0).sum(0, dtype=torch.float32))

    d = dense_relu_gradients(xc, xc1, pre, p["W_dec"], p["W_encT"], 0.0, tr.ws, on_code_grad=threshold_grad)
    g_theta = -(theta / eps) * band_sum[0] - (lam / (bsz * eps)) * n_band
    mse = d.sq_err / bsz
    l0 = float(d.fired.sum()) / bsz
    metrics = {"loss": mse + lam * l0, "mse": mse, "nmse": mse / max(tr.var_per_token, 1e-30), "l0": l0,
               "aux": 0.0, "dense": 1.0}
    grads = {"W_encT": d.W_encT, "W_dec": d.W_dec, "b_enc": d.b_enc, "b_dec": d.b_dec, "threshold": g_theta}
    return grads, metrics, d.fired


def batch_topk_flat(pre: torch.Tensor, k: float) -> torch.Tensor:
    """Sorted flat indices (row-major = CSR order) of the int(k B) largest entries of ``pre`` [B, d_sae].

    Exact, in two stages: a cutoff from every 64th entry (the value that about 1.5x the wanted share
    of them exceed), then the top int(k B) among the entries above it. When fewer than int(k B)
    entries pass the cutoff (rare), the top of the whole matrix is taken instead. Every entry left
    out is <= the cutoff < every candidate, so the result is the full top-k's (up to which of equal
    values are kept); the cutoff depends on ``pre`` alone, so a run stays a function of its state.
    A full top-k over B x d_sae entries costs several times the comparison and the small top-k."""
    flat = pre.reshape(-1)
    n = activations.batch_topk_count(k, pre.shape[0], pre.shape[1])
    stride = 64
    sample = flat[::stride]
    m = min(sample.numel(), max(1, math.ceil(1.5 * n / stride)))
    if m < sample.numel():
        cutoff = sample.topk(m, sorted=False)[0].min()
        cand = (flat > cutoff).nonzero().squeeze(1)
        if cand.numel() >= n:
            keep = flat.index_select(0, cand).topk(n, sorted=False)[1]
            return cand.index_select(0, keep).sort()[0]
    return flat.topk(n, sorted=False)[1].sort()[0]


def sparse_gradients(tr: TrainState, x: torch.Tensor, step: int
                     ) -> tuple[dict[str, torch.Tensor], dict[str, float], torch.Tensor]:
    """Hand-written gradients over the active set (jumprelu, batchtopk, matryoshka_batchtopk)."""
    c, p, cd = tr.cfg, tr.p, tr.cd
    bsz = x.shape[0]
    xc = x - p["b_dec"]
    pre = torch.matmul(with_columns(xc, (1.0,), cd), encoder_matrix(p["W_encT"], p["b_enc"], cd).T,
                       out=tr.ws.get("pre", (bsz, c.d_sae), cd, x.device))
    aux = 0.0
    l0_loss = 0.0
    if c.architecture == "gated":
        return gated_sparse(tr, x, xc, Pattern.from_mask(pre > 0), step)
    if c.architecture == "jumprelu":
        pattern = Pattern.from_mask(pre > (p["threshold"] - 0.5 * c.jumprelu_bandwidth).to(cd))
        out = _jumprelu_sparse(tr, x, xc, pattern, step)
        l0_loss = out[-1]
        out = out[:-1]
    else:
        flat = batch_topk_flat(pre, c.k)
        rows, cols = (flat // c.d_sae).to(torch.int32), (flat % c.d_sae).to(torch.int32)
        pattern = Pattern(_offsets(torch.bincount(rows, minlength=bsz)), rows, cols, bsz, c.d_sae)
        if c.architecture == "matryoshka_batchtopk":
            out = _matryoshka_sparse(tr, x, xc, pattern)
        else:
            out = tr._sparse(x, xc, pattern, step)
        dead = tr.last_fired <= step - 1 - c.dead_window_steps
        if bool(dead.any()):
            aux = tr._auxk(xc, pre, dead, out)
    g_W_dec, g_W_encT, g_b_enc, g_b_dec, fired_counts, sq_err, extra = out[:7]
    mse = sq_err / bsz
    loss = mse + aux + l0_loss + (extra if c.architecture == "matryoshka_batchtopk" else 0.0)
    metrics = {"loss": loss, "mse": mse, "nmse": mse / max(tr.var_per_token, 1e-30),
               "l0": float(fired_counts.sum()) / bsz, "aux": aux, "dense": 0.0}
    grads = {"W_encT": g_W_encT, "W_dec": g_W_dec, "b_enc": g_b_enc, "b_dec": g_b_dec}
    if c.architecture == "jumprelu":
        grads["threshold"] = out[7]
    else:
        update_topk_threshold(tr, tr._kept)
    return grads, metrics, fired_counts


def _jumprelu_sparse(tr: TrainState, x, xc, pattern: Pattern, step: int):
    c, p = tr.cfg, tr.p
    bsz, eps = x.shape[0], c.jumprelu_bandwidth
    z = pattern.sample(xc, p["W_encT"].T).add_(pattern.gather(p["b_enc"]))
    theta = pattern.gather(p["threshold"])
    active = z > theta
    band = ((z - theta) / eps).abs_() < 0.5
    f = z * active
    x_hat = pattern.matmul(f, p["W_dec"]).add_(p["b_dec"])
    err = x_hat.sub_(x)
    sq_err = float(err.pow(2).sum())
    g = err.mul_(2.0 / bsz)
    g_f = pattern.sample(g, p["W_dec"].T)
    lam = l0_coefficient(c, step)
    g_theta_e = (-(theta / eps) * g_f - lam / (bsz * eps)) * band
    g_theta = torch.zeros(c.d_sae, device=x.device).index_add_(0, pattern.cols, g_theta_e)
    g_z = g_f.mul_(active)
    g_W_dec = pattern.t_matmul(f, g)
    g_W_encT = pattern.t_matmul(g_z, xc)
    g_b_enc = torch.zeros(c.d_sae, device=x.device).index_add_(0, pattern.cols, g_z)
    g_b_dec = g.sum(0) - g_b_enc @ p["W_encT"]
    fired_counts = torch.bincount(pattern.cols[active], minlength=c.d_sae)
    l0_loss = lam * float(active.sum()) / bsz
    return g_W_dec, g_W_encT, g_b_enc, g_b_dec, fired_counts, sq_err, 0.0, g_theta, l0_loss


def _matryoshka_sparse(tr: TrainState, x, xc, pattern: Pattern):
    """Prefix losses over one pattern: entries regrouped into rows (block j, token b) -> j*B + b, so one
    sparse product gives every block's partial decode and one sampled product every code's G_j."""
    c, p = tr.cfg, tr.p
    bsz, d_in = x.shape
    widths = c.matryoshka_widths
    n_lev = len(widths)
    v = pattern.sample(xc, p["W_encT"].T).add_(pattern.gather(p["b_enc"]))
    active = v > 0
    v.clamp_min_(0)
    bounds = torch.tensor(widths[:-1], dtype=torch.int32, device=x.device)
    block = torch.bucketize(pattern.cols, bounds, right=True).to(torch.int32)
    rows2 = block * bsz + pattern.rows
    order = torch.sort(rows2, stable=True)[1]
    rows2 = rows2.index_select(0, order)
    p2 = Pattern(_offsets(torch.bincount(rows2, minlength=n_lev * bsz)), rows2, pattern.cols.index_select(0, order),
                 n_lev * bsz, c.d_sae)
    v2 = v.index_select(0, order)
    parts = p2.matmul(v2, p["W_dec"]).view(n_lev, bsz, d_in)
    err = parts.cumsum_(0).add_(p["b_dec"]).sub_(x)  # [L, B, d_in]: x_hat_l - x
    sq = err.pow(2).sum(dim=(1, 2))
    sq_err = float(sq[-1])
    inner = float(sq[:-1].sum()) / bsz
    g = err.mul_(2.0 / bsz)
    G = g.flip(0).cumsum(0).flip(0).reshape(n_lev * bsz, d_in)  # G_j = sum_{l >= j} g_l
    g_v2 = p2.sample(G, p["W_dec"].T).mul_(active.index_select(0, order))
    g_W_dec = p2.t_matmul(v2, G)
    g_v = torch.empty_like(g_v2).index_copy_(0, order, g_v2)
    g_W_encT = pattern.t_matmul(g_v, xc)
    g_b_enc = torch.zeros(c.d_sae, device=x.device).index_add_(0, pattern.cols, g_v)
    g_b_dec = g.sum(dim=(0, 1)) - g_b_enc @ p["W_encT"]
    fired_counts = torch.bincount(pattern.cols[active], minlength=c.d_sae)
    tr._last = (pattern, g[-1])  # the full reconstruction's scaled error, for AuxK
    tr._kept = v
    return g_W_dec, g_W_encT, g_b_enc, g_b_dec, fired_counts, sq_err, inner
