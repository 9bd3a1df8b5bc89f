"""One MMoE's expert report (``mmoe.specialisation``) and the specialisation curve over expert
counts (``mmoe.curve``): their settings, how a report is computed from a trained probe, how the
curve's rows are assembled, and how both are read back from the store.

The maths is ``analysis.experts.specialisation``; this module turns it into stored results
(tables, arrays, JSON meta) and back into ``ExpertReport`` / ``MMoECurve``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from analysis.errors import ConfigError
from analysis.experts import specialisation as ex
from analysis.experts.data import DataSpec
from analysis.store import Result
from probes.training import FeatureSet, ProbeClassifier

DEFAULT_EXPERTS = (8, 16, 32, 64, 128, 256)
ANALYSIS_DEFAULTS = {"eval_on": "all", "top_k": 5, "load_threshold": 0.5, "min_flips": 3, "min_effect": 1.0,
                     "null_draws": 32}
SUMMARY_COLUMNS = ("mean_polysemanticity", "mean_null_polysemanticity", "n_experts_counted",
                   "mean_effect_polysemanticity", "mean_null_effect_polysemanticity", "n_experts_counted_effect",
                   "usage_entropy", "max_usage_entropy", "experts_loaded", "mean_active_experts", "mean_class_entropy")


def analysis_settings(overrides: dict[str, Any] | None) -> dict[str, Any]:
    """``ANALYSIS_DEFAULTS`` updated with ``overrides``; ConfigError naming an unknown setting."""
    settings = {**ANALYSIS_DEFAULTS, **(overrides or {})}
    if unknown := sorted(set(settings) - set(ANALYSIS_DEFAULTS)):
        raise ConfigError(f"unknown analysis setting(s) {unknown}; valid: {', '.join(ANALYSIS_DEFAULTS)}")
    return settings


def parse_experts(experts: int | str | Sequence[int]) -> tuple[int, ...]:
    """Sorted distinct expert counts from an int, a list or "8,16,32"; ConfigError otherwise."""
    if isinstance(experts, str):
        try:
            experts = [int(x) for x in experts.replace(" ", "").split(",") if x]
        except ValueError as exc:
            raise ConfigError(f"--experts {experts!r}: give comma-separated integers such as 8,16,32") from exc
    out = (int(experts),) if isinstance(experts, (int, np.integer)) else tuple(int(n) for n in experts)
    if not out or min(out) < 1:
        raise ConfigError(f"experts={out}: give at least one expert count, each >= 1")
    return tuple(sorted(set(out)))


def eval_split(fs: FeatureSet, eval_on: str) -> np.ndarray:
    """Indices of the samples the experts are analysed on: all, or the test split."""
    if eval_on == "all":
        return np.arange(len(fs.y))
    if eval_on == "test":
        return np.flatnonzero(fs.is_test)
    raise ConfigError(f"eval_on={eval_on!r}: choose all (train + test samples) or test")


# -- mmoe.specialisation: one MMoE's experts ----------------------------------------------------
@dataclass(frozen=True, eq=False)
class ExpertReport:
    """One MMoE probe's experts (``analysis.experts.specialisation.Specialisation`` as stored).

    ``experts``: one row per expert; ``expert_class`` and ``per_class_drop`` (N, C);
    ``examples``: one row per (expert, rank) top-activating sample (expert, rank, sample,
    gate, label, predicted, text); ``images`` (N, k, 8, 8) for digits else None; ``summary``
    and ``meta`` (accuracies, classes, settings).
    """

    n_experts: int
    classes: tuple[str, ...]
    experts: pd.DataFrame
    expert_class: np.ndarray
    per_class_drop: np.ndarray
    examples: pd.DataFrame
    images: np.ndarray | None
    summary: dict
    meta: dict

    def top_class(self, expert: int) -> str:
        """Name of the class with the largest mean gate coefficient of ``expert`` ("" when none)."""
        c = int(self.experts.set_index("expert").loc[int(expert), "top_class_by_gate"])
        return self.classes[c] if c >= 0 else ""

    def example_image(self, expert: int, rank: int, zoom: int = 8) -> np.ndarray:
        """The ``rank``-th top-activating image of ``expert``, (8 zoom, 8 zoom) in [0, 1], each pixel a
        zoom x zoom block (no interpolation). ConfigError when the report has no images."""
        if self.images is None:
            raise ConfigError("this report has no images (only the digits task has them); show the texts instead")
        return np.clip(np.kron(self.images[int(expert), int(rank)], np.ones((zoom, zoom))), 0.0, 1.0)


@dataclass(frozen=True, kw_only=True, eq=False)
class SpecialisationParams:
    """Store params of one MMoE's report: the probe (full ``ProbeClassifier.params()``), the data, the
    analysis settings (``ANALYSIS_DEFAULTS`` filled in)."""

    probe: dict[str, Any]
    data_id: str
    data: DataSpec
    analysis: dict[str, Any]

    def store_params(self) -> dict[str, Any]:
        return {"probe": dict(self.probe), "data_id": self.data_id, "data": self.data.params(),
                "analysis": dict(self.analysis)}


def report_result(clf: ProbeClassifier, fs: FeatureSet, params: SpecialisationParams,
                  probe_meta: dict[str, Any]) -> Result:
    """Gate statistics, top examples and ablations of the trained MMoE ``clf`` on its evaluation samples,
    as a store ``Result`` (the probe runs wherever ``clf`` is; ``ProbeClassifier.to``)."""
    settings = params.analysis
    idx = eval_split(fs, settings["eval_on"])
    X_eval, y_eval = fs.X[idx], fs.y[idx]
    s = ex.specialisation(clf.gates(X_eval), y_eval, len(fs.classes), lambda sc: clf.logits(X_eval, sc),
                          load_threshold=settings["load_threshold"], top_k=settings["top_k"],
                          min_flips=settings["min_flips"], min_effect=settings["min_effect"],
                          null_draws=settings["null_draws"], seed=params.data.seed)
    n_experts, k = s.top_index.shape
    rows = []
    for e in range(n_experts):
        for r in range(k):
            i = int(idx[s.top_index[e, r]])
            rows.append({"expert": e, "rank": r, "sample": i, "gate": float(s.top_value[e, r]),
                         "label": fs.classes[fs.y[i]],
                         "predicted": fs.classes[int(s.ablation.base_pred[s.top_index[e, r]])],
                         "text": fs.texts[i]})
    arrays = {"expert_class": s.expert_class, "per_class_drop": s.ablation.per_class_drop}
    if fs.images is not None:
        arrays["images"] = fs.images[idx[s.top_index]].astype(np.float32)
    meta = {"probe": probe_meta, "settings": settings, "data": params.data.params()}
    return Result(table=s.experts, arrays=arrays,
                  meta={**meta, "summary": s.summary, "examples": rows, "classes": list(fs.classes)})


def report_from_result(result: Result) -> ExpertReport:
    meta = dict(result.meta)
    return ExpertReport(int(meta["summary"]["n_experts"]), tuple(meta["classes"]), result.table,
                        np.array(result.arrays["expert_class"]), np.array(result.arrays["per_class_drop"]),
                        pd.DataFrame(meta.pop("examples")), np.array(result.arrays["images"])
                        if "images" in result.arrays else None, dict(meta["summary"]), meta)


# -- mmoe.curve: specialisation against the number of experts -----------------------------------
@dataclass(frozen=True, eq=False)
class MMoECurve:
    """Specialisation against the number of experts.

    ``table``: one row per expert count: n_experts, rank, layer_params, budget, accuracy
    (test split), the baselines' accuracies, mean_polysemanticity / mean_null_polysemanticity /
    n_experts_counted (flip-based), the effect-weighted versions, usage_entropy,
    experts_loaded, mean_active_experts, seconds. ``keys``: n_experts -> store key of the
    ``mmoe.specialisation`` entry; ``meta``: data, probe settings, baselines; ``key``: the
    curve's own store key.
    """

    table: pd.DataFrame
    keys: dict[int, str]
    meta: dict
    key: str = ""


@dataclass(frozen=True, kw_only=True, eq=False)
class CurveParams:
    """Settings of one curve (validated by the API before any work)."""

    experts: tuple[int, ...]
    layer: str
    gate: str
    hidden: int | None
    epochs: int
    budget: int | None
    data: DataSpec
    analysis: dict[str, Any] = field(default_factory=lambda: dict(ANALYSIS_DEFAULTS))

    @property
    def seed(self) -> int:
        return self.data.seed

    def probe(self, n_experts: int | None = None) -> dict[str, Any]:
        """The MMoE probe of ``n_experts`` experts (``ProbeClassifier`` arguments)."""
        return {"layer": self.layer, "n_experts": n_experts, "hidden": self.hidden, "gate": self.gate,
                "budget": self.budget, "epochs": self.epochs, "seed": self.seed}

    def store_params(self) -> dict[str, Any]:
        return {"experts": list(self.experts), "probe": {"layer": self.layer, "gate": self.gate, "hidden": self.hidden,
                                                         "epochs": self.epochs, "budget": self.budget},
                "data": self.data.params(), "analysis": dict(self.analysis)}


def curve_row(n_experts: int, probe_meta: dict, summary: dict, linear: dict, matched: dict | None,
              seconds: float) -> dict[str, Any]:
    """One row of the curve table: the MMoE probe, the baselines' accuracies, the report's summary."""
    return {"n_experts": n_experts, "rank": probe_meta["rank"], "layer_params": probe_meta["layer_params"],
            "budget": probe_meta["budget"], "n_params": probe_meta["n_params"], "accuracy": probe_meta["test_accuracy"],
            "linear_probe_accuracy": linear["test_accuracy"],
            "matched_linear_accuracy": matched["test_accuracy"] if matched else np.nan,
            "eval_accuracy": summary["accuracy"], **{k: summary[k] for k in SUMMARY_COLUMNS}, "seconds": seconds}


def curve_result(rows: list[dict], keys: dict[int, str], params: CurveParams, fs: FeatureSet, n_eval: int,
                 linear: dict, matched: dict | None, seconds: float) -> Result:
    """The stored curve: its table and meta (settings, baselines, report keys)."""
    meta = {"data": params.data.params(), "classes": list(fs.classes), "layer": params.layer, "gate": params.gate,
            "hidden": params.hidden, "epochs": params.epochs, "seed": params.seed, "analysis": params.analysis,
            "n_eval": int(n_eval), "linear_probe": {k: linear[k] for k in ("test_accuracy", "n_params")},
            "matched_linear": ({k: matched[k] for k in ("test_accuracy", "n_params", "layer_params")}
                               if matched else None),
            "keys": {str(k): v for k, v in keys.items()}, "seconds": seconds, "label": params.data.label}
    return Result(table=pd.DataFrame(rows), meta=meta)


def curve_from_result(result: Result) -> MMoECurve:
    keys = {int(k): v for k, v in result.meta.get("keys", {}).items()}
    return MMoECurve(result.table, keys, dict(result.meta))
