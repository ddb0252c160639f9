"""The JAX adapter: ``jax.test_util.check_grads`` (reverse mode) on every projection, active and
inactive states; ``grad``, ``jit``, ``vmap`` and ``jit(grad)`` give the hand-written VJP."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
from jax.test_util import check_grads  # noqa: E402
from test_gradients import (  # noqa: E402
    KINDS,
    METHODS,
    assert_cotangents_close,
    make_case,
    numpy_vjp,
    random_cholesky,
)

import tr_projections as trp  # noqa: E402


def _function(case, kwargs):
    """The projection as a function of arrays (check_grads passes NumPy arrays: convert);
    full scales through ``tril``, so perturbing the unused upper triangle is a no-op."""

    def f(mean, scale, old_mean, old_scale):
        mean, scale, old_mean, old_scale = map(jnp.asarray, (mean, scale, old_mean, old_scale))
        if case.full:
            scale, old_scale = jnp.tril(scale), jnp.tril(old_scale)
        out = case.fn(mean, scale, old_mean, old_scale, **kwargs)
        return out.mean, out.scale

    return f


def _jax_kwargs(case):
    return {k: jnp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in case.kwargs.items()}


@pytest.mark.parametrize("states", ["mixed", "active", "inactive"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", list(METHODS))
def test_check_grads(method, kind, states):
    case = make_case(31, method, kind == "full", d=2, batch=(3,), states=states)
    args = tuple(jnp.asarray(a) for a in case.args)
    check_grads(_function(case, _jax_kwargs(case)), args, order=1, modes=["rev"])


@pytest.mark.parametrize("equality", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_check_grads_entropy(kind, equality):
    rng = np.random.default_rng(4)
    if kind == "full":
        scale = random_cholesky(rng, (3,), 2, cond=10, scale=1.0)
    else:
        scale = rng.uniform(0.3, 2.0, (3, 2))
    beta = jnp.asarray(np.asarray(trp.entropy(scale)) + np.array([0.5, -0.5, 0.3]))

    def f(x):
        x = jnp.asarray(x)
        x = jnp.tril(x) if kind == "full" else x
        return trp.project_entropy(x, beta, equality=equality)

    check_grads(f, (jnp.asarray(scale),), order=1, modes=["rev"])


def _loss(case, kw):
    def loss(mean, scale, old_mean, old_scale, eps_mean, eps_cov, gm, gs):
        out = case.fn(mean, scale, old_mean, old_scale, eps_mean=eps_mean, eps_cov=eps_cov, **kw)
        return jnp.sum(out.mean * gm) + jnp.sum(out.scale * gs)

    return loss


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", list(METHODS))
def test_grad_jit_vmap_agree_withnumpy_vjp(method, kind):
    case = make_case(32, method, kind == "full", d=3, batch=(4,))
    kwargs = _jax_kwargs(case)
    kw = {k: v for k, v in kwargs.items() if not k.startswith("eps")}
    args = tuple(jnp.asarray(a) for a in case.args)
    rng = np.random.default_rng(1)
    g = (rng.standard_normal(case.args[0].shape), rng.standard_normal(case.args[1].shape))
    gm, gs = map(jnp.asarray, g)
    em, ec = kwargs["eps_mean"], kwargs["eps_cov"]
    want = numpy_vjp(case, g)
    loss = _loss(case, kw)
    grad = jax.grad(loss, argnums=(0, 1, 2, 3))

    eager = grad(*args, em, ec, gm, gs)
    assert_cotangents_close([np.asarray(x) for x in eager], want)
    jitted = jax.jit(grad)(*args, em, ec, gm, gs)
    assert_cotangents_close([np.asarray(x) for x in jitted], want)
    per_state = jax.vmap(grad)(*args, em, ec, gm, gs)
    assert_cotangents_close([np.asarray(x) for x in per_state], want)
    both = jax.jit(jax.vmap(grad))(*args, em, ec, gm, gs)
    assert_cotangents_close([np.asarray(x) for x in both], want)

    # the forward under jit / vmap is the eager forward
    def project(*a):
        out = case.fn(*a[:4], eps_mean=a[4], eps_cov=a[5], **kw)
        return out.mean, out.scale

    direct = project(*args, em, ec)
    for other in (jax.jit(project)(*args, em, ec), jax.vmap(project)(*args, em, ec)):
        for a, b in zip(other, direct, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("kind", KINDS)
def test_shared_old_policy_and_float_bounds_under_jit(kind):
    """A state-independent old policy (cotangent summed over the batch) and Python-float
    bounds (static) under ``jit(grad)``."""
    case = make_case(33, "kl", kind == "full", d=2, batch=(3,))
    mean, scale, old_mean, old_scale = case.args
    shared = (mean, scale, old_mean[0], old_scale[0])

    def loss(*a):
        out = trp.project_kl(*a, eps_mean=0.05, eps_cov=0.02)
        return jnp.sum(out.mean**2) + jnp.sum(out.scale**3)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(*map(jnp.asarray, shared))
    _, vjp_fn = trp.vjp(trp.project_kl, *shared, eps_mean=0.05, eps_cov=0.02)
    out = trp.project_kl(*shared, eps_mean=0.05, eps_cov=0.02)
    want = vjp_fn(trp.Gaussian(2 * out.mean, 3 * out.scale**2))
    for g, w in zip(grads, want, strict=True):
        assert g.shape == w.shape
    assert_cotangents_close([np.asarray(x) for x in grads], list(want))


def test_integer_bound_array_gets_a_float0_cotangent():
    case = make_case(34, "frobenius", False, d=2, batch=(3,))
    args = tuple(jnp.asarray(a) for a in case.args)

    def loss(mean):
        out = trp.project_frobenius(mean, *args[1:], eps_mean=jnp.asarray(1), eps_cov=1)
        return jnp.sum(out.mean)

    assert np.all(np.isfinite(np.asarray(jax.grad(loss)(args[0]))))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", list(METHODS))
def test_bound_arrays_get_their_gradients(method, kind):
    """``jax.grad`` with respect to bound arrays gives d<g, out>/d eps (central differences,
    per state), eagerly (the compiled programs) and, for full Gaussians, under ``jit``; a 0-d
    bound gets the sum over the states, and the arrays' gradients are those of constant
    bounds. Before, every bound's cotangent was zero."""
    from test_gradients import FD_RTOL, bound_fd, mixed_case, random_cotangent

    case = mixed_case(method, kind == "full")
    out = case.fn(*case.args, **case.kwargs)
    g = random_cotangent(out, case.full, 3)
    want = bound_fd(case, g)
    args = tuple(jnp.asarray(a) for a in case.args)
    options = {k: v for k, v in case.kwargs.items() if k not in ("eps_mean", "eps_cov")}
    gj = tuple(jnp.asarray(x) for x in g)

    def value(mean, eps_mean, eps_cov):
        o = case.fn(mean, *args[1:], eps_mean=eps_mean, eps_cov=eps_cov, **options)
        return sum(jnp.sum(x * y) for x, y in zip(o, gj, strict=True))

    eps = (jnp.asarray(case.kwargs["eps_mean"]), jnp.asarray(case.kwargs["eps_cov"]))
    grad = jax.grad(value, argnums=(0, 1, 2))
    runs = [grad] + ([jax.jit(grad)] if kind == "full" else [])
    for run in runs:
        g_mean, *got = run(args[0], *eps)
        if run is grad:
            eager_g_mean = g_mean
        for x, w in zip(got, want, strict=True):
            np.testing.assert_allclose(np.asarray(x), w, rtol=0, atol=FD_RTOL * np.max(np.abs(w)))
            assert np.all((np.asarray(x) != 0) == (w != 0))
    constant = jax.grad(lambda m: value(m, *eps))(args[0])  # (bounds not differentiated)
    np.testing.assert_array_equal(np.asarray(eager_g_mean), np.asarray(constant))
    shared = jnp.asarray(np.median(case.kwargs["eps_cov"]))
    one = jax.grad(value, argnums=2)(args[0], eps[0], shared)
    each = jax.grad(value, argnums=2)(args[0], eps[0], jnp.full(4, shared))
    np.testing.assert_allclose(np.asarray(one), np.sum(np.asarray(each)), rtol=1e-12)


