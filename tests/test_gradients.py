"""Gradients of every projection: the hand-written VJPs against central differences (float64),
across backends through :func:`tr_projections.vjp`, and at the edge cases.

The torch and JAX adapters (autodiff, ``torch.func``, ``jit``/``vmap``) are tested in
``test_gradients_torch.py`` and ``test_gradients_jax.py``, which reuse the cases built here.

Cases are drawn away from the kink: every part's distance is at least 30 % away from its bound,
so a perturbation of size ``H`` never switches a row between "projected" and "unchanged".
Full scales are perturbed on their lower triangle only (the cotangent convention: entry
``(i, j)``, ``i >= j``, is the derivative with respect to ``L[i, j]``; the upper triangle is 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tr_projections as trp

#: ``name -> (projection, its distance, options)``
METHODS: dict[str, tuple[Any, Any, dict]] = {
    "kl": (trp.project_kl, trp.kl, {}),
    "frobenius": (trp.project_frobenius, trp.frobenius, {}),
    "frobenius_euclid": (trp.project_frobenius, trp.frobenius, {"scale_prec": False}),
    "wasserstein": (trp.project_wasserstein, trp.wasserstein, {}),
    "wasserstein_unscaled": (trp.project_wasserstein, trp.wasserstein, {"scale_prec": False}),
}
KINDS = ("diag", "full")
H = 1e-6  # central-difference step, relative to the largest entry of the argument
FD_RTOL = 2e-6  # relative to the largest cotangent entry of the same argument
BACKEND_RTOL = 1e-10  # the same float64 VJP in two libraries

# ----------------------------------------------------------------------------- case generation


def random_cholesky(rng: np.random.Generator, batch: tuple, d: int, *, cond: float, scale: float):
    """Lower Cholesky factors of ``Q diag(w) Q^T``, ``w`` log-uniform in ``scale^2 [1/cond, 1]``."""
    out = np.empty(batch + (d, d))
    for idx in np.ndindex(*batch):
        Q, R = np.linalg.qr(rng.standard_normal((d, d)))
        Q = Q * np.sign(np.diag(R))
        w = scale**2 * np.exp(-rng.uniform(0.0, np.log(cond), d))
        out[idx] = np.linalg.cholesky((Q * w) @ Q.T)
    return out


@dataclass
class Case:
    """One projection call: positional arrays, keyword bounds and options, all NumPy."""

    method: str
    full: bool
    args: tuple[np.ndarray, ...]
    kwargs: dict = field(default_factory=dict)

    @property
    def fn(self):
        return METHODS[self.method][0]

    def on(self, backend) -> tuple[tuple, dict]:
        """``(args, kwargs)`` converted to ``backend`` (bound arrays too)."""
        args = tuple(backend.asarray(a) for a in self.args)
        kwargs = {
            k: backend.asarray(v) if isinstance(v, np.ndarray) else v
            for k, v in self.kwargs.items()
        }
        return args, kwargs


def bounds(dist: np.ndarray, active: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Bounds 30 % or more away from ``dist``: below it on active rows, above elsewhere."""
    below = dist * rng.uniform(0.15, 0.7, dist.shape)
    above = dist * rng.uniform(1.4, 4.0, dist.shape) + 1e-12
    return np.where(active, below, above)


def make_case(
    seed: int,
    method: str,
    full: bool,
    *,
    d: int,
    batch: tuple = (3,),
    cond: float = 30.0,
    scale: float = 1.0,
    states: str = "mixed",
) -> Case:
    """A random, well-conditioned case. ``states``: ``"mixed"`` (each part active on a random
    subset of rows), ``"active"`` or ``"inactive"`` (every part of every row)."""
    rng = np.random.default_rng(seed)
    _, distance, options = METHODS[method]
    mean = scale * rng.standard_normal(batch + (d,))
    old_mean = mean + scale * 0.5 * rng.standard_normal(batch + (d,))
    if full:
        s = random_cholesky(rng, batch, d, cond=cond, scale=scale)
        old_s = random_cholesky(rng, batch, d, cond=cond, scale=scale)
    else:
        s = scale * np.exp(rng.uniform(-0.5, 0.5) * np.log(cond) * rng.uniform(0, 1, batch + (d,)))
        old_s = scale * np.exp(rng.uniform(-0.5, 0.5, batch + (d,)) * np.log(cond) / 2)
    args = (mean, s, old_mean, old_s)
    dm, dc = (np.asarray(x) for x in distance(*args, **options))
    if states == "mixed":
        act_m, act_c = rng.uniform(size=batch) < 0.6, rng.uniform(size=batch) < 0.6
    else:
        act_m = act_c = np.full(batch, states == "active")
    kwargs = dict(options, eps_mean=bounds(dm, act_m, rng), eps_cov=bounds(dc, act_c, rng))
    return Case(method, full, args, kwargs)


