r"""Invariant checks for trust-region projections, against dense float64 NumPy references.

Each ``check_*`` function raises ``AssertionError`` with a readable message when a guarantee is
broken and returns what it measured (so a test suite can report worst cases). Reference
quantities are computed here from scratch with dense NumPy linear algebra, independent of the
library's own code paths. Tolerances depend on the dtype of the arrays under test and live in one
place, :data:`TOLERANCES`.

The guarantees (for a projection ``out = P(new, old)`` with bounds ``eps_mean``, ``eps_cov``):

* **bounds**: each part of ``d(out, old)`` is at most its bound;
* **unchanged inside**: a part already inside its bound comes back bit for bit;
* **interpolation**: each part of ``out`` is ``tau * new + (1 - tau) * old`` in the method's chart
  (mean; covariance, root or precision) with one ``tau`` in (0, 1]; projected parts lie on the
  boundary;
* **batch consistency**: a batch equals its rows projected one at a time (broadcasting a
  state-independent old policy against tiling it is the same comparison: pass the tiled
  arrays' outputs as ``out``);
* **metadata**: outputs keep the input's library, dtype, device and shapes;
* **no mutation**: inputs are unchanged after the call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "TOLERANCES",
    "Tolerance",
    "chart",
    "check_batch_consistency",
    "check_bounds",
    "check_interpolation",
    "check_metadata",
    "check_not_mutated",
    "check_unchanged_inside",
    "reference_distances",
    "tolerance",
]


@dataclass(frozen=True)
class Tolerance:
    """Relative tolerances for one dtype.

    bound
        a part may exceed its bound by ``bound * eps``;
    boundary
        a projected part must be within ``boundary * eps`` of its bound;
    chart
        residual of the one-weight interpolation, relative to the chart's size;
    batch
        batch versus row-by-row (and broadcast versus tiled) results, relative to the values;
    margin
        parts within ``margin * eps`` of their bound are not classified as inside or outside
        (rounding in the working dtype may decide either way; both answers are valid).
    """

    bound: float
    boundary: float
    chart: float
    batch: float
    margin: float


#: The one place where tolerances by dtype are stated.
TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(bound=1e-9, boundary=1e-9, chart=1e-9, batch=1e-10, margin=1e-7),
    "float32": Tolerance(bound=1e-3, boundary=1e-3, chart=1e-3, batch=1e-4, margin=1e-2),
}


def tolerance(dtype: Any) -> Tolerance:
    """The :class:`Tolerance` for a dtype of any library (matched by name): a dtype object
    (``np.dtype``, ``torch.float32``, array-api-strict's), a scalar type (``np.float64``,
    ``jnp.float32``) or a name (``"float32"``)."""
    try:  # (NumPy's and JAX's scalar types, NumPy dtypes and names)
        name = np.dtype(dtype).name
    except (TypeError, ValueError):
        name = str(dtype).rsplit(".", 1)[-1]
    if name not in TOLERANCES:
        raise ValueError(f"no tolerance stated for dtype {dtype!r}; known: {sorted(TOLERANCES)}")
    return TOLERANCES[name]


def _np(x: Any) -> np.ndarray:
    """A float64 NumPy copy of an array of any library."""
    if hasattr(x, "detach"):  # torch
        x = x.detach().cpu()
    if type(x).__module__.startswith("cupy"):
        x = x.get()
    return np.array(np.asarray(x), dtype=np.float64, copy=True)


# --------------------------------------------------------------------------- dense references


class Dense(NamedTuple):
    mean: np.ndarray
    cov: np.ndarray  # full (..., d, d) covariance matrices


def _dense(mean: Any, scale: Any, full: bool) -> Dense:
    """Mean and covariance of a Gaussian given by its (checked) scale: an ``AssertionError``
    where ``scale`` is not a lower Cholesky factor with a positive diagonal (``full``) or
    positive standard deviations, since its covariance would hide that (a negated factor, or
    entries above the diagonal, give a valid-looking covariance)."""
    m, s = _np(mean), _np(scale)
    if full:
        upper = np.triu(s, 1)
        assert not np.any(upper), (
            f"scale is not lower triangular: {int(np.count_nonzero(upper))} entries above "
            f"the diagonal, the largest {np.max(np.abs(upper)):.3e} in magnitude"
        )
        diag = np.diagonal(s, axis1=-2, axis2=-1)
        assert np.all(diag > 0), (
            f"scale is not a Cholesky factor: {int(np.sum(~(diag > 0)))} diagonal entries "
            f"not positive (smallest {np.min(diag, initial=np.inf):.3e})"
        )
        return Dense(m, s @ np.swapaxes(s, -1, -2))
    assert np.all(s > 0), (
        f"scale holds {int(np.sum(~(s > 0)))} standard deviations that are not positive "
        f"(smallest {np.min(s, initial=np.inf):.3e})"
    )
    return Dense(m, np.eye(s.shape[-1]) * (s * s)[..., None, :])


def _sqrtm(c: np.ndarray) -> np.ndarray:
    w, u = np.linalg.eigh(c)
    return (u * np.sqrt(np.clip(w, 0, None))[..., None, :]) @ np.swapaxes(u, -1, -2)


def _broadcast_pair(a: Dense, b: Dense) -> tuple[Dense, Dense]:
    d = a.mean.shape[-1]
    batch = np.broadcast_shapes(
        a.mean.shape[:-1], a.cov.shape[:-2], b.mean.shape[:-1], b.cov.shape[:-2]
    )

    def bc(x: Dense) -> Dense:
        return Dense(np.broadcast_to(x.mean, batch + (d,)), np.broadcast_to(x.cov, batch + (d, d)))

    return bc(a), bc(b)


def reference_distances(
    method: str,
    new: Sequence[Any],
    old: Sequence[Any],
    *,
    full: bool,
    scale_prec: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    r"""Dense float64 ``(mean_part, cov_part)`` of ``d(new, old)`` for ``method``.

    KL: :math:`\tfrac12\delta^\top\Sigma_o^{-1}\delta` and
    :math:`\tfrac12\sum_i(y_i - \log(1+y_i))`, :math:`y` the eigenvalues of
    :math:`M M^\top - I` with :math:`M = L_o^{-1} L` (the textbook trace/log-det formula, rewritten
    so it stays accurate for tiny divergences). Frobenius: Mahalanobis (or Euclidean) and
    :math:`\|\Sigma-\Sigma_o\|_F^2`. Wasserstein: as Frobenius for the mean and
    :math:`\|S_o^{-1}(S-S_o)\|_F^2` (or :math:`\|S-S_o\|_F^2`) with symmetric roots.
    """
    a, b = _broadcast_pair(_dense(*new, full), _dense(*old, full))
    d = a.mean.shape[-1]
    delta = a.mean - b.mean
    maha = np.sum(delta * np.linalg.solve(b.cov, delta[..., None])[..., 0], axis=-1)
    if method == "kl":
        Lo = np.linalg.cholesky(b.cov)
        M = np.linalg.solve(Lo, np.linalg.cholesky(a.cov))
        MMt = M @ np.swapaxes(M, -1, -2)
        # Near 1 the shifted eigenvalues y keep their accuracy; far below 1 (a new covariance
        # much narrower than the old one) the unshifted ones z do. Both come in ascending order.
        y = np.linalg.eigvalsh(MMt - np.eye(d))
        z = np.linalg.eigvalsh(MMt)
        with np.errstate(divide="ignore", invalid="ignore"):
            far = (z - 1.0) - np.log(np.where(z > 0, z, 1.0))
            terms = np.where(z < 0.5, far, y - np.log1p(np.maximum(y, -0.5)))
        return 0.5 * maha, 0.5 * np.sum(terms, axis=-1)
    mean_part = maha if scale_prec else np.sum(delta * delta, axis=-1)
    if method == "frobenius":
        return mean_part, np.sum((a.cov - b.cov) ** 2, axis=(-2, -1))
    if method == "wasserstein":
        S, So = _sqrtm(a.cov), _sqrtm(b.cov)
        diff = S - So
        if scale_prec:
            diff = np.linalg.solve(So, diff)
        return mean_part, np.sum(diff * diff, axis=(-2, -1))
    raise ValueError(f"unknown method {method!r}")


def chart(method: str, mean: Any, scale: Any, *, full: bool) -> tuple[np.ndarray, np.ndarray]:
    """The coordinates each part of ``method`` interpolates: the mean, and the covariance
    (Frobenius), its symmetric root (Wasserstein) or its inverse, the precision (KL)."""
    g = _dense(mean, scale, full)
    if method == "frobenius":
        return g.mean, g.cov
    if method == "wasserstein":
        return g.mean, _sqrtm(g.cov)
    if method == "kl":
        return g.mean, np.linalg.inv(g.cov)
    raise ValueError(f"unknown method {method!r}")


# --------------------------------------------------------------------------- checks


class BoundReport(NamedTuple):
    """Worst relative excess ``part / eps - 1`` of each part (negative: strictly inside)."""

    mean_excess: float
    cov_excess: float


def _eps(eps: Any, shape: tuple[int, ...]) -> np.ndarray:
    return np.broadcast_to(_np(eps), shape)


def check_bounds(
    method: str,
    out: Sequence[Any],
    old: Sequence[Any],
    *,
    full: bool,
    eps_mean: Any,
    eps_cov: Any,
    dtype: Any,
    scale_prec: bool = True,
) -> BoundReport:
    """Each part of ``d(out, old)`` is at most its bound, within ``tolerance(dtype).bound``."""
    tol = tolerance(dtype)
    m, c = reference_distances(method, out, old, full=full, scale_prec=scale_prec)
    em, ec = _eps(eps_mean, m.shape), _eps(eps_cov, c.shape)
    for name, part, e in (("mean", m, em), ("cov", c, ec)):
        assert np.all(np.isfinite(part)), f"{method}: non-finite {name} part after projection"
        worst = np.max(part / e - 1.0, initial=-1.0)
        assert worst <= tol.bound, (
            f"{method}: {name} part exceeds its bound by {worst:.3e} (relative), "
            f"tolerance {tol.bound:.1e} for {dtype}"
        )
    return BoundReport(
        float(np.max(m / em - 1.0, initial=-1.0)), float(np.max(c / ec - 1.0, initial=-1.0))
    )


def _parts_inside(
    method: str, new: Sequence[Any], old: Sequence[Any], eps_mean: Any, eps_cov: Any, **kw: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    m, c = reference_distances(method, new, old, **kw)
    return m, c, _eps(eps_mean, m.shape), _eps(eps_cov, c.shape), m.shape, c.shape


def check_unchanged_inside(
    method: str,
    new: Sequence[Any],
    old: Sequence[Any],
    out: Sequence[Any],
    *,
    full: bool,
    eps_mean: Any,
    eps_cov: Any,
    dtype: Any,
    scale_prec: bool = True,
) -> int:
    """Parts already inside their bound (by a margin) come back bit for bit.

    Returns the number of (state, part) pairs checked.
    """
    tol = tolerance(dtype)
    m, c, em, ec, _, _ = _parts_inside(
        method, new, old, eps_mean, eps_cov, full=full, scale_prec=scale_prec
    )
    event = 2 if full else 1
    checked = 0
    for name, part, e, x_new, x_out, ev in (
        ("mean", m, em, new[0], out[0], 1),
        ("scale", c, ec, new[1], out[1], event),
    ):
        inside = part <= e * (1.0 - tol.margin)
        a = np.broadcast_to(_np(x_new), part.shape + _np(x_out).shape[-ev:])
        b = _np(x_out)
        same = np.all(a == b, axis=tuple(range(-ev, 0)))
        bad = inside & ~same
        assert not np.any(bad), (
            f"{method}: {int(bad.sum())} state(s) with {name} part inside the bound were changed"
        )
        checked += int(inside.sum())
    return checked


class InterpolationReport(NamedTuple):
    tau_mean: np.ndarray
    tau_cov: np.ndarray
    worst_residual: float
    worst_boundary: float


def _fit_tau(x: np.ndarray, x_old: np.ndarray, x_out: np.ndarray, ev: int):
    axes = tuple(range(-ev, 0))
    step = x - x_old
    moved = x_out - x_old
    denom = np.sum(step * step, axis=axes)
    safe = np.where(denom > 0, denom, 1.0)
    tau = np.where(denom > 0, np.sum(moved * step, axis=axes) / safe, 1.0)
    t = tau.reshape(tau.shape + (1,) * ev)
    resid = np.sqrt(np.sum((moved - t * step) ** 2, axis=axes))
    size = np.sqrt(np.sum(x * x, axis=axes)) + np.sqrt(np.sum(x_old * x_old, axis=axes))
    # (new and old both zero, e.g. zero-initialised means: the output must be zero exactly)
    zero = size == 0
    rel = np.where(zero, np.where(resid == 0, 0.0, np.inf), resid / np.where(zero, 1.0, size))
    return tau, rel


def check_interpolation(
    method: str,
    new: Sequence[Any],
    old: Sequence[Any],
    out: Sequence[Any],
    *,
    full: bool,
    eps_mean: Any,
    eps_cov: Any,
    dtype: Any,
    scale_prec: bool = True,
) -> InterpolationReport:
    """Each part of ``out`` is ``tau * new + (1 - tau) * old`` in the method's chart, with one
    ``tau`` in (0, 1] per state; parts that were outside their bound end on the boundary.

    ``tau`` is fitted by least squares in float64 and the residual is measured relative to the
    size of the chart coordinates.
    """
    tol = tolerance(dtype)
    kw = {"full": full}
    x = chart(method, *new, **kw)
    xo = chart(method, *old, **kw)
    xt = chart(method, *out, **kw)
    m, c, em, ec, _, _ = _parts_inside(
        method, new, old, eps_mean, eps_cov, full=full, scale_prec=scale_prec
    )
    m_out, c_out = reference_distances(method, out, old, full=full, scale_prec=scale_prec)
    taus, worst_res, worst_bd = [], 0.0, 0.0
    for name, i, ev, part, e, part_out in (
        ("mean", 0, 1, m, em, m_out),
        ("cov", 1, 2, c, ec, c_out),
    ):
        shape = part.shape
        xi = np.broadcast_to(x[i], shape + x[i].shape[-ev:])
        xoi = np.broadcast_to(xo[i], shape + xo[i].shape[-ev:])
        tau, res = _fit_tau(xi, xoi, xt[i], ev)
        worst_res = max(worst_res, float(np.max(res, initial=0.0)))
        assert np.all(res <= tol.chart), (
            f"{method}: {name} part is not a one-weight interpolation in its chart "
            f"(relative residual {np.max(res):.3e} > {tol.chart:.1e})"
        )
        moved = part > 0
        assert np.all((tau[moved] > 0) & (tau[moved] <= 1.0 + tol.chart)), (
            f"{method}: {name} weight outside (0, 1]: min {np.min(tau[moved], initial=1):.3e}, "
            f"max {np.max(tau[moved], initial=0):.3e}"
        )
        outside = part > e * (1.0 + tol.margin)
        if np.any(outside):
            gap = np.abs(part_out[outside] / e[outside] - 1.0)
            worst_bd = max(worst_bd, float(np.max(gap)))
            assert np.all(gap <= tol.boundary), (
                f"{method}: projected {name} part is {np.max(gap):.3e} (relative) away from "
                f"its bound, tolerance {tol.boundary:.1e}"
            )
        taus.append(tau)
    return InterpolationReport(taus[0], taus[1], worst_res, worst_bd)


def check_batch_consistency(
    project: Callable[..., Any],
    args: Sequence[Any],
    out: Sequence[Any],
    *,
    full: bool,
    dtype: Any,
    take: Callable[[Any, int], Any],
    **kwargs: Any,
) -> float:
    """Projecting each row of a 1-D batch alone gives the batched result.

    ``args`` are the four arrays (already broadcast to one batch axis); ``take(x, i)`` picks row
    ``i`` of an array of the library under test; ``kwargs`` go to ``project``. Returns the worst
    relative difference.
    """
    tol = tolerance(dtype)
    n = _np(out[0]).shape[0]
    worst = 0.0
    for i in range(n):
        row = project(*(take(a, i) for a in args), **kwargs)
        for name, a, b in (("mean", row[0], take(out[0], i)), ("scale", row[1], take(out[1], i))):
            a, b = _np(a), _np(b)
            err = float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))
            worst = max(worst, err)
            assert err <= tol.batch, (
                f"row {i}: {name} projected alone differs from the batch by {err:.3e} "
                f"(relative) > {tol.batch:.1e}"
            )
    return worst


def check_metadata(out: Sequence[Any], like: Any, *, shapes: Sequence[tuple[int, ...]]) -> None:
    """Outputs are arrays of ``like``'s library, dtype and device with the given shapes."""
    import array_api_compat as aac

    xp = aac.array_namespace(like)
    for name, x, shape in zip(("mean", "scale"), out, shapes, strict=True):
        # (the library, not the exact type: a torch.nn.Parameter in gives plain tensors out)
        assert aac.is_array_api_obj(x) and aac.array_namespace(x) is xp, (
            f"{name}: {type(x).__module__}.{type(x).__name__}, expected an array of "
            f"{type(like).__module__}'s library"
        )
        assert x.dtype == like.dtype, f"{name}: dtype {x.dtype}, expected {like.dtype}"
        assert aac.device(x) == aac.device(like), f"{name}: device {aac.device(x)}"
        assert tuple(x.shape) == tuple(shape), f"{name}: shape {tuple(x.shape)}, expected {shape}"


def check_not_mutated(before: Sequence[np.ndarray], after: Sequence[Any]) -> None:
    """Arrays equal (bit for bit, NaNs equal) the float64 snapshots taken before the call."""
    for i, (b, a) in enumerate(zip(before, after, strict=True)):
        a = _np(a)
        assert a.shape == b.shape and np.array_equal(a, b, equal_nan=True), (
            f"input {i} was modified by the call"
        )
