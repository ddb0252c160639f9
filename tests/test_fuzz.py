"""Fuzz campaign: arbitrary calls either raise ValueError/TypeError or return finite outputs
that satisfy their bounds.

Hypothesis draws whole calls: the function (every projection, ``project`` with known and unknown
methods, every distance), shapes (including mismatched ones, zero-size batches, d = 0), dtypes
(float32, float64, integers, bool, complex, float16), values (valid policies from std 1e-4 to 1e3
with condition numbers up to 1e6, corrupted with NaN, ±inf, zeros, negatives, huge and tiny
numbers, entries above a Cholesky diagonal) and bounds (floats including 0, negative, NaN, inf,
tiny and huge ones, NumPy scalars, arrays of good and wrong shapes, dtypes and values, and things
that are not numbers). Then:

* a ``ValueError`` or ``TypeError`` is a valid answer (the message must name an argument);
* any other exception is a failure;
* a projection that returns must return finite arrays of the broadcast shapes, library and dtype,
  and its two parts must be within their bounds (float64 reference, the dtype's tolerance);
* a distance that returns must return non-negative, non-NaN arrays of the batch shape.

Documented allowances (docs/robustness.md), each counted in the pytest summary rather than
failed: an excess within the rounding margin of the dtype around the output (bounds below the
dtype's resolution), and failures on inputs outside the supported domain (``out_of_domain``).

Profiles: CI runs ``TRP_FUZZ_EXAMPLES`` examples per backend (default 500, derandomized, on
``TRP_FUZZ_BACKENDS``, default numpy and torch). The long campaign is the same test with e.g.
``TRP_FUZZ_EXAMPLES=20000 TRP_FUZZ_SEED=random``.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from typing import Any, NamedTuple

import numpy as np
import pytest
from _report import count, record
from _robust_refs import reference_parts, rounding_margins
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tr_projections as trp
from tr_projections.testing import available_backends, get_backend
from tr_projections.testing.invariants import tolerance
from tr_projections.testing.strategies import cholesky_factors, random_orthogonal

EXAMPLES = int(os.environ.get("TRP_FUZZ_EXAMPLES", "500"))
DERANDOMIZE = os.environ.get("TRP_FUZZ_SEED", "fixed") != "random"
FUZZ_BACKENDS = available_backends(os.environ.get("TRP_FUZZ_BACKENDS", "numpy,torch"))

METHODS = sorted(trp.METHODS)
PROJECTIONS = ("project_kl", "project_frobenius", "project_wasserstein", "project")
DISTANCES = ("kl", "frobenius", "wasserstein")
SPECIALS = (
    math.nan, math.inf, -math.inf, 0.0, -0.0, -1.0, -1e-3, 1e-30, 1e30, 1e-300, 1e300,
    5e-324, 1.7e308, 1e-45, 3e38, 1e-20, 1e20, 1e-160, 1e160,
)  # fmt: skip
ODD_DTYPES = ("int32", "int64", "bool", "complex64", "complex128", "float16")
#: What a refusal's message must contain: the name of an argument (or of the method/option).
#: The first call that raised each kind of warning (reported by the long campaign).
WARNED: dict[str, str] = {}
NAMED = re.compile(r"`(mean|scale|old_mean|old_scale|eps_mean|eps_cov|method)`|scale_prec")


class Call(NamedTuple):
    """One drawn call, as NumPy data plus what to convert it to."""

    fn: str
    method: Any
    options: dict
    arrays: list  # four NumPy arrays (any dtype), before conversion to the backend
    eps: list  # two bounds: numbers, NumPy arrays (converted) or junk objects
    full: bool
    note: str  # what was drawn, for the failure message


def _shape_variant(draw, batch: tuple[int, ...]) -> tuple[int, ...]:
    how = draw(st.sampled_from(["same"] * 6 + ["suffix", "ones", "wrong"]))
    if how == "same" or (not batch and how != "wrong"):
        return batch
    if how == "suffix":
        return batch[draw(st.integers(0, len(batch))) :]
    if how == "ones":
        return tuple(1 if draw(st.booleans()) else n for n in batch)
    return tuple(draw(st.lists(st.sampled_from([0, 1, 2, 3, 5]), max_size=3)))


def _valid_values(draw, shapes: list, d: int, full: bool, dtype: str, rng) -> list:
    """A valid new/old pair in the shapes drawn (before corruption), from std 1e-4 to 1e3."""
    f32 = dtype == "float32"
    center = draw(st.floats(math.log(1e-4), math.log(1e3)))
    spread = draw(st.sampled_from([0.0, 0.5, 2.0]))
    step = draw(st.sampled_from([0.0, 1e-6, 1e-3, 0.1, 1.0, 3.0, 8.0, 16.0]))  # 16: ratio 1e7
    mean_step = draw(st.sampled_from([0.0, 1e-4, 1.0, 10.0, 1e3]))
    max_cond = 1e3 if f32 else 1e6
    cond = draw(st.sampled_from([1.0, 10.0, max_cond]))
    sm, ss, som, sos = shapes

    def stds(shape):
        return np.exp(center + spread * rng.uniform(-0.5, 0.5, size=shape))

    def chol(shape):
        return cholesky_factors(rng, shape, d, cond=cond, center=2 * center)

    old_mean = np.exp(center) * rng.standard_normal(som)
    if full:
        old_scale = chol(sos[:-2])
        new_scale_base = chol(ss[:-2]) if step > 3 else None
        try:
            lo = np.broadcast_to(old_scale, ss)
            q = random_orthogonal(rng, ss[:-2], d)
            w = np.exp(step * rng.uniform(-1, 1, size=ss[:-1]))
            cov = lo @ ((q * w[..., None, :]) @ np.swapaxes(q, -1, -2)) @ np.swapaxes(lo, -1, -2)
            scale = np.linalg.cholesky(0.5 * (cov + np.swapaxes(cov, -1, -2)))
        except (ValueError, np.linalg.LinAlgError):
            scale = new_scale_base if new_scale_base is not None else chol(ss[:-2])
        lo_m = np.broadcast_to(old_scale, sos) if sos[:-2] == sm[:-1] else None
        z = rng.standard_normal(sm)
        mean = (
            np.broadcast_to(old_mean, sm) + mean_step * (lo_m @ z[..., None])[..., 0]
            if lo_m is not None and som[:-1] == sm[:-1]
            else mean_step * np.exp(center) * z
        )
    else:
        old_scale = stds(sos)
        try:
            scale = np.broadcast_to(old_scale, ss) * np.exp(step * rng.uniform(-1, 1, size=ss))
        except ValueError:
            scale = stds(ss)
        mean = np.exp(center) * mean_step * rng.standard_normal(sm)
        if som == sm:
            mean = mean + old_mean
    return [np.array(mean), np.array(scale), np.array(old_mean), np.array(old_scale)]


def _corrupt(draw, arrays: list, full: bool, rng) -> list[str]:
    notes = []
    for _ in range(draw(st.sampled_from([0] * 12 + [1, 1, 2, 3]))):
        i = draw(st.integers(0, 3))
        x = arrays[i]
        if x.size == 0:
            continue
        how = draw(st.sampled_from(["special"] * 4 + ["negate", "upper"]))
        idx = tuple(int(rng.integers(0, n)) for n in x.shape)
        if how == "upper" and full and i % 2 == 1 and x.ndim >= 2 and x.shape[-1] > 1:
            idx = idx[:-2] + (0, x.shape[-1] - 1)
            value = draw(st.sampled_from([1.0, -1e-30, 1e10]))
        elif how == "negate":
            value = -float(x[idx])
        else:
            value = draw(st.sampled_from(SPECIALS))
        arrays[i] = x.copy()
        arrays[i][idx] = value
        notes.append(f"arg{i}{idx}={value!r}")
    return notes


def _bound(draw, batch: tuple[int, ...], rng) -> Any:
    kind = draw(st.sampled_from(["float"] * 12 + ["special", "array", "array", "junk", "np"]))
    if kind == "float":
        return 10.0 ** draw(st.floats(-10.0, 3.0))
    if kind == "special":
        return draw(st.sampled_from([*SPECIALS, 1, 0, 1e-40, 1e39]))
    if kind == "np":
        return draw(st.sampled_from([np.float32(0.01), np.float64(1e-3), np.int64(1)]))
    if kind == "junk":
        return draw(st.sampled_from([None, "0.1", True, 0.1j, [0.1], object()]))
    shape = _shape_variant(draw, batch)
    values = 10.0 ** rng.uniform(-8, 2, size=shape)
    if values.size and draw(st.booleans()) and draw(st.booleans()):
        values.flat[int(rng.integers(0, values.size))] = draw(st.sampled_from(SPECIALS))
    dtype = draw(st.sampled_from(["float64"] * 4 + ["float32", "int64", "bool"]))
    with np.errstate(all="ignore"):
        return values.astype(dtype)


def call_method(fn: str, method: Any) -> str:
    return method if fn == "project" else fn.removeprefix("project_")


def _relative_bounds(method: str, arrays: list, batch, options: dict, rng) -> list | None:
    """Per-state bounds at the drawn pair's own distances divided by 10^U(-1, 4)."""
    if method not in METHODS or any(a.dtype.kind != "f" for a in arrays):
        return None
    m, s = tuple(arrays[0].shape), tuple(arrays[1].shape)
    if not m or m[-1] == 0:
        return None
    full = s != m and len(s) >= 2 and s[-2:] == (m[-1],) * 2
    try:
        with np.errstate(all="ignore"):
            parts = reference_parts(
                method, arrays[:2], arrays[2:], full=full,
                scale_prec=options.get("scale_prec", True),
            )  # fmt: skip
            out = []
            for part in parts:
                part = np.broadcast_to(part, batch)
                e = part / 10.0 ** rng.uniform(-1.0, 4.0, size=batch)
                if not (np.all(np.isfinite(e)) and np.all(e > 0)):
                    return None
                out.append(np.array(e))
    except Exception:  # shapes or values the call itself will refuse
        return None
    return out


