"""Random test data shared by the test modules: plain NumPy, float64, from a given generator."""

from __future__ import annotations

import numpy as np


def spd(rng: np.random.Generator, shape: tuple[int, ...], d: int) -> np.ndarray:
    """Well-conditioned SPD matrices of shape ``shape + (d, d)``: ``M M^T + d I``."""
    m = rng.standard_normal(shape + (d, d))
    return m @ np.swapaxes(m, -1, -2) + d * np.eye(d)


#: A float32 matrix whose first column's norm (2.5e38) is representable but whose
#: ``x0 + |x|`` (4.5e38) is not: a Householder reflector of the unscaled column overflows.
NEAR_FLOAT32_MAX = np.array([[[2e38, 1.0, 2.0], [1.5e38, -3.0, 1.0], [0.0, 2.0, 5.0]]], np.float32)


def full_policies(rng: np.random.Generator, n: int, d: int) -> tuple[np.ndarray, ...]:
    """``(mean, scale, old_mean, old_scale)`` of ``n`` full ``d``-dimensional Gaussians, the new
    covariances scaled by factors in [0.3, 3] so that some states are outside their bounds."""
    old_scale = np.linalg.cholesky(spd(rng, (n,), d))
    scale = np.linalg.cholesky(spd(rng, (n,), d) * rng.uniform(0.3, 3.0, (n, 1, 1)))
    mean, old_mean = rng.standard_normal((2, n, d))
    return mean, scale, old_mean, old_scale
