"""Expert specialisation of a soft mixture of experts (MMoE probes); pure functions, no I/O.

Inputs are gate coefficients ``gates`` (n, N) (rows on the simplex: a sample's weights over N
experts), integer ``labels`` (n,) in [0, C) and, for interventions, a function
``logits_fn(scale) -> (n, C)`` that reruns the model with every expert's coefficient multiplied
by ``scale`` (N,) (``ProbeClassifier.logits``). Entropies are in bits.

Definitions
- expert x class matrix M[k, c] = mean of a_k over the samples of class c.
- load[k] = number of samples with a_k >= 0.5 (the expert carries at least half the mix).
- usage[k] = mean of a_k over all samples (sums to 1 over experts); usage entropy =
  H(usage), in [0, log2 N]: log2 N when every expert is used equally.
- class entropy[k] = H of the class distribution of expert k's gate mass, p(c | k) ∝ sum of a_k
  over the samples of class c: 0 when all its mass falls on one class.
- counterfactual ablation of expert k: scale = 1 except scale[k] = 0. The output is linear in
  a, so this removes exactly expert k's term. Flipped set F_k = samples whose predicted class
  changes; per-class accuracy drop[k, c] = accuracy on class c before − after (may be negative).
- class-level polysemanticity of expert k (ours; the paper does not publish its formula):
  the entropy, in bits, of the *originally predicted* classes of the flipped predictions F_k,
  i.e. of the classes whose decisions the expert's term was carrying. 0 = the expert only
  decides samples of one class; log2 C = spread evenly over all classes. Undefined (NaN) when
  |F_k| < ``min_flips``.
- effect-weighted polysemanticity (a soft version defined for nearly every expert): with
  d_bk = max(0, p_b(c_b) − p_b^{-k}(c_b)) the drop of the softmax probability of sample b's
  predicted class c_b when expert k is ablated, the entropy of w_kc = sum of d_bk over the
  samples predicted c. Undefined when sum_b d_bk < ``min_effect`` (in probability units: 1 =
  one sample's worth of probability).
- Null baselines: a plug-in entropy of few samples is biased low, and experts touch fewer
  samples as N grows, so each score has a size-matched null: the same entropy after the
  predicted classes are shuffled across all samples (``null_draws`` seeded draws; for flips
  that is m classes drawn without replacement from all predictions). The curve reports the
  mean over experts of each score next to the mean of its null.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.errors import ConfigError, ShapeError

LogitsFn = Callable[[np.ndarray], np.ndarray]  # scale (N,) -> logits (n, C)
CODE_VERSION = "experts-1"


# -- checks ---------------------------------------------------------------------------------------
def _gates(gates: np.ndarray) -> np.ndarray:
    g = np.asarray(gates, dtype=np.float64)
    if g.ndim != 2 or 0 in g.shape:
        raise ShapeError(f"gate coefficients must be (n_samples, n_experts) with no empty axis, got {g.shape}")
    return g


def _labels(labels: np.ndarray | None, n: int, n_classes: int | None = None) -> np.ndarray:
    if labels is None:
        raise ConfigError("this analysis needs class labels (one integer per sample); pass labels=")
    y = np.asarray(labels)
    if y.shape != (n,):
        raise ShapeError(f"labels must be ({n},), one per sample, got {y.shape}")
    if y.dtype.kind not in "iu":
        raise ConfigError(f"labels must be integer class indices, got dtype {y.dtype}; map names to 0..C-1")
    if n and (y.min() < 0 or (n_classes is not None and y.max() >= n_classes)):
        raise ConfigError(f"labels must lie in [0, {n_classes}), got {y.min()}..{y.max()}")
    return y.astype(np.int64)


def entropy_bits(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy in bits of distributions along ``axis`` (normalised first; 0 log 0 = 0).
    An all-zero row gives NaN."""
    p = np.asarray(p, dtype=np.float64)
    total = p.sum(axis=axis, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        q = p / total
        terms = np.where(q > 0, -q * np.log2(np.where(q > 0, q, 1.0)), 0.0)
    out = terms.sum(axis=axis)
    return np.where(np.squeeze(total, axis=axis) > 0, out, np.nan)


# -- gate statistics ------------------------------------------------------------------------------
def expert_class_matrix(gates: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """(N, C): mean gate coefficient of expert k over the samples of class c (NaN for an absent class)."""
    g = _gates(gates)
    y = _labels(labels, g.shape[0], n_classes)
    out = np.full((g.shape[1], n_classes), np.nan)
    for c in range(n_classes):
        if (mask := y == c).any():
            out[:, c] = g[mask].mean(0)
    return out


def expert_load(gates: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """(N,) int: samples whose coefficient for expert k is >= ``threshold``."""
    return (_gates(gates) >= threshold).sum(0).astype(np.int64)


def expert_usage(gates: np.ndarray) -> np.ndarray:
    """(N,) mean coefficient of each expert over the samples (sums to 1 for simplex rows)."""
    return _gates(gates).mean(0)


def usage_entropy(gates: np.ndarray) -> float:
    """Entropy (bits) of the experts' usage distribution; log2 N = perfectly even use."""
    return float(entropy_bits(expert_usage(gates)))


def class_entropy(gates: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """(N,) entropy (bits) of each expert's gate mass over classes; NaN for an expert never used."""
    g = _gates(gates)
    y = _labels(labels, g.shape[0], n_classes)
    mass = np.stack([g[y == c].sum(0) for c in range(n_classes)], axis=1)  # (N, C)
    return entropy_bits(mass, axis=1)


def top_examples(gates: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Per expert, the ``k`` samples with the largest coefficient: (indices (N, k), values (N, k)),
    descending; ties broken by the lower sample index. k is capped at n_samples."""
    g = _gates(gates)
    if k < 1:
        raise ConfigError(f"k={k}: ask for at least one example per expert")
    k = min(k, g.shape[0])
    order = np.argsort(-g.T, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(g.T, order, axis=1)


# -- ablation ---------------------------------------------------------------------------------------
def per_class_accuracy(pred: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """(C,) accuracy on the samples of each class (NaN for an absent class)."""
    y = _labels(labels, len(pred), n_classes)
    out = np.full(n_classes, np.nan)
    for c in range(n_classes):
        if (m := y == c).any():
            out[c] = float((pred[m] == c).mean())
    return out


def polysemanticity(flipped_classes: np.ndarray, n_classes: int, min_flips: int = 1) -> float:
    """Entropy (bits) of the class histogram of ``flipped_classes``; NaN below ``min_flips`` items."""
    fc = np.asarray(flipped_classes, dtype=np.int64)
    if len(fc) < max(min_flips, 1):
        return float("nan")
    return float(entropy_bits(np.bincount(fc, minlength=n_classes)))


def effect_profile(effects: np.ndarray, classes: np.ndarray, n_classes: int) -> np.ndarray:
    """(C,) sum of the non-negative ``effects`` (n,) over the samples of each class in ``classes`` (n,)."""
    return np.bincount(np.asarray(classes, dtype=np.int64), weights=np.asarray(effects, dtype=np.float64),
                       minlength=n_classes)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


@dataclass(frozen=True, eq=False)
class Ablation:
    """Counterfactual ablation of every expert, one at a time.

    ``table``: one row per expert: expert, n_flipped, accuracy_drop (overall, in accuracy
    units), n_classes_hurt (classes whose accuracy drops), polysemanticity and
    null_polysemanticity (bits; flip-based), effect (sum of d_bk, probability units),
    effect_polysemanticity and null_effect_polysemanticity (bits), top_class (most frequent
    original prediction among the flips, -1 if none). ``per_class_drop`` (N, C); ``flipped``
    one index array per expert; ``base_pred`` (n,) predictions with every expert on.
    """

    table: pd.DataFrame
    per_class_drop: np.ndarray
    flipped: tuple[np.ndarray, ...]
    base_pred: np.ndarray
    base_accuracy: float
    base_per_class: np.ndarray
    min_flips: int = 3
    min_effect: float = 1.0
    meta: dict = field(default_factory=dict)


def ablate_experts(logits_fn: LogitsFn, n_experts: int, labels: np.ndarray, n_classes: int, *,
                   min_flips: int = 3, min_effect: float = 1.0, null_draws: int = 32, seed: int = 0) -> Ablation:
    """Zero each expert's coefficient in turn and record what changes (see the module docstring)."""
    if n_experts < 1:
        raise ConfigError(f"n_experts={n_experts} must be >= 1")
    if min_flips < 1 or not min_effect > 0:
        raise ConfigError(f"min_flips={min_flips} must be >= 1 and min_effect={min_effect} > 0")
    base_logits = np.asarray(logits_fn(np.ones(n_experts)), dtype=np.float64)
    y = _labels(labels, base_logits.shape[0], n_classes)
    if base_logits.shape != (len(y), n_classes):
        raise ShapeError(f"logits_fn returned {base_logits.shape}; expected (n_samples={len(y)}, C={n_classes})")
    base = base_logits.argmax(1)
    rows_idx = np.arange(len(y))
    base_p = _softmax(base_logits)[rows_idx, base]
    base_pc = per_class_accuracy(base, y, n_classes)
    base_acc = float((base == y).mean())
    rng = np.random.default_rng(seed)
    shuffles = [rng.permutation(base) for _ in range(null_draws)]  # predicted classes shuffled across samples
    drops = np.zeros((n_experts, n_classes))
    flipped: list[np.ndarray] = []
    rows = []
    for k in range(n_experts):
        scale = np.ones(n_experts)
        scale[k] = 0.0
        logits = np.asarray(logits_fn(scale), dtype=np.float64)
        pred = logits.argmax(1)
        f = np.flatnonzero(pred != base)
        flipped.append(f)
        drops[k] = base_pc - per_class_accuracy(pred, y, n_classes)
        d = np.maximum(base_p - _softmax(logits)[rows_idx, base], 0.0)
        total = float(d.sum())
        m = len(f)
        rows.append({
            "expert": k, "n_flipped": m, "accuracy_drop": base_acc - float((pred == y).mean()),
            "n_classes_hurt": int(np.nansum(drops[k] > 1e-12)),
            "polysemanticity": polysemanticity(base[f], n_classes, min_flips),
            "null_polysemanticity": (float(np.mean([polysemanticity(s[f], n_classes) for s in shuffles]))
                                     if m >= min_flips else float("nan")),
            "effect": total,
            "effect_polysemanticity": (float(entropy_bits(effect_profile(d, base, n_classes)))
                                       if total >= min_effect else float("nan")),
            "null_effect_polysemanticity": (float(np.mean([entropy_bits(effect_profile(d, s, n_classes))
                                                           for s in shuffles])) if total >= min_effect
                                            else float("nan")),
            "top_class": int(np.bincount(base[f], minlength=n_classes).argmax()) if m else -1,
        })
    return Ablation(pd.DataFrame(rows), drops, tuple(flipped), base, base_acc, base_pc, min_flips, min_effect)


def mean_polysemanticity(ablation: Ablation, kind: str = "flips") -> tuple[float, float, int]:
    """(mean score, mean null, experts counted) over the experts where the score is defined.

    ``kind``: "flips" (polysemanticity) or "effect" (effect_polysemanticity). NaNs when none is.
    """
    col = {"flips": "polysemanticity", "effect": "effect_polysemanticity"}.get(kind)
    if col is None:
        raise ConfigError(f"unknown polysemanticity kind {kind!r}; choose flips or effect")
    t = ablation.table
    ok = t[col].notna()
    if not ok.any():
        return float("nan"), float("nan"), 0
    return float(t.loc[ok, col].mean()), float(t.loc[ok, f"null_{col}"].mean()), int(ok.sum())


# -- bias correction --------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class BiasCorrection:
    """Scale down the experts most responsible for one class's errors (see ``bias_correction``).

    ``experts``: chosen experts, highest score first; ``scale``: the factor applied to their
    coefficients; ``table``: one row per class: class, n_samples, before, after, change
    (accuracy on the evaluation samples); ``score``/``responsibility``/``harm`` (N,) on the
    selection samples (logit units); ``n_errors``: errors of the target on the selection samples.
    """

    target: int
    experts: tuple[int, ...]
    scale: float
    table: pd.DataFrame
    score: np.ndarray
    responsibility: np.ndarray
    harm: np.ndarray
    n_errors: int
    accuracy_before: float
    accuracy_after: float


def _correct_margin(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """logit of the true class minus the best other logit, per sample."""
    rows = np.arange(len(y))
    true = logits[rows, y]
    other = logits.copy()
    other[rows, y] = -np.inf
    return true - other.max(1)


def bias_correction(select_logits: LogitsFn, select_labels: np.ndarray, eval_logits: LogitsFn,
                    eval_labels: np.ndarray, n_experts: int, n_classes: int, *, target: int | None = None,
                    n_scaled: int = 3, scale: float = 0.0) -> BiasCorrection:
    """Pick experts on the selection samples, apply the scaling on the evaluation samples.

    Errors E of class ``target``: its selection samples predicted as another class p_b. For
    expert k (logits without it: superscript −k):

    - responsibility_k = sum over E of [(z_b[p_b] − z_b[target]) − (z_b^{−k}[p_b] − z_b^{−k}[target])],
      how far the expert's term pushes the target's errors away from the target;
    - harm_k = sum over correctly predicted samples of max(0, g_b − g_b^{−k}), g = true-class
      logit minus the best other logit: how much its removal erodes correct decisions;
    - score_k = responsibility_k − harm_k.

    The ``n_scaled`` experts with the highest positive score get their coefficients multiplied
    by ``scale`` (in [0, 1)). ``target`` defaults to the class with the lowest accuracy on the
    selection samples. Choose and evaluate on disjoint samples.
    """
    if not 0.0 <= scale < 1.0:
        raise ConfigError(f"scale={scale}: scaling down means a factor in [0, 1)")
    if n_scaled < 1:
        raise ConfigError(f"n_scaled={n_scaled}: scale at least one expert")
    ones = np.ones(n_experts)
    base = np.asarray(select_logits(ones), dtype=np.float64)
    y_sel = _labels(select_labels, base.shape[0], n_classes)
    pred = base.argmax(1)
    if target is None:
        target = int(np.nanargmin(per_class_accuracy(pred, y_sel, n_classes)))
    if not 0 <= target < n_classes:
        raise ConfigError(f"target class {target} is not in [0, {n_classes})")
    err = np.flatnonzero((y_sel == target) & (pred != target))
    ok = np.flatnonzero(pred == y_sel)

    def wrong_margin(z: np.ndarray) -> np.ndarray:
        return z[err, pred[err]] - z[err, target]

    m0, g0 = wrong_margin(base), _correct_margin(base[ok], y_sel[ok])
    resp, harm = np.zeros(n_experts), np.zeros(n_experts)
    for k in range(n_experts):
        s = ones.copy()
        s[k] = 0.0
        z = np.asarray(select_logits(s), dtype=np.float64)
        resp[k] = float((m0 - wrong_margin(z)).sum())
        harm[k] = float(np.maximum(g0 - _correct_margin(z[ok], y_sel[ok]), 0).sum())
    score = resp / max(len(err), 1) - harm / max(len(ok), 1)
    order = np.argsort(-score, kind="stable")
    chosen = tuple(int(k) for k in order[:n_scaled] if score[k] > 0)
    base_eval = np.asarray(eval_logits(ones)).argmax(1)
    y_eval = _labels(eval_labels, len(base_eval), n_classes)
    s = ones.copy()
    s[list(chosen)] = scale
    after_eval = np.asarray(eval_logits(s)).argmax(1) if chosen else base_eval
    before_pc = per_class_accuracy(base_eval, y_eval, n_classes)
    after_pc = per_class_accuracy(after_eval, y_eval, n_classes)
    table = pd.DataFrame({"class": np.arange(n_classes), "n_samples": np.bincount(y_eval, minlength=n_classes),
                          "before": before_pc, "after": after_pc, "change": after_pc - before_pc})
    return BiasCorrection(target, chosen, float(scale), table, score, resp, harm, len(err),
                          float((base_eval == y_eval).mean()), float((after_eval == y_eval).mean()))


# -- one MMoE's specialisation report ---------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Specialisation:
    """Everything the surfaces show for one MMoE probe on its evaluation samples.

    ``experts``: one row per expert (expert, load, usage, class_entropy, top_class_by_gate and
    the ablation columns); ``expert_class`` (N, C); ``top_index``/``top_value`` (N, k);
    ``ablation``; ``summary``: scalars for the curve.
    """

    experts: pd.DataFrame
    expert_class: np.ndarray
    top_index: np.ndarray
    top_value: np.ndarray
    ablation: Ablation
    summary: dict


def specialisation(gates: np.ndarray, labels: np.ndarray, n_classes: int, logits_fn: LogitsFn, *,
                   load_threshold: float = 0.5, top_k: int = 5, min_flips: int = 3, min_effect: float = 1.0,
                   null_draws: int = 32, seed: int = 0) -> Specialisation:
    """Gate statistics, top examples and ablations of one MMoE on one set of samples."""
    g = _gates(gates)
    y = _labels(labels, g.shape[0], n_classes)
    n_experts = g.shape[1]
    m = expert_class_matrix(g, y, n_classes)
    load = expert_load(g, load_threshold)
    usage = expert_usage(g)
    cls_ent = class_entropy(g, y, n_classes)
    idx, val = top_examples(g, top_k)
    abl = ablate_experts(logits_fn, n_experts, y, n_classes, min_flips=min_flips, min_effect=min_effect,
                         null_draws=null_draws, seed=seed)
    table = pd.DataFrame({"expert": np.arange(n_experts), "load": load, "usage": usage, "class_entropy": cls_ent,
                          "top_class_by_gate": np.where(np.isnan(m).all(1), -1, np.nanargmax(np.nan_to_num(m, nan=-1),
                                                                                               axis=1))})
    table = table.merge(abl.table, on="expert")
    poly, null, counted = mean_polysemanticity(abl, "flips")
    epoly, enull, ecounted = mean_polysemanticity(abl, "effect")
    summary = {
        "n_experts": n_experts, "accuracy": abl.base_accuracy, "mean_polysemanticity": poly,
        "mean_null_polysemanticity": null, "n_experts_counted": counted,
        "mean_effect_polysemanticity": epoly, "mean_null_effect_polysemanticity": enull,
        "n_experts_counted_effect": ecounted, "usage_entropy": usage_entropy(g),
        "max_usage_entropy": float(np.log2(n_experts)), "experts_loaded": int((load > 0).sum()),
        "mean_active_experts": float((g > 0).sum(1).mean()), "mean_class_entropy": float(np.nanmean(cls_ent)),
        "load_threshold": load_threshold, "min_flips": min_flips, "min_effect": min_effect,
    }
    return Specialisation(table, m, idx, val, abl, summary)
