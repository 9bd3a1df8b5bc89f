"""``SAEConfig``: everything that determines an attention-output SAE and how it is trained.

A frozen, keyword-only dataclass validated on construction (``ConfigError`` names the field,
the constraint and the fix). ``to_dict()`` / ``from_dict()`` round-trip through JSON (the
store's meta and the ``lenslab_config`` entry of a SAELens ``cfg.json``).

``TrainSettings`` (``TRAIN_DEFAULTS``): a training request of ``sae.pipeline.sae_train`` /
``lenslab sae train`` before the hook's width is known; the one place their defaults are stated.
``check_fields`` runs SAEConfig's checks on any subset of its fields (what both construct through).

Hook metadata: the SAE reads ``blocks.{layer}.attn.hook_z`` [batch, pos, n_heads, d_head]
flattened head-major to [tokens, d_in] with d_in = n_heads * d_head; head h owns columns
``h*d_head:(h+1)*d_head``. ``n_heads``/``d_head`` may be ``None`` for an SAE loaded from a
SAELens file that does not record them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from analysis.errors import ConfigError
from sae.config_values import check_request_values
from sae.sites import DEFAULT_SITE, SITE_HELP, SITES, check_site_name, hook_for, parse_hook

ARCHITECTURES = ("relu", "topk", "jumprelu", "batchtopk", "matryoshka_batchtopk", "gated")
K_ARCHITECTURES = ("topk", "batchtopk", "matryoshka_batchtopk")  # take k (latents per token, or on average)
L1_ARCHITECTURES = ("relu", "gated")  # take l1_coefficient
ARCHITECTURE_HELP = ("'relu' (L1 penalty), 'topk' (k per token), 'jumprelu' (learned thresholds, L0 penalty), "
                     "'batchtopk' (k on average over the batch), 'matryoshka_batchtopk' (nested prefixes) or "
                     "'gated' (gate and magnitude paths, L1 on the gate)")
# Fields added with the architectures beyond relu/topk: ``to_dict`` leaves them out while they hold
# their defaults, so the store keys of relu/topk SAEs (their config dicts) stay what they were.
ARCH_FIELDS = ("l0_coefficient", "l0_warmup_steps", "jumprelu_init_threshold", "jumprelu_bandwidth",
               "topk_threshold_lr", "matryoshka_widths")
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
      the term scaled by min(1, n_dead / aux_k) as in SAELens;
    - batchtopk: as topk, with the k * batch largest ReLU(pre) of the whole batch kept
      (``k`` may be fractional); inference uses one threshold, the running mean (rate
      ``topk_threshold_lr``) of the smallest kept value;
    - matryoshka_batchtopk: batchtopk codes, loss sum_l ||x_hat_l - x||^2 over the prefixes
      ``matryoshka_widths`` (m_1 < ... < m_L = d_sae) plus AuxK on the full reconstruction;
    - jumprelu: ``||x_hat - x||^2 + l0_coefficient * sum_i H(pre_i - threshold_i)``, thresholds
      trained by the rectangle-kernel straight-through estimator of bandwidth ``jumprelu_bandwidth``;
    - gated: ``||x_hat - x||^2 + l1_coefficient * sum_i ReLU(pi_i) + ||ReLU(pi) W_dec' + b_dec - x||^2``
      (pi the gate pre-activation, W_dec' and b_dec detached in the last term).
    See ``sae.activations`` for the encoders.
    """

    d_in: int
    d_sae: int
    architecture: str = "relu"
    k: int | float | None = None  # topk: latents kept per token (the L0 target); batchtopk: on average
    l1_coefficient: float = 1.0  # relu, gated
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
    site: str = DEFAULT_SITE  # what it reads (sae.sites): hook_z, resid_pre, resid_post or mlp_out
    source_fingerprint: str = ""
    source_label: str = ""
    # jumprelu (SAELens's names and defaults).
    l0_coefficient: float = 1.0
    l0_warmup_steps: int = 0  # the L0 coefficient ramps linearly from 0 over these steps
    jumprelu_init_threshold: float = 0.01
    jumprelu_bandwidth: float = 0.05
    # batchtopk / matryoshka_batchtopk.
    topk_threshold_lr: float = 0.01
    matryoshka_widths: tuple[int, ...] | None = None  # matryoshka: prefix widths, ending at d_sae

    def __post_init__(self) -> None:
        normal = check_fields({f.name: getattr(self, f.name) for f in fields(self)})
        object.__setattr__(self, "betas", normal["betas"])
        object.__setattr__(self, "resample_steps", normal["resample_steps"])
        object.__setattr__(self, "matryoshka_widths", normal["matryoshka_widths"])

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
        if self.matryoshka_widths is not None:
            d["matryoshka_widths"] = list(self.matryoshka_widths)
        for name in (*ARCH_FIELDS, "site"):
            if getattr(self, name) == config_default(name):
                del d[name]
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
        for name in ("resample_steps", "matryoshka_widths"):
            if isinstance(d.get(name), list):
                d[name] = tuple(d[name])
        return cls(**d)

    def replace(self, **changes: Any) -> SAEConfig:
        """A copy with ``changes`` applied (validated again)."""
        return SAEConfig.from_dict({**self.to_dict(), **changes})


