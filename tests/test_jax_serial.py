"""JAX on the CPU: the decompositions and triangular solves of one projection run one at a time,
and the CPU routes that replace jaxlib's batched LAPACK and dot calls give their values.

jaxlib's CPU LAPACK kernels (0.10.2) split a batched call over XLA's intra-op thread pool and
block the pool thread that runs them until the parts are done; as many such calls at once as the
pool has threads never finish. Here a jitted forward + backward of a full KL projection of 10,000
states hung by its second call without ``_compat.serial_decompositions`` (2 CPUs).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
from _data import spd  # noqa: E402

from tr_projections import _compat  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ON_CPU = pytest.mark.skipif(
    jax.default_backend() != "cpu", reason="the JAX CPU routes are taken on the CPU backend only"
)
DECOMPOSITIONS = {"eigh", "svd", "cholesky", "triangular_solve", "qr", "geqrf"}


def _inner_jaxprs(eqn):
    """The jaxprs an equation calls (``pjit``, ``custom_vjp``, loops; a ``cond``'s branches)."""
    for p in eqn.params.values():
        for sub in p if isinstance(p, tuple) else (p,):  # (a cond's branches: a tuple)
            inner = getattr(sub, "jaxpr", sub)
            if hasattr(inner, "eqns"):
                yield inner


def _decompositions(jaxpr):
    """Top-level equations of ``jaxpr`` that are, or call, a decomposition or triangular solve,
    in program order."""

    def contains(eqn) -> bool:
        if eqn.primitive.name in DECOMPOSITIONS:
            return True
        return any(contains(e) for inner in _inner_jaxprs(eqn) for e in inner.eqns)

    return [e for e in jaxpr.eqns if contains(e)]


def _is_literal(v) -> bool:
    return type(v).__name__ == "Literal"  # (a constant in a jaxpr: no equation behind it)


def _ancestors(jaxpr) -> dict:
    """For each variable of ``jaxpr``, the set of equations (by id) it is computed from."""
    deps: dict = {}
    for e in jaxpr.eqns:
        mine = {id(e)}
        for v in e.invars:
            if not _is_literal(v):
                mine |= deps.get(v, set())
        for v in e.outvars:
            deps[v] = mine
    return deps


def _assert_in_turn(jaxpr):
    calls = _decompositions(jaxpr)
    deps = _ancestors(jaxpr)
    assert len(calls) >= 2
    for before, after in itertools.pairwise(calls):
        inputs = set().union(*(deps.get(v, set()) for v in after.invars if not _is_literal(v)))
        assert id(before) in inputs, (before.primitive.name, after.primitive.name)


def _policies(rng, n, d):
    """New and old full Gaussians, ``n`` states in ``d`` dimensions, as JAX arrays."""
    return [
        jnp.asarray(rng.standard_normal((n, d))),
        jnp.asarray(np.linalg.cholesky(spd(rng, (n,), d))),
        jnp.asarray(rng.standard_normal((n, d))),
        jnp.asarray(np.linalg.cholesky(spd(rng, (n,), d))),
    ]


def test_independent_calls_wait_for_each_other():
    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(spd(rng, (4,), 12)) for _ in range(2))
    L = jnp.asarray(np.linalg.cholesky(spd(rng, (4,), 12)))

    def f(a, b, L):
        with _compat.serial_decompositions():
            w1, _ = _compat.eigh(a, xp=jnp)
            w2, _ = _compat.eigh(b, xp=jnp)  # independent of the first: must still wait
            x = _compat.solve_triangular(L, b, lower=True, xp=jnp)  # LAPACK route (d > 8)
            c = _compat.cholesky(a, xp=jnp)
        return w1, w2, x, c

    _assert_in_turn(jax.make_jaxpr(f)(a, b, L).jaxpr)
    # the values are those of the plain calls (the added term is exactly zero)
    w1, w2, x, c = jax.jit(f)(a, b, L)
    np.testing.assert_array_equal(np.asarray(w1), np.asarray(jnp.linalg.eigh(a)[0]))
    np.testing.assert_array_equal(np.asarray(w2), np.asarray(jnp.linalg.eigh(b)[0]))
    np.testing.assert_allclose(np.asarray(L @ x), np.asarray(b), rtol=1e-12, atol=1e-10)
    np.testing.assert_array_equal(np.asarray(c), np.asarray(jnp.linalg.cholesky(a)))


def test_outside_the_block_nothing_changes():
    rng = np.random.default_rng(1)
    a, b = (jnp.asarray(spd(rng, (4,), 6)) for _ in range(2))

    def f(a, b):
        return _compat.eigh(a, xp=jnp)[0], _compat.eigh(b, xp=jnp)[0]

    jaxpr = jax.make_jaxpr(f)(a, b).jaxpr
    calls, deps = _decompositions(jaxpr), _ancestors(jaxpr)
    assert len(calls) == 2
    second = calls[1].invars
    assert not any(id(calls[0]) in deps.get(v, set()) for v in second if not _is_literal(v))


