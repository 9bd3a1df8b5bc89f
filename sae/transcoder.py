"""Transcoders and skip transcoders: read the MLP's input, predict the MLP's output.

A transcoder (Dunefsky et al. 2024) replaces the MLP of block L by a sparse, wide layer trained
to imitate it: its encoder reads the MLP input ``blocks.L.mlp.hook_in`` and its decoder predicts
the MLP output ``blocks.L.hook_mlp_out`` of the same tokens (``sae.sites``: on post-LN BERT the
input is the attention block's LayerNorm output, on a pre-LN decoder the normalised resid_mid).
A skip transcoder (Paulo et al. 2025) adds an affine skip path::

    pre   = x @ W_enc + b_enc                     # x: [..., d_in] MLP input (no b_dec centring)
    f     = topk(ReLU(pre), k)                      # [..., d_sae]
    y_hat = f @ W_dec + b_dec (+ x @ W_skip.T)      # [..., d_out] predicted MLP output

Shapes and names follow SAELens's ``transcoder`` / ``skip_transcoder``: W_enc [d_in, d_sae],
W_dec [d_sae, d_out], b_enc [d_sae], b_dec [d_out], W_skip [d_out, d_in].
Training (``train_transcoder``): on x and y divided by their scales (mean norm sqrt(d)), loss
``||y_hat - y||^2`` (mean over the batch), Adam, seeded epochs of ``randperm``, decoder rows
renormalised after each step; the scales are folded into the weights at the end (decoder rows
then have norm sy, the output scale). The skip path starts at the
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
from sae.sites import hook_for

KINDS = ("transcoder", "skip_transcoder")
ENC_INIT_NORM = 0.1


@dataclass(frozen=True, kw_only=True)
class TranscoderConfig:
    """A TopK (skip) transcoder of block ``layer``: ``d_in`` -> ``d_sae`` latents -> ``d_out``."""

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

    def __post_init__(self) -> None:
        for name in ("d_in", "d_out", "d_sae", "batch_size", "n_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"transcoder {name}={v!r}: must be a positive integer; pass {name} >= 1")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= self.d_sae:
            raise ConfigError(f"transcoder k={self.k!r}: must be an integer 1 <= k <= d_sae={self.d_sae}; "
                              "pass e.g. k=32")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"transcoder lr={self.lr!r}: must be a finite number > 0; pass e.g. lr=1e-3")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ConfigError(f"transcoder layer={self.layer!r}: must be an integer >= 0")

    @property
    def kind(self) -> str:
        return KINDS[int(self.skip)]

    @property
    def hook_in(self) -> str:
        return hook_for("mlp_in", self.layer)

    @property
    def hook_out(self) -> str:
        return hook_for("mlp_out", self.layer)

    @property
    def steps(self) -> int:
        return -(-self.n_tokens // self.batch_size)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "architecture": self.kind, "hook_name": self.hook_in, "hook_name_out": self.hook_out}


class Transcoder(nn.Module):
    """A TopK transcoder (``cfg.skip``: with the skip path). Initialisation (seeded): decoder rows
    random unit directions, encoder columns random directions of norm ``ENC_INIT_NORM``, biases zero,
    W_skip zero (``fit_init`` sets b_dec and W_skip from data)."""

    def __init__(self, cfg: TranscoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
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

    def _check(self, x: torch.Tensor, width: int, what: str) -> None:
        if x.shape[-1] != width:
            raise ShapeError(f"transcoder {what} has last dimension {x.shape[-1]}, expected {width} "
                             f"({self.cfg.hook_in} -> {self.cfg.hook_out}); pass the MLP input of that block")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents f [..., d_sae]: the top k of ReLU(x W_enc + b_enc) per token, the rest 0."""
        self._check(x, self.cfg.d_in, "input")
        pre = (x.to(self.W_enc.dtype) @ self.W_enc + self.b_enc).relu()
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


def train_transcoder(x: torch.Tensor, y: torch.Tensor, cfg: TranscoderConfig, *,
                     progress: Any = None) -> TranscoderResult:
    """Train a (skip) transcoder on MLP inputs ``x`` [tokens, d_in] and outputs ``y`` [tokens, d_out]
    for ``cfg.steps`` Adam steps of ``cfg.batch_size`` tokens (epoch e visits ``randperm(n, seed + e)``)."""
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
        f = tc.encode(xb)
        y_hat = tc.decode(f, xb)
        loss = ((y_hat - yb) ** 2).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
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


__all__ = ["KINDS", "Splice", "Transcoder", "TranscoderConfig", "TranscoderResult", "least_squares_skip", "nmse",
           "train_transcoder"]