def median_bounds(kwargs: dict) -> dict:
    """``kwargs`` with each per-state bound (``eps_*``) replaced by its median, a number."""
    return {k: float(np.median(v)) if k.startswith("eps") else v for k, v in kwargs.items()}


def random_cotangent(out: Any, full: bool, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed + 7919)
    outs = (out.mean, out.scale) if isinstance(out, tuple) else (out,)
    gs = [rng.standard_normal(np.shape(o)) for o in outs]
    return tuple(gs)


# ----------------------------------------------------------------------------- finite differences


def _entries(x: np.ndarray, tril_only: bool):
    for idx in np.ndindex(*x.shape):
        if tril_only and idx[-1] > idx[-2]:
            continue
        yield idx


def finite_difference_vjp(fn, args: tuple, kwargs: dict, g: tuple, tril: tuple) -> list:
    """Central differences of ``<g, fn(args)>`` with respect to every entry of every argument
    (lower triangle only where ``tril[i]``)."""

    def objective(a):
        out = fn(*a, **kwargs)
        outs = (out.mean, out.scale) if isinstance(out, tuple) else (out,)
        return sum(float(np.sum(gi * np.asarray(o))) for gi, o in zip(g, outs, strict=True))

    grads = []
    for i, x in enumerate(args):
        grad = np.zeros_like(x)
        h = H * float(np.max(np.abs(x)))
        for idx in _entries(x, tril[i]):
            plus, minus = x.copy(), x.copy()
            plus[idx] += h
            minus[idx] -= h
            a_p = args[:i] + (plus,) + args[i + 1 :]
            a_m = args[:i] + (minus,) + args[i + 1 :]
            grad[idx] = (objective(a_p) - objective(a_m)) / (2 * h)
        grads.append(grad)
    return grads


def relative_error(a: np.ndarray, b: np.ndarray, floor: float = 0.0) -> float:
    """``max |a - b|`` relative to the largest entry of ``a`` or ``b`` (at least ``floor``)."""
    diff = float(np.max(np.abs(a - b), initial=0.0))
    size = max(float(np.max(np.abs(a), initial=0.0)), float(np.max(np.abs(b), initial=0.0)), floor)
    return diff / size if size > 0 else diff


def mixed_case(method: str, full: bool, batch: tuple = (4,)) -> Case:
    """:func:`make_case` (``"mixed"``) of the first seed from 40 on whose mean and covariance
    parts each have rows outside and inside their bounds."""
    for seed in range(40, 200):
        case = make_case(seed, method, full, d=2, batch=batch)
        dm, dc = (np.asarray(x) for x in METHODS[method][1](*case.args, **METHODS[method][2]))
        act = [dm > case.kwargs["eps_mean"], dc > case.kwargs["eps_cov"]]
        if all(a.any() and not a.all() for a in act):
            return case
    raise AssertionError("no mixed case")


def bound_fd(case: Case, g: tuple, names: tuple = ("eps_mean", "eps_cov")) -> list[np.ndarray]:
    """Central differences of ``<g, projection>`` (NumPy) in each entry of the bound arrays
    ``names`` of ``case`` (bounds at least 30 % from every distance: no row crosses its bound)."""
    out = []
    for name in names:
        eps = np.asarray(case.kwargs[name], dtype=np.float64)
        grad = np.zeros_like(eps)
        for i in np.ndindex(eps.shape):
            h = H * eps[i]
            sides = []
            for sign in (1.0, -1.0):
                e = eps.copy()
                e[i] += sign * h
                o = case.fn(*case.args, **{**case.kwargs, name: e})
                sides.append(sum(float(np.sum(a * b)) for a, b in zip(g, o, strict=True)))
            grad[i] = (sides[0] - sides[1]) / (2 * h)
        out.append(grad)
    return out


