"""Evaluation of an SAE: reconstruction, sparsity and loss recovered.

Definitions (x, x_hat: [tokens, d_in]; mu = per-dimension mean of x over the eval tokens):

- ``l0``: mean number of active (> 0) latents per token.
- ``mse``: mean over tokens of ||x - x_hat||^2.
- ``nmse``: sum ||x - x_hat||^2 / sum ||x - mu||^2 (MSE relative to predicting the mean;
  Gao et al. 2024).
- Explained variance, two definitions, both reported under names that say which:

  - ``explained_variance_saelens`` = 1 - nmse: SAELens's ``explained_variance`` (6.x,
    ``sae_lens/evals.py`` ``ExplainedVarianceCalculator``: 1 - E||x - x_hat||^2 / (E||x||^2 -
    ||E x||^2), every token weighted equally). Compare this one with SAELens's numbers.
  - ``explained_variance_sklearn``: 1 - sum_d Var_t(x_d - x_hat_d) / sum_d Var_t(x_d), the
    residual's variance around its own per-dimension mean (sklearn's
    ``explained_variance_score(..., multioutput="variance_weighted")``). It ignores a constant
    offset of the reconstruction, so it is >= the SAELens value; they differ by the squared mean
    residual, sum_d (mean_t e_d)^2, over sum_d Var_t(x_d).

  Stored results from before the split hold the sklearn value under ``explained_variance``;
  ``upgrade_scalars`` renames it and derives the SAELens value from ``nmse``. Older SAELens
  divided by ||x||^2 instead (variance around zero), which flatters activations with a large
  mean; that number is ``explained_variance_around_zero``, for comparison only.
- ``cosine``: mean over tokens of cos(x, x_hat) (tokens with x = 0 or x_hat = 0 count 0).
- feature density: fraction of tokens on which a latent is > 0; ``dead_fraction``: latents
  with density 0; ``dense_fraction``: density > ``dense_threshold`` (default 0.1).
- KL recovered = (KL_zero - KL_sae) / KL_zero: the mean KL divergence of the model's prediction
  with the reconstruction (or zeros) spliced into hook_z from the clean one (``sae.lm_kl``;
  SAEBench's ``kl_div_score``); ``kl_sae`` and ``kl_zero`` are stored beside it.
- loss recovered = (L_zero - L_sae) / (L_zero - L_clean), with hook_z replaced by the SAE's
  reconstruction (L_sae) or by zeros (L_zero, zero-ablation baseline). The model-specific loss
  comes from a ``loss_fn(patch)`` callable (``sae.lm_loss`` builds them): it returns the mean
  loss with hook_z replaced by ``patch(z)`` ([batch, pos, n_heads, d_head] -> same shape), or
  the clean loss for ``patch=None``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from analysis.errors import ShapeError
from sae.model import SAE

Patch = Callable[[torch.Tensor], torch.Tensor]
LossFn = Callable[[Patch | None], float]
DENSITY_EDGES = np.linspace(-10.0, 0.0, 51)  # log10 density histogram bins (width 0.2)


@dataclass(frozen=True, eq=False)
class ReconstructionMetrics:
    """Reconstruction and sparsity of an SAE on held-out activations (float64 accumulations)."""

    n_tokens: int
    l0: float
    mse: float
    nmse: float
    explained_variance_saelens: float  # 1 - nmse, as SAELens reports "explained_variance"
    explained_variance_sklearn: float  # variance-weighted, around the residual's mean
    explained_variance_around_zero: float  # the old, biased definition; for comparison only
    cosine: float
    dead_fraction: float
    dense_fraction: float
    dense_threshold: float
    density: np.ndarray  # [d_sae] firing frequency, read-only
    density_hist: np.ndarray  # [50] counts of log10(density + 1e-10) in DENSITY_EDGES bins

    @property
    def log10_density(self) -> np.ndarray:
        """log10(density + 1e-10), as SAELens's sparsity.safetensors stores it."""
        return np.log10(self.density + 1e-10).astype(np.float32)

    def scalars(self) -> dict[str, float]:
        d = asdict(self)
        for k in ("density", "density_hist"):
            d.pop(k)
        return d


