"""Sparse probing: can k latents of an SAE tell labelled classes apart as well as the raw activations?

Pure: arrays in, a DataFrame out, no I/O (Gao et al. 2024 sec. 4.5; Kantamneni et al. 2025).

For each class c of a labelled set (one-vs-rest), on a balanced binary task (every positive and
as many negatives drawn with ``numpy.random.default_rng(seed)``), split 70/30 (stratified,
``sklearn.model_selection.train_test_split`` with ``random_state=seed``):

- **selection criterion** of a k-sparse probe: the k latents with the largest absolute
  difference of class means on the *training* split, |mean(z | y=1) - mean(z | y=0)| (ties:
  lower index first);
- **probe**: ``StandardScaler`` + ``LogisticRegression(C=1.0, max_iter=2000)`` (sklearn, lbfgs) on
  those k columns, scored by accuracy on the test split (chance = 0.5);
- **baseline**: the same logistic probe on all raw activation dimensions.

Inputs (glossary): ``latents`` [n, d_sae], ``acts`` [n, d_in], ``labels`` [n] (any hashable).
Helpers for offline labels: ``digits_task()`` (sklearn's bundled 8x8 digits: pixels and classes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from analysis.errors import ConfigError, ShapeError

C_REG = 1.0
MAX_ITER = 2000
TEST_FRACTION = 0.3


def mean_difference(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """[d] |mean(z | y=1) - mean(z | y=0)| for binary ``y``."""
    y = np.asarray(y).astype(bool)
    return np.abs(z[y].mean(axis=0) - z[~y].mean(axis=0))


def select_latents(z: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k columns of ``z`` with the largest class-mean difference (ties: lower index)."""
    return np.argsort(-mean_difference(z, y), kind="stable")[:k]


def probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """Test accuracy of a standardised logistic-regression probe (module docstring)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(C=C_REG, max_iter=MAX_ITER))
    return float(model.fit(train_x, train_y).score(test_x, test_y))


def binary_tasks(labels: Sequence[Any], seed: int = 0) -> list[tuple[Any, np.ndarray, np.ndarray]]:
    """One balanced one-vs-rest task per class: (class, sample indices, binary labels). A two-class
    set gives one task (its second class as positive)."""
    labels = np.asarray(labels)
    classes = sorted(set(labels.tolist()), key=str)
    if len(classes) < 2:
        raise ConfigError(f"probing needs >= 2 classes, got {classes}; give labelled samples of several classes")
    rng = np.random.default_rng(seed)
    out = []
    for c in (classes[1:] if len(classes) == 2 else classes):
        pos, neg = np.flatnonzero(labels == c), np.flatnonzero(labels != c)
        n = min(len(pos), len(neg))
        idx = np.sort(np.concatenate([rng.choice(pos, n, replace=False), rng.choice(neg, n, replace=False)]))
        out.append((c, idx, (labels[idx] == c).astype(np.int64)))
    return out


def sparse_probes(latents: Any, acts: Any, labels: Sequence[Any], ks: Sequence[int] = (1, 2, 5), *,
                  seed: int = 0) -> pd.DataFrame:
    """One row per (class, probe): columns class, probe ("sae k=K" or "raw"), k, latents (the chosen
    indices), accuracy, n_train, n_test. Raises ShapeError for row counts that differ, ConfigError for
    a k outside 1..d_sae or a class with fewer than 4 samples."""
    from sklearn.model_selection import train_test_split

    z, x = np.asarray(latents, dtype=np.float64), np.asarray(acts, dtype=np.float64)
    if z.ndim != 2 or x.ndim != 2 or not (len(z) == len(x) == len(labels)):
        raise ShapeError(f"latents {z.shape}, acts {x.shape} and {len(labels)} labels must have the same rows")
    bad = [k for k in ks if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= z.shape[1]]
    if bad or not ks:
        raise ConfigError(f"ks={list(ks)}: each k must be an integer in 1..d_sae={z.shape[1]}; e.g. ks=(1, 2, 5)")
    rows = []
    for c, idx, y in binary_tasks(labels, seed):
        if y.sum() < 2 or (1 - y).sum() < 2:
            raise ConfigError(f"class {c!r} has {int(y.sum())} samples; probing needs >= 2 per side")
        tr, te = train_test_split(np.arange(len(idx)), test_size=TEST_FRACTION, random_state=seed, stratify=y)
        zi, xi = z[idx], x[idx]
        for k in ks:
            chosen = select_latents(zi[tr], y[tr], int(k))
            acc = probe_accuracy(zi[tr][:, chosen], y[tr], zi[te][:, chosen], y[te])
            rows.append({"class": str(c), "probe": f"sae k={k}", "k": int(k), "latents": chosen.tolist(),
                         "accuracy": acc, "n_train": len(tr), "n_test": len(te)})
        rows.append({"class": str(c), "probe": "raw", "k": x.shape[1], "latents": [],
                     "accuracy": probe_accuracy(xi[tr], y[tr], xi[te], y[te]), "n_train": len(tr), "n_test": len(te)})
    return pd.DataFrame(rows)


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean test accuracy per probe over the classes, in the order the probes first appear."""
    order = list(dict.fromkeys(table["probe"]))
    return (table.groupby("probe", sort=False)["accuracy"].mean().reindex(order).rename("mean_accuracy")
            .reset_index())


def digits_task() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's bundled 8x8 digits (no download): pixels [1797, 64] float64 in [0, 16], classes [1797]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.asarray(d.data, dtype=np.float64), np.asarray(d.target)
