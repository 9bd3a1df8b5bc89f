"""What each arm of the parameter-matched KappaTune experiment trains (pure: spectra table in, plans out).

Arms (``ARMS``):

- tensor arms (train the chosen weight matrices in full; biases, norms, the rest frozen):
  ``lowest_kappa`` (KappaTune), ``highest_kappa``, ``random`` (a new draw per seed),
  ``lowest_kappa_per_type`` (KappaTune round-robin within each module type), ``low_rank``
  (the LIFT/WeLore ranker: most low-rank-like spectra first);
- ``lora_selected``: LoRA through PEFT on the modules of the ``lowest_kappa`` arm, with the
  ``LoraConfig`` LensLab exports for that selection (``export_selection(sel, "peft")``, as users
  consume it); ``lora_all``: LoRA on every candidate linear module (the paper's baseline);
- ``full``: every parameter of the model; ``head_only``: only the head (the encoder's new
  classifier; the LM's ``lm_head``).

Budgets (``plan_arm``):

- a parameter budget ``"P%params"`` is *matched*: the target T is P% of the candidates'
  parameters rounded to the nearest multiple of the greatest common divisor of their sizes
  (``matched_target``; MiniLM: one 384×384 matrix, 147,456; the tiny LM: 4,096), which whole
  tensors can add up to; every tensor arm walks its own ranking and takes each tensor that still fits
  under (1 + tol)·T, skipping the ones that do not (``selection.fill_to_limit``; ties keep the
  table's tensor order; when no tensor fits, the first-ranked one alone is taken); a LoRA arm
  picks the rank r >= 1 whose r·Σ(d_out + d_in) is closest to T (lora_alpha = 2r, the export's
  default ratio; same lr, steps and batches as the tensor arms unless ``lora_lr_scale`` says
  otherwise). An arm is ``matched`` when
  its trained count lies within ±tol·T (tol = 5% by default); ``full`` and ``head_only`` are
  references and never matched;
- a tensor-count or tensor-fraction budget (``"7"``, ``"20%"``) keeps the old unmatched design:
  each tensor arm takes that many tensors, LoRA uses ``lora_r``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from analysis.errors import ConfigError
from analysis.weights.selection import Budget, Selection, fill_to_limit, select_tensors

TENSOR_ARMS = ("lowest_kappa", "highest_kappa", "random", "lowest_kappa_per_type", "low_rank")
LORA_ARMS = ("lora_selected", "lora_all")
ARMS = (*TENSOR_ARMS, *LORA_ARMS, "full", "head_only")


@dataclass(frozen=True, slots=True)
class ArmPlan:
    """What one arm x seed trains. ``params``: weight names trained in full (tensor arms);
    ``lora``: the PEFT ``LoraConfig`` keyword dict (LoRA arms); ``n_params``: trained
    parameters of the model body (the encoder's classifier head not included)."""

    arm: str
    seed: int
    params: tuple[str, ...] = ()
    lora: dict[str, Any] | None = None
    n_params: int = 0
    target: int = 0  # the matched budget T (0 when the budget is not a parameter budget)
    matched: bool = False


def _shape(row: dict) -> tuple[int, int]:
    """(d_out, d_in) of a 2-D candidate from the table's ``shape`` text (``"384x1536"``)."""
    dims = [int(x) for x in str(row["shape"]).replace("(", "").replace(")", "").replace(",", "x").split("x") if x]
    if len(dims) != 2:
        raise ConfigError(f"LoRA arms need 2-D weights; {row['tensor']} has shape {row['shape']}: "
                          "leave it out with exclude=...")
    return dims[0], dims[1]


def lora_rank(shapes: list[tuple[int, int]], target: int) -> int:
    """The rank r >= 1 whose LoRA size r·Σ(d_out + d_in) is closest to ``target`` (smaller r on a tie)."""
    per_rank = sum(a + b for a, b in shapes)
    low = max(1, target // per_rank)
    return min((low, low + 1), key=lambda r: (abs(r * per_rank - target), r))


def matched_target(fraction: float, sizes: np.ndarray) -> int:
    """T = ``fraction`` of the candidates' parameters, rounded to the nearest multiple (>= 1) of the
    greatest common divisor of their sizes, so that whole tensors can add up to it exactly."""
    g = int(np.gcd.reduce(np.asarray(sizes, dtype=np.int64)))
    return g * max(1, int(round(fraction * float(np.sum(sizes)) / g)))


def _lora(sel: Selection, modules: pd.DataFrame, r: int) -> tuple[dict[str, Any], int]:
    from analysis.weights.export import export_selection

    cfg = json.loads(export_selection(sel, "peft", lora_r=r, lora_alpha=2 * r, lora_dropout=0.0))
    n = r * sum(a + b for a, b in (_shape(row) for row in modules.to_dict(orient="records")))
    return cfg, int(n)


def plan_arm(arm: str, seed: int, table: pd.DataFrame, *, budget: str, include: str | None, exclude: str | None,
             tol: float = 0.05, lora_r: int = 8, n_params_full: int = 0, n_params_head: int = 0) -> ArmPlan:
    """The plan of ``arm`` for ``seed`` on the model's spectra ``table`` (see the module docstring)."""
    if arm not in ARMS:
        raise ConfigError(f"unknown arm {arm!r}; choose one of {', '.join(ARMS)}")
    if arm == "full":
        return ArmPlan(arm, seed, n_params=n_params_full)
    if arm == "head_only":
        return ArmPlan(arm, seed, n_params=n_params_head)
    b = Budget.parse(budget)
    ranker = {"lora_selected": "lowest_kappa", "lora_all": "lowest_kappa"}.get(arm, arm)
    ranked = select_tensors(table, "100%", ranker=ranker, include=include, exclude=exclude, seed=seed)
    cand = ranked.candidates
    sizes = cand["n_params"].to_numpy()
    matched_budget = b.kind == "param_fraction"
    target = matched_target(b.value, sizes) if matched_budget else 0
    if arm == "lora_all":
        mask = np.ones(len(cand), dtype=bool)
    elif matched_budget:
        mask = fill_to_limit(sizes, (1 + tol) * target)
    else:
        mask = select_tensors(table, b, ranker=ranker, include=include, exclude=exclude, seed=seed).candidates[
            "selected"].to_numpy()
    chosen = cand[mask]
    sel = dataclasses.replace(ranked, params=tuple(chosen["tensor"]), budget=b,
                              n_params_selected=int(chosen["n_params"].sum()))
    if arm in LORA_ARMS:
        r = lora_rank([_shape(row) for row in chosen.to_dict(orient="records")], target) if matched_budget else lora_r
        cfg, n = _lora(sel, chosen, r)
        return ArmPlan(arm, seed, params=sel.params, lora=cfg, n_params=n, target=target,
                       matched=matched_budget and abs(n - target) <= tol * target)
    n = int(chosen["n_params"].sum())
    return ArmPlan(arm, seed, params=sel.params, n_params=n, target=target,
                   matched=matched_budget and abs(n - target) <= tol * target)
