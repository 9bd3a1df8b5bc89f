"""How much a fine-tuned encoder forgot, and how well it learned (pure; numpy/torch in, numbers out).

Used by the KappaTune forgetting experiment (``analysis.weights.forgetting``):

- ``cosine_drift``: per held-out text, 1 − cos(embedding before, embedding after), in [0, 2];
- ``similarity_spearman``: Spearman ρ between the upper triangles (i < j) of the pairwise
  cosine-similarity matrices before and after (1 = the geometry of the held-out set is kept);
- ``accuracy``: share of task texts whose argmax logit is their label;
- ``changed_tensors``: the parameters that moved (bitwise) during fine-tuning;
- ``summarise``: one row per arm, mean and sample std (ddof=1) over seeds;
- ``batches``: the seeded index batches both experiment designs train on.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from analysis.errors import ShapeError

METRICS = ("accuracy", "drift", "spearman", "n_params", "n_tensors", "seconds")
SUMMARY_COLUMNS = ("arm", "n_seeds", *(f"{m}_{s}" for m in METRICS for s in ("mean", "std")))


def cosine_drift(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """1 − cos(before_i, after_i) per row of two (n, d) arrays (rows need not be unit norm); (n,)."""
    a, b = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ShapeError(f"expected two (n, d) arrays of the same shape, got {a.shape} and {b.shape}")
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return 1.0 - np.clip(cos, -1.0, 1.0)


def similarity_spearman(before: np.ndarray, after: np.ndarray) -> float:
    """Spearman correlation between the upper triangles (i < j) of the pairwise cosine-similarity
    matrices of ``before`` and ``after`` (n, d); needs n >= 3."""
    a, b = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] < 3:
        raise ShapeError(f"expected two (n, d) arrays of the same shape with n >= 3, got {a.shape} and {b.shape}")
    from scipy.stats import spearmanr

    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    iu = np.triu_indices(a.shape[0], k=1)
    return float(spearmanr((a @ a.T)[iu], (b @ b.T)[iu]).statistic)


def accuracy(head: nn.Linear, embeddings: np.ndarray, labels: np.ndarray) -> float:
    """Share of rows of ``embeddings`` (n, d_model) whose argmax logit equals the label (the head
    runs on its own device)."""
    device = head.weight.device
    with torch.inference_mode():
        pred = head(torch.from_numpy(embeddings).to(device)).argmax(-1).cpu().numpy()
    return float((pred == labels).mean())


def changed_tensors(before: nn.Module, after: nn.Module) -> list[str]:
    """Names of parameters whose values differ (bitwise) between two copies of one architecture."""
    b = dict(before.named_parameters())
    return [n for n, p in after.named_parameters() if not torch.equal(p.detach(), b[n].detach())]


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per arm (first-appearance order): ``<metric>_mean`` and ``<metric>_std`` (ddof=1)
    for accuracy, drift, spearman, n_params, n_tensors, seconds, and ``n_seeds``."""
    rows = []
    for arm, g in runs.groupby("arm", sort=False):
        row: dict[str, Any] = {"arm": arm, "n_seeds": len(g)}
        for m in METRICS:
            row[f"{m}_mean"] = float(g[m].mean())
            row[f"{m}_std"] = float(g[m].std(ddof=1)) if len(g) > 1 else math.nan
        rows.append(row)
    return pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))


def batches(n: int, batch_size: int, steps: int, seed: int) -> list[np.ndarray]:
    """``steps`` index batches, one seeded permutation per epoch."""
    rng = np.random.default_rng(seed)
    order: list[int] = []
    out = []
    for _ in range(steps):
        while len(order) < batch_size:
            order.extend(rng.permutation(n).tolist())
        out.append(np.array(order[:batch_size]))
        del order[:batch_size]
    return out
