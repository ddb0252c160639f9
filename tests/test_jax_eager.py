"""Concrete JAX arrays on the compiled route (``tr_projections.backends.jax.EAGER_JIT``): a call
outside ``jit`` runs one compiled program per operation, options and shapes, so new data and new
bounds compile nothing; the results are NumPy's; the checks still read the values first; and the
op-by-op route stays available behind the switch."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
from test_gradients import assert_cotangents_close  # noqa: E402
from test_rows import PROJECTIONS, _bounds, _policies  # noqa: E402
from test_w2_roots import _data as _root_data  # noqa: E402

import tr_projections as trp  # noqa: E402
import tr_projections._rows as rows_mod  # noqa: E402
from tr_projections.backends import jax as adapter  # noqa: E402
from tr_projections.projections import kl  # noqa: E402

_COMPILES = [0]


def _listen(name: str, _duration: float, **_kw) -> None:
    if name == "/jax/core/compile/backend_compile_duration":
        _COMPILES[0] += 1


jax.monitoring.register_event_duration_secs_listener(_listen)


def _assert_listener_counts():
    """The compile count moves for a program never compiled before (else a count of zero
    would prove nothing)."""
    before = _COMPILES[0]
    jax.block_until_ready(jax.jit(lambda v: v * 3.25 + before)(jnp.arange(5.0)))
    assert _COMPILES[0] > before


def _cotangents(args, full, seed):
    """Random cotangents of a projection's outputs (lower triangular for full scales)."""
    rng = np.random.default_rng(seed)
    g = [rng.normal(size=args[0].shape), rng.normal(size=args[1].shape)]
    return [g[0], np.tril(g[1]) if full else g[1]]


def _numpy(method, args, eps, g, wrt=None):
    out, vjp_fn = trp.vjp(PROJECTIONS[method], *args, eps_mean=eps[0], eps_cov=eps[1])
    return [*out, *vjp_fn(trp.Gaussian(*g), wrt=wrt)]


def _close(got, want):
    for a, b in zip(got, want, strict=True):
        if b is None:
            assert a is None
            continue
        scale = max(1.0, float(np.max(np.abs(b), initial=0.0)))
        np.testing.assert_allclose(np.asarray(a), b, rtol=0, atol=1e-11 * scale)


@pytest.mark.parametrize(
    "method,kind", [("kl", "full"), ("kl", "diag"), ("wasserstein", "full"), ("frobenius", "full")]
)
def test_new_bounds_compile_nothing(method, kind):
    """A second call whose bounds put other states outside (other Python floats) compiles
    nothing, forward and ``jax.vjp``; both calls give NumPy's outputs and cotangents. 300
    states: full KL takes its slots. (Op by op, each of these compiles again: their costly
    stages gather the rows outside by count.)"""
    assert adapter.EAGER_JIT
    full = kind == "full"
    args = _policies(full, (300,), 3, seed=40 + full)
    g = _cotangents(args, full, 9)
    x = [jnp.asarray(a) for a in args]
    gx = trp.Gaussian(*(jnp.asarray(a) for a in g))
    fn = PROJECTIONS[method]
    moved = []
    for quantile in (0.3, 0.8):
        eps = _bounds(method, args, quantile)
        before = _COMPILES[0]
        out = jax.block_until_ready(fn(*x, eps_mean=eps[0], eps_cov=eps[1]))
        _, vjp_fn = jax.vjp(
            lambda m, s, eps=eps: fn(m, s, x[2], x[3], eps_mean=eps[0], eps_cov=eps[1]),
            x[0],
            x[1],
        )
        cots = jax.block_until_ready(vjp_fn(gx))
        compiled = _COMPILES[0] - before
        want = _numpy(method, args, eps, g)
        _close([*out, *cots], want[:4])
        moved.append(int(np.sum(np.any(want[1] != args[1], axis=tuple(range(1, args[1].ndim))))))
    assert moved[0] != moved[1]  # (other states were projected the second time)
    assert compiled == 0, f"the second call compiled {compiled} programs"
    _assert_listener_counts()