def numpy_vjp(case, g):
    """Cotangents from ``trp.vjp`` on the case's NumPy arrays, for the output cotangent ``g``."""
    _, vjp_fn = trp.vjp(case.fn, *case.args, **case.kwargs)
    return list(vjp_fn(trp.Gaussian(*g)))


def assert_cotangents_close(got: list, want: list, rtol: float = BACKEND_RTOL) -> float:
    """Every cotangent within ``rtol`` of the reference, relative to its own size or, for a
    vanishing one, to the size of the others."""
    floor = 1e-3 * max(float(np.max(np.abs(w), initial=0.0)) for w in want)
    worst = 0.0
    for i, (x, w) in enumerate(zip(got, want, strict=True)):
        err = relative_error(np.asarray(x), np.asarray(w), floor)
        worst = max(worst, err)
        assert err < rtol, f"cotangent {i}: relative difference {err:.2e}"
    return worst


def assert_vjp_matches_fd(case: Case, seed: int) -> float:
    out, vjp_fn = trp.vjp(case.fn, *case.args, **case.kwargs)
    g = random_cotangent(out, case.full, seed)
    cots = vjp_fn(trp.Gaussian(*g))
    tril = (False, case.full, False, case.full)
    fd = finite_difference_vjp(case.fn, case.args, case.kwargs, g, tril)
    # An argument whose cotangent vanishes (e.g. no row projected) is compared on the scale of
    # the others: differences of a constant leave rounding noise only.
    floor = 1e-3 * max(float(np.max(np.abs(f))) for f in fd)
    worst = 0.0
    for name, c, f in zip(("mean", "scale", "old_mean", "old_scale"), cots, fd, strict=True):
        assert c.shape == f.shape and c.dtype == f.dtype, name
        if case.full and name.endswith("scale"):
            assert np.all(np.triu(c, 1) == 0), f"{name}: cotangent not lower triangular"
        err = relative_error(c, f, floor)
        worst = max(worst, err)
        assert err < FD_RTOL, f"{name}: relative error {err:.2e} against central differences"
    return worst


# ----------------------------------------------------------------------------- VJP vs FD


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", list(METHODS))
@given(seed=st.integers(0, 2**31 - 1), d=st.sampled_from([1, 2, 3, 5]), n=st.integers(1, 3))
def test_vjp_matches_central_differences(method, kind, seed, d, n):
    case = make_case(seed, method, kind == "full", d=d, batch=(n,))
    assert_vjp_matches_fd(case, seed)