def test_min_entropy_gradient():
    rng = np.random.default_rng(6)
    scale = random_cholesky(rng, (4,), 2, cond=10, scale=1.0)
    h = np.asarray(trp.entropy(scale))
    beta = h + np.array([0.3, -0.4, 0.2, -0.1])
    gs = np.tril(rng.standard_normal((4, 2, 2)))
    for equality in (False, True):

        def value(b, equality=equality):
            out = trp.project_entropy(jnp.asarray(scale), jnp.asarray(b), equality=equality)
            return jnp.sum(jnp.asarray(gs) * out)

        fd = np.array([(value(beta + 1e-6 * e) - value(beta - 1e-6 * e)) / 2e-6 for e in np.eye(4)])
        got = np.asarray(jax.grad(value)(jnp.asarray(beta)))
        np.testing.assert_allclose(got, fd, rtol=0, atol=1e-7 * np.max(np.abs(fd)))
        assert equality or np.all(got[[1, 3]] == 0)


@pytest.mark.parametrize(
    "eps_mean", [1, "int array", np.float64(0.05)], ids=["int", "int-array", "np"]
)
def test_array_eps_cov_beside_other_kinds_of_eps_mean(eps_mean):
    """A floating eps_cov array beside an integer, an integer array or a NumPy number for
    eps_mean: gradients of the mean (eager and jit), and of eps_cov, as with a float eps_mean
    (an integer array gets a float0 cotangent)."""
    case = make_case(43, "kl", False, d=2, batch=(3,))
    args = tuple(jnp.asarray(a) for a in case.args)
    em = jnp.asarray([1, 1, 1]) if isinstance(eps_mean, str) else eps_mean
    ec = jnp.asarray(case.kwargs["eps_cov"])

    def value(mean, eps_cov, em=em):
        out = trp.project_kl(mean, *args[1:], eps_mean=em, eps_cov=eps_cov)
        return jnp.sum(out.mean) + jnp.sum(out.scale)

    want = jax.grad(value, argnums=(0, 1))(args[0], ec, float(np.max(np.asarray(em))))
    for run in (jax.grad(value, argnums=(0, 1)), jax.jit(jax.grad(value, argnums=(0, 1)))):
        got = run(args[0], ec)
        for x, w in zip(got, want, strict=True):
            np.testing.assert_allclose(np.asarray(x), np.asarray(w), rtol=1e-12, atol=1e-14)
    if isinstance(eps_mean, str):
        g = jax.grad(lambda e: value(args[0], ec, e), allow_int=True)(em)
        assert g.dtype == jax.dtypes.float0


