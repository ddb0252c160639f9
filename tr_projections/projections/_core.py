r"""The idea shared by every projection: interpolate new and old in a chart with one weight.

Each part (mean, covariance) of a projection maps both Gaussians into a chart (``mean``,
``Sigma``, ``Sigma^{1/2}`` or ``Lambda``), measures a distance there and returns

.. math:: \tilde x = \tau x + (1 - \tau) x_o, \qquad \tau \in (0, 1] \text{ per state.}

For distances that are quadratic forms in :math:`x - x_o` the optimal weight is closed-form,
:math:`\tau = \min(1, \sqrt{\epsilon / d})` (:func:`closed_form_tau`); the KL covariance part
solves for it instead. Rows already inside their region get :math:`\tau = 1` and are returned
bit for bit (:func:`select`).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from .._compat import copy, matmul, row_sum
from .._inputs import Problem, shared_batch, unbroadcast
from .._rows import Rows, add_to, choose, put, put_or_zero, take
from ._vjp_core import expand, solve_lower, solve_lower_t, tril

Array = Any


def closed_form_tau(dist: Array, eps: Array, *, xp: Any) -> Array:
    r""":math:`\tau = \min(1, \sqrt{\epsilon / d})`, finite for ``dist == 0`` and under autodiff."""
    active = dist > eps
    safe = xp.where(active, dist, xp.ones_like(dist))  # "double where": no 0/0 in either branch
    return xp.where(active, xp.sqrt(eps / safe), xp.ones_like(dist))


def interpolate(x: Array, x_old: Array, tau: Array, *, event_ndim: int, xp: Any) -> Array:
    r""":math:`\tau x + (1-\tau) x_o` with ``tau`` of batch shape and ``event_ndim`` chart axes."""
    t = xp.reshape(tau, tuple(tau.shape) + (1,) * event_ndim)
    return t * x + (1.0 - t) * x_old


def select(active: Array, projected: Array, original: Array, *, event_ndim: int, xp: Any) -> Array:
    """``projected`` on active rows, ``original`` untouched elsewhere."""
    a = xp.reshape(active, tuple(active.shape) + (1,) * event_ndim)
    return xp.where(a, projected, original)


def project_mean(
    mean: Array, old_mean: Array, dist: Array, eps: Array, *, xp: Any
) -> tuple[Array, Array]:
    """The mean part of every projection: closed-form interpolation in the chart ``mean``, on
    the active rows only with eager arrays (:mod:`.._rows`)."""
    tau = closed_form_tau(dist, eps, xp=xp)
    active = dist > eps
    rows = choose(active, xp=xp, elementwise=True)
    if rows is None:
        out = interpolate(mean, old_mean, tau, event_ndim=1, xp=xp)
        return select(active, out, mean, event_ndim=1, xp=xp), tau
    mean_r, old_r = (take(x, rows, event_ndim=1, xp=xp) for x in (mean, old_mean))
    out = interpolate(mean_r, old_r, take(tau, rows, event_ndim=0, xp=xp), event_ndim=1, xp=xp)
    return put(out, rows, mean, event_ndim=1, xp=xp), tau


class MeanResiduals(NamedTuple):
    """What the mean part's VJP needs from its forward: weight, distance, active mask."""

    tau: Array
    dist: Array
    active: Array


def mean_residuals(res: Any) -> MeanResiduals:
    """The mean part's residuals from a projection's flat residual tuple (fields ``tau_mean``,
    ``dist_mean``, ``active_mean``)."""
    return MeanResiduals(res.tau_mean, res.dist_mean, res.active_mean)


def closed_form_tau_vjp(
    tau_bar: Array, tau: Array, dist: Array, active: Array, *, xp: Any
) -> Array:
    r"""Cotangent of the distance through :math:`\tau = \min(1, \sqrt{\epsilon/d})`.

    Active rows: :math:`\partial\tau/\partial d = -\tau / (2d)`; inactive rows have
    :math:`\tau = 1`, which does not depend on :math:`d`. The bound is a constant.
    """
    safe = xp.where(active, dist, xp.ones_like(dist))  # double where: inactive d may be 0
    return xp.where(active, -0.5 * tau_bar * tau / safe, xp.zeros_like(dist))


