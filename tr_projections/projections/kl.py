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

import math
from typing import Any

from .._compat import while_loop
from .._inputs import Problem
from ..distances import kl_cov_from_eigs, kl_eigs, kl_h, mean_distance
from ..gaussian import Gaussian, mT, sym
from ._core import Weights, project_mean, select

Array = Any

#: Upper bound on the Newton/bisection iterations. Far beyond what any measured case needs
#: (three in the usual regime, about twenty for eps = 100 with eigenvalues spread over e^±18);
#: eager backends stop as soon as every row has converged.
MAX_ITER = 100


def _g_and_slope(tau: Array, a: Array, *, xp: Any) -> tuple[Array, Array]:
    r"""Return :math:`g(\tau)` and :math:`\tau g'(\tau) = \tfrac12\sum_i (x_i/(1+x_i))^2`."""
    x = tau[..., None] * a
    r = x / (1.0 + x)
    return 0.5 * xp.sum(kl_h(x, xp=xp), axis=-1), 0.5 * xp.sum(r * r, axis=-1)


def solve_tau(a: Array, g1: Array, eps: Array, *, xp: Any) -> Array:
    r"""The weight :math:`\tau \in (0, 1]` with :math:`g(\tau) = \epsilon` on rows where
    :math:`g(1) = ` ``g1`` :math:`> \epsilon`, and :math:`\tau = 1` elsewhere.

    Start: the quadratic model :math:`g \approx \tfrac14 \tau^2 S`, :math:`S = \sum a_i^2`.
    Bracket: ``hi = 1``; ``lo = min(1/2, sqrt(eps / S))`` is always feasible because
    :math:`h(x) \le 2x^2` for :math:`|x| \le 1/2`, so :math:`g(\tau) \le \tau^2 S` there. The
    bracket tightens with every evaluation, and a Newton step that leaves it is replaced by the
    geometric midpoint. A row stops once an accepted Newton step changes :math:`\log\tau` by less
    than :math:`\sqrt{\varepsilon_{mach}}` (the next error is then at rounding level).
    """
    active = g1 > eps
    eps = eps + xp.zeros_like(g1)
    # Inactive rows keep tau = 1; give them finite stand-in data so no lane computes log(0).
    a = xp.where(active[..., None], a, xp.ones_like(a))
    S = xp.sum(a * a, axis=-1)
    one = xp.ones_like(S)
    tau0 = xp.minimum(one, 2.0 * xp.sqrt(eps / S))
    lo = xp.minimum(0.5 * one, 0.5 * tau0)
    finfo = xp.finfo(a.dtype)
    tol = math.sqrt(finfo.eps)
    slack = 4.0 * finfo.eps
    log_eps = xp.log(eps)

    def running(state):
        return ~state[3]

    def body(state):
        tau, lo, hi, done = state
        g, slope = _g_and_slope(tau, a, xp=xp)
        below = g <= eps
        lo = xp.where(below, xp.maximum(lo, tau), lo)
        hi = xp.where(below, hi, xp.minimum(hi, tau))
        ds = -(xp.log(g) - log_eps) * (g / slope)
        step = tau * xp.exp(ds)
        ok = (step >= lo * (1.0 - slack)) & (step <= hi * (1.0 + slack))
        new = xp.where(ok, xp.minimum(xp.maximum(step, lo), hi), xp.sqrt(lo * hi))
        tau = xp.where(done, tau, new)
        done = done | (ok & (xp.abs(ds) <= tol))
        return tau, lo, hi, done

    state = (xp.where(active, tau0, one), lo, one, ~active)
    tau = while_loop(running, body, state, max_iter=MAX_ITER, check_every=2, xp=xp)[0]
    return xp.where(active, tau, one)


def kl_forward(p: Problem, eps_mean: Array, eps_cov: Array) -> tuple[Gaussian, Weights]:
    """Project ``p`` onto the KL trust region; returns the projection and its two weights."""
    xp = p.xp
    dist_mean = 0.5 * mean_distance(
        p.mean, p.old_mean, p.old_scale, full=p.full, scale_prec=True, xp=xp
    )
    mean, tau_mean = project_mean(p.mean, p.old_mean, dist_mean, eps_mean, xp=xp)

    a, U = kl_eigs(p.scale, p.old_scale, full=p.full, vectors=True, xp=xp)
    g1 = kl_cov_from_eigs(a, xp=xp)
    tau = solve_tau(a, g1, eps_cov, xp=xp)
    t = 1.0 + tau[..., None] * a  # eigenvalues of L_o^T Lambda~ L_o
    if p.full:
        W = xp.matmul(p.old_scale, U)  # Sigma~ = W diag(1/t) W^T, no inverse formed
        cov = sym(xp.matmul(W / t[..., None, :], mT(W, xp=xp)), xp=xp)
        scale = xp.linalg.cholesky(cov)
    else:
        scale = p.old_scale / xp.sqrt(t)
    scale = select(g1 > eps_cov, scale, p.scale, event_ndim=2 if p.full else 1, xp=xp)
    return Gaussian(mean, scale), Weights(tau_mean, tau)


__all__ = ["kl_forward", "solve_tau"]
