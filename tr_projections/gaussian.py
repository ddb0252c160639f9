r"""The ``(mean, scale)`` representation of a batch of Gaussians and the charts built on it.

A Gaussian :math:`\mathcal N(\mu, \Sigma)` is passed as ``(mean, scale)``:

* **diagonal**: ``scale`` holds standard deviations :math:`\sigma`, shape ``(..., d)``;
* **full**: ``scale`` is the lower-triangular Cholesky factor :math:`L` with
  :math:`\Sigma = L L^\top`, shape ``(..., d, d)``.

The kind is read from the shapes (see :func:`is_full`). Every helper here takes the namespace
``xp`` as a required keyword and the kind as ``full``; none of them writes into its inputs.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from . import _compat
from ._compat import matmul, qr_r, row_sum, solve_triangular
from ._rows import choose, put, take

__all__ = ["Gaussian", "entropy", "is_full"]

Array = Any


class Gaussian(NamedTuple):
    """A batch of Gaussians: ``mean`` of shape ``(..., d)`` and ``scale`` of shape ``(..., d)``
    (standard deviations) or ``(..., d, d)`` (lower Cholesky factor)."""

    mean: Array
    scale: Array


def is_full(mean: Array, scale: Array) -> bool:
    """Whether ``scale`` is a Cholesky factor (full covariance) rather than standard deviations.

    ``scale`` is diagonal when it has the same shape as ``mean``; otherwise it is full when its
    last two axes are ``(d, d)`` and diagonal when only its last axis is ``d`` (a diagonal scale
    that broadcasts against the mean, e.g. a state-independent ``(d,)`` std). The one ambiguous
    case, a batch of ``d`` diagonal Gaussians with ``mean`` and ``scale`` of shape ``(d, d)``, is
    read as diagonal; pass a full scale with an explicit batch axis, ``(1, d, d)``, to mean full.
    """
    d = mean.shape[-1]
    if tuple(scale.shape) == tuple(mean.shape):
        return False
    return scale.ndim >= 2 and tuple(scale.shape[-2:]) == (d, d)


# --------------------------------------------------------------------------- matrix helpers


def mT(x: Array, *, xp: Any) -> Array:
    """Transpose of the last two axes."""
    return xp.matrix_transpose(x)


def sym(x: Array, *, xp: Any) -> Array:
    """Symmetric part of a batch of square matrices. The sum is this function's own new array,
    halved with the standard's in-place ``*=`` (in place for NumPy, CuPy and torch; JAX
    rebinds): one batch-sized array at a time instead of two."""
    out = x + mT(x, xp=xp)
    out *= 0.5
    return out


def tril(x: Array, *, xp: Any) -> Array:
    """Lower triangle (diagonal included) of a batch of square matrices.

    A ``where`` with one ``(d, d)`` mask: the same values as ``xp.tril``, which torch runs about
    twice as slowly on a batch of small matrices."""
    if _compat.is_jax(xp):  # an incoming NumPy cotangent: the mask needs x's device
        x = xp.asarray(x)
    dev = _compat.device(x)
    row, col = _row_col(x.shape[-1], dev, xp=xp)
    return xp.where(row >= col, x, xp.zeros((), dtype=x.dtype, device=dev))


def _row_col(d: int, device: Any, *, xp: Any) -> tuple[Array, Array]:
    """Row and column indices of a ``(d, d)`` matrix, as ``(d, 1)`` and ``(1, d)`` aranges: the
    triangle masks are built from them (torch's ``tril`` of a ``(d, d)`` matrix is slow)."""
    i = xp.arange(d, device=device)
    return i[:, None], i[None, :]


def diag_embed(v: Array, *, xp: Any) -> Array:
    """``(..., d)`` to the diagonal matrices ``(..., d, d)``."""
    return v[..., :, None] * xp.eye(v.shape[-1], dtype=v.dtype, device=_device(v))


def diagonal(x: Array, *, xp: Any) -> Array:
    return xp.linalg.diagonal(x)


def frob2(x: Array, *, xp: Any) -> Array:
    """Squared Frobenius norm over the last two axes."""
    return xp.sum(x * x, axis=(-2, -1))


def _device(x: Array) -> Any:
    from ._compat import device

    return device(x)


# --------------------------------------------------------------------------- Gaussian quantities


def covariance(scale: Array, *, full: bool, xp: Any) -> Array:
    r""":math:`\Sigma = L L^\top` (full) or the variances :math:`\sigma^2` (diagonal)."""
    if full:
        return sym(matmul(scale, mT(scale, xp=xp), xp=xp), xp=xp)
    return scale * scale


def whiten(v: Array, scale: Array, *, full: bool, xp: Any) -> Array:
    r""":math:`L^{-1} v` for vectors ``v`` of shape ``(..., d)`` (``v / sigma`` for diagonals)."""
    if full:
        return solve_triangular(scale, v[..., None], lower=True, xp=xp)[..., 0]
    return v / scale


def mahalanobis(diff: Array, scale: Array, *, full: bool, xp: Any) -> Array:
    r"""Squared Mahalanobis length of ``diff``: :math:`\delta^\top \Sigma^{-1} \delta`."""
    z = whiten(diff, scale, full=full, xp=xp)
    return row_sum(z * z, xp=xp)


def log_det(scale: Array, *, full: bool, xp: Any) -> Array:
    r""":math:`\log|\Sigma| = 2 \sum_i \log L_{ii}` (or :math:`2 \sum_i \log \sigma_i`)."""
    diag = diagonal(scale, xp=xp) if full else scale
    return 2.0 * row_sum(xp.log(diag), xp=xp)


def cholesky_of_gram(m: Array, *, xp: Any) -> Array:
    r"""The Cholesky factor :math:`L` of :math:`M^\top M`, from the QR decomposition
    :math:`M = QR` (:math:`L = R^\top`, rows signed so the diagonal is positive), never
    forming :math:`M^\top M`.

    Squaring first would put a relative error of :math:`\kappa(M)^2\varepsilon` into the small
    directions of the covariance; QR is backward stable in :math:`M` itself, so they keep
    :math:`\kappa(M)\varepsilon`. Batches of small matrices on a GPU (and on the CPU with
    ``TRP_FUSED_CPU=on``) take the Householder kernel of :mod:`._small_kernels`, one thread
    per matrix.
    """
    from . import _small_kernels

    if _small_kernels.applies(m, xp=xp):
        L = _small_kernels.gram_cholesky(m, xp=xp)
        if L is not None:
            return L
    R = qr_r(m, xp=xp)
    r = xp.linalg.diagonal(R)[..., :, None]
    sign = xp.where(r < 0.0, -xp.ones_like(r), xp.ones_like(r))
    return mT(R * sign, xp=xp)


def root_from_cholesky(scale: Array, *, xp: Any) -> tuple[Array, Array, Array]:
    r"""Symmetric square root of :math:`\Sigma = L L^\top`: :math:`S = U D U^\top`, returned as
    ``(S, U, s = diag(D))`` so callers can reuse the basis (inverse roots, VJPs).

    Two routes to the same :math:`U` and :math:`s`: the SVD :math:`L = U D V^\top`, whose
    singular values carry a relative error of about
    :math:`\kappa(L)\varepsilon = \sqrt{\kappa(\Sigma)}\varepsilon`, and the ``eigh`` of
    :math:`LL^\top` (two to three times faster), whose small eigenvalues carry
    :math:`\kappa(\Sigma)\varepsilon`. Eager arrays take ``eigh`` and redo with the SVD only the
    rows whose measured :math:`\kappa(\Sigma)\varepsilon` exceeds 1e-12 (:data:`ROUGH`). Float32
    factors in host memory (NumPy arrays, torch CPU tensors) take that float64 route on an exact
    float64 copy, with the SVD where :math:`\kappa(\Sigma)\varepsilon` exceeds 1e-9
    (:data:`ROUGH_FOR_FLOAT32`), and their basis is rounded to float32: in float32 every row
    counts as rough, and the SVD of every row after the ``eigh`` took about twice the time of
    the float64 route (``benchmarks/results/cpu-2core-r18-float32-2026-11-28``), for roots as
    accurate (within four float32 roundings of the exact root of the float32 factor,
    ``tests/test_projections.py``). Other float32 arrays take the SVD for every row, without the
    ``eigh`` first (every float32 row is rough: :math:`\kappa \ge 1`). Under tracing rows
    cannot be chosen: jitted JAX arrays of float64 take ``eigh`` and, only where some row of
    the batch is rough, the SVD for every row (``lax.cond``: under ``jax.vmap`` both run, slower
    than the SVD alone); other traced arrays take the SVD for every row.
    """
    eps = float(xp.finfo(scale.dtype).eps)
    if _compat._is_traced(scale, xp):
        if _compat.is_jax(xp) and eps < 1e-12:
            return _root_jax_traced(scale, eps, xp=xp)
        return _root_svd(scale, xp=xp)
    if eps < 1e-12:
        U, s = _basis(scale, eps, ROUGH, xp=xp)
    elif _compat.on_host(scale, xp):  # (the products of float32 numbers are exact in float64)
        x64 = xp.astype(scale, xp.float64)
        U, s = _basis(x64, float(xp.finfo(xp.float64).eps), ROUGH_FOR_FLOAT32, xp=xp)
        U, s = xp.astype(U, scale.dtype), xp.astype(s, scale.dtype)
    else:
        return _root_svd(scale, xp=xp)  # (kappa * eps >= eps > 1e-12: every row is rough)
    return root_from_eig(U, s, xp=xp), U, s


#: A row of :func:`root_from_cholesky` is rough, and takes the SVD, where the measured
#: :math:`\kappa(\Sigma)\varepsilon` exceeds this (the relative error of ``eigh``'s smallest
#: eigenvalue of :math:`LL^\top`); float32 factors on the host, decomposed in float64 for a
#: float32 result, where it exceeds :data:`ROUGH_FOR_FLOAT32` (below a hundredth of a float32
#: rounding: :math:`\kappa(\Sigma)` above about 4.5e6 instead of 4,500).
ROUGH = 1e-12
ROUGH_FOR_FLOAT32 = 1e-9


def _basis(scale: Array, eps: float, limit: float, *, xp: Any) -> tuple[Array, Array]:
    # The eigenbasis and roots of the eigenvalues of L L^T (eager arrays, machine epsilon
    # eps): eigh, then the SVD on the rows rough beyond `limit` (all of them where most are).
    w, U = _compat.eigh(matmul(scale, mT(scale, xp=xp), xp=xp), xp=xp)  # reads one triangle
    rough = _rough(w, eps, xp=xp, limit=limit)
    s = xp.sqrt(xp.maximum(w, xp.zeros_like(w)))
    rows = choose(rough, xp=xp)
    if rows is None:  # most rows are rough (or there are none): the SVD for all
        U, s, _ = _compat.svd(scale, xp=xp)
        return U, s
    if rows.index.shape[0] > 0:
        U_r, s_r, _ = _compat.svd(take(scale, rows, event_ndim=2, xp=xp), xp=xp)
        U = put(U_r, rows, U, event_ndim=2, xp=xp)
        s = put(s_r, rows, s, event_ndim=1, xp=xp)
    return U, s


def root_from_eig(U: Array, s: Array, *, xp: Any, inverse: bool = False) -> Array:
    r""":math:`U \operatorname{diag}(s) U^\top` (``inverse``: :math:`U \operatorname{diag}(1/s)
    U^\top`), symmetrised: the symmetric root from its eigenbasis, or its inverse. The VJPs
    rebuild roots with it from the residual eigenbases, bit for bit as the forward built them."""
    Us = U / s[..., None, :] if inverse else U * s[..., None, :]
    return sym(matmul(Us, mT(U, xp=xp), xp=xp), xp=xp)


def _rough(w: Array, eps: float, *, xp: Any, limit: float = ROUGH) -> Array:
    # kappa * eps > limit from the ascending eigenvalues w, written without dividing by a
    # possibly non-positive smallest one.
    return ~(w[..., 0] * limit >= w[..., -1] * eps)


def _root_jax_traced(scale: Array, eps: float, *, xp: Any) -> tuple[Array, Array, Array]:
    """:func:`root_from_cholesky` of traced JAX float64 ``scale`` (machine epsilon ``eps``):
    ``eigh`` of every row, then one ``lax.cond`` on the whole batch: where some row is rough,
    the SVD of every row. Within :func:`tr_projections._compat.serial_decompositions` the SVD
    waits for ``eigh`` and what follows waits for the ``cond``."""
    from jax import lax

    w, U = _compat.eigh(matmul(scale, mT(scale, xp=xp), xp=xp), xp=xp)
    rough = _rough(w, eps, xp=xp)

    def by_svd(_: Any) -> tuple[Array, Array, Array]:
        with _compat.serial_decompositions(after=w):  # (its own chain: nothing leaks out)
            return _root_svd(scale, xp=xp)

    def by_eigh(_: Any) -> tuple[Array, Array, Array]:
        s = xp.sqrt(xp.maximum(w, xp.zeros_like(w)))
        return root_from_eig(U, s, xp=xp), U, s

    out = lax.cond(xp.any(rough), by_svd, by_eigh, None)
    box = _compat._serial.get()
    if box is not None:  # (the next decomposition waits for the cond)
        box[0] = out[1]
    return out


def _root_svd(scale: Array, *, xp: Any) -> tuple[Array, Array, Array]:
    U, s, _ = _compat.svd(scale, xp=xp)
    return root_from_eig(U, s, xp=xp), U, s


def entropy(scale: Array, *, full: bool | None = None) -> Array:
    r"""Differential entropy :math:`H = \tfrac12 (d \log(2\pi e) + \log|\Sigma|)`, batch shape.

    ``scale`` alone determines the entropy. By default a square trailing ``(d, d)`` block is read
    as a full Cholesky factor and anything else as standard deviations; pass ``full`` to say which
    (needed for a batch of ``d`` diagonal Gaussians stored as a ``(d, d)`` array).

    Examples
    --------
    >>> import numpy as np, tr_projections as trp
    >>> float(trp.entropy(np.ones(2)))  # standard normal in 2-D: log(2 pi e)
    2.8378770664093453
    """
    from ._inputs import check_scale  # _inputs reads gaussian's kind rule

    xp, full = check_scale(scale, full)
    if _compat.is_jax(xp):  # (values known: one compiled program, which JAX differentiates)
        from .backends import jax as jax_adapter

        out = jax_adapter.distance("entropy", (scale,), {"full": full})
        if out is not None:
            return out
    return _entropy(scale, full=full, xp=xp)


def _entropy(scale: Array, *, full: bool, xp: Any) -> Array:
    d = scale.shape[-1]
    return 0.5 * (d * math.log(2.0 * math.pi * math.e) + log_det(scale, full=full, xp=xp))
