"""KappaTune-style selection of the weight tensors to fine-tune (pure; no I/O).

Input is the spectra table of ``analysis.weights.spectra.weight_spectra(...).table`` (one row per
matrix). ``tensor_table`` folds it to one row per stored tensor; ``select_tensors`` ranks
the candidate tensors and keeps a budget of them.

Rankers (ties always keep the table's tensor order):

- ``lowest_kappa``: KappaTune (Ludwig 2025; PEFT ``find_kappa_target_modules``): ascending
  κ = σmax/σmin, ``inf`` last. Well-conditioned tensors are the ones whose update is least
  likely to disturb what the model already knows. ``score`` = κ.
- ``highest_kappa``: the contrast: descending κ, ``inf`` first. ``score`` = κ.
- ``random``: a seeded baseline: each candidate draws ``numpy.random.default_rng(seed).random()``
  and the lowest draws rank first. ``score`` = the draw.
- ``lowest_kappa_per_type``: KappaTune within each module type (``module_type``, e.g.
  ``intermediate.dense``): round-robin over types, the lowest-κ tensor of every type first,
  then the second lowest of every type, ...; within a round, ascending κ. A control for κ
  merely tracking the tensor type (on MiniLM plain KappaTune picks all MLP up-projections
  first). ``score`` = κ.
- ``low_rank``: WeLore/LIFT-style: highest ``welore_fraction`` first (the share of the
  min-max-normalised spectrum below τ: the most low-rank-like components first), ties
  broken by lower κ. ``score`` = welore_fraction.

Budgets (``Budget.parse``):

- ``"12"`` / ``12``: a count of tensors, 1 <= count <= number of candidates;
- ``"20%"`` / ``0.2``: a fraction of the candidate tensors, k = max(1, floor(n·fraction)),
  as PEFT's ``top_p`` (we add 1e-9 before flooring so that 29% of 100 is 29, not 28);
- ``"10%params"``: a fraction of the candidates' parameters, filled greedily in rank order:
  each tensor is taken if it still fits (cumulative parameters <= fraction·total) and skipped
  otherwise, and filling goes on with the next-ranked tensor, so a large tensor never ends
  the selection early. When no candidate fits at all (every one is larger than the budget),
  the first-ranked tensor alone is selected, so a selection is never empty.

Candidates (``tensor_kind``): by default the *linear weight matrices*, what PEFT's
``find_kappa_target_modules`` ranks: every 2-D (or reshaped conv) weight that is not an
embedding or an output head, and stacked experts (PEFT's ``target_parameters``). Embedding
tables (``include_embeddings=True``), output heads such as ``lm_head`` / ``cls.`` /
``classifier`` (``include_heads=True``) and MoE routers (``include_routers=True``; not
``nn.Linear`` modules in transformers, so PEFT never ranks them) are opt-in; norms and biases are 1-D, have no
spectrum and are never candidates. ``include`` / ``exclude`` regexes then narrow the set.

Stacked experts (a 3-D ``…experts…`` tensor, one matrix row per expert) are one candidate:
κ = mean of the per-expert κ (``inf`` if any is ``inf``), as PEFT does for fused MoE
parameters; ``kappa_max`` keeps the worst expert.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd

from analysis.errors import ConfigError
from analysis.weights.matrices import module_path

RANKERS = ("lowest_kappa", "highest_kappa", "random", "low_rank", "lowest_kappa_per_type")
KINDS = ("linear", "experts", "embedding", "head", "router")  # tensor_kind values; the first two are default candidates
DEFAULT_KINDS = ("linear", "experts")
# a name component that marks an embedding table (BERT embeddings., GPT-2 wte/wpe, Llama embed_tokens, ...)
_EMBEDDING = re.compile(r"(?:^|\.)(?:[\w]*embed(?:ding)?s?[\w]*|wte|wpe|shared)(?:\.|$)", re.IGNORECASE)
# an output head's module path (the LM head of Llama/GPT-2, GPT-NeoX's embed_out, BERT's cls., task heads)
# an MoE router (Mixtral's mlp.gate / block_sparse_moe.gate, OLMoE/Qwen-MoE gate, Switch "router"): not an nn.Linear
# in current transformers, so PEFT does not rank it
_ROUTER = re.compile(r"(?:^|\.)(?:gate|router)(?:\.weight)?$")
_HEAD = re.compile(r"(?:^|\.)(?:lm_head|embed_out|output_layer|cls|classifier|score|qa_outputs)(?:\.|$)")
BUDGET_KINDS = ("count", "fraction", "param_fraction")
_REQUIRED = ("tensor", "layer", "module_type", "n_params", "status", "kappa", "welore_fraction")
_BUDGET_HELP = "give a count like 12, a fraction of tensors like 20% or 0.2, or a fraction of parameters like 10%params"
_NUM = r"(\d+(?:\.\d*)?|\.\d+)"


@dataclass(frozen=True, slots=True)
class Budget:
    """How much to select: ``count`` tensors, a ``fraction`` of the candidate tensors, or a
    ``param_fraction`` of the candidates' parameters. Fractions lie in (0, 1]."""

    kind: Literal["count", "fraction", "param_fraction"]
    value: float

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise ConfigError(f"unknown budget kind {self.kind!r}; choose one of {', '.join(BUDGET_KINDS)}")
        v = self.value
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v):
            raise ConfigError(f"budget value {v!r} is not a finite number; {_BUDGET_HELP}")
        if self.kind == "count":
            if v != int(v) or v < 1:
                raise ConfigError(f"budget count {v!r} must be a whole number >= 1; {_BUDGET_HELP}")
            object.__setattr__(self, "value", int(v))
        elif not 0 < v <= 1:
            what = "tensors" if self.kind == "fraction" else "parameters"
            raise ConfigError(f"budget fraction of {what} {v!r} is outside (0, 1] (0% < budget <= 100%); "
                              f"{_BUDGET_HELP}")
        else:
            object.__setattr__(self, "value", float(v))

    @classmethod
    def parse(cls, text: str | int | float | Budget) -> Budget:
        """``12`` / ``"12"`` -> count; ``"20%"``, ``"0.2"``, ``0.2`` -> fraction of tensors;
        ``"10%params"`` -> fraction of parameters. Raises ConfigError otherwise."""
        if isinstance(text, Budget):
            return text
        if isinstance(text, bool):
            raise ConfigError(f"budget {text!r} is a bool; {_BUDGET_HELP}")
        if isinstance(text, (int, np.integer)):
            return cls("count", int(text))
        if isinstance(text, (float, np.floating)):
            return cls("fraction", float(text))
        if not isinstance(text, str):
            raise ConfigError(f"budget {text!r} has type {type(text).__name__}; {_BUDGET_HELP}")
        s = text.strip().lower().replace(" ", "")
        if m := re.fullmatch(r"\d+", s):
            return cls("count", int(s))
        if m := re.fullmatch(_NUM, s):
            return cls("fraction", float(m.group(1)))
        if m := re.fullmatch(_NUM + r"%", s):
            return cls("fraction", float(m.group(1)) / 100)
        if m := re.fullmatch(_NUM + r"%params?", s):
            return cls("param_fraction", float(m.group(1)) / 100)
        raise ConfigError(f"cannot read budget {text!r}; {_BUDGET_HELP}")

    def __str__(self) -> str:
        if self.kind == "count":
            return str(self.value)
        pct = f"{self.value * 100:.6g}%"
        return pct if self.kind == "fraction" else pct + "params"


