"""Transcoders and skip transcoders: read the MLP's input, predict the MLP's output.

A transcoder (Dunefsky et al. 2024) replaces the MLP of block L by a sparse, wide layer trained
to imitate it: its encoder reads the MLP input ``blocks.L.mlp.hook_in`` and its decoder predicts
the MLP output ``blocks.L.hook_mlp_out`` of the same tokens (``sae.sites``: on post-LN BERT the
input is the attention block's LayerNorm output, on a pre-LN decoder the normalised resid_mid).
A skip transcoder (Paulo et al. 2025) adds an affine skip path::

    pre   = x @ W_enc + b_enc                     # x: [..., d_in] MLP input (no b_dec centring)
    f     = act(pre)                                # [..., d_sae]
    y_hat = f @ W_dec + b_dec (+ x @ W_skip.T)      # [..., d_out] predicted MLP output

Architectures (``TranscoderConfig.architecture``; the encoders are ``sae.activations``'s):

- ``topk`` (default): f = topk(ReLU(pre), k); loss ||y_hat - y||^2, decoder rows renormalised.
- ``relu``: f = ReLU(pre); loss ||y_hat - y||^2 + l1 * sum_i f_i ||W_dec[i]|| (SAELens's standard
  SAE penalty: invariant to moving a latent's scale between f and W_dec, so rows are not
  renormalised), l1 ramping linearly from 0 over ``l1_warmup_steps`` (None: 5% of the steps).
- ``jumprelu``: f = pre H(pre - theta), theta [d_sae] >= 0 learned; loss ||y_hat - y||^2 +
  l0 * sum_i H(pre_i - theta_i) with the rectangle-kernel straight-through estimator of bandwidth
  ``jumprelu_bandwidth`` (``sae.train_arch.jumprelu_loss_terms``, the JumpReLU SAE's), theta
  projected to >= 0 before each step, decoder rows renormalised. The L0 term reaches theta only
  (DeepMind's estimator), and Adam moves theta by about ``lr`` per step whatever the coefficient, so
  L0 falls only as fast as the thresholds travel: on MiniLM L3 (skip, d_sae 3072) 196 steps at lr
  1e-3 left L0 at 317 for l0 = 1, 3 and 10 alike; 586 steps at lr 3e-3 reached L0 38.

relu and jumprelu are SAELens's ``transcoder`` / ``skip_transcoder`` and ``jumprelu_transcoder`` /
``jumprelu_skip_transcoder`` (``sae.saelens_transcoder`` saves and loads them); SAELens has no TopK
transcoder.

Shapes and names follow SAELens's ``transcoder`` / ``skip_transcoder``: W_enc [d_in, d_sae],
W_dec [d_sae, d_out], b_enc [d_sae], b_dec [d_out], W_skip [d_out, d_in].
Training (``train_transcoder``): on x and y divided by their scales (mean norm sqrt(d)), the
architecture's loss (mean over the batch), Adam, seeded epochs of ``randperm``, decoder rows
renormalised after each step (topk, jumprelu); the scales are folded into the weights at the end
(renormalised decoder rows then have norm sy, the output scale; pre-activations, hence jumprelu's
thresholds, are unchanged). The skip path starts at the
least-squares affine map from input to output (``least_squares_skip``, exact in float64), so a
skip transcoder with no latent firing is the best affine MLP replacement and the latents model
what it misses; b_dec starts at the mean output. Metrics: NMSE against the MLP output (as
``sae.metrics``: sum ||y - y_hat||^2 / sum ||y - mean y||^2) and loss recovered with the MLP's
output replaced by the prediction (``splice``) against zero-ablating the MLP.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from analysis.errors import ConfigError, ShapeError
from sae import activations
from sae.sites import hook_for
from sae.train_arch import jumprelu_loss_terms, l0_coefficient

KINDS = ("transcoder", "skip_transcoder")
ARCHITECTURES = ("topk", "relu", "jumprelu")
ARCHITECTURE_HELP = "'topk' (k latents per token), 'relu' (L1 penalty) or 'jumprelu' (learned thresholds, L0 penalty)"
# SAELens 6.54's architecture names by (ours, skip); TopK transcoders have none
SAELENS_ARCHITECTURES = {("relu", False): "transcoder", ("relu", True): "skip_transcoder",
                         ("jumprelu", False): "jumprelu_transcoder", ("jumprelu", True): "jumprelu_skip_transcoder"}
# Fields beyond the TopK transcoder's: ``to_dict`` leaves them out at their defaults, so a TopK
# transcoder's dict is what it was before they existed.
ARCH_DEFAULTS = {"l1_coefficient": 1.0, "l1_warmup_steps": None, "l0_coefficient": 1.0, "l0_warmup_steps": 0,
                 "jumprelu_init_threshold": 0.01, "jumprelu_bandwidth": 0.05}
ENC_INIT_NORM = 0.1


def _number(name: str, v: Any, low: float, strict: bool, fix: str) -> None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and \
        (v > low if strict else v >= low)
    if not ok:
        raise ConfigError(f"transcoder {name}={v!r}: must be a finite number {'>' if strict else '>='} {low:g} "
                          f"(NaN and inf are refused); pass e.g. {fix}")


@dataclass(frozen=True, kw_only=True)
class TranscoderConfig:
    """A (skip) transcoder of block ``layer``: ``d_in`` -> ``d_sae`` latents -> ``d_out``
    (``architecture``: module docstring; ``k`` is read by topk only, the coefficients by relu / jumprelu)."""

    d_in: int
    d_out: int
    d_sae: int
    k: int = 32
    skip: bool = False
    layer: int = 0
    lr: float = 1e-3
    batch_size: int = 1024
    n_tokens: int = 1_000_000
    seed: int = 0
    architecture: str = "topk"
    l1_coefficient: float = 1.0  # relu (SAELens's name and default)
    l1_warmup_steps: int | None = None  # relu: None = 5% of the steps
    l0_coefficient: float = 1.0  # jumprelu (SAELens's names and defaults from here on)
    l0_warmup_steps: int = 0
    jumprelu_init_threshold: float = 0.01
    jumprelu_bandwidth: float = 0.05

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"transcoder architecture={self.architecture!r} is unknown; valid: "
                              f"{', '.join(ARCHITECTURES)} ({ARCHITECTURE_HELP}); pass e.g. architecture='relu'")
        for name in ("d_in", "d_out", "d_sae", "batch_size", "n_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"transcoder {name}={v!r}: must be a positive integer; pass {name} >= 1")
        if self.architecture == "topk" and (isinstance(self.k, bool) or not isinstance(self.k, int)
                                            or not 1 <= self.k <= self.d_sae):
            raise ConfigError(f"transcoder k={self.k!r}: must be an integer 1 <= k <= d_sae={self.d_sae}; "
                              "pass e.g. k=32")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"transcoder lr={self.lr!r}: must be a finite number > 0; pass e.g. lr=1e-3")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ConfigError(f"transcoder layer={self.layer!r}: must be an integer >= 0")
        _number("l1_coefficient", self.l1_coefficient, 0.0, False, "l1_coefficient=1.0")
        _number("l0_coefficient", self.l0_coefficient, 0.0, False, "l0_coefficient=1.0")
        _number("jumprelu_init_threshold", self.jumprelu_init_threshold, 0.0, False, "jumprelu_init_threshold=0.01")
        _number("jumprelu_bandwidth", self.jumprelu_bandwidth, 0.0, True, "jumprelu_bandwidth=0.05")
        for name in ("l1_warmup_steps", "l0_warmup_steps"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ConfigError(f"transcoder {name}={v!r}: must be an integer >= 0 (steps); pass e.g. {name}=0")

    @property
    def kind(self) -> str:
        return KINDS[int(self.skip)]

    @property
    def saelens_architecture(self) -> str | None:
        """SAELens's name for this transcoder (``transcoder`` ... ``jumprelu_skip_transcoder``); None for topk."""
        return SAELENS_ARCHITECTURES.get((self.architecture, self.skip))

    @property
    def hook_in(self) -> str:
        return hook_for("mlp_in", self.layer)

    @property
    def hook_out(self) -> str:
        return hook_for("mlp_out", self.layer)

    @property
    def steps(self) -> int:
        return -(-self.n_tokens // self.batch_size)

    def l1_at(self, step: int) -> float:
        """relu's L1 coefficient at 1-based ``step`` (linear warm-up; None = over 5% of the steps)."""
        w = self.l1_warmup_steps if self.l1_warmup_steps is not None else self.steps // 20
        return self.l1_coefficient * (min(1.0, step / w) if w else 1.0)

    def to_dict(self) -> dict[str, Any]:
        """The fields (those of relu / jumprelu left out at their defaults), ``kind`` and the hook names."""
        d = {n: v for n, v in asdict(self).items() if n not in ARCH_DEFAULTS or v != ARCH_DEFAULTS[n]}
        return {**d, "kind": self.kind, "hook_name": self.hook_in, "hook_name_out": self.hook_out}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TranscoderConfig:
        """Inverse of ``to_dict`` (the derived ``kind`` and hook names are ignored); unknown keys raise."""
        if not isinstance(data, dict):
            raise ConfigError(f"transcoder config must be a JSON object, got {type(data).__name__}")
        d = {n: v for n, v in data.items() if n not in ("kind", "hook_name", "hook_name_out")}
        if d.get("architecture") in KINDS:  # a dict written before architectures existed: a TopK transcoder
            d["architecture"] = "topk"
        names = set(cls.__dataclass_fields__)
        if unknown := sorted(set(d) - names):
            raise ConfigError(f"transcoder config has unknown keys {unknown}; valid keys: {', '.join(sorted(names))}")
        try:
            return cls(**d)
        except TypeError as exc:  # a required field missing
            raise ConfigError(f"transcoder config {sorted(d)}: {exc}; it needs d_in, d_out and d_sae") from exc


class Transcoder(nn.Module):
    """A transcoder of ``cfg.architecture`` (``cfg.skip``: with the skip path). Initialisation
    (seeded): decoder rows random unit directions, encoder columns random directions of norm
    ``ENC_INIT_NORM``, biases zero, W_skip zero (``fit_init`` sets b_dec and W_skip from data),
    jumprelu's threshold ``jumprelu_init_threshold``."""

    def __init__(self, cfg: TranscoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.source_label = ""  # the model it was trained on or loaded for (SAELens's metadata.model_name)
        g = torch.Generator().manual_seed(cfg.seed)
        w_dec = torch.randn(cfg.d_sae, cfg.d_out, generator=g)
        self.W_dec = nn.Parameter(w_dec / w_dec.norm(dim=1, keepdim=True))
        w_enc = torch.randn(cfg.d_in, cfg.d_sae, generator=g)
        # columns of norm ENC_INIT_NORM: on inputs of norm sqrt(d_in) the first latents write ~0.1 each, so
        # training starts near the bias / least-squares skip prediction instead of adding k random directions
        self.W_enc = nn.Parameter(ENC_INIT_NORM * w_enc / w_enc.norm(dim=0, keepdim=True))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_out))
        if cfg.skip:
            self.W_skip = nn.Parameter(torch.zeros(cfg.d_out, cfg.d_in))
        if cfg.architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.full((cfg.d_sae,), float(cfg.jumprelu_init_threshold)))

    @property
    def weight_names(self) -> tuple[str, ...]:
        """The parameters this architecture has, in SAELens's names."""
        return ("W_enc", "W_dec", "b_enc", "b_dec") + ("W_skip",) * self.cfg.skip + \
            ("threshold",) * (self.cfg.architecture == "jumprelu")

    def _check(self, x: torch.Tensor, width: int, what: str) -> None:
        if x.shape[-1] != width:
            raise ShapeError(f"transcoder {what} has last dimension {x.shape[-1]}, expected {width} "
                             f"({self.cfg.hook_in} -> {self.cfg.hook_out}); pass the MLP input of that block")

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """x W_enc + b_enc [..., d_sae] (no b_dec centring: b_dec lives in the output space)."""
        self._check(x, self.cfg.d_in, "input")
        return x.to(self.W_enc.dtype) @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents f [..., d_sae]: topk: the top k of ReLU(pre) per token, the rest 0; relu: ReLU(pre);
        jumprelu: pre where pre > threshold, else 0."""
        return self.activate(self.pre_acts(x))

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """The architecture's nonlinearity on pre-activations [..., d_sae] (``sae.activations``)."""
        arch = self.cfg.architecture
        if arch == "relu":
            return activations.relu(pre)
        if arch == "jumprelu":
            return activations.jumprelu(pre, self.threshold)
        pre = pre.relu()
        values, indices = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, indices, values)

    def decode(self, f: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """The predicted MLP output [..., d_out] from latents ``f`` (and the input ``x`` for the skip path)."""
        y = f @ self.W_dec + self.b_dec
        if self.cfg.skip:
            if x is None:
                raise ShapeError("a skip transcoder's prediction needs the MLP input x; call decode(f, x)")
            y = y + x.to(self.W_skip.dtype) @ self.W_skip.T
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: MLP input [..., d_in] -> predicted MLP output [..., d_out]."""
        return self.decode(self.encode(x), x)

    @torch.no_grad()
    def fit_init(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """b_dec = mean output (transcoder) or (W_skip, b_dec) = the least-squares affine map (skip)."""
        if self.cfg.skip:
            w, b = least_squares_skip(x, y)
            self.W_skip.copy_(w)
            self.b_dec.copy_(b)
        else:
            self.b_dec.copy_(y.double().mean(0).float())


def least_squares_skip(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_skip [d_out, d_in], b [d_out]) minimising sum ||x W_skip^T + b - y||^2, solved in float64
    (``torch.linalg.lstsq`` on [x, 1]); float32 results."""
    xd = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
    sol = torch.linalg.lstsq(xd, y.double(), driver="gelsd").solution  # [d_in + 1, d_out]
    return sol[:-1].T.float().contiguous(), sol[-1].float()


def nmse(y: torch.Tensor, y_hat: torch.Tensor) -> float:
    """sum ||y - y_hat||^2 / sum ||y - mean y||^2 (float64 sums)."""
    y, y_hat = y.double(), y_hat.double()
    return float(((y - y_hat) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())


@dataclass(frozen=True, eq=False)
class TranscoderResult:
    """A trained transcoder and what training measured (``history``: step, loss, nmse, l0)."""

    transcoder: Transcoder
    history: list[dict[str, float]]
    nmse_train: float


def _codes_and_penalty(tc: Transcoder, xb: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor | float]:
    """(f [B, d_sae] with the training gradients, the sparsity penalty) at 1-based ``step``:
    topk none; relu l1 * sum_i f_i ||W_dec[i]||; jumprelu l0 * sum_i H(pre_i - theta_i) through the
    straight-through estimator (theta first projected to >= 0). Penalties are means over the batch."""
    cfg = tc.cfg
    pre = tc.pre_acts(xb)
    if cfg.architecture == "jumprelu":
        with torch.no_grad():
            tc.threshold.clamp_(min=0.0)
        f, l0_tok = jumprelu_loss_terms(pre, tc.threshold, cfg.jumprelu_bandwidth)
        return f, l0_coefficient(cfg, step) * l0_tok.mean()
    f = tc.activate(pre)
    if cfg.architecture == "relu":
        return f, cfg.l1_at(step) * (f * tc.W_dec.norm(dim=1)).sum(-1).mean()
    return f, 0.0


def train_transcoder(x: torch.Tensor, y: torch.Tensor, cfg: TranscoderConfig, *,
                     progress: Any = None) -> TranscoderResult:
    """Train a (skip) transcoder of ``cfg.architecture`` on MLP inputs ``x`` [tokens, d_in] and outputs
    ``y`` [tokens, d_out] (loss: module docstring) for ``cfg.steps`` Adam steps of ``cfg.batch_size``
    tokens (epoch e visits ``randperm(n, seed + e)``)."""
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ShapeError(f"transcoder data must be x [tokens, d_in] and y [tokens, d_out] with the same >= 1 tokens, "
                         f"got {tuple(x.shape)} and {tuple(y.shape)}")
    tc = Transcoder(cfg)
    tc._check(x, cfg.d_in, "input")
    tc._check(y, cfg.d_out, "target")
    # Train on x / sx and y / sy (mean norms sqrt(d_in), sqrt(d_out), as SAELens's normalisation), so one
    # learning rate suits models whose MLP input and output differ in scale by orders of magnitude; the
    # scales are folded into the weights at the end (the result reads and predicts raw activations).
    sx = float(x.double().norm(dim=1).mean()) / math.sqrt(cfg.d_in) or 1.0
    sy = float(y.double().norm(dim=1).mean()) / math.sqrt(cfg.d_out) or 1.0
    x_raw, y_raw = x.float(), y.float()
    x, y = (x_raw / sx).contiguous(), (y_raw / sy).contiguous()
    tc.fit_init(x, y)
    opt = torch.optim.Adam(tc.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    n, history = x.shape[0], []
    order, epoch = torch.empty(0, dtype=torch.long), -1
    for step in range(cfg.steps):
        start = (step * cfg.batch_size) % n if n >= cfg.batch_size else 0
        e = (step * cfg.batch_size) // n
        if e != epoch:
            epoch, order = e, torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + e))
        idx = order[start:start + cfg.batch_size]
        xb, yb = x[idx], y[idx]
        f, penalty = _codes_and_penalty(tc, xb, step + 1)
        y_hat = tc.decode(f, xb)
        loss = ((y_hat - yb) ** 2).sum(-1).mean() + penalty
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            if cfg.architecture != "relu":  # relu's penalty is weighted by the row norms instead
                tc.W_dec.div_(tc.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))
        if (step + 1) % 25 == 0 or step + 1 == cfg.steps:
            history.append({"step": step + 1, "loss": float(loss.detach()), "nmse": nmse(yb, y_hat.detach()),
                            "l0": float((f > 0).sum(-1).float().mean())})
            if progress is not None:
                progress(step + 1, cfg.steps, f"step {step + 1}/{cfg.steps} NMSE {history[-1]['nmse']:.3f}")
    tc.eval()
    with torch.no_grad():  # fold the scales in: W_enc / sx; W_dec, b_dec * sy; W_skip * sy / sx
        tc.W_enc.div_(sx)
        tc.W_dec.mul_(sy)
        tc.b_dec.mul_(sy)
        if cfg.skip:
            tc.W_skip.mul_(sy / sx)
        full = nmse(y_raw, torch.cat([tc(x_raw[s:s + 8192]) for s in range(0, n, 8192)]))
    return TranscoderResult(tc, history, full)