@pytest.mark.parametrize("method", ["kl", "frobenius", "wasserstein"])
def test_second_derivative_through_a_projection_raises(method):
    """``jax.hessian`` (forward over reverse) and ``jax.jacrev`` of a ``jax.grad`` of a
    projection raise ``SECOND_ORDER_ERROR``: JAX differentiated the hand-written VJP through
    the forward's residuals, NaN for KL where the new covariance is proportional to the old
    (its eigenvalues repeat). First derivatives, eager, under ``jit`` and ``vmap``, stay."""
    from tr_projections.backends import jax as adapter

    mean, old_mean = jnp.full((1, 2), 0.5), jnp.zeros((1, 2))
    old_scale = jnp.eye(2)[None]

    def f(scale):
        out = trp.project(mean, scale, old_mean, old_scale, method=method, eps_mean=0.01,
                          eps_cov=0.01)  # fmt: skip
        return jnp.sum(out.scale**2) + jnp.sum(out.mean**2)

    scale = 2.0 * jnp.eye(2)[None]
    g = jax.grad(f)(scale)
    assert np.all(np.isfinite(np.asarray(g)))
    np.testing.assert_allclose(np.asarray(jax.jit(jax.grad(f))(scale)), np.asarray(g), rtol=1e-12)
    batched = jax.vmap(jax.grad(lambda s: f(s[None])))(scale)
    np.testing.assert_allclose(np.asarray(batched), np.asarray(g), rtol=1e-12, atol=1e-15)
    for second in (jax.hessian, lambda h: jax.jacrev(jax.grad(h))):
        with pytest.raises(TypeError, match="first order only") as info:
            second(f)(scale)
        assert str(info.value) == adapter.SECOND_ORDER_ERROR

    # Through the cotangent alone the VJP is linear, first order: jax.vjp of vjp_fn is the
    # projection's JVP (jax.jvp of a custom_vjp raises), here against central differences.
    def g(s):
        return trp.project(mean, s, old_mean, old_scale, method=method, eps_mean=0.01,
                           eps_cov=0.01).scale  # fmt: skip

    v = jnp.tril(jnp.asarray([[[0.3, 0.0], [-0.2, 0.5]]]))
    out, vjp_fn = jax.vjp(g, scale)
    jv = jax.vjp(vjp_fn, out)[1]((v,))[0]
    fd = (g(scale + 1e-6 * v) - g(scale - 1e-6 * v)) / 2e-6
    np.testing.assert_allclose(np.asarray(jv), np.asarray(fd), rtol=0, atol=1e-8)
