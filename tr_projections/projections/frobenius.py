r"""Frobenius projection: the covariance part interpolates covariances.

:math:`\tilde\Sigma = \tau\Sigma + (1-\tau)\Sigma_o` with
:math:`\tau = \min(1, \sqrt{\epsilon_\Sigma / \|\Sigma-\Sigma_o\|_F^2})`; the mean part is the
shared closed form on the Mahalanobis (``scale_prec=True``) or squared Euclidean distance.
"""

from __future__ import annotations

from typing import Any

from .._inputs import Problem
from ..distances import frobenius_cov, mean_distance
from ..gaussian import Gaussian
from ._core import Weights, closed_form_tau, interpolate, project_mean, select

Array = Any


def frobenius_forward(
    p: Problem, eps_mean: Array, eps_cov: Array, *, scale_prec: bool = True
) -> tuple[Gaussian, Weights]:
    xp = p.xp
    dist_mean = mean_distance(
        p.mean, p.old_mean, p.old_scale, full=p.full, scale_prec=scale_prec, xp=xp
    )
    mean, tau_mean = project_mean(p.mean, p.old_mean, dist_mean, eps_mean, xp=xp)

    dist, cov, old_cov = frobenius_cov(p.scale, p.old_scale, full=p.full, xp=xp)
    event_ndim = 2 if p.full else 1
    tau = closed_form_tau(dist, eps_cov, xp=xp)
    cov = interpolate(cov, old_cov, tau, event_ndim=event_ndim, xp=xp)
    scale = xp.linalg.cholesky(cov) if p.full else xp.sqrt(cov)
    scale = select(dist > eps_cov, scale, p.scale, event_ndim=event_ndim, xp=xp)
    return Gaussian(mean, scale), Weights(tau_mean, tau)


__all__ = ["frobenius_forward"]