@dataclass(frozen=True, eq=False)
class Selection:
    """The tensors chosen for fine-tuning, with every candidate's rank.

    ``candidates``: one row per candidate tensor in rank order, columns tensor, module,
    layer, module_type, shape, n_experts, n_params, kappa, kappa_max, welore_fraction,
    score (what the ranker sorted on), rank (1 = first), selected.
    """

    params: tuple[str, ...]  # selected parameter names, in rank order
    ranker: str
    budget: Budget
    seed: int | None  # the random ranker's seed; None for the deterministic rankers
    candidates: pd.DataFrame
    n_params_selected: int
    n_params_total: int  # over the candidates
    fingerprint: str | None = None  # model the spectra came from, when known
    excluded: tuple[str, ...] = field(default=())  # tensors left out because their weights are not finite

    @property
    def modules(self) -> tuple[str, ...]:
        """Module paths of the selected parameters (names without ``.weight``)."""
        return tuple(module_path(p) for p in self.params)

    def summary(self) -> str:
        """One line: ranker, budget, how many tensors and parameters were selected."""
        n_cand = len(self.candidates)
        share = self.n_params_selected / self.n_params_total if self.n_params_total else 0.0
        fp = f" of model {self.fingerprint}" if self.fingerprint else ""
        return (f"{self.ranker} selection{fp}, budget {self.budget}: {len(self.params)} of {n_cand} tensors, "
                f"{self.n_params_selected:,} of {self.n_params_total:,} parameters ({share:.1%})")


def tensor_kind(name: str, n_experts: int = 0) -> str:
    """``"experts"`` for a stacked-experts tensor, ``"head"`` for an output head (``lm_head``,
    ``embed_out``, ``cls.``, ``classifier``, ``score``, ``qa_outputs``), ``"router"`` for an MoE
    router (a module named ``gate`` or ``router``), ``"embedding"`` for an
    embedding table (a name component containing ``embed``, or ``wte`` / ``wpe`` / ``shared``),
    else ``"linear"`` (a weight matrix of a linear map, or a conv kernel viewed as one)."""
    if n_experts:
        return "experts"
    if _HEAD.search(name):
        return "head"
    if _ROUTER.search(name):
        return "router"
    if _EMBEDDING.search(name):
        return "embedding"
    return "linear"


