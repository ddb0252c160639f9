"""PyTorch adapter: one :class:`torch.autograd.Function` that registers the hand-written VJPs.

``forward`` and ``setup_context`` are separate and the residuals are returned as (non
differentiable) outputs and saved with ``save_for_backward``, which is what ``torch.func``
requires; ``generate_vmap_rule`` lets ``torch.func.vmap`` batch forward and backward. Under
``torch.func`` transforms the KL solver cannot read its convergence mask and runs its fixed
iteration cap; under ``torch.compile`` its loop is a graph break and runs eagerly with its early
exit (see :func:`tr_projections._compat.while_loop`). Gradients are first order: ``backward`` is
``once_differentiable``, so a double backward raises instead of silently missing terms. Only the
cotangents autograd asks for are computed (``ctx.needs_input_grad``): with a constant old policy,
the usual case in training, the old policy's part of the VJP is skipped.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

from . import _common


class _Operation(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(static: tuple, *inputs: Any) -> tuple:  # type: ignore[override]
        kind, options, n_bounds = static
        outs, res = _common.forward(kind, inputs[n_bounds:], inputs[:n_bounds], dict(options))
        return (*outs, *res)

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
        ctx.save_for_backward(*arrays, *saved)
        ctx.static = static
        ctx.n_arrays = len(arrays)
        ctx.missing = tuple(r is None for r in res)

    @staticmethod
    @once_differentiable  # first order only: a double backward raises instead of going wrong
    def backward(ctx: Any, *grads: Any) -> tuple:  # type: ignore[override]
        kind, options, n_bounds = ctx.static
        op = _common.OPERATIONS[kind]
        saved = ctx.saved_tensors
        arrays = saved[: ctx.n_arrays]
        it = iter(saved[ctx.n_arrays :])
        res = op.residuals._make(None if m else next(it) for m in ctx.missing)
        needs = ctx.needs_input_grad[1 + n_bounds :]
        grads = tuple(
            torch.zeros(shape, dtype=dtype, device=device) if g is None else g
            for g, (shape, dtype, device) in zip(grads[: op.n_out], ctx.out_meta, strict=True)
        )
        cots = _common.backward(kind, arrays, res, grads, dict(options), needs)
        return (None,) * (1 + n_bounds) + tuple(cots)


def apply(kind: str, arrays: tuple, bounds: tuple, options: dict) -> tuple:
    """Outputs of operation ``kind``, differentiable with torch autograd and ``torch.func``."""
    static = (kind, tuple(sorted(options.items())), len(bounds))
    out = _Operation.apply(static, *bounds, *arrays)
    return tuple(out[: _common.OPERATIONS[kind].n_out])
