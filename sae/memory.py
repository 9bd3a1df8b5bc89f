"""Memory an SAE training run will take, known from its settings: ``training_bytes`` (pure) and
``check_training_memory`` (compares it to ``analysis.memory.memory_limit`` and refuses with a
``ConfigError`` before anything is allocated).

Names: d_in (hook width), d_sae, batch (``batch_size``), tokens (activations held in memory).
The estimate is the peak of ``sae.train.train_sae`` above what the process held before, as a sum
of four parts, each "elements x bytes per element":

- ``d_sae x d_in``, 46 bytes (topk) / 54 bytes (relu), i.e. 11.5 / 13.5 float32 copies: W_enc^T
  and W_dec (2), Adam's m and v (4), the two weight gradients (2), and a step's transients (the
  encoder matrix in the compute dtype, ``remove_parallel_grad_``'s unit rows and product, Adam's
  denominator; relu's dense path also its gradient matrices before their contiguous copies and
  the augmented decoder); plus 40 bytes per latent (biases, their moments, firing counters);
- ``batch x d_sae``, per compute dtype of c bytes (4 float32, 2 bfloat16): topk 2c + 0.5 (the
  pre-activation buffer, AuxK's copy of its dead columns, the top-k indices); relu the larger of
  the dense path's 2c + 1 (pre-activations, their gradient, the firing mask) and the sparse
  path's c + 1 + 80 x density, with density the fraction of d_sae above which the dense path
  runs (``sae.train.DENSE_ABOVE_DENSITY``) and 80 bytes per active entry (CSR indices, the
  transpose permutation, sampled values and gradients, MKL's copies);
- ``batch x d_in``, 40 bytes: the batch and its centred, augmented, reconstructed and gradient
  copies;
- ``tokens x d_in`` x 4 bytes + 24 bytes per token: the activations copied into memory (when
  the trainer has to copy them: an activation cache or an array) and up to three epoch
  permutations (int64).

Measured (``tests/_peak_rss.py``, one thread, peak RSS growth over 3 steps, in float32 copies of
d_sae x d_in after taking off the other parts): d_in 384 x d_sae 100,000, batch 256: topk 10.1
(float32) / 10.1 (bfloat16), relu 11.1 / 10.6; d_in 128 x d_sae 80,000, batch 64: topk 9.7 /
10.4, relu 11.8 / 12.4. Bytes per batch x d_sae element with d_in 32, d_sae 20,000, batch 8,192:
topk 4.3 / 2.4, relu 9.2 / 5.2 (at 6% density); relu forced onto the sparse path at ~50%
density: 71 bytes per active entry. The test suite checks that measured growth stays below the
estimate and above half of it.

The estimate is for large runs, the ones a limit can refuse: their tensors are above glibc's
mmap threshold (at most 32 MiB), so freed memory goes back to the system at once. Tensors below
it are carved from the heap, where freed blocks may stay resident: a small run can peak up to
~1.5x its estimate (d_in 96 x d_sae 40,000, topk in bfloat16, 15 MB tensors: 261 MB against an
estimate of 183 MB), which is still far below any limit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from analysis.errors import ConfigError
from analysis.memory import MemoryLimit, gib, require_fits

SD_BYTES = {"topk": 46, "relu": 54}  # per d_sae x d_in element (11.5 / 13.5 float32 copies)
LATENT_BYTES = 40  # per latent: b_enc, its Adam moments, last_fired, counts, prev_counts
BD_BYTES = 40  # per batch x d_in element
TOKEN_BYTES = 24  # per cached token besides its d_in float32 values: <= 3 int64 epoch permutations
PER_ACTIVE_BYTES = 80  # per active (row, latent) entry of the sparse ReLU path
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
_DENSE_ABOVE_DENSITY = {"bfloat16": 0.035, "float32": 0.14}  # = sae.train.DENSE_ABOVE_DENSITY (tested)

# Architectures beyond relu/topk are estimated as the nearest of the two (sae.train_arch).
_FAMILY = {"topk": "topk", "relu": "relu", "batchtopk": "topk", "matryoshka_batchtopk": "topk",
           "jumprelu": "relu", "gated": "relu"}

PARTS = {  # part -> (short label, what it is, the fix)
    "weights": ("weights and Adam state", "the weights, their gradients and Adam state ([d_sae, d_in])",
                "lower d_sae or expansion (--d-sae / --expansion)"),
    "step": ("step buffers", "the training step's [batch_size, d_sae] buffers",
             "lower batch_size (--batch-size) or d_sae / expansion (--d-sae / --expansion)"),
    "batch": ("batch copies", "the [batch_size, d_in] batch and its copies", "lower batch_size (--batch-size)"),
    "activations": ("activations", "the harvested activations held in memory ([tokens, d_in])",
                    "train on fewer texts (--per-package, --max-tokens or a shorter --texts file)"),
}


@dataclass(frozen=True)
class TrainingMemory:
    """Estimated peak bytes of one SAE training run, by part (keys of ``PARTS``)."""

    parts: dict[str, int]
    settings: str  # "d_in=384, d_sae=3072, batch_size=4096, topk, float32, 1,234 tokens of activations"

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def dominant(self) -> str:
        return max(self.parts, key=self.parts.get)


def _check_count(name: str, v: object) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ConfigError(f"{name}={v!r} must be an integer >= 0")


def training_bytes(*, d_in: int, d_sae: int, batch_size: int, architecture: str = "topk", dtype: str = "float32",
                   n_tokens: int = 0) -> TrainingMemory:
    """Peak memory of training an SAE with these settings (see the module docstring).

    ``n_tokens``: activations the trainer copies into memory (0 when they already are in memory
    or are not known yet). Pure: no I/O."""
    for name, v in (("d_in", d_in), ("d_sae", d_sae), ("batch_size", batch_size), ("n_tokens", n_tokens)):
        _check_count(name, v)
    if dtype not in _DTYPE_BYTES or architecture not in _FAMILY:
        raise ConfigError(f"architecture={architecture!r}, dtype={dtype!r}: expected one of {'/'.join(_FAMILY)} and "
                          f"{'/'.join(_DTYPE_BYTES)}")
    c = _DTYPE_BYTES[dtype]
    family = _FAMILY[architecture]
    if family == "topk":
        per_bs = 2 * c + 0.5 + (4 if architecture == "matryoshka_batchtopk" else 0)
    else:
        per_bs = max(2 * c + 1, c + 1 + PER_ACTIVE_BYTES * _DENSE_ABOVE_DENSITY[dtype])
    if architecture == "jumprelu":  # dense autograd route (sae.train_arch): ~10 float32 copies alive
        per_bs = max(per_bs, 10 * 4 + 2 * c)
    elif architecture == "gated":  # dense GEMM step (sae.train_gated): [f; ReLU(pi)] and its gradient, [2B, d_sae]
        per_bs = max(per_bs, 4 * c + 1)
    parts = {"weights": SD_BYTES[family] * d_sae * d_in + LATENT_BYTES * d_sae,
             "step": int(per_bs * batch_size * d_sae),
             "batch": BD_BYTES * batch_size * d_in,
             "activations": n_tokens * (4 * d_in + TOKEN_BYTES)}
    settings = f"d_in={d_in}, d_sae={d_sae}, batch_size={batch_size}, {architecture}, {dtype}"
    if n_tokens:
        settings += f", {n_tokens:,} tokens of activations"
    return TrainingMemory(parts, settings)


def refusal(est: TrainingMemory, limit: MemoryLimit) -> str:
    """The ConfigError message: the estimate, the limit, the largest part and its fix."""
    _, what, fix = PARTS[est.dominant]
    others = ", ".join(f"{PARTS[name][0]} {gib(b)}" for name, b in sorted(est.parts.items(), key=lambda kv: -kv[1])
                       if b and name != est.dominant)
    return (f"SAE training would need about {gib(est.total)} ({est.settings}) but the memory limit is "
            f"{limit.describe()}. Largest part: {what}, {gib(est.parts[est.dominant])}"
            f"{f' (then {others})' if others else ''}. To fit, {fix}.")


def check_training_memory(**settings: object) -> TrainingMemory:
    """``training_bytes(**settings)``, or ConfigError when it exceeds ``memory_limit()`` (no check
    when the limit is unknown)."""
    est = training_bytes(**settings)
    require_fits(est.total, lambda limit: refusal(est, limit))
    return est


def feature_data_bytes(d_sae: int, settings: dict) -> int:
    """About the peak bytes of ``sae.features.feature_data``'s per-feature arrays for these
    settings (its nonzero activations are bounded separately by ``max_nonzeros``): per feature,
    (n_top + n_intervals x n_per_interval) context windows of before + 1 + after tokens at 80
    bytes per token while they are built (row indices, neighbour lookups, masks, ids, activations)
    plus 24 per window, 16 per histogram bin, 8 per interval edge, 24 per logit kept. Measured:
    ~47 bytes per window token (d_sae 512, 1,100 windows of 17 tokens per feature: 637 MiB peak
    growth, of which ~190 MiB the 3.2 million nonzeros, against an estimate of 743 MiB)."""
    v = {}
    for name in ("n_top", "n_intervals", "n_per_interval", "before", "after", "n_bins", "n_logits"):
        if isinstance(settings[name], bool) or not isinstance(settings[name], (int, np.integer)):
            raise ConfigError(f"feature-data setting {name}={settings[name]!r} must be an integer")
        v[name] = max(int(settings[name]), 0)
    window = v["before"] + 1 + v["after"]
    rows = v["n_top"] + v["n_intervals"] * v["n_per_interval"]
    return d_sae * (rows * (80 * window + 24) + 16 * v["n_bins"] + 8 * (v["n_intervals"] + 1) + 24 * v["n_logits"])


def check_feature_data_memory(d_sae: int, settings: dict) -> int:
    """``feature_data_bytes``, or ConfigError when it exceeds ``memory_limit()``."""
    need = feature_data_bytes(d_sae, settings)
    shown = ", ".join(f"{k}={settings[k]}" for k in ("n_top", "n_intervals", "n_per_interval", "before", "after",
                                                    "n_bins", "n_logits"))
    require_fits(need, lambda limit: f"feature data of {d_sae:,} features would need about {gib(need)} ({shown}) but "
                                     f"the memory limit is {limit.describe()}; lower n_per_interval, n_top or the "
                                     "context (before/after)")
    return need


def model_config_json(hf_dir: object) -> dict | None:
    """``hf_dir/config.json`` as a dict, read without booting the model; None without a readable
    JSON object (no directory, no file, not JSON, not an object)."""
    if hf_dir is None:
        return None
    try:
        cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) else None


def hook_width(hf_dir: object) -> int | None:
    """n_heads x d_head of a model's attention (the width of ``hook_z``) from its ``config.json``,
    read without booting the model; None when there is no readable config or it lacks the keys."""
    if (cfg := model_config_json(hf_dir)) is None:
        return None
    n_heads = next((cfg[k] for k in ("num_attention_heads", "n_head", "n_heads") if isinstance(cfg.get(k), int)), None)
    hidden = next((cfg[k] for k in ("hidden_size", "n_embd", "d_model") if isinstance(cfg.get(k), int)), None)
    if not n_heads or n_heads < 1:
        return None
    d_head = cfg.get("head_dim") if isinstance(cfg.get("head_dim"), int) else (hidden // n_heads if hidden else None)
    return n_heads * d_head if d_head and d_head > 0 else None
