"""The work behind "sae-groundtruth" (``sae.eval_pipeline`` registers it): train an SAE of one
architecture on synthetic activations (``sae.synthetic``) and score it against the truth.

One run, exactly:

1. ``sample(spec, n_train, seed=1)`` trains (float32 rows) and ``sample(spec, n_eval, seed=2)`` is
   held out; both are functions of the spec, so every architecture sees the same data.
2. ``sae.train.train_sae`` trains an ``SAEConfig(d_in=spec.d_in, d_sae=..., architecture=...,
   **fields)`` (the SAE's public training entry point: any architecture ``sae.config`` supports).
3. On the held-out samples: ``sae.metrics.reconstruction_metrics`` (L0, NMSE, both explained
   variances, cosine, dead/dense, against the noisy input x), and ``sae.ground_truth.score`` on
   ``W_dec`` and ``encode(x)`` against the dictionary and the true coefficients.

Stored: a table with one row per true feature (role, frequency, max cosine, matched latent and
cosine, latents aligned, shrinkage ratio), arrays (the SAE's parameters by name, latent density),
meta (metrics, config, spec). Subject: ``synthetic_fingerprint(spec)``, no model.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from analysis.errors import ConfigError
from analysis.run import RunContext, Subject
from analysis.store import Result, canonical_json
from sae import ground_truth as gt
from sae.synthetic import SyntheticSpec, dictionary, sample

TRAIN_SEED, EVAL_SEED = 1, 2


def synthetic_fingerprint(spec: SyntheticSpec) -> str:
    """Store subject of a synthetic setting: "synthetic-" + 16 hex digits of its canonical JSON."""
    return "synthetic-" + hashlib.blake2b(canonical_json(spec.store_params()).encode(), digest_size=8).hexdigest()


def default_matryoshka_widths(d_sae: int) -> tuple[int, ...]:
    """Prefix widths of a ground-truth Matryoshka SAE: d_sae/8, d_sae/2, d_sae (the config's own example)."""
    return tuple(sorted({max(1, d_sae // 8), max(1, d_sae // 2), d_sae}))


# Sparsity of each architecture in a ground-truth run, stated once (``default_sparsity``): chosen so that every
# architecture's held-out L0 lands near the data's expected L0 (6.7 for the default SyntheticSpec) after the default
# 8M training tokens, so the table compares dictionary recovery at (nearly) the same sparsity. The TopK family
# (topk, batchtopk, matryoshka_batchtopk) takes k = the spec's expected L0, rounded (7); the others a coefficient,
# tuned on the default spec (measured 2026-12-06, README "Evaluating SAEs offline"):
# - relu l1 1.0: L0 7.46 (0.5: L0 12; 2.0 collapsed, NMSE 0.92 at 2M tokens);
# - gated l1 1.0: L0 7.07 (at 2M tokens 18.8, beside relu's 19 at the same l1: gated tracks relu);
# - jumprelu l0 0.08: L0 6.40. l0 0.2 gave L0 4.60 (-32%; its thresholds settled near sqrt(2 l0), median 0.63),
#   l0 0.13 gave 5.34 (-21%); L0 ~ l0^-0.35 through those two points puts 6.7 near l0 0.07. (Lowering the l0 0.2
#   SAE's thresholds alone predicted 0.13: the dictionary moves with the coefficient.) The initial threshold 0.1
#   (SAEConfig's is 0.01) starts nearer the end point: at 2M tokens the thresholds had reached a median 0.40.
# On another spec the coefficients are a starting point, not a match: pass k / l1_coefficient / l0_coefficient.
GT_SPARSITY: dict[str, dict[str, float]] = {
    "relu": {"l1_coefficient": 1.0},
    "gated": {"l1_coefficient": 1.0},
    "jumprelu": {"l0_coefficient": 0.08, "jumprelu_init_threshold": 0.1},
}


def default_sparsity(architecture: str, spec: SyntheticSpec) -> dict[str, Any]:
    """The sparsity fields of a default ground-truth run of ``architecture`` on ``spec`` (``GT_SPARSITY``):
    ``{"k": round(spec.expected_l0)}`` (at least 1) for an architecture that takes k, the tuned coefficients for
    relu, gated and jumprelu, ``{}`` for an architecture without either (its ``SAEConfig`` defaults)."""
    from sae.config import K_ARCHITECTURES

    if architecture in K_ARCHITECTURES:
        return {"k": max(1, round(spec.expected_l0))}
    return dict(GT_SPARSITY.get(architecture, {}))


def architecture_fields(architecture: str, *, k: int | None = None, l1_coefficient: float | None = None,
                        extra: dict | None = None, d_sae: int | None = None) -> dict[str, Any]:
    """The architecture-specific ``SAEConfig`` fields of a ground-truth run.

    ``k`` goes to every architecture that accepts it (topk, batchtopk, matryoshka_batchtopk),
    ``l1_coefficient`` to relu and gated; any other field through ``extra``; a matryoshka SAE of width
    ``d_sae`` gets ``default_matryoshka_widths`` unless ``extra`` names its widths. Unknown architectures get their
    training defaults (``sae.config.TrainSettings``), so a newly registered architecture is scored
    without a change here. Raises ConfigError (from the config's own checks) for a bad field."""
    from sae.config import ARCHITECTURES, L1_ARCHITECTURES, TrainSettings

    if architecture not in ARCHITECTURES:
        raise ConfigError(f"architecture {architecture!r} is unknown; sae.config supports {', '.join(ARCHITECTURES)}")
    fields = dict(extra or {})
    if architecture == "matryoshka_batchtopk" and d_sae is not None:
        fields.setdefault("matryoshka_widths", default_matryoshka_widths(int(d_sae)))
    if architecture in L1_ARCHITECTURES and l1_coefficient is not None:
        fields.setdefault("l1_coefficient", float(l1_coefficient))
    own_fields = ("k", "l1_coefficient")
    rest = {n: v for n, v in fields.items() if n not in own_fields}  # e.g. matryoshka_widths
    if k is not None and architecture != "relu":
        try:
            TrainSettings(architecture=architecture, k=k, extra=rest)
            fields.setdefault("k", int(k))
        except ConfigError:  # this architecture takes no k
            pass
    try:
        defaults = TrainSettings(architecture=architecture, extra=rest,
                                 **{n: v for n, v in fields.items() if n in own_fields}).sae_fields()
    except ConfigError:
        defaults = {}
    own = {n: v for n, v in defaults.items() if n not in ("n_tokens", "batch_size", "lr", "seed", "dtype")}
    return {**own, **fields, "architecture": architecture}


@dataclass(frozen=True, eq=False, kw_only=True)
class GroundTruthJob:
    """One ground-truth run's settings: what goes into the store key."""

    spec: SyntheticSpec
    sae_fields: dict  # SAEConfig fields except d_in (architecture, d_sae, k / l1, n_tokens, batch_size, lr, seed)
    n_train: int = 100_000
    n_eval: int = 20_000
    thresholds: dict = field(default_factory=lambda: {"threshold": gt.THRESHOLD, "absorb_fraction": gt.ABSORB_FRACTION,
                                                      "split_tau": gt.SPLIT_TAU})

    def __post_init__(self) -> None:
        for name in ("n_train", "n_eval"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}={v!r} must be an integer >= 1 (synthetic samples); pass e.g. {name}=20000")
        self.config()  # SAEConfig's checks, before any sample is drawn

    def config(self) -> Any:
        from sae.config import SAEConfig

        return SAEConfig(d_in=self.spec.d_in, **self.sae_fields)

    def store_params(self) -> dict:
        return {"spec": self.spec.store_params(), "sae": dict(sorted(self.sae_fields.items())),
                "n_train": self.n_train, "n_eval": self.n_eval, "thresholds": dict(self.thresholds)}


def feature_roles(spec: SyntheticSpec) -> np.ndarray:
    """[n_features] "parent" | "child" | "correlated" | "independent"."""
    roles = np.full(spec.n_features, "independent", dtype=object)
    roles[spec.parents] = "parent"
    for p in spec.parents:
        roles[spec.children(p)] = "child"
    roles[spec.correlated_pairs.ravel()] = "correlated"
    return roles


def compute_groundtruth(subject: Subject, job: GroundTruthJob, ctx: RunContext) -> Result:
    """Train on synthetic samples, score against the truth (module docstring)."""
    from sae.metrics import reconstruction_metrics
    from sae.model import sae_on
    from sae.train import train_sae

    spec, cfg = job.spec, job.config()
    ctx.tick(0, 3, f"sampling {job.n_train} + {job.n_eval} synthetic activations")
    train = sample(spec, job.n_train, seed=TRAIN_SEED)
    held = sample(spec, job.n_eval, seed=EVAL_SEED)
    ctx.tick(1, 3, f"training a {cfg.architecture} SAE")
    result = train_sae(train.x.astype(np.float32), cfg, progress=ctx.sub("train"), device=ctx.device)
    sae = result.sae
    ctx.tick(2, 3, "scoring against the true dictionary")
    x = torch.from_numpy(held.x.astype(np.float32))
    rec = reconstruction_metrics(sae_on(sae, ctx.device), x)
    with torch.no_grad():
        codes = torch.cat([sae_on(sae, ctx.device).encode(x[s:s + 8192].to(ctx.device)).cpu()
                           for s in range(0, len(x), 8192)]).double().numpy()
    W_dec = sae.W_dec.detach().double().numpy()
    D = dictionary(spec)
    scores = gt.score(W_dec, D, codes, held.coefficients, spec.parents, [spec.children(p) for p in spec.parents],
                      **job.thresholds)
    r = scores.recovery
    table = pd.DataFrame({"feature": np.arange(spec.n_features), "role": feature_roles(spec).astype(str),
                          "probability": spec.probabilities(), "max_cosine": r.max_cosine,
                          "matched_latent": r.matched_latent, "matched_cosine": r.matched_cosine,
                          "recovered": r.recovered, "n_split": r.n_split, "shrinkage": scores.shrinkage.ratio})
    arrays = {f"param.{n}": p.detach().cpu().float().numpy() for n, p in sae.state_dict().items()}
    arrays["density"] = np.asarray(rec.density, dtype=np.float64)
    arrays["absorption"] = np.asarray(scores.absorption.absorption)
    metrics = {**rec.scalars(), **scores.scalars(), "expected_l0": spec.expected_l0,
               "train_seconds": result.seconds, "train_steps": result.steps}
    ctx.tick(3, 3, "done")
    return Result(table, arrays, {"metrics": metrics, "cfg": cfg.to_dict(), "spec": spec.store_params(),
                                  "architecture": cfg.architecture, "n_train": job.n_train, "n_eval": job.n_eval})


@dataclass(frozen=True, eq=False)
class GroundTruthResult:
    """A stored ground-truth run: ``metrics`` (reconstruction + recovery scalars), ``features`` (one row
    per true feature), ``params`` (the SAE's parameters by name), ``density``, ``meta``."""

    metrics: dict
    features: pd.DataFrame
    params: dict
    density: np.ndarray
    absorption: np.ndarray  # [n_parents]
    meta: dict

    @property
    def architecture(self) -> str:
        return str(self.meta.get("architecture", ""))

    @property
    def spec(self) -> SyntheticSpec:
        return SyntheticSpec(**self.meta["spec"])

    def row(self) -> dict:
        """One line of the comparison table."""
        from sae.config import L1_ARCHITECTURES, config_default

        c, arch = self.meta.get("cfg", {}), self.architecture
        return {"architecture": arch, "d_sae": c.get("d_sae"), "k": c.get("k"),
                "l1_coefficient": c.get("l1_coefficient") if arch in L1_ARCHITECTURES else None,
                "l0_coefficient": c.get("l0_coefficient", config_default("l0_coefficient")) if arch == "jumprelu"
                else None, **self.metrics}


def groundtruth_from_result(result: Result) -> GroundTruthResult:
    arrays = result.arrays
    params = {n.split(".", 1)[1]: np.asarray(v) for n, v in arrays.items() if n.startswith("param.")}
    return GroundTruthResult(dict(result.meta.get("metrics", {})), result.table, params,
                             np.asarray(arrays["density"]), np.asarray(arrays["absorption"]), dict(result.meta))


L0_TOLERANCE = 0.15  # a run's sparsity matches the data's when |L0 / expected L0 - 1| <= this


def ranked(table: pd.DataFrame, tolerance: float = L0_TOLERANCE) -> pd.DataFrame:
    """``table`` (rows of ``GroundTruthResult.row``: ``l0``, ``expected_l0``, ``mcc``, ``nmse``) with
    ``l0_matched`` (|L0 / expected L0 - 1| <= ``tolerance``) and ``rank`` (1 = best) added; rows keep their order.

    The ranking: runs at matched L0 first (recovery is only comparable at the same sparsity), then MCC rounded to
    0.01, higher first (differences below that are not read as a ranking), then NMSE, lower first; a NaN sorts last."""
    out = table.copy()
    if out.empty:
        return out.assign(l0_matched=pd.Series(dtype=bool), rank=pd.Series(dtype=int))
    ratio = out["l0"].astype(float) / out["expected_l0"].astype(float)
    out["l0_matched"] = (ratio - 1).abs() <= tolerance
    key = pd.DataFrame({"unmatched": ~out["l0_matched"],
                        "mcc": -out["mcc"].astype(float).round(2).fillna(-np.inf),
                        "nmse": out["nmse"].astype(float).fillna(np.inf)}, index=out.index)
    order = key.sort_values(["unmatched", "mcc", "nmse"], kind="stable").index
    out["rank"] = pd.Series(np.arange(1, len(out) + 1), index=order).reindex(out.index).astype(int)
    return out
