r"""Frobenius projection: the covariance part interpolates covariances.

:math:`\tilde\Sigma = \tau\Sigma + (1-\tau)\Sigma_o` with
:math:`\tau = \min(1, \sqrt{\epsilon_\Sigma / \|\Sigma-\Sigma_o\|_F^2})`; the mean part is the
shared closed form on the Mahalanobis (``scale_prec=True``) or squared Euclidean distance.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .._compat import cholesky, row_sum
from .._inputs import Problem, unbroadcast
from .._rows import choose, fields, from_fields, put, take, take_batch
from ..distances import frobenius_cov, mean_distance
from ..gaussian import Gaussian, sym
from ._core import (
    Cotangents,
    closed_form_tau,
    closed_form_tau_vjp,
    cov_problem,
    interpolate,
    marked_cov_problem,
    mean_residuals,
    old_scale_cotangent,
    project_mean,
    project_mean_vjp,
    scale_cotangent,
    select,
    spread,
)
from ._vjp_core import cholesky_vjp, expand, gram_vjp, tril

Array = Any


class FrobeniusResiduals(NamedTuple):
    """What :func:`frobenius_vjp` needs from the forward pass: flat, arrays only. The covariance
    fields cover the rows ``rows`` of the flattened batch (every row when ``rows`` is ``None``)."""

    tau_mean: Array
    dist_mean: Array
    active_mean: Array
    tau: Array
    dist: Array
    active: Array
    proj_scale: Array  # the projected scale on every row, before inactive rows are restored
    diff: Array  # Sigma - Sigma_o (variances for diagonals)
    rows: Array | None
    row_mask: Array | None
    shared: Array | None  # the covariance part's batch, where smaller (see _core.cov_problem)


def frobenius_fwd(
    p: Problem, eps_mean: Array, eps_cov: Array, *, scale_prec: bool = True
) -> tuple[Gaussian, FrobeniusResiduals]:
    """The Frobenius projection of ``p``, its weights and the residuals of its VJP (with eager
    arrays the output factor and the VJP cover only the rows outside their bound)."""
    xp = p.xp
    dist_mean = mean_distance(
        p.mean, p.old_mean, p.old_scale, full=p.full, scale_prec=scale_prec, xp=xp
    )
    mean, tau_mean = project_mean(p.mean, p.old_mean, dist_mean, eps_mean, xp=xp)
    batch = p.batch
    p, shared = cov_problem(p, eps_cov)  # (the covariance part once per distinct covariance)

    dist, cov, old_cov = frobenius_cov(p.scale, p.old_scale, full=p.full, xp=xp)
    ev = 2 if p.full else 1
    # Eager full scales: the output factor and the VJP on the rows outside their bound only
    # (diagonal ones are a few elementwise passes, cheaper than the gather).
    rows = choose(dist > eps_cov, xp=xp) if p.full else None
    cov, old_cov, scale = (take(x, rows, event_ndim=ev, xp=xp) for x in (cov, old_cov, p.scale))
    diff = cov - old_cov  # kept for the VJP, symmetric
    if p.full:
        diff = sym(diff, xp=xp)
    dist = take(dist, rows, event_ndim=0, xp=xp)
    eps_cov = take_batch(eps_cov, rows, p.batch, xp=xp)
    tau = closed_form_tau(dist, eps_cov, xp=xp)
    # The convex combination, positive definite up to rounding however close tau is to 1
    # (old + tau * diff is not, when the new covariance is tiny next to the old one).
    cov = interpolate(cov, old_cov, tau, event_ndim=ev, xp=xp)
    proj = cholesky(cov, xp=xp) if p.full else xp.sqrt(cov)
    active = dist > eps_cov
    scale = put(
        select(active, proj, scale, event_ndim=ev, xp=xp), rows, p.scale, event_ndim=ev, xp=xp
    )
    res = FrobeniusResiduals(
        tau_mean, dist_mean, dist_mean > eps_mean, tau, dist, active, proj, diff,
        *fields(rows), shared,
    )  # fmt: skip
    return Gaussian(mean, spread(scale, batch, event_ndim=ev, xp=xp)), res


def frobenius_vjp(
    p: Problem,
    res: FrobeniusResiduals,
    g_mean: Array,
    g_scale: Array,
    *,
    scale_prec: bool = True,
    old: bool = True,
) -> Cotangents:
    r"""Cotangents of ``(mean, scale, old_mean, old_scale)`` of :func:`frobenius_fwd`.

    Covariance part, active rows: :math:`\bar{\tilde\Sigma}` from the Cholesky VJP (full) or
    :math:`\bar{\tilde\sigma} / (2\tilde\sigma)` (diagonal); with :math:`D = \Sigma - \Sigma_o`,
    :math:`\bar d = \langle\bar{\tilde\Sigma}, D\rangle\,\partial\tau/\partial d` and
    :math:`\bar D = \tau\bar{\tilde\Sigma} + 2\bar d D`, so :math:`\bar\Sigma = \bar D` and
    :math:`\bar\Sigma_o = \bar{\tilde\Sigma} - \bar D`, then :math:`\Sigma = LL^\top` back to the
    scales. Inactive rows pass ``g_scale`` through unchanged. Without ``old`` the old policy's
    cotangents are skipped (``None``).
    """
    xp, full = p.xp, p.full
    m = project_mean_vjp(
        g_mean, p.mean, p.old_mean, p.old_scale, mean_residuals(res),
        coef=1.0, scale_prec=scale_prec, full=full, xp=xp, old=old,
    )  # fmt: skip
    event_ndim = 2 if full else 1
    rows = from_fields(res.rows, res.row_mask)
    p = marked_cov_problem(p, res.shared)  # (a shared covariance: its own batch)
    g_scale = unbroadcast(g_scale, p.scale, xp=xp)  # (summed over the states sharing it)
    if full:
        g_scale = tril(g_scale, xp=xp)
    g_all = g_scale
    g_scale, scale, old_scale = (
        take(x, rows, event_ndim=event_ndim, xp=xp) for x in (g_scale, p.scale, p.old_scale)
    )
    D = res.diff
    if full:
        cov_bar = cholesky_vjp(res.proj_scale, g_scale, xp=xp)
        tau_bar = xp.sum(cov_bar * D, axis=(-2, -1))
    else:
        cov_bar = 0.5 * g_scale / res.proj_scale
        tau_bar = row_sum(cov_bar * D, xp=xp)
    dist_bar = closed_form_tau_vjp(tau_bar, res.tau, res.dist, res.active, xp=xp)
    D_bar = (
        expand(res.tau, event_ndim, xp=xp) * cov_bar + 2.0 * expand(dist_bar, event_ndim, xp=xp) * D
    )
    if full:
        scale_bar = gram_vjp(D_bar, scale, xp=xp)
    else:
        scale_bar = 2.0 * D_bar * scale
    scale_bar = scale_cotangent(
        scale_bar, g_scale, res.active, rows, g_all, event_ndim=event_ndim, xp=xp, owned=full
    )
    if not old:
        return Cotangents(m.mean, scale_bar, None, None)
    old_bar = cov_bar - D_bar
    if full:
        old_scale_bar = gram_vjp(old_bar, old_scale, xp=xp)
    else:
        old_scale_bar = 2.0 * old_bar * old_scale
    old_scale_bar = old_scale_cotangent(
        old_scale_bar, res.active, rows, m.old_scale, p.old_scale, event_ndim=event_ndim, xp=xp
    )
    return Cotangents(m.mean, scale_bar, m.old_mean, old_scale_bar)


__all__ = ["FrobeniusResiduals", "frobenius_fwd", "frobenius_vjp"]
