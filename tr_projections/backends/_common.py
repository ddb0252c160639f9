"""The one forward/backward pair every adapter registers, for every operation.

An *operation* is a projection (``"kl"``, ``"frobenius"``, ``"wasserstein"``), the entropy
projection (``"entropy"``), the trust-region loss (``"trust_region_loss"``) or the W2
covariance part of ``trp.wasserstein`` (``"wasserstein_cov"``). :func:`forward`
checks and broadcasts the raw arguments, runs the operation and returns its outputs with the
residuals of its VJP (a flat NamedTuple of arrays and ``None``); :func:`backward` runs the
hand-written VJP and brings every cotangent back to the shape and dtype of its raw argument
(summing over broadcast axes). Both are plain array-API code: the torch and JAX adapters wrap
exactly these two functions, and :func:`tr_projections.vjp` calls them directly for every other
library.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from .. import _compat
from .._config import checks
from .._inputs import (
    _compat_is_array,
    _is_numpy_scalar_array,
    bound,
    is_static_bound,
    namespace_of,
    prepare,
    unbroadcast,
)
from ..gaussian import is_full
from ..losses import LossResiduals, check_options, loss_fwd, loss_vjp
from ..projections.entropy import EntropyResiduals, entropy_fwd, entropy_vjp
from ..projections.frobenius import FrobeniusResiduals, frobenius_fwd, frobenius_vjp
from ..projections.kl import KLResiduals, kl_fwd, kl_vjp
from ..projections.wasserstein import (
    W2CovResiduals,
    WassersteinResiduals,
    wasserstein_cov_fwd,
    wasserstein_cov_vjp,
    wasserstein_fwd,
    wasserstein_vjp,
)

Array = Any

PROJECTION_ARGS = ("mean", "scale", "old_mean", "old_scale")
LOSS_ARGS = ("mean", "scale", "proj_mean", "proj_scale")


class Operation(NamedTuple):
    """A differentiable operation: names of its array arguments, number of outputs, the type
    of its residuals, its forward and backward on raw (unbroadcast) arguments, and the names
    of its bounds (for error messages)."""

    arg_names: tuple[str, ...]
    n_out: int
    residuals: type
    forward: Callable[[tuple, tuple, dict], tuple[tuple, Any]]
    backward: Callable[[tuple, Any, tuple, dict, tuple], tuple]
    bound_names: tuple[str, ...] = ()


def _cotangent(g: Array | None, like: Array, *, xp: Any) -> Array:
    """An incoming cotangent as an array of ``like``'s shape and dtype (``None`` means zero)."""
    if g is None:
        return xp.zeros_like(like)
    if g.dtype != like.dtype:
        g = xp.astype(g, like.dtype)
    if tuple(g.shape) != tuple(like.shape):
        g = xp.broadcast_to(g, tuple(like.shape))
    return g


def _projection(fwd: Callable, vjp: Callable, residuals: type) -> Operation:
    def forward(arrays: tuple, bounds: tuple, options: dict) -> tuple[tuple, Any]:
        p = prepare(*arrays, roots=bool(options.get("root")))
        eps_mean = bound(bounds[0], "eps_mean", p)
        eps_cov = bound(bounds[1], "eps_cov", p)
        out, res = fwd(p, eps_mean, eps_cov, **options)
        return tuple(out), res

    def backward(arrays: tuple, res: Any, cots: tuple, options: dict, needs: tuple) -> tuple:
        p = prepare(*arrays, check_values=False)  # checked by the forward already
        g_mean = _cotangent(cots[0], p.mean, xp=p.xp)
        g_scale = _cotangent(cots[1], p.scale, xp=p.xp)
        return tuple(vjp(p, res, g_mean, g_scale, old=needs[2] or needs[3], **options))

    return Operation(PROJECTION_ARGS, 2, residuals, forward, backward, ("eps_mean", "eps_cov"))


def _entropy_forward(arrays: tuple, bounds: tuple, options: dict) -> tuple[tuple, Any]:
    out, res = entropy_fwd(arrays[0], bounds[0], **options)
    return (out,), res


