"""JAX adapter: one :func:`jax.custom_vjp` that registers the hand-written VJPs.

Python-float bounds and options are static (``nondiff_argnums``); bound arrays are ordinary
arguments whose cotangent is zero (bounds are constants). The forward is traceable (the KL solver
is a ``lax.while_loop``), so ``jit``, ``vmap``, ``grad`` and ``jit(grad)`` all work.

Concrete arrays (a call outside ``jit`` and ``vmap``, the forward and backward of an eager
``jax.grad`` or ``jax.vjp``, and :func:`tr_projections.vjp`) run the projections, the loss and
the entropy projection as compiled programs (:data:`EAGER_JIT`): the value checks and the
bounds' checks first, on the concrete arrays (the value conditions themselves one compiled
program, :func:`values_hold`), then ``jax.jit`` programs (a forward alone, a forward with its
residuals, a backward) cached by JAX per operation, options, shapes and the package's settings
(:data:`SETTING_MODULES`). So do the arguments of an eager ``jax.vmap`` (nested ones, and
``jax.grad`` inside or around one, too: :func:`_eager_vmap`), whose values are checked stacked
over the mapped axes (:func:`tr_projections._compat.readable`) and which JAX runs as the same
programs, batched: each compiled once per batched shapes, where op by op each operation was
dispatched, and compiled, on its own. Run op by op instead, every one of a projection's few hundred
operations is compiled again for every shape it meets, and with the eager route's row selection
the shapes of the costly stages follow the number of states outside their bounds, so a call on
new data compiled most of them again (``benchmarks/jax_eager.py``). The distances and
:func:`tr_projections.entropy` take a compiled program of their own, differentiated by JAX
itself (:func:`distance`).
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import _compat, _rows
from .._inputs import is_static_bound
from . import _common

#: Concrete JAX arrays run these operations, and the distances (:func:`distance`), as ``jax.jit``
#: programs (module docstring); ``False``: op by op, with the eager route's row selection, as
#: before. Read at each call.
EAGER_JIT = True

#: The operations that take the compiled route: the projections and the loss, whose checks
#: :func:`tr_projections.backends._common.check` runs on their own, and the entropy projection,
#: checked by its caller (:func:`tr_projections.projections.entropy.entropy_inputs`).
JITTED = ("kl", "frobenius", "wasserstein", "trust_region_loss", "entropy")


#: The modules whose settings (upper-case module constants: ``kl.MAX_ITER``, the row settings,
#: ``_compat``'s routes) the traced computation reads.
SETTING_MODULES = ("_compat", "_rows", "_values", "gaussian", "projections.kl",
                   "projections.wasserstein")  # fmt: skip


@functools.cache
def _setting_names() -> tuple:
    pairs = []
    for name in SETTING_MODULES:
        module = importlib.import_module(f"tr_projections.{name}")
        for key, value in vars(module).items():
            if key.isupper() and not key.startswith("_") and not callable(value):
                pairs.append((module, key))
    return tuple(pairs)


def _frozen(value: Any) -> Any:
    # A setting as a hashable key: lists as tuples, 0-d arrays as numbers, anything else that
    # cannot be hashed by its repr.
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    if getattr(value, "ndim", None) == 0 and hasattr(value, "tolist"):
        return value.tolist()
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


def _settings() -> tuple:
    """The package's settings as they are now: part of a compiled program's key, so that a
    program traced under other settings is not reused (a call op by op reads them each time)."""
    return tuple(_frozen(getattr(module, key)) for module, key in _setting_names())


def _option(value: Any) -> Any:
    # An option as a hashable key: strings and bools as they are, anything else (a 0-d array,
    # a NumPy bool) by its truth value, as the computation reads it.
    return value if isinstance(value, (str, bool)) else bool(value)


def _key(kind: str, options: Any) -> tuple:
    """A compiled program's key: the operation or distance, its options (``(name, value)``
    pairs) as hashable values in name order, and the package's settings."""
    return (kind, tuple(sorted((k, _option(v)) for k, v in options)), _settings())


def _merge(static_bounds: tuple, bounds: tuple) -> tuple:
    return tuple(s if b is None else b for s, b in zip(static_bounds, bounds, strict=True))


def _concrete(xs: tuple) -> bool:
    """Whether every array among ``xs`` (``None`` allowed) holds values: no tracer."""
    return all(x is None or not isinstance(x, jax.core.Tracer) for x in xs)


def _eager_vmap(xs: tuple) -> bool:
    """Whether every array among ``xs`` (``None`` allowed) is concrete or a tracer of an eager
    ``jax.vmap`` (nested ones too): a batch tracer over batch tracers over concrete values, no
    ``jit`` trace or differentiation underneath (:func:`tr_projections._compat.jax_batched`;
    should JAX's batch tracers change, such calls run op by op, as before)."""
    return all(
        not isinstance(x, jax.core.Tracer) or _compat.jax_batched(x)[1] is not None for x in xs
    )


