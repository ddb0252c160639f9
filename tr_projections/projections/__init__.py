r"""The public projections: each part of a Gaussian is pulled back towards the old policy.

All functions take ``(mean, scale, old_mean, old_scale)`` arrays of one library, return a
:class:`~tr_projections.Gaussian` of the same library, dtype, device and kind, and leave states
that already satisfy their bounds unchanged. See :mod:`tr_projections.projections._core` for the
interpolation idea they share.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..gaussian import Gaussian
from .entropy import project_entropy

__all__ = [
    "METHODS",
    "project",
    "project_entropy",
    "project_frobenius",
    "project_kl",
    "project_wasserstein",
]

Array = Any


def _run(kind: str, args: tuple, eps_mean: Any, eps_cov: Any, **options: Any) -> Gaussian:
    """Project through the adapter of the arguments' library, so the result is differentiable
    with that library's autodiff (hand-written VJPs; see :mod:`tr_projections.backends`)."""
    from ..backends import apply

    return Gaussian(*apply(kind, args, (eps_mean, eps_cov), options))


def project_kl(
    mean: Array, scale: Array, old_mean: Array, old_scale: Array, *, eps_mean: Any, eps_cov: Any
) -> Gaussian:
    r"""Project Gaussians onto the KL trust region around the old policy, exactly.

    Solves, per state and independently for the two parts,

    .. math::
        \min_{\tilde\pi} \mathrm{KL}(\tilde\pi \| \pi) \quad \text{s.t.} \quad
        \tfrac12 (\tilde\mu-\mu_o)^\top\Lambda_o(\tilde\mu-\mu_o) \le \epsilon_\mu, \;
        \mathrm{KL}_\Sigma(\tilde\pi\|\pi_o) \le \epsilon_\Sigma .

    The mean is interpolated in closed form; the precision
    :math:`\tilde\Lambda = \tau\Lambda + (1-\tau)\Lambda_o` uses the weight that makes the
    covariance bound active, found by a batched safeguarded Newton solve after one batched
    ``eigh`` (none for diagonal Gaussians).

    Parameters
    ----------
    mean, scale
        The new policy: ``(..., d)`` and ``(..., d)`` stds or ``(..., d, d)`` lower Cholesky.
    old_mean, old_scale
        The old policy, same kind; batch shapes broadcast (a state-independent ``(d,)`` is fine).
    eps_mean, eps_cov
        Bounds: positive floats, or arrays that broadcast to the batch shape (one per state).

    Returns
    -------
    Gaussian
        ``(mean, scale)`` of the projected policy, same kind, library, dtype and device.

    Examples
    --------
    >>> import numpy as np, tr_projections as trp
    >>> out = trp.project_kl(np.ones((4, 2)), np.full((4, 2), 3.0), np.zeros(2), np.ones(2),
    ...                      eps_mean=0.01, eps_cov=0.001)
    >>> m, c = trp.kl(out.mean, out.scale, np.zeros(2), np.ones(2))
    >>> bool(np.allclose(m, 0.01) and np.allclose(c, 0.001))
    True
    """
    return _run("kl", (mean, scale, old_mean, old_scale), eps_mean, eps_cov)


def project_frobenius(
    mean: Array,
    scale: Array,
    old_mean: Array,
    old_scale: Array,
    *,
    eps_mean: Any,
    eps_cov: Any,
    scale_prec: bool = True,
) -> Gaussian:
    r"""Project Gaussians onto the Frobenius trust region around the old policy.

    Mean part: :math:`(\mu-\mu_o)^\top\Lambda_o(\mu-\mu_o) \le \epsilon_\mu` (squared Euclidean
    with ``scale_prec=False``). Covariance part: :math:`\|\Sigma-\Sigma_o\|_F^2 \le
    \epsilon_\Sigma`, never precision-scaled. Both are closed-form interpolations
    (:math:`\mu` and :math:`\Sigma` charts).

    Examples
    --------
    >>> import numpy as np, tr_projections as trp
    >>> out = trp.project_frobenius(np.ones(2), np.full(2, 2.0), np.zeros(2), np.ones(2),
    ...                             eps_mean=0.5, eps_cov=0.5)
    >>> [round(float(v), 12) for v in trp.frobenius(out.mean, out.scale, np.zeros(2), np.ones(2))]
    [0.5, 0.5]
    """
    return _run(
        "frobenius",
        (mean, scale, old_mean, old_scale),
        eps_mean,
        eps_cov,
        scale_prec=scale_prec,
    )


def project_wasserstein(
    mean: Array,
    scale: Array,
    old_mean: Array,
    old_scale: Array,
    *,
    eps_mean: Any,
    eps_cov: Any,
    scale_prec: bool = True,
    root: bool = False,
) -> Gaussian:
    r"""Project Gaussians onto the Wasserstein-2 trust region (commuting approximation).

    Mean part as in :func:`project_frobenius`. Covariance part: the symmetric roots
    :math:`S = \Sigma^{1/2}` are interpolated so that :math:`\|S_o^{-1}(S - S_o)\|_F^2 \le
    \epsilon_\Sigma` (or :math:`\|S - S_o\|_F^2` with ``scale_prec=False``). Diagonal Gaussians
    need elementwise arithmetic only.

    Full scales are lower Cholesky factors by default; their roots take two batched ``eigh``.
    With ``root=True``, ``scale`` and ``old_scale`` are the symmetric roots themselves
    (``(..., d, d)``, symmetric positive definite, used as given; the value checks test
    symmetry up to rounding and refuse anything else), as the W2 policies of Otto et al. are
    parametrised, and the projected ``scale`` is the interpolated root :math:`\tilde S` (the
    input itself on rows inside their bound): no eigendecomposition, only products, one
    Cholesky factorisation of :math:`S_o` and one triangular solve. Cotangents of root scales
    are exact along symmetric perturbations (all that a symmetric parametrisation produces):
    symmetric on projected rows, and on rows inside their bound, whose scale is returned as
    given, the incoming cotangent itself. Diagonal scales are stds, roots already: ``root``
    changes nothing for them.

    Examples
    --------
    >>> import numpy as np, tr_projections as trp
    >>> out = trp.project_wasserstein(np.ones(2), np.full(2, 2.0), np.zeros(2), np.ones(2),
    ...                               eps_mean=0.5, eps_cov=0.5)
    >>> out.scale  # stds pulled halfway back: sqrt(0.5 / 2) = 0.5
    array([1.5, 1.5])
    """
    return _run(
        "wasserstein",
        (mean, scale, old_mean, old_scale),
        eps_mean,
        eps_cov,
        scale_prec=scale_prec,
        root=bool(root),
    )


#: The methods :func:`project` dispatches to.
METHODS: dict[str, Callable[..., Gaussian]] = {
    "kl": project_kl,
    "frobenius": project_frobenius,
    "wasserstein": project_wasserstein,
}


def project(
    mean: Array,
    scale: Array,
    old_mean: Array,
    old_scale: Array,
    *,
    method: str,
    eps_mean: Any,
    eps_cov: Any,
    **options: Any,
) -> Gaussian:
    """Project with the method named by ``method`` (one of :data:`METHODS`).

    ``options`` are passed on (``scale_prec`` for Frobenius and Wasserstein, ``root`` for
    Wasserstein).
    """
    try:
        fn = METHODS[method]
    except (KeyError, TypeError):
        raise ValueError(f"`method` must be one of {sorted(METHODS)}, got {method!r}") from None
    return fn(mean, scale, old_mean, old_scale, eps_mean=eps_mean, eps_cov=eps_cov, **options)
