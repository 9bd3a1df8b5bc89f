"""``SAEConfig``: everything that determines an attention-output SAE and how it is trained.

A frozen, keyword-only dataclass validated on construction (``ConfigError`` names the field,
the constraint and the fix). ``to_dict()`` / ``from_dict()`` round-trip through JSON (the
store's meta and the ``lenslab_config`` entry of a SAELens ``cfg.json``).

Hook metadata: the SAE reads ``blocks.{layer}.attn.hook_z`` [batch, pos, n_heads, d_head]
flattened head-major to [tokens, d_in] with d_in = n_heads * d_head; head h owns columns
``h*d_head:(h+1)*d_head``. ``n_heads``/``d_head`` may be ``None`` for an SAE loaded from a
SAELens file that does not record them.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from analysis.errors import ConfigError

ARCHITECTURES = ("relu", "topk")
DTYPES = ("float32", "bfloat16")
B_DEC_INITS = ("mean", "zero")
HOOK_RE = re.compile(r"^blocks\.(\d+)\.attn\.hook_z$")


def hook_name_for(layer: int) -> str:
    """``blocks.{layer}.attn.hook_z``."""
    return f"blocks.{layer}.attn.hook_z"


@dataclass(frozen=True, kw_only=True)
class SAEConfig:
    """Architecture, optimiser, schedule and hook metadata of one SAE.

    Loss per batch (mean over the batch's tokens; x, x_hat: [batch, d_in], f: [batch, d_sae]):
    - relu: ``||x_hat - x||^2 + l1_coefficient * sum_i |f_i|`` (decoder rows have unit norm,
      so the L1 term needs no decoder-norm weighting);
    - topk: ``||x_hat - x||^2 + aux_coefficient * ||e - e_hat||^2`` where e = x - x_hat and
      e_hat is e reconstructed from the top ``aux_k`` dead latents (AuxK, Gao et al. 2024),
      the term scaled by min(1, n_dead / aux_k) as in SAELens.
    """

    d_in: int
    d_sae: int
    architecture: str = "relu"
    k: int | None = None  # topk: latents kept per token (the L0 target)
    l1_coefficient: float = 1.0  # relu
    l1_warmup_steps: int | None = None  # relu: L1 ramps linearly from 0 over these steps; None = 5% of steps
    lr: float = 1.2e-3
    betas: tuple[float, float] = (0.9, 0.99)
    lr_warmup_steps: int = 0
    lr_decay_fraction: float = 0.0  # last fraction of the steps decays lr linearly to 0
    batch_size: int = 4096
    n_tokens: int = 4_096_000  # training tokens (activations may be repeated in epochs)
    seed: int = 0
    dtype: str = "float32"  # compute dtype of the matmuls; weights and Adam state stay float32
    b_dec_init: str = "mean"  # "mean" of the training activations, or "zero"
    # Dead latents: a latent that fired on none of the last ``dead_window`` training tokens.
    dead_window: int = 1_000_000
    # relu: resample dead latents (Anthropic 2023) at these steps; None = at 10/20/30/40% of the run.
    resample_steps: tuple[int, ...] | None = None
    resample_sample: int = 65_536  # tokens scored to draw resampling inputs (prob ~ loss^2)
    resample_encoder_scale: float = 0.2  # new encoder column norm = scale * mean alive column norm
    # topk: AuxK.
    aux_k: int | None = None  # None = min(512, d_in // 2)
    aux_coefficient: float = 1.0 / 32.0
    # Hook metadata.
    hook_name: str = "blocks.0.attn.hook_z"
    layer: int = 0
    n_heads: int | None = None
    d_head: int | None = None
    source_fingerprint: str = ""
    source_label: str = ""

    def __post_init__(self) -> None:
        def bad(field: str, value: Any, constraint: str, fix: str) -> ConfigError:
            return ConfigError(f"SAE config {field}={value!r}: {constraint}; {fix}")

        for name in ("d_in", "d_sae", "batch_size", "n_tokens", "resample_sample", "dead_window"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise bad(name, v, "must be a positive integer", f"pass {name} >= 1")
        if self.architecture not in ARCHITECTURES:
            raise bad("architecture", self.architecture, f"must be one of {', '.join(ARCHITECTURES)}",
                      "use 'relu' (L1 penalty) or 'topk' (fixed L0)")
        if self.architecture == "topk":
            if isinstance(self.k, bool) or not isinstance(self.k, int) or not (1 <= self.k <= self.d_sae):
                raise bad("k", self.k, f"a topk SAE needs an integer 1 <= k <= d_sae={self.d_sae}",
                          "pass k (e.g. k=32)")
        elif self.k is not None:
            raise bad("k", self.k, "only a topk SAE takes k", "drop k or use architecture='topk'")
        if self.aux_k is not None and (not isinstance(self.aux_k, int) or self.aux_k < 1):
            raise bad("aux_k", self.aux_k, "must be a positive integer or None", "pass e.g. aux_k=192")
        for name in ("l1_coefficient", "aux_coefficient", "resample_encoder_scale"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise bad(name, v, "must be a finite number >= 0", f"pass {name} >= 0")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise bad("lr", self.lr, "must be a finite number > 0", "pass e.g. lr=1.2e-3")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise bad("betas", self.betas, "must be two numbers in [0, 1)", "pass e.g. betas=(0.9, 0.99)")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        for name in ("l1_warmup_steps", "lr_warmup_steps", "seed", "layer"):
            v = getattr(self, name)
            if v is None and name == "l1_warmup_steps":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise bad(name, v, "must be an integer >= 0", f"pass {name} >= 0")
        if not (0 <= self.lr_decay_fraction <= 1):
            raise bad("lr_decay_fraction", self.lr_decay_fraction, "must be in [0, 1]", "pass e.g. 0.2")
        if self.dtype not in DTYPES:
            raise bad("dtype", self.dtype, f"must be one of {', '.join(DTYPES)}",
                      "use 'bfloat16' for fast mixed precision or 'float32'")
        if self.b_dec_init not in B_DEC_INITS:
            raise bad("b_dec_init", self.b_dec_init, f"must be one of {', '.join(B_DEC_INITS)}", "use 'mean'")
        if self.resample_steps is not None:
            steps = tuple(int(s) for s in self.resample_steps)
            if any(s <= 0 for s in steps):
                raise bad("resample_steps", self.resample_steps, "steps must be >= 1", "pass () to never resample")
            object.__setattr__(self, "resample_steps", tuple(sorted(set(steps))))
        m = HOOK_RE.match(self.hook_name)
        if m is None:
            raise bad("hook_name", self.hook_name, "must be blocks.L.attn.hook_z",
                      "SAEs here read attention outputs before W_O; pass layer=L and hook_name=hook_name_for(L)")
        if int(m.group(1)) != self.layer:
            raise bad("layer", self.layer, f"disagrees with hook_name {self.hook_name!r}",
                      f"pass hook_name={hook_name_for(self.layer)!r}")
        if (self.n_heads is None) != (self.d_head is None):
            raise bad("n_heads/d_head", (self.n_heads, self.d_head), "give both or neither", "pass both")
        if self.n_heads is not None and self.n_heads * self.d_head != self.d_in:
            raise bad("d_in", self.d_in, f"must equal n_heads*d_head = {self.n_heads}*{self.d_head}",
                      "pass d_in = n_heads * d_head of the hooked layer")

    # -- derived --------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        """Optimiser steps = ceil(n_tokens / batch_size)."""
        return -(-self.n_tokens // self.batch_size)

    @property
    def l1_warmup(self) -> int:
        """Steps over which the L1 coefficient ramps up (``l1_warmup_steps`` or 5% of the steps)."""
        return self.l1_warmup_steps if self.l1_warmup_steps is not None else self.steps // 20

    @property
    def aux_k_effective(self) -> int:
        return self.aux_k if self.aux_k is not None else max(1, min(512, self.d_in // 2))

    @property
    def resample_schedule(self) -> tuple[int, ...]:
        """Steps (1-based, after that step's update) at which a relu SAE resamples dead latents."""
        if self.architecture != "relu":
            return ()
        if self.resample_steps is not None:
            return tuple(s for s in self.resample_steps if s < self.steps)
        return tuple(sorted({s for s in (round(self.steps * f) for f in (0.1, 0.2, 0.3, 0.4)) if 0 < s < self.steps}))

    @property
    def dead_window_steps(self) -> int:
        return max(1, -(-self.dead_window // self.batch_size))

    # -- (de)serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        d = asdict(self)
        d["betas"] = list(self.betas)
        if self.resample_steps is not None:
            d["resample_steps"] = list(self.resample_steps)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEConfig:
        """Inverse of ``to_dict``; unknown keys raise ConfigError (name them, so typos show)."""
        if not isinstance(data, dict):
            raise ConfigError(f"SAE config must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"SAE config has unknown keys {unknown}; valid keys: {', '.join(sorted(names))}")
        missing = [n for n in ("d_in", "d_sae") if n not in data]
        if missing:
            raise ConfigError(f"SAE config misses {missing}; every SAE config needs d_in and d_sae")
        d = dict(data)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        if d.get("resample_steps") is not None:
            d["resample_steps"] = tuple(d["resample_steps"])
        return cls(**d)

    def replace(self, **changes: Any) -> SAEConfig:
        """A copy with ``changes`` applied (validated again)."""
        return SAEConfig.from_dict({**self.to_dict(), **changes})