def _forward(static: tuple, bounds: tuple, arrays: tuple) -> tuple:
    # The forward of operation static[0] (static: kind, options, the settings): the body of
    # the compiled program, and what every other call runs (traced, or op by op).
    kind, options, _ = static
    with _compat.serial_decompositions() as last:
        outs, res = _common.forward(kind, arrays, bounds, dict(options))
    # The backward's decompositions follow the forward's last one (one element of its output
    # carries the dependence): see serial_decompositions.
    after = None if last[0] is None else jnp.ravel(last[0])[:1]
    return outs, res, after


def _backward(static: tuple, arrays: tuple, res: Any, after: Any, cots: tuple) -> tuple:
    # The backward (static: kind, options, the settings, and which cotangents are wanted,
    # None for all), after the forward's last decomposition `after`.
    kind, options, _, needs = static
    with _compat.serial_decompositions(after):
        return tuple(_common.backward(kind, arrays, res, cots, dict(options), needs))


def _outputs(static: tuple, bounds: tuple, arrays: tuple) -> tuple:
    # The forward's outputs alone (a call that nothing differentiates: no residuals computed).
    return _forward(static, bounds, arrays)[0]


_forward_jit = jax.jit(_forward, static_argnums=0)
_backward_jit = jax.jit(_backward, static_argnums=0)
_outputs_jit = jax.jit(_outputs, static_argnums=0)


def _applies(kind: str) -> bool:
    """Whether operation ``kind`` takes the compiled route (with concrete arrays)."""
    return EAGER_JIT and kind in JITTED


def _compiled(static: tuple, bounds: tuple, arrays: tuple, *, mapped: bool = False) -> tuple | None:
    """``(key, bounds)`` for the compiled route, or ``None`` where the call runs as it is
    (traced, or op by op): :data:`EAGER_JIT` off, another operation, or a tracer among the
    arguments; with ``mapped``, tracers of an eager ``jax.vmap`` are allowed
    (:func:`_eager_vmap`: JAX then batches the whole program, compiled once per batched
    shapes, where op by op it dispatched and compiled each of a few hundred operations). The
    arguments are checked here, on their values where they can be read (the compiled program
    cannot read them); every bound becomes an array of the inputs' dtype (numbers a NumPy one,
    which costs no JAX operation), so a new bound value is no new program."""
    kind, options, static_bounds, _ = static
    held = _eager_vmap if mapped else _concrete
    if not (_applies(kind) and held(bounds) and held(arrays)):
        return None
    dtype, checked = _common.check(kind, arrays, _merge(static_bounds, bounds), dict(options))
    checked = tuple(np.asarray(b, dtype=dtype) if isinstance(b, float) else b for b in checked)
    return _key(kind, options), checked


def _as_is(static: tuple, bounds: tuple, arrays: tuple) -> tuple:
    # The forward of a call that runs as it is (traced, or op by op), from the custom_vjp's
    # static argument.
    return _forward(static[:2] + (None,), _merge(static[2], bounds), arrays)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _operation(static: tuple, bounds: tuple, arrays: tuple) -> tuple:
    # (concrete arrays that nothing differentiates take _outputs_jit in apply, and a
    # differentiated call runs _fwd; here: an eager jax.vmap, compiled, or traced / op by op)
    compiled = _compiled(static, bounds, arrays, mapped=True)
    if compiled is not None:
        return _outputs_jit(compiled[0], compiled[1], arrays)
    return _as_is(static, bounds, arrays)[0]


@jax.tree_util.register_pytree_node_class
class _Program:
    """The key of a compiled forward, carried among its residuals to the backward (which is
    compiled too, under the same key): a pytree node without leaves, the key its static data."""

    def __init__(self, key: tuple) -> None:
        self.key = key

    def tree_flatten(self) -> tuple:
        return (), self.key

    @classmethod
    def tree_unflatten(cls, key: tuple, _children: Any) -> _Program:
        return cls(key)


def _fwd(static: tuple, bounds: tuple, arrays: tuple) -> tuple:
    # (the outputs are kept for the cotangents of bound arrays: _bound_cotangents)
    compiled = _compiled(static, bounds, arrays, mapped=True)
    if compiled is not None:
        outs, res, after = _forward_jit(compiled[0], compiled[1], arrays)
        program = _Program(compiled[0])
    else:
        outs, res, after = _as_is(static, bounds, arrays)
        program = None
    kept = tuple(outs) if any(_inexact(b) for b in bounds) else None
    return outs, (res, bounds, arrays, after, program, kept)


