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
