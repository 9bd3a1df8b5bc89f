"""Train an ``SAE`` on harvested activations: ``train_sae(acts, cfg) -> TrainResult``.

Modules: this one (the loop, its inputs and result), ``sae.train_state`` (``TrainState``: the
step), ``sae.resample`` (dead latents), ``sae.checkpoint`` (save / resume).

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

Device: ``device=`` (default: where the activations are, CPU for arrays and caches) holds the
activations, the SAE and its optimiser state; the trained SAE comes back on CPU. The random
draws (initialisation, batch order, resampling) come from CPU generators, so the run on CPU is
the one this module always made, bit for bit.
"""


from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from analysis.errors import ConfigError, ShapeError
from analysis.progress import Progress
from sae.checkpoint import CHECKPOINT_VERSION
from sae.config import SAEConfig
from sae.memory import check_training_memory
from sae.model import SAE
from sae.train_state import DENSE_ABOVE_DENSITY, TrainState

__all__ = ["CHECKPOINT_VERSION", "DENSE_ABOVE_DENSITY", "TrainResult", "TrainState", "as_activations",
           "config_from_cache", "train_sae"]



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


def warn_short_threshold(cfg: SAEConfig, steps: int) -> None:
    """A UserWarning when a batch-top-k SAE's inference threshold, a running mean from 0 updated at
    rate ``topk_threshold_lr`` (as SAELens keeps it), has reached less than 95% of its value after
    ``steps`` updates (1 - (1 - lr)^steps): the SAE then fires well above k at inference."""
    reached = 1.0 - (1.0 - cfg.topk_threshold_lr) ** steps
    if reached < 0.95:
        need = math.ceil(math.log(0.05) / math.log(1.0 - cfg.topk_threshold_lr))
        warnings.warn(f"{cfg.architecture}: after {steps} steps the inference threshold (a running mean from 0 at rate "
                      f"topk_threshold_lr={cfg.topk_threshold_lr:g}, as in SAELens) has reached {reached:.0%} of its "
                      f"value, so the SAE fires well above k={cfg.k:g} at inference; train for >= {need} steps or "
                      "raise topk_threshold_lr", UserWarning, stacklevel=3)


def train_sae(acts: Any, cfg: SAEConfig, *, progress: Progress | None = None,
              checkpoint: str | os.PathLike | None = None, checkpoint_every: int = 500, resume: bool = True,
              log_every: int = 25, device: str | torch.device | None = None) -> TrainResult:
    """Train an SAE with config ``cfg`` on ``acts`` ([tokens, d_in] tensor/array or an
    ``ActivationCache``) for ``cfg.steps`` steps of ``cfg.batch_size`` tokens.

    ``progress(done_steps, total_steps, label)`` is called every ``log_every`` steps and at
    the end (label: "step s/S L0 .. NMSE .."). With ``checkpoint`` (a file path), state is saved
    every ``checkpoint_every`` steps and at the end, and an existing checkpoint for the same
    config and activations is resumed from (``resume=False`` starts over). Raises ShapeError
    (bad activations), ConfigError (a checkpoint for another config or other activations; the
    run's estimated memory, ``sae.memory``, above the limit: checked before anything is allocated),
    CorruptCheckpointError (an unreadable checkpoint). KeyboardInterrupt propagates and leaves
    the last checkpoint intact. ``device``: where the run computes (None: where ``acts`` is); the
    returned SAE is on CPU.
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
    if device is not None:
        x = x.to(device)
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
    if "topk_threshold" in tr.extra_state:  # batchtopk: inference is a JumpReLU with the running threshold
        tr.sae.threshold.data.fill_(float(tr.extra_state["topk_threshold"]))
        warn_short_threshold(cfg, tr.step)
    tr.sae.cpu()
    trained = (tr.step - start_step) * cfg.batch_size
    return TrainResult(sae=tr.sae, history=pd.DataFrame(tr.history), steps=tr.step,
                       n_tokens=tr.step * cfg.batch_size, seconds=seconds,
                       tokens_per_s=trained / seconds if seconds > 0 else float("nan"), cpu_seconds=cpu_seconds,
                       log10_density=tr.log10_density(), n_resampled=tr.n_resampled, resumed_from=resumed_from)
