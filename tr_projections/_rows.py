"""Work on the rows that need it: gather a subset of a batch, compute on it, put results back.

A projection changes only the states outside their trust region; with eager arrays the costly
stages (decompositions, the KL solve, the VJPs) run on those rows alone. The subset is chosen
from values, so this is for eager arrays only: under tracing (``jax.jit``, ``torch.func``,
``torch.compile``) :func:`choose` returns ``None`` and every stage runs on the whole batch, as
it would with every row selected. Nothing here writes into a caller's array: rows are gathered
with ``take`` and put back into a copy (:func:`tr_projections._compat.put_rows`; the standard
has no scatter, its fallback is ``take`` + ``where``).
"""

from __future__ import annotations

import itertools
import math
import os
from typing import Any, NamedTuple

from array_api_compat import is_jax_array

from . import _compat

Array = Any


class Rows(NamedTuple):
    """The selected rows of a flattened batch: their flat ``index`` (ascending) and the flat
    boolean ``mask`` of the whole batch. Under ``jax.jit`` (:func:`choose_slots`) ``index`` has
    one entry per row of the batch, padded past the end, and ``slots`` holds the static bounds
    ``(0, ..., n)`` of the slots that :func:`on_rows` runs a stage in, each only when some
    selected row reaches it."""

    index: Array
    mask: Array
    slots: tuple[int, ...] | None = None


#: Whether eager arrays run the costly stages on the selected rows alone (the default), or every
#: stage on the whole batch, as under tracing (and the KL solver without gathering its unfinished
#: rows). The selection costs a ``nonzero`` (a host read on a GPU), gathers and puts; on a GPU,
#: where the per-operation cost dominates up to a million states, the whole batch may be the
#: cheaper choice. That is not measured yet: this switch is there to measure it. The environment
#: variable ``TRP_ROW_SELECTION=0`` (or ``false``, ``no``, ``off``) turns it off at import. Off,
#: traced JAX arrays take no slots either (:func:`choose_slots`).
SELECT_ROWS = os.environ.get("TRP_ROW_SELECTION", "1").strip().lower() not in (
    "0",
    "false",
    "no",
    "off",
)

#: Gathering and putting back cost about as much as a few elementwise passes over the selected
#: rows: above this fraction of the batch the whole batch is cheaper.
MAX_FRACTION = 0.75


#: A stage of a few elementwise passes selects rows only in batches of at least this many:
#: below it the ``nonzero`` and its host read cost more than the passes they save (diagonal
#: Frobenius/W2 at 1,000 states: 0.85x with selection, 1.2x at 10,000).
MIN_ROWS_ELEMENTWISE = 8192


def choose(mask: Array, *, xp: Any, elementwise: bool = False) -> Rows | None:
    """The rows where ``mask`` (batch shape) is true, or ``None`` for "every row": under tracing,
    with :data:`SELECT_ROWS` off, when more than :data:`MAX_FRACTION` of the rows are selected
    anyway, and for an
    ``elementwise`` stage in a batch smaller than :data:`MIN_ROWS_ELEMENTWISE`."""
    if not SELECT_ROWS or _compat._is_traced(mask, xp):
        return None
    if elementwise and math.prod(tuple(mask.shape)) < MIN_ROWS_ELEMENTWISE:
        return None
    flat = xp.reshape(mask, (-1,))
    index = xp.nonzero(flat)[0]
    if index.shape[0] > MAX_FRACTION * flat.shape[0]:
        return None
    return Rows(index, flat)


def slot_fractions(raw: str) -> tuple[float, ...]:
    """The slots' ends from the text of ``TRP_JIT_SLOTS``: comma-separated fractions of the
    batch strictly between 0 and 1 (``""``: the default, half; ``0``, ``off``, ``no``,
    ``false``: no slots)."""
    text = raw.strip().lower()
    if text == "":
        return (0.5,)
    if text in ("0", "off", "no", "false"):
        return ()
    try:
        fractions = tuple(float(f) for f in text.split(","))
    except ValueError:
        fractions = ()
    if not fractions or not all(0.0 < f < 1.0 for f in fractions):
        raise ValueError(
            "environment variable TRP_JIT_SLOTS must be 0 (no slots) or comma-separated "
            f"fractions of the batch between 0 and 1, such as 0.25,0.5; got {raw!r}"
        )
    return tuple(sorted(set(fractions)))


