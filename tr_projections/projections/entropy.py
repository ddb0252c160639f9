r"""Entropy control: rescale the scale so the entropy does not fall below a bound.

:math:`H(\pi) = \tfrac12(d\log(2\pi e) + \log|\Sigma|)`. Multiplying the scale by
:math:`\alpha = \exp((\beta - H)/d)` adds :math:`\beta - H` to the entropy, so the rescaled
Gaussian has :math:`H = \beta` exactly. The inequality projection rescales only where
:math:`H < \beta`; the equality projection always does.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

from .. import _compat
from .._config import checks_to_run
from .._inputs import _is_numpy_scalar_array, broadcast_shapes, check_scale, namespace_of
from .._values import describe
from ..gaussian import _entropy, diag_embed, diagonal

Array = Any


def project_entropy(
    scale: Array, min_entropy: Any, *, full: bool | None = None, equality: bool = False
) -> Array:
    r"""Project a batch of scales onto :math:`\{H(\pi) \ge \beta\}` (or :math:`H = \beta`).

    Parameters
    ----------
    scale
        Standard deviations ``(..., d)`` or lower Cholesky factors ``(..., d, d)``.
    min_entropy
        :math:`\beta`, a float or an array that broadcasts to the batch shape.
    full
        Whether ``scale`` is a Cholesky factor; by default a square trailing block means full.
    equality
        Rescale every state to entropy exactly :math:`\beta` instead of only those below it.

    Returns
    -------
    The rescaled scale, same shape, library, dtype and device. States whose entropy is already
    at least :math:`\beta` are returned unchanged (inequality form).

    Examples
    --------
    >>> import numpy as np, tr_projections as trp
    >>> s = trp.project_entropy(np.full((3, 2), 0.1), 0.0)
    >>> np.allclose(trp.entropy(s), 0.0)
    True
    """
    _, full, beta = entropy_inputs(scale, min_entropy, full)
    from ..backends import apply

    return apply("entropy", (scale,), (beta,), {"full": full, "equality": bool(equality)})[0]


def entropy_inputs(scale: Array, min_entropy: Any, full: bool | None) -> tuple[Any, bool, Any]:
    """Check the arguments of :func:`project_entropy`; return ``(xp, full, beta)``, with
    ``beta`` a Python float or an array of the same library as ``scale``."""
    xp, full = check_scale(scale, full)
    event_ndim = 2 if full else 1
    batch = tuple(scale.shape[:-event_ndim])
    if isinstance(min_entropy, bool) or min_entropy is None or isinstance(min_entropy, str):
        raise TypeError(
            f"`min_entropy` must be a real number or an array of `scale`'s library, "
            f"got {min_entropy!r}"
        )
    if isinstance(min_entropy, numbers.Real) or _is_numpy_scalar_array(min_entropy, xp):
        # (Python and NumPy numbers, as the projections' bounds take them)
        value = float(min_entropy)
        if not math.isfinite(value):
            raise ValueError(f"`min_entropy` must be finite, got {min_entropy!r}")
        return xp, bool(full), value
    if isinstance(min_entropy, numbers.Number):
        raise TypeError(f"`min_entropy` must be a real number, got {min_entropy!r}")
    namespace_of({"scale": scale, "min_entropy": min_entropy})
    shape = tuple(min_entropy.shape)
    if broadcast_shapes({"min_entropy": shape, "scale's batch": batch}) != batch:
        raise ValueError(
            f"`min_entropy` of shape {shape} must broadcast to the batch shape {batch}"
        )
    if not xp.isdtype(min_entropy.dtype, ("real floating", "integral")):
        raise TypeError(f"`min_entropy` must have a real dtype, got {min_entropy.dtype}")
    values = _compat.readable(min_entropy, xp=xp)  # (eager jax.grad, torch.func: the values)
    if (
        checks_to_run()
        and math.prod(shape) > 0
        and not _compat._is_traced(values, xp)
        and not bool(xp.all(xp.isfinite(values)))
    ):
        ok = xp.isfinite(values)
        detail = describe(values, ok, xp=xp) if values.ndim else repr(values)
        raise ValueError(f"`min_entropy` must be finite everywhere; {detail}")
    return xp, bool(full), min_entropy


class EntropyResiduals(NamedTuple):
    """What :func:`entropy_vjp` needs: the factor applied and where it was applied."""

    alpha: Array
    active: Array


def entropy_fwd(
    scale: Array, min_entropy: Any, *, full: bool, equality: bool = False
) -> tuple[Array, EntropyResiduals]:
    """The entropy projection of ``scale`` (checked by :func:`entropy_inputs`) and residuals."""
    xp = namespace_of({"scale": scale})
    dev = _compat.device(scale)
    if isinstance(min_entropy, float):
        beta = xp.asarray(min_entropy, dtype=scale.dtype, device=dev)
    else:
        beta = xp.astype(min_entropy, scale.dtype)
    event_ndim = 2 if full else 1

    H = _entropy(scale, full=full, xp=xp)
    d = scale.shape[-1]
    gap = beta - H
    shift = gap if equality else xp.where(gap > 0, gap, xp.zeros_like(gap))
    alpha = xp.exp(shift / d)
    active = xp.ones_like(gap, dtype=xp.bool) if equality else gap > 0
    alpha_e = xp.reshape(alpha, tuple(alpha.shape) + (1,) * event_ndim)
    if equality:
        return scale * alpha_e, EntropyResiduals(alpha, active)
    low = xp.reshape(gap > 0, tuple(gap.shape) + (1,) * event_ndim)
    return xp.where(low, scale * alpha_e, scale), EntropyResiduals(alpha, active)


def entropy_vjp(
    scale: Array, res: EntropyResiduals, g: Array, *, full: bool, equality: bool = False
) -> Array:
    r"""Cotangent of ``scale`` of :func:`entropy_fwd` (the bound is a constant).

    Rescaled rows: :math:`\tilde L = \alpha L` with :math:`\alpha = e^{(\beta - H)/d}` and
    :math:`\partial H/\partial L_{ii} = 1/L_{ii}`, so
    :math:`\bar L = \alpha\bar g - \tfrac{\alpha}{d}\langle\bar g, L\rangle
    \operatorname{diag}(1/L_{ii})`. Other rows pass :math:`\bar g` through.
    """
    xp = namespace_of({"scale": scale})
    event_ndim = 2 if full else 1
    d = scale.shape[-1]
    if full:
        g = xp.tril(g)
        axes: tuple[int, ...] = (-2, -1)
        dH = diag_embed(1.0 / diagonal(scale, xp=xp), xp=xp)
    else:
        axes = (-1,)
        dH = 1.0 / scale
    alpha = res.alpha
    H_bar = -(alpha / d) * xp.sum(g * scale, axis=axes)
    expand = (1,) * event_ndim
    out = xp.reshape(alpha, tuple(alpha.shape) + expand) * g
    out = out + xp.reshape(H_bar, tuple(H_bar.shape) + expand) * dH
    if equality:
        return out
    return xp.where(xp.reshape(res.active, tuple(res.active.shape) + expand), out, g)


__all__ = ["EntropyResiduals", "entropy_fwd", "entropy_inputs", "entropy_vjp", "project_entropy"]
