"""PyTorch adapter: one :class:`torch.autograd.Function` that registers the hand-written VJPs.

``forward`` and ``setup_context`` are separate and the residuals are returned as (non
differentiable) outputs and saved with ``save_for_backward``, which is what ``torch.func``
requires; ``generate_vmap_rule`` lets ``torch.func.vmap`` batch forward and backward. Under
``torch.func`` transforms the KL solver cannot read its convergence mask and runs its fixed
iteration cap; under ``torch.compile`` its loop is a ``torch.while_loop`` with the same early
exit (see :func:`tr_projections._compat.while_loop`). Gradients are first order: where a graph is
recorded through ``backward`` (``create_graph=True``, an outer ``torch.func`` transform), its
cotangents come out of a node whose backward raises (:class:`_SecondOrder`), so differentiating
them again raises instead of silently missing terms. Only the
cotangents autograd asks for are computed (``ctx.needs_input_grad``): with a constant old policy,
the usual case in training, the old policy's part of the VJP is skipped.

Small CPU batches run the package's NumPy kernels on zero-copy views of the tensors (the same
code, another namespace): torch's per-operation cost on CPU (dispatch, and about 45 µs to wake
its second thread for a transcendental function of a few hundred numbers) dominates there, and
NumPy was 1.4–5.8× faster at 1,000 states on 2 cores (``benchmarks/``), and stays faster for
diagonal KL projections at every measured size. The route is taken for plain CPU float tensors
with at most :data:`NUMPY_MAX_ELEMENTS` input numbers (more for diagonal KL and Frobenius
projections and for full Gaussians of large dimension; fewer with more than two torch threads),
outside
``torch.compile`` and ``torch.func.vmap`` (forward and backward each decide from their own
arguments); set it to 0 to always use torch kernels.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from .. import _compat
from .._config import torch_compiling
from . import _common

#: CPU calls whose array arguments hold at most this many numbers in all run on NumPy views
#: (about 6,000 full or 22,000 diagonal 6-D Gaussians; torch is faster above, from about 10,000
#: full 6-D states). 0: never, for every kind of call.
NUMPY_MAX_ELEMENTS = 1 << 19

#: Full Gaussians of this dimension and more (an argument whose last two axes are equal and at
#: least this long) may hold :data:`LARGE_D_FACTOR` times as many numbers: torch's batched
#: decompositions of 17x17 and 32x32 matrices are slow on the CPU, and NumPy was 1.3-4.5x
#: faster at 10,000 full states with d = 17 and d = 32 (about 13,700 and 3,900 states now).
LARGE_D = 12
LARGE_D_FACTOR = 16

#: Diagonal Gaussians (no argument with two equal trailing axes) of these projections may hold
#: this many times as many numbers. KL: about 1.4 million 6-D states, its Newton solve being
#: many short elementwise passes, where torch's per-operation cost (waking its second thread)
#: and page faults outweigh its threads (NumPy route with its chunks against torch's kernels,
#: forward + backward, float64, 2 threads, each in its own process: 42 against 52 ms at 100,000
#: states, 340 against 480-550 ms at a million). Frobenius: about 87,000 states (22.5 against
#: 25 ms at 60,000, even at 100,000). W2 and the rest keep the limit itself: torch's kernels
#: were faster for diagonal W2 from 30,000 states.
DIAG_FACTORS = {"kl": 64, "frobenius": 4}

#: The limits above were measured with 2 torch threads; with more threads they shrink in
#: proportion (torch's kernels then gain on NumPy's single thread).
MEASURED_THREADS = 2

_NUMPY_DTYPES = (torch.float32, torch.float64)

#: KL and W2 projections on torch's CPU kernels of more than this many states (the first axis
#: of every array) run in equal chunks of at most this many, forward and backward, as the NumPy
#: route does (``_common.CHUNK_ROWS``): then only one chunk's temporaries exist at a time.
#: Forward + backward of 100,000 full 6-D states, 2 threads, 2 chunks, peak extra memory over
#: the input's size with every state projected: KL 4.42 -> 3.49, W2 5.57 -> 4.28; at the
#: benchmark's bounds KL 2.79 -> 2.34, W2 3.00 -> 2.49. Time: W2 the same, KL about 4 % more
#: (medians of 11 processes each, ``benchmarks/torch_chunks.py``); smaller chunks cost torch's
#: per-operation overhead once more per chunk (4 chunks: 9-19 % slower). Frobenius projections,
#: cheap enough that the chunks' joins weigh (about 7 % slower), run whole (:data:`CHUNKED`).
#: CUDA tensors (whose batches are cheaper whole), and calls under ``torch.func.vmap`` or
#: ``torch.compile``, run whole (``torch.func.grad`` and ``vjp`` run the forward eagerly: it
#: chunks). From ``_common.PARALLEL_MIN_NUMBERS`` numbers in the scale, the chunks run on torch's
#: threads at once (``_common.lanes``) and hold at most ``CHUNK_ROWS // threads`` rows, so that as
#: many rows' temporaries exist at a time as in turn; shorter batches are split too (Frobenius
#: projections still run whole: torch's kernels already use every thread for their products and
#: passes). 0: never.
CHUNK_ROWS = 65536
CHUNKED = ("kl", "wasserstein")


def _plain_cpu(t: torch.Tensor) -> bool:
    return (
        type(t) in (torch.Tensor, torch.nn.Parameter)
        and t.device.type == "cpu"
        and t.layout == torch.strided
        and not t.is_neg()  # (a lazily negated view, e.g. `c.conj().imag`: NumPy cannot view it)
        and not _functorch_wrapped(t)
    )


def _limit(kind: str, ts: list) -> float:
    """How many numbers a call of operation ``kind`` on ``ts`` may hold to run on NumPy views."""
    square = [t.shape[-1] for t in ts if t.ndim >= 2 and t.shape[-1] == t.shape[-2]]
    if not square:
        factor = DIAG_FACTORS.get(kind, 1)
    else:
        factor = LARGE_D_FACTOR if max(square) >= LARGE_D else 1
    threads = max(MEASURED_THREADS, torch.get_num_threads())
    return NUMPY_MAX_ELEMENTS * factor * MEASURED_THREADS / threads


def _eager_cpu(tensors: tuple) -> bool:
    """Whether every tensor among ``tensors`` (numbers allowed) is a plain CPU tensor and no
    compiler or batching transform (``torch.func.vmap``) is active: the calls that may run in
    chunks or on NumPy views. (``torch.func.grad`` and ``vjp`` have lowered their transform by
    the time ``forward`` runs.)"""
    if torch_compiling() or torch._C._are_functorch_transforms_active():
        return False
    return all(_plain_cpu(t) for t in tensors if isinstance(t, torch.Tensor))


def _via_numpy(kind: str, tensors: tuple, others: tuple = ()) -> bool:
    """Whether a call on ``tensors`` (the arrays, and the bounds in the forward; Python numbers
    allowed) and ``others`` (residuals and cotangents in the backward; ``None`` allowed) runs on
    NumPy views: plain CPU tensors, float ones among ``tensors``, few enough numbers there (the
    same count forward and backward), no compiler or transform active."""
    if not all(isinstance(t, (torch.Tensor, int, float)) for t in tensors):
        return False  # (another library's array: the torch route reports it)
    if not _eager_cpu(tensors):
        return False  # (first: under torch.compile, nothing below is traced)
    ts = [t for t in tensors if isinstance(t, torch.Tensor)]
    if sum(t.numel() for t in ts) > _limit(kind, ts):
        return False
    return all(t.dtype in _NUMPY_DTYPES for t in ts) and all(
        r is None or _plain_cpu(r) for r in others
    )


def _to_numpy(xs: tuple) -> tuple:
    return tuple(x.detach().numpy() if isinstance(x, torch.Tensor) else x for x in xs)


def _to_torch(xs: tuple) -> tuple:
    return tuple(None if x is None else _tensor(np.asarray(x)) for x in xs)


def _tensor(x: np.ndarray) -> torch.Tensor:
    # Zero-copy where NumPy allows writing (torch warns on read-only memory, e.g. broadcasts).
    return torch.from_numpy(x if x.flags.writeable else x.copy())


def _entries(res: Any) -> tuple:
    """A residual tuple, or a chunked call's residual tuples one after the other: the flat
    entries the forward returns (:func:`_residuals` regroups them)."""
    return tuple(x for r in res for x in r) if isinstance(res, list) else tuple(res)


def _residuals(op: Any, entries: Any) -> Any:
    """The residual tuple from the saved entries, or one tuple per chunk when the forward ran
    in chunks (its entries then come one chunk after the other)."""
    n = len(op.residuals._fields)
    parts = [op.residuals._make(entries[i : i + n]) for i in range(0, len(entries), n)]
    return parts[0] if len(parts) == 1 else parts


SECOND_ORDER_ERROR = (
    "tr_projections: the projections' gradients are first order only; a second derivative "
    "through a projection (differentiating its gradient: create_graph=True, torch.func.jacrev "
    "or hessian of a gradient) is not available. Detach what you differentiate again, or take "
    "the second derivatives of the distances (trp.kl, trp.frobenius), which have them."
)


class _SecondOrder(torch.autograd.Function):
    """The cotangents of :class:`_Operation`, joined to everything they depend on (the
    operation's inputs and the incoming cotangents), with a backward that raises
    :data:`SECOND_ORDER_ERROR`: differentiating them again, by any route to any of those
    tensors, stops there. (``torch.autograd.function.once_differentiable`` joins them to
    detached copies only, so ``torch.autograd.grad`` with ``inputs=``, which runs only the
    nodes on paths to its inputs, and ``torch.func`` transforms, missed its error and dropped
    the second-order terms.)"""

    generate_vmap_rule = True

    @staticmethod
    def forward(n_links: int, *tensors: Any) -> tuple:  # type: ignore[override]
        return tuple(t.clone() for t in tensors[n_links:])

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> tuple:  # type: ignore[override]
        raise RuntimeError(SECOND_ORDER_ERROR)


def _first_order(backward: Any) -> Any:
    """``backward`` of :class:`_Operation` without a graph of its own: its work runs under
    ``no_grad``, and where a graph is being recorded (``create_graph=True``, an outer
    ``torch.func`` transform) its cotangents come out of :class:`_SecondOrder`."""

    @functools.wraps(backward)
    def wrapper(ctx: Any, *grads: Any) -> tuple:
        with torch.no_grad():
            cots = backward(ctx, *grads)
        if not torch.is_grad_enabled():
            return cots
        links = [  # (the inputs, bounds and outputs it saved, and the incoming cotangents)
            t
            for t in (*ctx.saved_tensors, *grads)
            if isinstance(t, torch.Tensor) and (t.requires_grad or _functorch_wrapped(t))
        ]
        where = [i for i, c in enumerate(cots) if isinstance(c, torch.Tensor)]
        if not links or not where:
            return cots
        joined = _SecondOrder.apply(len(links), *links, *(cots[i] for i in where))
        out = list(cots)
        for i, c in zip(where, joined, strict=True):
            out[i] = c
        return tuple(out)

    return wrapper


def _functorch_wrapped(t: torch.Tensor) -> bool:
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(t))


class _Operation(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(static: tuple, *inputs: Any) -> tuple:  # type: ignore[override]
        kind, options, n_bounds = static
        bounds, arrays = inputs[:n_bounds], inputs[n_bounds:]
        if _via_numpy(kind, inputs):
            with _compat.numpy_threads(torch.get_num_threads()):
                outs, res = _common.forward(
                    kind, _to_numpy(arrays), _to_numpy(bounds), dict(options)
                )
            return _to_torch((*outs, *_entries(res)))
        chunk = 0
        if kind in CHUNKED and _eager_cpu(inputs):
            # Chunks on several threads at once (_common.lanes) are shorter in proportion: as
            # many rows' temporaries exist at a time as with one chunk after another.
            chunk = CHUNK_ROWS and max(1, CHUNK_ROWS // _common.lanes(kind, arrays))
        outs, res = _common.forward(kind, arrays, bounds, dict(options), chunk_rows=chunk)
        return (*outs, *_entries(res))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        static = inputs[0]
        kind, _, n_bounds = static
        n_out = _common.OPERATIONS[kind].n_out
        res = output[n_out:]
        saved = [r for r in res if r is not None]
        ctx.mark_non_differentiable(*saved)
        # No zero cotangents for the residual outputs (autograd would otherwise fill one
        # batch-sized array per residual before every backward); the real outputs get zeros
        # in ``backward`` when unused.
        ctx.set_materialize_grads(False)
        ctx.out_meta = tuple((o.shape, o.dtype, o.device) for o in output[:n_out])
        arrays = inputs[1 + n_bounds :]
        # Bound tensors that require grad: the bounds and the outputs kept too, for their
        # cotangents (_common.bound_cotangents); numbers and constant bounds keep nothing.
        bounds = inputs[1 : 1 + n_bounds]
        ctx.bound_needs = tuple(
            isinstance(b, torch.Tensor) and bool(n)
            for b, n in zip(bounds, ctx.needs_input_grad[1 : 1 + n_bounds], strict=True)
        )
        kept = ()
        if any(ctx.bound_needs):
            ctx.bound_values = tuple(None if isinstance(b, torch.Tensor) else b for b in bounds)
            kept = (*(b for b in bounds if isinstance(b, torch.Tensor)), *output[:n_out])
        ctx.save_for_backward(*arrays, *saved, *kept)
        ctx.static = static
        ctx.n_arrays = len(arrays)
        ctx.n_kept = len(kept)
        ctx.missing = tuple(r is None for r in res)

    @staticmethod
    @_first_order  # a second derivative through it raises instead of going wrong
    def backward(ctx: Any, *grads: Any) -> tuple:  # type: ignore[override]
        kind, options, n_bounds = ctx.static
        op = _common.OPERATIONS[kind]
        saved = ctx.saved_tensors
        arrays = saved[: ctx.n_arrays]
        it = iter(saved[ctx.n_arrays : len(saved) - ctx.n_kept])
        entries = [None if m else next(it) for m in ctx.missing]
        needs = ctx.needs_input_grad[1 + n_bounds :]
        grads = tuple(
            torch.zeros(shape, dtype=dtype, device=device) if g is None else g
            for g, (shape, dtype, device) in zip(grads[: op.n_out], ctx.out_meta, strict=True)
        )
        # (the route is decided anew: torch.func may wrap these)
        bound_cots = (None,) * n_bounds
        if any(ctx.bound_needs):
            bound_cots = _bound_cotangents(ctx, kind, options, arrays, saved, grads)
        if _via_numpy(kind, arrays, (*entries, *grads)):
            res = _residuals(op, _to_numpy(tuple(entries)))
            with _compat.numpy_threads(torch.get_num_threads()):
                cots = _common.backward(
                    kind, _to_numpy(arrays), res, _to_numpy(grads), dict(options), needs
                )
            return (None, *bound_cots) + _to_torch(tuple(cots))
        res = _residuals(op, entries)
        cots = _common.backward(kind, arrays, res, grads, dict(options), needs)
        return (None, *bound_cots) + tuple(cots)


def _bound_cotangents(ctx: Any, kind: str, options: tuple, arrays: tuple, saved: tuple,
                      grads: tuple) -> tuple:  # fmt: skip
    """The cotangents of the bound tensors that require grad (None for the others), from the
    bounds and outputs that ``setup_context`` kept (at the end of the saved tensors)."""
    n_out = _common.OPERATIONS[kind].n_out
    kept = saved[len(saved) - ctx.n_kept :]
    tensors, outs = iter(kept[: ctx.n_kept - n_out]), kept[ctx.n_kept - n_out :]
    bounds = tuple(next(tensors) if v is None else v for v in ctx.bound_values)
    return _common.bound_cotangents(
        kind, arrays, bounds, outs, grads, dict(options), ctx.bound_needs
    )


def apply(kind: str, arrays: tuple, bounds: tuple, options: dict) -> tuple:
    """Outputs of operation ``kind``, differentiable with torch autograd and ``torch.func``."""
    # (sorted by key alone: under torch.compile with dynamic shapes an option may be a symbolic
    # bool, which dynamo cannot compare)
    static = (kind, tuple(sorted(options.items(), key=lambda kv: kv[0])), len(bounds))
    if torch_compiling() and not (
        torch.is_grad_enabled() and any(_records(t) for t in (*bounds, *arrays))
    ):
        # Nothing to differentiate: the forward alone. (Under torch.compile, torch 2.13's dynamo
        # passes the Function's forward a context as ``static`` when no input requires grad.)
        out = _Operation.forward(static, *bounds, *arrays)
    else:
        out = _Operation.apply(static, *bounds, *arrays)
    return tuple(out[: _common.OPERATIONS[kind].n_out])


def _records(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.requires_grad