@st.composite
def calls(draw) -> Call:
    fn = draw(st.sampled_from(PROJECTIONS * 2 + DISTANCES))
    method = None
    options: dict = {}
    if fn == "project":
        method = draw(st.sampled_from(METHODS * 4 + ["hellinger", None, "KL"]))
    if fn in ("project_frobenius", "project_wasserstein", "frobenius", "wasserstein") or (
        method in ("frobenius", "wasserstein")
    ):
        if draw(st.booleans()):
            options["scale_prec"] = draw(st.booleans())
    elif fn in ("project_kl", "project") and draw(st.integers(0, 9)) == 0:
        options["scale_prec"] = False  # not an option of the KL projection: a TypeError
    full = draw(st.booleans())
    d = draw(st.sampled_from([1, 1, 2, 2, 3, 3, 4, 6, 8, 0]))
    batch = tuple(draw(st.lists(st.sampled_from([1, 2, 3, 3, 4, 0]), max_size=2)))
    event_m, event_s = (d,), ((d, d) if full else (d,))
    shapes = [
        _shape_variant(draw, batch) + event_m,
        _shape_variant(draw, batch) + event_s,
        _shape_variant(draw, batch) + event_m,
        _shape_variant(draw, batch) + event_s,
    ]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    dtype = draw(st.sampled_from(["float32", "float64"]))
    notes = [f"{fn}({method or ''}) {'full' if full else 'diag'} d={d} {dtype}"]
    try:
        with np.errstate(all="ignore"):
            arrays = _valid_values(draw, shapes, d, full, dtype, rng)
    except (ValueError, np.linalg.LinAlgError):  # shapes that cannot even be built as valid
        arrays = [rng.uniform(0.5, 2.0, size=s) for s in shapes]
    notes += _corrupt(draw, arrays, full, rng)
    if draw(st.integers(0, 19)) == 0:  # a wrong event shape somewhere
        i = draw(st.integers(0, 3))
        arrays[i] = rng.uniform(0.5, 2.0, size=draw(st.sampled_from([(), (d + 1,), (d, d + 1)])))
        notes.append(f"arg{i} shape {arrays[i].shape}")
    dtypes = [dtype] * 4
    for i in range(4):
        if draw(st.integers(0, 29)) == 0:
            dtypes[i] = draw(st.sampled_from(["float32", "float64", *ODD_DTYPES]))
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        arrays = [a.astype(t) for a, t in zip(arrays, dtypes, strict=True)]
    if dtypes != [dtype] * 4:
        notes.append(f"dtypes {dtypes}")
    eps = [_bound(draw, batch, rng), _bound(draw, batch, rng)]
    if draw(st.integers(0, 3)) == 0:  # bounds relative to the distances: violations up to 1e4
        relative = _relative_bounds(call_method(fn, method), arrays, batch, options, rng)
        if relative is not None:
            eps = relative
    notes.append(f"eps {[e if np.ndim(e) == 0 else f'array{np.shape(e)}' for e in eps]!r}")
    return Call(fn, method, options, arrays, eps, full, "; ".join(notes))


