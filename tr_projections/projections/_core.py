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

from typing import Any, NamedTuple

Array = Any


class Weights(NamedTuple):
    """The interpolation weights of the two parts, batch shape each (diagnostics and VJPs)."""

    mean: Array
    cov: Array


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
    """The mean part of every projection: closed-form interpolation in the chart ``mean``."""
    tau = closed_form_tau(dist, eps, xp=xp)
    out = interpolate(mean, old_mean, tau, event_ndim=1, xp=xp)
    return select(dist > eps, out, mean, event_ndim=1, xp=xp), tau
