"""One trained probe as stored (``mmoe.probe``): its settings, how it is trained, how it is read back.

A probe entry is keyed by the dataset fingerprint and ``{"probe": ProbeClassifier.params(),
"data_id": ..., "data": feature set name}``; it holds the probe's state arrays (weights,
BatchNorm statistics, feature scaling, losses) and its accuracies. Training runs on the run's
device; the state is stored as CPU numpy, and a probe read back is rebuilt on the device asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from analysis.experts.data import FeatureSubject, data_id
from analysis.run import RunContext
from analysis.store import Result
from probes.training import FeatureSet, ProbeClassifier

# The single-layer linear probe converges slowly at the MLP's lr 2e-3; at 1e-2 it matches
# sklearn's LogisticRegression on digits (0.952 test accuracy, same split).
LINEAR_PROBE_LR = 1e-2
META_COLUMNS = ("layer_params", "budget", "rank", "n_params", "test_accuracy", "train_accuracy", "seconds")


def probe_settings(probe: dict[str, Any]) -> dict[str, Any]:
    """``ProbeClassifier`` constructor arguments, validated (ConfigError) with the defaults filled in."""
    return ProbeClassifier(**probe).params()


@dataclass(frozen=True, kw_only=True, eq=False)
class ProbeParams:
    """Store params of one probe on one feature set (``probe``: full ``ProbeClassifier.params()``)."""

    probe: dict[str, Any]
    data_id: str
    data: str

    @classmethod
    def of(cls, fs: FeatureSet, probe: dict[str, Any]) -> ProbeParams:
        return cls(probe=probe_settings(probe), data_id=data_id(fs.X, fs.y), data=fs.name)

    def store_params(self) -> dict[str, Any]:
        return {"probe": dict(self.probe), "data_id": self.data_id, "data": self.data}


@dataclass(frozen=True, eq=False)
class ProbeFit:
    """A stored probe: ``arrays`` (``ProbeClassifier.state_arrays()``) and ``meta`` (describe,
    test/train accuracy, n_params, layer_params, budget, rank, n_classes, seconds, classes)."""

    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]

    def classifier(self, probe: dict[str, Any], device: str | torch.device = "cpu") -> ProbeClassifier:
        """The fitted probe (``probe``: the params it was stored with) on ``device``."""
        clf = ProbeClassifier.from_state(probe, dict(self.arrays), int(self.meta["n_classes"]))
        return clf.to(device)


def compute_probe(subject: FeatureSubject, params: ProbeParams, ctx: RunContext) -> Result:
    """Train the probe on the train split of ``subject.features`` on ``ctx.device``."""
    fs = subject.features
    Xtr, ytr = fs.train
    Xte, yte = fs.test
    clf = ProbeClassifier(**params.probe).fit(Xtr, ytr, progress=ctx.report, device=ctx.device)
    meta = {"describe": clf.describe(), "test_accuracy": clf.score(Xte, yte),
            "train_accuracy": clf.score(Xtr, ytr), "n_params": int(clf.n_params_),
            "layer_params": int(clf.layer_params_), "budget": int(clf.budget_), "rank": clf.rank_,
            "n_classes": int(clf.n_classes_), "seconds": clf.fit_seconds_, "classes": list(fs.classes)}
    return Result(arrays=clf.state_arrays(), meta=meta)


def probe_from_result(result: Result) -> ProbeFit:
    return ProbeFit(dict(result.arrays), dict(result.meta))


def baseline_probes(layer: str, n_experts: int, *, gate: str, hidden: int | None, epochs: int, seed: int,
                    budget: int | None) -> list[dict[str, Any]]:
    """The probes ``mmoe train`` compares: the linear probe, the parameter-matched linear layer (only
    with a hidden layer) and the MMoE probe."""
    common = {"epochs": epochs, "seed": seed}
    probes = [{"layer": "linear", "hidden": None, **common, "lr": LINEAR_PROBE_LR},
              {"layer": "linear", "hidden": hidden, **common},
              {"layer": layer, "n_experts": n_experts, "hidden": hidden, "gate": gate, "budget": budget, **common}]
    return probes if hidden is not None else [probes[0], probes[2]]
