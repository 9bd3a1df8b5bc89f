"""Steering directions from contrast sets: per-layer direction extraction from the activations
``analysis.steering.collect`` collects (in batches of contrast pairs; its hook names, position
rules, tokenisation and ``collect`` are re-exported here).

Directions per layer (all in activation units; ``d̄`` = mean paired difference positive − negative
over the training pairs, ``û`` a unit direction):

- ``mean_diff``: mean(positive) − mean(negative) (= d̄; activation addition / CAA);
- ``pca``: top eigenvector of the second-moment matrix of the paired differences, E[d dᵀ]
  (PCA of differences with random sign flips, as representation engineering does), signed so
  positives project higher, scaled to d̄·û;
- ``logistic``: the weight vector of an L2 logistic regression (scikit-learn) separating
  positive from negative activations, unit-normalised and scaled to d̄·û;
- multi-direction: the top-k right singular vectors of the paired-difference matrix
  (``svd_directions``; the first equals ``pca`` up to scale), for subspace ablation.

So every method's vector v satisfies v·û = d̄·û: α = 1 adds one average class separation.
A logistic fit that fails at a layer (no separating signal: a zero weight vector) leaves that
layer's logistic row NaN with a RuntimeWarning naming the layer; the other layers and methods
are kept. A position rule under which both texts of every pair have the same activations
(``index:0`` on a causal LM: the BOS token) is refused with a ConfigError.

Per layer and method: ``auc_test`` = ROC AUC of the projection h·û separating held-out positives
from held-out negatives (0.5 = chance), ``norm`` = ‖v‖, ``act_norm`` = mean ‖h‖ over all real
tokens of all texts at that hook and layer, ``rel_norm`` = norm / act_norm.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from analysis.steering.contrasts import ContrastSet
from analysis.errors import ConfigError, ShapeError
from analysis.steering.collect import (DEFAULT_BATCH_PAIRS, HOOKS, PADDING_SIDES, Activations,  # noqa: F401
                                    PositionRule, Progress, check_batch_size, check_layers, collect, hook_name,
                                    n_layers, pad_rows, run_activations, select_positions, token_rows, tokenize)

CODE_VERSION = "steering-2"  # 2: logistic fitted to tol 1e-8; NaN rows for failed fits
METHODS = ("mean_diff", "pca", "logistic")


# -- directions (pure) ----------------------------------------------------------------------------
def _check_pair_arrays(pos: np.ndarray, neg: np.ndarray, paired: bool) -> tuple[np.ndarray, np.ndarray]:
    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    if pos.ndim != 2 or neg.ndim != 2 or pos.shape[1] != neg.shape[1] or 0 in pos.shape or 0 in neg.shape:
        raise ShapeError(f"expected positive and negative activations (n, d_model) with the same d_model and n >= 1, "
                         f"got {pos.shape} and {neg.shape}")
    if paired and pos.shape != neg.shape:
        raise ShapeError(f"paired differences need as many positives as negatives, got {pos.shape} and {neg.shape}")
    if not (np.isfinite(pos).all() and np.isfinite(neg).all()):
        raise ShapeError("activations hold NaN or inf; check the model's weights (lenslab analyze shows them)")
    return pos, neg


def mean_difference(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """mean(pos) − mean(neg): (d_model,) float64 from (n_pos, d_model) and (n_neg, d_model)."""
    pos, neg = _check_pair_arrays(pos, neg, paired=False)
    return pos.mean(0) - neg.mean(0)


def svd_directions(pos: np.ndarray, neg: np.ndarray, k: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Top-k right singular vectors of the paired differences D = pos − neg (uncentred).

    Returns (directions (k', d_model) unit rows, singular values (k',)), k' = min(k, rank
    bound); each direction signed so that the mean difference projects positively on it.
    """
    pos, neg = _check_pair_arrays(pos, neg, paired=True)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"k={k!r} must be an integer >= 1")
    d = pos - neg
    _, s, vt = np.linalg.svd(d, full_matrices=False)
    k = min(int(k), vt.shape[0])
    vt, s = vt[:k].copy(), s[:k].copy()
    signs = np.sign(vt @ d.mean(0))
    signs[signs == 0] = 1.0
    return vt * signs[:, None], s


