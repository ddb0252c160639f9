r"""The distances each projection bounds, split into a mean part and a covariance part.

Each public function returns ``(mean_part, cov_part)``, arrays of the batch shape, which are
exactly the quantities the matching projection keeps below ``eps_mean`` and ``eps_cov``:

* :func:`kl`: mean :math:`\tfrac12 \delta^\top\Lambda_o\delta`; covariance
  :math:`\tfrac12[\operatorname{tr}(\Lambda_o\Sigma) - d + \log|\Sigma_o| - \log|\Sigma|]`;
* :func:`frobenius`: mean :math:`\delta^\top\Lambda_o\delta` (or :math:`\|\delta\|^2` with
  ``scale_prec=False``); covariance :math:`\|\Sigma - \Sigma_o\|_F^2`;
* :func:`wasserstein`: mean as for Frobenius; covariance :math:`\|S_o^{-1}(S - S_o)\|_F^2` (or
  :math:`\|S - S_o\|_F^2`), :math:`S = \Sigma^{1/2}` the symmetric root;

with :math:`\delta = \mu - \mu_o`. The private helpers compute each covariance part together with
the chart coordinates the projections interpolate. The KL part of full Gaussians is the closed
form of :func:`kl_cov_closed`, the projection's eigenvalue form (:func:`kl_eigs`) the same
quantity to rounding: for a state within a few ulps of its bound the two may disagree on which
side it lies.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from . import _compat, _rows
from ._compat import matmul, row_sum, solve_triangular
from ._inputs import prepare
from .gaussian import (
    diag_embed,
    diagonal,
    frob2,
    mahalanobis,
    mT,
    root_from_cholesky,
    root_from_eig,
    tril,
)

__all__ = ["DistanceParts", "frobenius", "kl", "wasserstein"]

Array = Any


class DistanceParts(NamedTuple):
    """A distance split into the part that moves the mean and the part that moves the covariance."""

    mean: Array
    cov: Array


# --------------------------------------------------------------------------- mean part


def mean_distance(
    mean: Array, old_mean: Array, old_scale: Array, *, full: bool, scale_prec: bool, xp: Any
) -> Array:
    r"""Mahalanobis :math:`(\mu-\mu_o)^\top\Lambda_o(\mu-\mu_o)` or squared Euclidean distance."""
    diff = mean - old_mean
    if scale_prec:
        return mahalanobis(diff, old_scale, full=full, xp=xp)
    return row_sum(diff * diff, xp=xp)


# --------------------------------------------------------------------------- KL


def _h_series_threshold(dtype: Any, *, xp: Any) -> float:
    # Below this |x| the alternating series is used: its truncation error (~1.8 |x|^9 relative)
    # and the cancellation of the direct formula (~4 eps_mach / |x| relative) are then both at
    # the dtype's resolution.
    return 0.01 if xp.finfo(dtype).eps < 1e-10 else 0.1


def kl_h(x: Array, t: Array, *, xp: Any, series: bool = True) -> Array:
    r""":math:`h(x) = \log(1 + x) - x/t` with :math:`t = 1 + x > 0`, accurate near 0 and near -1.

    :math:`\tfrac12 \sum_i h(x_i)` is the KL covariance part when :math:`t_i = 1 + x_i` are the
    eigenvalues of :math:`L_o^\top \Lambda L_o`. The caller passes ``t`` computed without the
    cancellation of ``1 + x`` (which loses :math:`t` entirely when :math:`x \approx -1`, i.e. a
    new std far above the old one): there :math:`h \approx 1/t` and only :math:`x/t` needs
    full accuracy, so the logarithm may take ``x`` clamped just above -1. Near zero both terms
    cancel to :math:`x^2/2` (relative error about :math:`4\varepsilon_{mach}/|x|`); with
    ``series`` the alternating series :math:`\sum_{k\ge2} (-1)^k \tfrac{k-1}{k} x^k` replaces
    them there.
    """
    finfo = xp.finfo(x.dtype)
    direct = xp.log1p(_compat.maximum(x, finfo.eps - 1.0, xp=xp)) - x / t
    if not series:
        return direct
    small = xp.abs(x) < _h_series_threshold(x.dtype, xp=xp)
    xs = xp.where(small, x, xp.zeros_like(x))
    poly = xp.zeros_like(x)
    for k in range(10, 1, -1):  # Horner on x^2 * sum_{k=2..10} c_k x^(k-2)
        poly = poly * xs + ((-1.0) ** k) * (k - 1) / k
    return xp.where(small, poly * xs * xs, direct)


class KLEigs(NamedTuple):
    r"""The KL problem in scalars: :math:`\lambda_i` (``lam``), the eigenvalues of
    :math:`A = L_o^\top\Lambda L_o`, both as ``a`` :math:`= \lambda - 1` and as ``lam``, each
    computed without cancellation where it matters, and the eigenvectors ``U`` (full only)."""

    a: Array
    lam: Array
    U: Array | None


def kl_f(scale: Array, old_scale: Array, *, xp: Any) -> Array:
    r""":math:`F = L_o^{-1}(L - L_o)` (full scales): :math:`L_o^{-1}L = I + F`. The KL's
    eigenvalue problem and both row tests (:func:`kl_may_exceed`,
    :func:`wasserstein_may_exceed`) start from it."""
    return solve_triangular(old_scale, scale - old_scale, lower=True, xp=xp)


def kl_may_exceed(F: Array, scale: Array, old_scale: Array, eps: Array, *, xp: Any) -> Array:
    r"""Rows (full scales) whose KL covariance part may exceed ``eps``, decided without a
    decomposition: the trace/log-determinant form
    :math:`\tfrac12[\operatorname{tr}(A^{-1} - I) - \log|A^{-1}|]` with
    :math:`\operatorname{tr}(A^{-1} - I) = 2\operatorname{tr}F + \|F\|_F^2` and
    :math:`\log|A^{-1}| = 2\sum_i(\log L_{ii} - \log L_{o,ii})`, less a margin far above its
    rounding (a thousandth of ``eps`` plus 64 :math:`\varepsilon_{mach}` times the size of its
    terms). A row outside the result is inside its bound; the rows in it are decided exactly,
    from the eigenvalues."""
    diag_f = diagonal(F, xp=xp)
    sq = frob2(F, xp=xp)
    log_r = xp.log(diagonal(scale, xp=xp)) - xp.log(diagonal(old_scale, xp=xp))
    g = 0.5 * (2.0 * row_sum(diag_f, xp=xp) + sq) - row_sum(log_r, xp=xp)
    size = 2.0 * row_sum(xp.abs(diag_f), xp=xp) + sq + 2.0 * row_sum(xp.abs(log_r), xp=xp)
    return _above_with_margin(g, size, eps, d=F.shape[-1], dtype=F.dtype, xp=xp)


def kl_may_exceed_diag(eigs: KLEigs, eps: Array, *, xp: Any) -> Array:
    r"""Rows (diagonal scales) whose KL covariance part may exceed ``eps``, from the direct
    form :math:`\tfrac12\sum_i[\log\lambda_i - a_i/\lambda_i]` (a few elementwise passes, no
    series), less the same kind of margin as :func:`kl_may_exceed`: a thousandth of ``eps`` plus
    64 :math:`\varepsilon_{mach}` times the size of its terms, far above its rounding (the
    cancellation near :math:`a = 0` is absolute, at most a few :math:`\varepsilon_{mach}`
    times the terms). Rows outside the result are inside their bound; the others are decided
    from the accurate :func:`kl_cov_from_eigs`."""
    ratio = eigs.a / eigs.lam
    g = 0.5 * row_sum(xp.log(eigs.lam) - ratio, xp=xp)
    # log(lam) and a/lam share their sign, and |log(lam)| <= |a/lam| + h: the size of the terms
    # is at most 2 sum|a/lam| + 2g.
    size = 2.0 * (row_sum(xp.abs(ratio), xp=xp) + xp.abs(g))
    return _above_with_margin(g, size, eps, d=eigs.a.shape[-1], dtype=g.dtype, xp=xp)


def _above_with_margin(g: Array, size: Array, eps: Array, *, d: int, dtype: Any, xp: Any) -> Array:
    """``g > eps - margin``: the margin of the row tests above, a thousandth of ``eps`` plus
    64 machine epsilons times the size of the terms of ``g`` (and ``d``)."""
    return g > eps - (1e-3 * eps + 64.0 * xp.finfo(dtype).eps * (size + d))


def _any_all(mask: Array, *, xp: Any) -> tuple[bool | None, bool | None]:
    """Whether any and whether every entry of ``mask`` is true (one host read), ``(None,
    None)`` under tracing."""
    n = _compat.count_true(mask, xp=xp)
    return (None, None) if n is None else (n > 0, n == math.prod(tuple(mask.shape)))


def _a_minus_identity(scale: Array, old_scale: Array, *, xp: Any) -> Array:
    r""":math:`A - I = E + E^\top + E^\top E` with :math:`E = L^{-1}(L_o - L)`
    (:func:`kl_eigs`)."""
    E = solve_triangular(scale, old_scale - scale, lower=True, xp=xp)
    Et = mT(E, xp=xp)
    return E + Et + matmul(Et, E, xp=xp)


def kl_eigs(
    scale: Array, old_scale: Array, *, full: bool, vectors: bool, xp: Any, F: Array | None = None
) -> KLEigs:
    r"""The eigenvalues of the precision relative to the old covariance.

    Full: :math:`A = L_o^\top\Lambda L_o = B^\top B` with :math:`B = L^{-1}L_o`, and its
    inverse :math:`C = A^{-1} = B^{-1}B^{-\top}`, :math:`B^{-1} = L_o^{-1}L`. A symmetric
    ``eigh`` is accurate to :math:`\varepsilon_{mach}` times the norm of the matrix it is
    given, and the KL is dominated by the small :math:`\lambda_i` (terms
    :math:`1/(2\lambda_i)`; large ones only add :math:`\tfrac12\log\lambda_i`), so each row
    decomposes the matrix that keeps its dominant eigenvalues relatively accurate, as a
    difference from the identity that has no :math:`1 - 1` cancellation when the new policy is
    close to the old:

    * :math:`C - I = F + F^\top + F F^\top`, :math:`F = L_o^{-1}(L - L_o)`, when
      :math:`\operatorname{tr}(C) > d` (some new variance above the old one) or
      :math:`\|F\|_F \le \tfrac12` (a step inside a trust region: then the eigenvalues
      :math:`1 + c_i = \sigma_i(I + F)^2` of :math:`C` lie in :math:`[\tfrac14, \tfrac94]`):
      with its eigenvalues :math:`c_i`, :math:`\lambda = 1/(1 + c)` and :math:`a = -c/(1 + c)`,
      relatively accurate however wide the new covariance is;
    * :math:`A - I = E + E^\top + E^\top E`, :math:`E = L^{-1}(L_o - L)`, on the other rows
      (:math:`\operatorname{tr}(C) \le d`: then every :math:`\lambda_i \ge 1/d`):
      :math:`a = \text{eigenvalue}`, :math:`\lambda = 1 + a`.

    The relative error of the resulting KL is then about :math:`\varepsilon_{mach}` times
    :math:`\max(1, \lambda_{max})` (times :math:`d` in the second case), instead of
    :math:`\varepsilon_{mach}\lambda_{max}/\lambda_{min}`. Both matrices share the eigenvectors
    ``U``; ``F`` may be passed when the caller has it (:func:`kl_f`). The second matrix costs a
    triangular solve of its own; eager arrays form it only when some row needs it (a batch of
    steps inside their trust regions needs none). Diagonal: with :math:`q = \sigma_o/\sigma`,
    :math:`\lambda = q^2` and :math:`a = (q - 1)(q + 1)`, both to full relative accuracy
    (``q - 1`` is exact near 1), with no decomposition and no transcendental function. ``U``
    is returned only with ``vectors``.
    """
    finfo = xp.finfo(scale.dtype)
    if not full:
        q = old_scale / scale
        return KLEigs(
            (q - 1.0) * (q + 1.0), _compat.maximum(q * q, finfo.smallest_normal, xp=xp), None
        )
    d = scale.shape[-1]
    if F is None:
        F = kl_f(scale, old_scale, xp=xp)
    # tr(C - I) = 2 tr(F) + ||F||_F^2 (F is lower triangular).
    sq = frob2(F, xp=xp)
    grows = 2.0 * row_sum(diagonal(F, xp=xp), xp=xp) + sq > 0.0  # tr(C) > d
    use_c = grows | (sq <= 0.25)
    any_c, all_c = _any_all(use_c, xp=xp)  # (None under tracing)
    # Eager arrays build only the matrix some row needs, E on those rows alone where they are
    # few (a batch of small steps has none, or a few large ones). Where they are most rows, the
    # small steps take E too (accurate either way), as the rows of tr(C) <= d did before.
    rows_e = None if all_c or not any_c else _rows.choose(~use_c, xp=xp)
    if any_c and not all_c and rows_e is None:
        use_c = grows
        any_c, all_c = _any_all(use_c, xp=xp)
    if all_c or rows_e is not None:
        M = F + mT(F, xp=xp) + matmul(F, mT(F, xp=xp), xp=xp)
        if rows_e is not None:
            L, L_o = (_rows.take(x, rows_e, event_ndim=2, xp=xp) for x in (scale, old_scale))
            M = _rows.put(
                _a_minus_identity(L, L_o, xp=xp), rows_e, M, event_ndim=2, xp=xp, owned=True
            )
    else:
        M = _a_minus_identity(scale, old_scale, xp=xp)
        if any_c is not False:
            Mc = F + mT(F, xp=xp) + matmul(F, mT(F, xp=xp), xp=xp)
            M = xp.where(use_c[..., None, None], Mc, M)
    # Symmetric up to rounding, and eigh reads one triangle: no symmetrisation pass needed.
    e, U = _compat.eigh(M, xp=xp)
    U = U if vectors else None
    if any_c is False:
        return KLEigs(e, 1.0 + e, U)
    # On C rows, 1 + c = 1/lambda > 0; rounding (absolute eps * max|c|) can only make the
    # smallest ones inaccurate, where lambda is large and adds just log(lambda) to the KL.
    one_c = xp.maximum(1.0 + e, (4.0 * d * finfo.eps) * xp.max(1.0 + e, axis=-1, keepdims=True))
    if all_c:
        return KLEigs(-e / one_c, 1.0 / one_c, U)
    lam = xp.where(use_c[..., None], 1.0 / one_c, 1.0 + e)
    a = xp.where(use_c[..., None], -e / one_c, e)
    return KLEigs(a, lam, U)


def kl_cov_from_eigs(eigs: KLEigs, *, xp: Any) -> Array:
    return 0.5 * row_sum(kl_h(eigs.a, eigs.lam, xp=xp), xp=xp)


def kl(mean: Array, scale: Array, old_mean: Array, old_scale: Array) -> DistanceParts:
    r"""KL divergence :math:`\mathrm{KL}(\pi \| \pi_o)` split into mean and covariance parts.

    Mean part :math:`\tfrac12 (\mu-\mu_o)^\top \Lambda_o (\mu-\mu_o)`; covariance part
    :math:`\tfrac12[\operatorname{tr}(\Lambda_o\Sigma) - d + \log|\Sigma_o| - \log|\Sigma|]`,
    evaluated as a sum of non-negative terms so it stays accurate for tiny divergences (the
    textbook formula has an absolute error of about :math:`d \cdot 10^{-16}`): for full scales
    the closed form of :func:`kl_cov_closed` (no decomposition; differentiable to any order),
    for diagonal ones :math:`\tfrac12\sum_i h(a_i)` (:func:`kl_h`) in the variance ratios.

    Examples
    --------
    >>> import numpy as np, tr_projections as trp
    >>> m, c = trp.kl(np.zeros(2), np.full(2, 2.0), np.ones(2), np.ones(2))
    >>> float(m), round(float(c), 6)  # 1/2 |delta|^2 and d/2 (4 - 1 - log 4)
    (1.0, 1.613706)
    """
    return _distance("kl", (mean, scale, old_mean, old_scale), {})


def _kl(p: Any) -> DistanceParts:
    xp = p.xp
    with _compat.serial_decompositions():  # (JAX: one LAPACK call at a time)
        m = mean_distance(p.mean, p.old_mean, p.old_scale, full=p.full, scale_prec=True, xp=xp)
        L, L_o = _lower_factors(p, xp=xp)
        if p.full:
            return DistanceParts(0.5 * m, kl_cov_closed(L, L_o, xp=xp))
        eigs = kl_eigs(L, L_o, full=False, vectors=False, xp=xp)
    return DistanceParts(0.5 * m, kl_cov_from_eigs(eigs, xp=xp))


def kl_cov_closed(scale: Array, old_scale: Array, *, xp: Any, F: Array | None = None) -> Array:
    r"""The KL covariance part of full scales in closed form, from ``F``
    :math:`= L_o^{-1}(L - L_o)` (:func:`kl_f`; passed where the caller has it), without a
    decomposition.

    With :math:`\operatorname{tr}(\Lambda_o\Sigma) = \|I + F\|_F^2` and
    :math:`\log|\Sigma|/|\Sigma_o| = 2\sum_i \log r_i`, :math:`r_i = L_{ii}/L_{o,ii} = 1 +
    F_{ii}` (both factors lower triangular), the part is

    .. math:: \tfrac12\sum_{i \ne j} F_{ij}^2 + \sum_i g(F_{ii}),\qquad
              g(x) = \tfrac12 x^2 + x - \log(1 + x) \ge 0,

    a sum of non-negative terms: no cancellation between them, however close or far the two
    covariances are (the off-diagonal squares are summed on their own, so a part beyond the
    dtype's range is ``inf``, not ``inf - inf``). :math:`g` takes :math:`\log r_i` from
    :func:`_log_ratio` (``log1p`` of :math:`F_{ii}` near 1, whatever the scales' size; the
    ratio of the diagonals as :math:`r_i \to 0`, where :math:`1 + F_{ii}` is not accurate),
    and near :math:`x = 0`, where :math:`x - \log(1 + x)` cancels to :math:`x^2/2`, its
    alternating series :math:`x^2 - x^3/3 + x^4/4 - \dots` (below the threshold of
    :func:`kl_h`). The relative error is then about that of ``F``
    (``tests/test_kl_exact.py``, d = 6, against a 60-digit evaluation: at most 1e-14 in
    float64 for old factors of condition number up to 1e4 and of scales from 1e-100 to 1e100,
    steps from 1e-9 to unrelated pairs, covariances 1e6 times narrower or wider; at most 2e-6
    in float32 for scales from 1e-18 to 1e18). Products, one triangular solve and logarithms:
    differentiable to any order everywhere, where
    differentiating ``eigh`` is not (its second derivatives divide by differences of
    eigenvalues, all zero at the old policy itself, where TRPO's natural gradient takes the
    KL's Hessian-vector products)."""
    if F is None:
        F = kl_f(scale, old_scale, xp=xp)
    x = diagonal(F, xp=xp)
    small = xp.abs(x) < _h_series_threshold(x.dtype, xp=xp)
    xs = xp.where(small, x, xp.zeros_like(x))
    poly = xp.zeros_like(x)
    for k in range(10, 1, -1):  # Horner on x^2 * sum_{k=2..10} c_k x^(k-2), c_2 = 1/2 + 1/2
        poly = poly * xs + (((-1.0) ** k) / k + (0.5 if k == 2 else 0.0))
    log_r = _log_ratio(x, diagonal(scale, xp=xp), diagonal(old_scale, xp=xp), xp=xp)
    g = xp.where(small, poly * xs * xs, 0.5 * x * x + x - log_r)
    off = F - diag_embed(x, xp=xp)  # (summed on its own: no inf - inf where F_ii overflows)
    return 0.5 * frob2(off, xp=xp) + row_sum(g, xp=xp)


def _log_ratio(x: Array, diag: Array, old_diag: Array, *, xp: Any) -> Array:
    r""":math:`\log r_i = \log(L_{ii}/L_{o,ii})` (``diag``, ``old_diag``: the factors'
    diagonals) with :math:`x_i = r_i - 1` (``F``'s diagonal,
    relatively accurate): ``log1p(x)`` where :math:`x > -\tfrac12` (a difference of the two
    logarithms would carry their absolute errors, :math:`\varepsilon|\log L_{ii}|`, into a
    :math:`g(x)` of size :math:`x^2`), the logarithm of the ratio below that (where
    :math:`g \ge 0.3`), and the difference of the logarithms where the ratio is no normal
    number. Every branch finite, for the derivatives of :func:`kl_cov_closed`."""
    near = x > -0.5
    ratio = diag / old_diag
    normal = ratio >= xp.finfo(x.dtype).smallest_normal
    apart = xp.log(diag) - xp.log(old_diag)
    far = xp.where(normal, xp.log(xp.where(normal, ratio, xp.ones_like(x))), apart)
    return xp.where(near, xp.log1p(xp.where(near, x, xp.zeros_like(x))), far)


def _lower_factors(p: Any, *, xp: Any) -> tuple[Array, Array]:
    """``(scale, old_scale)`` of problem ``p`` for a distance's covariance part. Full factors of
    libraries with autodiff (torch, JAX) come back as their lower triangle plus the rest with
    its gradient stopped: the same values (a broadcast view becomes a copy), but autodiff of
    the part's products and solves no longer gives the strict upper triangle (zero, as the
    value checks ask) a gradient, which the package's convention for Cholesky factors makes
    zero (as the projections' VJPs and the W2 part's do)."""
    if not p.full or not (_compat.is_torch(xp) or _compat.is_jax(xp)):
        return p.scale, p.old_scale
    lower = [tril(x, xp=xp) for x in (p.scale, p.old_scale)]
    return tuple(
        t + _compat.stop_gradient(x - t, xp=xp)
        for t, x in zip(lower, (p.scale, p.old_scale), strict=True)
    )


# --------------------------------------------------------------------------- Frobenius


def frobenius_cov(scale: Array, old_scale: Array, *, full: bool, xp: Any):
    r""":math:`\|\Sigma - \Sigma_o\|_F^2` and the chart coordinates :math:`(\Sigma, \Sigma_o)`
    (variances for diagonals). Never precision-scaled, as in the reference method. Full: the
    plain products :math:`LL^\top`, symmetric up to rounding; their users read one triangle
    (Cholesky) or symmetrise what they keep."""
    if not full:
        cov, old = scale * scale, old_scale * old_scale
        diff = cov - old
        return row_sum(diff * diff, xp=xp), cov, old
    cov = matmul(scale, mT(scale, xp=xp), xp=xp)
    old = matmul(old_scale, mT(old_scale, xp=xp), xp=xp)
    return frob2(cov - old, xp=xp), cov, old


def frobenius(
    mean: Array, scale: Array, old_mean: Array, old_scale: Array, *, scale_prec: bool = True
) -> DistanceParts:
    r"""Frobenius distance split into :math:`\delta^\top\Lambda_o\delta` (or :math:`\|\delta\|^2`
    with ``scale_prec=False``) and :math:`\|\Sigma - \Sigma_o\|_F^2`.

    Examples
    --------
    >>> import numpy as np, tr_projections as trp
    >>> m, c = trp.frobenius(np.zeros(2), np.full(2, 2.0), np.ones(2), np.ones(2))
    >>> float(m), float(c)  # |delta|^2 = 2, two variances off by 3
    (2.0, 18.0)
    """
    options = {"scale_prec": bool(scale_prec)}
    return _distance("frobenius", (mean, scale, old_mean, old_scale), options)


def _frobenius(p: Any, *, scale_prec: bool) -> DistanceParts:
    xp = p.xp
    with _compat.serial_decompositions():
        m = mean_distance(
            p.mean, p.old_mean, p.old_scale, full=p.full, scale_prec=scale_prec, xp=xp
        )
        c, _, _ = frobenius_cov(*_lower_factors(p, xp=xp), full=p.full, xp=xp)
    return DistanceParts(m, c)


# --------------------------------------------------------------------------- Wasserstein


class RootChart(NamedTuple):
    """Symmetric roots of new and old covariance (stds for diagonals) and the old inverse root."""

    root: Array
    old_root: Array
    old_root_inv: Array | None


class RootEig(NamedTuple):
    r"""Eigenbases of both covariances, :math:`\Sigma = U \operatorname{diag}(s^2) U^\top` and
    the same for the old one (full Gaussians only): what the VJP of the root chart needs."""

    U: Array
    s: Array
    old_U: Array
    old_s: Array


def wasserstein_may_exceed(F: Array, eps: Array, *, xp: Any) -> Array:
    r"""Rows (full scales, precision-scaled W2) whose covariance part may exceed ``eps``,
    decided without a decomposition, from ``F`` :math:`= L_o^{-1}(L - L_o)` (:func:`kl_f`).

    With :math:`X = S_o^{-1}S` the part is :math:`\operatorname{tr}(X^\top X) -
    2\operatorname{tr}X + d`, where :math:`\operatorname{tr}(X^\top X) =
    \operatorname{tr}(\Sigma_o^{-1}\Sigma) = \|I + F\|_F^2`. :math:`X` is similar to the SPD
    :math:`S_o^{-1/2}SS_o^{-1/2}`, so its eigenvalues are positive and the AM-GM inequality gives
    :math:`\operatorname{tr}X \ge d\,(\det X)^{1/d}` with
    :math:`\det X = \det L/\det L_o = \prod_i(1 + F_{ii})`. Hence the part is at most

    .. math:: \|F\|_F^2 + 2d\,\big(\overline{F_{ii}} - \operatorname{expm1}
              (\overline{\log(1 + F_{ii})})\big)

    (both terms non-negative, exact when :math:`S` and :math:`S_o` commute with equal
    eigenvalue ratios, about twice the part for small random steps), less the margin of
    :func:`kl_may_exceed` (without its term in ``d``: every term here scales with ``F``). A row
    outside the result is inside its bound; the others are decided from the roots."""
    diag_f = diagonal(F, xp=xp)
    d = F.shape[-1]
    mean_f = xp.mean(diag_f, axis=-1)
    gm = xp.expm1(xp.mean(xp.log1p(diag_f), axis=-1))
    sq = frob2(F, xp=xp)
    ub = sq + (2.0 * d) * (mean_f - gm)
    size = sq + (2.0 * d) * (xp.abs(mean_f) + xp.abs(gm))
    # (no term of size one here, unlike the KL's trace form: the margin scales with F alone)
    return _above_with_margin(ub, size, eps, d=0, dtype=F.dtype, xp=xp)


def wasserstein_chart(scale: Array, old_scale: Array, *, full: bool, scale_prec: bool, xp: Any):
    r""":func:`wasserstein_cov` plus the eigenbases of the roots (``None`` for diagonals)."""
    if not full:
        diff = scale - old_scale
        if scale_prec:
            diff = diff / old_scale
        return row_sum(diff * diff, xp=xp), RootChart(scale, old_scale, None), None
    S, U, s = root_from_cholesky(scale, xp=xp)
    S_o, U_o, s_o = root_from_cholesky(old_scale, xp=xp)
    diff = S - S_o
    S_o_inv = None
    if scale_prec:
        S_o_inv = root_from_eig(U_o, s_o, xp=xp, inverse=True)
        diff = matmul(S_o_inv, diff, xp=xp)
    return frob2(diff, xp=xp), RootChart(S, S_o, S_o_inv), RootEig(U, s, U_o, s_o)


def wasserstein_cov(scale: Array, old_scale: Array, *, full: bool, scale_prec: bool, xp: Any):
    r"""The W2 covariance part in the chart :math:`S = \Sigma^{1/2}` (commuting approximation):
    :math:`\|S_o^{-1}(S - S_o)\|_F^2` with ``scale_prec`` else :math:`\|S - S_o\|_F^2`."""
    dist, chart, _ = wasserstein_chart(scale, old_scale, full=full, scale_prec=scale_prec, xp=xp)
    return dist, chart


def wasserstein(
    mean: Array,
    scale: Array,
    old_mean: Array,
    old_scale: Array,
    *,
    scale_prec: bool = True,
    root: bool = False,
) -> DistanceParts:
    r"""Wasserstein-2 distance (commuting approximation) split into a mean part, as for
    :func:`frobenius`, and the covariance part :math:`\|S_o^{-1}(S - S_o)\|_F^2`
    (``scale_prec=True``) or :math:`\|S - S_o\|_F^2`, with :math:`S = \Sigma^{1/2}` the symmetric
    square root. With ``root=True`` full scales are those symmetric roots themselves (symmetric
    positive definite) instead of lower Cholesky factors, as for
    :func:`~tr_projections.project_wasserstein`; diagonal scales (stds) are roots already.

    Examples
    --------
    >>> import numpy as np, tr_projections as trp
    >>> m, c = trp.wasserstein(np.zeros(2), np.full(2, 2.0), np.ones(2), np.ones(2))
    >>> float(m), float(c)
    (2.0, 2.0)
    """
    options = {"scale_prec": bool(scale_prec), "root": bool(root)}
    return _distance("wasserstein", (mean, scale, old_mean, old_scale), options)


def _wasserstein(p: Any, *, scale_prec: bool, root: bool) -> DistanceParts:
    xp = p.xp
    if p.full and root:
        from .backends import apply

        with _compat.serial_decompositions() as last:
            # (through the operation with its own VJP, as for Cholesky factors: one hand-written
            # VJP for every library, and no derivative of the Cholesky factorisation of S_o)
            options = {"scale_prec": scale_prec, "root": True}
            c = apply("wasserstein_cov", (p.scale, p.old_scale), (), options)[0]
            last[0] = c  # (JAX: the mean part's factorisation waits for the operation's)
            diff = p.mean - p.old_mean
            if not scale_prec:
                return DistanceParts(row_sum(diff * diff, xp=xp), c)
            # |S_o^-1 delta|^2 (Sigma_o^-1 = S_o^-2), S_o = C C^T: differentiable by every
            # library's autodiff.
            C = _compat.cholesky(p.old_scale, xp=xp)
            y = solve_triangular(C, diff[..., None], lower=True, xp=xp)
            z = solve_triangular(mT(C, xp=xp), y, lower=False, xp=xp)[..., 0]
        return DistanceParts(row_sum(z * z, xp=xp), c)
    with _compat.serial_decompositions() as last:
        if p.full:
            # (through an operation with its own VJP: torch's and JAX's derivatives of eigh or
            # the SVD are NaN for repeated eigenvalues, e.g. identity covariances)
            from .backends import apply

            args = (p.scale, p.old_scale)
            c = apply("wasserstein_cov", args, (), {"scale_prec": scale_prec})[0]
            last[0] = c  # (JAX: the mean part's solve waits for the operation's decompositions)
        else:
            c, _ = wasserstein_cov(p.scale, p.old_scale, full=False, scale_prec=scale_prec, xp=xp)
        m = mean_distance(
            p.mean, p.old_mean, p.old_scale, full=p.full, scale_prec=scale_prec, xp=xp
        )
    return DistanceParts(m, c)


# --------------------------------------------------------------------------- dispatch

_BODIES = {"kl": _kl, "frobenius": _frobenius, "wasserstein": _wasserstein}


def _distance(name: str, arrays: tuple, options: dict) -> DistanceParts:
    """Distance ``name`` of the four ``arrays`` (options: booleans): checked, then computed
    here or, for JAX arrays whose values are known (outside ``jit``: eager autodiff and an eager
    ``vmap`` included), by the JAX adapter's compiled program
    (:func:`tr_projections.backends.jax.distance`)."""
    p = prepare(*arrays, roots=options.get("root", False))
    if _compat.is_jax(p.xp):
        from .backends import jax as jax_adapter

        out = jax_adapter.distance(name, arrays, options)
        if out is not None:
            return out
    return _BODIES[name](p, **options)


def parts(name: str, arrays: tuple, options: dict) -> DistanceParts:
    """Distance ``name`` of arrays already checked (the body of the JAX adapter's compiled
    program): no value checks, no dispatch."""
    p = prepare(*arrays, check_values=False, roots=options.get("root", False))
    return _BODIES[name](p, **options)