class MeanCotangents(NamedTuple):
    """Cotangents from the mean part; ``old_scale`` is ``None`` when the distance ignores it,
    and both old ones are ``None`` when they were not asked for."""

    mean: Array
    old_mean: Array
    old_scale: Array | None


def project_mean_vjp(
    g: Array,
    mean: Array,
    old_mean: Array,
    old_scale: Array,
    res: MeanResiduals,
    *,
    coef: float,
    scale_prec: bool,
    full: bool,
    xp: Any,
    old: bool = True,
) -> MeanCotangents:
    r"""VJP of :func:`project_mean` for the distance ``coef`` times Mahalanobis (``scale_prec``)
    or squared Euclidean.

    Active rows: :math:`\tilde\mu = \mu_o + \tau\delta`, so :math:`\bar\delta = \tau\bar g +
    \bar d\,\partial d/\partial\delta` with :math:`\bar d = \langle\bar g, \delta\rangle
    \partial\tau/\partial d`; :math:`\bar\mu = \bar\delta`, :math:`\bar\mu_o = \bar g -
    \bar\delta`. With :math:`z = L_o^{-1}\delta`, :math:`d = c\,z^\top z` gives
    :math:`\partial d/\partial\delta = 2c L_o^{-\top} z` and
    :math:`\bar L_o = -2c\,\bar d\,\operatorname{tril}(L_o^{-\top} z z^\top)`.
    Inactive rows pass :math:`\bar g` to the mean and nothing to the old policy. Without
    ``old`` the old policy's cotangents are not computed (``None``).
    """
    # Eager arrays: the active rows only (:mod:`.._rows`), where no row needs masking.
    rows = choose(res.active, xp=xp, elementwise=not (full and scale_prec))
    g_all, old_scale_all = g, old_scale
    g, mean, old_mean = (take(x, rows, event_ndim=1, xp=xp) for x in (g, mean, old_mean))
    tau, dist, active = (take(x, rows, event_ndim=0, xp=xp) for x in res)
    delta = mean - old_mean
    dist_bar = closed_form_tau_vjp(row_sum(g * delta, xp=xp), tau, dist, active, xp=xp)
    # dd/ddelta = 2 coef w with w = Lambda_o delta (or delta itself): k w, k = 2 coef dist_bar.
    k = (2.0 * coef) * dist_bar[..., None]
    old_scale_bar = old_mean_bar = None
    if not scale_prec:
        w = delta
    elif full:
        old_scale = take(old_scale, rows, event_ndim=2, xp=xp)
        z = solve_lower(old_scale, delta[..., None], xp=xp)
        w_col = solve_lower_t(old_scale, z, xp=xp)  # (..., d, 1)
        w = w_col[..., 0]
        if old:
            wz = matmul(w_col, xp.matrix_transpose(z), xp=xp)
            old_scale_bar = tril(-k[..., None] * wz, xp=xp)
    else:
        old_scale = take(old_scale, rows, event_ndim=1, xp=xp)
        z = delta / old_scale
        w = z / old_scale
        if old:
            old_scale_bar = -k * (z * w)
    mean_bar = tau[..., None] * g + k * w
    if old:
        old_mean_bar = g - mean_bar
    if rows is None:  # every row, inactive ones included: they pass g to the mean
        act = active[..., None]
        mean_bar = xp.where(act, mean_bar, g)
        if old:
            old_mean_bar = xp.where(act, old_mean_bar, xp.zeros_like(g))
    mean_bar = put(mean_bar, rows, g_all, event_ndim=1, xp=xp)
    if old:
        old_mean_bar = put_or_zero(old_mean_bar, rows, g_all, event_ndim=1, xp=xp)
    if old_scale_bar is not None:
        ev = 2 if full else 1
        old_scale_bar = put_or_zero(old_scale_bar, rows, old_scale_all, event_ndim=ev, xp=xp)
    return MeanCotangents(mean_bar, old_mean_bar, old_scale_bar)


class Cotangents(NamedTuple):
    """Cotangents of the four inputs of a projection, in the broadcast batch shape (the old
    policy's are ``None`` when they were not asked for)."""

    mean: Array
    scale: Array
    old_mean: Array
    old_scale: Array


