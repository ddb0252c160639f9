"""Adapters that register the hand-written VJPs with each library's autodiff.

* PyTorch tensors go through one :class:`torch.autograd.Function` (:mod:`.torch`), with separate
  ``forward`` and ``setup_context``, so ``loss.backward()``, ``torch.func.grad``/``vmap`` and
  ``torch.compile`` all use the hand-written VJPs;
* JAX arrays go through one :func:`jax.custom_vjp` (:mod:`.jax`), so ``jax.grad``, ``jit``,
  ``vmap`` and their compositions do;
* every array library, these two included, has :func:`vjp`, the ``jax.vjp`` convention.

An adapter module is imported only when the caller's arrays belong to its library. The adapters
contain no math: both wrap :func:`._common.forward` and :func:`._common.backward`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from .. import _compat
from .._inputs import _compat_is_array, _library, namespace_of

__all__ = ["apply", "vjp"]

Array = Any


def apply(kind: str, arrays: tuple, bounds: tuple, options: dict) -> tuple:
    """Run operation ``kind`` through the adapter of the arrays' library; returns its outputs."""
    from ._common import OPERATIONS, forward

    xp = namespace_of(dict(zip(OPERATIONS[kind].arg_names, arrays, strict=True)))
    if _compat.is_torch(xp):
        from . import torch as adapter
    elif _compat.is_jax(xp):
        from . import jax as adapter
    else:  # no autodiff to register with: the plain forward (gradients through `vjp`)
        return forward(kind, arrays, bounds, options)[0]
    return adapter.apply(kind, arrays, bounds, options)


def _needs(wrt: Any, names: tuple[str, ...]) -> tuple[bool, ...]:
    """One flag per array argument: whether ``wrt`` (``None``: all, else argument names) asks
    for its cotangent."""
    if wrt is None:
        return (True,) * len(names)
    wanted = (wrt,) if isinstance(wrt, str) else tuple(wrt)
    unknown = [w for w in wanted if w not in names]
    if unknown or not all(isinstance(w, str) for w in wanted):
        raise ValueError(f"`wrt` must name arguments among {list(names)}, got {wrt!r}")
    return tuple(n in wanted for n in names)


def _bind(fn: Callable, args: tuple, kwargs: dict) -> tuple[str, tuple, tuple, dict]:
    """``(kind, arrays, bounds, options)`` of a call ``fn(*args, **kwargs)`` of a public
    projection function."""
    from .. import projections as P
    from ..losses import trust_region_loss

    if fn is trust_region_loss:
        b = inspect.signature(fn).bind(*args, **kwargs)
        b.apply_defaults()
        a = dict(b.arguments)
        arrays = tuple(a.pop(n) for n in ("mean", "scale", "proj_mean", "proj_scale"))
        options = {k: a[k] for k in ("method", "scale_prec", "root")}
        return "trust_region_loss", arrays, (), options
    if fn is P.project_entropy:
        b = inspect.signature(fn).bind(*args, **kwargs)
        b.apply_defaults()
        a = b.arguments
        _, full, beta = P.entropy.entropy_inputs(a["scale"], a["min_entropy"], a["full"])
        return "entropy", (a["scale"],), (beta,), {"full": full, "equality": bool(a["equality"])}
    kinds = {
        P.project_kl: "kl",
        P.project_frobenius: "frobenius",
        P.project_wasserstein: "wasserstein",
    }
    if fn is P.project:
        b = inspect.signature(fn).bind(*args, **kwargs)
        a = b.arguments
        method = a.get("method")
        if method not in P.METHODS:
            raise ValueError(f"`method` must be one of {sorted(P.METHODS)}, got {method!r}")
        fn = P.METHODS[method]
        args = tuple(a[n] for n in ("mean", "scale", "old_mean", "old_scale") if n in a)
        kwargs = {
            "eps_mean": a.get("eps_mean"),
            "eps_cov": a.get("eps_cov"),
            **a.get("options", {}),
        }
    if fn not in kinds:
        names = (
            "project, project_kl, project_frobenius, project_wasserstein, project_entropy, "
            "trust_region_loss"
        )
        raise TypeError(f"`fn` must be one of tr_projections' projections ({names}), got {fn!r}")
    b = inspect.signature(fn).bind(*args, **kwargs)
    b.apply_defaults()
    a = dict(b.arguments)
    arrays = tuple(a.pop(n) for n in ("mean", "scale", "old_mean", "old_scale"))
    bounds = (a.pop("eps_mean"), a.pop("eps_cov"))
    return kinds[fn], arrays, bounds, a


