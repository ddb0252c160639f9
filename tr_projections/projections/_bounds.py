r"""Cotangents of the bounds: how a projection's output moves with ``eps_mean`` and ``eps_cov``
(and the entropy projection's with ``min_entropy``), for the adapters that differentiate with
respect to bound arrays (torch tensors that require grad, JAX arrays under ``jax.grad``).

Each part of a projection depends on its bound only through its weight :math:`\tau`, and only
on rows where the part is outside its bound (elsewhere :math:`\tau = 1` whatever the bound):

.. math:: \bar\epsilon = \frac{d\tau}{d\epsilon}\,\Big\langle \bar o,
          \frac{\partial o}{\partial\tau} \Big\rangle,

with :math:`\bar o` the cotangent of the part's output :math:`o`. Closed forms
(:math:`\tau = \sqrt{\epsilon / D}`, :math:`D` the part's distance: the mean part of every
method, the Frobenius and W2 covariance parts) have :math:`d\tau/d\epsilon = \tau/(2\epsilon)`;
the KL covariance part solves :math:`g(\tau) = \epsilon`, so :math:`d\tau/d\epsilon =
1/g'(\tau)`. The output's derivative in :math:`\tau` is that of the chart's interpolation
carried to the returned scale: :math:`\partial\tilde L = \tilde L\,\Phi(\tilde L^{-1}
\partial\tilde\Sigma\,\tilde L^{-\top})` for a Cholesky factor (:math:`\Phi`: the lower
triangle, its diagonal halved), with :math:`\partial\tilde\Sigma = \Sigma - \Sigma_o`
(Frobenius), :math:`(S - S_o)\tilde S + \tilde S(S - S_o)` (W2) and
:math:`-\tilde\Sigma(\Lambda - \Lambda_o)\tilde\Sigma` (KL). For KL, with
:math:`W = \tilde L^\top(\Lambda - \Lambda_o)\tilde L` and
:math:`W_o = \tilde L^\top(\tilde\Lambda - \Lambda_o)\tilde L = I - \tilde L^\top\Lambda_o
\tilde L = \tau W`: :math:`\partial\tilde L = -\tilde L\,\Phi(W)` and
:math:`g'(\tau) = \tfrac12\operatorname{tr}(\tilde\Sigma D \tilde\Sigma(\tilde\Lambda -
\Lambda_o)) = \tfrac12\langle W_o, W\rangle`, read from the output without the forward's
residuals. The entropy projection :math:`\tilde L = L e^{(\beta - H)/d}` on the rows it
rescales gives :math:`\bar\beta = \langle\bar g, \tilde L\rangle / d`.

Everything is evaluated from the call's arrays, bounds and outputs (the forward's residuals are
not needed), per state at the batch shape; the adapters sum over the axes a bound array was
broadcast along. Rows exactly on their bound count as inside (their cotangent is zero).
"""

from __future__ import annotations

from typing import Any

from .. import _compat
from .._compat import matmul, row_sum
from .._inputs import prepare
from ..distances import mean_distance, parts, wasserstein_chart
from ..gaussian import _entropy, mT, tril
from ._vjp_core import _phi_mask, solve_lower
from .wasserstein import root_distance, root_times

Array = Any


def _phi(x: Array, *, xp: Any) -> Array:
    # The lower triangle of x with its diagonal halved.
    return x * _phi_mask(x.shape[-1], x.dtype, _compat.device(x), xp=xp)


def _cholesky_slope(L: Array, dsigma: Array, *, xp: Any) -> Array:
    # The derivative of the Cholesky factor L of Sigma along a symmetric dSigma:
    # L Phi(L^-1 dSigma L^-T) (L^-1 (L^-1 dSigma)^T = L^-1 dSigma L^-T, dSigma symmetric).
    Y = solve_lower(L, dsigma, xp=xp)
    return matmul(L, _phi(solve_lower(L, mT(Y, xp=xp), xp=xp), xp=xp), xp=xp)


def _pair(g: Array, x: Array, event_ndim: int, *, xp: Any) -> Array:
    # <g, x> over the event axes.
    s = row_sum(g * x, xp=xp)
    return row_sum(s, xp=xp) if event_ndim == 2 else s