@dataclass(frozen=True, slots=True)
class LossRecovered:
    """Model loss clean, with the SAE spliced in, and with hook_z zero-ablated."""

    clean: float
    sae: float
    zero: float
    recovered: float  # (zero - sae) / (zero - clean); nan when zero == clean


def recovered_fraction(clean: float, sae: float, zero: float) -> float:
    """(zero - sae) / (zero - clean): 1 when the SAE loses nothing, 0 when it is no better than zeros."""
    denom = zero - clean
    return (zero - sae) / denom if denom != 0 and math.isfinite(denom) else float("nan")


def sae_patch(sae: SAE) -> Patch:
    """hook_z [..., n_heads, d_head] -> the SAE's reconstruction in the same shape and dtype."""

    heads = getattr(sae.cfg, "site", "hook_z") == "hook_z"  # hook_z arrives [..., n_heads, d_head]

    def patch(z: torch.Tensor) -> torch.Tensor:
        flat = z.reshape(*z.shape[:-2], -1) if heads else z
        if flat.shape[-1] != sae.cfg.d_in:
            raise ShapeError(f"hook_z flattens to width {flat.shape[-1]} but the SAE has d_in={sae.cfg.d_in}; "
                             f"use an SAE trained on this model's {sae.cfg.hook_name}")
        with torch.no_grad():
            return sae(flat.float()).to(z.dtype).reshape(z.shape)

    return patch