def _convert(backend, call: Call) -> tuple[list, list] | None:
    try:
        arrays = [backend.asarray(a) for a in call.arrays]
    except (TypeError, ValueError, RuntimeError):  # a dtype this library does not have
        return None
    eps = [backend.asarray(e) if isinstance(e, np.ndarray) else e for e in call.eps]
    return arrays, eps


def _run(call: Call, arrays: list, eps: list):
    if call.fn in DISTANCES:
        return getattr(trp, call.fn)(*arrays, **call.options)
    kw = {"eps_mean": eps[0], "eps_cov": eps[1], **call.options}
    if call.fn == "project":
        return trp.project(*arrays, method=call.method, **kw)
    return getattr(trp, call.fn)(*arrays, **kw)


def _expected_shapes(call: Call) -> tuple[tuple[int, ...], int, bool]:
    """Batch shape, d and kind the library must read from the arrays (the kind rule of
    ``tr_projections.gaussian.is_full``: a scale shaped like the mean is diagonal)."""
    m, s, om, os_ = (tuple(np.shape(a)) for a in call.arrays)
    d = m[-1]
    full = s != m and len(s) >= 2 and s[-2:] == (d, d)
    ev = 2 if full else 1
    return np.broadcast_shapes(m[:-1], s[:-ev], om[:-1], os_[:-ev]), d, full