def test_forward_and_backward_of_a_full_projection_in_turn():
    # d = 12: the triangular solves take jaxlib's LAPACK route (substitution is for d <= 8 or
    # one right-hand side); forward and backward in one program, as jit(grad) compiles them.
    import tr_projections as trp

    args = _policies(np.random.default_rng(2), 5, 12)

    def loss(m, L, mo, Lo):
        out = trp.project_kl(m, L, mo, Lo, eps_mean=1e-3, eps_cov=1e-3)
        return jnp.sum(out.mean) + jnp.sum(out.scale)

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3)))(*args).jaxpr
    assert len(_decompositions(jaxpr)) >= 6  # solves, eigh and QR forward; solves back
    _assert_in_turn(jaxpr)


@pytest.mark.parametrize("part", ["projection", "distance"])
def test_root_w2_in_turn(part):
    """W2 of symmetric roots (``root=True``): the projection's Cholesky factorisation and
    triangular solves, forward and backward, and the distance's two factorisations (the part's
    and the mean part's) run one at a time. d = 12: jaxlib's LAPACK route."""
    import tr_projections as trp

    rng = np.random.default_rng(5)
    m, _, mo, _ = _policies(rng, 5, 12)
    S, So = (jnp.asarray(spd(rng, (5,), 12)) for _ in range(2))

    def loss(m, S, mo, So):
        if part == "distance":
            a, b = trp.wasserstein(m, S, mo, So, root=True)
            return jnp.sum(a) + jnp.sum(b)
        out = trp.project_wasserstein(m, S, mo, So, eps_mean=1e-3, eps_cov=1e-3, root=True)
        return jnp.sum(out.mean) + jnp.sum(out.scale)

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3)))(m, S, mo, So).jaxpr
    _assert_in_turn(jaxpr)


SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])  # XLA sizes its pool from this
    import numpy as np, jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import tr_projections as trp
    rng = np.random.default_rng(0)
    B, d = 10_000, 12
    def chol():
        a = rng.standard_normal((B, d, d))
        return np.linalg.cholesky(a @ np.swapaxes(a, -1, -2) + d * np.eye(d))
    arrays = (rng.standard_normal((B, d)), chol(), rng.standard_normal((B, d)), chol())
    def loss(m, L, mo, Lo):
        out = trp.project_kl(m, L, mo, Lo, eps_mean=0.01, eps_cov=0.01)
        return jnp.sum(out.mean) + jnp.sum(out.scale)
    f = jax.jit(jax.grad(loss, argnums=(0, 1)))
    for _ in range(4):
        g = jax.block_until_ready(f(*map(jnp.asarray, arrays)))
    out, vjp_fn = trp.vjp(trp.project_kl, *arrays, eps_mean=0.01, eps_cov=0.01)
    ref = vjp_fn(trp.Gaussian(np.ones((B, d)), np.tril(np.ones((B, d, d)))))
    np.testing.assert_allclose(np.asarray(g[0]), ref[0], rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(np.asarray(g[1]), np.tril(ref[1]), rtol=1e-7, atol=1e-9)
    print("finished")
    """
)


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs CPU affinity (Linux) and two CPUs (the pool size that deadlocked)",
)
def test_jit_grad_of_a_large_full_kl_finishes_on_two_cpus():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    try:
        done = subprocess.run(
            [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=240
        )
    except subprocess.TimeoutExpired:
        pytest.fail("jit(grad) of a full KL projection of 10,000 states did not finish in 240 s")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "finished" in done.stdout


@ON_CPU
@pytest.mark.parametrize(
    ("sa", "sb"),
    [
        ((7, 6, 6), (7, 6, 6)),
        ((7, 6, 6), (7, 6, 1)),  # matrix-vector
        ((6, 6), (3, 7, 6, 6)),  # one matrix against a batch
        ((3, 1, 4, 5), (7, 5, 2)),  # broadcast batches, rectangular
        ((7, 1, 1), (7, 1, 3)),  # inner dimension 1
        ((4, 32, 32), (4, 32, 32)),  # JAX_CPU_SUM_MAX_K
        ((4, 33, 33), (4, 33, 33)),  # above it: XLA's dot
        ((0, 6, 6), (0, 6, 6)),  # an empty batch
    ],
)
def test_cpu_products_are_matmul(sa, sb):
    rng = np.random.default_rng(3)
    a, b = jnp.asarray(rng.standard_normal(sa)), jnp.asarray(rng.standard_normal(sb))
    want = np.matmul(np.asarray(a), np.asarray(b))
    for fn in (
        lambda a, b: _compat.matmul(a, b, xp=jnp),
        jax.jit(lambda a, b: _compat.matmul(a, b, xp=jnp)),
    ):
        got = np.asarray(fn(a, b))
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13 * sa[-1])
    jaxpr = jax.make_jaxpr(lambda a, b: _compat.matmul(a, b, xp=jnp))(a, b).jaxpr
    uses_dot = any(e.primitive.name == "dot_general" for e in jaxpr.eqns)
    assert uses_dot == (sa[-1] > _compat.JAX_CPU_SUM_MAX_K)


def test_cpu_products_keep_matmul_semantics():
    """Mismatched inner dimensions are an error, as for ``jnp.matmul`` (the sum of broadcast
    products would silently drop or clamp rows); float32 stays float32."""
    rng = np.random.default_rng(7)
    a = jnp.asarray(rng.standard_normal((2, 3, 4)))
    for b in (jnp.ones((2, 5, 2)), jnp.ones((2, 3, 2))):
        with pytest.raises(TypeError):
            _compat.matmul(a, b, xp=jnp)
    a32 = a.astype(jnp.float32)
    b32 = jnp.asarray(rng.standard_normal((2, 4, 4)), dtype=jnp.float32)
    got = _compat.matmul(a32, b32, xp=jnp)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(a32) @ np.asarray(b32), rtol=1e-5)


@ON_CPU
@pytest.mark.parametrize("lower", [True, False])
@pytest.mark.parametrize(
    ("d", "k", "route"), [(6, 6, "sub"), (12, 1, "sub"), (12, 12, "lapack"), (40, 1, "lapack")]
)
def test_cpu_triangular_solves(lower, d, k, route):
    rng = np.random.default_rng(4)
    L = np.linalg.cholesky(spd(rng, (9,), d))
    a = L if lower else np.swapaxes(L, -1, -2)
    b = rng.standard_normal((9, d, k))
    fn = jax.jit(lambda a, b: _compat.solve_triangular(a, b, lower=lower, xp=jnp))
    x = np.asarray(fn(jnp.asarray(a), jnp.asarray(b)))
    np.testing.assert_allclose(a @ x, b, rtol=1e-12, atol=1e-12)
    jaxpr = jax.make_jaxpr(fn)(jnp.asarray(a), jnp.asarray(b)).jaxpr
    assert (len(_decompositions(jaxpr)) == 1) == (route == "lapack")


@pytest.mark.parametrize("name", ["kl", "wasserstein"])
def test_traced_distances_in_turn(name):
    """The public distances (forward) run their decompositions one at a time too (W2 takes two
    ``eigh`` and two ``cond`` holding SVDs under tracing, inside its covariance operation). The
    KL distance of full Gaussians makes one LAPACK call, a triangular solve with d right-hand
    sides, and no ``eigh`` (its closed form): nothing to order. (Frobenius makes no LAPACK call
    here: its solve has one right-hand side, a substitution.)"""
    import tr_projections as trp

    args = _policies(np.random.default_rng(6), 3, 12)
    fn = getattr(trp, name)
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    if name == "kl":
        (call,) = _decompositions(jaxpr)
        assert "eigh" not in str(call)
    else:  # (W2's covariance part is one operation: both SVDs inside it)
        (call,) = _decompositions(jaxpr)
        _assert_in_turn(call.params["call_jaxpr"].jaxpr)
    got = jax.jit(fn)(*args)
    want = fn(*map(np.asarray, args))
    np.testing.assert_allclose(np.asarray(got[1]), want[1], rtol=1e-10)


def test_traced_roots_take_eigh_unless_a_row_is_rough():
    """Under ``jax.jit`` the symmetric roots of float64 factors come from ``eigh``, and from the
    SVD of every row only where some row of the batch is rough (``lax.cond``): a batch of
    well-conditioned factors gives eager's roots, and a batch with a covariance of condition
    number 1e10 gives that row's smallest root to 1e-9 relative, as the SVD does (``eigh`` of
    the covariance alone: about 3e-8). The order of the returned roots tells which branch ran
    (``eigh``: ascending; the SVD: descending)."""
    from tr_projections import gaussian

    rng = np.random.default_rng(11)
    d = 6
    L = np.linalg.cholesky(spd(rng, (5,), d))
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    rough = np.linalg.cholesky((q * np.logspace(0, -10, d)) @ q.T)  # condition number 1e10

    def root(s):
        return gaussian.root_from_cholesky(s, xp=jnp)

    roots = jax.jit(root)
    jaxpr = jax.make_jaxpr(root)(L).jaxpr
    assert any(e.primitive.name == "cond" for e in jaxpr.eqns)
    S, _, s_good = roots(jnp.asarray(L))
    eager = gaussian.root_from_cholesky(L, xp=_compat.array_namespace(L))[0]
    np.testing.assert_allclose(np.asarray(S), eager, rtol=1e-12, atol=1e-13)
    # which branch ran: eigh's roots ascend, the SVD's descend (distinct values here)
    assert np.all(np.diff(np.asarray(s_good), axis=-1) > 0)
    batch = np.concatenate([L, rough[None]])
    S, _, s_rough = roots(jnp.asarray(batch))
    assert np.all(np.diff(np.asarray(s_rough), axis=-1) < 0)
    s = np.linalg.svd(rough, compute_uv=False)
    got = np.linalg.eigvalsh(np.asarray(S)[-1])
    assert abs(got[0] - s[-1]) <= 1e-9 * s[-1]
