r"""Hypothesis strategies for batches of Gaussian policies with controlled conditioning.

All strategies produce float64 NumPy data (convert with your backend's ``asarray``). Random
orthogonal matrices and Gaussian noise come from a NumPy generator seeded by hypothesis, while
the quantities that matter for the numerics (dimension, batch shape, condition number, scale of
the step between old and new policy, bounds) are drawn by hypothesis directly, so failures shrink
towards small, well-conditioned cases.

>>> from hypothesis import given
>>> from tr_projections.testing.strategies import policy_pairs
>>> @given(policy_pairs(kind="full", max_cond=100.0))
... def test(case):
...     assert case.new.scale.shape[-2:] == (case.d, case.d)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from hypothesis import strategies as st

from ..gaussian import Gaussian

__all__ = [
    "PolicyPair",
    "batch_shapes",
    "bounds_for",
    "cholesky_factors",
    "policy_pairs",
    "random_orthogonal",
    "spd_matrices",
]


def random_orthogonal(rng: np.random.Generator, shape: tuple[int, ...], d: int) -> np.ndarray:
    """Haar-distributed orthogonal matrices of shape ``shape + (d, d)``."""
    q, r = np.linalg.qr(rng.standard_normal(shape + (d, d)))
    return q * np.sign(np.diagonal(r, axis1=-2, axis2=-1))[..., None, :]


def _log_eigenvalues(
    rng: np.random.Generator, shape: tuple[int, ...], d: int, cond: float, center: float
) -> np.ndarray:
    """Log-eigenvalues whose spread is exactly ``log(cond)`` (for d >= 2), centred at ``center``."""
    span = np.log(cond)
    u = rng.uniform(0.0, 1.0, size=shape + (d,))
    if d >= 2:  # pin the extremes so the condition number is the one asked for
        u[..., 0], u[..., 1] = 0.0, 1.0
    return center + span * (u - 0.5)


def spd_matrices(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    d: int,
    *,
    cond: float,
    center: float = 0.0,
) -> np.ndarray:
    r"""SPD matrices :math:`Q \operatorname{diag}(w) Q^\top` with condition number ``cond`` and
    eigenvalues log-centred at ``exp(center)``."""
    q = random_orthogonal(rng, shape, d)
    w = np.exp(_log_eigenvalues(rng, shape, d, cond, center))
    m = (q * w[..., None, :]) @ np.swapaxes(q, -1, -2)
    return 0.5 * (m + np.swapaxes(m, -1, -2))


def cholesky_factors(
    rng: np.random.Generator, shape: tuple[int, ...], d: int, *, cond: float, center: float = 0.0
) -> np.ndarray:
    """Lower Cholesky factors of :func:`spd_matrices` (covariance condition number ``cond``)."""
    return np.linalg.cholesky(spd_matrices(rng, shape, d, cond=cond, center=center))


def batch_shapes(max_dims: int = 2, max_side: int = 4) -> st.SearchStrategy[tuple[int, ...]]:
    """Batch shapes with 0 to ``max_dims`` axes of 1 to ``max_side`` elements."""
    return st.lists(st.integers(1, max_side), min_size=0, max_size=max_dims).map(tuple)


class PolicyPair(NamedTuple):
    """A new and an old policy (float64 NumPy) and the kind and dimension they share."""

    new: Gaussian
    old: Gaussian
    full: bool
    d: int
    batch: tuple[int, ...]


@st.composite
def policy_pairs(
    draw: Any,
    *,
    kind: str = "full",
    dims: tuple[int, int] | st.SearchStrategy[int] = (1, 6),
    batch: st.SearchStrategy[tuple[int, ...]] | None = None,
    max_cond: float = 1e3,
    log_std: tuple[float, float] = (-2.0, 2.0),
    max_step: float = 1.0,
    min_step: float = 1e-4,
    shared_old: bool | None = None,
) -> PolicyPair:
    r"""A new policy near an old one, in controlled geometry.

    The old covariance (full or diagonal) has a condition number drawn from ``[1, max_cond]``
    (exactly that number for ``d >= 2``) and a typical std ``exp(u)``, ``u`` in ``log_std``.
    The new policy is the old one moved by a relative step:
    :math:`\mu = \mu_o + L_o z` with :math:`|z|` up to ``max_step`` Mahalanobis units, and
    :math:`\Sigma = L_o R L_o^\top` with :math:`R` SPD of log-eigenvalues within ``max_step``
    of 0. ``dims`` is an inclusive range or a strategy of dimensions; ``batch`` a strategy of
    batch shapes (default :func:`batch_shapes`). Per row the step size is itself random,
    log-uniform in ``[min_step, 1] * max_step``, so one batch mixes states inside and outside
    any moderate bound. With ``shared_old`` (drawn when ``None``) the old policy is a single
    state-independent ``(d,)`` / ``(d, d)`` Gaussian.
    """
    if kind not in ("diag", "full"):
        raise ValueError(f"`kind` must be 'diag' or 'full', got {kind!r}")
    full = kind == "full"
    d = draw(dims if isinstance(dims, st.SearchStrategy) else st.integers(*dims))
    bshape = draw(batch if batch is not None else batch_shapes())
    if shared_old is None:
        shared_old = draw(st.booleans())
    cond = draw(st.floats(1.0, max_cond))
    center = 2.0 * draw(st.floats(*log_std))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)

    old_shape = () if shared_old else bshape
    old_mean = rng.standard_normal(old_shape + (d,)) * np.exp(center / 2)
    if full:
        old_scale = cholesky_factors(rng, old_shape, d, cond=cond, center=center)
    else:  # (the variances are the eigenvalues, in random order)
        log_var = rng.permuted(_log_eigenvalues(rng, old_shape, d, cond, center), axis=-1)
        old_scale = np.exp(0.5 * log_var)

    size = max_step * np.exp(rng.uniform(np.log(min_step), 0.0, size=bshape))
    z = rng.standard_normal(bshape + (d,))
    z *= (size / np.maximum(np.linalg.norm(z, axis=-1), 1e-300))[..., None]
    if full:
        mean = old_mean + (old_scale @ z[..., None])[..., 0]
        r = rng.uniform(-1.0, 1.0, size=bshape + (d,)) * size[..., None]
        q = random_orthogonal(rng, bshape, d)
        R = (q * np.exp(r)[..., None, :]) @ np.swapaxes(q, -1, -2)
        cov = old_scale @ R @ np.swapaxes(old_scale, -1, -2)
        scale = np.linalg.cholesky(0.5 * (cov + np.swapaxes(cov, -1, -2)))
    else:
        mean = old_mean + old_scale * z
        r = rng.uniform(-1.0, 1.0, size=bshape + (d,)) * size[..., None]
        scale = old_scale * np.exp(0.5 * r)
    return PolicyPair(Gaussian(mean, scale), Gaussian(old_mean, old_scale), full, d, bshape)


def bounds_for(
    mean_part: np.ndarray, cov_part: np.ndarray, fraction: st.SearchStrategy[float] | None = None
) -> st.SearchStrategy[tuple[float, float]]:
    """Bounds placed among the given distances, so some states are projected and some are not.

    Each bound is the chosen quantile (``fraction``, default uniform in [0.2, 0.8]) of the
    positive distances, i.e. roughly that fraction of states stays inside its region.
    """
    fraction = fraction if fraction is not None else st.floats(0.2, 0.8)

    def pick(values: np.ndarray, q: float) -> float:
        v = np.asarray(values, dtype=np.float64).ravel()
        v = v[v > 0]
        if v.size == 0:
            return 1e-3
        return float(max(np.quantile(v, q), 1e-12))

    return st.tuples(fraction, fraction).map(
        lambda qs: (pick(mean_part, qs[0]), pick(cov_part, qs[1]))
    )