def zero_patch(z: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(z)


def loss_recovered(sae: SAE, loss_fn: LossFn) -> LossRecovered:
    """Evaluate ``loss_fn`` clean, with the SAE's reconstruction and with zeros at hook_z."""
    clean = float(loss_fn(None))
    with_sae = float(loss_fn(sae_patch(sae)))
    zero = float(loss_fn(zero_patch))
    return LossRecovered(clean, with_sae, zero, recovered_fraction(clean, with_sae, zero))


@torch.no_grad()
def reconstruction_metrics(sae: SAE, acts: Any, *, chunk: int = 4096,
                           dense_threshold: float = 0.1) -> ReconstructionMetrics:
    """Metrics of ``sae`` on activations ``acts`` ([tokens, d_in] tensor/array or ActivationCache);
    definitions in the module docstring. Raises ShapeError when the width is not the SAE's d_in.
    The SAE encodes and decodes on its device; the float64 sums run on CPU."""
    from sae.train import as_activations

    src = acts.acts if hasattr(acts, "acts") and hasattr(acts, "meta") else acts
    n, d_in = int(src.shape[0]), sae.cfg.d_in
    dev = sae.W_enc.device
    if len(src.shape) != 2 or src.shape[1] != d_in:
        raise ShapeError(f"activations {tuple(src.shape)} do not fit the SAE (d_in={d_in}, {sae.cfg.hook_name}); "
                         "evaluate on activations harvested at the SAE's hook")
    if n == 0:
        raise ShapeError("no activations to evaluate; harvest a non-empty corpus")

    def rows(s: int) -> torch.Tensor:
        return as_activations(src[s:s + chunk], d_in)

    mean = torch.zeros(d_in, dtype=torch.float64)
    for s in range(0, n, chunk):
        mean += rows(s).to(torch.float64).sum(0)
    mean /= n
    sq_err = sq_dev = sq_x = cos_sum = 0.0
    err_sum = torch.zeros(d_in, dtype=torch.float64)
    err_sq = torch.zeros(d_in, dtype=torch.float64)
    fires = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    for s in range(0, n, chunk):
        x = rows(s)
        f = sae.encode(x.to(dev))
        x_hat = sae.decode(f).cpu()
        f = f.cpu()
        active = f > 0
        fires += active.sum(0, dtype=torch.float64)
        e = (x - x_hat).to(torch.float64)
        x64 = x.to(torch.float64)
        sq_err += float((e ** 2).sum())
        sq_dev += float(((x64 - mean) ** 2).sum())
        sq_x += float((x64 ** 2).sum())
        err_sum += e.sum(0)
        err_sq += (e ** 2).sum(0)
        nx, nh = x.norm(dim=1), x_hat.norm(dim=1)
        ok = (nx > 0) & (nh > 0)
        cos_sum += float(((x * x_hat).sum(1)[ok] / (nx[ok] * nh[ok])).to(torch.float64).sum())
    var_err = float((err_sq / n - (err_sum / n) ** 2).clamp_min(0).sum())
    var_x = sq_dev / n
    density = (fires / n).numpy()
    density.flags.writeable = False
    hist, _ = np.histogram(np.log10(density + 1e-10), bins=DENSITY_EDGES)
    hist.flags.writeable = False
    nan = float("nan")
    return ReconstructionMetrics(
        n_tokens=n, l0=float(fires.sum()) / n, mse=sq_err / n,
        nmse=sq_err / sq_dev if sq_dev > 0 else nan,
        explained_variance_saelens=1 - sq_err / sq_dev if sq_dev > 0 else nan,
        explained_variance_sklearn=1 - var_err / var_x if var_x > 0 else nan,
        explained_variance_around_zero=1 - sq_err / sq_x if sq_x > 0 else nan,
        cosine=cos_sum / n, dead_fraction=float((density == 0).mean()),
        dense_fraction=float((density > dense_threshold).mean()), dense_threshold=dense_threshold,
        density=density, density_hist=hist)


def upgrade_scalars(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """A stored metrics dict with today's names: the ambiguous ``explained_variance`` of results
    stored before the split becomes ``explained_variance_sklearn`` (what it held), and
    ``explained_variance_saelens`` is derived as 1 - ``nmse`` when missing."""
    out = dict(metrics)
    if "explained_variance" in out:
        out.setdefault("explained_variance_sklearn", out.pop("explained_variance"))
    if "explained_variance_saelens" not in out and "nmse" in out:
        nmse = out["nmse"]
        out["explained_variance_saelens"] = 1 - float(nmse) if isinstance(nmse, (int, float)) else float("nan")
    return out


@dataclass(frozen=True, eq=False)
class SAEEval:
    """Everything stored per SAE under "sae-eval"."""

    reconstruction: ReconstructionMetrics
    loss: LossRecovered | None  # None when no loss function was given
    kl: Any = None  # sae.lm_kl.KLRecovered (sae, zero, recovered, n_positions), None when not measured

    def scalars(self) -> dict[str, float]:
        out = self.reconstruction.scalars()
        if self.loss is not None:
            out.update({"loss_clean": self.loss.clean, "loss_sae": self.loss.sae, "loss_zero": self.loss.zero,
                        "loss_recovered": self.loss.recovered})
        if self.kl is not None:
            out.update({"kl_sae": self.kl.sae, "kl_zero": self.kl.zero, "kl_recovered": self.kl.recovered})
        return out


def evaluate(sae: SAE, acts: Any, loss_fn: LossFn | None = None, *, dense_threshold: float = 0.1,
             kl_fn: Callable[[Patch], Any] | None = None) -> SAEEval:
    """Reconstruction metrics on ``acts``; with ``loss_fn``, loss recovered; with ``kl_fn`` (the SAE's
    patch -> ``sae.lm_kl.KLRecovered``), the KL divergence recovered."""
    rec = reconstruction_metrics(sae, acts, dense_threshold=dense_threshold)
    return SAEEval(rec, loss_recovered(sae, loss_fn) if loss_fn is not None else None,
                   kl_fn(sae_patch(sae)) if kl_fn is not None else None)
