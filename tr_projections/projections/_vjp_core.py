r"""Vector–Jacobian products of the maps between charts, shared by every projection's VJP.

Conventions used by every function here and by the projections' VJPs:

* A cotangent :math:`\bar X` of a **symmetric** matrix :math:`X` is symmetric and pairs with
  symmetric perturbations: :math:`d\ell = \langle \bar X, dX \rangle` for :math:`dX = dX^\top`.
* A cotangent :math:`\bar L` of a **Cholesky factor** is lower triangular: entry ``(i, j)``,
  ``i >= j``, is :math:`\partial\ell/\partial L_{ij}`; the strict upper triangle is zero, because
  the functions only read the lower triangle. Incoming cotangents of a Cholesky output have their
  strict upper triangle ignored (that part of the output is constantly zero).

No function here differentiates an eigendecomposition: eigenvectors from the forward pass are
*used* (the symmetric square root), never differentiated, so repeated eigenvalues, the common case
``new == old``, are harmless.
"""

from __future__ import annotations

from typing import Any

from .. import _compat
from .._compat import matmul, solve_triangular
from ..gaussian import _row_col, mT, sym, tril

Array = Any


def solve_lower(L: Array, B: Array, *, xp: Any) -> Array:
    r""":math:`L^{-1} B` for lower-triangular ``L``."""
    return solve_triangular(L, B, lower=True, xp=xp)


def solve_lower_t(L: Array, B: Array, *, xp: Any) -> Array:
    r""":math:`L^{-\top} B` for lower-triangular ``L`` (an upper-triangular solve)."""
    return solve_triangular(mT(L, xp=xp), B, lower=False, xp=xp)


def gram_vjp(sigma_bar: Array, L: Array, *, xp: Any) -> Array:
    r"""VJP of :math:`\Sigma = L L^\top`: :math:`\bar L = \operatorname{tril}(2 \bar\Sigma L)`
    for a symmetric :math:`\bar\Sigma`."""
    return tril(2.0 * matmul(sigma_bar, L, xp=xp), xp=xp)


def _phi_mask(d: int, dtype: Any, device: Any, *, xp: Any) -> Array:
    r"""The ``(d, d)`` multiplier of :math:`\Phi`: ones below the diagonal, 1/2 on it, zeros
    above."""
    row, col = _row_col(d, device, xp=xp)
    return xp.astype(row > col, dtype) + 0.5 * xp.astype(row == col, dtype)


def cholesky_p(L: Array, L_bar: Array, *, xp: Any) -> Array:
    r""":math:`P = \Phi(L^\top \bar L)` of :func:`cholesky_vjp` (lower triangle, diagonal
    halved): :math:`\bar\Sigma = \operatorname{sym}(L^{-\top} P L^{-1})`. Callers that
    multiply :math:`\bar\Sigma` by :math:`L` or by a known basis on both sides can skip its
    two solves (:func:`~tr_projections.projections.kl.kl_vjp`)."""
    X = matmul(mT(L, xp=xp), L_bar, xp=xp)
    return X * _phi_mask(L.shape[-1], X.dtype, _compat.device(X), xp=xp)


def cholesky_vjp(L: Array, L_bar: Array, *, xp: Any) -> Array:
    r"""VJP of :math:`L = \operatorname{chol}(\Sigma)`, symmetric :math:`\bar\Sigma`.

    :math:`P = \Phi(L^\top \bar L)` (lower triangle, diagonal halved) and
    :math:`\bar\Sigma = \operatorname{sym}(L^{-\top} P L^{-1})` (I. Murray, *Differentiation of
    the Cholesky decomposition*, 2016), with two triangular solves and no inverse. ``L_bar``
    must be lower triangular (every caller passes the lower triangle of its cotangent);
    :math:`\Phi` is one product with a constant ``(d, d)`` mask, and each batch-sized
    temporary is dropped once used (they set the peak memory of a backward).
    """
    P = cholesky_p(L, L_bar, xp=xp)
    Y = solve_lower_t(L, P, xp=xp)  # L^-T P
    del P
    Z = mT(solve_lower_t(L, mT(Y, xp=xp), xp=xp), xp=xp)  # (L^-T P) L^-1
    del Y
    return sym(Z, xp=xp)


def sqrtm_vjp(U: Array, s: Array, root_bar: Array, *, xp: Any) -> Array:
    r"""VJP of the symmetric square root :math:`S = \Sigma^{1/2} = U \operatorname{diag}(s) U^\top`.

    In the eigenbasis :math:`S^2 = \Sigma` gives :math:`(s_i + s_j)\, dS_{ij} = d\Sigma_{ij}`, so
    :math:`\bar\Sigma = U [(U^\top \bar S U)_{ij} / (s_i + s_j)] U^\top`. The denominators are
    sums of positive roots: stable for repeated eigenvalues. ``root_bar`` must be symmetric.
    """
    Ut = mT(U, xp=xp)
    inner = matmul(matmul(Ut, root_bar, xp=xp), U, xp=xp)
    inner = inner / (s[..., :, None] + s[..., None, :])
    return sym(matmul(matmul(U, inner, xp=xp), Ut, xp=xp), xp=xp)


def w2_slopes(
    delta: Array, root: Array | None, R: Array | None, *, old: bool, xp: Any
) -> tuple[Array, Array | None]:
    r""":math:`\partial d/\partial S` and :math:`\partial d/\partial S_o` (``None`` without
    ``old``) of the W2 covariance part of full scales, :math:`\Delta = S - S_o`: for
    :math:`d = \|R\Delta\|_F^2` with :math:`R = S_o^{-1}` (``R``), :math:`E = R\Delta`,
    :math:`2\operatorname{sym}(RE)` and :math:`-2\operatorname{sym}(RESR)`; for
    :math:`d = \|\Delta\|_F^2` (``R`` is ``None``), :math:`\pm 2\Delta`. ``root`` (:math:`S`)
    is read only for the old policy's slope."""
    if R is None:
        return 2.0 * delta, (-2.0 * delta if old else None)
    RE = matmul(R, matmul(R, delta, xp=xp), xp=xp)
    d_old = -2.0 * sym(matmul(matmul(RE, root, xp=xp), R, xp=xp), xp=xp) if old else None
    return 2.0 * sym(RE, xp=xp), d_old


def square_vjp(root: Array, sq_bar: Array, *, xp: Any) -> Array:
    r"""VJP of :math:`\Sigma = S^2` for symmetric :math:`S`, :math:`\bar\Sigma`:
    :math:`\bar S = \bar\Sigma S + S \bar\Sigma` (symmetric)."""
    return sym(2.0 * matmul(sq_bar, root, xp=xp), xp=xp)


def expand(x: Array, event_ndim: int, *, xp: Any) -> Array:
    """``x`` of batch shape with ``event_ndim`` trailing unit axes, to scale event arrays."""
    return xp.reshape(x, tuple(x.shape) + (1,) * event_ndim)


__all__ = [
    "cholesky_p",
    "cholesky_vjp",
    "expand",
    "gram_vjp",
    "solve_lower",
    "solve_lower_t",
    "sqrtm_vjp",
    "square_vjp",
    "tril",
    "w2_slopes",
]
