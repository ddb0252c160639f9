r"""The trust-region loss: keep the network's raw output close to its own projection.

After projecting, the policy network is regressed towards the projection so that its unprojected
output does not drift away from the trust region over many updates:

.. math:: \ell(s) = d\big(\pi_\theta(s),\ \mathrm{sg}(\tilde\pi(s))\big),

with the projection's own distance :math:`d` (mean part plus covariance part), the raw output
first and the stop-gradient projection in the "old" slot. Training loops use
``coeff * mean(loss)``.

The gradient with respect to ``(mean, scale)`` is hand written like the projections' VJPs and
registered the same way; the projected arguments get a zero cotangent. It stays finite where the
raw output equals its projection (every state inside its region), which differentiating through
an ``eigh`` would not (the W2 root's eigenvectors are used, never differentiated).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ._compat import row_sum, solve_triangular
from ._inputs import Problem, unbroadcast
from .distances import (
    frobenius_cov,
    kl_cov_closed,
    kl_cov_from_eigs,
    kl_eigs,
    mean_distance,
    wasserstein_chart,
)
from .gaussian import covariance, diag_embed, diagonal, mT
from .projections._core import cov_problem, marked_cov_problem
from .projections._vjp_core import gram_vjp, sqrtm_vjp, tril, w2_slopes
from .projections.wasserstein import root_distance, root_times

__all__ = ["LossResiduals", "loss_fwd", "loss_vjp", "trust_region_loss"]

Array = Any
METHODS = ("kl", "frobenius", "wasserstein")


class LossResiduals(NamedTuple):
    """Eigenbasis of the raw covariance and the roots (full W2 only; ``None`` otherwise), and
    the covariance part's batch where the scales share it (see :func:`loss_fwd`)."""

    U: Array | None
    s: Array | None
    root: Array | None
    old_root: Array | None
    old_root_inv: Array | None
    shared: Array | None = None


def _check_method(method: Any) -> None:
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {list(METHODS)}, got {method!r}")


def loss_fwd(
    p: Problem, *, method: str, scale_prec: bool = True, root: bool = False
) -> tuple[Array, LossResiduals]:
    """Per-state ``d(new, old)`` for ``p`` (old = the projection) and the VJP's residuals.
    With ``root`` (W2 only) full scales are symmetric roots: :func:`_root_loss`. ``method`` and
    ``root`` are the operation's, checked (:func:`check_options`) before the value checks.

    The covariance part depends on the two scales alone: where both are shared along batch
    axes (a state-independent covariance and its projection, each passed once), it is computed
    once per distinct pair (:func:`~tr_projections.projections._core.cov_problem`) and added to
    every state's mean part."""
    xp = p.xp
    pc, shared = cov_problem(p)  # (no bound: the scales' part, at its own batch)
    none = LossResiduals(None, None, None, None, None, shared)
    if root and p.full:
        return _root_loss(p, pc, shared, scale_prec=scale_prec)
    if method == "kl":
        m = 0.5 * mean_distance(
            p.mean, p.old_mean, p.old_scale, full=p.full, scale_prec=True, xp=xp
        )
        if p.full:
            return m + kl_cov_closed(pc.scale, pc.old_scale, xp=xp), none
        eigs = kl_eigs(pc.scale, pc.old_scale, full=False, vectors=False, xp=xp)
        return m + kl_cov_from_eigs(eigs, xp=xp), none
    m = mean_distance(p.mean, p.old_mean, p.old_scale, full=p.full, scale_prec=scale_prec, xp=xp)
    if method == "frobenius":
        c, _, _ = frobenius_cov(pc.scale, pc.old_scale, full=p.full, xp=xp)
        return m + c, none
    c, chart, eig = wasserstein_chart(
        pc.scale, pc.old_scale, full=p.full, scale_prec=scale_prec, xp=xp
    )
    if not p.full:
        return m + c, none
    res = LossResiduals(eig.U, eig.s, chart.root, chart.old_root, chart.old_root_inv, shared)
    return m + c, res


