r"""Entropy control: rescale the scale so the entropy does not fall below a bound.

:math:`H(\pi) = \tfrac12(d\log(2\pi e) + \log|\Sigma|)`. Multiplying the scale by
:math:`\alpha = \exp((\beta - H)/d)` adds :math:`\beta - H` to the entropy, so the rescaled
Gaussian has :math:`H = \beta` exactly. The inequality projection rescales only where
:math:`H < \beta`; the equality projection always does.
"""

from __future__ import annotations

import math
from typing import Any

from .. import _compat
from .._inputs import broadcast_shapes, namespace_of
from ..gaussian import _entropy

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
    xp = namespace_of({"scale": scale})
    if not xp.isdtype(scale.dtype, "real floating"):
        raise TypeError(f"`scale` must have a real floating dtype, got {scale.dtype}")
    if full is None:
        full = scale.ndim >= 2 and scale.shape[-1] == scale.shape[-2]
    event_ndim = 2 if full else 1
    if scale.ndim < event_ndim or scale.shape[-1] == 0:
        raise ValueError(f"`scale` must have shape (..., d) or (..., d, d), got {scale.shape}")
    batch = tuple(scale.shape[:-event_ndim])
    dev = _compat.device(scale)
    if isinstance(min_entropy, (int, float)) and not isinstance(min_entropy, bool):
        if not math.isfinite(min_entropy):
            raise ValueError(f"`min_entropy` must be finite, got {min_entropy!r}")
        beta = xp.asarray(float(min_entropy), dtype=scale.dtype, device=dev)
    else:
        namespace_of({"scale": scale, "min_entropy": min_entropy})
        shape = tuple(min_entropy.shape)
        if broadcast_shapes({"min_entropy": shape, "batch": batch}) != batch:
            raise ValueError(
                f"`min_entropy` of shape {shape} must broadcast to the batch shape {batch}"
            )
        beta = xp.astype(min_entropy, scale.dtype)

    H = _entropy(scale, full=full, xp=xp)
    d = scale.shape[-1]
    gap = beta - H
    shift = gap if equality else xp.where(gap > 0, gap, xp.zeros_like(gap))
    alpha = xp.exp(shift / d)
    alpha = xp.reshape(alpha, tuple(alpha.shape) + (1,) * event_ndim)
    if equality:
        return scale * alpha
    low = xp.reshape(gap > 0, tuple(gap.shape) + (1,) * event_ndim)
    return xp.where(low, scale * alpha, scale)


__all__ = ["project_entropy"]