def _entropy_backward(arrays: tuple, res: Any, cots: tuple, options: dict, needs: tuple) -> tuple:
    scale = arrays[0]
    g = _cotangent(cots[0], scale, xp=namespace_of({"scale": scale}))
    return (entropy_vjp(scale, res, g, **options),)


def _check_loss_options(options: dict) -> None:
    check_options(
        options.get("method"), bool(options.get("root")), bool(options.get("scale_prec", True))
    )


def _loss_forward(arrays: tuple, bounds: tuple, options: dict) -> tuple[tuple, Any]:
    _check_loss_options(options)  # (before value checks)
    p = prepare(*arrays, names=LOSS_ARGS, roots=bool(options.get("root")))
    out, res = loss_fwd(p, **options)
    return (out,), res


def _loss_backward(arrays: tuple, res: Any, cots: tuple, options: dict, needs: tuple) -> tuple:
    p = prepare(*arrays, check_values=False, names=LOSS_ARGS)
    g = _cotangent(cots[0], p.mean[..., 0], xp=p.xp)
    return loss_vjp(p, res, g, **options)


def _w2_cov_forward(arrays: tuple, bounds: tuple, options: dict) -> tuple[tuple, Any]:
    out, res = wasserstein_cov_fwd(*arrays, **options)
    return (out,), res


def _w2_cov_backward(arrays: tuple, res: Any, cots: tuple, options: dict, needs: tuple) -> tuple:
    xp = namespace_of(dict(zip(W2_COV_ARGS, arrays, strict=True)))
    # (the part's shape, the batch: both scales come broadcast from trp.wasserstein)
    g = _cotangent(cots[0], arrays[0][..., 0, 0], xp=xp)
    return wasserstein_cov_vjp(*arrays, res, g, new=needs[0], old=needs[1], **options)


W2_COV_ARGS = ("scale", "old_scale")

OPERATIONS: dict[str, Operation] = {
    "kl": _projection(kl_fwd, kl_vjp, KLResiduals),
    "frobenius": _projection(frobenius_fwd, frobenius_vjp, FrobeniusResiduals),
    "wasserstein": _projection(wasserstein_fwd, wasserstein_vjp, WassersteinResiduals),
    "entropy": Operation(
        ("scale",), 1, EntropyResiduals, _entropy_forward, _entropy_backward, ("min_entropy",)
    ),
    "trust_region_loss": Operation(LOSS_ARGS, 1, LossResiduals, _loss_forward, _loss_backward),
    # (the covariance part of trp.wasserstein for full Gaussians)
    "wasserstein_cov": Operation(W2_COV_ARGS, 1, W2CovResiduals, _w2_cov_forward, _w2_cov_backward),
}


#: Eager NumPy projections of more than this many rows (the first axis of every array) run in
#: chunks of at most this many rows, forward and backward. A call's temporaries then stay small
#: enough for the C allocator to keep reusing them: with glibc's defaults, the temporaries of a
#: whole batch of 100,000 diagonal 6-D states (about 40 MB) go back to the system after every
#: call and are faulted in again by the next (10,600 page faults, half of a 53 ms KL forward +
#: backward; 33 ms in chunks of 12,500 to 25,000 rows). 0: never.
CHUNK_ROWS = 16384

_CHUNKED = ("kl", "frobenius", "wasserstein")


