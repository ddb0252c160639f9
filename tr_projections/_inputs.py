"""Reading the public arguments: namespace, kind, dtype, device, batch shape and bounds.

Every public entry point goes through :func:`prepare` once; the math below it receives arrays
that are already broadcast to one batch shape, share one dtype and device, and a namespace ``xp``.
The checks here look at shapes, dtypes and devices only, so they are free and work under tracing.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from . import _compat
from .gaussian import is_full

Array = Any

_ARG_NAMES = ("mean", "scale", "old_mean", "old_scale")


class Problem(NamedTuple):
    """Four arrays broadcast to ``batch + (d,)`` / ``batch + (d, d)``, and what they share."""

    xp: Any
    full: bool
    d: int
    batch: tuple[int, ...]
    mean: Array
    scale: Array
    old_mean: Array
    old_scale: Array

    @property
    def dtype(self) -> Any:
        return self.mean.dtype

    @property
    def device(self) -> Any:
        return _compat.device(self.mean)


def _library(x: Any) -> str:
    mod = type(x).__module__.split(".")[0]
    return f"{mod}.{type(x).__name__}"


def namespace_of(named: dict[str, Any]) -> Any:
    """The shared namespace of the named arrays, or a TypeError that says who differs."""
    for name, x in named.items():
        if not _compat_is_array(x):
            raise TypeError(
                f"`{name}` must be an array of an array-API library (NumPy, PyTorch, JAX, CuPy, "
                f"array-api-strict), got {type(x).__name__}"
            )
    try:
        return _compat.array_namespace(*named.values())
    except TypeError as err:
        kinds = ", ".join(f"`{n}`: {_library(x)}" for n, x in named.items())
        raise TypeError(f"all arrays in one call must come from one library; got {kinds}") from err


def _compat_is_array(x: Any) -> bool:
    import array_api_compat

    return array_api_compat.is_array_api_obj(x)


def broadcast_shapes(named: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    """NumPy broadcasting of the named shapes, with an error that lists them."""
    ndim = max((len(s) for s in named.values()), default=0)
    out = []
    for axis in range(-ndim, 0):
        size = 1
        for shape in named.values():
            if len(shape) >= -axis:
                n = shape[axis]
                if n != 1:
                    if size not in (1, n):
                        shapes = ", ".join(f"`{k}` {tuple(v)}" for k, v in named.items())
                        raise ValueError(f"batch shapes do not broadcast: {shapes}")
                    size = n
        out.append(size)
    return tuple(out)


def prepare(mean: Array, scale: Array, old_mean: Array, old_scale: Array) -> Problem:
    """Check and broadcast the four arrays of a projection or distance call."""
    arrays = dict(zip(_ARG_NAMES, (mean, scale, old_mean, old_scale), strict=True))
    xp = namespace_of(arrays)

    for name, x in arrays.items():
        if not xp.isdtype(x.dtype, "real floating"):
            raise TypeError(f"`{name}` must have a real floating dtype, got {x.dtype}")
    if mean.ndim < 1:
        raise ValueError("`mean` must have shape (..., d) with at least one axis, got a scalar")
    d = mean.shape[-1]
    if d == 0:
        raise ValueError("`mean` has an action dimension d = 0; at least one is needed")
    if old_mean.ndim < 1 or old_mean.shape[-1] != d:
        raise ValueError(
            f"`old_mean` must have shape (..., {d}) like `mean`, got {tuple(old_mean.shape)}"
        )

    full = is_full(mean, scale)
    batches = {"mean": tuple(mean.shape[:-1]), "old_mean": tuple(old_mean.shape[:-1])}
    for name, s in (("scale", scale), ("old_scale", old_scale)):
        if full:
            if s.ndim < 2 or tuple(s.shape[-2:]) != (d, d):
                raise ValueError(
                    f"`{name}` must be a lower Cholesky factor of shape (..., {d}, {d}) because "
                    f"`scale` is full; got {tuple(s.shape)}"
                )
            batches[name] = tuple(s.shape[:-2])
        else:
            if s.ndim < 1 or s.shape[-1] != d:
                raise ValueError(
                    f"`{name}` must hold standard deviations of shape (..., {d}) (diagonal) or a "
                    f"Cholesky factor of shape (..., {d}, {d}) (full); got {tuple(s.shape)}"
                )
            batches[name] = tuple(s.shape[:-1])
    batch = broadcast_shapes(batches)

    devices = {n: _compat.device(x) for n, x in arrays.items()}
    if len({str(v) for v in devices.values()}) > 1:
        listed = ", ".join(f"`{n}` on {v}" for n, v in devices.items())
        raise ValueError(f"all arrays in one call must be on one device; got {listed}")

    dtype = xp.result_type(*arrays.values())
    vec = batch + (d,)
    mat = batch + ((d, d) if full else (d,))

    def cast(x: Array, shape: tuple[int, ...]) -> Array:
        if x.dtype != dtype:
            x = xp.astype(x, dtype)
        return xp.broadcast_to(x, shape) if tuple(x.shape) != shape else x

    return Problem(
        xp=xp,
        full=full,
        d=d,
        batch=batch,
        mean=cast(mean, vec),
        scale=cast(scale, mat),
        old_mean=cast(old_mean, vec),
        old_scale=cast(old_scale, mat),
    )


def bound(eps: Any, name: str, problem: Problem) -> Array:
    """A bound as an array of ``problem``'s dtype and device that broadcasts to its batch shape.

    Python numbers are checked to be positive and finite here; bound arrays must broadcast *to*
    the batch shape (one bound per state), never widen it.
    """
    xp = problem.xp
    if isinstance(eps, bool) or eps is None:
        raise TypeError(f"`{name}` must be a positive float or an array of them, got {eps!r}")
    if isinstance(eps, (int, float)):
        if not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"`{name}` must be positive and finite, got {eps!r}")
        return xp.asarray(float(eps), dtype=problem.dtype, device=problem.device)
    if not _compat_is_array(eps):
        raise TypeError(
            f"`{name}` must be a positive float or an array of the inputs' library, "
            f"got {type(eps).__name__}"
        )
    namespace_of({"mean": problem.mean, name: eps})
    shape = tuple(eps.shape)
    try:
        ok = broadcast_shapes({name: shape, "batch": problem.batch}) == problem.batch
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"`{name}` of shape {shape} must broadcast to the batch shape {problem.batch}"
        )
    if not xp.isdtype(eps.dtype, ("real floating", "integral")):
        raise TypeError(f"`{name}` must have a real dtype, got {eps.dtype}")
    eps = xp.astype(eps, problem.dtype)
    bad = _compat.eager_any(~((eps > 0) & (eps < math.inf)), xp=xp)
    if bad:
        raise ValueError(f"`{name}` must be positive and finite everywhere")
    return eps