def _cotangents(cotangent: Any, outs: tuple, xp: Any) -> tuple:
    """The cotangent given to a ``vjp_fn``, one entry per output (``None``: zero), each checked:
    an array of the call's library ``xp``, of a real floating dtype and of its output's shape
    (nothing is broadcast), else an error that names it (``g_mean``, ``g_scale``; ``cotangent``
    for one output). As with ``jax.vjp``, NumPy arrays are JAX outputs' cotangents too; NumPy
    scalars are NumPy's (a loss of one state is one)."""
    import numpy as np

    names = ("g_mean", "g_scale") if len(outs) == 2 else ("cotangent",)
    if cotangent is None:
        return (None,) * len(outs)
    if len(outs) == 1 and not isinstance(cotangent, (tuple, list)):
        cots: list = [cotangent]
    elif isinstance(cotangent, (tuple, list)):
        cots = list(cotangent)
    else:
        raise TypeError(
            f"the cotangent of a projection is a pair (g_mean, g_scale), e.g. "
            f"trp.Gaussian(g_mean, g_scale), with None for zero; got {type(cotangent).__name__}"
        )
    if len(cots) != len(outs):
        raise ValueError(
            f"the cotangent must match the output: {len(outs)} array(s) "
            f"({', '.join(names)}), got {len(cots)}"
        )
    numpy_ok = _compat.is_jax(xp) or _compat.is_numpy(xp)
    for i, (name, g, out) in enumerate(zip(names, cots, outs, strict=True)):
        if g is None:
            continue
        if numpy_ok and isinstance(g, (np.ndarray, np.generic)):
            g = cots[i] = xp.asarray(g)
        try:
            same = _compat_is_array(g) and _compat.array_namespace(g) is xp
        except TypeError:
            same = False
        if not same:
            raise TypeError(
                f"`{name}` must be an array of the output's library ({_library(out)}) or "
                f"None, got {_library(g)}"
            )
        if not xp.isdtype(g.dtype, "real floating"):
            raise TypeError(f"`{name}` must have a real floating dtype, got {g.dtype}")
        shape = tuple(getattr(out, "shape", ()))
        if tuple(g.shape) != shape:
            raise ValueError(f"`{name}` must have the output's shape {shape}, got {tuple(g.shape)}")
    return tuple(cots)


def vjp(fn: Callable, *args: Any, **kwargs: Any) -> tuple[Any, Callable]:
    r"""Evaluate a projection and return its vector–Jacobian product, as :func:`jax.vjp` does.

    ``out, vjp_fn = vjp(fn, *args, **kwargs)`` computes ``out = fn(*args, **kwargs)`` for one of
    :func:`~tr_projections.project_kl`, :func:`~tr_projections.project_frobenius`,
    :func:`~tr_projections.project_wasserstein`, :func:`~tr_projections.project` and
    :func:`~tr_projections.project_entropy`. ``vjp_fn(cotangent)`` takes a cotangent of ``out``
    (a :class:`~tr_projections.Gaussian` ``(g_mean, g_scale)`` for projections, an array for the
    entropy projection; ``None`` entries, or ``None`` for the whole, mean zero; each an array of
    the outputs' library with its output's shape, of a real floating dtype, else a
    ``TypeError`` or ``ValueError`` that names it) and returns the cotangents of the array
    arguments in the caller's library, shapes and dtypes: ``(mean, scale, old_mean, old_scale)``
    for projections, ``(scale,)`` for the entropy projection. Bounds are constants.
    :func:`~tr_projections.trust_region_loss` works too: its cotangent is an array of the batch
    shape, and the cotangents of its projected arguments are zero. ``vjp_fn(cotangent,
    wrt=("mean", "scale"))`` computes only the cotangents of the named arguments and returns
    ``None`` for the others: with a constant old policy, the usual case in training, the old
    policy's part of the VJP is skipped (as torch's autograd does by itself).

    Works for every array library (NumPy, CuPy, array-api-strict, PyTorch, JAX) with the same
    hand-written VJPs that the torch and JAX adapters register. Cotangents of full (Cholesky)
    scales are lower triangular: entry ``(i, j)``, ``i >= j``, is the derivative with respect to
    ``L[i, j]``; the strict upper triangle of an incoming ``g_scale`` is ignored. Those of
    symmetric roots (``root=True``, W2) are symmetric, but on rows inside their bound, where
    the incoming ``g_scale`` passes through. ``vjp_fn`` can
    be called any number of times; ``vjp`` itself is first order (its outputs are not tracked by
    torch's or JAX's autodiff).

    Examples
    --------
    >>> import numpy as np, tr_projections as trp
    >>> out, vjp_fn = trp.vjp(trp.project_frobenius, np.ones(2), np.full(2, 2.0),
    ...                       np.zeros(2), np.ones(2), eps_mean=0.5, eps_cov=0.5)
    >>> g_mean, g_scale, g_old_mean, g_old_scale = vjp_fn(trp.Gaussian(np.ones(2), np.zeros(2)))
    >>> g_mean.shape, g_old_scale.shape
    ((2,), (2,))
    """
    from ..projections._core import Cotangents
    from ._common import OPERATIONS, backward, forward

    kind, arrays, bounds, options = _bind(fn, args, kwargs)
    op = OPERATIONS[kind]
    xp = namespace_of(dict(zip(op.arg_names, arrays, strict=True)))
    arrays = tuple(_compat.stop_gradient(x, xp=xp) for x in arrays)
    compiled = None
    if _compat.is_jax(xp):  # (concrete JAX arrays: the adapter's compiled programs)
        from . import jax as jax_adapter

        compiled = jax_adapter.compiled_vjp(kind, arrays, bounds, options)
    if compiled is None:
        outs, res = forward(kind, arrays, bounds, options)
    else:
        outs, compiled_backward = compiled

    def vjp_fn(cotangent: Any, *, wrt: Any = None) -> tuple:
        needs = _needs(wrt, op.arg_names)
        cots = _cotangents(cotangent, outs, xp)
        if compiled is None:
            grads = backward(kind, arrays, res, cots, options, needs)
        else:
            grads = compiled_backward(cots, needs)
        return Cotangents(*grads) if op.n_out == 2 else grads

    if op.n_out == 2:
        from ..gaussian import Gaussian

        return Gaussian(*outs), vjp_fn
    return outs[0], vjp_fn
