"""One SAE training run's state and its step: ``TrainState`` (driven by ``sae.train.train_sae``).

The step computes gradients by hand (no autograd graph); ``sae.train``'s docstring states the
loss, the sparse and dense paths, the optimiser and the data order. Everything lives on the
device of the activations ``x`` it is given (the float64 firing counters on the host); built on
CPU, the numbers are those of a run on CPU, bit for bit. Resampling is ``sae.resample``,
checkpoints ``sae.checkpoint``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sae.checkpoint import data_signature, load_checkpoint, save_checkpoint
from sae.config import SAEConfig
from sae.dense_relu import DENSE_ABOVE_DENSITY, Workspace, dense_relu_gradients, encoder_matrix, with_columns
from sae.model import SAE
from sae.resample import resample_dead
from sae.sparse import Pattern, positive
from sae.train_arch import NEW_ARCHITECTURES
from sae.train_arch import gradients as arch_gradients

_EPS = 1e-8


class TrainState:
    """State of one training run: the SAE, Adam moments, firing counters, step. ``train_sae``
    drives it; ``gradients`` and ``resample`` are public so tests can check them directly."""

    def __init__(self, cfg: SAEConfig, x: torch.Tensor) -> None:
        self.cfg, self.x, self.n = cfg, x, x.shape[0]
        self.device = dev = x.device  # the SAE, its gradients and Adam state live with the activations
        self.sae = SAE(cfg).to(dev)  # initialised on CPU: the same weights on every device
        for p in self.sae.parameters():
            p.requires_grad_(False)
        # The encoder is kept as W_enc^T [d_sae, d_in] (contiguous; its gradient comes out of the
        # sparse products in that layout); the SAE's W_enc parameter is a [d_in, d_sae] view of it.
        w_enc_t = self.sae.W_enc.data.T.contiguous()
        self.sae.W_enc.data = w_enc_t.T
        self.p = {"W_encT": w_enc_t, "W_dec": self.sae.W_dec.data, "b_enc": self.sae.b_enc.data,
                  "b_dec": self.sae.b_dec.data}
        if cfg.architecture == "jumprelu":  # Adam-trained (batchtopk's threshold is a running mean instead)
            self.p["threshold"] = self.sae.threshold.data
        elif cfg.architecture == "gated":
            self.p.update(r_mag=self.sae.r_mag.data, b_mag=self.sae.b_mag.data)
        # Non-parameter state a checkpoint carries (batchtopk's running threshold, float64 on the host).
        self.extra_state: dict[str, torch.Tensor] = {}
        if cfg.architecture in ("batchtopk", "matryoshka_batchtopk"):
            self.extra_state["topk_threshold"] = torch.zeros((), dtype=torch.float64)
        if cfg.architecture == "gated":  # the gate's L0 (pi > 0) of the last step: picks the dense or sparse route
            self.extra_state["gate_l0"] = torch.full((), float(cfg.d_sae), dtype=torch.float64)
        self.m = {n: torch.zeros_like(t) for n, t in self.p.items()}
        self.v = {n: torch.zeros_like(t) for n, t in self.p.items()}
        self.step = 0
        self.last_fired = torch.zeros(cfg.d_sae, dtype=torch.long, device=dev)  # last firing step (0 = never)
        self.counts = torch.zeros(cfg.d_sae, dtype=torch.float64)  # float64 counters stay on the host
        self.prev_counts = torch.zeros(cfg.d_sae, dtype=torch.float64)
        self.count_tokens = 0
        self.prev_tokens = 0
        self.prev_resample = 0
        self.n_resampled = 0
        self.l0_est = float(cfg.d_sae)  # L0 of the previous step (chooses dense or sparse for relu)
        self.history: list[dict[str, Any]] = []
        self.cd = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
        mean = torch.zeros(cfg.d_in, dtype=torch.float64)
        for s in range(0, self.n, 65536):
            mean += x[s:s + 65536].cpu().to(torch.float64).sum(0)
        self.mean = (mean / self.n).to(torch.float32).to(dev)
        var = sum(float(((x[s:s + 65536] - self.mean) ** 2).sum()) for s in range(0, self.n, 65536))
        self.var_per_token = var / self.n  # E ||x - mean||^2: the NMSE denominator
        if cfg.b_dec_init == "mean":
            self.p["b_dec"].copy_(self.mean)
        self._perm_cache: dict[int, torch.Tensor] = {}
        self.ws = Workspace()  # [batch, d_sae] buffers reused across steps

    # -- data -----------------------------------------------------------------------------
    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perm_cache:
            if len(self._perm_cache) > 2:
                self._perm_cache.clear()
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
            self._perm_cache[epoch] = torch.randperm(self.n, generator=g).to(self.device)
        return self._perm_cache[epoch]

    def batch(self, step: int) -> torch.Tensor:
        """Rows of 0-based batch ``step``."""
        b = self.cfg.batch_size
        start = step * b
        e0, e1 = start // self.n, (start + b - 1) // self.n
        if e0 == e1:
            o = start - e0 * self.n
            idx = self._perm(e0)[o:o + b]
        else:
            pos = torch.arange(start, start + b, device=self.device)
            idx = torch.empty(b, dtype=torch.long, device=self.device)
            for e in range(e0, e1 + 1):
                sel = (pos // self.n) == e
                idx[sel] = self._perm(e)[pos[sel] - e * self.n]
        return self.x.index_select(0, idx)

    # -- schedule -------------------------------------------------------------------------
    def lr(self, step: int) -> float:
        """Learning rate of 1-based step ``step``."""
        c = self.cfg
        f = 1.0
        if c.lr_warmup_steps:
            f = min(f, step / c.lr_warmup_steps)
        if c.lr_decay_fraction > 0:
            start = c.steps * (1 - c.lr_decay_fraction)
            if step > start:
                f = min(f, max(0.0, (c.steps - step) / (c.steps - start)))
        return c.lr * f

    def l1(self, step: int) -> float:
        c = self.cfg
        return c.l1_coefficient * (min(1.0, step / c.l1_warmup) if c.l1_warmup else 1.0)

    # -- one step -------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        """One optimiser step on the next batch; returns this batch's metrics."""
        c, p = self.cfg, self.p
        self.step += 1
        step = self.step
        x = self.batch(step - 1)
        if c.architecture == "jumprelu":  # keep thresholds >= 0 (SAELens projects before each step)
            p["threshold"].clamp_(min=0.0)
        grads, metrics, fired_counts = self.gradients(x, step)
        SAE.remove_parallel_grad_(p["W_dec"], grads["W_dec"])
        self._adam(step, grads)
        p["W_dec"].div_(p["W_dec"].norm(dim=1, keepdim=True).clamp_min(1e-12))
        self.last_fired[fired_counts > 0] = step
        self.counts += fired_counts.cpu()
        self.count_tokens += x.shape[0]
        if self.count_tokens >= c.dead_window:
            self.prev_counts, self.prev_tokens = self.counts, self.count_tokens
            self.counts, self.count_tokens = torch.zeros_like(self.prev_counts), 0
        self.l0_est = metrics["l0"]
        if step in self._resample_steps:
            self.resample(step)
        return metrics

    def gradients(self, x: torch.Tensor, step: int, *, dense: bool | None = None
                  ) -> tuple[dict[str, torch.Tensor], dict[str, float], torch.Tensor]:
        """(gradients of the batch loss by parameter name, metrics, firings per latent [d_sae])
        at 1-based ``step`` (its L1 coefficient; latents dead before it get AuxK). ``dense``
        forces the dense (True) or sparse (False) path; None picks by the previous L0."""
        c, p, cd = self.cfg, self.p, self.cd
        if c.architecture in NEW_ARCHITECTURES:
            return arch_gradients(self, x, step, dense)
        bsz = x.shape[0]
        xc = x - p["b_dec"]
        xc1 = with_columns(xc, (1.0,), cd)  # [xc | 1]: b_enc rides in the encoder GEMM
        pre = torch.matmul(xc1, encoder_matrix(p["W_encT"], p["b_enc"], cd).T,
                           out=self.ws.get("pre", (bsz, c.d_sae), cd, x.device))  # [batch, d_sae] in cd
        aux = 0.0
        if dense is None:
            dense = c.architecture == "relu" and self.l0_est > DENSE_ABOVE_DENSITY[c.dtype] * c.d_sae
        if dense and c.architecture == "relu":
            d = dense_relu_gradients(xc, xc1, pre, p["W_dec"], p["W_encT"], self.l1(step), self.ws)
            out = (d.W_dec, d.W_encT, d.b_enc, d.b_dec, d.fired, d.sq_err, d.l1_sum)
        else:
            if c.architecture == "topk":
                pattern = Pattern.from_topk(pre.topk(c.k, dim=-1, sorted=False)[1], c.d_sae)
            else:
                pattern = Pattern.from_mask(positive(pre))
            out = self._sparse(x, xc, pattern, step)
            if c.architecture == "topk":
                dead = self.last_fired <= step - 1 - c.dead_window_steps
                if bool(dead.any()):
                    aux = self._auxk(xc, pre, dead, out)
        g_W_dec, g_W_encT, g_b_enc, g_b_dec, fired_counts, sq_err, l1_sum = out
        mse = sq_err / bsz
        loss = mse + (self.l1(step) * l1_sum / bsz if c.architecture == "relu" else aux)
        metrics = {"loss": loss, "mse": mse, "nmse": mse / max(self.var_per_token, 1e-30),
                   "l0": float(fired_counts.sum()) / bsz, "aux": aux,
                   "dense": float(dense and c.architecture == "relu")}
        grads = {"W_encT": g_W_encT, "W_dec": g_W_dec, "b_enc": g_b_enc, "b_dec": g_b_dec}
        return grads, metrics, fired_counts

    @property
    def _resample_steps(self) -> frozenset[int]:
        if not hasattr(self, "_rs"):
            self._rs = frozenset(self.cfg.resample_schedule)
        return self._rs

    def _sparse(self, x, xc, pattern: Pattern, step):
        c, p = self.cfg, self.p
        bsz = x.shape[0]
        v = pattern.sample(xc, p["W_encT"].T).add_(pattern.gather(p["b_enc"]))
        active = v > 0
        v.clamp_min_(0)
        self._kept = v  # the codes at the pattern (batchtopk's threshold update reads them)
        x_hat = pattern.matmul(v, p["W_dec"]).add_(p["b_dec"])
        err = x_hat.sub_(x)
        sq_err = float(err.pow(2).sum())
        g = err.mul_(2.0 / bsz)
        g_v = pattern.sample(g, p["W_dec"].T)
        l1_sum = 0.0
        if c.architecture == "relu":
            l1_sum = float(v.sum())
            g_v.add_(self.l1(step) / bsz)
        g_v.mul_(active)
        g_W_dec = pattern.t_matmul(v, g)
        g_W_encT = pattern.t_matmul(g_v, xc)
        g_b_enc = torch.zeros(c.d_sae, device=x.device).index_add_(0, pattern.cols, g_v)
        g_b_dec = g.sum(0) - g_b_enc @ p["W_encT"]
        fired_counts = torch.bincount(pattern.cols[active], minlength=c.d_sae)
        self._last = (pattern, err)  # err (= x_hat - x, scaled by 2/B) for AuxK
        return g_W_dec, g_W_encT, g_b_enc, g_b_dec, fired_counts, sq_err, l1_sum

    def _auxk(self, xc, pre, dead, out) -> float:
        """AuxK: add its gradients to ``out`` in place; returns its loss."""
        c, p = self.cfg, self.p
        g_W_dec, g_W_encT, g_b_enc, g_b_dec = out[:4]
        bsz = xc.shape[0]
        dead_idx = dead.nonzero(as_tuple=True)[0]
        n_dead = int(dead_idx.shape[0])
        ka = min(c.aux_k_effective, n_dead)
        _, err_scaled = self._last
        resid = err_scaled.mul(-bsz / 2.0)  # x - x_hat, treated as a constant target
        top = pre.index_select(1, dead_idx).topk(ka, dim=-1, sorted=False)[1]
        pat = Pattern.from_topk(dead_idx[top], c.d_sae)
        va = pat.sample(xc, p["W_encT"].T).add_(pat.gather(p["b_enc"]))
        active = va > 0
        va.clamp_min_(0)
        aerr = pat.matmul(va, p["W_dec"]).sub_(resid)
        scale = c.aux_coefficient * min(1.0, n_dead / c.aux_k_effective)
        loss = scale * float(aerr.pow(2).sum()) / bsz
        ga = aerr.mul_(2.0 * scale / bsz)
        g_va = pat.sample(ga, p["W_dec"].T).mul_(active)
        g_W_dec.add_(pat.t_matmul(va, ga))
        g_W_encT.add_(pat.t_matmul(g_va, xc))
        extra_b_enc = torch.zeros(c.d_sae, device=xc.device).index_add_(0, pat.cols, g_va)
        g_b_enc.add_(extra_b_enc)
        g_b_dec.sub_(extra_b_enc @ p["W_encT"])
        return loss

    def _adam(self, step: int, grads: dict[str, torch.Tensor]) -> None:
        b1, b2 = self.cfg.betas
        lr = self.lr(step)
        bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
        for n, g in grads.items():
            m, v, w = self.m[n], self.v[n], self.p[n]
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = v.sqrt().div_(math.sqrt(bc2)).add_(_EPS)
            w.addcdiv_(m, denom, value=-lr / bc1)

    # -- resampling and checkpoints (sae.resample, sae.checkpoint) ------------------------------
    def resample(self, step: int) -> int:
        """Resample latents dead since max(last resample, step - dead window); returns how many."""
        return resample_dead(self, step)

    def data_signature(self) -> dict[str, Any]:
        return data_signature(self)

    def save(self, path: Path) -> None:
        save_checkpoint(self, path)

    def load(self, path: Path) -> None:
        load_checkpoint(self, path)

    def log10_density(self) -> np.ndarray:
        tokens = self.count_tokens + self.prev_tokens
        counts = self.counts + self.prev_counts
        freq = counts / max(tokens, 1)
        return np.log10(freq.numpy() + 1e-10).astype(np.float32)