def _zero(b: Any) -> Any:
    if b is None:
        return None
    if jnp.issubdtype(b.dtype, jnp.inexact):
        return jnp.zeros_like(b)
    return np.zeros(b.shape, dtype=jax.dtypes.float0)  # integer bounds take float0 cotangents


def _inexact(b: Any) -> bool:
    # A floating-point array (not None; integer bounds and float0 cotangents are not).
    return b is not None and jnp.issubdtype(getattr(b, "dtype", np.float64), jnp.inexact)


def _bound_cotangents(static: tuple, bounds: tuple, arrays: tuple, outs: tuple, cots: tuple):
    # The cotangents of the bound arrays (static: kind, options, the settings, and which bounds
    # are arrays): _common.bound_cotangents, from the call's arrays, bounds and outputs.
    kind, options, _, needs = static
    with _compat.serial_decompositions():
        return _common.bound_cotangents(kind, arrays, bounds, outs, cots, dict(options), needs)


_bound_cotangents_jit = jax.jit(_bound_cotangents, static_argnums=0)


SECOND_ORDER_ERROR = (
    "tr_projections: the projections' gradients are first order only; a second derivative "
    "through a projection (differentiating its gradient: jax.hessian, jax.jacfwd or jax.jacrev "
    "of a jax.grad) is not available: the hand-written VJP is not differentiated (it would go "
    "through the forward's eigendecomposition, which has no derivative where eigenvalues "
    "repeat). Take the second derivatives of the distances (trp.kl, trp.frobenius), which "
    "have them."
)


#: The operations whose VJP is not differentiated again (:data:`SECOND_ORDER_ERROR`): the
#: projections, whose residuals hold eigenvectors (full KL and W2) or the solver's weights.
FIRST_ORDER = ("kl", "frobenius", "wasserstein")


@jax.custom_jvp
def _first_order(x: Any) -> Any:
    """``x`` (the VJP's residuals), whose differentiation raises :data:`SECOND_ORDER_ERROR`:
    JAX would otherwise differentiate the hand-written VJP through the forward's residuals,
    ``eigh``'s eigenvectors among them, whose derivative is NaN where eigenvalues repeat (a new
    covariance proportional to the old one)."""
    return x


@_first_order.defjvp
def _first_order_jvp(primals: tuple, tangents: tuple) -> tuple:
    raise TypeError(SECOND_ORDER_ERROR)


def _guard(tree: Any) -> Any:
    # tree with its floating-point leaves passed through _first_order (float0, integer leaves
    # and None as they are). Concrete leaves, which no transform differentiates, as they are:
    # an eager first-order backward pays nothing (the call costs about 0.5 ms on 12 leaves).
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    if not any(isinstance(x, jax.core.Tracer) for x in leaves):
        return tree
    where = [i for i, x in enumerate(leaves) if _inexact(x)]
    if where:
        for i, x in zip(where, _first_order(tuple(leaves[i] for i in where)), strict=True):
            leaves[i] = x
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _bwd(static: tuple, carry: tuple, cots: tuple) -> tuple:
    kind, options, static_bounds, _ = static
    res, bounds, arrays, last, program, outs = carry
    if kind in FIRST_ORDER:
        # (the residuals, not the cotangents, are guarded: the VJP is linear in its cotangent,
        # so differentiating it through the cotangent alone, as jax.vjp of vjp_fn does for a
        # JVP, is first order and goes on; through the residuals it is second order)
        res, bounds, arrays, last, outs = _guard((res, bounds, arrays, last, outs))
    if program is not None:
        grads = _backward_jit((*program.key, None), arrays, res, last, tuple(cots))
    else:
        grads = _backward((kind, options, None, None), arrays, res, last, tuple(cots))
    bound_cots = tuple(_zero(b) for b in bounds)
    if outs is not None:  # (bound arrays: how the outputs move with them)
        needs = tuple(_inexact(b) for b in bounds)
        merged = _merge(static_bounds, bounds)
        key = (kind, options, _settings(), needs)
        body = _bound_cotangents_jit if program is not None else _bound_cotangents
        found = body(key, merged, arrays, outs, tuple(cots))
        bound_cots = tuple(z if c is None else c for z, c in zip(bound_cots, found, strict=True))
    return bound_cots, tuple(grads)


_operation.defvjp(_fwd, _bwd)


def _static(kind: str, bounds: tuple, options: dict) -> tuple[tuple, tuple]:
    """The custom_vjp's static argument and its bounds that are arrays (``None`` where static)."""
    names = _common.OPERATIONS[kind].bound_names
    # Numbers are static; anything else must be an array (a TypeError naming the bound, before
    # custom_vjp would reject it in its own words).
    is_static = [is_static_bound(b, name) for b, name in zip(bounds, names, strict=True)]
    static_bounds = tuple(b if s else None for b, s in zip(bounds, is_static, strict=True))
    dynamic = tuple(None if s else b for b, s in zip(bounds, is_static, strict=True))
    # (the row settings too: a trace made under other slots is not reused)
    static = (kind, tuple(sorted(options.items())), static_bounds, _rows.traced_settings())
    return static, dynamic


