r"""Wasserstein-2 projection (commuting approximation): the covariance part interpolates the
symmetric square roots :math:`S = \Sigma^{1/2}`.

:math:`\tilde S = \tau S + (1-\tau) S_o` and :math:`\tilde\Sigma = \tilde S^2`, with the
closed-form weight for :math:`\|S_o^{-1}(S - S_o)\|_F^2` (``scale_prec=True``) or
:math:`\|S - S_o\|_F^2`. For diagonal Gaussians :math:`S` is the vector of standard deviations and
nothing but elementwise arithmetic is needed.

Full scales are lower Cholesky factors by default, whose roots take two batched ``eigh``. With
``root=True`` they are the symmetric roots themselves (the parametrisation of the W2 policies of
Otto et al.): the projection is then products and :math:`S_o^{-1}` (:func:`inverse_root`: one
Cholesky factorisation and a triangular solve, or on torch CPU tensors one LU solve;
:func:`_root_fwd`), and returns the projected root.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .. import _compat
from .._compat import matmul, row_sum
from .._inputs import Problem, unbroadcast
from .._rows import choose, fields, from_fields, narrow, put, take, take_batch
from ..distances import kl_f, mean_distance, wasserstein_chart, wasserstein_may_exceed
from ..gaussian import Gaussian, cholesky_of_gram, frob2, mT, root_from_eig, sym
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
from ._vjp_core import (
    cholesky_vjp,
    expand,
    gram_vjp,
    solve_lower,
    sqrtm_vjp,
    square_vjp,
    tril,
    w2_slopes,
)

Array = Any


class WassersteinResiduals(NamedTuple):
    """What :func:`wasserstein_vjp` needs from the forward pass: flat, arrays only. The
    eigenbases are ``None`` for diagonal Gaussians (the chart is the stds themselves); the roots
    are not kept (rebuilt in the VJP: one product each, and three batch-sized arrays less
    between forward and backward)."""

    tau_mean: Array
    dist_mean: Array
    active_mean: Array
    tau: Array
    dist: Array
    active: Array
    U: Array | None  # eigenbases of both roots (full only): the VJP rebuilds the roots from them
    s: Array | None
    old_U: Array | None
    old_s: Array | None
    proj_scale: Array  # the projected scale on every row, before inactive rows are restored
    rows: Array | None  # flat indices of the rows the covariance fields cover (None: all)
    row_mask: Array | None
    shared: Array | None  # the covariance part's batch, where smaller (see _core.cov_problem)
    # Symmetric-root scales (root=True), precision-scaled: S_o^-1 at the covariance part's
    # batch (None otherwise).
    old_root_inv: Array | None = None


def wasserstein_fwd(
    p: Problem, eps_mean: Array, eps_cov: Array, *, scale_prec: bool = True, root: bool = False
) -> tuple[Gaussian, WassersteinResiduals]:
    """The W2 projection of ``p``, its weights and the residuals of its VJP (with eager arrays
    the output factor and the VJP cover only the rows outside their bound). With ``root``, full
    scales are symmetric roots (:func:`_root_fwd`)."""
    if root and p.full:
        return _root_fwd(p, eps_mean, eps_cov, scale_prec=scale_prec)
    xp = p.xp
    dist_mean = mean_distance(
        p.mean, p.old_mean, p.old_scale, full=p.full, scale_prec=scale_prec, xp=xp
    )
    mean, tau_mean = project_mean(p.mean, p.old_mean, dist_mean, eps_mean, xp=xp)
    batch = p.batch
    p, shared = cov_problem(p, eps_cov)  # (the covariance part once per distinct covariance)

    ev = 2 if p.full else 1
    rows = None
    scale = p.scale
    if p.full and scale_prec and not _compat._is_traced(p.scale, xp):
        # Eager full scales, precision-scaled: the roots (two eigh) only on the rows that may
        # be outside their bound, by a bound that needs one triangular solve.
        F = kl_f(p.scale, p.old_scale, xp=xp)
        rows = choose(wasserstein_may_exceed(F, eps_cov, xp=xp), xp=xp)
        del F
        scale = take(p.scale, rows, event_ndim=2, xp=xp)
        old_scale = take(p.old_scale, rows, event_ndim=2, xp=xp)
    else:
        old_scale = p.old_scale
    dist, chart, eig = wasserstein_chart(
        scale, old_scale, full=p.full, scale_prec=scale_prec, xp=xp
    )
    if p.full:
        # Eager full scales: the output factor and the VJP on the rows outside their bound
        # only (diagonal ones are a few elementwise passes, cheaper than the gather).
        nb = dist.ndim  # batch axes of what the chart computed: (n,) or the batch shape
        rows, keep = narrow(rows, dist > take_batch(eps_cov, rows, p.batch, xp=xp), xp=xp)
        scale = take(scale, keep, event_ndim=2, xp=xp)
        # (the inverse root is not needed past the distance)
        chart = type(chart)(*(take(x, keep, event_ndim=2, xp=xp) for x in chart[:2]), None)
        eig = type(eig)(*(take(x, keep, event_ndim=x.ndim - nb, xp=xp) for x in eig))
        dist = take(dist, keep, event_ndim=0, xp=xp)
    eps_cov = take_batch(eps_cov, rows, p.batch, xp=xp)
    tau = closed_form_tau(dist, eps_cov, xp=xp)
    root = interpolate(chart.root, chart.old_root, tau, event_ndim=ev, xp=xp)
    if p.full:
        proj = cholesky_of_gram(root, xp=xp)  # the factor of root @ root, without squaring
    else:
        proj = root
    active = dist > eps_cov
    scale = put(
        select(active, proj, scale, event_ndim=ev, xp=xp), rows, p.scale, event_ndim=ev, xp=xp
    )
    mean_res = (tau_mean, dist_mean, dist_mean > eps_mean, tau, dist, active)
    if p.full:
        res = WassersteinResiduals(*mean_res, *eig, proj, *fields(rows), shared)
    else:
        res = WassersteinResiduals(*mean_res, *(None,) * 4, proj, *fields(rows), shared)
    return Gaussian(mean, spread(scale, batch, event_ndim=ev, xp=xp)), res


def wasserstein_vjp(
    p: Problem,
    res: WassersteinResiduals,
    g_mean: Array,
    g_scale: Array,
    *,
    scale_prec: bool = True,
    old: bool = True,
    root: bool = False,
) -> Cotangents:
    r"""Cotangents of ``(mean, scale, old_mean, old_scale)`` of :func:`wasserstein_fwd`.

    Full, active rows: Cholesky VJP to :math:`\bar{\tilde\Sigma}`, then
    :math:`\bar{\tilde S} = \bar{\tilde\Sigma}\tilde S + \tilde S\bar{\tilde\Sigma}`; with
    :math:`\Delta = S - S_o` and :math:`\bar d = \langle\bar{\tilde S}, \Delta\rangle
    \partial\tau/\partial d`, :math:`\bar S = \tau\bar{\tilde S} + \bar d\,\partial d/\partial S`
    and :math:`\bar S_o = (1-\tau)\bar{\tilde S} + \bar d\,\partial d/\partial S_o`, where for
    :math:`d = \|R\Delta\|_F^2`, :math:`R = S_o^{-1}`, :math:`E = R\Delta`:
    :math:`\partial d/\partial S = 2\operatorname{sym}(RE)` and
    :math:`\partial d/\partial S_o = -2\operatorname{sym}(RES R)` (unscaled: :math:`\pm 2\Delta`).
    The symmetric-root VJP in each eigenbasis and :math:`\Sigma = LL^\top` lead back to the
    scales. Diagonal Gaussians: the same, elementwise, with :math:`S = \sigma`. Inactive rows pass
    ``g_scale`` through. Without ``old`` the old policy's cotangents are skipped (``None``).
    Symmetric-root scales (``root``): :func:`_root_vjp`.
    """
    if root and p.full:
        return _root_vjp(p, res, g_mean, g_scale, scale_prec=scale_prec, old=old)
    xp, full = p.xp, p.full
    m = project_mean_vjp(
        g_mean, p.mean, p.old_mean, p.old_scale, mean_residuals(res),
        coef=1.0, scale_prec=scale_prec, full=full, xp=xp, old=old,
    )  # fmt: skip
    event_ndim = 2 if full else 1
    axes = (-2, -1) if full else (-1,)
    rows = from_fields(res.rows, res.row_mask)
    p = marked_cov_problem(p, res.shared)  # (a shared covariance: its own batch)
    g_scale = unbroadcast(g_scale, p.scale, xp=xp)  # (summed over the states sharing it)
    if full:
        g_scale = tril(g_scale, xp=xp)
    g_all = g_scale
    g_scale, scale = (take(x, rows, event_ndim=event_ndim, xp=xp) for x in (g_scale, p.scale))
    # (full: the old factor is needed only for the old policy's cotangent)
    old_scale = take(p.old_scale, rows, event_ndim=event_ndim, xp=xp) if old or not full else None
    tau = expand(res.tau, event_ndim, xp=xp)
    if full:
        # The roots from their eigenbases, as the forward built them; every batch-sized
        # temporary is dropped once used (they set the peak memory of forward + backward).
        root = root_from_eig(res.U, res.s, xp=xp)
        old_root = root_from_eig(res.old_U, res.old_s, xp=xp)
        delta = root - old_root
        proj_root = interpolate(root, old_root, res.tau, event_ndim=2, xp=xp)
        if not old:
            root = None  # (not needed past here: the old policy's slope is not computed)
        del old_root
        root_bar = square_vjp(proj_root, cholesky_vjp(res.proj_scale, g_scale, xp=xp), xp=xp)
        del proj_root
    else:
        root_bar = g_scale
        root, old_root = scale, old_scale
        delta = root - old_root
    tau_bar = xp.sum(root_bar * delta, axis=axes)
    dist_bar = expand(
        closed_form_tau_vjp(tau_bar, res.tau, res.dist, res.active, xp=xp), event_ndim, xp=xp
    )
    if full or not scale_prec:  # (unscaled: +-2 delta, elementwise for diagonals too)
        R = None
        if full and scale_prec:
            R = root_from_eig(res.old_U, res.old_s, xp=xp, inverse=True)  # S_o^-1
        d_root, d_old = w2_slopes(delta, root, R, old=old, xp=xp)
        del R
    else:
        r = delta / old_root
        d_root = 2.0 * r / old_root
        d_old = -d_root * root / old_root
    del delta
    bar = tau * root_bar + dist_bar * d_root
    del d_root
    if not old:
        del root_bar
    scale_bar = gram_vjp(sqrtm_vjp(res.U, res.s, bar, xp=xp), scale, xp=xp) if full else bar
    scale_bar = scale_cotangent(
        scale_bar, g_scale, res.active, rows, g_all, event_ndim=event_ndim, xp=xp, owned=full
    )
    if not old:
        return Cotangents(m.mean, scale_bar, None, None)
    old_bar = (1.0 - tau) * root_bar + dist_bar * d_old
    if full:
        old_bar = sqrtm_vjp(res.old_U, res.old_s, old_bar, xp=xp)
        old_scale_bar = gram_vjp(old_bar, old_scale, xp=xp)
    else:
        old_scale_bar = old_bar
    old_scale_bar = old_scale_cotangent(
        old_scale_bar, res.active, rows, m.old_scale, p.old_scale, event_ndim=event_ndim, xp=xp
    )
    return Cotangents(m.mean, scale_bar, m.old_mean, old_scale_bar)


#: torch CPU tensors: :func:`inverse_root` by one LU solve against the identity (True), or by
#: the Cholesky factorisation, a triangular solve and a product (False, the form of every other
#: array). 2 cores, float64, median ms (``benchmarks/root_routes.py``,
#: ``benchmarks/results/cpu-2core-r21-root-routes{,-limits}-2026-11-28.md``): 100,000 6x6
#: matrices 23.5 against 45.0, 1,000 0.588 against 1.04; 1.65-2.88x as fast up to d = 6,
#: 0.96-1.16x at d = 17 and 32.
TORCH_CPU_LU_INVERSE = True


def inverse_root(S_o: Array, *, xp: Any) -> Array:
    r""":math:`S_o^{-1}` of symmetric positive definite roots :math:`S_o`: :math:`S_o = CC^\top`
    (Cholesky, lower triangles read), :math:`X = C^{-1}` (one triangular solve) and
    :math:`S_o^{-1} = X^\top X`, symmetric positive definite by construction, with a relative
    error of about :math:`\kappa(S_o)\varepsilon = \sqrt{\kappa(\Sigma_o)}\varepsilon` (the
    Cholesky factorisation and the triangular solve are backward stable).

    torch CPU tensors (:data:`TORCH_CPU_LU_INVERSE`; those on torch's own kernels, above the
    adapter's NumPy route) take one call instead, the LU solve of :math:`S_oX = I` (partial
    pivoting, whole matrices read), whose error is of the same order but not symmetric:
    :math:`X - X^\top` is of the order of that error, :math:`\kappa(S_o)\varepsilon` relative
    (the projected roots do not read it; the cotangents are symmetric parts). The Cholesky
    form's three calls each pass over the batch, the LU solve is one pass. With the value
    checks off, an indefinite but nonsingular :math:`S_o` raises in the Cholesky form and gives
    a finite, meaningless result by LU."""
    eye = xp.broadcast_to(
        xp.eye(S_o.shape[-1], dtype=S_o.dtype, device=_compat.device(S_o)), tuple(S_o.shape)
    )
    if TORCH_CPU_LU_INVERSE and _compat.is_torch(xp) and _compat.on_host(S_o, xp):
        return xp.linalg.solve(S_o, eye)
    C = _compat.cholesky(S_o, xp=xp)
    X = solve_lower(C, eye, xp=xp)
    return matmul(mT(X, xp=xp), X, xp=xp)


def root_distance(
    S: Array, S_o: Array, *, scale_prec: bool, xp: Any
) -> tuple[Array, Array | None, Array]:
    r"""The W2 covariance part of symmetric roots, :math:`d = \|R\Delta\|_F^2` with
    :math:`R = S_o^{-1}` (:func:`inverse_root`) and :math:`\Delta = S - S_o` (without
    ``scale_prec``: :math:`\|\Delta\|_F^2`, ``R`` is ``None``), and ``(R, Delta)``: what the
    projection, the distance and the loss of roots go on with."""
    R = inverse_root(S_o, xp=xp) if scale_prec else None
    delta = S - S_o
    return frob2(delta if R is None else matmul(R, delta, xp=xp), xp=xp), R, delta


def root_times(R: Array | None, v: Array, *, xp: Any) -> Array:
    """``R v`` for vectors ``v`` (``(..., d)``), ``R`` (``S_o^-1``) broadcast from the
    covariance part's batch to theirs; ``v`` itself where ``R`` is ``None`` (unscaled). With
    ``v = mean - old_mean``, ``|R v|^2`` is the mean part of symmetric roots (Mahalanobis in
    ``Sigma_o = S_o^2``)."""
    if R is None:
        return v
    R = xp.broadcast_to(R, tuple(v.shape[:-1]) + tuple(R.shape[-2:]))
    return matmul(R, v[..., None], xp=xp)[..., 0]


def _root_fwd(
    p: Problem, eps_mean: Array, eps_cov: Array, *, scale_prec: bool
) -> tuple[Gaussian, WassersteinResiduals]:
    r"""The W2 projection of full Gaussians given by their symmetric roots :math:`S`
    (``p.scale``, ``p.old_scale``: symmetric, which the value checks test up to rounding, and
    used as given).

    With :math:`R = S_o^{-1}` (:func:`inverse_root`; only with ``scale_prec``): the mean part is
    :math:`\|R\delta\|^2` (Mahalanobis in :math:`\Sigma_o = S_o^2`), the covariance part
    :math:`d = \|R\Delta\|_F^2` (or :math:`\|\Delta\|_F^2`), :math:`\Delta = S - S_o`, and
    :math:`\tilde S = S_o + \tau\Delta` with the closed-form weight. Rows inside their bound
    return their ``scale`` as given. No decomposition but that of :math:`S_o` in
    :func:`inverse_root`; every row is computed (no row selection: no step is costly enough to
    pay for the gathers)."""
    xp = p.xp
    batch = p.batch
    pc, shared = cov_problem(p, eps_cov)  # (the covariance part once per distinct covariance)
    S, S_o = pc.scale, pc.old_scale
    dist, R, delta = root_distance(S, S_o, scale_prec=scale_prec, xp=xp)
    z = root_times(R, p.mean - p.old_mean, xp=xp)
    dist_mean = row_sum(z * z, xp=xp)
    del z
    mean, tau_mean = project_mean(p.mean, p.old_mean, dist_mean, eps_mean, xp=xp)
    tau = closed_form_tau(dist, eps_cov, xp=xp)
    active = dist > eps_cov
    proj = S_o + expand(tau, 2, xp=xp) * delta
    del delta
    scale = select(active, proj, S, event_ndim=2, xp=xp)
    del proj
    res = WassersteinResiduals(
        tau_mean, dist_mean, dist_mean > eps_mean, tau, dist, active,
        None, None, None, None, None, None, None, shared, R,
    )  # fmt: skip
    return Gaussian(mean, spread(scale, batch, event_ndim=2, xp=xp)), res


def _root_vjp(
    p: Problem,
    res: WassersteinResiduals,
    g_mean: Array,
    g_scale: Array,
    *,
    scale_prec: bool,
    old: bool,
) -> Cotangents:
    r"""Cotangents of :func:`_root_fwd`. Covariance part, with :math:`\bar g =
    \operatorname{sym}(\bar{\tilde S})` on active rows: :math:`\bar d = \langle\bar g,
    \Delta\rangle\,\partial\tau/\partial d`, :math:`\bar S = \tau\bar g + \bar d\,\partial
    d/\partial S` and :math:`\bar S_o = (1 - \tau)\bar g + \bar d\,\partial d/\partial S_o`,
    the slopes of :func:`w2_slopes` (each cotangent formed as one symmetric part); inactive
    rows pass ``g_scale`` through unchanged (their output is the input). Mean part,
    :math:`m = \|z\|^2` with :math:`z = R\delta`: :math:`\partial m/\partial
    \delta = 2Rz` and :math:`\partial m/\partial S_o = -2\operatorname{sym}(Rz\,z^\top)`, through
    :func:`~tr_projections.projections._core.closed_form_tau_vjp` as in
    :func:`~tr_projections.projections._core.project_mean_vjp`. The cotangents are the
    derivatives along symmetric perturbations: symmetric, but for the new root's on rows inside
    their bound (the incoming cotangent, passed through)."""
    xp = p.xp
    pc = marked_cov_problem(p, res.shared)  # (a shared covariance: its own batch)
    R = res.old_root_inv
    # The mean part, on every row.
    delta_m = p.mean - p.old_mean
    dist_bar_m = closed_form_tau_vjp(
        row_sum(g_mean * delta_m, xp=xp), res.tau_mean, res.dist_mean, res.active_mean, xp=xp
    )[..., None]
    z = root_times(R, delta_m, xp=xp)
    w = root_times(R, z, xp=xp)  # (Sigma_o^-1 delta; delta unscaled)
    act_m = res.active_mean[..., None]
    mean_bar = xp.where(act_m, res.tau_mean[..., None] * g_mean + (2.0 * dist_bar_m) * w, g_mean)
    # The covariance part: with RE = R R Delta (Delta unscaled), dd/dS = 2 sym(RE) and
    # dd/dS_o = -2 sym(RE S R) (-2 Delta), so both cotangents are sym() of one sum each.
    g_scale = unbroadcast(g_scale, pc.scale, xp=xp)  # (summed over the states sharing it)
    S, S_o = pc.scale, pc.old_scale
    delta = S - S_o
    tau_bar = xp.sum(g_scale * delta, axis=(-2, -1))  # (= <sym(g), Delta>: Delta is symmetric)
    k = 2.0 * expand(closed_form_tau_vjp(tau_bar, res.tau, res.dist, res.active, xp=xp), 2, xp=xp)
    RE = delta if R is None else matmul(R, matmul(R, delta, xp=xp), xp=xp)
    del delta
    tau = expand(res.tau, 2, xp=xp)
    scale_bar = scale_cotangent(
        sym(tau * g_scale + k * RE, xp=xp), g_scale, res.active, None, g_scale,
        event_ndim=2, xp=xp,
    )  # fmt: skip
    if not old:
        return Cotangents(mean_bar, scale_bar, None, None)
    old_mean_bar = g_mean - mean_bar
    slope = RE if R is None else matmul(matmul(RE, S, xp=xp), R, xp=xp)
    del RE
    old_bar = sym((1.0 - tau) * g_scale - k * slope, xp=xp)
    del slope
    act = expand(res.active, 2, xp=xp)
    old_bar = xp.where(act, old_bar, xp.zeros_like(old_bar))
    if R is not None:  # (the mean part's, -2 dist_bar sym(w z^T); dist_bar is 0 inside)
        wz = matmul(w[..., :, None], z[..., None, :], xp=xp)
        old_bar = old_bar + unbroadcast(
            (-2.0 * dist_bar_m[..., None]) * sym(wz, xp=xp), old_bar, xp=xp
        )
    return Cotangents(mean_bar, scale_bar, old_mean_bar, old_bar)


class W2CovResiduals(NamedTuple):
    """The eigenbases of both roots: what :func:`wasserstein_cov_vjp` rebuilds them from. With
    symmetric-root scales (``root=True``) the bases are ``None`` and :math:`S_o^{-1}` (``None``
    without ``scale_prec``) is kept instead."""

    U: Array | None
    s: Array | None
    old_U: Array | None
    old_s: Array | None
    old_root_inv: Array | None = None


def wasserstein_cov_fwd(
    scale: Array, old_scale: Array, *, scale_prec: bool = True, root: bool = False
) -> tuple[Array, W2CovResiduals]:
    """The W2 covariance part of full Gaussians (what ``trp.wasserstein`` returns second) and
    the residuals of its VJP. An operation of its own so that autodiff never differentiates
    ``eigh`` or the SVD: their eigenvector derivatives divide by differences of eigenvalues,
    NaN for repeated ones (an identity covariance). With ``root`` the scales are symmetric
    roots: no decomposition but the Cholesky factorisation of the old one
    (:func:`inverse_root`)."""
    xp = _compat.array_namespace(scale, old_scale)
    if root:
        dist, R, _ = root_distance(scale, old_scale, scale_prec=scale_prec, xp=xp)
        return dist, W2CovResiduals(None, None, None, None, R)
    dist, _, eig = wasserstein_chart(scale, old_scale, full=True, scale_prec=scale_prec, xp=xp)
    return dist, W2CovResiduals(*eig)


def wasserstein_cov_vjp(
    scale: Array,
    old_scale: Array,
    res: W2CovResiduals,
    g: Array,
    *,
    scale_prec: bool = True,
    root: bool = False,
    new: bool = True,
    old: bool = True,
) -> tuple[Array | None, Array | None]:
    r"""Cotangents of ``(scale, old_scale)`` of :func:`wasserstein_cov_fwd` (``None`` for the
    one that ``new`` or ``old`` says is not wanted) for the cotangent
    ``g`` of the part: with :math:`\Delta = S - S_o`, :math:`R = S_o^{-1}`, :math:`E = R\Delta`,
    :math:`\partial d/\partial S = 2\operatorname{sym}(RE)` and :math:`\partial d/\partial S_o
    = -2\operatorname{sym}(RESR)` (unscaled: :math:`\pm 2\Delta`), then the symmetric-root VJP
    (sums of roots as denominators: finite for repeated eigenvalues) and
    :math:`\Sigma = LL^\top`, as in :func:`wasserstein_vjp`. Symmetric-root scales
    (``root``): the two slopes themselves."""
    xp = _compat.array_namespace(scale, old_scale)
    g = expand(g, 2, xp=xp)
    if root:
        d_root, d_old = w2_slopes(scale - old_scale, scale, res.old_root_inv, old=old, xp=xp)
        return (g * d_root if new else None), (g * d_old if old else None)
    root_ = root_from_eig(res.U, res.s, xp=xp)
    old_root = root_from_eig(res.old_U, res.old_s, xp=xp)
    delta = root_ - old_root
    R = root_from_eig(res.old_U, res.old_s, xp=xp, inverse=True) if scale_prec else None
    d_root, d_old = w2_slopes(delta, root_, R, old=old, xp=xp)
    scale_bar = None
    if new:
        scale_bar = gram_vjp(sqrtm_vjp(res.U, res.s, g * d_root, xp=xp), scale, xp=xp)
    if not old:
        return scale_bar, None
    old_bar = gram_vjp(sqrtm_vjp(res.old_U, res.old_s, g * d_old, xp=xp), old_scale, xp=xp)
    return scale_bar, old_bar


__all__ = [
    "W2CovResiduals",
    "WassersteinResiduals",
    "inverse_root",
    "root_distance",
    "root_times",
    "wasserstein_cov_fwd",
    "wasserstein_cov_vjp",
    "wasserstein_fwd",
    "wasserstein_vjp",
]