#: The supported domain (docs/robustness.md): standard deviations (singular values of the
#: Cholesky factors) in [1e-4, 1e3], covariance condition numbers up to 1e6 (float64) or 1e3
#: (float32), d up to 64, violations up to 1e4 times the bound, and means of magnitude up to
#: 1e6 (the issue names no range for means; distances of means near the dtype's largest
#: number overflow).
DOMAIN_STD = (1e-4, 1e3)
DOMAIN_MEAN = 1e6
DOMAIN_COND = {"float32": 1e3, "float64": 1e6}
DOMAIN_D = 64
DOMAIN_VIOLATION = 1e4
#: Out-of-domain failures: the first call of each kind (printed by the long campaign).
OUT_OF_DOMAIN: dict[str, str] = {}


def out_of_domain(call: Call, method: str, full: bool, dtype: str, bounds) -> str | None:
    """Why an accepted call lies outside the supported domain, or ``None`` if it is inside."""
    arrays = [np.asarray(a, dtype=dtype).astype(np.float64) for a in call.arrays]
    d = arrays[0].shape[-1]
    if d > DOMAIN_D:
        return f"d = {d}"
    slack = 1.0 + 1e-6
    for name, mean in (("mean", arrays[0]), ("old_mean", arrays[2])):
        if mean.size and not float(np.max(np.abs(mean))) <= DOMAIN_MEAN:
            return f"{name} of magnitude {float(np.max(np.abs(mean))):.2g}"
    for name, scale in (("scale", arrays[1]), ("old_scale", arrays[3])):
        if scale.size == 0:
            continue
        with np.errstate(all="ignore"):
            sv = np.linalg.svd(np.tril(scale), compute_uv=False) if full else np.abs(scale)
        lo, hi = float(np.min(sv)), float(np.max(sv))
        if not (DOMAIN_STD[0] / slack <= lo and hi <= DOMAIN_STD[1] * slack):
            return f"{name} stds in [{lo:.2g}, {hi:.2g}]"
        cond = float(np.max((np.max(sv, -1) / np.min(sv, -1)) ** 2)) if full else 1.0
        if cond > DOMAIN_COND[dtype] * slack:
            return f"{name} condition number {cond:.2g}"
    if bounds is not None and method in METHODS:
        scale_prec = call.options.get("scale_prec", True)
        with np.errstate(all="ignore"):
            pre = reference_parts(method, arrays[:2], arrays[2:], full=full, scale_prec=scale_prec)
        for part, e, name in zip(pre, bounds, ("eps_mean", "eps_cov"), strict=True):
            worst = float(np.max(part / e, initial=0.0))
            if not worst <= DOMAIN_VIOLATION * slack:
                return f"{name} violated {worst:.2g} times"
    return None


def _math_failure(backend, call: Call, what: str, bounds=None) -> str:
    """A failure of the math on an accepted call: an error in the supported domain, a finding
    (counted, first example kept) outside it."""
    m, s = call.arrays[0], call.arrays[1]
    dtype = str(np.result_type(*call.arrays))
    full = s.shape != m.shape and s.ndim >= 2 and s.shape[-2:] == (m.shape[-1],) * 2
    method = call_method(call.fn, call.method)
    reason = out_of_domain(call, method, full, dtype, bounds)
    assert reason is not None, f"{what}\n(inside the supported domain)\n{call.note}"
    key = f"fuzz [{backend.name}] out of domain ({reason.split(' ')[0]}): {what[:60]}"
    count(key)
    OUT_OF_DOMAIN.setdefault(key, f"{reason}; {call.note}")
    return "accepted, out of domain: " + what.split(":")[0][:40]


