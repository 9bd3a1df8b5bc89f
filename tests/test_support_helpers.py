"""The shared float32 comparison of tests/_support.py: it must pass rounding noise and fail real differences."""

from __future__ import annotations

import numpy as np
import pytest

from _support import F32_EPS, assert_close_f32


def test_rounding_noise_of_the_magnitude_passes_and_a_leak_fails(rng):
    x = rng.standard_normal((2, 5, 384)) * np.array([30.0, 9.0])[:, None, None]  # two layers, 3x apart in scale
    noisy = x + rng.uniform(-6, 6, x.shape) * F32_EPS * np.abs(x).max()  # 6 eps32 of the largest value
    assert_close_f32(noisy, x)
    leaked = x.copy()
    leaked[1, 2, 7] += 1e-2 * np.abs(x[1]).max()  # what a padding bug does, at 1e-2 of the magnitude
    with pytest.raises(AssertionError, match="bound 64 eps32"):
        assert_close_f32(leaked, x)


def test_per_layer_scale_is_stricter_on_the_smaller_layer(rng):
    x = rng.standard_normal((2, 100)) * np.array([[30.0], [1.0]])
    off = x.copy()
    off[1, 0] += 1e-4  # within 64 eps32 of layer 0's scale (~90: 6.9e-4), not of layer 1's (~3: 2.3e-5)
    assert_close_f32(off, x)  # passes against the global scale
    with pytest.raises(AssertionError):
        assert_close_f32(off, x, per_leading_index=True)


def test_shapes_must_match():
    with pytest.raises(AssertionError):
        assert_close_f32(np.zeros(3), np.zeros(4))
