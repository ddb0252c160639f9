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

from . import _compat
from ._config import checks_enabled
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


# --------------------------------------------------------------------------- static checks


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


def _scale_batch(name: str, s: Array, d: int, full: bool) -> tuple[int, ...]:
    """The batch shape of a scale of the given kind, or a ValueError that says what is wrong."""
    shape = tuple(s.shape)
    if full:
        if s.ndim < 2:
            raise ValueError(
                f"`{name}` must be a lower Cholesky factor of shape (..., {d}, {d}) because "
                f"`scale` is full; got {s.ndim} axes, shape {shape}"
            )
        if shape[-2] != shape[-1]:
            raise ValueError(
                f"`{name}` must be a lower Cholesky factor of shape (..., {d}, {d}) because "
                f"`scale` is full; got shape {shape}, whose last two axes are not square"
            )
        if shape[-2:] != (d, d):
            raise ValueError(
                f"`{name}` must be a lower Cholesky factor of shape (..., {d}, {d}) because "
                f"`scale` is full and `mean` has d = {d}; got shape {shape}"
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
            f"Cholesky factor of shape (..., {d}, {d}) (full), d = {d} from `mean`; "
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
) -> Problem:
    """Check and broadcast the four arrays of a projection or distance call.

    ``check_values`` runs (``True``) or skips (``False``) the value checks; by default they
    follow :func:`tr_projections.checks_enabled`. Callers that re-read arrays already checked
    (a backward pass) may pass ``False``.
    """
    arrays = dict(zip(_ARG_NAMES, (mean, scale, old_mean, old_scale), strict=True))
    xp = namespace_of(arrays)

    for name, x in arrays.items():
        _check_dtype(name, x, xp)
    if mean.ndim < 1:
        raise ValueError("`mean` must have shape (..., d) with at least one axis, got a scalar")
    d = mean.shape[-1]
    if d == 0:
        raise ValueError(
            f"`mean` has an action dimension d = 0 (shape {tuple(mean.shape)}); "
            "at least one is needed"
        )
    if old_mean.ndim < 1 or old_mean.shape[-1] != d:
        raise ValueError(
            f"`old_mean` must have shape (..., {d}) like `mean`, got {tuple(old_mean.shape)}"
        )

    full = is_full(mean, scale)
    batches = {"mean": tuple(mean.shape[:-1]), "old_mean": tuple(old_mean.shape[:-1])}
    for name, s in (("scale", scale), ("old_scale", old_scale)):
        batches[name] = _scale_batch(name, s, d, full)
    batch = broadcast_shapes(batches)

    devices = {n: _compat.device(x) for n, x in arrays.items()}
    if len({str(v) for v in devices.values()}) > 1:
        listed = ", ".join(f"`{n}` on {v}" for n, v in devices.items())
        raise ValueError(f"all arrays in one call must be on one device; got {listed}")

    dtype = xp.result_type(*arrays.values())
    if check_values is None:
        check_values = checks_enabled()
    if check_values:
        check_gaussian_values(arrays, full=full, dtype=dtype, xp=xp)

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


# --------------------------------------------------------------------------- value checks


def scale_limits(dtype: Any, *, xp: Any) -> tuple[float, float]:
    """``(lo, hi)``: a standard deviation or Cholesky entry must lie in ``[lo, hi]`` (diagonal
    entries) or ``[-hi, hi]`` (off-diagonal) so that the variances are normal numbers of
    ``dtype``: ``lo = sqrt(smallest normal)``, ``hi = sqrt(largest finite)``."""
    fi = xp.finfo(dtype)
    return math.sqrt(float(fi.smallest_normal)), math.sqrt(float(fi.max))


class _Condition(NamedTuple):
    """One value condition of one argument: ``ok`` is an elementwise mask (True where the
    condition holds), ``source`` the array it indexes (for the message), ``expected`` words."""

    name: str
    ok: Array
    source: Array
    expected: str


def _conditions(name: str, x: Array, *, kind: str, lo: float, hi: float, xp: Any) -> list:
    """The value conditions of argument ``name``; ``kind`` is "mean", "diag" or "full"."""
    if kind == "mean":
        return [_Condition(name, xp.isfinite(x), x, "must be finite")]
    limits = f"[{lo:.3g}, {hi:.3g}]"
    if kind == "diag":
        return [
            _Condition(
                name,
                (x >= lo) & (x <= hi),
                x,
                f"(standard deviations) must be positive and finite, in {limits} so that the "
                "variances are normal numbers",
            )
        ]
    diag = xp.linalg.diagonal(x)
    return [
        _Condition(
            name, xp.abs(x) <= hi, x, f"(a Cholesky factor) must be finite, |entries| <= {hi:.3g}"
        ),
        _Condition(
            name,
            (diag >= lo) & (diag <= hi),
            diag,
            f"(a Cholesky factor) must have a positive diagonal in {limits}: a singular factor, "
            "or one whose squared diagonal underflows, is refused",
        ),
        _Condition(
            name,
            xp.triu(x, k=1) == 0,
            x,
            "(a Cholesky factor) must be lower triangular: zeros above the diagonal",
        ),
    ]