def check_options(method: str, root: bool, scale_prec: bool = True) -> None:
    """A ``ValueError`` for an unknown method, ``root=True`` with a method other than W2, or
    ``scale_prec=False`` with KL (whose distance is always scaled by the old precision)."""
    _check_method(method)
    if root and method != "wasserstein":
        raise ValueError(
            f"`root=True` (scales given as symmetric square roots) applies to "
            f"method='wasserstein' only, got method={method!r}"
        )
    if not scale_prec and method == "kl":
        raise ValueError(
            "`scale_prec=False` applies to method='frobenius' and 'wasserstein' only: the KL "
            "distance is always scaled by the old precision; got method='kl'"
        )


def _root_loss(
    p: Problem, pc: Problem, shared: Array | None, *, scale_prec: bool
) -> tuple[Array, LossResiduals]:
    r"""The W2 loss of symmetric-root scales: :math:`\|R\delta\|^2 + \|R(S - S_p)\|_F^2`
    with :math:`R = S_p^{-1}` (without ``scale_prec``: :math:`\|\delta\|^2 + \|S -
    S_p\|_F^2`); the residuals keep :math:`R` (``old_root_inv``) at the scales' batch."""
    xp = p.xp
    c, R, _ = root_distance(pc.scale, pc.old_scale, scale_prec=scale_prec, xp=xp)
    z = root_times(R, p.mean - p.old_mean, xp=xp)
    return row_sum(z * z, xp=xp) + c, LossResiduals(None, None, None, None, R, shared)


def _mean_grad(p: Problem, *, coef: float, scale_prec: bool, xp: Any) -> Array:
    r""":math:`\partial/\partial\mu` of ``coef`` times the mean part: :math:`2c\Sigma_o^{-1}\delta`
    (or :math:`2c\delta` unscaled)."""
    delta = p.mean - p.old_mean
    if not scale_prec:
        return (2.0 * coef) * delta
    if not p.full:
        return (2.0 * coef) * delta / (p.old_scale * p.old_scale)
    z = solve_triangular(p.old_scale, delta[..., None], lower=True, xp=xp)
    w = solve_triangular(mT(p.old_scale, xp=xp), z, lower=False, xp=xp)[..., 0]
    return (2.0 * coef) * w


def _scale_grad(p: Problem, res: LossResiduals, *, method: str, scale_prec: bool, xp: Any):
    """Derivative of the covariance part with respect to the raw scale (lower triangular)."""
    L, L_o = p.scale, p.old_scale
    if method == "kl":
        # d/dSigma = (Lambda_o - Lambda) / 2  =>  L_bar = tril(Lambda_o L) - tril(L^-T).
        if not p.full:
            return L / (L_o * L_o) - 1.0 / L
        Y = solve_triangular(L_o, L, lower=True, xp=xp)
        X = solve_triangular(mT(L_o, xp=xp), Y, lower=False, xp=xp)
        return tril(X, xp=xp) - diag_embed(1.0 / diagonal(L, xp=xp), xp=xp)
    if method == "frobenius":
        if not p.full:
            return 4.0 * L * (L * L - L_o * L_o)
        diff = covariance(L, full=True, xp=xp) - covariance(L_o, full=True, xp=xp)
        return gram_vjp(2.0 * diff, L, xp=xp)
    # Wasserstein: chart S = Sigma^(1/2); stds for diagonals.
    if not p.full:
        return 2.0 * (L - L_o) / (L_o * L_o) if scale_prec else 2.0 * (L - L_o)
    R = res.old_root_inv if scale_prec else None
    root_bar, _ = w2_slopes(res.root - res.old_root, None, R, old=False, xp=xp)
    return gram_vjp(sqrtm_vjp(res.U, res.s, root_bar, xp=xp), L, xp=xp)