def scale_cotangent(
    cov_part: Array,
    g_rows: Array,
    active: Array,
    rows: Rows | None,
    g_all: Array,
    *,
    event_ndim: int,
    xp: Any,
    owned: bool = False,
) -> Array:
    """The new scale's cotangent: the covariance part on the active ones of ``rows``, the
    incoming cotangent passed through elsewhere (``g_rows`` on the rows, ``g_all`` on the whole
    batch; ``owned`` when ``g_all`` is the caller's own temporary, see :func:`.._rows.put`)."""
    act = expand(active, event_ndim, xp=xp)
    sub = xp.where(act, cov_part, g_rows)
    return put(sub, rows, g_all, event_ndim=event_ndim, xp=xp, owned=owned)


def old_scale_cotangent(
    cov_part: Array,
    active: Array | None,
    rows: Rows | None,
    mean_part: Array | None,
    like: Array,
    *,
    event_ndim: int,
    xp: Any,
) -> Array:
    """The old scale's cotangent: the covariance part on the active ones of ``rows`` (zero on
    every other row; ``active`` is ``None`` where ``cov_part`` is zero there already), plus the
    mean part's (a whole-batch array, or ``None`` when the mean's distance does not use the old
    scale). ``like`` gives the shape: a mean part over more states (a covariance part computed
    once for states that share it, :func:`cov_problem`) is summed to it first."""
    if active is not None:
        act = expand(active, event_ndim, xp=xp)
        cov_part = xp.where(act, cov_part, xp.zeros_like(cov_part))
    if mean_part is None:
        return put_or_zero(cov_part, rows, like, event_ndim=event_ndim, xp=xp)
    mean_part = unbroadcast(mean_part, like, xp=xp)  # (itself, or a fresh sum)
    # (mean_part is a fresh array of the mean part's VJP: the rows are added in place)
    return add_to(mean_part, cov_part, rows, event_ndim=event_ndim, xp=xp, owned=True)


# ------------------------------------------------------------- a covariance shared by states


def cov_problem(p: Problem, eps_cov: Array | None = None) -> tuple[Problem, Array | None]:
    """The problem of the covariance part alone, and the marker its VJP finds it again by.

    The covariance part of a projection depends on ``scale``, ``old_scale`` and ``eps_cov``
    only. Where all three are shared along batch axes (passed with size 1 there, e.g. a
    state-independent ``(d, d)`` factor or ``(d,)`` std with a scalar bound, the usual policy
    with a learned covariance), the part is computed once per distinct covariance: the returned
    problem has the batch of those three (1 on the shared axes; its means are placeholders that
    the covariance part does not read) and the marker is a zero-size array of shape
    ``batch + (0,)`` that the residuals carry to the VJP (:func:`marked_cov_problem` there).
    Where they span the batch, ``(p, None)``: nothing changes. Without ``eps_cov`` (a part with
    no bound: the trust-region loss) the two scales alone decide."""
    if p.cov_batch is None:
        return p, None
    cb = shared_batch(p.batch, p.cov_batch, () if eps_cov is None else tuple(eps_cov.shape))
    pc = _restricted(p, cb)
    if pc is p:
        return p, None
    return pc, p.xp.zeros(cb + (0,), dtype=p.dtype, device=p.device)


def marked_cov_problem(p: Problem, marker: Array | None) -> Problem:
    """In a VJP: the covariance part's problem again, from the marker :func:`cov_problem` gave
    the forward (``p`` itself where that was ``None``)."""
    return p if marker is None else _restricted(p, tuple(marker.shape[:-1]))


def _restricted(p: Problem, cb: tuple[int, ...]) -> Problem:
    # p with the batch cb (1 on the shared axes: their first entry), or p itself.
    if cb == p.batch or math.prod(p.batch) == 0:
        return p
    index = tuple(
        slice(None) if c == n else slice(0, 1) for c, n in zip(cb, p.batch, strict=True)
    ) + (...,)
    return p._replace(
        batch=cb,
        mean=p.mean[index],
        scale=p.scale[index],
        old_mean=p.old_mean[index],
        old_scale=p.old_scale[index],
        cov_batch=cb,
    )


def spread(x: Array, batch: tuple[int, ...], *, event_ndim: int, xp: Any) -> Array:
    """A covariance part's output ``x`` for every state of ``batch``: a new array (broadcast
    views are read-only in NumPy and cannot be written in place in torch)."""
    shape = tuple(batch) + tuple(x.shape[x.ndim - event_ndim :])
    return x if tuple(x.shape) == shape else copy(xp.broadcast_to(x, shape), xp=xp)
