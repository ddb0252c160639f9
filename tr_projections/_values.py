"""Value checks: what is read from the arrays themselves (see :mod:`._inputs` for the rest).

Each condition is first evaluated with reductions only (``min``, ``max``, ``all``; JAX arrays:
``all`` of comparisons, see :func:`in_range`), combined into one boolean and read once: one
synchronisation per call when all is well (scales read as symmetric roots, ``root=True``, take
one more per root: their finiteness is read before the other conditions are formed). Concrete
JAX arrays evaluate all of them in one compiled program (:func:`all_hold`). Only on the error
path is the elementwise picture computed, to name the first offending entry.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

from . import _compat

Array = Any

__all__ = ["all_hold", "check_gaussian_values", "describe", "in_range", "scale_limits"]


def scale_limits(dtype: Any, *, xp: Any) -> tuple[float, float]:
    """``(lo, hi)``: a standard deviation or Cholesky entry must lie in ``[lo, hi]`` (diagonal
    entries) or ``[-hi, hi]`` (off-diagonal) so that the variances are normal numbers of
    ``dtype``: ``lo = sqrt(smallest normal)``, ``hi = sqrt(largest finite)``."""
    fi = xp.finfo(dtype)
    return math.sqrt(float(fi.smallest_normal)), math.sqrt(float(fi.max))


class _Condition(NamedTuple):
    """One value condition of one argument.

    ``holds`` is a 0-d boolean array (computed with reductions: cheap, no synchronisation);
    ``mask`` recomputes the elementwise picture on the error path only, for the message.
    """

    name: str
    holds: Array
    mask: Callable[[], tuple[Array, Array]]  # () -> (ok elementwise, the array it indexes)
    expected: str


def in_range(x: Array, lo: float, hi: float, *, xp: Any, strided: bool = False) -> Array:
    # min/max propagate NaN (array API standard), and NaN compares false: no temporaries.
    # Not jaxlib's on the CPU, whose min and max of 4,096 entries or more skip NaN (0.10.2):
    # JAX arrays compare every entry (one fused pass in the checks' compiled program).
    if _compat.is_jax(xp):
        return xp.all((x >= lo) & (x <= hi))
    return at_least(x, lo, xp=xp, strided=strided) & (
        _whole(xp.max, x, xp=xp, strided=strided) <= hi
    )


def at_least(x: Array, lo: float, *, xp: Any, strided: bool = False) -> Array:
    """Whether every entry of ``x`` is at least ``lo`` (NaN is not), as :func:`in_range`."""
    if _compat.is_jax(xp):
        return xp.all(x >= lo)
    return _whole(xp.min, x, xp=xp, strided=strided) >= lo


def _whole(reduce: Any, x: Array, *, xp: Any, strided: bool) -> Array:
    # ``reduce`` (min or max) over all of x. For a strided view (the diagonal of a batch of
    # factors) reducing the last axis first keeps torch on its fast kernel, 4x faster than one
    # reduction over all axes, and CuPy too (benchmarks/gpu_small.py); for a contiguous
    # array, and for NumPy always (7x at 1,000 factors, 4.6x at 1e5), the single reduction is
    # the faster one.
    if strided and x.ndim >= 2 and (_compat.is_torch(xp) or _compat.is_cupy(xp)):
        return reduce(reduce(x, axis=-1))
    return reduce(x)


def _triangle_limits(d: int, hi: float, dtype: Any, device: Any, xp: Any) -> tuple[Array, Array]:
    """``(limit, upper)`` of a ``(d, d)`` factor's entries check: ``hi`` on and below the
    diagonal and 0 above it, and the mask of the strict upper triangle. NumPy's are made once
    per ``d``, limit and dtype (read-only; they cost about as much as the check itself at 1,000
    factors); other libraries' are made per call, since an array made inside a trace (``jit``,
    ``torch.func``) must not outlive it."""
    if _compat.is_numpy(xp):
        return _numpy_triangle_limits(d, hi, dtype)
    limit = xp.tril(xp.full((d, d), hi, dtype=dtype, device=device))
    upper = xp.triu(xp.ones((d, d), dtype=xp.bool, device=device), k=1)
    return limit, upper


@functools.lru_cache(maxsize=64)
def _numpy_triangle_limits(d: int, hi: float, dtype: Any) -> tuple[Array, Array]:
    import numpy as np

    limit = np.tril(np.full((d, d), hi, dtype=dtype))
    upper = np.triu(np.ones((d, d), dtype=bool), k=1)
    limit.flags.writeable = upper.flags.writeable = False
    return limit, upper


#: Factors per row of :func:`entry_extremes`' first reduction (see there).
EXTREMES_ROW_FACTORS = 64

#: A full factor argument on the host with at least this many entries is checked through
#: :func:`entry_extremes`; a smaller one through ``|L| <= limit``, which costs fewer
#: operations. Where the two forms cross over depends on d and the library
#: (``benchmarks/value_checks.py``, ``benchmarks/results/cpu-2core-r17-value-checks-*``):
#: the extremes' speed-up at 36,000 entries of 6x6 factors was 0.70x (NumPy) and 1.09x
#: (torch); at 40,000 of 2x2 ones 1.41x and 1.06x; at 86,700 of 17x17 ones 1.03x and 1.07x;
#: for 6x6 ones from 10,000 factors 1.44-2.81x.
EXTREMES_MIN_NUMBERS = 1 << 16


def _by_extremes(x: Array, xp: Any) -> bool:
    return _compat.on_host(x, xp) and math.prod(tuple(x.shape)) >= EXTREMES_MIN_NUMBERS


def entry_extremes(x: Array, *, xp: Any) -> tuple[Array, Array]:
    """``(low, high)``: each entry's minimum and maximum over the batch of ``(..., d, d)``
    matrices ``x``, two ``(d, d)`` arrays (NaN where the entry is NaN anywhere).

    Full factors on the host (NumPy arrays, torch CPU tensors) are checked through these: two
    reductions and a few ``(d, d)`` comparisons, where ``|x| <= limit`` writes and reads a
    temporary as large as ``x`` and the diagonal's minimum is a strided third pass. The batch is
    read as rows of :data:`EXTREMES_ROW_FACTORS` factors (a view of a contiguous ``x``), reduced
    over the rows first and then over the factors of one row: a reduction over a long inner axis
    of ``64 d^2`` entries instead of ``d^2``. The three conditions of 100,000 6x6 factors,
    float64, 2 threads: NumPy 3.6 against 10.1 ms, torch 3.8 against 7.9 ms
    (``benchmarks/value_checks.py``, ``benchmarks/results/cpu-2core-r17-value-checks-*``).
    """
    d = x.shape[-1]
    n = math.prod(tuple(x.shape[:-2]))
    flat = xp.reshape(x, (n, d * d))
    m = EXTREMES_ROW_FACTORS
    k = n // m * m
    low = high = None
    if k:
        rows = xp.reshape(flat[:k, ...], (k // m, m * d * d))
        low = xp.min(xp.reshape(xp.min(rows, axis=0), (m, d * d)), axis=0)
        high = xp.max(xp.reshape(xp.max(rows, axis=0), (m, d * d)), axis=0)
    if k < n:
        rest = flat[k:, ...]
        rest_low, rest_high = xp.min(rest, axis=0), xp.max(rest, axis=0)
        low = rest_low if low is None else xp.minimum(low, rest_low)
        high = rest_high if high is None else xp.maximum(high, rest_high)
    return xp.reshape(low, (d, d)), xp.reshape(high, (d, d))


def _conditions(name: str, x: Array, *, kind: str, lo: float, hi: float, xp: Any) -> list:
    """The value conditions of argument ``name``; ``kind`` is "mean", "diag" or "full"."""
    if math.prod(tuple(x.shape)) == 0:  # an empty batch has nothing to check
        return []
    if kind == "mean":
        big = float(xp.finfo(x.dtype).max)
        return [
            _Condition(
                name, in_range(x, -big, big, xp=xp), lambda: (xp.isfinite(x), x), "must be finite"
            )
        ]
    limits = f"[{lo:.3g}, {hi:.3g}]"
    if kind == "root":
        return _root_conditions(name, x, lo=lo, hi=hi, xp=xp)
    if kind == "diag":
        return [
            _Condition(
                name,
                in_range(x, lo, hi, xp=xp),
                lambda: ((x >= lo) & (x <= hi), x),
                f"(standard deviations) must be positive and finite, in {limits} so that the "
                "variances are normal numbers",
            )
        ]
    diag = xp.linalg.diagonal(x)
    # Two conditions at once: |L_ij| <= hi on and below the diagonal (finite, and L L^T cannot
    # overflow) and |L_ij| <= 0 above it (lower triangular).
    limit, upper = _triangle_limits(x.shape[-1], hi, x.dtype, _compat.device(x), xp)
    if _by_extremes(x, xp):
        low, high = entry_extremes(x, xp=xp)
        entries = xp.all(high <= limit) & xp.all(low >= -limit)
        diagonal = xp.all(xp.linalg.diagonal(low) >= lo)
    else:
        entries = xp.all(xp.abs(x) <= limit)
        diagonal = at_least(diag, lo, xp=xp, strided=True)

    def finite_mask() -> tuple[Array, Array]:
        return (xp.abs(x) <= limit) | upper, x

    def upper_mask() -> tuple[Array, Array]:
        return (x == 0) | ~upper, x

    return [
        _Condition(
            name,
            entries,
            finite_mask,
            f"(a Cholesky factor) must be finite, |L_ij| <= {hi:.3g}",
        ),
        _Condition(
            name,
            entries,
            upper_mask,
            "(a Cholesky factor) must be lower triangular: zeros above the diagonal",
        ),
        _Condition(
            name,
            # (the diagonal's upper limit is the entries' own, checked above: its minimum only)
            diagonal,
            lambda: ((diag >= lo) & (diag <= hi), diag),
            f"(a Cholesky factor) must have a positive diagonal in {limits}: a singular factor, "
            "or one whose squared diagonal underflows, is refused",
        ),
    ]


#: A symmetric root may differ from its transpose by this many rounding units of its trace
#: (at least its largest entry, for a positive semi-definite matrix); beyond, it is refused.
ROOT_ASYMMETRY_ULPS = 16


def _root_conditions(name: str, x: Array, *, lo: float, hi: float, xp: Any) -> list:
    """Conditions of a full scale read as a symmetric square root (``root=True``): finite
    entries with ``|S_ij| <= hi``; then (read once that holds, so that no ``inf - inf`` is
    formed) a diagonal of at least ``lo``, symmetric up to rounding and positive definite (a
    Cholesky factorisation succeeds). Symmetry: ``S - S^T``, antisymmetric, is at most
    :data:`ROOT_ASYMMETRY_ULPS` rounding units of the matrix's trace, tested as one
    whole-batch maximum of the difference less that bound (NumPy's reductions over a matrix's
    own short axes are several times slower); the per-matrix picture only on the error path."""
    finite = _Condition(
        name,
        in_range(x, -hi, hi, xp=xp),
        lambda: (xp.abs(x) <= hi, x),
        f"(a symmetric square root, root=True) must be finite, |S_ij| <= {hi:.3g}",
    )
    if _compat.eager_any(~finite.holds, xp=xp):
        return [finite]
    tol = ROOT_ASYMMETRY_ULPS * float(xp.finfo(x.dtype).eps)
    diag = xp.linalg.diagonal(x)
    bound = (tol * _compat.row_sum(diag, xp=xp))[..., None, None]  # (|tr S| for the message)
    excess = x - xp.matrix_transpose(x)
    excess -= bound  # (in place on this function's own temporary; JAX rebinds)
    symmetric = xp.max(excess) <= 0.0

    def asymmetry() -> tuple[Array, Array]:
        worst = xp.max(excess, axis=(-2, -1))
        return worst <= 0.0, worst + bound[..., 0, 0]

    pd = _compat.positive_definite(x, xp=xp)
    return [
        finite,
        _Condition(
            name,
            at_least(diag, lo, xp=xp, strided=True),
            lambda: (diag >= lo, diag),
            f"(a symmetric square root, root=True) must have a diagonal of at least {lo:.3g}",
        ),
        _Condition(
            name,
            symmetric,
            asymmetry,
            f"(a symmetric square root, root=True) must be symmetric: |S_ij - S_ji| at most "
            f"{tol:.3g} times the matrix's trace (the offending values are the largest "
            "differences)",
        ),
        _Condition(
            name,
            xp.all(pd),
            lambda: (pd, xp.linalg.eigvalsh(x)[..., 0]),
            "(a symmetric square root, root=True) must be positive definite: its Cholesky "
            "factorisation must succeed (the offending values are the smallest eigenvalues, "
            "positive at rounding level only where a root is numerically singular)",
        ),
    ]


def describe(x: Array, ok: Array, *, xp: Any) -> str:
    """How many entries of ``x`` break a condition, and the first of them with its index."""
    bad = ~ok
    if bad.ndim == 0:  # (one matrix's condition: an unbatched argument)
        return f"got {float(x)!r}"
    n_bad = int(xp.sum(xp.astype(bad, xp.int64)))
    first = tuple(int(i[0]) for i in xp.nonzero(bad))
    value = float(x[first]) if first else float("nan")
    size = math.prod(tuple(bad.shape))
    return f"got {n_bad} offending entries of {size}, the first {value!r} at index {first}"


_SWITCH_HINT = (
    "(value checks can be turned off with `tr_projections.set_checks(False)` or "
    "`with tr_projections.checks(False):`)"
)


def check_gaussian_values(
    arrays: dict[str, Array], *, full: bool, dtype: Any, xp: Any, roots: bool = False
) -> None:
    """Value checks of ``mean``/``old_mean`` (finite) and ``scale``/``old_scale`` (between the
    :func:`scale_limits` of ``dtype``; full factors also lower triangular, or with ``roots``
    symmetric positive definite), on the arrays as passed (before broadcasting). A few
    reductions and one synchronisation when all is well; arrays whose values cannot be read
    (tracers of ``jit``, tensors under ``torch.compile``) are skipped, and those of an eager
    JAX transform (``grad``, ``vmap``) or of ``torch.func`` transforms are read
    (:func:`._compat.readable`). Concrete JAX arrays
    evaluate every condition in one compiled program
    (:func:`tr_projections.backends.jax.values_hold`) and go through the conditions one by one
    only on the error path, to name the first offending entry."""
    plan = _plan(arrays, full=full, dtype=dtype, xp=xp, roots=roots)
    if not plan:
        return
    if _compat.is_jax(xp):
        from .backends import jax as adapter

        kinds = tuple((kind, lo, hi) for _, _, kind, lo, hi in plan)
        if adapter.values_hold(kinds, tuple(x for _, x, *_ in plan)):
            return  # (False: the error path below; None: the conditions op by op)
    found = _found(plan, xp=xp)
    if not found or not _compat.eager_any(~_every(found, xp=xp), xp=xp):
        return
    for c in found:  # the error path: find the first broken condition and describe it
        ok, source = c.mask()
        if not bool(xp.all(ok)):
            raise ValueError(
                f"`{c.name}` {c.expected}; {describe(source, ok, xp=xp)} {_SWITCH_HINT}"
            )
    raise AssertionError("a value check failed but no condition reports it")  # pragma: no cover


def _plan(
    arrays: dict[str, Array], *, full: bool, dtype: Any, xp: Any, roots: bool
) -> list[tuple[str, Array, str, float, float]]:
    """``(name, array, kind, lo, hi)`` of each argument whose values can be read (see
    :func:`_conditions`): its own limits where it is of a narrower dtype than ``dtype``."""
    lo, hi = scale_limits(dtype, xp=xp)
    plan = []
    for name, x in arrays.items():
        x = _compat.readable(x, xp=xp)  # (eager jax.grad, torch.func: the values)
        if _compat._is_traced(x, xp):
            continue
        full_kind = "root" if roots else "full"
        kind = (full_kind if full else "diag") if name.endswith("scale") else "mean"
        lo_x, hi_x = lo, hi
        if x.dtype != dtype:  # a float32 argument promoted to float64: limits it can hold
            own = xp.finfo(x.dtype)
            lo_x, hi_x = max(lo, float(own.smallest_normal)), min(hi, float(own.max))
        plan.append((name, x, kind, lo_x, hi_x))
    return plan


def _found(plan: list, *, xp: Any) -> list[_Condition]:
    """The conditions of every argument of ``plan`` (:func:`_plan`), in order."""
    return [c for name, x, kind, lo, hi in plan
            for c in _conditions(name, x, kind=kind, lo=lo, hi=hi, xp=xp)]  # fmt: skip


def _every(found: list[_Condition], *, xp: Any) -> Array:
    """Whether all the conditions ``found`` hold (a 0-d boolean array, on their device; true
    for none)."""
    if not found:
        return xp.asarray(True)
    holds = found[0].holds
    for c in found[1:]:
        holds = holds & c.holds
    return holds


def all_hold(kinds: tuple, arrays: tuple, *, xp: Any) -> Array:
    """Whether every value condition of ``arrays`` holds, as one 0-d boolean array: the
    conditions of :func:`_conditions` for ``kinds`` (``(kind, lo, hi)`` per array) and nothing
    read from the arrays, so that it traces (the body of
    :func:`tr_projections.backends.jax.values_hold`'s program, whose key holds no names: the
    messages are the error path's; a symmetric root's conditions past its finiteness are then
    formed whatever it holds, and a false result sends the caller to the error path, which
    forms them in order)."""
    plan = [(f"x{i}", x, kind, lo, hi)
            for i, ((kind, lo, hi), x) in enumerate(zip(kinds, arrays, strict=True))]  # fmt: skip
    return _every(_found(plan, xp=xp), xp=xp)
