r"""KL projection: the covariance part interpolates precisions, with a weight solved exactly.

The minimiser of :math:`\mathrm{KL}(\tilde\pi\|\pi)` subject to
:math:`\mathrm{KL}_\Sigma(\tilde\pi\|\pi_o) \le \epsilon_\Sigma` is
:math:`\tilde\Lambda = \tau\Lambda + (1-\tau)\Lambda_o` with the constraint active. In the
eigenbasis of :math:`A = L_o^\top\Lambda L_o` (eigenvalues :math:`1 + a_i`) the constraint is the
scalar equation

.. math:: g(\tau) = \tfrac12 \sum_i h(\tau a_i) = \epsilon_\Sigma, \qquad
          h(x) = \log(1+x) - \frac{x}{1+x},

strictly increasing in :math:`\tau`, solved for the whole batch at once by a safeguarded Newton
iteration on :math:`\log g` against :math:`\log\tau`. That choice makes the common small-step
regime (:math:`g \approx \tfrac14\tau^2\sum a_i^2`) exactly linear, so it converges in about three
iterations, and the large-step regime (:math:`g \sim \tfrac12\sum\log\tau a_i`) nearly linear.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

from .. import _rows
from .._compat import count_true, matmul, maximum, minimum, row_sum, while_loop
from .._inputs import Problem, unbroadcast
from .._rows import choose, choose_slots, fields, from_fields, on_rows, put
from ..distances import (
    KLEigs,
    kl_cov_from_eigs,
    kl_eigs,
    kl_f,
    kl_h,
    kl_may_exceed,
    kl_may_exceed_diag,
    mean_distance,
)
from ..gaussian import Gaussian, cholesky_of_gram, diag_embed, diagonal, mT, sym
from . import _kl_diag_fused
from ._core import (
    Cotangents,
    cov_problem,
    marked_cov_problem,
    mean_residuals,
    old_scale_cotangent,
    project_mean,
    project_mean_vjp,
    select,
    spread,
)
from ._vjp_core import cholesky_p, solve_lower, solve_lower_t, tril

Array = Any

#: Upper bound on the Newton/bisection iterations. Far beyond what any measured case needs
#: (three in the usual regime, about twenty for eps = 100 with eigenvalues spread over e^±18);
#: eager backends stop as soon as every row has converged.
MAX_ITER = 100


def _t(s: Array, lam: Array, *, xp: Any, e: Array | None = None) -> Array:
    r""":math:`t = 1 + \tau a = (1 - \tau) + \tau\lambda` from :math:`s = \log\tau`, the
    eigenvalues of :math:`L_o^\top\tilde\Lambda L_o`. Both terms are accurate,
    :math:`1 - \tau = -\operatorname{expm1}(s)` even when :math:`\tau` is within rounding of 1,
    so :math:`t` keeps its relative accuracy when :math:`\lambda \ll 1` (a new std far above
    the old one, where the root has :math:`t \ll 1`). ``e`` is :math:`\tau` with an event
    axis, when the caller has it."""
    if e is None:
        e = xp.exp(s)[..., None]
    return e * lam - xp.expm1(s)[..., None]


def _halley(dtype: Any, *, xp: Any) -> bool:
    r"""Whether the solver takes Halley's steps (float64) or Newton's (float32). Its curvature
    term :math:`\sum_i r_i^2/t_i \approx \lambda^{-3}` overflows float32 for new stds about
    2.6 million times the old ones (float64: beyond 1e51 times), and float32's tolerance needs
    no third order."""
    return xp.finfo(dtype).eps < 1e-10


def _g_and_slopes(s: Array, a: Array, lam: Array, *, xp: Any) -> tuple[Array, Array, Array | None]:
    r"""Return :math:`g(\tau)` and its first two derivatives in :math:`s = \log\tau`:
    :math:`\tau g'(\tau) = \tfrac12\sum_i r_i^2` and :math:`\sum_i r_i^2 / t_i` (``None``
    without Halley's steps), with :math:`r_i = x_i/t_i`, at :math:`\tau = e^s`.

    The solver needs :math:`g` to a relative accuracy far below the bound's tolerance, not to the
    last bit: in float64 the direct form of :func:`~tr_projections.distances.kl_h` (relative error
    about :math:`4\varepsilon_{mach}/|x|`, 1e-11 even at eps = 1e-9) is enough, and its series
    is kept for float32 only.
    """
    e = xp.exp(s)[..., None]
    x = e * a
    t = _t(s, lam, xp=xp, e=e)
    r = x / t
    finfo = xp.finfo(a.dtype)
    if finfo.eps > 1e-10:
        h = kl_h(x, t, xp=xp)
    else:  # the direct form, sharing x / t
        h = xp.log1p(maximum(x, finfo.eps - 1.0, xp=xp)) - r
    r2 = r * r
    curv = row_sum(r2 / t, xp=xp) if _halley(a.dtype, xp=xp) else None
    return 0.5 * row_sum(h, xp=xp), 0.5 * row_sum(r2, xp=xp), curv


def _halley_step(ds: Array, g: Array, slope: Array, curv: Array | None, *, xp: Any):
    """Halley's correction of the Newton step ``ds`` on ``f = log g - log eps`` in ``s``, and
    where it was taken: ``ds / (1 + c)`` with ``c = ds f''/(2 f')``, ``f' = slope/g``,
    ``f'' = curv/g - f'^2``, where ``|c| <= 1/2``; Newton's step elsewhere (and without
    ``curv``)."""
    if curv is None:
        return ds, None
    c = 0.5 * ds * (curv / slope - slope / g)
    halley = xp.abs(c) <= 0.5
    return xp.where(halley, ds / (1.0 + c), ds), halley


def _tolerances(dtype: Any, *, xp: Any) -> tuple[float, float]:
    """Convergence tolerances on ``|f|`` and the step: ``sqrt(eps_mach)`` after a Newton step
    (quadratic error), ``eps_mach^(1/3)/4`` after a Halley step (cubic error)."""
    eps = xp.finfo(dtype).eps
    return math.sqrt(eps), 0.25 * eps ** (1.0 / 3.0)


def _step(s: Array, a: Array, lam: Array, log_eps: Array, *, xp: Any) -> tuple:
    """At ``s``: ``f = log g - log eps``, Newton's step on it, the step taken (Halley's where
    :func:`_halley_step` takes it) and where Halley's was taken (``None`` without it). The
    head of both :func:`_fast_step` and :func:`_newton_step`."""
    tiny = xp.finfo(a.dtype).smallest_normal
    g, slope, curv = _g_and_slopes(s, a, lam, xp=xp)
    g = maximum(g, tiny, xp=xp)
    slope = maximum(slope, tiny, xp=xp)
    f = xp.log(g) - log_eps
    newton = -f * (g / slope)
    ds, halley = _halley_step(newton, g, slope, curv, xp=xp)
    return f, newton, ds, halley


#: Unguarded steps tried first (eager arrays stop as soon as every row has converged); rows that
#: have not converged by then go on with the safeguarded iteration.
FAST_STEPS = 3


def _fast_step(
    s: Array, a: Array, lam: Array, log_eps: Array, log_lo: Array, *, xp: Any
) -> tuple[Array, Array]:
    """One unguarded Halley (float32: Newton) step on ``f = log g - log eps`` in ``s``, kept in
    ``[log_lo, 0]``, and where it has converged: ``|f|`` and the step below ``eps_mach^(1/3)/4``
    with a curvature correction ``|c| <= 1/2`` (Halley's error is cubic: the step lands at
    rounding level), float32: below ``sqrt(eps_mach)`` (Newton's error is quadratic). Half the
    work of a safeguarded step (:func:`_newton_step`: no bracket, no fallback), which the rows
    that do not converge here go on with."""
    tol, tol3 = _tolerances(a.dtype, xp=xp)
    f, newton, ds, halley = _step(s, a, lam, log_eps, xp=xp)
    err = xp.maximum(xp.abs(newton), xp.abs(f))
    converged = err <= tol if halley is None else (err <= tol3) & halley
    # (maximum/minimum: array-api-compat's clip with an array bound costs twice as much)
    return minimum(xp.maximum(s + ds, log_lo), 0.0, xp=xp), converged


def _running(state: tuple) -> Array:
    return ~state[5]


def _newton_step(state: tuple, *, xp: Any) -> tuple:
    """One safeguarded Halley (float32: Newton) step on ``f = log g - log eps`` against
    ``s = log tau``; finished rows stay as they are.

    The step is Halley's (:func:`_halley_step`) when it stays in the bracket ``[s_lo, s_hi]``
    and shrinks at least by half against the previous step (otherwise it is overshooting or
    stalling, e.g. on the steep side of a nearly singular precision). Else it is the secant
    through the bracket's ends once ``f`` is known at both (``f_hi`` at ``tau = 1`` is known
    from the start; the Illinois rule halves the residual of an end kept twice), and the
    midpoint before that. A row is done when its residual ``|f|`` and its step are both below
    ``sqrt(eps_mach)``, or below ``eps_mach^(1/3)/4`` for a Halley step (whose error is cubic).
    Working in ``s`` keeps ``tau`` and ``1 - tau`` accurate at once, and no step can overflow.
    """
    s, s_lo, s_hi, f_lo, f_hi, done, a, lam, log_eps, ds_old, last_below = state
    finfo = xp.finfo(a.dtype)
    tol, tol3 = _tolerances(a.dtype, xp=xp)
    f, _, ds, halley = _step(s, a, lam, log_eps, xp=xp)
    below = f <= 0
    same = below == last_below
    f_lo = xp.where(same & ~below, 0.5 * f_lo, f_lo)
    f_hi = xp.where(same & below, 0.5 * f_hi, f_hi)
    s_lo, f_lo = xp.where(below, s, s_lo), xp.where(below, f, f_lo)
    s_hi, f_hi = xp.where(below, s_hi, s), xp.where(below, f_hi, f)
    step = s + ds
    # Accept steps inside the bracket up to rounding, so a converged iterate is never thrown back.
    slack = 4.0 * finfo.eps * xp.abs(s) + finfo.smallest_normal
    inside = (step >= s_lo - slack) & (step <= s_hi + slack)
    abs_ds = xp.abs(ds)
    err = xp.maximum(abs_ds, xp.abs(f))
    converged = err <= tol
    if halley is not None:  # a Halley step from within tol3 lands at rounding level
        converged = converged | (halley & (err <= tol3))
    converged = inside & converged
    ok = converged | (inside & (2.0 * abs_ds <= xp.abs(ds_old)))
    span = f_hi - f_lo
    known = (f_lo > -math.inf) & (span > 0)  # f is known at both ends and tells them apart
    span = xp.where(known, span, xp.ones_like(f))
    s_sec = s_lo - xp.where(known, f_lo, xp.zeros_like(f)) * (s_hi - s_lo) / span
    fallback = xp.where(known, s_sec, 0.5 * (s_lo + s_hi))
    new = xp.where(ok, xp.minimum(xp.maximum(step, s_lo), s_hi), fallback)
    ds_new = new - s
    s = xp.where(done, s, new)
    ds_old = xp.where(done, ds_old, ds_new)
    last_below = xp.where(done, last_below, below)
    done = done | converged
    return s, s_lo, s_hi, f_lo, f_hi, done, a, lam, log_eps, ds_old, last_below


@functools.cache
def _step_for(xp: Any):
    # One function object per namespace, so JAX's while_loop reuses its trace across calls.
    return functools.partial(_newton_step, xp=xp)


#: The Newton iteration goes on with its unfinished rows alone once they are at most this
#: fraction of the rows (eager arrays; :func:`tr_projections._compat.while_loop`).
SHRINK = 0.25


def solve_log_tau(eigs: KLEigs, g1: Array, eps: Array, *, xp: Any) -> Array:
    r""":math:`s = \log\tau` for the weight :math:`\tau \in (0, 1]` with
    :math:`g(\tau) = \epsilon` on rows where :math:`g(1) = ` ``g1`` :math:`> \epsilon`, and
    :math:`s = 0` elsewhere.

    Start, by how far ``g1`` is above the bound:

    * :math:`g(1) \le e\,\epsilon` (the usual case in training: a step just outside its
      region): Halley's step from :math:`\tau = 1`, where :math:`t = \lambda` and :math:`g`
      are known, so the step costs a few products and no transcendental function;
    * farther out: the cubic model :math:`g \approx \tfrac14 \tau^2 S -
      \tfrac13\tau^3\sum a_i^3`, :math:`S = \sum a_i^2`, i.e. the quadratic root
      :math:`\tau_0 = 2\sqrt{\epsilon/S}` times :math:`1 + \tfrac23\tau_0\sum a_i^3/S`.

    In the usual regime one or two Halley steps then reach rounding level. Bracket: ``tau = 1``
    above; ``min(1/2, sqrt(eps / S))`` below, always feasible because :math:`h(x) \le 2x^2` for
    :math:`|x| \le 1/2`, so :math:`g(\tau) \le \tau^2 S` there.
    """
    batch = tuple(g1.shape)
    d = eigs.a.shape[-1]
    active = xp.reshape(g1 > eps, (-1,))
    eps = xp.reshape(eps + xp.zeros_like(g1), (-1,))
    # Inactive rows keep tau = 1; give them finite stand-in data so no lane computes log(0).
    act = active[:, None]
    g1 = xp.reshape(g1, (-1,))
    fill = xp.ones_like(g1)[:, None]
    a = xp.where(act, xp.reshape(eigs.a, (-1, d)), fill)
    lam = xp.where(act, xp.reshape(eigs.lam, (-1, d)), 2.0 * fill)
    g1 = xp.where(active, g1, 1.0 + eps)
    a2 = a * a
    S = row_sum(a2, xp=xp)
    one = xp.ones_like(S)
    zero = xp.zeros_like(S)
    tau0 = xp.minimum(one, 2.0 * xp.sqrt(eps / S))
    lo = xp.minimum(0.5 * one, 0.5 * tau0)
    log_lo = xp.log(lo)
    # Cubic model: one correction factor, kept within [1/2, 2]; a^3 is formed as (a^2/S)(tau0 a)
    # so that it cannot overflow.
    corr = 1.0 + (2.0 / 3.0) * row_sum((a2 / S[:, None]) * (tau0[:, None] * a), xp=xp)
    corr = minimum(maximum(corr, 0.5, xp=xp), 2.0, xp=xp)
    s_cubic = xp.log(xp.minimum(xp.maximum(tau0 * corr, lo), one))
    log_eps = xp.log(eps)
    f_hi = xp.log(g1) - log_eps  # > 0 on every row (inactive ones: g1 = 1 + eps)
    # Halley's (float32: Newton's) step from tau = 1 (s = 0), where t = lam: r = a / lam.
    r2 = a / lam
    r2 = r2 * r2
    slope = maximum(0.5 * row_sum(r2, xp=xp), xp.finfo(a.dtype).smallest_normal, xp=xp)
    curv = row_sum(r2 / lam, xp=xp) if _halley(a.dtype, xp=xp) else None
    ds, _ = _halley_step(-f_hi * (g1 / slope), g1, slope, curv, xp=xp)
    s_halley = xp.minimum(xp.maximum(ds, log_lo), zero)
    s0 = xp.where(active, xp.where(f_hi <= 1.0, s_halley, s_cubic), zero)
    done = ~active
    shrink = SHRINK if _rows.SELECT_ROWS else 0.0
    for _ in range(FAST_STEPS):
        s0, converged = _fast_step(s0, a, lam, log_eps, log_lo, xp=xp)
        done = done | converged
        left = count_true(~done, xp=xp)
        if left == 0:
            return xp.reshape(xp.where(active, s0, zero), batch)
        if left is not None and left <= shrink * done.shape[0]:
            break  # the few rows left go on alone (the loop gathers them)
    inf = xp.full_like(S, math.inf)
    state = (s0, log_lo, zero, -inf, f_hi, done, a, lam, log_eps, inf, ~active)
    state = while_loop(
        _running, _step_for(xp), state, max_iter=MAX_ITER, check_every=1, shrink=shrink, xp=xp
    )
    return xp.reshape(xp.where(active, state[0], zero), batch)


def solve_tau(eigs: KLEigs, g1: Array, eps: Array, *, xp: Any) -> Array:
    """The weight itself, ``exp`` of :func:`solve_log_tau`."""
    return xp.exp(solve_log_tau(eigs, g1, eps, xp=xp))


class KLResiduals(NamedTuple):
    """What :func:`kl_vjp` needs from the forward pass: flat, arrays only. The covariance
    fields cover the rows ``rows`` of the flattened batch (every row when ``rows`` is ``None``)."""

    tau_mean: Array
    dist_mean: Array
    active_mean: Array
    a: Array  # eigenvalues of L_o^T Lambda L_o, minus one
    lam: Array  # the same eigenvalues, accurate when small
    U: Array | None  # their eigenvectors (full only)
    tau: Array
    log_tau: Array  # carries 1 - tau accurately
    active: Array
    proj_scale: Array  # the projected scale on every row, before inactive rows are restored
    rows: Array | None  # flat indices of the rows the covariance fields cover
    row_mask: Array | None  # the same rows as a flat mask of the batch
    shared: Array | None  # the covariance part's batch, where smaller (see _core.cov_problem)


def kl_fwd(p: Problem, eps_mean: Array, eps_cov: Array) -> tuple[Gaussian, KLResiduals]:
    """The KL projection of ``p``, its weights and the residuals of its VJP.

    The covariance stages (``eigh``, the solve, the output factor) run only on the rows that
    may be outside their bound, picked by a margin test on a cheap form of the KL before the
    accurate one is evaluated: the direct form in the eigenvalues for diagonal Gaussians
    (:func:`~tr_projections.distances.kl_may_exceed_diag`), the trace form for full ones
    (:func:`~tr_projections.distances.kl_may_exceed`, before any decomposition). Eager arrays
    gather those rows (:mod:`._rows`); full Gaussians under ``jax.jit`` run the stages in slots
    of the batch, the later ones only when the rows reach them (:func:`._rows.choose_slots`).
    Diagonal Gaussians may run in the fused kernels instead (:mod:`._kl_diag_fused`), whose
    residuals keep the weights only (``a``, ``lam``, ``proj_scale`` are ``None``).
    """
    xp = p.xp
    # (the covariance part once per distinct covariance)
    p_cov, shared = cov_problem(p, eps_cov)
    if not p.full and shared is None and _kl_diag_fused.applies(p):
        fused = _kl_diag_fused.kl_diag_fwd(p, eps_mean, eps_cov)
        if fused is not None:
            out, (tau_mean, dist_mean, active_mean, tau, log_tau, active) = fused
            res = KLResiduals(
                tau_mean, dist_mean, active_mean, None, None, None, tau, log_tau, active,
                None, None, None, None,
            )  # fmt: skip
            return out, res
    ev = 2 if p.full else 1
    dist_mean = 0.5 * mean_distance(
        p.mean, p.old_mean, p.old_scale, full=p.full, scale_prec=True, xp=xp
    )
    mean, tau_mean = project_mean(p.mean, p.old_mean, dist_mean, eps_mean, xp=xp)
    batch = p.batch
    p = p_cov

    if p.full:
        F = kl_f(p.scale, p.old_scale, xp=xp)
        rows = choose_slots(kl_may_exceed(F, p.scale, p.old_scale, eps_cov, xp=xp), xp=xp)
        gather = ((p.scale, 2), (p.old_scale, 2), (F, 2))
    else:
        eigs = kl_eigs(p.scale, p.old_scale, full=False, vectors=True, xp=xp)
        rows = choose(kl_may_exceed_diag(eigs, eps_cov, xp=xp), xp=xp)
        gather = ((p.scale, 1), (p.old_scale, 1), (eigs.a, 1), (eigs.lam, 1))
    eps_rows = eps_cov if rows is None else xp.broadcast_to(eps_cov, p.batch)
    stage = functools.partial(_full_stage if p.full else _diag_stage, xp=xp)
    new_scale, a, lam, U, tau, log_tau, active, proj = on_rows(
        rows, stage, gather + ((eps_rows, 0),), xp=xp
    )
    out = put(new_scale, rows, p.scale, event_ndim=ev, xp=xp)
    res = KLResiduals(
        tau_mean, dist_mean, dist_mean > eps_mean, a, lam, U, tau, log_tau, active, proj,
        *fields(rows), shared,
    )  # fmt: skip
    return Gaussian(mean, spread(out, batch, event_ndim=ev, xp=xp)), res


def _full_stage(scale: Array, old_scale: Array, F: Array, eps_cov: Array, *, xp: Any) -> tuple:
    # The covariance part of full Gaussians on its rows (F = L_o^-1 (L - L_o) there).
    eigs = kl_eigs(scale, old_scale, full=True, vectors=True, xp=xp, F=F)
    return _solve_stage(eigs, scale, old_scale, eps_cov, xp=xp)


def _diag_stage(
    scale: Array, old_scale: Array, a: Array, lam: Array, eps_cov: Array, *, xp: Any
) -> tuple:
    return _solve_stage(KLEigs(a, lam, None), scale, old_scale, eps_cov, xp=xp)


def _solve_stage(eigs: KLEigs, scale: Array, old_scale: Array, eps_cov: Array, *, xp: Any):
    # The weight and the projected scale on the rows of eigs: (new scale, then the residuals).
    g1 = kl_cov_from_eigs(eigs, xp=xp)  # accurate
    a, lam, U = eigs
    log_tau = solve_log_tau(eigs, g1, eps_cov, xp=xp)
    tau = xp.exp(log_tau)
    t = _t(log_tau, lam, xp=xp)  # eigenvalues of L_o^T Lambda~ L_o
    if U is not None:
        # Sigma~ = W diag(1/t) W^T with W = L_o U: no inverse formed, and its factor from
        # the QR of diag(t^-1/2) W^T, without squaring.
        W = matmul(old_scale, U, xp=xp)
        proj = cholesky_of_gram(mT(W / xp.sqrt(t)[..., None, :], xp=xp), xp=xp)
    else:
        proj = old_scale / xp.sqrt(t)
    active = g1 > eps_cov
    new_scale = select(active, proj, scale, event_ndim=2 if U is not None else 1, xp=xp)
    return new_scale, a, lam, U, tau, log_tau, active, proj


def kl_vjp(
    p: Problem, res: KLResiduals, g_mean: Array, g_scale: Array, *, old: bool = True
) -> Cotangents:
    r"""Cotangents of ``(mean, scale, old_mean, old_scale)`` of :func:`kl_fwd`, by the implicit
    function theorem on :math:`g(\tau, \Lambda, \Lambda_o) = \epsilon_\Sigma`.

    With :math:`G = \partial\ell/\partial\tilde\Lambda`, :math:`D = \Lambda - \Lambda_o`,
    :math:`M = \tfrac12\tilde\Sigma(\tilde\Lambda - \Lambda_o)\tilde\Sigma` and
    :math:`\kappa = \langle G, D\rangle / \langle M, D\rangle` (the denominator is
    :math:`g'(\tau) > 0` on active rows, never clamped):

    .. math::
        \bar\Lambda = \tau (G - \kappa M), \qquad
        \bar\Lambda_o = (1 - \tau)(G - \kappa M) + \tfrac{\kappa}{2}(\Sigma_o - \tilde\Sigma),

    the last term from the direct dependence of
    :math:`\mathrm{KL}_\Sigma(\tilde\Lambda\|\Lambda_o) =
    \tfrac12[\operatorname{tr}(\Lambda_o\tilde\Sigma) - d - \log|\Lambda_o| +
    \log|\tilde\Lambda|]` on :math:`\Lambda_o`. Everything is evaluated in the basis
    :math:`V = L_oU` of the forward's ``eigh`` (used, never differentiated), where
    :math:`V^\top\Lambda_oV = I`, :math:`V^\top\Lambda V = \operatorname{diag}(1 + a)` and
    :math:`G, M` and the two cotangents are diagonal up to :math:`\bar{\tilde\Sigma}`;
    back in scales it takes triangular solves with :math:`L_o` only. Diagonal Gaussians are the
    same with :math:`U = I`, elementwise. Inactive rows pass ``g_scale`` through. Without
    ``old`` the old policy's cotangents are skipped (``None``). The covariance part runs on the
    forward's rows (in the same slots under ``jax.jit``).
    """
    xp, full = p.xp, p.full
    if not full and res.a is None:  # (the fused kernels' residuals)
        cots = _kl_diag_fused.kl_diag_vjp(p, res, g_mean, g_scale, old=old)
        if cots is not None:
            return Cotangents(*cots)
        res = _from_fused(p, res)  # (arrays the kernels cannot take: the array-API VJP)
    m = project_mean_vjp(
        g_mean, p.mean, p.old_mean, p.old_scale, mean_residuals(res),
        coef=0.5, scale_prec=True, full=full, xp=xp, old=old,
    )  # fmt: skip
    rows = from_fields(res.rows, res.row_mask)
    ev = 2 if full else 1
    p = marked_cov_problem(p, res.shared)  # (a shared covariance: its own batch)
    g_scale = unbroadcast(g_scale, p.scale, xp=xp)  # (summed over the states sharing it)
    if full:
        g_scale = tril(g_scale, xp=xp)
    stage = functools.partial(_full_vjp if full else _diag_vjp, old=old, xp=xp)
    residuals = (res.a, res.lam, res.U, res.tau, res.log_tau, res.active, res.proj_scale)
    scale_bar, old_scale_bar = on_rows(
        rows, stage, ((g_scale, ev), (p.scale, ev), (p.old_scale, ev)), residuals, xp=xp
    )
    scale_bar = put(scale_bar, rows, g_scale, event_ndim=ev, xp=xp, owned=full)
    if not old:
        return Cotangents(m.mean, scale_bar, None, None)
    old_scale_bar = old_scale_cotangent(
        old_scale_bar, None, rows, m.old_scale, p.old_scale, event_ndim=ev, xp=xp
    )
    return Cotangents(m.mean, scale_bar, m.old_mean, old_scale_bar)


def _from_fused(p: Problem, res: KLResiduals) -> KLResiduals:
    """The array-API form's residuals (every row) from those of the fused kernels, which keep
    the weights only: the eigenvalues and the projected stds again from the inputs."""
    xp = p.xp
    eigs = kl_eigs(p.scale, p.old_scale, full=False, vectors=False, xp=xp)
    tau, log_tau, active = (xp.reshape(x, p.batch) for x in (res.tau, res.log_tau, res.active))
    proj = p.old_scale / xp.sqrt(_t(log_tau, eigs.lam, xp=xp))
    return res._replace(
        a=eigs.a, lam=eigs.lam, tau=tau, log_tau=log_tau, active=active, proj_scale=proj
    )


def _dg_dtau(a: Array, lam: Array, tau: Array, log_tau: Array, active: Array, *, xp: Any):
    # (t, m_eig, dg/dtau): m_i is M in the basis V, dg/dtau = <M, D> = sum_i m_i a_i.
    t = _t(log_tau, lam, xp=xp)
    m_eig = 0.5 * tau[..., None] * a / (t * t)
    return t, m_eig, xp.where(active, row_sum(m_eig * a, xp=xp), xp.ones_like(tau))


def _full_vjp(
    g_scale, L, L_o, a, lam, U, tau, log_tau, active, proj, *, old: bool, xp: Any
) -> tuple[Array, Array | None]:
    # The covariance part's cotangents of scale and old scale on its rows: the VJP's on active
    # rows, g_scale passed through (scale) and zero (old scale) on the others.
    t, m_eig, dg_dtau = _dg_dtau(a, lam, tau, log_tau, active, xp=xp)
    # (batch-sized temporaries are dropped as soon as they are used: with every state
    # projected they set the peak memory of forward + backward)
    # C = V^T Sigma~_bar V (V = L_o U) with Sigma~_bar = sym(L~^-T P L~^-1), P from the
    # Cholesky VJP, is sym(K^T P K) with K = L~^-1 V: one triangular solve where the
    # Cholesky VJP takes two, and K = Q^T T^1/2 (Q orthogonal, as L~ L~^T = V T^-1 V^T) is
    # as well conditioned as T^1/2 (moderately, on rows at their bound). C is used through
    # its diagonal and sym(U (. C .) U^T) only, so it is not symmetrised here.
    K = solve_lower(proj, matmul(L_o, U, xp=xp), xp=xp)
    P = cholesky_p(proj, g_scale, xp=xp)
    C = matmul(mT(K, xp=xp), matmul(P, K, xp=xp), xp=xp)
    del K, P
    G = -C / (t[..., :, None] * t[..., None, :])  # dl/dLambda~ in the basis V
    del C
    kappa = row_sum(diagonal(G, xp=xp) * a, xp=xp) / dg_dtau
    k = kappa[..., None]
    H = G - diag_embed(k * m_eig, xp=xp)
    del G
    # Sigma_bar = -Lambda Lambda_bar Lambda = -L_o^-T U [lam Lhat lam] U^T L_o^-1, with
    # Lambda_bar = tau H; then L_bar = tril(2 Sigma_bar L); and
    # Sigma_o_bar = -L_o^-T U Lhat_o U^T L_o^-1.
    Ut = mT(U, xp=xp)
    inner = (tau[..., None] * lam)[..., :, None] * H * lam[..., None, :]
    if not old:
        del H
    Y = matmul(matmul(U, inner, xp=xp), Ut, xp=xp)
    del inner
    Y = solve_lower_t(L_o, sym(Y, xp=xp), xp=xp)
    act = active[..., None, None]
    scale_bar = tril(-2.0 * matmul(Y, solve_lower(L_o, L, xp=xp), xp=xp), xp=xp)
    scale_bar = xp.where(act, scale_bar, g_scale)
    if not old:
        return scale_bar, None
    old_prec_bar = (1.0 - tau[..., None, None]) * H + diag_embed(
        (0.5 * k) * tau[..., None] * a / t, xp=xp
    )
    Y_o = sym(matmul(matmul(U, old_prec_bar, xp=xp), Ut, xp=xp), xp=xp)
    old_scale_bar = tril(-2.0 * solve_lower_t(L_o, Y_o, xp=xp), xp=xp)
    return scale_bar, xp.where(act, old_scale_bar, xp.zeros_like(old_scale_bar))


def _diag_vjp(
    g_scale, scale, old_scale, a, lam, U, tau, log_tau, active, proj, *, old: bool, xp: Any
) -> tuple[Array, Array | None]:
    # sigma~ = sigma_o / sqrt(t): t_bar = -g sigma~ / (2t); a_i = sigma_o^2/sigma^2 - 1.
    t, m_eig, dg_dtau = _dg_dtau(a, lam, tau, log_tau, active, xp=xp)
    tau_e = tau[..., None]
    t_bar = -0.5 * g_scale * proj / t
    kappa = row_sum(t_bar * a, xp=xp) / dg_dtau
    a_bar = tau_e * t_bar - kappa[..., None] * tau_e * m_eig
    act = active[..., None]
    scale_bar = xp.where(act, -2.0 * a_bar * lam / scale, g_scale)
    if not old:
        return scale_bar, None
    old_scale_bar = g_scale / xp.sqrt(t) + 2.0 * a_bar * lam / old_scale
    return scale_bar, xp.where(act, old_scale_bar, xp.zeros_like(old_scale_bar))


__all__ = ["KLResiduals", "kl_fwd", "kl_vjp", "solve_log_tau", "solve_tau"]