def _bad(field: str, value: Any, constraint: str, fix: str) -> ConfigError:
    return ConfigError(f"SAE config {field}={value!r}: {constraint}; {fix}")


def check_fields(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` (SAEConfig fields by name) checked as ``SAEConfig`` checks them, returned with the
    fields left out at their defaults and ``betas`` / ``resample_steps`` normalised (float pair,
    sorted unique steps). ``d_in`` and ``d_sae`` have no default: left out, the checks that need
    them are skipped (training settings are checked before the hook's width is known).

    Raises ConfigError naming the field, the constraint and the fix (unknown names included)."""
    known = {f.name: f for f in fields(SAEConfig)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"SAE config has unknown keys {unknown}; valid keys: {', '.join(sorted(known))}")
    v = {n: f.default for n, f in known.items() if n not in ("d_in", "d_sae")}
    v.update(values)
    for name in ("d_in", "d_sae", "batch_size", "n_tokens", "resample_sample", "dead_window"):
        if name in v and (isinstance(v[name], bool) or not isinstance(v[name], int) or v[name] <= 0):
            raise _bad(name, v[name], "must be a positive integer", f"pass {name} >= 1")
    arch = v["architecture"]
    if arch not in ARCHITECTURES:
        raise _bad("architecture", arch, f"must be one of {', '.join(ARCHITECTURES)}", f"use {ARCHITECTURE_HELP}")
    k = v["k"]
    top = f"d_sae={v['d_sae']}" if "d_sae" in v else "d_sae"
    if arch == "topk":
        if isinstance(k, bool) or not isinstance(k, int) or not (1 <= k <= v.get("d_sae", k)):
            raise _bad("k", k, f"a topk SAE needs an integer 1 <= k <= {top}", "pass k (e.g. k=32)")
    elif arch in K_ARCHITECTURES:
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not (0 < k < v.get("d_sae", math.inf)):
            raise _bad("k", k, f"a {arch} SAE needs a number 0 < k < {top} (latents per token on average)",
                       "pass k below the width (e.g. k=32)")
    elif k is not None:
        raise _bad("k", k, f"only {', '.join(K_ARCHITECTURES)} SAEs take k",
                   "drop k or use architecture='topk' or 'batchtopk'")
    _check_arch_fields(v)
    if v["aux_k"] is not None and (not isinstance(v["aux_k"], int) or v["aux_k"] < 1):
        raise _bad("aux_k", v["aux_k"], "must be a positive integer or None", "pass e.g. aux_k=192")
    for name in ("l1_coefficient", "aux_coefficient", "resample_encoder_scale"):
        if not (isinstance(v[name], (int, float)) and math.isfinite(v[name]) and v[name] >= 0):
            raise _bad(name, v[name], "must be a finite number >= 0", f"pass {name} >= 0")
    if not (isinstance(v["lr"], (int, float)) and math.isfinite(v["lr"]) and v["lr"] > 0):
        raise _bad("lr", v["lr"], "must be a finite number > 0", "pass e.g. lr=1.2e-3")
    if len(v["betas"]) != 2 or not all(0 <= b < 1 for b in v["betas"]):
        raise _bad("betas", v["betas"], "must be two numbers in [0, 1)", "pass e.g. betas=(0.9, 0.99)")
    v["betas"] = tuple(float(b) for b in v["betas"])
    for name in ("l1_warmup_steps", "lr_warmup_steps", "seed", "layer"):
        if v[name] is None and name == "l1_warmup_steps":
            continue
        if isinstance(v[name], bool) or not isinstance(v[name], int) or v[name] < 0:
            raise _bad(name, v[name], "must be an integer >= 0", f"pass {name} >= 0")
    if not (0 <= v["lr_decay_fraction"] <= 1):
        raise _bad("lr_decay_fraction", v["lr_decay_fraction"], "must be in [0, 1]", "pass e.g. 0.2")
    if v["dtype"] not in DTYPES:
        raise _bad("dtype", v["dtype"], f"must be one of {', '.join(DTYPES)}",
                   "use 'bfloat16' for fast mixed precision or 'float32'")
    if v["b_dec_init"] not in B_DEC_INITS:
        raise _bad("b_dec_init", v["b_dec_init"], f"must be one of {', '.join(B_DEC_INITS)}", "use 'mean'")
    if v["resample_steps"] is not None:
        steps = tuple(int(s) for s in v["resample_steps"])
        if any(s <= 0 for s in steps):
            raise _bad("resample_steps", v["resample_steps"], "steps must be >= 1", "pass () to never resample")
        v["resample_steps"] = tuple(sorted(set(steps)))
    site = v["site"]
    if site not in SITES:
        raise _bad("site", site, f"must be one of {', '.join(SITES)}", f"use {SITE_HELP}")
    if "hook_name" not in values:  # a request names the site and layer; the hook follows from them
        v["hook_name"] = hook_for(site, v["layer"]) if isinstance(v["layer"], int) else v["hook_name"]
    parsed = parse_hook(v["hook_name"])
    if parsed is None or parsed[0] != site:
        raise _bad("hook_name", v["hook_name"], f"must be {hook_for(site, 0).replace('.0.', '.L.')} for site {site!r}",
                   f"pass layer=L and hook_name=sae.sites.hook_for({site!r}, L)")
    if parsed[1] != v["layer"]:
        raise _bad("layer", v["layer"], f"disagrees with hook_name {v['hook_name']!r}",
                   f"pass hook_name={hook_for(site, v['layer'])!r}")
    if site != DEFAULT_SITE and v["n_heads"] is not None:
        raise _bad("n_heads", v["n_heads"], f"heads apply to hook_z SAEs only, not to site {site!r}",
                   "pass n_heads=None and d_head=None")
    if (v["n_heads"] is None) != (v["d_head"] is None):
        raise _bad("n_heads/d_head", (v["n_heads"], v["d_head"]), "give both or neither", "pass both")
    if "d_in" in v and v["n_heads"] is not None and v["n_heads"] * v["d_head"] != v["d_in"]:
        raise _bad("d_in", v["d_in"], f"must equal n_heads*d_head = {v['n_heads']}*{v['d_head']}",
                   "pass d_in = n_heads * d_head of the hooked layer")
    return v


def _check_arch_fields(v: dict[str, Any]) -> None:
    """The jumprelu / batchtopk / matryoshka fields of ``v`` (normalises ``matryoshka_widths``)."""
    for name, what in (("l0_coefficient", "coefficients"), ("jumprelu_init_threshold", "thresholds")):
        x = v[name]
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
            raise _bad(name, x, f"must be a finite number >= 0 (NaN and inf are not {what})",
                       f"pass e.g. {name}={config_default(name)}")
    for name in ("jumprelu_bandwidth", "topk_threshold_lr"):
        x = v[name]
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or not 0 < x <= 1:
            raise _bad(name, x, "must be a finite number in (0, 1]", f"pass e.g. {name}={config_default(name)}")
    w0 = v["l0_warmup_steps"]
    if isinstance(w0, bool) or not isinstance(w0, int) or w0 < 0:
        raise _bad("l0_warmup_steps", w0, "must be an integer >= 0", "pass l0_warmup_steps >= 0")
    widths = v["matryoshka_widths"]
    if v["architecture"] != "matryoshka_batchtopk":
        if widths is not None:
            raise _bad("matryoshka_widths", widths, "only a matryoshka_batchtopk SAE takes prefix widths",
                       "drop matryoshka_widths or use architecture='matryoshka_batchtopk'")
        return
    d_sae = v.get("d_sae")
    if widths is None:
        raise _bad("matryoshka_widths", widths, "a matryoshka_batchtopk SAE needs its prefix widths",
                   "pass e.g. matryoshka_widths=(d_sae // 8, d_sae // 2, d_sae)")
    try:
        w = tuple(int(x) for x in widths)
    except (TypeError, ValueError):
        raise _bad("matryoshka_widths", widths, "must be integers", "pass e.g. (128, 512, 2048)") from None
    if not w or any(a >= b for a, b in zip(w, w[1:])) or w[0] < 1 or (d_sae is not None and w[-1] != d_sae):
        end = f"d_sae={d_sae}" if d_sae is not None else "d_sae"
        raise _bad("matryoshka_widths", widths, f"must increase strictly from >= 1 and end at {end}",
                   "pass e.g. matryoshka_widths=(d_sae // 8, d_sae // 2, d_sae)")
    v["matryoshka_widths"] = w


# -- training requests ---------------------------------------------------------------------------
TOPK_K = 32  # k of a topk SAE trained without one


def config_default(name: str) -> Any:
    """The default of the ``SAEConfig`` field ``name``."""
    return next(f.default for f in fields(SAEConfig) if f.name == name)


HOOK_FIELDS = ("d_in", "d_sae", "hook_name", "layer", "n_heads", "d_head", "site", "source_fingerprint",
               "source_label")
NAMED_FIELDS = ("architecture", "k", "l1_coefficient", "n_tokens", "batch_size", "lr", "seed", "dtype")


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """One training request of ``sae.pipeline.sae_train`` / ``lenslab sae train``: the SAE's
    settings before the hook's width is known, its corpus and its checkpoint cadence.

    The one place their defaults are stated: the API signature and the CLI options read them from
    ``TRAIN_DEFAULTS``. ``batch_size``, ``lr``, ``seed`` and ``dtype`` default to ``SAEConfig``'s;
    a request trains a TopK SAE (``k`` = ``TOPK_K``; a ReLU SAE's ``l1_coefficient`` defaults to
    ``SAEConfig``'s) on 2M tokens, 8 x d_in wide (``d_sae`` overrides ``expansion``). ``extra``:
    any other ``SAEConfig`` field (``resample_steps``, ``aux_k``, ``lr_decay_fraction`` ...).
    Constructing one checks everything ``SAEConfig`` would (ConfigError naming the field, the
    constraint and the fix), so a bad setting fails before the model boots.
    """

    layer: int = 0
    site: str = DEFAULT_SITE  # sae.sites.SITES
    architecture: str = "topk"
    expansion: int | None = 8
    d_sae: int | None = None
    k: int | float | None = None  # topk / batchtopk / matryoshka_batchtopk; None = TOPK_K
    l1_coefficient: float | None = None  # relu / gated; None = SAEConfig's l1_coefficient
    n_tokens: int = 2_000_000
    batch_size: int = config_default("batch_size")
    lr: float = config_default("lr")
    seed: int = config_default("seed")  # of the initialisation, the batches and the corpus split
    dtype: str = config_default("dtype")
    per_package: int | None = None  # docstrings per package of the corpus (None = all)
    max_tokens: int = 128  # tokens kept per text
    eval_fraction: float = 0.1  # held-out share of the docstring corpus
    checkpoint_every: int = 500  # optimiser steps between checkpoints
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "extra", dict(self.extra))  # a copy: the caller's dict may change
        check_site_name(self.site)
        check_request_values(self)  # before sae_fields() converts them (float("x"), int(2.5), int(True))
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"SAE architecture {self.architecture!r} is unknown; use {ARCHITECTURE_HELP}")
        if self.l1_coefficient is not None and self.architecture not in L1_ARCHITECTURES:
            raise ConfigError(f"l1_coefficient applies to {' and '.join(L1_ARCHITECTURES)} SAEs only; drop it or use "
                              "architecture='relu' or 'gated'")
        if self.k is not None and self.architecture not in K_ARCHITECTURES:
            raise ConfigError(f"k applies to {', '.join(K_ARCHITECTURES)} SAEs only; drop it or use "
                              "architecture='topk' or 'batchtopk'")
        valid = [f.name for f in fields(SAEConfig) if f.name not in HOOK_FIELDS + NAMED_FIELDS]
        unknown = sorted(set(self.extra) - set(valid))
        if unknown:
            raise ConfigError(f"unknown SAE setting(s) {unknown}; valid: {', '.join(valid)} (the width is d_sae or "
                              "expansion, the layer is layer=, the rest comes from the hook)")
        c = self.checkpoint_every
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ConfigError(f"checkpoint_every={c!r} must be an integer >= 1 (steps between checkpoints)")
        if self.d_sae is None:
            e = self.expansion
            if isinstance(e, bool) or not isinstance(e, int) or e < 1:
                raise ConfigError(f"SAE config expansion={e!r}: must be an integer >= 1 (d_sae = expansion x "
                                  "d_in); pass expansion >= 1 or d_sae")
        check_fields({**self.sae_fields(), **({} if self.d_sae is None else {"d_sae": self.d_sae})})

    @property
    def width_expansion(self) -> int | None:
        """The expansion that sets the width: None when ``d_sae`` is given."""
        return None if self.d_sae is not None else self.expansion

    def sae_fields(self) -> dict[str, Any]:
        """The ``SAEConfig`` fields these settings fix (all but the width and the hook's), as a
        training request records them."""
        arch: dict[str, Any] = {}
        if self.architecture in K_ARCHITECTURES:
            arch = {"k": TOPK_K if self.k is None else self.k}
        elif self.architecture in L1_ARCHITECTURES:
            l1 = config_default("l1_coefficient") if self.l1_coefficient is None else self.l1_coefficient
            arch = {"l1_coefficient": float(l1)}
        site = {} if self.site == DEFAULT_SITE else {"site": self.site}  # hook_z requests stay as they were
        return {"architecture": self.architecture, **arch, "n_tokens": int(self.n_tokens),
                "batch_size": int(self.batch_size), "lr": float(self.lr), "seed": int(self.seed),
                "dtype": self.dtype, **site, **self.extra}


TRAIN_DEFAULTS = TrainSettings()