def pca_direction(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Unit top eigenvector of E[d dᵀ] over paired differences d, signed so positives project higher."""
    return svd_directions(pos, neg, 1)[0][0]


def logistic_direction(pos: np.ndarray, neg: np.ndarray, *, C: float = 1.0) -> np.ndarray:
    """Unit weight vector of an L2 logistic regression, positive (1) vs negative (0) activations.

    The activations are centred on their overall mean and divided by one global scale (the
    RMS norm) before fitting, so ``C`` means the same at every layer; neither changes the
    direction's meaning. scikit-learn lbfgs, ``tol`` 1e-8 (converged to the optimum, not to the
    default 1e-4), ``max_iter`` 5000.
    """
    from sklearn.linear_model import LogisticRegression

    pos, neg = _check_pair_arrays(pos, neg, paired=False)
    if not (isinstance(C, (int, float)) and math.isfinite(C) and C > 0):
        raise ConfigError(f"C={C!r} must be a finite number > 0 (inverse L2 strength; 1.0 is scikit-learn's default)")
    x = np.concatenate([pos, neg])
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    x = x - x.mean(0)
    scale = float(np.sqrt((x ** 2).sum(1).mean())) or 1.0
    w = LogisticRegression(C=C, tol=1e-8, max_iter=5000).fit(x / scale, y).coef_[0]
    norm = np.linalg.norm(w)
    if norm == 0:
        raise ShapeError("logistic regression returned a zero weight vector: the two classes are not separable "
                         "at this layer; use mean_diff or pca")
    return w / norm


def projection_auc(pos: np.ndarray, neg: np.ndarray, direction: np.ndarray) -> float:
    """ROC AUC of the scores h·û separating ``pos`` (label 1) from ``neg`` (label 0); ties count ½."""
    from sklearn.metrics import roc_auc_score

    pos, neg = _check_pair_arrays(pos, neg, paired=False)
    u = np.asarray(direction, dtype=np.float64)
    scores = np.r_[pos @ u, neg @ u]
    return float(roc_auc_score(np.r_[np.ones(len(pos)), np.zeros(len(neg))], scores))


def direction_vectors(pos: np.ndarray, neg: np.ndarray, methods: Sequence[str] = METHODS, *,
                      C: float = 1.0) -> dict[str, np.ndarray]:
    """Every method's vector (d_model,) in activation units (see the module docstring)."""
    pos, neg = _check_pair_arrays(pos, neg, paired=True)
    dbar = (pos - neg).mean(0)
    out = {}
    for method in methods:
        if method == "mean_diff":
            out[method] = mean_difference(pos, neg)
            continue
        u = pca_direction(pos, neg) if method == "pca" else logistic_direction(pos, neg, C=C)
        out[method] = u * float(dbar @ u)
    return out


def _layer_vectors(pos: np.ndarray, neg: np.ndarray, methods: Sequence[str], *, C: float,
                   layer: int) -> dict[str, np.ndarray]:
    """``direction_vectors`` of one layer, where a logistic fit that fails gives a NaN vector and
    a RuntimeWarning naming the layer instead of an error, so the other layers still count."""
    fitted = [m for m in methods if m != "logistic"]
    out = direction_vectors(pos, neg, fitted, C=C)
    if "logistic" in methods:
        try:
            out.update(direction_vectors(pos, neg, ["logistic"], C=C))
        except (ShapeError, ValueError) as exc:
            warnings.warn(f"layer {layer}: the logistic direction could not be fitted ({exc}); its row is NaN, "
                          "the other methods and layers are unaffected", RuntimeWarning, stacklevel=3)
            out["logistic"] = np.full(pos.shape[1], np.nan)
    return {m: out[m] for m in methods}


