"""Synthetic activations from a known sparse dictionary: the ground truth an SAE should recover.

Pure and seeded: ``SyntheticSpec`` (frozen, validated) -> ``dictionary(spec)`` and
``sample(spec, n, seed)``; no I/O. Everything is float64; the dictionary is exact (a function of
``spec.seed`` only), so recovery metrics (``sae.ground_truth``) compare against the truth itself.

The model (cf. SynthSAEBench; Elhage et al. 2022 "Toy models of superposition"; Chanin et al.
2024 "A is for absorption" for the hierarchy), with N = ``n_features`` > d = ``d_in``
(superposition)::

    D     [N, d]   unit rows: i.i.d. Gaussian directions, normalised (seed ``spec.seed``)
    a     [n, N]   non-negative sparse coefficients (below)
    x     [n, d] = a @ D + noise_std * eps,   eps ~ N(0, I_d)

Feature roles, by index:

- parents ``0 .. P-1`` (P = ``n_parents``) and independent features ``P + P*C .. N-1`` (C =
  ``n_children``) fire on their own. Their firing probabilities follow a power law over their
  rank r = 0, 1, ... among these "free" features: ``p_r = c * (r + 1) ** -firing_exponent``,
  ``c`` chosen so that the free features' expected number of active features per sample is
  ``mean_l0`` (``ConfigError`` when that would need some p_r > 1). Parents take the first
  (most frequent) ranks.
- children ``P + p*C + j`` (j < C) of parent p fire only with their parent: given that parent
  p fires, with probability ``child_prob`` exactly one of its C children fires (uniformly
  chosen), otherwise none. A child's marginal frequency is ``p_parent * child_prob / C``.
- correlation: free features fire through a Gaussian copula, ``fire_i = 1{z_i < Phi^-1(p_i)}``
  with ``z ~ N(0, Sigma)``, so every marginal is exactly p_i. Sigma is the identity except for
  ``n_correlated_pairs`` disjoint pairs of consecutive independent features (``correlated_pairs``)
  whose z's have correlation ``correlation``.
- magnitude of an active feature: ``Uniform(magnitude_low, magnitude_high)``, independent.

Noise is isotropic Gaussian (``noise_std`` per dimension). ``sample`` returns the clean signal
``a @ D`` too, so reconstruction can be scored against the signal or the noisy input.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import scipy.sparse as sp
from scipy.special import ndtri

from analysis.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class SyntheticSpec:
    """A synthetic setting (every field documented in the module docstring)."""

    n_features: int = 256
    d_in: int = 64
    mean_l0: float = 6.0  # expected active free features per sample (children come on top)
    firing_exponent: float = 0.5  # power law of the free features' firing probabilities over their rank
    n_parents: int = 8
    n_children: int = 3
    child_prob: float = 0.8
    n_correlated_pairs: int = 8
    correlation: float = 0.6
    magnitude_low: float = 0.5
    magnitude_high: float = 1.5
    noise_std: float = 0.01
    seed: int = 0  # of the dictionary (samples take their own seed)

    def __post_init__(self) -> None:
        def bad(name: str, constraint: str, fix: str) -> ConfigError:
            return ConfigError(f"synthetic spec {name}={getattr(self, name)!r}: {constraint}; {fix}")

        for name in ("n_features", "d_in"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad(name, "must be an integer >= 1", f"pass {name} >= 1")
        for name in ("n_parents", "n_children", "n_correlated_pairs", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise bad(name, "must be an integer >= 0", f"pass {name} >= 0")
        if self.n_free < max(1, self.n_parents):
            raise bad("n_parents", f"with n_children={self.n_children} the hierarchy uses "
                      f"{self.n_parents * (1 + self.n_children)} of n_features={self.n_features}, leaving no "
                      "free features", "use fewer parents or children, or more features")
        if 2 * self.n_correlated_pairs > self.n_independent:
            raise bad("n_correlated_pairs", f"needs {2 * self.n_correlated_pairs} independent features, there are "
                      f"{self.n_independent}", "use fewer pairs")
        for name, lo, hi in (("child_prob", 0.0, 1.0), ("correlation", -1.0, 1.0)):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and lo <= v <= hi) or (name == "correlation" and abs(v) >= 1):
                raise bad(name, f"must be in [{lo}, {hi}]" + (" exclusive" if name == "correlation" else ""),
                          f"pass e.g. {name}=0.5")
        for name in ("mean_l0", "firing_exponent", "noise_std"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise bad(name, "must be a finite number >= 0", f"pass {name} >= 0")
        if self.mean_l0 <= 0:
            raise bad("mean_l0", "must be > 0", "pass e.g. mean_l0=6")
        if not (0 <= self.magnitude_low <= self.magnitude_high and math.isfinite(self.magnitude_high)):
            raise bad("magnitude_low", f"needs 0 <= magnitude_low <= magnitude_high={self.magnitude_high}",
                      "pass e.g. magnitude_low=0.5, magnitude_high=1.5")
        if self.free_probabilities().max() > 1:
            raise bad("mean_l0", f"needs a firing probability {self.free_probabilities().max():.3g} > 1 for the "
                      f"most frequent feature (exponent {self.firing_exponent})",
                      "lower mean_l0 or firing_exponent, or add features")

    # -- structure -------------------------------------------------------------------------------
    @property
    def n_free(self) -> int:
        """Features that fire on their own: parents and independent features."""
        return self.n_features - self.n_parents * self.n_children

    @property
    def n_independent(self) -> int:
        return self.n_free - self.n_parents

    @property
    def parents(self) -> np.ndarray:
        return np.arange(self.n_parents)

    def children(self, parent: int) -> np.ndarray:
        """Indices of the children of ``parent``."""
        start = self.n_parents + parent * self.n_children
        return np.arange(start, start + self.n_children)

    @property
    def independent(self) -> np.ndarray:
        return np.arange(self.n_parents * (1 + self.n_children), self.n_features)

    @property
    def free(self) -> np.ndarray:
        """Free feature indices in rank order (parents first)."""
        return np.concatenate([self.parents, self.independent])

    @property
    def correlated_pairs(self) -> np.ndarray:
        """[n_correlated_pairs, 2] feature indices of the correlated pairs (consecutive independents)."""
        ind = self.independent
        return np.stack([ind[0:2 * self.n_correlated_pairs:2], ind[1:2 * self.n_correlated_pairs:2]], axis=1) \
            if self.n_correlated_pairs else np.zeros((0, 2), dtype=np.int64)

    def free_probabilities(self) -> np.ndarray:
        """Firing probabilities of the free features in rank order (``free``)."""
        w = (np.arange(self.n_free, dtype=np.float64) + 1) ** -float(self.firing_exponent)
        return w * (self.mean_l0 / w.sum())

    def probabilities(self) -> np.ndarray:
        """[N] marginal firing probability of every feature (children: p_parent * child_prob / C)."""
        p = np.zeros(self.n_features)
        p[self.free] = self.free_probabilities()
        for q in range(self.n_parents):
            p[self.children(q)] = p[q] * self.child_prob / self.n_children
        return p

    @property
    def expected_l0(self) -> float:
        """Expected number of active features per sample, children included."""
        return float(self.probabilities().sum())

    @property
    def mean_magnitude(self) -> float:
        return (self.magnitude_low + self.magnitude_high) / 2

    def store_params(self) -> dict:
        return asdict(self)


def dictionary(spec: SyntheticSpec) -> np.ndarray:
    """[n_features, d_in] float64 unit-norm true feature directions (seeded by ``spec.seed``)."""
    rng = np.random.default_rng([spec.seed, 0x5EED])
    d = rng.standard_normal((spec.n_features, spec.d_in))
    return d / np.linalg.norm(d, axis=1, keepdims=True)


@dataclass(frozen=True, eq=False)
class SyntheticBatch:
    """Samples of a spec: ``x`` [n, d_in] (with noise), ``signal`` [n, d_in] = a @ D, ``coefficients``
    a as CSR [n, n_features] (float64)."""

    x: np.ndarray
    signal: np.ndarray
    coefficients: sp.csr_matrix

    def dense_coefficients(self) -> np.ndarray:
        return self.coefficients.toarray()


CHUNK = 16_384  # samples drawn at a time (bounds memory; part of the draw order, so fixed)


def sample(spec: SyntheticSpec, n: int, seed: int = 1) -> SyntheticBatch:
    """``n`` samples of ``spec``, deterministic in ``(spec, n, seed)``.

    Raises ConfigError for n < 1. The data's draws never reuse the dictionary's stream."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"sample count n={n!r} must be an integer >= 1; pass e.g. n=10_000")
    D = dictionary(spec)
    rng = np.random.default_rng([spec.seed, int(seed), 0xDA7A])
    p_free = spec.free_probabilities()
    thresholds = ndtri(np.clip(p_free, 0, 1))  # fire when z < Phi^-1(p): exactly p
    pairs_rank = spec.correlated_pairs - spec.n_parents * spec.n_children  # free rank of an independent
    rho = float(spec.correlation)
    xs, signals, parts = [], [], []
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        z = rng.standard_normal((m, spec.n_free))
        if len(pairs_rank):  # z_b <- rho z_a + sqrt(1 - rho^2) z_b: unit variance, correlation rho
            a_, b_ = pairs_rank[:, 0], pairs_rank[:, 1]
            z[:, b_] = rho * z[:, a_] + math.sqrt(1 - rho * rho) * z[:, b_]
        active = np.zeros((m, spec.n_features), dtype=bool)
        active[:, spec.free] = z < thresholds
        if spec.n_parents and spec.n_children:
            has_child = rng.random((m, spec.n_parents)) < spec.child_prob
            which = rng.integers(0, spec.n_children, size=(m, spec.n_parents))
            rows, par = np.nonzero(active[:, :spec.n_parents] & has_child)
            active[rows, spec.n_parents + par * spec.n_children + which[rows, par]] = True
        mags = rng.uniform(spec.magnitude_low, spec.magnitude_high, size=(m, spec.n_features))
        a = np.where(active, mags, 0.0)
        signal = a @ D
        xs.append(signal + spec.noise_std * rng.standard_normal((m, spec.d_in)))
        signals.append(signal)
        parts.append(sp.csr_matrix(a))
    return SyntheticBatch(np.concatenate(xs), np.concatenate(signals), sp.vstack(parts, format="csr"))