def tensor_table(spectra_table: pd.DataFrame) -> pd.DataFrame:
    """One row per stored tensor (first-seen order) from a spectra table (one row per matrix).

    Columns: tensor, module, layer, module_type, kind (``tensor_kind``), shape, n_experts, n_params (all experts),
    kappa (mean of per-expert κ, ``inf`` if any is ``inf``), kappa_max, welore_fraction (mean
    over experts), status (``"ok"``, or the first non-ok matrix status). Only ``status ==
    "ok"`` rows are selection candidates; ``select_tensors`` lists the others as excluded.
    """
    if not isinstance(spectra_table, pd.DataFrame):
        raise ConfigError(f"expected the spectra DataFrame (weight_spectra(...).table), got "
                          f"{type(spectra_table).__name__}")
    missing = [c for c in _REQUIRED if c not in spectra_table.columns]
    if missing:
        raise ConfigError(f"spectra table lacks columns {missing}; pass analysis.weights.spectra.weight_spectra(...).table "
                          "or app.api.analyze(...).table")
    rows = []
    for name, g in spectra_table.groupby("tensor", sort=False):
        ok = bool((g["status"] == "ok").all())
        kappa = g["kappa"].to_numpy(dtype=np.float64)
        n_exp = len(g)
        if n_exp > 1 and "rows" in g.columns:
            shape = f"{n_exp}x{g['rows'].iloc[0]}x{g['cols'].iloc[0]}"
        else:
            shape = str(g["shape"].iloc[0]) if "shape" in g.columns else ""
        rows.append({
            "tensor": name,
            "module": module_path(name),
            "layer": int(g["layer"].iloc[0]),
            "module_type": g["module_type"].iloc[0],
            "kind": tensor_kind(name, n_exp if n_exp > 1 else 0),
            "shape": shape,
            "n_experts": n_exp if n_exp > 1 else 0,
            "n_params": int(g["n_params"].sum()),
            "kappa": (math.inf if np.isinf(kappa).any() else float(kappa.mean())) if ok else math.nan,
            "kappa_max": float(kappa.max()) if ok else math.nan,
            "welore_fraction": float(g["welore_fraction"].astype(np.float64).mean()) if ok else math.nan,
            "status": "ok" if ok else next(s for s in g["status"] if s != "ok"),
        })
    cols = ["tensor", "module", "layer", "module_type", "kind", "shape", "n_experts", "n_params", "kappa", "kappa_max",
            "welore_fraction", "status"]
    return pd.DataFrame(rows, columns=cols)


def _compile(pattern: str | None, what: str) -> re.Pattern | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"{what} regex {pattern!r} is invalid ({exc}); give a Python regular expression, "
                          f"e.g. 'attention' or '^encoder\\.'") from None