def check_call(backend, call: Call) -> str:
    """Run one drawn call; return how it ended ("refused (...)", "accepted: ...") or fail."""
    converted = _convert(backend, call)
    if converted is None:
        return "skipped: dtype not in this library"
    arrays, eps = converted
    try:
        with warnings.catch_warnings(record=True) as caught:
            # Floating-point warnings (NumPy's overflow in a distance that is legitimately
            # infinite, say) are recorded and reported, not failures; the outputs are judged.
            warnings.simplefilter("always")
            out = _run(call, arrays, eps)
    except (ValueError, TypeError) as err:
        if "LinAlgError" not in type(err).__name__:
            msg = str(err)
            assert NAMED.search(msg), f"a refusal that names no argument: {msg!r}\n{call.note}"
            return f"refused ({type(err).__name__}, {NAMED.search(msg).group(0)})"
        return _math_failure(backend, call, f"{type(err).__name__}: {err}")
    except Exception as err:  # torch's LinAlgError is a RuntimeError
        return _math_failure(backend, call, f"{type(err).__name__}: {err}")
    for w in caught:
        if issubclass(w.category, RuntimeWarning):
            where = f"{w.filename.rsplit('/', 1)[-1]}:{w.lineno}"
            key = f"fuzz [{backend.name}] warning: {str(w.message)[:50]} ({where})"
            count(key)
            WARNED.setdefault(key, call.note)
    method = call_method(call.fn, call.method)
    scale_prec = call.options.get("scale_prec", True)
    dtype = str(out[0].dtype).rsplit(".", 1)[-1]
    batch, d, full = _expected_shapes(call)
    out_np = [backend.to_numpy(x).astype(np.float64) for x in out]
    if call.fn in DISTANCES:
        for part in out_np:
            assert part.shape == batch, f"distance shape {part.shape} != {batch}\n{call.note}"
            if np.isnan(part).any() or not (part >= -1e-6).all():
                return _math_failure(backend, call, f"distance NaN or negative: {part.min()}")
        return "accepted: distance"
    event = (d, d) if full else (d,)
    assert out_np[0].shape == batch + (d,) and out_np[1].shape == batch + event, call.note
    assert type(out[0]) is type(arrays[0]), call.note
    bounds = []
    for e in eps:
        e = backend.to_numpy(e) if not isinstance(e, (int, float, np.generic)) else e
        bounds.append(np.broadcast_to(np.asarray(e, dtype=dtype).astype(np.float64), batch))
    for name, x in zip(("mean", "scale"), out_np, strict=True):
        if not np.isfinite(x).all():
            return _math_failure(backend, call, f"non-finite output {name}", bounds)
    old = [np.asarray(backend.to_numpy(a), dtype=dtype).astype(np.float64) for a in arrays[2:]]
    with np.errstate(all="ignore"):
        parts = reference_parts(method, out_np, old, full=full, scale_prec=scale_prec)
        margins = rounding_margins(
            method, out_np, old, *bounds, full=full, scale_prec=scale_prec, dtype=dtype
        )
    tol = tolerance(dtype).bound
    limited = False
    for part, e, margin, name in zip(parts, bounds, margins, ("eps_mean", "eps_cov"), strict=True):
        with np.errstate(all="ignore"):
            excess = part / e - 1.0
        if np.isnan(excess).any():
            return _math_failure(backend, call, f"{name}: reference distance NaN", bounds)
        worst = float(np.max(excess, initial=-1.0))
        over = excess > tol + margin
        if over.any():
            what = (
                f"{name}: bound exceeded by {float(np.max(excess[over])):.3e} (tolerance {tol}, "
                f"rounding margin {float(np.max(margin[over])):.1e})"
            )
            return _math_failure(backend, call, what, bounds)
        if worst > tol:
            limited = True
            record(f"fuzz: excess beyond tol, within rounding ({method})", dtype, worst)
        else:
            record(f"fuzz: bound excess ({method})", dtype, worst)
    if limited:
        return "accepted: projection, bound below the dtype's resolution"
    return "accepted: projection"


FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=DERANDOMIZE,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
)


@pytest.mark.parametrize("name", FUZZ_BACKENDS)
def test_fuzz(name):
    backend = get_backend(name)

    @FUZZ_SETTINGS
    @given(calls())
    def run(call):
        outcome = check_call(backend, call)
        count(f"fuzz [{name}] examples")
        count(f"fuzz [{name}] {outcome}")

    run()
