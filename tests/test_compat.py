"""The per-library helpers of ``tr_projections._compat`` against plain references."""

from __future__ import annotations

import array_api_compat.numpy as xp
import numpy as np
import pytest

from tr_projections import _compat


@pytest.mark.parametrize("lower", [True, False])
@pytest.mark.parametrize(("d", "k"), [(1, 1), (3, 1), (3, 3), (8, 8), (12, 1), (12, 12)])
def test_batched_triangular_solve_matches_lu(d, k, lower):
    """NumPy batches take the substitution route (one right-hand side, or d <= 8) or the LU
    solve: both agree with ``np.linalg.solve`` and leave their arguments alone."""
    rng = np.random.default_rng(d * 10 + k)
    a = np.tril(rng.uniform(-0.5, 0.5, (7, 2, d, d))) + np.eye(d) * rng.uniform(1, 2, (7, 2, 1, 1))
    if not lower:
        a = np.swapaxes(a, -1, -2).copy()
    b = rng.standard_normal((7, 2, d, k))
    a0, b0 = a.copy(), b.copy()
    got = _compat.solve_triangular(a, b, lower=lower, xp=xp)
    np.testing.assert_allclose(got, np.linalg.solve(a, b), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(a, a0)
    np.testing.assert_array_equal(b, b0)
    assert got.shape == b.shape and got.dtype == b.dtype