def rank_order(cand: pd.DataFrame, ranker: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(order, score): candidate row indices best-first, and each row's score (see module docstring)."""
    n = len(cand)
    idx = np.arange(n)
    kappa = cand["kappa"].to_numpy(dtype=np.float64)
    if ranker == "lowest_kappa":
        return np.lexsort((idx, kappa)), kappa
    if ranker == "highest_kappa":
        return np.lexsort((idx, -kappa)), kappa
    if ranker == "random":
        draw = np.random.default_rng(seed).random(n)
        return np.lexsort((idx, draw)), draw
    if ranker == "lowest_kappa_per_type":
        within = np.empty(n, dtype=np.int64)
        for _, rows in cand.groupby("module_type", sort=False).indices.items():
            rows = np.asarray(rows)
            within[rows[np.lexsort((rows, kappa[rows]))]] = np.arange(len(rows))
        return np.lexsort((idx, kappa, within)), kappa
    if ranker == "low_rank":
        frac = cand["welore_fraction"].to_numpy(dtype=np.float64)
        return np.lexsort((idx, kappa, -frac)), frac
    raise ConfigError(f"unknown ranker {ranker!r}; choose one of {', '.join(RANKERS)}")


def n_to_select(budget: Budget, n_params_ranked: np.ndarray) -> int:
    """How many of the ranked candidates (their parameter counts, best first) the budget keeps."""
    return int(selected_mask(budget, n_params_ranked).sum())


def fill_to_limit(n_params_ranked: np.ndarray, limit: float) -> np.ndarray:
    """Greedy fill in rank order: take each tensor that still fits under ``limit`` parameters,
    skip the ones that do not and go on; the first-ranked tensor alone when none fits. (n,) bool."""
    sizes = np.asarray(n_params_ranked, dtype=np.int64)
    mask = np.zeros(len(sizes), dtype=bool)
    used = 0
    for i, size in enumerate(sizes):
        if used + int(size) <= limit:
            mask[i] = True
            used += int(size)
    if not mask.any() and len(mask):
        mask[0] = True
    return mask


def selected_mask(budget: Budget, n_params_ranked: np.ndarray) -> np.ndarray:
    """Which of the ranked candidates (their parameter counts, best first) the budget keeps; (n,) bool."""
    n = len(n_params_ranked)
    if budget.kind == "count":
        if budget.value > n:
            raise ConfigError(f"budget of {budget.value} tensors exceeds the {n} candidate tensors; "
                              f"use a count in [1, {n}] or a fraction like 20%")
        return np.arange(n) < int(budget.value)
    if budget.kind == "fraction":
        return np.arange(n) < max(1, math.floor(n * budget.value + 1e-9))
    total = float(np.sum(n_params_ranked, dtype=np.int64))
    return fill_to_limit(n_params_ranked, budget.value * total)


def select_tensors(spectra_table: pd.DataFrame, budget: Budget | str | int | float, *,
                   ranker: str = "lowest_kappa", include: str | None = None, exclude: str | None = None,
                   seed: int = 0, fingerprint: str | None = None, include_embeddings: bool = False,
                   include_heads: bool = False, include_routers: bool = False) -> Selection:
    """Rank the finite candidate tensors of ``spectra_table`` with ``ranker`` and keep ``budget`` of them.

    Candidates: the linear weight matrices and stacked experts (``tensor_kind``; PEFT's
    candidates), plus embedding tables with ``include_embeddings``, output heads with
    ``include_heads`` and MoE routers with ``include_routers``. ``include`` / ``exclude``: regexes tested with ``re.search`` on the
    tensor name (a tensor stays a candidate if it matches ``include`` and does not match
    ``exclude``). Raises ConfigError for an unknown ranker, a bad budget, an invalid regex, a
    non-integer seed, or filters that leave no candidate.
    """
    budget = Budget.parse(budget)
    if ranker not in RANKERS:
        raise ConfigError(f"unknown ranker {ranker!r}; choose one of {', '.join(RANKERS)}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed {seed!r} must be a non-negative integer")
    inc, exc = _compile(include, "include"), _compile(exclude, "exclude")
    table = tensor_table(spectra_table)
    ok = table["status"] == "ok"
    excluded = tuple(table.loc[~ok, "tensor"])
    for flag, what in ((include_embeddings, "include_embeddings"), (include_heads, "include_heads"),
                       (include_routers, "include_routers")):
        if not isinstance(flag, (bool, np.bool_)):
            raise ConfigError(f"{what}={flag!r} must be True or False")
    kinds = (DEFAULT_KINDS + (("embedding",) if include_embeddings else ()) + (("head",) if include_heads else ())
             + (("router",) if include_routers else ()))
    keep = ok & table["kind"].isin(kinds)
    if inc is not None:
        keep &= table["tensor"].map(lambda t: inc.search(t) is not None)
    if exc is not None:
        keep &= table["tensor"].map(lambda t: exc.search(t) is None)
    cand = table[keep].reset_index(drop=True)
    if cand.empty:
        filters = ", ".join(f"{k}={v!r}" for k, v in (("include", include), ("exclude", exclude)) if v is not None)
        left_out = [k for k in ("embedding", "head", "router") if k not in kinds and (table["kind"] == k).any()]
        opt_in = "".join(f", --include-{k}s" for k in left_out)
        raise ConfigError(f"no candidate tensors: {int(ok.sum())} of {len(table)} tensors have finite weights"
                          + (f" and none is left by {filters}" if filters else "")
                          + (f" among the default candidates (linear weights, experts; not {', '.join(k + 's' for k in left_out)})"
                             if left_out else "")
                          + f"; loosen --include/--exclude{opt_in} or check the spectra table")
    order, score = rank_order(cand, ranker, int(seed))
    cand["score"] = score
    cand = cand.iloc[order].reset_index(drop=True)
    cand["rank"] = np.arange(1, len(cand) + 1)
    cand["selected"] = selected_mask(budget, cand["n_params"].to_numpy())
    cand = cand.drop(columns=["status"])
    chosen = cand[cand["selected"]]
    return Selection(params=tuple(chosen["tensor"]), ranker=ranker, budget=budget,
                     seed=int(seed) if ranker == "random" else None, candidates=cand,
                     n_params_selected=int(chosen["n_params"].sum()), n_params_total=int(cand["n_params"].sum()),
                     fingerprint=fingerprint, excluded=excluded)