def loss_vjp(
    p: Problem,
    res: LossResiduals,
    g: Array,
    *,
    method: str,
    scale_prec: bool = True,
    root: bool = False,
) -> tuple[Array, Array, Array, Array]:
    r"""Cotangents of ``(mean, scale, proj_mean, proj_scale)``; the last two are zero. A shared
    covariance part (:func:`loss_fwd`) gets ``g`` summed over the states that share it, and its
    cotangents have its own batch. Symmetric-root scales (``root``): :math:`2R^2\delta` and
    :math:`2\operatorname{sym}(R^2\Delta)` (:math:`2\delta`, :math:`2\Delta` unscaled)."""
    xp = p.xp
    if root and p.full:
        R = res.old_root_inv
        w = root_times(R, root_times(R, p.mean - p.old_mean, xp=xp), xp=xp)  # Sigma_o^-1 delta
        pc = marked_cov_problem(p, res.shared)
        g_cov = unbroadcast(g, pc.mean[..., 0], xp=xp)
        slope, _ = w2_slopes(pc.scale - pc.old_scale, None, R, old=False, xp=xp)
        g_scale = g_cov[..., None, None] * slope
        zeros = (xp.zeros_like(p.old_mean), xp.zeros_like(pc.old_scale))
        return (2.0 * g[..., None]) * w, g_scale, *zeros
    coef = 0.5 if method == "kl" else 1.0
    prec = True if method == "kl" else scale_prec
    g_mean = _mean_grad(p, coef=coef, scale_prec=prec, xp=xp) * g[..., None]
    pc = marked_cov_problem(p, res.shared)
    g_cov = unbroadcast(g, pc.mean[..., 0], xp=xp)  # (g itself, or its sums)
    event = (None, None) if p.full else (None,)
    g_scale = _scale_grad(pc, res, method=method, scale_prec=scale_prec, xp=xp)
    g_scale = g_scale * g_cov[(..., *event)]
    return g_mean, g_scale, xp.zeros_like(p.old_mean), xp.zeros_like(pc.old_scale)


def trust_region_loss(
    mean: Array,
    scale: Array,
    proj_mean: Array,
    proj_scale: Array,
    *,
    method: str,
    scale_prec: bool = True,
    root: bool = False,
) -> Array:
    r"""Per-state distance :math:`d(\pi, \mathrm{sg}(\tilde\pi))` between the raw policy and its
    projection, with the distance of projection ``method``.

    Parameters
    ----------
    mean, scale
        The raw (unprojected) network output; gradients flow into these.
    proj_mean, proj_scale
        The projection of that output (e.g. ``trp.project(...)``); treated as constants.
    method
        ``"kl"``, ``"frobenius"`` or ``"wasserstein"``: the distance is the sum of the two parts
        of :func:`~tr_projections.kl`, :func:`~tr_projections.frobenius` or
        :func:`~tr_projections.wasserstein`.
    scale_prec
        As for the Frobenius and Wasserstein projections; ``False`` with ``method="kl"`` is an
        error (the KL distance is always scaled by the old precision).
    root
        With ``method="wasserstein"``: full scales are symmetric square roots, as for
        :func:`~tr_projections.project_wasserstein` with ``root=True``.

    Returns
    -------
    Array of the batch shape. Training loops use ``coeff * loss.mean()``.

    Examples
    --------
    >>> import numpy as np, tr_projections as trp
    >>> mean, std, old_mean, old_std = np.ones(2), np.full(2, 2.0), np.zeros(2), np.ones(2)
    >>> proj = trp.project_kl(mean, std, old_mean, old_std, eps_mean=0.1, eps_cov=0.1)
    >>> loss = trp.trust_region_loss(mean, std, *proj, method="kl")
    >>> bool(loss > 0)
    True
    """
    from .backends import apply

    check_options(method, root, bool(scale_prec))
    options = {"method": method, "scale_prec": bool(scale_prec), "root": bool(root)}
    return apply("trust_region_loss", (mean, scale, proj_mean, proj_scale), (), options)[0]
