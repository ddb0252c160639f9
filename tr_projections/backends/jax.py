"""JAX adapter: one :func:`jax.custom_vjp` that registers the hand-written VJPs.

Python-float bounds and options are static (``nondiff_argnums``); bound arrays are ordinary
arguments whose cotangent is zero (bounds are constants). The forward is traceable (the KL solver
is a ``lax.while_loop``), so ``jit``, ``vmap``, ``grad`` and ``jit(grad)`` all work.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import _compat, _rows
from .._inputs import is_static_bound
from . import _common


def _merge(static_bounds: tuple, bounds: tuple) -> tuple:
    return tuple(s if b is None else b for s, b in zip(static_bounds, bounds, strict=True))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _operation(static: tuple, bounds: tuple, arrays: tuple) -> tuple:
    kind, options, static_bounds, _ = static
    with _compat.serial_decompositions():
        return _common.forward(kind, arrays, _merge(static_bounds, bounds), dict(options))[0]


def _fwd(static: tuple, bounds: tuple, arrays: tuple) -> tuple:
    kind, options, static_bounds, _ = static
    with _compat.serial_decompositions() as last:
        outs, res = _common.forward(kind, arrays, _merge(static_bounds, bounds), dict(options))
    # The backward's decompositions follow the forward's last one (one element of its output
    # carries the dependence): see serial_decompositions.
    after = None if last[0] is None else jnp.ravel(last[0])[:1]
    return outs, (res, bounds, arrays, after)


def _zero(b: Any) -> Any:
    if b is None:
        return None
    if jnp.issubdtype(b.dtype, jnp.inexact):
        return jnp.zeros_like(b)
    return np.zeros(b.shape, dtype=jax.dtypes.float0)  # integer bounds take float0 cotangents


def _bwd(static: tuple, carry: tuple, cots: tuple) -> tuple:
    kind, options, _, _ = static
    res, bounds, arrays, last = carry
    with _compat.serial_decompositions(last):
        grads = _common.backward(kind, arrays, res, cots, dict(options))
    return tuple(_zero(b) for b in bounds), tuple(grads)


_operation.defvjp(_fwd, _bwd)


def apply(kind: str, arrays: tuple, bounds: tuple, options: dict) -> tuple:
    """Outputs of operation ``kind``, differentiable with ``jax.grad`` under ``jit``/``vmap``."""
    names = _common.OPERATIONS[kind].bound_names
    # Numbers are static; anything else must be an array (a TypeError naming the bound, before
    # custom_vjp would reject it in its own words).
    is_static = [is_static_bound(b, name) for b, name in zip(bounds, names, strict=True)]
    static_bounds = tuple(b if s else None for b, s in zip(bounds, is_static, strict=True))
    dynamic = tuple(None if s else b for b, s in zip(bounds, is_static, strict=True))
    # (the row settings too: a trace made under other slots is not reused)
    static = (kind, tuple(sorted(options.items())), static_bounds, _rows.traced_settings())
    return tuple(_operation(static, dynamic, tuple(arrays)))