def projection_bound_cotangents(
    method: str,
    arrays: tuple,
    bounds: tuple,
    outs: tuple,
    cots: tuple,
    options: dict,
    *,
    xp: Any,
) -> tuple[Array, Array]:
    """Per-state cotangents ``(eps_mean_bar, eps_cov_bar)`` (batch shape, the inputs' dtype) of
    projection ``method`` of ``arrays`` (checked) with ``bounds`` (numbers or arrays), given
    its outputs ``outs`` and their cotangents ``cots`` (``None``: zero)."""
    root = bool(options.get("root", False))
    p = prepare(*arrays, check_values=False, roots=root)
    dtype, batch, full = p.mean.dtype, p.batch, p.full
    ev = 2 if full else 1

    def as_batch(b: Any) -> Array:  # (a number, or an array of xp)
        b = xp.asarray(b, dtype=dtype) if isinstance(b, float) else xp.astype(b, dtype)
        return xp.broadcast_to(b, batch)

    eps_m, eps_c = as_batch(bounds[0]), as_batch(bounds[1])
    zero = xp.zeros(batch, dtype=dtype)
    g_mean, g_scale = cots
    scale_prec = bool(options.get("scale_prec", True))
    roots = None
    if method == "wasserstein":  # (the roots once, for the distance and the slope)
        mean_part, cov_part, roots = _w2_parts(p, scale_prec=scale_prec, root=root, xp=xp)
    else:
        named = {"kl": {}, "frobenius": {"scale_prec": scale_prec}}[method]
        mean_part, cov_part = parts(method, (p.mean, p.scale, p.old_mean, p.old_scale), named)

    # Mean part: mu~ = mu_o + tau (mu - mu_o), tau = sqrt(eps / D).
    if g_mean is None:
        eps_m_bar = zero
    else:
        act = mean_part > eps_m
        tau = xp.sqrt(eps_m / xp.where(act, mean_part, eps_m))
        t_bar = row_sum(xp.astype(g_mean, dtype) * (p.mean - p.old_mean), xp=xp)
        eps_m_bar = xp.where(act, t_bar * tau / (2.0 * eps_m), zero)

    if g_scale is None:
        return eps_m_bar, zero
    g = xp.astype(xp.broadcast_to(g_scale, tuple(p.scale.shape)), dtype)
    out = xp.astype(xp.broadcast_to(outs[1], tuple(p.scale.shape)), dtype)
    act = cov_part > eps_c
    L, L_o = p.scale, p.old_scale
    if method == "kl":
        if full:
            X = solve_lower(L, out, xp=xp)  # L^-1 L~
            Y = solve_lower(L_o, out, xp=xp)  # L_o^-1 L~
            YtY = matmul(mT(Y, xp=xp), Y, xp=xp)
            W = matmul(mT(X, xp=xp), X, xp=xp) - YtY  # L~^T (Lambda - Lambda_o) L~
            W_o = xp.eye(p.d, dtype=dtype) - YtY  # L~^T (Lambda~ - Lambda_o) L~
            slope = 0.5 * _pair(W_o, W, 2, xp=xp)  # g'(tau)
            d_out = -matmul(out, _phi(W, xp=xp), xp=xp)
            g = tril(g, xp=xp)
        else:
            s2 = out * out
            W = s2 * (1.0 / (L * L) - 1.0 / (L_o * L_o))
            W_o = 1.0 - s2 / (L_o * L_o)
            slope = 0.5 * row_sum(W_o * W, xp=xp)
            d_out = -0.5 * out * W
        t_bar = _pair(g, d_out, ev, xp=xp)
        safe = xp.where(act & (slope > 0), slope, xp.ones_like(slope))
        return eps_m_bar, xp.where(act & (slope > 0), t_bar / safe, zero)

    # Frobenius and W2: tau = sqrt(eps / D).
    tau = xp.sqrt(eps_c / xp.where(act, cov_part, eps_c))
    if not full:
        if method == "frobenius":  # sigma~^2 = tau sigma^2 + (1 - tau) sigma_o^2
            d_out = (L * L - L_o * L_o) / (2.0 * out)
        else:  # W2: sigma~ = tau sigma + (1 - tau) sigma_o
            d_out = L - L_o
    elif method == "wasserstein" and root:  # the output is the root S~ itself
        d_out = L - L_o
    else:
        if method == "frobenius":
            dsigma = matmul(L, mT(L, xp=xp), xp=xp) - matmul(L_o, mT(L_o, xp=xp), xp=xp)
        else:
            S, S_o = roots
            t = tau[..., None, None]
            DS = matmul(S - S_o, t * S + (1.0 - t) * S_o, xp=xp)
            dsigma = DS + mT(DS, xp=xp)
        d_out = _cholesky_slope(out, dsigma, xp=xp)
        g = tril(g, xp=xp)
    t_bar = _pair(g, d_out, ev, xp=xp)
    return eps_m_bar, xp.where(act, t_bar * tau / (2.0 * eps_c), zero)


def _w2_parts(p: Any, *, scale_prec: bool, root: bool, xp: Any) -> tuple:
    """The W2 distance's two parts of ``p`` as the projection computes them, and the full
    Gaussians' symmetric roots ``(S, S_o)`` (``None`` for diagonal ones)."""
    if p.full and root:  # (the scales are the roots)
        c, R, _ = root_distance(p.scale, p.old_scale, scale_prec=scale_prec, xp=xp)
        z = root_times(R, p.mean - p.old_mean, xp=xp)
        return row_sum(z * z, xp=xp), c, (p.scale, p.old_scale)
    c, chart, _ = wasserstein_chart(p.scale, p.old_scale, full=p.full, scale_prec=scale_prec, xp=xp)
    m = mean_distance(p.mean, p.old_mean, p.old_scale, full=p.full, scale_prec=scale_prec, xp=xp)
    return m, c, (chart.root, chart.old_root) if p.full else None


def entropy_bound_cotangent(
    scale: Array, min_entropy: Any, out: Array, g: Array | None, *, full: bool,
    equality: bool, xp: Any,
) -> Array:  # fmt: skip
    """Per-state cotangent of ``min_entropy`` (the scale's batch shape) of the entropy
    projection of ``scale`` with output ``out`` and its cotangent ``g``."""
    ev = 2 if full else 1
    batch = tuple(scale.shape[: scale.ndim - ev])
    dtype = scale.dtype
    if g is None:
        return xp.zeros(batch, dtype=dtype)
    beta = (
        xp.asarray(min_entropy, dtype=dtype)
        if isinstance(min_entropy, float)
        else xp.astype(min_entropy, dtype)
    )
    g = xp.astype(g, dtype)
    if full:
        g = tril(g, xp=xp)
    d = scale.shape[-1]
    b = _pair(g, out, ev, xp=xp) / d
    if equality:
        return b
    low = _entropy(scale, full=full, xp=xp) < xp.broadcast_to(beta, batch)
    return xp.where(low, b, xp.zeros_like(b))


__all__ = ["entropy_bound_cotangent", "projection_bound_cotangents"]
