"""Recovery metrics (sae/ground_truth.py) on hand-constructed truths whose scores are known exactly.

Constructions: the true dictionary itself (permuted, sign-flipped, rescaled), a brute-force search
over all matchings (the Hungarian optimum), duplicated and missing rows, an SAE that absorbs a
parent into its children on a known set of samples, and codes scaled by a known factor.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from analysis.errors import ConfigError, ShapeError
from sae.ground_truth import abs_cosines, absorption, recovery, score, shrinkage
from sae.synthetic import SyntheticSpec, dictionary, sample


@pytest.fixture
def truth(rng):
    d = rng.standard_normal((40, 16))
    return d / np.linalg.norm(d, axis=1, keepdims=True)


def test_the_true_dictionary_scores_one(truth):
    r = recovery(truth, truth)
    assert (r.mean_max_cosine, r.mcc, r.precision, r.recall) == pytest.approx((1, 1, 1, 1), abs=1e-12)
    np.testing.assert_array_equal(r.matched_latent, np.arange(40))


def test_permuted_sign_flipped_rescaled_dictionary_scores_one(truth, rng):
    perm = rng.permutation(40)
    w = truth[perm] * rng.choice([-1.0, 1.0], size=(40, 1)) * rng.uniform(0.1, 5, size=(40, 1))
    r = recovery(w, truth)
    assert (r.mean_max_cosine, r.mcc, r.precision, r.recall) == pytest.approx((1, 1, 1, 1), abs=1e-12)
    np.testing.assert_array_equal(r.matched_latent[perm], np.arange(40))  # latent k holds feature perm[k]


def test_mcc_is_the_best_one_to_one_matching(rng):
    w, d = rng.standard_normal((6, 5)), rng.standard_normal((6, 5))
    c = np.abs((w / np.linalg.norm(w, axis=1, keepdims=True)) @ (d / np.linalg.norm(d, axis=1, keepdims=True)).T)
    best = max(sum(c[p[i], i] for i in range(6)) for p in itertools.permutations(range(6))) / 6
    r = recovery(w, d)
    assert r.mcc == pytest.approx(best, rel=1e-12)
    np.testing.assert_allclose(r.max_cosine, c.max(axis=0), rtol=1e-12)
    np.testing.assert_allclose(abs_cosines(w, d), c, rtol=1e-12)


def test_extra_and_missing_latents_set_precision_and_recall(truth, rng):
    junk = rng.standard_normal((20, 16))  # random directions: |cos| with a feature far below 0.9 in 16-D
    r = recovery(np.vstack([truth, junk]), truth)
    assert r.recall == 1 and r.precision == pytest.approx(40 / 60)
    r = recovery(truth[:30], truth)  # 10 features have no latent
    assert r.recall == pytest.approx(30 / 40) and r.precision == 1
    assert (r.matched_latent[30:] == -1).all() and r.mcc == pytest.approx(1)
    alive = np.r_[np.ones(40, bool), np.zeros(20, bool)]  # dead junk latents are not counted
    assert recovery(np.vstack([truth, junk]), truth, alive=alive).precision == 1


def test_splitting_counts_aligned_latents():
    d = np.eye(8)
    w = np.vstack([d, d[[2, 2, 5]] + 0.1 * d[[3, 4, 6]]])  # feature 2 in three latents, feature 5 in two
    r = recovery(w, d)
    assert r.n_split.tolist() == [1, 1, 3, 1, 1, 2, 1, 1]


def _hierarchy(n: int, rng):
    """Orthonormal truth: parent 0 with children 1, 2; independent 3, 4. Coefficients with known support."""
    d = np.eye(6)
    a = np.zeros((n, 6))
    parent_on = rng.random(n) < 0.5
    child = np.where(rng.random(n) < 0.6, rng.integers(1, 3, n), 0)
    a[parent_on, 0] = rng.uniform(0.5, 1.5, parent_on.sum())
    for c in (1, 2):
        on = parent_on & (child == c)
        a[on, c] = rng.uniform(0.5, 1.5, on.sum())
    for i in (3, 4, 5):
        on = rng.random(n) < 0.2
        a[on, i] = rng.uniform(0.5, 1.5, on.sum())
    return d, a


@pytest.mark.parametrize("absorbed_share", [0.0, 0.5, 1.0])
def test_a_known_absorbing_sae_has_the_known_absorption(absorbed_share, rng):
    d, a = _hierarchy(4000, rng)
    n = len(a)
    child_on = (a[:, 1] > 0) | (a[:, 2] > 0)
    for c in (1, 2):  # a child as strong as its parent, so one latent can write both exactly
        a[a[:, c] > 0, c] = a[a[:, c] > 0, 0]
    absorb = child_on & (rng.random(n) < absorbed_share)  # samples where the parent latent gives way
    # Latents 0-5 = the features; 6-7 = "child c with its parent", (d_c + d_p)/sqrt(2), which on absorbed
    # samples fire at sqrt(2) a_c and write a_c d_c + a_p d_p while latents 0 and c stay off.
    w = np.vstack([d[0], d[1], d[2], d[3:], (d[1] + d[0]) / np.sqrt(2), (d[2] + d[0]) / np.sqrt(2)])
    f = np.hstack([a, np.zeros((n, 2))])
    for c, latent in ((1, 6), (2, 7)):
        on = absorb & (a[:, c] > 0)
        f[on, latent] = np.sqrt(2) * a[on, c]
        f[on, c] = 0.0
    f[absorb, 0] = 0.0
    np.testing.assert_allclose(f @ w, a @ d, atol=1e-12)  # the absorbing SAE reconstructs exactly
    ab = absorption(recovery(w, d, threshold=0.7), w, d, f, a, parents=[0], children=[[1, 2]])
    both = (a[:, 0] > 0) & child_on
    assert ab.absorption[0] == pytest.approx(absorb[both].mean(), abs=1e-12)
    assert ab.miss_with_child[0] == pytest.approx(absorb[both].mean(), abs=1e-12)
    assert ab.miss_without_child[0] == 0
    assert ab.parent_latent.tolist() == [0]
    if absorbed_share == 1.0:
        assert ab.mean == 1.0


def test_chance_aligned_latents_are_not_absorption(rng):
    d, a = _hierarchy(3000, rng)
    w = np.vstack([d, 0.3 * d[0] + np.sqrt(0.91) * d[4]])  # unit row, cos 0.3 with the parent
    f = np.hstack([a, (a[:, [4]] > 0) * 0.2])  # a weak latent at |cos| 0.3 with the parent fires with feature 4
    f[:, 0] = 0.0
    ab = absorption(recovery(d, d), w, d, f, a, parents=[0], children=[[1, 2]])
    assert ab.absorption[0] == 0 and ab.miss_with_child[0] == 1


def test_a_weak_parent_latent_is_not_absorption(rng):
    d, a = _hierarchy(3000, rng)
    f = a.copy()
    f[:, 0] = 0.0  # the parent latent never fires, and nothing else carries the parent direction
    ab = absorption(recovery(d, d), d, d, f, a, parents=[0], children=[[1, 2]])
    assert ab.absorption[0] == 0 and ab.miss_with_child[0] == 1 and ab.miss_without_child[0] == 1


def test_shrinkage_of_scaled_codes(rng):
    d, a = _hierarchy(2000, rng)
    rec = recovery(d, d)
    s = shrinkage(rec, d, d, 0.8 * a, a)
    np.testing.assert_allclose(s.ratio, 0.8, rtol=1e-12)
    assert s.mean == pytest.approx(0.8) and s.norm_ratio == pytest.approx(0.8)
    s = shrinkage(recovery(2 * d, d), 2 * d, d, a / 2, a)  # decoder norms count
    assert s.mean == pytest.approx(1.0) and s.norm_ratio == pytest.approx(1.0)


def test_score_of_the_truth_on_synthetic_samples():
    spec = SyntheticSpec(n_features=64, d_in=32, mean_l0=3.0, n_parents=4, n_children=2, n_correlated_pairs=2)
    b = sample(spec, 3000)
    D = dictionary(spec)
    s = score(D, D, b.coefficients, b.coefficients, spec.parents, [spec.children(p) for p in spec.parents])
    sc = s.scalars()
    assert sc["mcc"] == pytest.approx(1) and sc["precision"] == 1 and sc["recall"] == 1
    assert sc["absorption"] == 0 and sc["parent_miss_with_child"] == 0
    assert sc["shrinkage"] == pytest.approx(1) and sc["norm_ratio"] == pytest.approx(1)


def test_bad_inputs_name_the_problem(truth):
    with pytest.raises(ShapeError, match="W_dec has width 8 but the dictionary has d_in=16"):
        recovery(np.ones((4, 8)), truth)
    with pytest.raises(ConfigError, match="threshold=1.5"):
        recovery(truth, truth, threshold=1.5)
    with pytest.raises(ShapeError, match="NaN"):
        recovery(truth * np.nan, truth)


def test_shrinkage_leaves_out_missed_samples(rng):
    d, a = _hierarchy(2000, rng)
    f = 0.9 * a
    f[::2] = 0.0  # the latents miss half the samples: recall, not magnitude
    s = shrinkage(recovery(d, d), d, d, f, a)
    np.testing.assert_allclose(s.ratio, 0.9, rtol=1e-12)
    on = np.linalg.norm(a, axis=1) > 0
    assert s.norm_ratio == pytest.approx((0.9 * (np.arange(2000) % 2 == 1))[on].mean())