#: Under ``jax.jit`` a batch of at least :data:`MIN_ROWS_SLOTS` rows runs a costly stage
#: (:func:`on_rows`) in slots that end at these fractions of the batch and at its end: the
#: selected rows are gathered in order, the first slot always runs and each later one only when
#: the selected rows reach into it (a ``lax.cond``, one more compiled copy of the stage per
#: slot). With half the batch or fewer selected, the decompositions and the KL solve run on
#: half the rows; with more, every slot runs and the stage costs what it costs without slots
#: plus the gathers (``benchmarks/jax_slots.py --quantile 0``, every state outside: 0.85-0.90x
#: of the program without slots from 256 to 10,000 full 6-D states). ``()`` turns slots off
#: (every row, as before). Set at import from
#: ``TRP_JIT_SLOTS`` (:func:`slot_fractions`); a program already traced keeps its slots.
SLOT_FRACTIONS: tuple[float, ...] = slot_fractions(os.environ.get("TRP_JIT_SLOTS", ""))

#: Smaller traced batches run every stage on every row. With about 30 % of the states passing
#: the row test, slots were faster at every size measured (``benchmarks/jax_slots.py``, jitted
#: forward + backward of full 6-D KL projections, 2 CPUs: 1.48-1.68x from 256 states to 4,096,
#: 1.12x and 1.26x at 16 and 64), but each costs
#: one more compiled copy of the stages (1.0-1.6 s there): small batches, often compiled in many
#: shapes (tests, evaluation), keep one copy.
MIN_ROWS_SLOTS = 256


def traced_settings() -> tuple:
    """The settings a traced projection's program depends on (part of the JAX adapter's static
    key: a program traced under other settings is not reused)."""
    return SELECT_ROWS, tuple(SLOT_FRACTIONS), MIN_ROWS_SLOTS


def choose_slots(mask: Array, *, xp: Any) -> Rows | None:
    """:func:`choose` for a costly stage run through :func:`on_rows`: with eager arrays the
    same; traced JAX arrays get the selected rows in slots (:data:`SLOT_FRACTIONS`) in batches
    of at least :data:`MIN_ROWS_SLOTS` rows, else ``None``. (Under ``vmap`` over policies
    whose selected rows differ, each slot's ``cond`` becomes a ``select`` that runs it: every
    slot runs, as every row would without slots.)"""
    if not _compat._is_traced(mask, xp):
        return choose(mask, xp=xp)
    n = math.prod(tuple(mask.shape))
    if not (SELECT_ROWS and SLOT_FRACTIONS and _compat.is_jax(xp)) or n < MIN_ROWS_SLOTS:
        return None
    flat = xp.reshape(mask, (-1,))
    return Rows(_compat.nonzero_padded(flat, xp=xp), flat, _slot_bounds(n))


def _slot_bounds(n: int) -> tuple[int, ...]:
    inner = sorted({min(n, max(1, math.ceil(f * n))) for f in SLOT_FRACTIONS} - {n})
    return (0, *inner, n)


def on_rows(
    rows: Rows | None,
    fn: Any,
    gather: tuple = (),
    row_arrays: tuple = (),
    *,
    xp: Any,
) -> tuple:
    """``fn(*taken, *row_arrays)`` on the selected rows: ``taken`` are the ``(x, event_ndim)``
    pairs of ``gather`` (whole-batch arrays) restricted to ``rows`` (:func:`take`), and
    ``row_arrays`` are already on the rows (one entry per selected row, e.g. a forward's
    residuals). ``fn`` returns a tuple of arrays (or ``None``s) with one entry per row.

    Eager rows (or ``None``): one call. Slotted rows (:func:`choose_slots`): one call per slot,
    each gathering its own rows; every slot after the first runs only when a selected row
    reaches it (:func:`~tr_projections._compat.cond_rows`; otherwise the first slot's first
    row stands in for its rows, which are all padding then), and the slots' outputs are joined
    in order: the same layout as on eager rows, padded to the batch."""
    if rows is None or rows.slots is None:
        taken = tuple(take(x, rows, event_ndim=e, xp=xp) for x, e in gather)
        return tuple(fn(*taken, *row_arrays))

    def slot(lo: int, hi: int) -> tuple:
        part = rows._replace(index=rows.index[lo:hi])
        taken = tuple(take(x, part, event_ndim=e, xp=xp) for x, e in gather)
        return taken + tuple(None if r is None else r[lo:hi] for r in row_arrays)

    bounds = rows.slots
    parts = [tuple(fn(*slot(bounds[0], bounds[1])))]
    count = xp.sum(xp.astype(rows.mask, xp.int32))
    for lo, hi in itertools.pairwise(bounds[1:]):
        parts.append(_compat.cond_rows(count > lo, fn, slot(lo, hi), parts[0], hi - lo, xp=xp))
    return tuple(
        None if ps[0] is None else xp.concat(list(ps), axis=0) for ps in zip(*parts, strict=True)
    )


