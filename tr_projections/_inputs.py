"""Reading the public arguments: namespace, kind, dtype, device, batch shape and bounds.

Every public projection and distance goes through :func:`prepare` once (and :func:`bound` for
each bound); the math below it receives arrays that are already broadcast to one batch shape,
share one dtype and device, and a namespace ``xp``. Two kinds of checks run here:

* **static checks** look at types, shapes, dtypes, devices and Python-number bounds only. They
  are free, always on, and work under tracing (``jax.jit``, ``torch.compile``);
* **value checks** read the arrays (non-finite entries, standard deviations or Cholesky
  diagonals that are not positive or whose squares are not normal numbers, non-zero entries above
  the diagonal of a Cholesky factor, bound arrays that are not positive and finite). They cost a
  few reductions and one synchronisation, run on eager arrays while
  :func:`tr_projections.checks_enabled` is true (the default), and are skipped for arrays whose
  values cannot be read (tracers).

Every error is a ``TypeError`` (wrong kind of object or dtype) or a ``ValueError`` (wrong shape,
device or value) whose message names the argument, what was expected and what came.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import numpy as np

from . import _compat
from ._config import checks_to_run
from ._values import check_gaussian_values, describe, in_range
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
    # The batch shape of ``scale`` and ``old_scale`` together, as passed (before broadcasting),
    # with as many axes as ``batch``: 1 on the axes along which both scales are shared.
    cov_batch: tuple[int, ...] | None = None

    @property
    def dtype(self) -> Any:
        return self.mean.dtype

    @property
    def device(self) -> Any:
        return _compat.device(self.mean)


# --------------------------------------------------------------------------- static checks


def _library(x: Any) -> str:
    if isinstance(x, np.ndarray):  # including subclasses other libraries wrap them in
        return "numpy.ndarray"
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


def shared_batch(batch: tuple[int, ...], *shapes: tuple[int, ...]) -> tuple[int, ...]:
    """The part of ``batch`` that ``shapes`` (which broadcast to it) span: ``batch``'s size on
    the axes where any of them has more than one entry, 1 where all share one."""
    padded = [(1,) * (len(batch) - len(s)) + tuple(s) for s in shapes]
    return tuple(n if any(s[i] != 1 for s in padded) else 1 for i, n in enumerate(batch))


def unbroadcast(x: Array, like: Array, *, xp: Any) -> Array:
    """Sum ``x`` over the axes that broadcasting added to ``like`` and cast to its dtype."""
    shape = tuple(like.shape)
    extra = x.ndim - len(shape)
    if extra > 0:
        x = xp.sum(x, axis=tuple(range(extra)))
    axes = tuple(i for i, (n, m) in enumerate(zip(shape, x.shape, strict=True)) if n == 1 != m)
    if axes:
        x = xp.sum(x, axis=axes, keepdims=True)
    if x.dtype != like.dtype:
        x = xp.astype(x, like.dtype)
    return x


def broadcast_shapes(named: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    """NumPy broadcasting of the named shapes, with an error that lists them."""
    ndim = max([0] + [len(s) for s in named.values()])  # (a list: torch.compile traces it)
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


def _check_dtype(name: str, x: Array, xp: Any) -> None:
    if not xp.isdtype(x.dtype, "real floating"):
        raise TypeError(
            f"`{name}` must have a real floating dtype (float32 or float64), got {x.dtype}"
        )
    if x.dtype != xp.float32 and x.dtype != xp.float64:
        # Half precision cannot resolve the bounds (and most linalg routines refuse it).
        raise TypeError(
            f"`{name}` must be float32 or float64, got {x.dtype}; cast it first (e.g. `.float()`)"
        )


def _scale_batch(
    name: str, s: Array, d: int, full: bool, *, names: tuple[str, ...] = _ARG_NAMES
) -> tuple[int, ...]:
    """The batch shape of a scale of the given kind, or a ValueError that says what is wrong.

    ``names`` are the public names of ``(mean, scale, old_mean, old_scale)``, for messages."""
    mean_name, scale_name = names[0], names[1]
    shape = tuple(s.shape)
    if full:
        if s.ndim < 2:
            raise ValueError(
                f"`{name}` must be a lower Cholesky factor of shape (..., {d}, {d}) because "
                f"`{scale_name}` is full; got {s.ndim} axes, shape {shape}"
            )
        if shape[-2] != shape[-1]:
            raise ValueError(
                f"`{name}` must be a lower Cholesky factor of shape (..., {d}, {d}) because "
                f"`{scale_name}` is full; got shape {shape}, whose last two axes are not square"
            )
        if shape[-2:] != (d, d):
            raise ValueError(
                f"`{name}` must be a lower Cholesky factor of shape (..., {d}, {d}) because "
                f"`{scale_name}` is full and `{mean_name}` has d = {d}; got shape {shape}"
            )
        return shape[:-2]
    if s.ndim < 1:
        raise ValueError(
            f"`{name}` must hold standard deviations of shape (..., {d}) (diagonal) or a lower "
            f"Cholesky factor of shape (..., {d}, {d}) (full); got a scalar (0 axes)"
        )
    if shape[-1] != d:
        hint = ""
        if s.ndim >= 2 and d in shape[-2:] and shape[-2] != shape[-1]:
            hint = f" (a full scale must be square, ({d}, {d}); its last two axes are {shape[-2:]})"
        raise ValueError(
            f"`{name}` must hold standard deviations of shape (..., {d}) (diagonal) or a lower "
            f"Cholesky factor of shape (..., {d}, {d}) (full), d = {d} from `{mean_name}`; "
            f"got shape {shape}{hint}"
        )
    return shape[:-1]


def prepare(
    mean: Array,
    scale: Array,
    old_mean: Array,
    old_scale: Array,
    *,
    check_values: bool | None = None,
    names: tuple[str, str, str, str] = _ARG_NAMES,
    roots: bool = False,
) -> Problem:
    """Check and broadcast the four arrays of a projection or distance call.

    ``check_values`` runs (``True``) or skips (``False``) the value checks; by default they
    follow :func:`tr_projections.checks_enabled`. Callers that re-read arrays already checked
    (a backward pass) may pass ``False``. ``names`` are the public names of the four arguments
    used in error messages (e.g. ``("mean", "scale", "proj_mean", "proj_scale")``); names of
    scales must end in ``"scale"``. With ``roots`` full scales are checked as symmetric positive
    definite square roots of the covariances (the W2 projection's ``root=True``) instead of
    lower Cholesky factors.
    """
    n_mean, _, n_old_mean, _ = names
    arrays = dict(zip(names, (mean, scale, old_mean, old_scale), strict=True))
    xp = namespace_of(arrays)

    for name, x in arrays.items():
        _check_dtype(name, x, xp)
    if mean.ndim < 1:
        raise ValueError(
            f"`{n_mean}` must have shape (..., d) with at least one axis, got a scalar"
        )
    d = mean.shape[-1]
    if d == 0:
        raise ValueError(
            f"`{n_mean}` has an action dimension d = 0 (shape {tuple(mean.shape)}); "
            "at least one is needed"
        )
    if old_mean.ndim < 1 or old_mean.shape[-1] != d:
        raise ValueError(
            f"`{n_old_mean}` must have shape (..., {d}) like `{n_mean}`, "
            f"got {tuple(old_mean.shape)}"
        )

    full = is_full(mean, scale)
    batches = {n_mean: tuple(mean.shape[:-1]), n_old_mean: tuple(old_mean.shape[:-1])}
    for name, s in ((names[1], scale), (names[3], old_scale)):
        batches[name] = _scale_batch(name, s, d, full, names=names)
    batch = broadcast_shapes(batches)

    # Traced JAX arrays (jit, vmap) report no device; only concrete devices are compared.
    devices = {n: _compat.device(x) for n, x in arrays.items()}
    devices = {n: v for n, v in devices.items() if v is not None}
    if len({str(v) for v in devices.values()}) > 1:
        listed = ", ".join(f"`{n}` on {v}" for n, v in devices.items())
        raise ValueError(f"all arrays in one call must be on one device; got {listed}")

    dtype = xp.result_type(*arrays.values())
    if check_values is None:
        check_values = checks_to_run()
    if check_values:
        check_gaussian_values(arrays, full=full, dtype=dtype, xp=xp, roots=roots)

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
        cov_batch=shared_batch(batch, batches[names[1]], batches[names[3]]),
    )


# --------------------------------------------------------------------------- bounds


def check_scale(scale: Any, full: bool | None, *, name: str = "scale") -> tuple[Any, bool]:
    """Check a lone scale (:func:`tr_projections.entropy`, ``project_entropy``) statically and,
    while checks are enabled, by value; return ``(xp, full)``.

    ``full=None`` reads a square trailing block as a Cholesky factor, anything else as standard
    deviations.
    """
    xp = namespace_of({name: scale})
    _check_dtype(name, scale, xp)
    square = scale.ndim >= 2 and scale.shape[-1] == scale.shape[-2]
    if full is None:
        full = square
    if scale.ndim < 1 or scale.shape[-1] == 0 or (full and not square):
        raise ValueError(
            f"`{name}` must have shape (..., d) (standard deviations) or (..., d, d) (a lower "
            f"Cholesky factor) with d >= 1, got {tuple(scale.shape)}"
            + (" with full=True" if full else "")
        )
    if checks_to_run():
        check_gaussian_values({name: scale}, full=bool(full), dtype=scale.dtype, xp=xp)
    return xp, bool(full)


def is_static_bound(eps: Any, name: str) -> bool:
    """Whether a bound is a Python or NumPy real number (checked statically, a constant under
    tracing) rather than an array; a TypeError naming ``name`` for anything that is neither.

    Adapters that treat the two differently (the JAX ``custom_vjp``) can call this before
    handing a bound to their library, so a wrong type is reported by name.
    """
    if isinstance(eps, bool) or eps is None or isinstance(eps, str):
        raise TypeError(f"`{name}` must be a positive float or an array of them, got {eps!r}")
    if isinstance(eps, numbers.Real):
        return True
    if isinstance(eps, numbers.Number):
        raise TypeError(f"`{name}` must be a real number, got {eps!r}")
    if not _compat_is_array(eps):
        raise TypeError(
            f"`{name}` must be a positive float or an array of the inputs' library, "
            f"got {type(eps).__name__}"
        )
    return False


def _is_numpy_scalar_array(eps: Any, xp: Any) -> bool:
    # A 0-d NumPy array passed with another library's inputs is a number, not a foreign array
    # (JAX's custom_vjp turns NumPy scalars into such arrays before they get here).
    return (
        not _compat.is_numpy(xp)
        and isinstance(eps, np.ndarray)
        and eps.ndim == 0
        and (np.issubdtype(eps.dtype, np.floating) or np.issubdtype(eps.dtype, np.integer))
    )


def bound(eps: Any, name: str, problem: Problem, *, as_number: bool = False) -> Array | float:
    """A bound as an array of ``problem``'s dtype and device that broadcasts to its batch shape.

    Python numbers (and NumPy scalars) are checked statically to be positive, finite and a normal
    number of the inputs' dtype; bound arrays must share the inputs' library and device and
    broadcast *to* the batch shape (one bound per state), never widen it, and their values are
    checked like the inputs' (see :func:`tr_projections.checks_enabled`). With ``as_number`` a
    number comes back checked as a Python float, for callers that make their own array of it.
    """
    xp = problem.xp
    fi = xp.finfo(problem.dtype)
    tiny, big = float(fi.smallest_normal), float(fi.max)
    dtype_name = str(problem.dtype).rsplit(".", 1)[-1]
    if is_static_bound(eps, name) or _is_numpy_scalar_array(eps, problem.xp):
        value = float(eps)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"`{name}` must be positive and finite, got {eps!r}")
        if not tiny <= value <= big:
            raise ValueError(
                f"`{name}` must be positive and finite in the inputs' dtype {dtype_name} "
                f"(between {tiny:.3g} and {big:.3g}), got {eps!r}"
            )
        if as_number:
            return value
        return xp.asarray(value, dtype=problem.dtype, device=problem.device)
    if not _compat_is_array(eps):
        raise TypeError(
            f"`{name}` must be a positive float or an array of the inputs' library, "
            f"got {type(eps).__name__}"
        )
    namespace_of({"mean": problem.mean, name: eps})
    eps_device, own_device = _compat.device(eps), problem.device
    if eps_device is not None and own_device is not None and str(eps_device) != str(own_device):
        raise ValueError(
            f"`{name}` must be on the inputs' device {problem.device}, got {_compat.device(eps)}"
        )
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
    if not xp.isdtype(eps.dtype, "real floating"):
        eps = xp.astype(eps, problem.dtype)  # integers: exact enough, and no overflow
    values = _compat.readable(eps, xp=xp)  # (eager jax.grad, torch.func: the values)
    if checks_to_run() and not _compat._is_traced(values, xp):
        # Checked before the cast, in the bound's own dtype, so a float64 bound that would
        # overflow float32 is reported rather than silently (or noisily) becoming inf.
        own = xp.finfo(eps.dtype)
        lo, hi = max(tiny, float(own.smallest_normal)), min(big, float(own.max))
        nonempty = math.prod(tuple(eps.shape)) > 0
        if nonempty and _compat.eager_any(~in_range(values, lo, hi, xp=xp), xp=xp):
            ok = (values >= lo) & (values <= hi)
            detail = describe(values, ok, xp=xp) if values.ndim else f"got {float(values)!r}"
            raise ValueError(
                f"`{name}` must be positive and finite everywhere (between {tiny:.3g} and "
                f"{big:.3g} in {dtype_name}); {detail}"
            )
    if eps.dtype != problem.dtype:
        eps = xp.astype(eps, problem.dtype)
    return eps
