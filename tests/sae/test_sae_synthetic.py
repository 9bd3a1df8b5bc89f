"""The synthetic generator (sae/synthetic.py): its samples' statistics match its parameters.

Independent truths: binomial confidence bounds on firing frequencies, the bivariate normal CDF
(scipy.stats) for the copula's joint firing, the uniform law's mean, and the identity x = a D + noise.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import ndtri
from scipy.stats import multivariate_normal

from analysis.errors import ConfigError
from sae.synthetic import SyntheticSpec, dictionary, sample

SPEC = SyntheticSpec(n_features=96, d_in=24, mean_l0=4.0, firing_exponent=0.6, n_parents=4, n_children=3,
                     child_prob=0.7, n_correlated_pairs=4, correlation=0.7, noise_std=0.05, seed=3)
N = 40_000


@pytest.fixture(scope="module")
def batch():
    return sample(SPEC, N, seed=11)


def _bound(p: np.ndarray, n: int) -> np.ndarray:
    """5 binomial standard deviations of a frequency estimate (plus 1/n for p ~ 0)."""
    return 5 * np.sqrt(p * (1 - p) / n) + 1.0 / n


def test_dictionary_is_exact_unit_float64_and_seeded():
    d = dictionary(SPEC)
    assert d.dtype == np.float64 and d.shape == (96, 24)
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(d, dictionary(SPEC))
    assert not np.allclose(d, dictionary(SyntheticSpec(n_features=96, d_in=24, mean_l0=4.0, seed=4)))


def test_samples_are_deterministic_and_signal_is_a_times_d(batch):
    again = sample(SPEC, 500, seed=11)
    np.testing.assert_array_equal(again.x, sample(SPEC, 500, seed=11).x)
    assert not np.array_equal(again.x, sample(SPEC, 500, seed=12).x)
    a = batch.dense_coefficients()
    np.testing.assert_allclose(batch.signal, a @ dictionary(SPEC), rtol=0, atol=1e-12)
    noise = batch.x - batch.signal
    assert noise.mean() == pytest.approx(0, abs=5 * SPEC.noise_std / np.sqrt(noise.size))
    assert noise.std() == pytest.approx(SPEC.noise_std, rel=0.01)


def test_marginal_frequencies_follow_the_power_law(batch):
    freq = (batch.dense_coefficients() > 0).mean(axis=0)
    p = SPEC.probabilities()
    assert np.all(np.abs(freq - p) <= _bound(p, N))
    free = SPEC.free_probabilities()
    ranks = np.arange(1, SPEC.n_free + 1)
    np.testing.assert_allclose(free[0] / free, ranks ** SPEC.firing_exponent, rtol=1e-12)  # the power law itself
    assert free.sum() == pytest.approx(SPEC.mean_l0, rel=1e-12)
    l0 = (batch.dense_coefficients() > 0).sum(1)
    assert l0.mean() == pytest.approx(SPEC.expected_l0, abs=5 * l0.std() / np.sqrt(N))


def test_children_fire_only_with_their_parent_one_at_a_time(batch):
    a = batch.dense_coefficients() > 0
    for p in SPEC.parents:
        kids = a[:, SPEC.children(p)]
        assert not (kids.any(1) & ~a[:, p]).any()  # never without the parent
        assert kids.sum(1).max() <= 1  # at most one child
        given = kids.any(1)[a[:, p]].mean()
        assert abs(given - SPEC.child_prob) <= _bound(SPEC.child_prob, int(a[:, p].sum()))


def test_correlated_pairs_fire_as_the_gaussian_copula_says(batch):
    a = batch.dense_coefficients() > 0
    p = SPEC.probabilities()
    for i, j in SPEC.correlated_pairs:
        t = ndtri([p[i], p[j]])
        both = multivariate_normal(mean=[0, 0], cov=[[1, SPEC.correlation], [SPEC.correlation, 1]]).cdf(t)
        got = (a[:, i] & a[:, j]).mean()
        assert abs(got - both) <= _bound(both, N)
        assert both > 1.5 * p[i] * p[j]  # really correlated
    i, j = SPEC.independent[-2:]  # an uncorrelated pair of independents
    assert abs((a[:, i] & a[:, j]).mean() - p[i] * p[j]) <= _bound(p[i] * p[j], N)


def test_magnitudes_are_uniform_on_their_interval(batch):
    v = batch.coefficients.data
    assert v.min() >= SPEC.magnitude_low and v.max() <= SPEC.magnitude_high
    width = SPEC.magnitude_high - SPEC.magnitude_low
    assert v.mean() == pytest.approx(SPEC.mean_magnitude, abs=5 * width / np.sqrt(12 * v.size))


@pytest.mark.parametrize("kw, match", [
    ({"mean_l0": 500.0}, "mean_l0=500.0: needs a firing probability"),
    ({"n_features": 0}, "n_features=0: must be an integer >= 1"),
    ({"n_parents": 40, "n_children": 3, "n_features": 100}, "leaving no free features"),
    ({"correlation": 1.0}, "correlation=1.0"),
    ({"magnitude_low": 2.0}, "magnitude_low=2.0"),
], ids=str)
def test_bad_specs_name_the_field(kw, match):
    with pytest.raises(ConfigError, match=match):
        SyntheticSpec(**kw)


def test_bad_sample_count():
    with pytest.raises(ConfigError, match="n=0"):
        sample(SPEC, 0)