def apply(kind: str, arrays: tuple, bounds: tuple, options: dict) -> tuple:
    """Outputs of operation ``kind``, differentiable with ``jax.grad`` under ``jit``/``vmap``."""
    static, dynamic = _static(kind, bounds, options)
    compiled = _compiled(static, dynamic, tuple(arrays))
    if compiled is not None:  # (concrete arrays: no transform differentiates this call)
        return tuple(_outputs_jit(compiled[0], compiled[1], tuple(arrays)))
    return tuple(_operation(static, dynamic, tuple(arrays)))


def _distance(static: tuple, arrays: tuple) -> Any:
    # The body of a distance's compiled program, or the entropy's (static: name, options, the
    # settings).
    name, options, _ = static
    if name == "entropy":  # (trp.entropy: one scale, option `full`)
        from ..gaussian import _entropy

        return _entropy(arrays[0], full=dict(options)["full"], xp=jnp)
    from ..distances import parts

    return parts(name, arrays, dict(options))


_distance_jit = jax.jit(_distance, static_argnums=0)


def distance(name: str, arrays: tuple, options: dict) -> Any:
    """Distance ``name`` (:mod:`tr_projections.distances`) of arrays already checked, or the
    entropy (``name`` ``"entropy"``, ``arrays`` the scale alone, ``options`` ``{"full": ...}``:
    :func:`tr_projections.entropy`), as a
    compiled program cached per distance, options, shapes and settings, or ``None`` where it
    runs as it is: :data:`EAGER_JIT` off, or an argument whose values are not known (a tracer
    of ``jit``). Arguments of an eager ``jax.vmap`` take the program too (batched by JAX), and
    so do those of an eager ``jax.grad``, ``jax.jvp`` or ``jax.vjp``, whose program JAX
    differentiates (to any order) as it does any ``jax.jit`` function; op by op, the rows
    chosen by value would give its stages new shapes, and so new compilations, on every
    call."""
    if not EAGER_JIT:
        return None
    # (an eager autodiff's tracers: their values, under any batch tracers)
    held = tuple(jax.lax.stop_gradient(x) if isinstance(x, jax.core.Tracer) else x for x in arrays)
    if not _eager_vmap(held):
        return None
    return _distance_jit(_key(name, options.items()), tuple(arrays))


def _holds(static: tuple, arrays: tuple) -> Any:
    # The body of the value checks' program (static: the settings, then (kind, lo, hi) per
    # array); a symmetric root's Cholesky test in turn with the other's.
    from .._values import all_hold

    with _compat.serial_decompositions():
        return all_hold(static[1], arrays, xp=jnp)


_holds_jit = jax.jit(_holds, static_argnums=0)


def values_hold(kinds: tuple, arrays: tuple) -> bool | None:
    """Whether every value condition of the concrete ``arrays`` holds
    (:func:`tr_projections._values.all_hold`; ``kinds``: ``(kind, lo, hi)`` per array), from
    one compiled program cached per conditions, shapes and settings, or ``None`` where
    :data:`EAGER_JIT` is off or the answer is not a value: arrays that a transform stages or
    carries as constants (a ``jit`` that closes over them, ``jet``), whose conditions the caller
    then forms op by op, as before. Op by op, the few dozen reductions and comparisons of a
    call's four arguments cost as much as the compiled distance after them (about 2 ms at 1,000
    states), and more under an eager ``jax.grad``; the program is one dispatch, which an eager
    transform runs on the values (its tangents are zero)."""
    if not EAGER_JIT:
        return None
    out = _holds_jit((_settings(), kinds), tuple(arrays))
    return None if isinstance(out, jax.core.Tracer) else bool(out)


def compiled_vjp(kind: str, arrays: tuple, bounds: tuple, options: dict) -> tuple | None:
    """:func:`tr_projections.vjp`'s forward on the compiled route: ``(outputs, backward)`` with
    ``backward(cots, needs)`` the cotangents of ``arrays`` (``None`` where not needed), or
    ``None`` where the compiled route does not apply (:func:`_compiled`)."""
    if not _applies(kind):  # (before _static: errors in the usual order)
        return None
    static, dynamic = _static(kind, bounds, options)
    compiled = _compiled(static, dynamic, tuple(arrays), mapped=True)
    if compiled is None:
        return None
    key, checked = compiled
    outs, res, after = _forward_jit(key, checked, tuple(arrays))

    def backward(cots: tuple, needs: tuple) -> tuple:
        return _backward_jit((*key, tuple(needs)), tuple(arrays), res, after, tuple(cots))

    return tuple(outs), backward
