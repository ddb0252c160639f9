r"""Wasserstein-2 projection (commuting approximation): the covariance part interpolates the
symmetric square roots :math:`S = \Sigma^{1/2}`.

:math:`\tilde S = \tau S + (1-\tau) S_o` and :math:`\tilde\Sigma = \tilde S^2`, with the
closed-form weight for :math:`\|S_o^{-1}(S - S_o)\|_F^2` (``scale_prec=True``) or
:math:`\|S - S_o\|_F^2`. For diagonal Gaussians :math:`S` is the vector of standard deviations and
nothing but elementwise arithmetic is needed.
"""

from __future__ import annotations

from typing import Any

from .._inputs import Problem
from ..distances import mean_distance, wasserstein_cov
from ..gaussian import Gaussian, sym
from ._core import Weights, closed_form_tau, interpolate, project_mean, select

Array = Any


def wasserstein_forward(
    p: Problem, eps_mean: Array, eps_cov: Array, *, scale_prec: bool = True
) -> tuple[Gaussian, Weights]:
    xp = p.xp
    dist_mean = mean_distance(
        p.mean, p.old_mean, p.old_scale, full=p.full, scale_prec=scale_prec, xp=xp
    )
    mean, tau_mean = project_mean(p.mean, p.old_mean, dist_mean, eps_mean, xp=xp)

    dist, chart = wasserstein_cov(p.scale, p.old_scale, full=p.full, scale_prec=scale_prec, xp=xp)
    event_ndim = 2 if p.full else 1
    tau = closed_form_tau(dist, eps_cov, xp=xp)
    root = interpolate(chart.root, chart.old_root, tau, event_ndim=event_ndim, xp=xp)
    if p.full:
        scale = xp.linalg.cholesky(sym(xp.matmul(root, root), xp=xp))
    else:
        scale = root
    scale = select(dist > eps_cov, scale, p.scale, event_ndim=event_ndim, xp=xp)
    return Gaussian(mean, scale), Weights(tau_mean, tau)


__all__ = ["wasserstein_forward"]
