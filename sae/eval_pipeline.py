"""SAE evaluation that runs offline on CPU, through the runner: ground truth and sparse probing.

    >>> from app import api
    >>> r = api.sae_groundtruth("topk")                 # train on synthetic data, score against the truth
    >>> r.metrics["mcc"], r.metrics["absorption"]
    >>> api.sae_groundtruth_table()                     # every architecture sae.config supports, one row each
    >>> api.sae_probe(key, task="package")              # k-sparse probes on a stored SAE's latents

Stored analyses (declared once here; names, code versions and params are store keys):

- ``GROUNDTRUTH`` ("sae-groundtruth"): an SAE trained on ``sae.synthetic`` activations and scored by
  ``sae.ground_truth`` (``sae.groundtruth_job``); subject ``synthetic-<hash of the spec>``, no model.
- ``PROBE`` ("sae-probe"): k-sparse probes on a stored SAE's latents against a probe on the raw
  activations (``sae.probe_job``); subject the SAE's model, params name the SAE key.

Reading back: ``stored_sae_groundtruth`` / ``stored_sae_probe`` (index rows, newest first),
``load_sae_groundtruth(key)`` / ``load_sae_probe(key)`` (NotStoredError when absent),
``find_sae_groundtruth(...)`` / ``find_sae_probe(...)`` (the result the same call would serve, or None).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from analysis import run as runner
from analysis.progress import Progress
from analysis.run import Analysis, StoreLike, register
from analysis.store import EntryInfo
from sae.groundtruth_job import (GT_SPARSITY, GroundTruthJob, GroundTruthResult, architecture_fields,
                                 compute_groundtruth, default_sparsity, groundtruth_from_result, ranked,
                                 synthetic_fingerprint)
from sae.probe_job import PROBE_TASKS, ProbeJob, ProbeResult, compute_probe, probe_from_result
from sae.synthetic import SyntheticSpec

GROUNDTRUTH = register(Analysis(name="sae-groundtruth", code_version="sae-groundtruth-1", compute=compute_groundtruth,
                                from_result=groundtruth_from_result, register_model=False,
                                doc="an SAE trained on synthetic activations, scored against the true dictionary"))
PROBE = register(Analysis(name="sae-probe", code_version="sae-probe-2", compute=compute_probe,
                          from_result=probe_from_result, register_model=False,
                          doc="k-sparse probes on an SAE's latents against a probe on the raw activations"))

# Ground-truth defaults: stated once (the API, the table and the CLI read them).
# n_tokens 8M: at 2M the relu SAE had not converged (L0 19, NMSE 0.45 at l1 = 1 against L0 7.5, NMSE 0.34 at 8M).
GT_DEFAULTS = {"n_train": 100_000, "n_eval": 20_000, "n_tokens": 8_000_000, "batch_size": 4096, "seed": 0}


def _gt_job(architecture: str, spec: SyntheticSpec | None, d_sae: int | None, k: int | None,
            l1_coefficient: float | None, n_train: int, n_eval: int, n_tokens: int, batch_size: int, seed: int,
            threshold: float, cfg_fields: dict) -> GroundTruthJob:
    from sae import ground_truth as gt

    spec = spec if spec is not None else SyntheticSpec()
    width = int(d_sae) if d_sae is not None else spec.n_features
    own = default_sparsity(architecture, spec)  # an unknown architecture: {}, then architecture_fields' error
    k_own, l1_own = own.pop("k", None), own.pop("l1_coefficient", None)
    fields = architecture_fields(architecture, k=k if k is not None else k_own,
                                 l1_coefficient=l1_coefficient if l1_coefficient is not None else l1_own,
                                 extra={**own, **cfg_fields}, d_sae=width)
    fields.update(d_sae=width, n_tokens=int(n_tokens), batch_size=int(batch_size), seed=int(seed))
    return GroundTruthJob(spec=spec, sae_fields=fields, n_train=n_train, n_eval=n_eval,
                          thresholds={"threshold": float(threshold), "absorb_fraction": gt.ABSORB_FRACTION,
                                      "split_tau": gt.SPLIT_TAU})


def sae_groundtruth(architecture: str = "topk", *, spec: SyntheticSpec | None = None, d_sae: int | None = None,
                    k: int | None = None, l1_coefficient: float | None = None,
                    n_train: int = GT_DEFAULTS["n_train"], n_eval: int = GT_DEFAULTS["n_eval"],
                    n_tokens: int = GT_DEFAULTS["n_tokens"], batch_size: int = GT_DEFAULTS["batch_size"],
                    seed: int = GT_DEFAULTS["seed"], threshold: float = 0.9, store: StoreLike = None,
                    refresh: bool = False, progress: Progress | None = None, device: str = "auto",
                    **cfg_fields: Any) -> GroundTruthResult:
    """Train an SAE of ``architecture`` on ``n_train`` samples of the synthetic setting ``spec``
    (default ``SyntheticSpec()``: 256 features in 64 dimensions) and score it on ``n_eval`` held-out
    samples: L0, NMSE, explained variances, and recovery of the true dictionary (MCC, mean max cosine,
    precision/recall at ``threshold``, absorption, splitting, shrinkage; ``sae.ground_truth``).

    Width ``d_sae`` (default: n_features); ``k`` (architectures that take one), ``l1_coefficient`` (relu, gated)
    and any other ``SAEConfig`` field as a keyword (e.g. ``l0_coefficient`` of jumprelu); left out, the
    architecture's default sparsity (``sae.groundtruth_job.default_sparsity``: k = the spec's expected L0, rounded;
    coefficients tuned so that L0 lands near it on the default spec). Settings are checked (ConfigError) before
    anything is sampled. Stored under "sae-groundtruth"; the same call is served from the store."""
    job = _gt_job(architecture, spec, d_sae, k, l1_coefficient, n_train, n_eval, n_tokens, batch_size, seed,
                  threshold, cfg_fields)
    return runner.run(GROUNDTRUTH, synthetic_fingerprint(job.spec), job, store=store, refresh=refresh,
                      progress=progress, device=device)


def sae_groundtruth_table(architectures: Sequence[str] | None = None, **settings: Any) -> pd.DataFrame:
    """``sae_groundtruth`` for every architecture in ``architectures`` (default: every one
    ``sae.config.ARCHITECTURES`` lists, so a newly added architecture is included), one row each
    (``GroundTruthResult.row``), in that order, with ``l0_matched`` and ``rank`` (``sae.groundtruth_job.ranked``:
    L0 within 15% of the data's expected L0 first, then MCC, then NMSE). ``settings``: ``sae_groundtruth``'s
    keywords; left out, each architecture runs at its default sparsity (``default_sparsity``: k = the expected L0
    for the TopK family, tuned coefficients for relu, gated and jumprelu)."""
    from sae.config import ARCHITECTURES

    archs = list(ARCHITECTURES if architectures is None else architectures)
    progress = settings.pop("progress", None)
    rows = []
    for i, arch in enumerate(archs):
        sub = None if progress is None else (lambda d, t, label, a=arch: progress(d, t, f"{a}: {label}"))
        rows.append(sae_groundtruth(arch, progress=sub, **settings).row())
    return ranked(pd.DataFrame(rows))


def find_sae_groundtruth(architecture: str = "topk", *, store: StoreLike = None, **settings: Any
                         ) -> GroundTruthResult | None:
    """The result ``sae_groundtruth(architecture, **settings)`` would serve, or None (never computes)."""
    names = ("spec", "d_sae", "k", "l1_coefficient", "n_train", "n_eval", "n_tokens", "batch_size", "seed",
             "threshold")
    given = {n: settings.pop(n) for n in names if n in settings}
    args = {"spec": None, "d_sae": None, "k": None, "l1_coefficient": None, "threshold": 0.9,
            **{n: GT_DEFAULTS[n] for n in ("n_train", "n_eval", "n_tokens", "batch_size", "seed")}, **given}
    job = _gt_job(architecture, args["spec"], args["d_sae"], args["k"], args["l1_coefficient"], args["n_train"],
                  args["n_eval"], args["n_tokens"], args["batch_size"], args["seed"], args["threshold"], settings)
    return runner.find(GROUNDTRUTH, synthetic_fingerprint(job.spec), job, store=store)


def stored_sae_groundtruth(fingerprint: str | None = None, store: StoreLike = None) -> list[EntryInfo]:
    """Index rows of the stored ground-truth runs (newest first; ``fingerprint``: one synthetic setting)."""
    return runner.stored(GROUNDTRUTH, fingerprint, store=store)


def load_sae_groundtruth(key: str, store: StoreLike = None) -> GroundTruthResult:
    """The stored ground-truth run with this key (or a unique 8+ character prefix); NotStoredError otherwise."""
    return runner.load(key, store=store, analysis=GROUNDTRUTH)


def groundtruth_rows(store: StoreLike = None) -> pd.DataFrame:
    """One row per stored ground-truth run from the index (no blob read): key, setting, architecture, the
    SAE's width and sparsity settings, and every metric."""
    rows = []
    for e in stored_sae_groundtruth(store=store):
        s = e.params.get("sae", {})
        rows.append({"key": e.key, "setting": e.fingerprint, "architecture": s.get("architecture"),
                     "d_sae": s.get("d_sae"), "k": s.get("k"),
                     "l1_coefficient": s.get("l1_coefficient") if s.get("architecture") in ("relu", "gated") else None,
                     "l0_coefficient": s.get("l0_coefficient") if s.get("architecture") == "jumprelu" else None,
                     **e.meta.get("metrics", {}), "created": pd.Timestamp(e.created, unit="s")})
    return pd.DataFrame(rows)


# -- sparse probing -----------------------------------------------------------------------------------------
def sae_probe(key: str, *, task: str = "package", ks: Sequence[int] = (1, 2, 5), per_class: int = 60,
              seed: int = 0, source: Any = None, store: StoreLike = None, refresh: bool = False,
              progress: Progress | None = None, device: str = "auto") -> ProbeResult:
    """k-sparse probes on the latents of the stored SAE ``key`` against a logistic probe on the raw
    activations (``sae.probing``), on an offline labelled task (``sae.probe_job.PROBE_TASKS``: "package"
    = which package a docstring comes from, "code" = source code vs docstring prose), ``per_class``
    texts per class, split 70/30 by ``seed``. Stored under "sae-probe"."""
    from sae.pipeline import load_sae

    ctx = runner.context(store=store, progress=progress, device=device, refresh=refresh)
    job = ProbeJob.checked(trained=None, task=task, ks=ks, per_class=per_class, seed=seed)  # before loading
    trained = load_sae(key, ctx.store)
    job = ProbeJob.checked(trained=trained, task=task, ks=ks, per_class=per_class, seed=seed, source=source)
    return runner.run(PROBE, trained.sae.cfg.source_fingerprint, job, ctx=ctx)


def find_sae_probe(key: str, *, task: str = "package", ks: Sequence[int] = (1, 2, 5), per_class: int = 60,
                   seed: int = 0, store: StoreLike = None) -> ProbeResult | None:
    """The result ``sae_probe`` with these arguments would serve, or None (never computes)."""
    from sae.results import resolve

    st = runner.open_store(store)
    entry = resolve(key, st, missing_ok=True)
    if entry is None:
        return None
    params = ProbeJob.params(entry.key, task, ks, per_class, seed)
    return runner.find(PROBE, entry.fingerprint, params, store=st)


def stored_sae_probe(fingerprint: str | None = None, store: StoreLike = None) -> list[EntryInfo]:
    """Index rows of the stored probe results (newest first)."""
    return runner.stored(PROBE, fingerprint, store=store)


def load_sae_probe(key: str, store: StoreLike = None) -> ProbeResult:
    """The stored probe result with this key; NotStoredError otherwise."""
    return runner.load(key, store=store, analysis=PROBE)


def probe_rows(store: StoreLike = None) -> pd.DataFrame:
    """One row per stored probing run from the index (no blob read): key, the probed SAE's key (``sae_key``),
    task, number of texts, and the mean accuracy of each probe ("sae k=1", ..., "raw")."""
    rows = [{"key": e.key, "sae_key": e.params.get("sae"), "task": e.params.get("task"),
             "n_texts": e.meta.get("n_texts"), **e.meta.get("summary", {}), "created": pd.Timestamp(e.created, unit="s")}
            for e in stored_sae_probe(store=store)]
    return pd.DataFrame(rows, columns=None if rows else ["key", "sae_key", "task", "n_texts", "created"])


__all__ = ["GROUNDTRUTH", "GT_DEFAULTS", "GT_SPARSITY", "PROBE", "PROBE_TASKS", "GroundTruthResult", "ProbeResult",
           "find_sae_groundtruth", "find_sae_probe", "groundtruth_rows", "load_sae_groundtruth", "load_sae_probe",
           "probe_rows", "sae_groundtruth", "sae_groundtruth_table", "sae_probe", "stored_sae_groundtruth",
           "stored_sae_probe"]