def test_trp_vjp_of_jax_arrays_is_compiled_and_skips_what_is_not_asked():
    """``trp.vjp`` with concrete JAX arrays: NumPy's outputs and cotangents, ``None`` for the
    arguments ``wrt`` leaves out, and a per-state bound array whose values change compiles
    nothing."""
    args = _policies(True, (40,), 3, seed=7)
    g = _cotangents(args, True, 10)
    x = [jnp.asarray(a) for a in args]
    gx = trp.Gaussian(*(jnp.asarray(a) for a in g))
    for quantile in ("edge", 0.5):
        eps = [np.broadcast_to(np.asarray(e, dtype=float), (40,)).copy() for e in
               _bounds("kl", args, quantile)]  # fmt: skip
        before = _COMPILES[0]
        out, vjp_fn = trp.vjp(
            trp.project_kl, *x, eps_mean=jnp.asarray(eps[0]), eps_cov=jnp.asarray(eps[1])
        )
        both = vjp_fn(gx, wrt=("mean", "scale"))
        every = vjp_fn(gx)
        compiled = _COMPILES[0] - before
        _close([*out, *both], _numpy("kl", args, eps, g, wrt=("mean", "scale")))
        _close([*out, *every], _numpy("kl", args, eps, g))
        assert both[2] is None and both[3] is None
    assert compiled == 0, f"the second call compiled {compiled} programs"
    _assert_listener_counts()


def test_compiled_route_checks_values_first():
    """The checks read the concrete values before the program runs: same errors as op by op,
    from ``trp.project``, ``jax.grad`` and ``trp.vjp``; with the checks off a valid call runs."""
    args = [jnp.asarray(a) for a in _policies(False, (5,), 2, seed=1)]
    bad = [args[0], args[1].at[3, 1].set(jnp.nan), *args[2:]]
    with pytest.raises(ValueError, match="`scale`"):
        trp.project_kl(*bad, eps_mean=0.1, eps_cov=0.1)
    with pytest.raises(ValueError, match="`scale`"):
        jax.grad(lambda s: trp.project_kl(args[0], s, *args[2:], eps_mean=0.1, eps_cov=0.1)
                 .scale.sum())(bad[1])  # fmt: skip
    with pytest.raises(ValueError, match="`eps_cov`"):
        eps_cov = jnp.asarray([0.1, 0.1, -1.0, 0.1, 0.1])
        trp.vjp(trp.project_kl, *args, eps_mean=0.1, eps_cov=eps_cov)
    with pytest.raises(ValueError, match="`eps_mean`"):
        trp.project_frobenius(*args, eps_mean=-0.1, eps_cov=0.1)
    with pytest.raises(ValueError, match="`proj_scale`"):
        trp.trust_region_loss(*args[:2], bad[0], bad[1], method="kl")
    with trp.checks(False):
        out = trp.project_kl(*args, eps_mean=0.1, eps_cov=0.1)  # (valid: runs compiled)
    assert np.all(np.isfinite(np.asarray(out.scale)))


@pytest.mark.parametrize("method,kind", [("kl", "full"), ("wasserstein", "diag")])
def test_op_by_op_route_behind_the_switch(method, kind, monkeypatch):
    """``EAGER_JIT = False``: concrete arrays run op by op (rows gathered by value) and give the
    same outputs and cotangents, through ``trp.project`` and ``jax.vjp``; the compiled programs
    are not called."""
    monkeypatch.setattr(adapter, "EAGER_JIT", False)
    calls = []
    for name in ("_forward_jit", "_backward_jit", "_outputs_jit"):
        real = getattr(adapter, name)
        monkeypatch.setattr(
            adapter, name, lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k)
        )
    full = kind == "full"
    args = _policies(full, (12,), 3, seed=20 + full)
    eps = _bounds(method, args, 0.5)
    g = _cotangents(args, full, 11)
    x = [jnp.asarray(a) for a in args]
    fn = PROJECTIONS[method]
    alone = fn(*x, eps_mean=eps[0], eps_cov=eps[1])
    out, vjp_fn = jax.vjp(lambda *a: fn(*a, eps_mean=eps[0], eps_cov=eps[1]), *x)
    cots = vjp_fn(trp.Gaussian(*(jnp.asarray(a) for a in g)))
    want = _numpy(method, args, eps, g)
    _close(alone, want[:2])
    _close(out, want[:2])
    assert_cotangents_close([np.asarray(c) for c in cots], want[2:])
    assert not calls


def test_settings_changed_after_a_call_take_effect(monkeypatch):
    """A package setting read while tracing is part of a program's key: changed after a first
    call, the next call runs a program traced under it (here: no Newton steps at all, so the
    weight stays at its starting guess), as a call op by op would."""
    args = [jnp.asarray(a) for a in _policies(False, (50,), 3, seed=12)]
    eps = _bounds("kl", [np.asarray(a) for a in args], 0.3)
    before = np.asarray(trp.project_kl(*args, eps_mean=eps[0], eps_cov=eps[1]).scale)
    monkeypatch.setattr(kl, "FAST_STEPS", 0)
    monkeypatch.setattr(kl, "MAX_ITER", 0)
    after = np.asarray(trp.project_kl(*args, eps_mean=eps[0], eps_cov=eps[1]).scale)
    assert np.max(np.abs(after - before)) > 1e-9
    monkeypatch.undo()
    again = np.asarray(trp.project_kl(*args, eps_mean=eps[0], eps_cov=eps[1]).scale)
    np.testing.assert_array_equal(again, before)
    # Settings given as a list or a 0-d array still make a key (and another one).
    key = adapter._settings()
    monkeypatch.setattr(rows_mod, "SLOT_FRACTIONS", [0.25, 0.5])
    monkeypatch.setattr(kl, "MAX_ITER", np.array(50))
    other = adapter._settings()
    assert hash(other) != hash(key) and other != key


