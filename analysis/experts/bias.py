"""The bias-correction demo as stored (``mmoe.bias``): an MMoE probe trained with one class
under-represented, the experts most responsible for that class's errors scaled down
(``analysis.experts.specialisation.bias_correction``), per-class accuracy before and after.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from analysis.errors import ConfigError
from analysis.experts import specialisation as ex
from analysis.experts.data import DataSpec, FeatureSubject
from analysis.run import RunContext
from analysis.store import Result
from probes.training import FeatureSet, ProbeClassifier


@dataclass(frozen=True, eq=False)
class BiasDemo:
    """``analysis.experts.specialisation.BiasCorrection`` plus the settings and class names of the run."""

    target: str
    experts: tuple[int, ...]
    table: pd.DataFrame  # class, n_samples, before, after, change
    accuracy_before: float
    accuracy_after: float
    n_errors: int
    meta: dict


def target_index(target: str | int, classes: tuple[str, ...]) -> int:
    """Index of the class ``target`` (a name, or an index as int or digit string); ConfigError otherwise."""
    if isinstance(target, str) and not target.lstrip("-").isdigit():
        if target not in classes:
            raise ConfigError(f"target class {target!r} is not one of {', '.join(classes)}")
        return classes.index(target)
    t = int(target)
    if not 0 <= t < len(classes):
        raise ConfigError(f"target class {t} is not in [0, {len(classes)})")
    return t


def check_keep(keep: float) -> None:
    if not 0 < keep <= 1:
        raise ConfigError(f"keep={keep}: the share of the target's training samples must be in (0, 1]")


@dataclass(frozen=True, kw_only=True, eq=False)
class BiasParams:
    """Store params of one demo: the probe (full ``ProbeClassifier.params()``), the data, the target
    class index, the share of its training samples kept, how many experts are scaled and by what."""

    probe: dict[str, Any]
    data: DataSpec
    target: int
    keep: float
    n_scaled: int
    scale: float
    data_id: str

    def store_params(self) -> dict[str, Any]:
        return {"probe": dict(self.probe), "data": self.data.params(), "target": self.target, "keep": self.keep,
                "n_scaled": self.n_scaled, "scale": self.scale, "data_id": self.data_id}


def biased_split(fs: FeatureSet, target: int, keep: float, seed: int) -> FeatureSet:
    """``fs`` with all but a random ``keep`` share of ``target``'s training samples moved out of the train
    split (they are not trained on, and are not test samples either: ``is_test`` is the complement of train)."""
    rng = np.random.default_rng(seed)
    train = ~fs.is_test & ((fs.y != target) | (rng.random(len(fs.y)) < keep))
    return FeatureSet(fs.name, fs.X, fs.y, ~train, fs.classes, fs.texts, fs.images)


def compute_bias(subject: FeatureSubject, params: BiasParams, ctx: RunContext) -> Result:
    """Train on the biased split (on ``ctx.device``), choose experts on one half of the test split and
    evaluate the scaling on the other half."""
    fs = subject.features
    t, n_experts = params.target, int(params.probe["n_experts"])
    biased = biased_split(fs, t, params.keep, params.data.seed)
    test = np.flatnonzero(fs.is_test)
    sel, ev = test[0::2], test[1::2]
    clf = ProbeClassifier(**params.probe).fit(*biased.train, progress=ctx.report, device=ctx.device)
    b = ex.bias_correction(lambda s: clf.logits(fs.X[sel], s), fs.y[sel], lambda s: clf.logits(fs.X[ev], s),
                           fs.y[ev], n_experts, len(fs.classes), target=t, n_scaled=params.n_scaled, scale=params.scale)
    table = b.table.assign(**{"class": [fs.classes[c] for c in b.table["class"]]})
    return Result(table=table, arrays={"score": b.score, "responsibility": b.responsibility, "harm": b.harm},
                  meta={"target": fs.classes[t], "experts": list(b.experts), "n_errors": b.n_errors,
                        "accuracy_before": b.accuracy_before, "accuracy_after": b.accuracy_after,
                        "n_select": len(sel), "n_eval": len(ev), "n_experts": n_experts, "keep": params.keep,
                        "scale": params.scale, "n_scaled": params.n_scaled, "data": params.data.params(),
                        "n_train": int((~biased.is_test).sum())})


def bias_from_result(result: Result) -> BiasDemo:
    m = dict(result.meta)
    return BiasDemo(m["target"], tuple(m["experts"]), result.table, m["accuracy_before"], m["accuracy_after"],
                    m["n_errors"], m)