def narrow(rows: Rows | None, mask: Array, *, xp: Any) -> tuple[Rows | None, Rows | None]:
    """The rows of ``rows`` (every row: ``None``) where ``mask`` is true, for a stage that
    first needed a wider set (the candidates of a cheap test). ``mask`` has one entry per row
    of ``rows`` (the batch shape when ``None``). Returns the narrowed rows of the batch and the
    positions, among ``rows``, that they keep (``None``: all of them, as when more than
    :data:`MAX_FRACTION` stay); :func:`take` with the latter narrows what was computed on
    ``rows``."""
    sub = choose(mask, xp=xp)
    if rows is None or sub is None:
        return (sub if rows is None else rows), sub
    flat = put(sub.mask, rows, xp.zeros_like(rows.mask), event_ndim=0, xp=xp, owned=True)
    return Rows(_compat.take_rows(rows.index, sub.index, xp=xp), flat), sub


def fields(rows: Rows | None) -> tuple[Array | None, Array | None]:
    """``(index, mask)`` for a residual tuple's ``rows`` and ``row_mask`` fields."""
    return (None, None) if rows is None else (rows.index, rows.mask)


def from_fields(index: Array | None, mask: Array | None) -> Rows | None:
    """The inverse of :func:`fields` (slotted rows, the only ones with an index as long as the
    batch, get their slots again)."""
    if index is None:
        return None
    n = mask.shape[0]
    slotted = index.shape[0] == n > 0 and is_jax_array(index)
    return Rows(index, mask, _slot_bounds(n) if slotted else None)


def take(x: Array, rows: Rows | None, *, event_ndim: int, xp: Any) -> Array:
    """``x`` (batch shape + ``event_ndim`` axes) restricted to ``rows``: shape ``(n,) + event``."""
    if rows is None:
        return x
    event = tuple(x.shape[x.ndim - event_ndim :])
    return _compat.take_rows(xp.reshape(x, (-1,) + event), rows.index, xp=xp)


def put(
    sub: Array,
    rows: Rows | None,
    default: Array,
    *,
    event_ndim: int,
    xp: Any,
    owned: bool = False,
) -> Array:
    """``default`` (full batch) with ``rows`` replaced by ``sub`` (one entry per selected row).
    A new array, unless ``owned`` says ``default`` is the caller's own temporary: then it may be
    written and returned (NumPy, CuPy, torch)."""
    if rows is None:
        return sub
    return _scatter(sub, rows, default, event_ndim=event_ndim, xp=xp, add=False, owned=owned)


def _scatter(
    sub: Array, rows: Rows, base: Array, *, event_ndim: int, xp: Any, add: bool, owned: bool
) -> Array:
    # put / add_to on selected rows: through the flattened batch, back to base's shape.
    if rows.index.shape[0] == 0:
        return base if owned else _compat.copy(base, xp=xp)  # new, as on every path
    shape = tuple(base.shape)
    event = shape[len(shape) - event_ndim :]
    flat = xp.reshape(base, (-1,) + event)
    out = _compat.put_rows(flat, rows.index, rows.mask, sub, xp=xp, add=add, owned=owned)
    return xp.reshape(out, shape)


def take_batch(x: Array, rows: Rows | None, batch: tuple[int, ...], *, xp: Any) -> Array:
    """``x`` broadcast to ``batch`` (no event axes, e.g. a bound) and restricted to ``rows``;
    ``x`` itself when every row is used."""
    if rows is None:
        return x
    return take(xp.broadcast_to(x, batch), rows, event_ndim=0, xp=xp)


def put_or_zero(sub: Array, rows: Rows | None, like: Array, *, event_ndim: int, xp: Any) -> Array:
    """:func:`put` into zeros of ``like``'s shape (a cotangent that vanishes off the rows)."""
    if rows is None:
        return sub
    return put(sub, rows, xp.zeros_like(like), event_ndim=event_ndim, xp=xp, owned=True)


def add_to(
    base: Array,
    sub: Array,
    rows: Rows | None,
    *,
    event_ndim: int,
    xp: Any,
    owned: bool = False,
) -> Array:
    """``base`` (full batch) plus ``sub`` on ``rows`` (``base + sub`` when every row is used);
    a new array, unless ``owned`` (as for :func:`put`)."""
    if rows is None:
        return base + sub
    return _scatter(sub, rows, base, event_ndim=event_ndim, xp=xp, add=True, owned=owned)


__all__ = [
    "Rows",
    "add_to",
    "choose",
    "choose_slots",
    "fields",
    "from_fields",
    "narrow",
    "on_rows",
    "put",
    "put_or_zero",
    "slot_fractions",
    "take",
    "take_batch",
    "traced_settings",
]