def _spans(n: int, n_chunks: int | None = None, rows: int | None = None) -> list[tuple[int, int]]:
    # n rows in equal chunks of at most `rows` (CHUNK_ROWS) rows, or in n_chunks equal chunks.
    k = n_chunks if n_chunks is not None else -(-n // (rows or CHUNK_ROWS))
    size = -(-n // k)
    return [(i, min(i + size, n)) for i in range(0, n, size)]


#: Eager CPU projections (NumPy arrays, and torch's CPU tensors where the torch adapter asks)
#: whose scale holds at least this many numbers (about 14,600 full or 87,000 diagonal 6-D
#: states) run in chunks on several threads at once (:func:`lanes`), forward and backward: the
#: elementwise work of NumPy, and the decompositions of both, then use every thread. A chunk is
#: an even share of the rows per thread, at least the rows that hold this many numbers, and at
#: most the torch adapter's chunk length or, for NumPy, ``CHUNK_ROWS`` or that least length,
#: whichever is more: shorter chunks of NumPy's many short operations contend for the GIL
#: (diagonal KL, 100,000 states on 2 threads, forward + backward: chunks of 4,096 rows took 1.28x
#: the time in turn; the chunks of 50,000 rows this gives, 0.73x). (All chunks of a call have
#: the same length, so one may hold down to half as many.) Each thread takes the next chunk not
#: yet taken. The results are those of the same chunks in turn, bit for bit. Measured:
#: ``benchmarks/lanes.py``, ``docs/benchmarks.md``. 0: never.
PARALLEL_MIN_NUMBERS = 1 << 19


def lanes(kind: str, arrays: tuple) -> int:
    """How many chunks of a call of operation ``kind`` on eager CPU ``arrays`` run at the same
    time (1: one after another): the threads of :func:`tr_projections._compat.split_threads`,
    for projections whose scale holds at least :data:`PARALLEL_MIN_NUMBERS` numbers."""
    if kind not in _CHUNKED or not PARALLEL_MIN_NUMBERS:
        return 1
    scale = arrays[1]
    if math.prod(tuple(scale.shape)) < PARALLEL_MIN_NUMBERS:
        return 1
    return _compat.split_threads(_compat.array_namespace(scale), scale)


def _plan(
    kind: str, arrays: tuple, bounds: tuple, rows: int | None = None
) -> tuple[list[tuple[int, int]], int] | None:
    """The spans of rows a call runs in and how many run at once, or ``None`` (one call on the
    whole batch): a projection of arrays that share their first (batch) axis, with bounds that
    are numbers, 0-d arrays or arrays of the batch's shape, longer than its chunk. Without
    ``rows``: eager NumPy arrays, in chunks of :data:`CHUNK_ROWS`; with ``rows``, the caller
    vouches for its arrays being eager (the torch adapter's CPU kernels) and ``rows`` is a
    bound; 0: never. With more than one lane (:func:`lanes`) a shorter batch is split too, and
    NumPy's chunks may be longer (see :data:`PARALLEL_MIN_NUMBERS`)."""
    given = rows is not None
    if rows is None:
        rows = CHUNK_ROWS
        if not all(isinstance(x, np.ndarray) for x in arrays):
            return None
    if kind not in _CHUNKED or not rows:
        return None
    mean, scale, old_mean, old_scale = arrays
    n = mean.shape[0] if mean.ndim >= 2 else 0
    if n < 2 or mean.ndim != old_mean.ndim or scale.ndim != old_scale.ndim:
        return None
    if scale.ndim != mean.ndim + is_full(mean, scale) or any(x.shape[0] != n for x in arrays):
        return None  # (so that axis 0 is the batch's first axis in every array)
    batch_ndim = mean.ndim - 1
    for b in bounds:
        if isinstance(b, (int, float)):
            continue
        ndim = getattr(b, "ndim", None)
        if ndim is None:
            return None
        if ndim > 0 and (ndim != batch_ndim or b.shape[0] != n):
            return None
    k = lanes(kind, arrays)
    if k > 1:
        # An even share per lane, not shorter than `least`; at most the caller's `rows` (the
        # torch adapter's memory bound), or NumPy's CHUNK_ROWS unless `least` is longer.
        least = -(-PARALLEL_MIN_NUMBERS // math.prod(tuple(scale.shape[1:])))
        rows = min(max(-(-n // k), least), rows if given else max(rows, least))
    if n <= rows:
        return None
    spans = _spans(n, rows=rows)
    return spans, min(k, len(spans))


def _rows(xs: tuple, start: int, stop: int) -> tuple:
    # Rows start:stop of the arrays (first axis; NumPy's, or torch's when a chunked forward's
    # backward runs on torch kernels); numbers, 0-d arrays and None pass through.
    return tuple(x[start:stop] if getattr(x, "ndim", 0) > 0 else x for x in xs)


def _on_spans(fn: Callable, spans: list, n_lanes: int) -> list:
    """``fn(i, start, stop)`` for each span ``i``; with ``n_lanes`` > 1 on that many threads at
    once (:func:`tr_projections._compat.in_lanes`), each lane taking the next span not yet
    taken until none is left (chunks of uneven cost keep every lane busy). The results in the
    spans' order; if any failed, the error of the first that failed, in the spans' order, once
    every lane has stopped (a lane stops taking spans once any has failed)."""
    if n_lanes < 2:
        return [fn(i, a, b) for i, (a, b) in enumerate(spans)]
    results: list = [None] * len(spans)
    errors: dict[int, Exception] = {}
    lock = threading.Lock()
    taken = [0]

    def lane() -> None:
        try:
            while True:
                with lock:
                    i = taken[0]
                    if errors or i >= len(spans):
                        return
                    taken[0] = i + 1
                try:
                    results[i] = fn(i, *spans[i])
                except Exception as e:
                    with lock:
                        errors[i] = e
                    return
        except BaseException:  # (an interrupt: no more spans, here or elsewhere)
            taken[0] = len(spans)
            raise

    _compat.in_lanes([lane] * n_lanes)
    if errors:
        first = errors[min(errors)]
        results.clear()  # (the error's traceback keeps the lanes' frames: not the results)
        errors.clear()
        raise first
    return results


def check(kind: str, arrays: tuple, bounds: tuple, options: dict) -> tuple[Any, tuple]:
    """The checks :func:`forward` makes of a projection's or the loss's arguments (shapes,
    dtypes, values, bounds, options), alone, with the same errors (the entropy projection's are
    made before it is applied: none here). Returns the inputs' dtype
    and the bounds checked: numbers as Python floats, arrays as arrays of the inputs' dtype.
    For the chunked forward (the whole call's checks, before its chunks) and callers that check
    concrete arrays before running :func:`forward` where their values cannot be read (the JAX
    adapter's compiled route)."""
    if kind == "trust_region_loss":
        _check_loss_options(options)
        p = prepare(*arrays, names=LOSS_ARGS, roots=bool(options.get("root")))
        return p.dtype, ()
    if kind == "entropy":  # (checked before it is applied: projections.entropy.entropy_inputs)
        return arrays[0].dtype, tuple(bounds)
    if kind not in ("kl", "frobenius", "wasserstein"):
        raise ValueError(f"no separate checks for operation {kind!r}")
    p = prepare(*arrays, roots=bool(options.get("root")))
    names = OPERATIONS[kind].bound_names
    return p.dtype, tuple(
        bound(b, name, p, as_number=True) for b, name in zip(bounds, names, strict=True)
    )


def forward(
    kind: str, arrays: tuple, bounds: tuple, options: dict, *, chunk_rows: int | None = None
) -> tuple[tuple, Any]:
    """Outputs and residuals of operation ``kind`` on the raw ``arrays``. Large eager NumPy
    projections run in chunks of rows (:data:`CHUNK_ROWS`), and so do other eager arrays where
    the caller gives ``chunk_rows``, on several threads at once where they are large enough
    (:data:`PARALLEL_MIN_NUMBERS`): their residuals are then a list, one residual tuple per
    chunk, which :func:`backward` takes as it is."""
    op = OPERATIONS[kind]
    plan = _plan(kind, arrays, bounds, chunk_rows)
    if plan is None:
        return op.forward(arrays, bounds, options)
    spans, n_lanes = plan
    # The whole call's checks first (messages name the caller's indices), then the chunks.
    check(kind, arrays, bounds, options)
    xp = namespace_of(dict(zip(op.arg_names, arrays, strict=True)))
    joined = _compat.Joined(arrays[0].shape[0], xp=xp)  # (each chunk writes its own rows)

    def chunk(_: int, a: int, b: int) -> Any:
        outs, res = op.forward(_rows(arrays, a, b), _rows(bounds, a, b), options)
        joined.put(a, b, tuple(outs))
        return res

    with checks(False):
        res = _on_spans(chunk, spans, n_lanes)
    return joined.result(), res


def backward(
    kind: str, arrays: tuple, res: Any, cots: tuple, options: dict, needs: tuple | None = None
) -> tuple:
    """Cotangents of the raw ``arrays`` (their shapes and dtypes) of operation ``kind``.

    ``cots`` holds one cotangent per output (``None`` for zero). ``needs`` (one flag per array,
    default all) says which cotangents are wanted: the others come back as ``None``, and a
    projection skips the old policy's part of its VJP when neither of the old arrays is wanted
    (the usual case in training, where the old policy is a constant). The one place where
    cotangents are summed over broadcast axes and cast back, for every adapter.
    """
    op = OPERATIONS[kind]
    needs = (True,) * len(arrays) if needs is None else tuple(bool(n) for n in needs)
    xp = namespace_of(dict(zip(op.arg_names, arrays, strict=True)))
    if not isinstance(res, list):
        return _backward(op, arrays, res, tuple(cots), options, needs, xp)
    # A chunked forward: the same chunks, backward. The outputs had the shapes of mean and
    # scale; a cotangent of fewer axes (or one row) broadcasts, and goes to every chunk whole.
    n = arrays[0].shape[0]
    spans = _spans(n, len(res))
    aligned = tuple(
        c is not None and c.ndim == x.ndim and c.shape[0] == n
        for c, x in zip(cots, arrays[:2], strict=True)
    )

    joined = _compat.Joined(n, xp=xp)  # (each chunk writes its own rows)

    def part(i: int, a: int, b: int) -> None:
        rows = tuple(c[a:b] if al else c for c, al in zip(cots, aligned, strict=True))
        joined.put(a, b, _backward(op, _rows(arrays, a, b), res[i], rows, options, needs, xp))

    _on_spans(part, spans, min(lanes(kind, arrays), len(spans)))
    return joined.result()


def _backward(
    op: Operation, arrays: tuple, res: Any, cots: tuple, options: dict, needs: tuple, xp: Any
) -> tuple:
    grads = op.backward(arrays, res, cots, options, needs)
    return tuple(
        unbroadcast(g, x, xp=xp) if need else None
        for g, x, need in zip(grads, arrays, needs, strict=True)
    )


def bound_cotangents(
    kind: str, arrays: tuple, bounds: tuple, outs: tuple, cots: tuple, options: dict,
    needs: tuple,
) -> tuple:  # fmt: skip
    """Cotangents of the bounds of operation ``kind`` (``eps_mean``, ``eps_cov``; the entropy
    projection's ``min_entropy``) from its raw ``arrays``, ``bounds``, outputs ``outs`` and
    their cotangents ``cots`` (``None``: zero): for each bound with its flag in ``needs``, an
    array of the bound's shape and dtype (summed over the axes it was broadcast along), else
    ``None``; numbers get ``None`` (:mod:`tr_projections.projections._bounds`)."""
    from ..projections._bounds import entropy_bound_cotangent, projection_bound_cotangents

    op = OPERATIONS[kind]
    xp = namespace_of(dict(zip(op.arg_names, arrays, strict=True)))
    # (numbers, NumPy numbers beside another library's arrays and integer arrays: none)
    number = [
        is_static_bound(b, name) or _is_numpy_scalar_array(b, xp)
        for b, name in zip(bounds, op.bound_names, strict=True)
    ]
    wanted = [
        bool(n) and not k and _float_array_of(b, xp)
        for b, n, k in zip(bounds, needs, number, strict=True)
    ]
    if not any(wanted):
        return (None,) * len(bounds)
    bounds = tuple(float(b) if k else b for b, k in zip(bounds, number, strict=True))
    if kind == "entropy":
        per_state: tuple = (
            entropy_bound_cotangent(
                arrays[0], bounds[0], outs[0], cots[0], full=bool(options["full"]),
                equality=bool(options.get("equality", False)), xp=xp,
            ),
        )  # fmt: skip
    elif kind in ("kl", "frobenius", "wasserstein"):
        per_state = projection_bound_cotangents(kind, arrays, bounds, outs, cots, options, xp=xp)
    else:
        raise ValueError(f"operation {kind!r} has no bounds")
    return tuple(
        unbroadcast(c, b, xp=xp) if w else None
        for c, b, w in zip(per_state, bounds, wanted, strict=True)
    )


def _float_array_of(b: Any, xp: Any) -> bool:
    # A floating-point array of the call's library (tracers included): a bound to differentiate.
    if not _compat_is_array(b):
        return False
    try:
        return _compat.array_namespace(b) is xp and xp.isdtype(b.dtype, "real floating")
    except TypeError:
        return False