def _describe(x: Array, ok: Array, *, xp: Any) -> str:
    """How many entries of ``x`` break a condition, and the first of them with its index."""
    bad = ~ok
    n_bad = int(xp.sum(xp.astype(bad, xp.int64)))
    first = tuple(int(i[0]) for i in xp.nonzero(bad))
    value = float(x[first]) if first else float("nan")
    size = math.prod(tuple(bad.shape))
    return f"got {n_bad} offending entries of {size}, the first {value!r} at index {first}"


_SWITCH_HINT = (
    "(value checks can be turned off with `tr_projections.set_checks(False)` or "
    "`with tr_projections.checks(False):`)"
)


def check_gaussian_values(arrays: dict[str, Array], *, full: bool, dtype: Any, xp: Any) -> None:
    """Value checks of ``mean``/``old_mean`` (finite) and ``scale``/``old_scale`` (between the
    :func:`scale_limits` of ``dtype``; full factors also lower triangular), on the arrays as
    passed (before broadcasting). One synchronisation when all is well; arrays whose values
    cannot be read (tracers) are skipped."""
    lo, hi = scale_limits(dtype, xp=xp)
    found: list[_Condition] = []
    for name, x in arrays.items():
        if _compat._is_traced(x, xp):
            continue
        kind = ("full" if full else "diag") if name.endswith("scale") else "mean"
        lo_x, hi_x = lo, hi
        if x.dtype != dtype:  # a float32 argument promoted to float64: limits it can hold
            own = xp.finfo(x.dtype)
            lo_x, hi_x = max(lo, float(own.smallest_normal)), min(hi, float(own.max))
        found.extend(_conditions(name, x, kind=kind, lo=lo_x, hi=hi_x, xp=xp))
    if not found:
        return
    all_ok = xp.all(found[0].ok)
    for c in found[1:]:
        all_ok = all_ok & xp.all(c.ok)
    if not _compat.eager_any(~all_ok, xp=xp):
        return
    for c in found:  # the error path: find the first broken condition and describe it
        if not bool(xp.all(c.ok)):
            raise ValueError(
                f"`{c.name}` {c.expected}; {_describe(c.source, c.ok, xp=xp)} {_SWITCH_HINT}"
            )


# --------------------------------------------------------------------------- bounds


def bound(eps: Any, name: str, problem: Problem) -> Array:
    """A bound as an array of ``problem``'s dtype and device that broadcasts to its batch shape.

    Python numbers (and NumPy scalars) are checked statically to be positive, finite and a normal
    number of the inputs' dtype; bound arrays must share the inputs' library and device and
    broadcast *to* the batch shape (one bound per state), never widen it, and their values are
    checked like the inputs' (see :func:`tr_projections.checks_enabled`).
    """
    xp = problem.xp
    fi = xp.finfo(problem.dtype)
    tiny, big = float(fi.smallest_normal), float(fi.max)
    dtype_name = str(problem.dtype).rsplit(".", 1)[-1]
    if isinstance(eps, bool) or eps is None or isinstance(eps, str):
        raise TypeError(f"`{name}` must be a positive float or an array of them, got {eps!r}")
    if isinstance(eps, numbers.Real):  # Python numbers and NumPy scalars: static checks
        value = float(eps)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"`{name}` must be positive and finite, got {eps!r}")
        if not tiny <= value <= big:
            raise ValueError(
                f"`{name}` must be positive and finite in the inputs' dtype {dtype_name} "
                f"(between {tiny:.3g} and {big:.3g}), got {eps!r}"
            )
        return xp.asarray(value, dtype=problem.dtype, device=problem.device)
    if isinstance(eps, numbers.Number):
        raise TypeError(f"`{name}` must be a real number, got {eps!r}")
    if not _compat_is_array(eps):
        raise TypeError(
            f"`{name}` must be a positive float or an array of the inputs' library, "
            f"got {type(eps).__name__}"
        )
    namespace_of({"mean": problem.mean, name: eps})
    if str(_compat.device(eps)) != str(problem.device):
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
    if checks_enabled() and not _compat._is_traced(eps, xp):
        # Checked before the cast, in the bound's own dtype, so a float64 bound that would
        # overflow float32 is reported rather than silently (or noisily) becoming inf.
        own = xp.finfo(eps.dtype)
        lo, hi = max(tiny, float(own.smallest_normal)), min(big, float(own.max))
        bad = ~((eps >= lo) & (eps <= hi))
        if _compat.eager_any(bad, xp=xp):
            detail = _describe(eps, bad, xp=xp) if eps.ndim else f"got {float(eps)!r}"
            raise ValueError(
                f"`{name}` must be positive and finite everywhere (between {tiny:.3g} and "
                f"{big:.3g} in {dtype_name}); {detail}"
            )
    if eps.dtype != problem.dtype:
        eps = xp.astype(eps, problem.dtype)
    return eps
