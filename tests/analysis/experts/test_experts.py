"""Expert-specialisation metrics (analysis/experts/specialisation.py) on cases built by hand with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from analysis.experts import specialisation as ex
from analysis.errors import ConfigError, ShapeError

# 6 samples, 3 experts, 3 classes
GATES = np.array([[1.0, 0.0, 0.0],
                  [1.0, 0.0, 0.0],
                  [0.5, 0.5, 0.0],
                  [0.0, 1.0, 0.0],
                  [0.0, 0.4, 0.6],
                  [0.0, 0.0, 1.0]])
LABELS = np.array([0, 0, 1, 1, 2, 2])


def h2(*p: float) -> float:
    """Entropy in bits written out."""
    return -sum(x * math.log2(x) for x in p if x > 0)


def test_gate_statistics_by_hand():
    np.testing.assert_array_equal(ex.expert_load(GATES), [3, 2, 2])  # a >= 0.5
    np.testing.assert_array_equal(ex.expert_load(GATES, 0.9), [2, 1, 1])
    np.testing.assert_allclose(ex.expert_usage(GATES), [2.5 / 6, 1.9 / 6, 1.6 / 6])
    np.testing.assert_allclose(ex.usage_entropy(GATES), h2(2.5 / 6, 1.9 / 6, 1.6 / 6))
    m = ex.expert_class_matrix(GATES, LABELS, 3)
    np.testing.assert_allclose(m, [[1.0, 0.25, 0.0], [0.0, 0.75, 0.2], [0.0, 0.0, 0.8]])
    # gate mass per class: expert 0 (2, 0.5, 0), expert 1 (0, 1.5, 0.4), expert 2 (0, 0, 1.6)
    np.testing.assert_allclose(ex.class_entropy(GATES, LABELS, 3), [h2(0.8, 0.2), h2(1.5 / 1.9, 0.4 / 1.9), 0.0])
    idx, val = ex.top_examples(GATES, 2)
    np.testing.assert_array_equal(idx, [[0, 1], [3, 2], [5, 4]])  # tie at 1.0: lower index first
    np.testing.assert_allclose(val, [[1.0, 1.0], [1.0, 0.5], [1.0, 0.6]])


def test_absent_class_and_unused_expert_are_nan():
    m = ex.expert_class_matrix(GATES, LABELS, 4)
    assert np.isnan(m[:, 3]).all()
    g = np.hstack([GATES, np.zeros((6, 1))])
    assert np.isnan(ex.class_entropy(g, LABELS, 3)[3])
    assert ex.usage_entropy(np.full((4, 8), 1 / 8)) == pytest.approx(3.0)


# ------------------------------------------------------------------------------------- ablation
BASE = np.array([0, 0, 1, 1, 2, 2, 2, 2])  # predictions with every expert on
Y = np.array([0, 0, 1, 1, 2, 2, 2, 0])  # sample 7 is an error (class 0 predicted 2)
FLIPS = {0: {0: 1, 1: 1, 2: 2, 3: 2}, 1: {4: 0, 5: 0, 6: 1}, 2: {}}  # expert -> {sample: new prediction}


def table_logits(scale: np.ndarray) -> np.ndarray:
    """Logits 1 on the base prediction; ablating expert k adds 2 to the new class of its flips."""
    z = np.zeros((8, 3))
    z[np.arange(8), BASE] = 1.0
    for k, flips in FLIPS.items():
        if scale[k] == 0:
            for b, c in flips.items():
                z[b, c] += 2.0
    return z


def test_ablation_flips_drops_and_polysemanticity():
    abl = ex.ablate_experts(table_logits, 3, Y, 3, min_flips=3, null_draws=8)
    t = abl.table.set_index("expert")
    assert [list(f) for f in abl.flipped] == [[0, 1, 2, 3], [4, 5, 6], []]
    assert abl.base_accuracy == pytest.approx(7 / 8)
    # expert 0 flips two class-0 and two class-1 predictions: 1 bit; expert 1 only class 2: 0 bits
    assert t.loc[0, "polysemanticity"] == pytest.approx(1.0)
    assert t.loc[1, "polysemanticity"] == pytest.approx(0.0)
    assert math.isnan(t.loc[2, "polysemanticity"])  # no flips (< min_flips)
    # per-class accuracy: class 0 = samples {0, 1, 7}: 2/3 -> 0; class 1: 1 -> 0; class 2 {4, 5, 6}: 1 -> 0 for e1
    np.testing.assert_allclose(abl.per_class_drop[0], [2 / 3, 1.0, 0.0])
    np.testing.assert_allclose(abl.per_class_drop[1], [0.0, 0.0, 1.0])
    np.testing.assert_allclose(abl.per_class_drop[2], 0.0)
    assert list(t["n_classes_hurt"]) == [2, 1, 0]
    assert list(t["top_class"]) == [0, 2, -1]
    np.testing.assert_allclose(t["accuracy_drop"], [4 / 8, 3 / 8, 0.0])
    # effect-weighted: a flipped sample's base-class probability falls from e/(e+2) to e/(e+e^2+1)
    d = math.e / (math.e + 2) - math.e / (math.e + math.e**2 + 1)
    assert t.loc[0, "effect"] == pytest.approx(4 * d)
    assert t.loc[0, "effect_polysemanticity"] == pytest.approx(1.0)  # equal mass on classes 0 and 1
    assert math.isnan(t.loc[1, "effect_polysemanticity"])  # 3 d = 0.99 < min_effect = 1
    assert t.loc[2, "effect"] == 0.0
    mean, null, counted = ex.mean_polysemanticity(abl)
    assert (mean, counted) == (pytest.approx(0.5), 2)


def test_null_is_the_entropy_of_shuffled_predictions():
    abl = ex.ablate_experts(table_logits, 3, Y, 3, min_flips=3, null_draws=5, seed=7)
    rng = np.random.default_rng(7)
    shuffles = [rng.permutation(BASE) for _ in range(5)]
    want = np.mean([ex.polysemanticity(s[[0, 1, 2, 3]], 3) for s in shuffles])
    assert abl.table.loc[0, "null_polysemanticity"] == pytest.approx(want)
    assert 0 <= want <= math.log2(3)


def test_polysemanticity_values():
    assert ex.polysemanticity(np.array([0, 1, 2, 3]), 4) == pytest.approx(2.0)
    assert ex.polysemanticity(np.array([2, 2, 2]), 4) == 0.0
    assert math.isnan(ex.polysemanticity(np.array([1, 2]), 4, min_flips=3))
    assert ex.polysemanticity(np.array([0, 0, 0, 1]), 2) == pytest.approx(h2(0.75, 0.25))


def test_specialisation_report_combines_everything():
    gates = np.zeros((8, 3))
    gates[[0, 1, 2, 3], 0] = 1.0
    gates[[4, 5, 6], 1] = 1.0
    gates[7, 2] = 1.0
    rep = ex.specialisation(gates, Y, 3, table_logits, top_k=2, null_draws=4)
    assert rep.summary["n_experts"] == 3 and rep.summary["n_experts_counted"] == 2
    assert rep.summary["mean_polysemanticity"] == pytest.approx(0.5)
    assert rep.summary["usage_entropy"] == pytest.approx(h2(4 / 8, 3 / 8, 1 / 8))
    assert list(rep.experts["load"]) == [4, 3, 1]
    assert list(rep.experts["top_class_by_gate"]) == [1, 2, 0]  # class 1 samples all use expert 0
    assert rep.top_index.shape == (3, 2)


def test_bias_correction_on_a_constructed_model():
    # two classes; samples 0, 1 are class 1 (target) but expert 0 pushes them to class 0
    common = np.array([[0, 1], [0, 1], [1, 0], [1, 0]], dtype=float)
    e0 = np.array([[2, 0], [2, 0], [0.5, 0], [0.5, 0]])
    e1 = np.zeros((4, 2))
    labels = np.array([1, 1, 0, 0])

    def logits(scale):
        return common + scale[0] * e0 + scale[1] * e1

    b = ex.bias_correction(logits, labels, logits, labels, 2, 2, n_scaled=3)
    assert b.target == 1  # the class with the lowest accuracy (0 of 2)
    assert b.n_errors == 2
    # responsibility: each error's wrong margin 2 - 1 = 1 becomes 0 - 1 = -1: 2 per error
    np.testing.assert_allclose(b.responsibility, [4.0, 0.0])
    np.testing.assert_allclose(b.harm, [1.0, 0.0])  # correct margins 1.5 -> 1.0 on two samples
    np.testing.assert_allclose(b.score, [4 / 2 - 1 / 2, 0.0])
    assert b.experts == (0,)
    t = b.table.set_index("class")
    assert (t.loc[1, "before"], t.loc[1, "after"], t.loc[0, "after"]) == (0.0, 1.0, 1.0)
    assert (b.accuracy_before, b.accuracy_after) == (0.5, 1.0)
    half = ex.bias_correction(logits, labels, logits, labels, 2, 2, scale=0.6)
    np.testing.assert_allclose(half.table["after"], [1.0, 0.0])  # 0.6 * 2 = 1.2 > 1: still wrong


def test_bad_input_is_typed():
    with pytest.raises(ConfigError, match="needs class labels"):
        ex.expert_class_matrix(GATES, None, 3)
    with pytest.raises(ShapeError, match=r"labels must be \(6,\)"):
        ex.expert_class_matrix(GATES, LABELS[:4], 3)
    with pytest.raises(ConfigError, match="integer class indices"):
        ex.class_entropy(GATES, LABELS.astype(float), 3)
    with pytest.raises(ShapeError, match="n_samples, n_experts"):
        ex.expert_load(np.zeros(5))
    with pytest.raises(ShapeError, match="expected \\(n_samples=8, C=4\\)"):
        ex.ablate_experts(table_logits, 3, Y, 4)
    with pytest.raises(ConfigError, match="scaling down"):
        ex.bias_correction(table_logits, Y, table_logits, Y, 3, 3, scale=1.5)
