"""k-sparse probes (sae/probing.py) against scikit-learn fitted directly, planted signals and the digits.

Independent truths: numpy class means for the selection criterion, sklearn's LogisticRegression /
StandardScaler / train_test_split called here on the same data, a latent that equals the label.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from analysis.errors import ConfigError, ShapeError
from sae.config import SAEConfig
from sae.probing import binary_tasks, digits_task, select_latents, sparse_probes, summary
from sae.train import train_sae


def test_selection_is_the_largest_class_mean_difference(rng):
    z = rng.standard_normal((200, 30))
    y = rng.integers(0, 2, 200)
    diff = np.abs(np.array([z[y == 1, j].mean() - z[y == 0, j].mean() for j in range(30)]))
    assert select_latents(z, y, 4).tolist() == sorted(range(30), key=lambda j: -diff[j])[:4]


def test_a_planted_latent_is_found_and_separates(rng):
    labels = rng.choice(["a", "b", "c"], 300)
    z = rng.standard_normal((300, 20))
    z[:, 7] = (labels == "b") * 3.0  # latent 7 is the "b" detector
    t = sparse_probes(z, rng.standard_normal((300, 5)), labels, ks=(1,))
    row = t[(t["class"] == "b") & (t["probe"] == "sae k=1")].iloc[0]
    assert row["latents"] == [7] and row["accuracy"] == 1.0


def test_probe_accuracies_equal_sklearn_fitted_directly(rng):
    labels = rng.integers(0, 3, 400)
    x = rng.standard_normal((400, 8)) + labels[:, None] * np.linspace(0, 0.6, 8)
    z = np.maximum(x @ rng.standard_normal((8, 24)), 0)
    t = sparse_probes(z, x, labels, ks=(1, 2, 5), seed=3)
    for c, idx, y in binary_tasks(labels, seed=3):
        tr, te = train_test_split(np.arange(len(idx)), test_size=0.3, random_state=3, stratify=y)
        for k in (1, 2, 5):
            zi = z[idx]
            mu = np.abs(zi[tr][y[tr] == 1].mean(0) - zi[tr][y[tr] == 0].mean(0))
            cols = np.argsort(-mu, kind="stable")[:k]
            want = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000)).fit(
                zi[tr][:, cols], y[tr]).score(zi[te][:, cols], y[te])
            got = t[(t["class"] == str(c)) & (t["probe"] == f"sae k={k}")]["accuracy"].item()
            assert got == pytest.approx(want, abs=1e-12)
        raw = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000)).fit(
            x[idx][tr], y[tr]).score(x[idx][te], y[te])
        assert t[(t["class"] == str(c)) & (t["probe"] == "raw")]["accuracy"].item() == pytest.approx(raw, abs=1e-12)
    s = summary(t)
    assert s["probe"].tolist() == ["sae k=1", "sae k=2", "sae k=5", "raw"]
    assert s["mean_accuracy"].iloc[-1] == pytest.approx(t[t["probe"] == "raw"]["accuracy"].mean())


def test_binary_tasks_are_balanced(rng):
    labels = rng.choice(["x", "y", "z"], 500, p=[0.6, 0.3, 0.1])
    for c, idx, y in binary_tasks(labels):
        assert y.sum() * 2 == len(y) and (labels[idx][y == 1] == c).all()
    assert len(binary_tasks(["p", "q"] * 10)) == 1  # two classes: one task


def test_digits_probes_on_an_sae_of_the_pixels():
    x, y = digits_task()
    assert x.shape == (1797, 64) and sorted(set(y.tolist())) == list(range(10))
    cfg = SAEConfig(d_in=64, d_sae=128, architecture="topk", k=8, n_tokens=40 * 256, batch_size=256)
    sae = train_sae(x.astype(np.float32), cfg).sae
    with torch.no_grad():
        z = sae.encode(torch.from_numpy(x.astype(np.float32))).double().numpy()
    t = sparse_probes(z, x, y, ks=(1, 5))
    assert set(t["class"]) == {str(d) for d in range(10)}
    s = dict(zip(*summary(t).T.values))
    assert 0.5 < s["sae k=1"] <= s["sae k=5"] + 0.05 and s["raw"] > 0.9


def test_bad_inputs(rng):
    z, x = rng.standard_normal((20, 4)), rng.standard_normal((20, 3))
    with pytest.raises(ConfigError, match=r"ks=\[9\]: each k must be an integer in 1..d_sae=4"):
        sparse_probes(z, x, [0, 1] * 10, ks=(9,))
    with pytest.raises(ShapeError, match="same rows"):
        sparse_probes(z, x[:5], [0, 1] * 10)
    with pytest.raises(ConfigError, match="needs >= 2 classes"):
        sparse_probes(z, x, [1] * 20, ks=(1,))