@pytest.mark.parametrize("states", ["active", "inactive"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", list(METHODS))
def test_vjp_matches_central_differences_all_rows(method, kind, states):
    case = make_case(3, method, kind == "full", d=3, batch=(2,), states=states)
    assert_vjp_matches_fd(case, 3)


@pytest.mark.parametrize("equality", [False, True])
@pytest.mark.parametrize("kind", KINDS)
@given(seed=st.integers(0, 2**31 - 1), d=st.sampled_from([1, 2, 3, 5]))
def test_entropy_vjp_matches_central_differences(kind, equality, seed, d):
    rng = np.random.default_rng(seed)
    full = kind == "full"
    scale = (
        random_cholesky(rng, (4,), d, cond=30.0, scale=1.0) if full else rng.uniform(0.2, 3, (4, d))
    )
    H_ = np.asarray(trp.entropy(scale))
    # rows alternately below and above the bound, each at least 0.2 nats away from it
    beta = H_ + np.where(np.arange(4) % 2 == 0, 1.0, -1.0) * rng.uniform(0.2, 1.0, 4)
    out, vjp_fn = trp.vjp(trp.project_entropy, scale, beta, equality=equality)
    g = rng.standard_normal(out.shape)
    (c,) = vjp_fn(g)
    (fd,) = finite_difference_vjp(
        trp.project_entropy, (scale,), dict(min_entropy=beta, equality=equality), (g,), (full,)
    )
    assert c.shape == scale.shape
    assert relative_error(c, fd, floor=1e-3) < FD_RTOL  # d = 1, equality: the derivative is 0


def test_full_vjp_on_diagonal_matrices_equals_diagonal_vjp():
    """The matrix VJPs restricted to diagonal Cholesky factors are the elementwise ones."""
    for method in METHODS:
        case = make_case(11, method, False, d=3, batch=(4,))
        mean, s, old_mean, old_s = case.args
        full_args = (mean, s[..., None] * np.eye(3), old_mean, old_s[..., None] * np.eye(3))
        rng = np.random.default_rng(0)
        g_mean, g_s = rng.standard_normal(mean.shape), rng.standard_normal(s.shape)
        _, f_diag = trp.vjp(case.fn, *case.args, **case.kwargs)
        _, f_full = trp.vjp(case.fn, *full_args, **case.kwargs)
        c_diag = f_diag(trp.Gaussian(g_mean, g_s))
        c_full = f_full(trp.Gaussian(g_mean, g_s[..., None] * np.eye(3)))
        for i in (0, 2):
            np.testing.assert_allclose(c_full[i], c_diag[i], rtol=1e-10, atol=1e-12)
        for i in (1, 3):
            np.testing.assert_allclose(
                np.diagonal(c_full[i], axis1=-2, axis2=-1), c_diag[i], rtol=1e-9, atol=1e-12
            )


# ----------------------------------------------------------------------------- backends


def _vjp_on(backend, case: Case, g: tuple) -> list[np.ndarray]:
    args, kwargs = case.on(backend)
    _, vjp_fn = trp.vjp(case.fn, *args, **kwargs)
    cots = vjp_fn(trp.Gaussian(*(backend.asarray(x) for x in g)))
    assert len(cots) == 4
    for c, a in zip(cots, args, strict=True):
        assert type(c) is type(a) and c.dtype == a.dtype and tuple(c.shape) == tuple(a.shape)
    return [backend.to_numpy(c) for c in cots]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", list(METHODS))
def test_vjp_same_cotangents_on_every_backend(backend, method, kind):
    from tr_projections.testing import get_backend

    reference = get_backend("numpy")
    for seed, d in ((1, 1), (2, 3)):
        case = make_case(seed, method, kind == "full", d=d, batch=(3,))
        g = random_cotangent(trp.Gaussian(*case.args[:2]), case.full, seed)
        assert_cotangents_close(_vjp_on(backend, case, g), _vjp_on(reference, case, g))


def test_entropy_vjp_on_every_backend(backend):
    rng = np.random.default_rng(5)
    for scale in (rng.uniform(0.2, 2.0, (3, 2)), random_cholesky(rng, (3,), 3, cond=10, scale=1)):
        g = rng.standard_normal(scale.shape)
        want = trp.vjp(trp.project_entropy, scale, 2.5)[1](g)[0]
        x = backend.asarray(scale)
        _, vjp_fn = trp.vjp(trp.project_entropy, x, 2.5)
        (got,) = vjp_fn(backend.asarray(g))
        assert type(got) is type(x)
        assert_cotangents_close([backend.to_numpy(got)], [want])


# ----------------------------------------------------------------------------- broadcasting


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["kl", "wasserstein"])
def test_cotangents_take_the_shape_and_dtype_of_each_argument(method, kind):
    """A state-independent old policy gets the batch's summed cotangent, a float32 argument a
    float32 cotangent."""
    case = make_case(4, method, kind == "full", d=2, batch=(3,))
    mean, s, old_mean, old_s = case.args
    shared = (mean, s, old_mean[0], old_s[0])
    rng = np.random.default_rng(1)
    g = (rng.standard_normal(mean.shape), rng.standard_normal(s.shape))
    _, f_shared = trp.vjp(case.fn, *shared, **case.kwargs)
    c_shared = f_shared(trp.Gaussian(*g))
    _, f_tiled = trp.vjp(case.fn, mean, s, np.broadcast_to(old_mean[0], mean.shape),
                         np.broadcast_to(old_s[0], s.shape), **case.kwargs)  # fmt: skip
    c_tiled = f_tiled(trp.Gaussian(*g))
    for c, a in zip(c_shared, shared, strict=True):
        assert c.shape == a.shape
    np.testing.assert_allclose(c_shared[2], c_tiled[2].sum(0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(c_shared[3], c_tiled[3].sum(0), rtol=1e-12, atol=1e-14)

    mixed = (mean.astype(np.float32), s, old_mean, old_s)
    _, f_mixed = trp.vjp(case.fn, *mixed, **case.kwargs)
    c_mixed = f_mixed(trp.Gaussian(*g))
    assert [c.dtype for c in c_mixed] == [np.float32, np.float64, np.float64, np.float64]


def test_vjp_takes_none_for_zero_cotangents_and_project_with_method():
    case = make_case(6, "frobenius", True, d=2)
    out, f = trp.vjp(trp.project, *case.args, method="frobenius", **case.kwargs)
    direct, f_direct = trp.vjp(trp.project_frobenius, *case.args, **case.kwargs)
    np.testing.assert_array_equal(out.scale, direct.scale)
    g = np.ones_like(case.args[0])
    for a, b in zip(f(trp.Gaussian(g, None)), f_direct((g, np.zeros_like(out.scale))), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(TypeError, match="fn"):
        trp.vjp(trp.kl, *case.args)
    with pytest.raises(ValueError, match="method"):
        trp.vjp(trp.project, *case.args, method="nope", eps_mean=0.1, eps_cov=0.1)


def test_vjp_fn_checks_its_cotangent(backend):
    """``vjp_fn`` takes ``None`` (all zero) and refuses, by name, cotangents of another
    library, of a non-real dtype, of a shape other than the output's (nothing is broadcast,
    as with ``jax.vjp``), or a bare array for a projection's pair; on every backend."""
    case = make_case(7, "kl", False, d=2, batch=(3,))
    args, kwargs = case.on(backend)
    _, f = trp.vjp(trp.project_kl, *args, **kwargs)
    g = backend.asarray(np.ones((3, 2)))
    zeros = f(trp.Gaussian(backend.asarray(np.zeros((3, 2))), None))
    for a, b in zip(f(None), zeros, strict=True):
        np.testing.assert_array_equal(backend.to_numpy(a), backend.to_numpy(b))
    if backend.name in ("numpy", "jax"):  # (NumPy cotangents are JAX's too, as for jax.vjp)
        other = pytest.importorskip("torch").ones(3, 2)
        same = f(trp.Gaussian(np.ones((3, 2)), None))
        for a, b in zip(same, f(trp.Gaussian(g, None)), strict=True):
            np.testing.assert_array_equal(backend.to_numpy(a), backend.to_numpy(b))
    else:
        other = np.ones((3, 2))
    with pytest.raises(TypeError, match="`g_mean` must be an array of the output's library"):
        f(trp.Gaussian(other, None))
    with pytest.raises(TypeError, match="`g_scale` must be an array of the output's library"):
        f(trp.Gaussian(None, 1.0))
    with pytest.raises(ValueError, match=r"`g_mean` must have the output's shape \(3, 2\)"):
        f(trp.Gaussian(backend.asarray(np.ones(2)), None))
    with pytest.raises(ValueError, match=r"`g_scale` must have the output's shape \(3, 2\)"):
        f(trp.Gaussian(None, backend.asarray(np.ones((1, 2)))))
    with pytest.raises(TypeError, match="`g_mean` must have a real floating dtype"):
        f(trp.Gaussian(backend.asarray(np.ones((3, 2), dtype=np.int64)), None))
    with pytest.raises(TypeError, match="a pair \\(g_mean, g_scale\\)"):
        f(g)
    with pytest.raises(ValueError, match="2 array\\(s\\) \\(g_mean, g_scale\\), got 3"):
        f((g, g, g))
    _, f_h = trp.vjp(trp.project_entropy, args[1], 0.5)
    with pytest.raises(ValueError, match=r"`cotangent` must have the output's shape"):
        f_h(backend.asarray(np.ones(2)))
    assert f_h(None)[0].shape == args[1].shape


def test_vjp_fn_of_one_states_loss_takes_a_numpy_scalar():
    """The loss of one NumPy state is a NumPy scalar; its cotangent may be one, or a 0-d array."""
    case = make_case(8, "kl", False, d=2, batch=())
    out, f = trp.vjp(trp.trust_region_loss, *case.args, method="kl")
    assert np.ndim(out) == 0
    for g in (np.float64(1.0), np.ones(())):
        assert [c.shape for c in f(g)] == [(2,)] * 4


# ----------------------------------------------------------------------------- edge cases


def _finite_vjp(fn, args, kwargs):
    out, vjp_fn = trp.vjp(fn, *args, **kwargs)
    g = trp.Gaussian(np.ones_like(out.mean), np.tril(np.ones_like(out.scale)))
    cots = vjp_fn(g)
    for c in cots:
        assert np.all(np.isfinite(c))
    return out, cots, g


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", list(METHODS))
def test_gradients_finite_when_new_equals_old(method, kind):
    case = make_case(7, method, kind == "full", d=3)
    mean, s = case.args[:2]
    kwargs = dict(case.kwargs, eps_mean=0.1, eps_cov=0.1)
    _, cots, g = _finite_vjp(case.fn, (mean, s, mean.copy(), s.copy()), kwargs)
    # nothing is projected: the identity's cotangent, nothing for the old policy
    np.testing.assert_array_equal(cots[0], g.mean)
    np.testing.assert_array_equal(cots[1], g.scale)
    assert not np.any(cots[2]) and not np.any(cots[3])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", list(METHODS))
def test_gradients_finite_on_the_bound(method, kind):
    """Bounds equal to the distances (the kink): finite, one of the one-sided derivatives."""
    case = make_case(8, method, kind == "full", d=3)
    _, distance, options = METHODS[method]
    dm, dc = (np.asarray(x) for x in distance(*case.args, **options))
    _finite_vjp(case.fn, case.args, dict(options, eps_mean=dm, eps_cov=dc))


@pytest.mark.parametrize("scales", [(1e-4, 1e-4), (1e3, 1e3), (1e-4, 1e3), (1e3, 1e-4)])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", list(METHODS))
def test_gradients_finite_for_extreme_stds(method, kind, scales):
    new, old = scales
    case = make_case(9, method, kind == "full", d=3, scale=new, states="active")
    old_case = make_case(10, method, kind == "full", d=3, scale=old)
    args = case.args[:2] + old_case.args[2:]
    _finite_vjp(case.fn, args, dict(METHODS[method][2], eps_mean=1e-2, eps_cov=1e-2))


@pytest.mark.parametrize("scale", [1e-4, 1e3])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", list(METHODS))
def test_vjp_matches_central_differences_at_extreme_scales(method, kind, scale):
    """Stds (and means) around 1e-4 and 1e3: still the derivative, to the same relative
    accuracy (the FD steps are relative to each argument's size)."""
    case = make_case(12, method, kind == "full", d=2, batch=(2,), scale=scale)
    assert_vjp_matches_fd(case, 12)


def test_adapters_are_imported_only_for_their_library():
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, numpy as np, tr_projections as trp\n"
        "x = np.ones((2, 2)); out, f = trp.vjp(trp.project_kl, x, x, 0 * x, x, "
        "eps_mean=0.1, eps_cov=0.1)\n"
        "f(out); trp.project_wasserstein(x, x, 0 * x, 2 * x, eps_mean=0.1, eps_cov=0.1)\n"
        "mods = ('torch', 'jax', 'tr_projections.backends.torch', 'tr_projections.backends.jax')\n"
        "print(','.join(m for m in mods if m in sys.modules))\n"
    )
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""


@pytest.mark.parametrize("kind", ["diag", "full"])
@pytest.mark.parametrize("method", ["kl", "frobenius", "wasserstein"])
def test_vjp_wrt_new_policy_only(method, kind):
    """``vjp_fn(g, wrt=("mean", "scale"))`` returns exactly the first two cotangents of the full
    VJP and ``None`` for the old policy (whose part of the VJP is skipped)."""
    case = make_case(31, method, kind == "full", d=3, batch=(6,), states="mixed")
    _, vjp_fn = trp.vjp(case.fn, *case.args, **case.kwargs)
    rng = np.random.default_rng(2)
    g = trp.Gaussian(
        rng.standard_normal(case.args[0].shape), rng.standard_normal(case.args[1].shape)
    )
    every = vjp_fn(g)
    some = vjp_fn(g, wrt=("mean", "scale"))
    assert some.old_mean is None and some.old_scale is None
    np.testing.assert_array_equal(some.mean, every.mean)
    np.testing.assert_array_equal(some.scale, every.scale)
    only_scale = vjp_fn(g, wrt="scale")
    assert only_scale.mean is None and only_scale.old_mean is None
    np.testing.assert_array_equal(only_scale.scale, every.scale)


@pytest.mark.parametrize("wrt", [("mean", "sigma"), (1,), "old"])
def test_vjp_wrt_names_arguments(wrt):
    case = make_case(32, "kl", False, d=2, batch=(3,))
    _, vjp_fn = trp.vjp(case.fn, *case.args, **case.kwargs)
    g = trp.Gaussian(np.ones(case.args[0].shape), np.ones(case.args[1].shape))
    with pytest.raises(ValueError, match="`wrt` must name arguments"):
        vjp_fn(g, wrt=wrt)
