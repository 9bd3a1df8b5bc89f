"""Train an ``SAE`` on harvested activations: ``train_sae(acts, cfg) -> TrainResult``.

The loop computes gradients by hand (no autograd graph), exploiting sparsity:

- encoder pre-activations ``(x - b_dec) W_enc + b_enc`` as one dense matmul [batch, d_sae], in
  ``cfg.dtype`` (bfloat16 runs ~5x faster here), b_enc folded in as a ones column, written into a
  buffer reused across steps;
- the active set (top-k per row, or the positive entries of a ReLU SAE once it is sparse)
  becomes a CSR pattern; its exact float32 values come from ``torch.sparse.sampled_addmm``
  (so bf16 only decides *which* latents fire), the decoder is a sparse x dense product, and the
  gradients of W_dec, W_enc, b_enc, b_dec are sparse products over the same pattern;
- while a ReLU SAE is still dense (early training: L0 above ``DENSE_ABOVE_DENSITY`` of d_sae)
  the same math runs as dense matmuls (``sae.dense_relu``).

Loss (mean over the batch): ``||x_hat - x||^2 + l1 * sum|f|`` (relu) or
``||x_hat - x||^2 + aux`` (topk, AuxK of Gao et al. 2024: the residual x - x_hat, detached,
reconstructed by the top ``aux_k`` pre-activations among dead latents, weighted by
``aux_coefficient * min(1, n_dead / aux_k)``). Decoder rows: the gradient component parallel
to each (unit) row is removed before the step and rows are renormalised after it (Kissane et
al.'s / Bricken et al.'s code). Adam (``cfg.lr``, ``cfg.betas``, eps 1e-8) keeps float32 state.

Dead latents: no firing in the last ``cfg.dead_window`` training tokens. ReLU SAEs resample
them at ``cfg.resample_schedule`` (Anthropic 2023): score ``resample_sample`` random training
tokens by squared reconstruction error, draw one token per dead latent with probability
proportional to error^2, set the decoder row to the token's centred direction (x - b_dec,
unit norm), the encoder column to that direction times ``resample_encoder_scale`` x the mean
encoder-column norm of live latents, b_enc to 0, and reset their Adam moments.

Data order: epoch e visits the activations in ``randperm(n, seed + e)``; batch s takes samples
s*B .. (s+1)*B - 1 of that stream. Everything is a function of (cfg, step, state), so a run
resumed from a checkpoint ends with the same weights as an uninterrupted one (same machine and
thread count). Checkpoints (one safetensors file: weights, Adam moments, counters; JSON state
in its metadata) are written to a temp file and renamed into place: an interrupt
(KeyboardInterrupt, including one raised by the progress callback) leaves the last complete
checkpoint intact. ``torch.set_num_threads`` is respected (never changed here).
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from analysis.errors import ConfigError, CorruptCheckpointError, ShapeError
from sae.config import SAEConfig
from sae.model import SAE
from sae.memory import check_training_memory
from sae.dense_relu import Workspace, dense_relu_gradients, encoder_matrix, with_columns
from sae.sparse import Pattern, positive

Progress = Callable[[int, int, str], None]
CHECKPOINT_VERSION = "sae-ckpt-1"
# A ReLU step runs the dense path while the previous step's L0 exceeds this fraction of d_sae
# (per compute dtype), else the sparse one. Measured crossover of the two paths' step times on this
# project's 2-core CPU (d_in 384, d_sae 6144, batch 4096; 1 and 2 threads): ~3.5-4% of d_sae in
# bfloat16, ~14% in float32 (its dense GEMMs cost ~5x the bf16 ones; the sparse products are float32
# in both). A fixed threshold (not timing at run time) keeps a run a function of (cfg, step, state).
DENSE_ABOVE_DENSITY = {"bfloat16": 0.035, "float32": 0.14}
_EPS = 1e-8
_PARAMS = ("W_encT", "W_dec", "b_enc", "b_dec")  # optimiser layout (W_encT = W_enc.T)


@dataclass(frozen=True, eq=False)
class TrainResult:
    """A trained SAE and what training measured."""

    sae: SAE
    history: pd.DataFrame  # one row per logged step: step, tokens, lr, loss, mse, nmse, l0, aux, dense (1 = the
    # dense ReLU path ran), dead_fraction, seconds (cumulative wall time)
    steps: int  # optimiser steps taken in total (including any before a resume)
    n_tokens: int  # training tokens seen in total
    seconds: float  # wall time of this call's training loop
    tokens_per_s: float  # tokens this call trained on / seconds
    cpu_seconds: float  # CPU time of this process (all threads) over the same loop (time.process_time)
    log10_density: np.ndarray  # [d_sae] log10(firing frequency + 1e-10) over the last dead_window tokens
    n_resampled: int  # latents resampled in total (relu)
    resumed_from: int  # step the run resumed from (0 = fresh)


def config_from_cache(cache: Any, *, d_sae: int | None = None, expansion: int | None = None,
                      **fields: Any) -> SAEConfig:
    """An ``SAEConfig`` whose d_in and hook metadata come from an ``ActivationCache``.

    Give ``d_sae`` or ``expansion`` (d_sae = expansion * d_in); other ``SAEConfig`` fields as
    keywords."""
    if (d_sae is None) == (expansion is None):
        raise ConfigError("give exactly one of d_sae or expansion (d_sae = expansion * d_in)")
    d_in = cache.d_in
    return SAEConfig(d_in=d_in, d_sae=d_sae if d_sae is not None else int(expansion) * d_in,
                     hook_name=cache.hook_name, layer=cache.layer, n_heads=cache.n_heads, d_head=cache.d_head,
                     source_fingerprint=cache.fingerprint, source_label=str(cache.meta.get("source_label", "")),
                     **fields)


def _copied_tokens(acts: Any) -> int:
    """Rows ``as_activations`` will copy into memory: all of an activation cache or array, none of
    a float32 contiguous tensor (already in memory, used as is)."""
    if isinstance(acts, torch.Tensor) and acts.dtype == torch.float32 and acts.is_contiguous():
        return 0
    shape = getattr(getattr(acts, "acts", acts), "shape", ())
    return int(shape[0]) if len(shape) == 2 else 0


def as_activations(acts: Any, d_in: int | None = None) -> torch.Tensor:
    """Activations as a float32 [tokens, d_in] tensor in memory; ShapeError for a wrong shape
    or width, NaN/inf values, or no rows."""
    if hasattr(acts, "acts") and hasattr(acts, "meta"):  # ActivationCache
        x = acts.tensor()
    elif isinstance(acts, np.ndarray):
        x = torch.from_numpy(np.array(acts, dtype=np.float32))
    elif isinstance(acts, torch.Tensor):
        x = acts.detach().to(torch.float32).contiguous()
    else:
        raise ShapeError(f"activations must be a tensor, an array or an ActivationCache, got {type(acts).__name__}")
    if x.ndim != 2 or x.shape[0] == 0:
        raise ShapeError(f"activations must be [tokens, d_in] with >= 1 token, got {tuple(x.shape)}; flatten "
                         "hook_z [batch, pos, n_heads, d_head] to [tokens, n_heads*d_head]")
    if d_in is not None and x.shape[1] != d_in:
        raise ShapeError(f"activations have width {x.shape[1]} but the SAE has d_in={d_in}; harvest the hook the "
                         "SAE was configured for or set d_in to n_heads*d_head of that hook")
    bad = sum(int((~torch.isfinite(x[s:s + 65536])).sum()) for s in range(0, x.shape[0], 65536))
    if bad:
        where = f"the activation cache {acts.path}" if hasattr(acts, "path") and hasattr(acts, "meta") else \
            "the activation array"
        raise ShapeError(f"{where} holds {bad} NaN/inf values; harvest again in float32 (delete the cache "
                         "directory, or pass refresh=True to sae.harvest.harvest) or drop those rows")
    return x


class TrainState:
    """State of one training run: the SAE, Adam moments, firing counters, step. ``train_sae``
    drives it; ``gradients`` and ``resample`` are public so tests can check them directly."""

    def __init__(self, cfg: SAEConfig, x: torch.Tensor) -> None:
        self.cfg, self.x, self.n = cfg, x, x.shape[0]
        self.sae = SAE(cfg)
        for p in self.sae.parameters():
            p.requires_grad_(False)
        # The encoder is kept as W_enc^T [d_sae, d_in] (contiguous; its gradient comes out of the
        # sparse products in that layout); the SAE's W_enc parameter is a [d_in, d_sae] view of it.
        w_enc_t = self.sae.W_enc.data.T.contiguous()
        self.sae.W_enc.data = w_enc_t.T
        self.p = {"W_encT": w_enc_t, "W_dec": self.sae.W_dec.data, "b_enc": self.sae.b_enc.data,
                  "b_dec": self.sae.b_dec.data}
        self.m = {n: torch.zeros_like(t) for n, t in self.p.items()}
        self.v = {n: torch.zeros_like(t) for n, t in self.p.items()}
        self.step = 0
        self.last_fired = torch.zeros(cfg.d_sae, dtype=torch.long)  # step of the last firing (0 = never)
        self.counts = torch.zeros(cfg.d_sae, dtype=torch.float64)
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
            mean += x[s:s + 65536].to(torch.float64).sum(0)
        self.mean = (mean / self.n).to(torch.float32)
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
            self._perm_cache[epoch] = torch.randperm(self.n, generator=g)
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
            pos = torch.arange(start, start + b)
            idx = torch.empty(b, dtype=torch.long)
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
        grads, metrics, fired_counts = self.gradients(x, step)
        SAE.remove_parallel_grad_(p["W_dec"], grads["W_dec"])
        self._adam(step, grads)
        p["W_dec"].div_(p["W_dec"].norm(dim=1, keepdim=True).clamp_min(1e-12))
        self.last_fired[fired_counts > 0] = step
        self.counts += fired_counts
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
        bsz = x.shape[0]
        xc = x - p["b_dec"]
        xc1 = with_columns(xc, (1.0,), cd)  # [xc | 1]: b_enc rides in the encoder GEMM
        pre = torch.matmul(xc1, encoder_matrix(p["W_encT"], p["b_enc"], cd).T,
                           out=self.ws.get("pre", (bsz, c.d_sae), cd))  # [batch, d_sae] in cd
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
        g_b_enc = torch.zeros(c.d_sae).index_add_(0, pattern.cols, g_v)
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
        extra_b_enc = torch.zeros(c.d_sae).index_add_(0, pat.cols, g_va)
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

    # -- resampling -----------------------------------------------------------------------
    @torch.no_grad()
    def resample(self, step: int) -> int:
        """Resample latents dead since max(last resample, step - dead window); returns how many."""
        c, p = self.cfg, self.p
        since = max(self.prev_resample, step - c.dead_window_steps)
        dead = self.last_fired <= since
        self.prev_resample = step
        idx = dead.nonzero(as_tuple=True)[0]
        if idx.numel() == 0:
            return 0
        g = torch.Generator().manual_seed(self.cfg.seed * 7_919 + step)
        sample = torch.randint(0, self.n, (min(c.resample_sample, max(self.n, 1)),), generator=g)
        losses = torch.empty(sample.shape[0])
        W1, W_dec_cd = encoder_matrix(p["W_encT"], p["b_enc"], self.cd), p["W_dec"].to(self.cd)
        buf, chunk = self.ws.get("pre", (c.batch_size, c.d_sae), self.cd), c.batch_size
        for s in range(0, sample.shape[0], chunk):
            xc = self.x.index_select(0, sample[s:s + chunk]) - p["b_dec"]
            f = torch.matmul(with_columns(xc, (1.0,), self.cd), W1.T, out=buf[:xc.shape[0]]).relu_()
            losses[s:s + chunk] = (f @ W_dec_cd).float().sub_(xc).pow_(2).sum(1)  # ||x_hat - x||^2
        weights = losses.pow(2)
        if not bool(weights.sum() > 0):
            weights = torch.ones_like(weights)
        n_pos = int((weights > 0).sum())
        pick = torch.multinomial(weights, idx.numel(), replacement=idx.numel() > n_pos, generator=g)
        dirs = self.x.index_select(0, sample[pick]) - p["b_dec"]
        dirs /= dirs.norm(dim=1, keepdim=True).clamp_min(1e-12)
        alive = ~dead
        enc_norm = float(p["W_encT"][alive].norm(dim=1).mean()) if bool(alive.any()) else 1.0
        p["W_dec"][idx] = dirs
        p["W_encT"][idx] = dirs * (enc_norm * c.resample_encoder_scale)
        p["b_enc"][idx] = 0.0
        for state in (self.m, self.v):
            state["W_dec"][idx] = 0.0
            state["W_encT"][idx] = 0.0
            state["b_enc"][idx] = 0.0
        self.last_fired[idx] = step
        self.n_resampled += int(idx.numel())
        return int(idx.numel())

    # -- checkpoints ----------------------------------------------------------------------
    def data_signature(self) -> dict[str, Any]:
        stride = max(1, self.n // 64)
        probe = self.x[::stride].to(torch.float64)
        return {"n": self.n, "d_in": int(self.x.shape[1]), "probe_sum": float(probe.sum()),
                "probe_sq": float((probe ** 2).sum())}

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        tensors = {**{n: t.contiguous() for n, t in self.p.items()},
                   **{f"adam_m.{n}": t for n, t in self.m.items()}, **{f"adam_v.{n}": t for n, t in self.v.items()},
                   "last_fired": self.last_fired, "counts": self.counts, "prev_counts": self.prev_counts}
        state = {"version": CHECKPOINT_VERSION, "cfg": self.cfg.to_dict(), "step": self.step,
                 "count_tokens": self.count_tokens, "prev_tokens": self.prev_tokens,
                 "prev_resample": self.prev_resample, "n_resampled": self.n_resampled, "l0_est": self.l0_est,
                 "history": self.history, "data": self.data_signature()}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            save_file(tensors, str(tmp), metadata={"lenslab_state": json.dumps(state)})
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def load(self, path: Path) -> None:
        from safetensors import SafetensorError, safe_open

        from analysis.sources import read_safetensors_header

        header = read_safetensors_header(path)  # CorruptCheckpointError when truncated
        try:
            state = json.loads(header["__metadata__"]["lenslab_state"])
            with safe_open(str(path), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (KeyError, TypeError, ValueError, SafetensorError) as exc:
            raise CorruptCheckpointError(f"{path}: not a LensLab SAE checkpoint ({exc}); delete it or pass "
                                         "resume=False (lenslab sae train --no-resume) to start over") from exc
        if state.get("version") != CHECKPOINT_VERSION:
            raise CorruptCheckpointError(f"{path}: checkpoint version {state.get('version')!r}, expected "
                                         f"{CHECKPOINT_VERSION!r}; delete it to start over")
        if state["cfg"] != self.cfg.to_dict():
            diff = sorted(k for k in set(state["cfg"]) | set(self.cfg.to_dict())
                          if state["cfg"].get(k) != self.cfg.to_dict().get(k))
            raise ConfigError(f"{path}: the checkpoint was written with a different config (differs in {diff}); "
                              "train with the same config, delete the checkpoint, or pass resume=False "
                              "(lenslab sae train --no-resume)")
        if state["data"] != self.data_signature():
            raise ConfigError(f"{path}: the checkpoint was trained on other activations ({state['data']} vs "
                              f"{self.data_signature()}); resume on the same activations or pass resume=False "
                              "(lenslab sae train --no-resume)")
        for n in _PARAMS:
            self.p[n].copy_(tensors[n])
            self.m[n].copy_(tensors[f"adam_m.{n}"])
            self.v[n].copy_(tensors[f"adam_v.{n}"])
        self.last_fired.copy_(tensors["last_fired"])
        self.counts.copy_(tensors["counts"])
        self.prev_counts.copy_(tensors["prev_counts"])
        self.step = int(state["step"])
        self.count_tokens, self.prev_tokens = int(state["count_tokens"]), int(state["prev_tokens"])
        self.prev_resample, self.n_resampled = int(state["prev_resample"]), int(state["n_resampled"])
        self.l0_est = float(state["l0_est"])
        self.history = list(state["history"])

    def log10_density(self) -> np.ndarray:
        tokens = self.count_tokens + self.prev_tokens
        counts = self.counts + self.prev_counts
        freq = counts / max(tokens, 1)
        return np.log10(freq.numpy() + 1e-10).astype(np.float32)


def train_sae(acts: Any, cfg: SAEConfig, *, progress: Progress | None = None,
              checkpoint: str | os.PathLike | None = None, checkpoint_every: int = 500, resume: bool = True,
              log_every: int = 25) -> TrainResult:
    """Train an SAE with config ``cfg`` on ``acts`` ([tokens, d_in] tensor/array or an
    ``ActivationCache``) for ``cfg.steps`` steps of ``cfg.batch_size`` tokens.

    ``progress(done_steps, total_steps, label)`` is called every ``log_every`` steps and at
    the end (label: "step s/S L0 .. NMSE .."). With ``checkpoint`` (a file path), state is saved
    every ``checkpoint_every`` steps and at the end, and an existing checkpoint for the same
    config and activations is resumed from (``resume=False`` starts over). Raises ShapeError
    (bad activations), ConfigError (a checkpoint for another config or other activations; the
    run's estimated memory, ``sae.memory``, above the limit: checked before anything is allocated),
    CorruptCheckpointError (an unreadable checkpoint). KeyboardInterrupt propagates and leaves
    the last checkpoint intact.
    """
    if not isinstance(cfg, SAEConfig):
        raise ConfigError(f"cfg must be an SAEConfig, got {type(cfg).__name__}")
    if checkpoint_every < 1 or log_every < 1:
        raise ConfigError(f"checkpoint_every={checkpoint_every} and log_every={log_every} must be >= 1")
    meta = getattr(acts, "meta", None)
    if isinstance(meta, dict) and meta.get("hook_name") not in (None, cfg.hook_name):
        raise ConfigError(f"activations come from {meta['hook_name']} but the config says {cfg.hook_name}; "
                          "build the config with config_from_cache(cache, ...)")
    check_training_memory(d_in=cfg.d_in, d_sae=cfg.d_sae, batch_size=cfg.batch_size, architecture=cfg.architecture,
                          dtype=cfg.dtype, n_tokens=_copied_tokens(acts))
    x = as_activations(acts, cfg.d_in)
    tr = TrainState(cfg, x)
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and resume and ckpt.is_file():
        tr.load(ckpt)
    resumed_from = tr.step
    total = cfg.steps
    t0, c0 = time.perf_counter(), time.process_time()
    start_step = tr.step
    while tr.step < total:
        metrics = tr.train_step()
        s = tr.step
        if s % log_every == 0 or s == total:
            dead = float((tr.last_fired <= s - cfg.dead_window_steps).float().mean()) if s >= cfg.dead_window_steps \
                else float("nan")
            tr.history.append({"step": s, "tokens": s * cfg.batch_size, "lr": tr.lr(s), **metrics,
                               "dead_fraction": dead, "seconds": time.perf_counter() - t0})
            if progress is not None:
                progress(s, total, f"step {s}/{total} L0 {metrics['l0']:.1f} NMSE {metrics['nmse']:.3f}")
        if ckpt is not None and (s % checkpoint_every == 0 or s == total):
            tr.save(ckpt)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    tr.sae.W_enc.data = tr.p["W_encT"].T.contiguous()  # detach from the trainer's layout
    trained = (tr.step - start_step) * cfg.batch_size
    return TrainResult(sae=tr.sae, history=pd.DataFrame(tr.history), steps=tr.step,
                       n_tokens=tr.step * cfg.batch_size, seconds=seconds,
                       tokens_per_s=trained / seconds if seconds > 0 else float("nan"), cpu_seconds=cpu_seconds,
                       log10_density=tr.log10_density(), n_resampled=tr.n_resampled, resumed_from=resumed_from)