def check_k(k: int, d_model: int | None = None) -> int:
    """``k`` (SVD directions kept per layer) when it is an integer in 1..d_model, else ConfigError
    (the padded (n_layers, k, d_model) array of a huge k would not fit in memory)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"k={k!r} must be an integer >= 1 (SVD directions per layer)")
    if d_model is not None and k > d_model:
        raise ConfigError(f"k={k} SVD directions per layer is more than a layer has (at most d_model={d_model}); "
                          f"ask for k <= {d_model} (--k)")
    return int(k)


def check_methods(methods: Sequence[str]) -> tuple[str, ...]:
    methods = (methods,) if isinstance(methods, str) else tuple(methods)
    if not methods or any(m not in METHODS for m in methods) or len(set(methods)) != len(methods):
        raise ConfigError(f"methods {list(methods)} must be distinct names from {', '.join(METHODS)}")
    return methods


# -- extraction ----------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class SteeringExtraction:
    """Per-layer steering directions of one contrast set at one hook.

    table: one row per layer x method: layer, method, auc_test, auc_train, pair_acc_test (share
    of held-out pairs whose positive projects higher), norm, act_norm, rel_norm, cos_mean_diff.
    vectors: (n_methods, n_layers, d_model) float32 in activation units; svd_directions:
    (n_layers, k, d_model) unit rows; svd_values: (n_layers, k); all read-only.
    """

    table: pd.DataFrame
    vectors: np.ndarray
    svd_directions: np.ndarray
    svd_values: np.ndarray
    methods: tuple[str, ...]
    layers: tuple[int, ...]
    meta: dict[str, Any] = field(default_factory=dict)

    def vector(self, layer: int, method: str = "mean_diff") -> np.ndarray:
        """(d_model,) float32 vector of one layer and method (ConfigError when its fit failed: NaN)."""
        if method not in self.methods:
            raise ConfigError(f"method {method!r} was not extracted; available: {', '.join(self.methods)}")
        if layer not in self.layers:
            raise ConfigError(f"layer {layer!r} was not extracted; available: {', '.join(map(str, self.layers))}")
        v = self.vectors[self.methods.index(method), self.layers.index(layer)]
        if not np.isfinite(v).all():
            raise ConfigError(f"the {method} direction of layer {layer} could not be fitted at extraction (see the "
                              "warning then; its table row is NaN); use mean_diff or pca there, or another layer")
        return v

    def best_layer(self, method: str = "mean_diff") -> int:
        """The layer with the highest held-out AUC (ties: the earliest)."""
        t = self.table[self.table["method"] == method]
        return int(t.sort_values(["auc_test", "layer"], ascending=[False, True]).iloc[0]["layer"])


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.setflags(write=False)
    return a


def extract_directions(acts: Activations, contrasts: ContrastSet, *, methods: Sequence[str] = METHODS,
                       k: int = 4, C: float = 1.0, progress: Progress | None = None) -> SteeringExtraction:
    """Directions and per-layer separability from collected activations (pure; no model)."""
    methods = check_methods(methods)
    k = check_k(k, int(acts.pos.shape[-1]))
    train = np.array([p.split == "train" for p in contrasts.pairs])
    test = ~train
    rows, vectors, svd_dirs, svd_vals = [], [], [], []
    for li, layer in enumerate(acts.layers):
        if progress:
            progress(li, len(acts.layers), f"directions at layer {layer}")
        pos, neg = acts.pos[li].astype(np.float64), acts.neg[li].astype(np.float64)  # float32 values, exactly
        vecs = _layer_vectors(pos[train], neg[train], methods, C=C, layer=layer)
        dirs, vals = svd_directions(pos[train], neg[train], k)
        pad = k - len(vals)
        svd_dirs.append(np.pad(dirs, ((0, pad), (0, 0))))
        svd_vals.append(np.pad(vals, (0, pad), constant_values=np.nan))
        md = mean_difference(pos[train], neg[train])
        md_unit = md / (np.linalg.norm(md) or 1.0)
        for method in methods:
            v = vecs[method]
            norm = float(np.linalg.norm(v))
            row = {"layer": layer, "method": method, "auc_test": np.nan, "auc_train": np.nan, "pair_acc_test": np.nan,
                   "norm": norm, "act_norm": float(acts.act_norm[li]), "rel_norm": norm / float(acts.act_norm[li]),
                   "cos_mean_diff": np.nan}
            if np.isfinite(v).all():
                u = v / (norm or 1.0)
                row.update(auc_test=projection_auc(pos[test], neg[test], u),
                           auc_train=projection_auc(pos[train], neg[train], u),
                           pair_acc_test=float(((pos[test] - neg[test]) @ u > 0).mean()),
                           cos_mean_diff=float(u @ md_unit))
            rows.append(row)
        vectors.append(np.stack([vecs[m] for m in methods]))
    if progress:
        progress(len(acts.layers), len(acts.layers), "done")
    return SteeringExtraction(
        table=pd.DataFrame(rows), vectors=_readonly(np.stack(vectors, axis=1).astype(np.float32)),
        svd_directions=_readonly(np.stack(svd_dirs).astype(np.float32)), svd_values=_readonly(np.stack(svd_vals)),
        methods=methods, layers=acts.layers,
        meta={"n_train": int(train.sum()), "n_test": int(test.sum()), "contrast": contrasts.name,
              "contrast_fingerprint": contrasts.fingerprint, "k": int(k), "C": float(C)})


def extract(bridge: Any, contrasts: ContrastSet, *, hook: str = "resid_post", layers: Sequence[int] | None = None,
            position: str | PositionRule = "last", methods: Sequence[str] = METHODS, padding_side: str = "right",
            max_tokens: int = 128, k: int = 4, C: float = 1.0, batch_size: int = DEFAULT_BATCH_PAIRS,
            progress: Progress | None = None) -> SteeringExtraction:
    """Collect activations (``batch_size`` contrast pairs per forward pass) and extract every
    method's direction per layer."""
    methods = check_methods(methods)
    rule = PositionRule.parse(position)
    batch_size = check_batch_size(batch_size)
    k = check_k(k, int(bridge.cfg.d_model))
    acts = collect(bridge, contrasts, hook=hook, layers=layers, position=rule, padding_side=padding_side,
                   max_tokens=max_tokens, batch_size=batch_size, progress=progress)
    ext = extract_directions(acts, contrasts, methods=methods, k=k, C=C, progress=progress)
    ext.meta.update({"hook": hook, "position": str(rule), "padding_side": padding_side, "max_tokens": max_tokens,
                     "d_model": int(acts.pos.shape[-1]), "n_layers_model": n_layers(bridge)})
    return ext


def to_result(ext: SteeringExtraction):
    """The store's ``Result``: table, the three arrays, and meta (methods, layers, provenance)."""
    from analysis.store import Result

    return Result(table=ext.table, arrays={"vectors": ext.vectors, "svd_directions": ext.svd_directions,
                                           "svd_values": ext.svd_values},
                  meta={**ext.meta, "methods": list(ext.methods), "layers": list(ext.layers)})


def from_result(result) -> SteeringExtraction:
    """Inverse of ``to_result``."""
    meta = dict(result.meta)
    methods, layers = tuple(meta.pop("methods")), tuple(int(x) for x in meta.pop("layers"))
    return SteeringExtraction(table=result.table, vectors=_readonly(np.asarray(result.arrays["vectors"])),
                              svd_directions=_readonly(np.asarray(result.arrays["svd_directions"])),
                              svd_values=_readonly(np.asarray(result.arrays["svd_values"])), methods=methods,
                              layers=layers, meta=meta)