def test_compiled_route_agrees_with_numpy_for_roots_the_loss_and_float32():
    """``jax.grad`` on the compiled route against NumPy's ``trp.vjp``: W2 of symmetric roots
    (``root=True``), the trust-region loss, and a float32 KL projection; an option passed as a
    0-d array (read by its truth value) is accepted."""
    roots, (em, ec), cots, _ = _root_data(3)
    x = [jnp.asarray(a) for a in roots]

    def w2(m, s):
        out = trp.project_wasserstein(m, s, x[2], x[3], eps_mean=em, eps_cov=ec, root=True)
        return jnp.sum(out.mean * cots[0]) + jnp.sum(out.scale * cots[1])

    got = jax.grad(w2, argnums=(0, 1))(x[0], x[1])
    _, vjp_fn = trp.vjp(trp.project_wasserstein, *roots, eps_mean=em, eps_cov=ec, root=True)
    assert_cotangents_close([np.asarray(a) for a in got], list(vjp_fn(trp.Gaussian(*cots)))[:2])

    args = _policies(True, (20,), 3, seed=13)
    proj = trp.project_kl(*args, eps_mean=0.01, eps_cov=0.005)
    jproj = [jnp.asarray(a) for a in proj]

    def loss(m, s):
        return jnp.sum(trp.trust_region_loss(m, s, *jproj, method="kl"))

    got = jax.grad(loss, argnums=(0, 1))(jnp.asarray(args[0]), jnp.asarray(args[1]))
    _, vjp_fn = trp.vjp(trp.trust_region_loss, args[0], args[1], *proj, method="kl")
    assert_cotangents_close([np.asarray(a) for a in got], list(vjp_fn(np.ones(20)))[:2])

    f32 = [jnp.asarray(a, dtype=jnp.float32) for a in args]
    out = trp.project_kl(*f32, eps_mean=0.01, eps_cov=0.005)
    assert out.scale.dtype == jnp.float32
    want = trp.project_kl(*(np.asarray(a, dtype=np.float32) for a in args), eps_mean=0.01,
                          eps_cov=0.005)  # fmt: skip
    np.testing.assert_allclose(np.asarray(out.scale), want.scale, rtol=1e-4, atol=1e-6)

    jargs = [jnp.asarray(a) for a in args]
    kw = dict(eps_mean=1e-5, eps_cov=1e-5)  # (every state outside: the options matter)
    plain = trp.project_frobenius(*jargs, **kw, scale_prec=False)
    as_array = trp.project_frobenius(*jargs, **kw, scale_prec=jnp.asarray(False))
    for a, b in zip(as_array, plain, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    scaled = trp.project_frobenius(*jargs, **kw, scale_prec=jnp.asarray(True))
    assert np.max(np.abs(np.asarray(scaled.mean) - np.asarray(plain.mean))) > 1e-6


# ------------------------------------------------------------------------------ eager vmap


def _spy_on_programs(monkeypatch) -> dict:
    """Counts of the calls of the operations' compiled programs whose arguments include a
    tracer of ``jax.vmap`` (name -> count)."""
    calls = {"_outputs_jit": 0, "_forward_jit": 0, "_backward_jit": 0}
    for name in calls:
        real = getattr(adapter, name)

        def spy(*a, real=real, name=name):
            leaves = jax.tree_util.tree_leaves(a[1:])
            calls[name] += any(isinstance(v, jax.core.Tracer) for v in leaves)
            return real(*a)

        monkeypatch.setattr(adapter, name, spy)
    return calls


@pytest.mark.parametrize(
    "method,kind", [("kl", "full"), ("kl", "diag"), ("wasserstein", "full"), ("frobenius", "diag")]
)
def test_eager_vmap_runs_the_compiled_programs(method, kind, monkeypatch):
    """An eager ``jax.vmap`` over the states (of a projection, of ``jax.grad`` of a loss
    through it, and inside ``jax.grad``) runs the compiled programs, batched by JAX, instead of
    each operation on its own: NumPy's outputs and all four cotangents, and new bounds compile
    nothing."""
    full = kind == "full"
    args = _policies(full, (8,), 3, seed=60 + full)
    g = _cotangents(args, full, 11)
    x = [jnp.asarray(a) for a in args]
    gx = [jnp.asarray(a) for a in g]
    fn = PROJECTIONS[method]
    spy = _spy_on_programs(monkeypatch)
    compiled = []
    for quantile in (0.3, 0.8):
        eps = _bounds(method, args, quantile)

        def project(m, s, om, os_, eps=eps):
            return fn(m, s, om, os_, eps_mean=eps[0], eps_cov=eps[1])

        def loss(m, s, om, os_, gm, gs, eps=eps):
            out = project(m, s, om, os_)
            return jnp.sum(out.mean * gm) + jnp.sum(out.scale * gs)

        before = _COMPILES[0]
        out = jax.block_until_ready(jax.vmap(project)(*x))
        cots = jax.block_until_ready(jax.vmap(jax.grad(loss, argnums=(0, 1, 2, 3)))(*x, *gx))
        around = jax.grad(lambda *a: jnp.sum(jax.vmap(loss)(*a)), argnums=(0, 1, 2, 3))(*x, *gx)
        compiled.append(_COMPILES[0] - before)
        want = _numpy(method, args, eps, g)
        _close([*out, *cots], want)
        _close(around, want[2:])
    assert spy == {"_outputs_jit": 2, "_forward_jit": 4, "_backward_jit": 4}
    assert compiled[0] > 0 and compiled[1] == 0, compiled
    _assert_listener_counts()


def test_eager_vmap_over_other_axes_shared_arguments_and_bound_arrays(monkeypatch):
    """The compiled programs under an eager ``jax.vmap`` over another axis, over an unbatched
    (shared) old policy, nested, and with a bound array mapped state by state, and in
    ``trp.vjp``: the outputs and cotangents of the same call on the whole batch."""
    args = _policies(True, (6,), 3, seed=21, old_batch=())
    x = [jnp.asarray(a) for a in args]
    eps = _bounds("kl", args, 0.5)
    em, ec = eps[0], np.linspace(0.5, 1.5, 6) * eps[1]
    want = trp.project_kl(*args, eps_mean=em, eps_cov=ec)
    spy = _spy_on_programs(monkeypatch)

    def project(m, s, e):
        return trp.project_kl(m, s, x[2], x[3], eps_mean=em, eps_cov=e)

    shared = jax.vmap(project)(x[0], x[1], jnp.asarray(ec))
    moved = jax.vmap(project, in_axes=(1, 2, 0))(x[0].T, jnp.moveaxis(x[1], 0, 2), ec)
    nested = jax.vmap(jax.vmap(project))(*(jnp.reshape(v, (2, 3, *v.shape[1:]))
                                         for v in (x[0], x[1], jnp.asarray(ec))))  # fmt: skip
    for got in (shared, moved):
        _close(got, list(want))
    _close([jnp.reshape(v, want[i].shape) for i, v in enumerate(nested)], list(want))
    assert spy["_outputs_jit"] == 3

    g = _cotangents(args[:2], True, 3)

    def vjp(m, s, e, gm, gs):
        out, vjp_fn = trp.vjp(trp.project_kl, m, s, x[2], x[3], eps_mean=em, eps_cov=e)
        return (*out, *vjp_fn(trp.Gaussian(gm, gs), wrt=("mean", "scale"))[:2])

    got = jax.vmap(vjp)(x[0], x[1], jnp.asarray(ec), *(jnp.asarray(v) for v in g))
    _, vjp_np = trp.vjp(trp.project_kl, *args, eps_mean=em, eps_cov=ec)
    _close(got, [*want, *vjp_np(trp.Gaussian(*g), wrt=("mean", "scale"))[:2]])
    assert spy["_forward_jit"] == 1 and spy["_backward_jit"] == 1


def test_eager_vmap_checks_arguments_and_jit_traces_as_it_is(monkeypatch):
    """Under an eager ``jax.vmap`` the arguments' shapes and the bounds given as numbers are
    checked first, with the errors of the op-by-op route; a ``vmap`` under ``jit``, and a
    ``jit`` under ``vmap``, trace the projection as it is (no program called) and agree."""
    args = [jnp.asarray(a) for a in _policies(False, (5,), 2, seed=3)]

    def errors(old, **kw):
        found = []
        for eager_jit in (True, False):
            monkeypatch.setattr(adapter, "EAGER_JIT", eager_jit)
            with pytest.raises(ValueError) as info:
                jax.vmap(lambda m, s: trp.project_kl(m, s, *old, **kw))(*args[:2])
            found.append(str(info.value))
        monkeypatch.setattr(adapter, "EAGER_JIT", True)
        return found

    on, off = errors(args[2:], eps_mean=-0.1, eps_cov=0.1)
    assert "`eps_mean`" in on and on == off
    on, off = errors((args[2][:, :1], args[3]), eps_mean=0.1, eps_cov=0.1)
    assert "`old_mean`" in on and on == off

    spy = _spy_on_programs(monkeypatch)

    def project(m, s):
        return trp.project_kl(m, s, *args[2:], eps_mean=0.05, eps_cov=0.05)

    eager = jax.vmap(project)(*args[:2])
    assert spy["_outputs_jit"] == 1
    for traced in (jax.jit(jax.vmap(project)), jax.vmap(jax.jit(project))):
        got = traced(*args[:2])
        for a, b in zip(got, eager, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-14)
    assert spy["_outputs_jit"] == 1


# --------------------------------------------------------------------------- distances


def _distance_data(n_shrunk: int, seed: int, batch: int = 300, d: int = 3):
    """Full Gaussians, ``n_shrunk`` of them with a new covariance well inside the old one, the
    others near it (the two eigenvalue problems of :func:`tr_projections.distances.kl_eigs`,
    which the KL projection uses), all with repeated eigenvalues."""
    args = _policies(True, (batch,), d, seed=seed)
    factor = np.ones((batch, 1, 1))
    factor[np.random.default_rng(seed).permutation(batch)[:n_shrunk]] = 0.3
    args[1] = args[3] * factor * (1.0 + 0.01 * np.tril(np.ones((d, d))))
    return args


_DISTANCES = {"kl": trp.kl, "frobenius": trp.frobenius, "wasserstein": trp.wasserstein}


def _spy_on_distance_programs(monkeypatch) -> list:
    """A list that grows by one for each call of the distances' compiled program."""
    calls = []
    real = adapter._distance_jit
    monkeypatch.setattr(adapter, "_distance_jit", lambda *a: calls.append(1) or real(*a))
    return calls


def _summed(fn, rest, **kw):
    def f(m, s):
        parts = fn(m, s, *rest, **kw)
        return jnp.sum(parts.mean * jnp.arange(1.0, 1.0 + parts.mean.size)) + jnp.sum(parts.cov)

    return f


@pytest.mark.parametrize("name", ["kl", "frobenius", "wasserstein"])
def test_distances_on_new_data_compile_nothing(name, monkeypatch):
    """A distance of concrete JAX arrays runs one compiled program per distance, options and
    shapes: a second call on new data compiles nothing, alone or under an eager ``jax.grad``,
    and gives NumPy's values and the op-by-op route's gradients."""
    assert adapter.EAGER_JIT
    fn = _DISTANCES[name]
    spy = _spy_on_distance_programs(monkeypatch)
    grads = []
    for step, n_shrunk in enumerate((100, 140)):
        args = _distance_data(n_shrunk, seed=60 + step)
        x = [jnp.asarray(a) for a in args]
        f = jax.grad(_summed(fn, x[2:]), argnums=(0, 1))
        before = _COMPILES[0]
        parts = jax.block_until_ready(fn(*x))
        got = jax.block_until_ready(f(x[0], x[1]))
        compiled = _COMPILES[0] - before
        want = fn(*args)
        for a, b in zip(parts, want, strict=True):
            np.testing.assert_allclose(np.asarray(a), b, rtol=1e-12, atol=1e-13)
        grads.append((got, x, f))
    assert compiled == 0, f"the second call compiled {compiled} programs"
    _assert_listener_counts()
    assert len(spy) == 4  # (both calls of both steps took the program)
    spy.clear()
    got, x, _ = grads[-1]
    monkeypatch.setattr(adapter, "EAGER_JIT", False)
    want = jax.grad(_summed(fn, x[2:]), argnums=(0, 1))(x[0], x[1])
    assert_cotangents_close([np.asarray(a) for a in got], [np.asarray(a) for a in want])
    assert not spy  # (the switch off: op by op)


def test_distances_of_roots_and_diagonals_on_the_compiled_route(monkeypatch):
    """The options reach the program (``scale_prec``, ``root``) and diagonal Gaussians take it
    too: values equal NumPy's for each combination."""
    spy = _spy_on_distance_programs(monkeypatch)
    roots = _root_data(5)[0]
    diag = _policies(False, (30,), 4, seed=3)
    cases = [
        ("wasserstein", roots, {"root": True}),
        ("wasserstein", roots, {"root": True, "scale_prec": False}),
        ("wasserstein", diag, {"scale_prec": False}),
        ("frobenius", diag, {"scale_prec": False}),
        ("kl", diag, {}),
    ]
    for name, args, kw in cases:
        got = _DISTANCES[name](*(jnp.asarray(a) for a in args), **kw)
        want = _DISTANCES[name](*args, **kw)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(np.asarray(a), b, rtol=1e-12, atol=1e-13)
    assert len(spy) == len(cases)
    plain = trp.frobenius(*(jnp.asarray(a) for a in diag), scale_prec=False)
    scaled = trp.frobenius(*(jnp.asarray(a) for a in diag))
    assert np.max(np.abs(np.asarray(plain.mean) - np.asarray(scaled.mean))) > 1e-6


def test_distance_hessian_and_transforms_match_the_op_by_op_route(monkeypatch):
    """The compiled distance is differentiated by JAX itself, to any order: the Hessian of the
    KL in the scale (the curvature TRPO's natural gradient uses) and a forward-mode Jacobian
    equal the op-by-op route's; an eager ``vmap`` batches the program, and under ``jit`` the
    distance runs as it is (the program is not called); both give the same values."""
    args = _distance_data(3, seed=5, batch=6)
    x = [jnp.asarray(a) for a in args]

    def kl_cov(s):
        return jnp.sum(trp.kl(x[0], s, x[2], x[3]).cov)

    spy = _spy_on_distance_programs(monkeypatch)
    hess = jax.hessian(kl_cov)(x[1])
    jac = jax.jacfwd(lambda s: trp.frobenius(x[0], s, x[2], x[3]).cov)(x[1])
    assert len(spy) == 2  # (both transforms took the program)
    spy.clear()
    batched = jax.vmap(trp.kl)(*x)
    assert len(spy) == 1
    spy.clear()
    jitted = jax.jit(trp.frobenius)(*x)
    assert not spy
    np.testing.assert_allclose(np.asarray(batched.cov), trp.kl(*args).cov, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(jitted.cov), trp.frobenius(*args).cov, rtol=1e-12)
    monkeypatch.setattr(adapter, "EAGER_JIT", False)
    want_hess = jax.hessian(kl_cov)(x[1])
    want_jac = jax.jacfwd(lambda s: trp.frobenius(x[0], s, x[2], x[3]).cov)(x[1])
    np.testing.assert_allclose(np.asarray(hess), np.asarray(want_hess), rtol=0,
                               atol=1e-12 * float(np.max(np.abs(want_hess))))  # fmt: skip
    np.testing.assert_allclose(np.asarray(jac), np.asarray(want_jac), rtol=0,
                               atol=1e-12 * float(np.max(np.abs(want_jac))))  # fmt: skip
    assert float(np.max(np.abs(np.asarray(hess)))) > 0.1


@pytest.mark.parametrize("how", ["grad", "jacfwd", "hessian"])
def test_checks_read_values_under_eager_autodiff(how):
    """Under an eager ``jax.grad``, ``jax.jacfwd`` or ``jax.hessian`` the arguments are tracers
    whose values are known: the value checks read them (before, they were skipped, and a
    negative standard deviation gave a finite, meaningless result)."""
    transform = {"grad": jax.grad, "jacfwd": jax.jacfwd, "hessian": jax.hessian}[how]
    args = [jnp.asarray(a) for a in _policies(False, (4,), 2, seed=2)]
    bad = args[1].at[2, 0].set(-0.5)
    functions = [
        lambda s: jnp.sum(trp.kl(args[0], s, *args[2:]).cov),
        lambda s: jnp.sum(trp.frobenius(args[0], s, *args[2:]).cov),
        lambda s: jnp.sum(trp.wasserstein(args[0], s, *args[2:]).cov),
        lambda s: jnp.sum(trp.entropy(s)),
    ]
    if how == "grad":  # (a custom_vjp: reverse mode only)
        functions.append(lambda s: jnp.sum(trp.project_entropy(s, 0.5)))
    for f in functions:
        with pytest.raises(ValueError, match=r"`scale`.*index \(2, 0\)"):
            transform(f)(bad)
        assert np.all(np.isfinite(np.asarray(transform(f)(args[1]))))
    with pytest.raises(ValueError, match="`old_scale`"):
        transform(lambda s: jnp.sum(trp.kl(args[0], args[1], args[2], s).cov))(bad)
    if how == "grad":  # an entropy bound per state, differentiated too
        bound = jnp.asarray([0.5, 0.2, jnp.nan, 0.1])
        with pytest.raises(ValueError, match=r"`min_entropy` must be finite.*index \(2,\)"):
            jax.grad(lambda s, b: jnp.sum(trp.project_entropy(s, b)), argnums=1)(args[1], bound)


def _spy_conditions(monkeypatch):
    """Count the calls of the value checks' conditions (``_values._conditions``): made once per
    program while its trace is built, and on every call op by op."""
    from tr_projections import _values

    calls = [0]
    original = _values._conditions

    def spy(*a, **kw):
        calls[0] += 1
        return original(*a, **kw)

    monkeypatch.setattr(_values, "_conditions", spy)
    return calls


@pytest.mark.parametrize("full", [True, False], ids=["full", "diag"])
def test_value_checks_run_as_one_program(monkeypatch, full):
    """The value checks of concrete arrays, and of an eager ``jax.grad``'s arguments, are one
    compiled program: on new data of the same shapes they compile nothing and form no condition
    op by op (the spy sees the conditions only while the program is traced), for a distance, a
    projection and ``trp.vjp``; with ``EAGER_JIT`` off they are formed on every call."""
    calls = _spy_conditions(monkeypatch)
    data = [[jnp.asarray(a) for a in _policies(full, (50,), 3, seed=s)] for s in range(3)]

    def grad_kl(x):
        return jax.grad(lambda s: jnp.sum(trp.kl(x[0], s, *x[2:]).cov))(x[1])

    calls_of = {
        "kl": lambda x: trp.kl(*x),
        "project": lambda x: trp.project_kl(*x, eps_mean=0.05, eps_cov=0.05),
        "vjp": lambda x: trp.vjp(trp.project_kl, *x, eps_mean=0.05, eps_cov=0.05)[0],
        "grad": grad_kl,
    }
    _assert_listener_counts()
    for name, fn in calls_of.items():
        jax.block_until_ready(fn(data[0]))  # (traces and compiles what it needs)
        calls[0], compiles = 0, _COMPILES[0]
        for x in data[1:]:
            jax.block_until_ready(fn(x))
        assert (calls[0], _COMPILES[0] - compiles) == (0, 0), name
    monkeypatch.setattr(adapter, "EAGER_JIT", False)
    calls[0] = 0
    trp.kl(*data[1])
    assert calls[0] == 4  # (one per argument)


def _bad(kind: str, args: list) -> tuple[int, np.ndarray]:
    """(index of the argument, its malformed copy): one kind of bad value each."""
    x = [np.array(a) for a in args]
    if kind == "nan_mean":
        x[0][3, 1] = np.nan
        return 0, x[0]
    if kind == "inf_old_mean":
        x[2][1, 0] = -np.inf
        return 2, x[2]
    if kind == "negative_std":
        x[1][4, 2] = -0.5
        return 1, x[1]
    if kind == "upper_entry":
        x[3][2, 0, 1] = 1e-3
        return 3, x[3]
    if kind == "zero_diagonal":
        x[1][5, 1, 1] = 0.0
        return 1, x[1]
    if kind == "huge_entry":
        x[3][0, 2, 0] = 1e200
        return 3, x[3]
    raise AssertionError(kind)


def test_compiled_value_checks_refuse_as_op_by_op(monkeypatch):
    """A malformed argument, of each of six kinds in turn, is refused on the compiled route with
    the message of the op-by-op route, word for word (the program says only that some condition
    fails; the conditions are then formed one by one to name the first offence), and a
    well-formed call passes both. (One test for the six: they share their programs.)"""
    kinds = ["nan_mean", "inf_old_mean", "negative_std", "upper_entry", "zero_diagonal",
             "huge_entry"]  # fmt: skip
    for kind in kinds:
        full = kind != "negative_std"
        args = _policies(full, (8,), 3, seed=11)
        i, bad = _bad(kind, args)
        x = [jnp.asarray(a) for a in args]
        x[i] = jnp.asarray(bad)
        messages = []
        for eager_jit in (True, False):
            monkeypatch.setattr(adapter, "EAGER_JIT", eager_jit)
            with pytest.raises(ValueError) as err:
                trp.kl(*x)
            messages.append(str(err.value))
            trp.kl(*(jnp.asarray(a) for a in args))
        assert messages[0] == messages[1], kind
        assert f"`{('mean', 'scale', 'old_mean', 'old_scale')[i]}`" in messages[0], kind


def test_compiled_value_checks_of_roots(monkeypatch):
    """Symmetric roots (``root=True``): the program tests both roots' positive definiteness
    (two Cholesky factorisations, one after the other) and refuses an indefinite one or an
    asymmetric one with the op-by-op route's message; well-formed roots pass without forming a
    condition op by op once the program is traced."""
    roots, (em, ec), _, _ = _root_data(3, batch=6)
    x = [jnp.asarray(a) for a in roots]
    kw = {"eps_mean": em, "eps_cov": ec, "root": True}
    trp.project_wasserstein(*x, **kw)
    calls = _spy_conditions(monkeypatch)
    trp.project_wasserstein(*(v + 0.0 for v in x), **kw)
    assert calls[0] == 0
    d = roots[1].shape[-1]
    indefinite = np.array(roots[3])
    indefinite[2] = np.eye(d) + 2.0 * (np.ones((d, d)) - np.eye(d))
    asymmetric = np.array(roots[1])
    asymmetric[4, 0, 1] += 0.1
    for k, bad in ((3, indefinite), (1, asymmetric)):
        messages = []
        for eager_jit in (True, False):
            monkeypatch.setattr(adapter, "EAGER_JIT", eager_jit)
            args = list(x)
            args[k] = jnp.asarray(bad)
            with pytest.raises(ValueError) as err:
                trp.project_wasserstein(*args, **kw)
            messages.append(str(err.value))
        assert messages[0] == messages[1]
        assert ("positive definite" if k == 3 else "symmetric") in messages[0]


@pytest.mark.parametrize("full", [True, False], ids=["full", "diag"])
def test_entropy_on_the_compiled_route(monkeypatch, full):
    """``trp.entropy`` and ``trp.project_entropy`` of concrete JAX arrays run compiled programs
    (before, op by op on every call): on new data and new bounds of the same shapes they compile
    nothing and the programs are called (spies); values, an eager ``jax.grad`` and ``trp.vjp``
    give NumPy's results, with Python-float and per-state array bounds, in both forms."""
    rng = np.random.default_rng(6)
    args = _policies(full, (40,), 3, seed=6)
    scales = [args[1], args[3]]
    H = np.asarray(trp.entropy(scales[0]))
    g = np.tril(rng.normal(size=scales[0].shape)) if full else rng.normal(size=scales[0].shape)
    called = []
    for name in ("_distance_jit", "_outputs_jit", "_forward_jit", "_backward_jit"):
        real = getattr(adapter, name)
        monkeypatch.setattr(
            adapter, name, lambda *a, real=real, name=name: called.append(name) or real(*a)
        )

    def run(scale, beta, equality):
        s = jnp.asarray(scale)
        b = beta if isinstance(beta, float) else jnp.asarray(beta)
        out = trp.project_entropy(s, b, equality=equality)
        grad = jax.grad(lambda v: jnp.sum(trp.project_entropy(v, b, equality=equality) * g))(s)
        _, vjp_fn = trp.vjp(trp.project_entropy, s, b, equality=equality)
        return [trp.entropy(s), out, grad, vjp_fn(jnp.asarray(g))[0]]

    def want(scale, beta, equality):
        _, vjp_fn = trp.vjp(trp.project_entropy, scale, beta, equality=equality)
        out = trp.project_entropy(scale, beta, equality=equality)
        return [trp.entropy(scale), out, vjp_fn(g)[0], vjp_fn(g)[0]]

    _assert_listener_counts()
    for equality in (False, True):
        for beta in (float(np.median(H)), np.quantile(H, 0.7) + 0.3 * rng.normal(size=H.shape)):
            run(scales[1], np.asarray(beta) + 0.1 if not isinstance(beta, float) else beta + 0.1,
                equality)  # fmt: skip
            called.clear()
            before = _COMPILES[0]
            got = run(scales[0], beta, equality)
            assert _COMPILES[0] == before
            assert {"_distance_jit", "_outputs_jit", "_forward_jit", "_backward_jit"} <= set(called)
            _close(got, want(scales[0], beta, equality))
    monkeypatch.setattr(adapter, "EAGER_JIT", False)
    called.clear()
    _close(run(scales[0], 0.5, False), want(scales[0], 0.5, False))
    assert called == []


def test_checks_program_compiles_once_and_yields_to_staging_transforms(monkeypatch):
    """The first check of new shapes compiles one program (the checks' own, not each of its
    operations); where the program's answer is not a value (``jax.experimental.jet`` carries
    the arrays as constants, a ``jit`` closes over them) the conditions are formed op by op as
    before (``values_hold`` is ``None``), so such a call runs as it did without the program."""
    from jax.experimental import jet

    args = [jnp.asarray(a) for a in _policies(True, (37,), 3, seed=8)]
    kinds = ((("mean", 0.0, 1.0),) + (("full", 1e-150, 1e150),)) * 2
    _assert_listener_counts()
    before = _COMPILES[0]
    assert adapter.values_hold(kinds, tuple(args)) is True
    assert _COMPILES[0] - before == 1
    m, L, m0, L0 = args

    def f(v):
        return jnp.sum(trp.kl(v, L, m0, L0).mean)

    got = jet.jet(f, (m,), ((m,),))
    monkeypatch.setattr(adapter, "EAGER_JIT", False)
    want = jet.jet(f, (m,), ((m,),))
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=1e-13)
    np.testing.assert_allclose(np.asarray(got[1][0]), np.asarray(want[1][0]), rtol=1e-12)
    monkeypatch.setattr(adapter, "EAGER_JIT", True)
    seen = []
    real = adapter.values_hold
    monkeypatch.setattr(adapter, "values_hold", lambda *a: seen.append(real(*a)) or seen[-1])
    jax.block_until_ready(jax.jit(lambda v: trp.kl(v, L, m0, L0).mean)(m))
    assert seen and all(s is None for s in seen)