class Splice:
    """A patch for ``sae.lm_loss`` / ``sae.lm_kl`` that replaces the MLP's output of the
    transcoder's block with the transcoder's prediction from the MLP input of the same forward
    pass (``hooks()``: grab ``hook_in``, replace at ``hook_out``)."""

    def __init__(self, tc: Transcoder) -> None:
        self.tc, self._x = tc, None

    def _grab(self, x: torch.Tensor, hook: Any) -> None:
        self._x = x

    def _replace(self, y: torch.Tensor, hook: Any) -> torch.Tensor:
        if self._x is None:
            raise ShapeError(f"{self.tc.cfg.hook_in} did not fire before {self.tc.cfg.hook_out}")
        x, self._x = self._x, None
        with torch.no_grad():
            return self.tc.to(x.device)(x.float()).to(y.dtype)

    def hooks(self) -> list[tuple[str, Any]]:
        return [(self.tc.cfg.hook_in, self._grab), (self.tc.cfg.hook_out, self._replace)]

    def __call__(self, y: torch.Tensor) -> torch.Tensor:  # only through hooks(): it needs the input
        raise ShapeError("a transcoder splice needs the MLP input: use its hooks()")


__all__ = ["ARCHITECTURES", "KINDS", "SAELENS_ARCHITECTURES", "Splice", "Transcoder", "TranscoderConfig",
           "TranscoderResult", "least_squares_skip", "nmse", "train_transcoder"]
