"""Work on the rows that need it: gather a subset of a batch, compute on it, put results back.

A projection changes only the states outside their trust region; with eager arrays the costly
stages (decompositions, the KL solve, the VJPs) run on those rows alone. The subset is chosen
from values, so this is for eager arrays only: under tracing (``jax.jit``, ``torch.func``,
``torch.compile``) :func:`choose` returns ``None`` and every stage runs on the whole batch, as
it would with every row selected. Nothing here writes into an array: rows are gathered with
``take`` and put back with ``take`` + ``where`` (the standard has no scatter).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from . import _compat

Array = Any


class Rows(NamedTuple):
    """The selected rows of a flattened batch: their flat ``index`` (ascending) and the flat
    boolean ``mask`` of the whole batch."""

    index: Array
    mask: Array


def choose(mask: Array, *, xp: Any) -> Rows | None:
    """The rows where ``mask`` (batch shape) is true, or ``None`` for "every row": under tracing,
    and when every row is selected anyway."""
    if _compat._is_traced(mask, xp):
        return None
    flat = xp.reshape(mask, (-1,))
    n_all = flat.shape[0]
    index = xp.nonzero(flat)[0]
    if index.shape[0] == n_all:
        return None
    return Rows(index, flat)


def take(x: Array, rows: Rows | None, *, event_ndim: int, xp: Any) -> Array:
    """``x`` (batch shape + ``event_ndim`` axes) restricted to ``rows``: shape ``(n,) + event``."""
    if rows is None:
        return x
    event = tuple(x.shape[x.ndim - event_ndim :])
    return xp.take(xp.reshape(x, (-1,) + event), rows.index, axis=0)


def put(sub: Array, rows: Rows | None, default: Array, *, event_ndim: int, xp: Any) -> Array:
    """``default`` (full batch) with ``rows`` replaced by ``sub`` (one entry per selected row)."""
    if rows is None:
        return sub
    if rows.index.shape[0] == 0:
        return xp.asarray(default, copy=True)  # a new array, as on every other path
    shape = tuple(default.shape)
    event = shape[len(shape) - event_ndim :]
    flat_default = xp.reshape(default, (-1,) + event)
    # Position of each row in ``sub``: the running count of selected rows, minus one.
    pos = xp.cumulative_sum(xp.astype(rows.mask, xp.int64)) - 1
    pos = xp.maximum(pos, xp.zeros_like(pos))
    gathered = xp.take(sub, pos, axis=0)
    m = xp.reshape(rows.mask, (-1,) + (1,) * len(event))
    return xp.reshape(xp.where(m, gathered, flat_default), shape)


def n_rows(x: Array, *, event_ndim: int) -> int:
    return math.prod(tuple(x.shape[: x.ndim - event_ndim]))


__all__ = ["Rows", "choose", "n_rows", "put", "take"]
