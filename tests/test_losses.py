"""The trust-region loss: its value is the projection's own distance, and its hand-written
gradient matches central differences, flows only into the raw output, and stays finite where
the raw output equals its projection."""

from __future__ import annotations

import numpy as np
import pytest

import tr_projections as trp
from tr_projections.testing.strategies import cholesky_factors

METHODS = ["kl", "frobenius", "wasserstein"]
RNG = np.random.default_rng(8)
B, D = 4, 3


def _case(kind: str, rng=RNG):
    mean, old_mean = rng.normal(size=(B, D)), rng.normal(size=(B, D))
    if kind == "full":
        return (
            mean,
            cholesky_factors(rng, (B,), D, cond=10.0),
            old_mean,
            cholesky_factors(rng, (B,), D, cond=10.0),
        )
    return mean, np.exp(rng.normal(size=(B, D))), old_mean, np.exp(rng.normal(size=(B, D)))


def _options(method):
    return [{}] if method == "kl" else [{"scale_prec": True}, {"scale_prec": False}]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["diag", "full"])
def test_value_is_the_projection_distance(backend, method, kind):
    args = [backend.asarray(x) for x in _case(kind)]
    for opts in _options(method):
        loss = trp.trust_region_loss(*args, method=method, **opts)
        m, c = getattr(trp, method)(*args, **opts)
        np.testing.assert_allclose(
            backend.to_numpy(loss), backend.to_numpy(m) + backend.to_numpy(c), rtol=1e-13
        )


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["diag", "full"])
def test_vjp_matches_central_differences(method, kind):
    """Each entry of the VJP within 1e-6 (relative, at least absolute) of central differences,
    plus their rounding error: each of the two sums they take is off by up to a few machine
    epsilons of its terms' size, divided by the step. (The data is the test's own: with the
    module's shared generator it depended on the order the tests ran in, and a draw with
    losses summing to 2e6 made the differences' rounding 4e-4.)"""
    rng = np.random.default_rng([METHODS.index(method), kind == "full"])
    mean, scale, pm, ps = _case(kind, rng)
    g = rng.normal(size=B)
    for opts in _options(method):

        def f(mu, s, opts=opts):
            return np.sum(g * trp.trust_region_loss(mu, s, pm, ps, method=method, **opts))

        _, vjp_fn = trp.vjp(trp.trust_region_loss, mean, scale, pm, ps, method=method, **opts)
        g_mean, g_scale, g_pm, g_ps = vjp_fn(g)
        assert not np.any(g_pm) and not np.any(g_ps)
        h = 1e-6
        size = np.sum(np.abs(g * trp.trust_region_loss(mean, scale, pm, ps, method=method, **opts)))
        rounding = 64 * np.finfo(np.float64).eps * size / h
        for which, x, got in (("mean", mean, g_mean), ("scale", scale, g_scale)):
            mask = np.tril(np.ones_like(x)) if x.ndim == 3 else np.ones_like(x)
            idx = list(zip(*np.nonzero(mask), strict=True))
            for i in idx:
                e = np.zeros_like(x)
                e[i] = h
                args_p = (mean + e, scale) if which == "mean" else (mean, scale + e)
                args_m = (mean - e, scale) if which == "mean" else (mean, scale - e)
                fd = (f(*args_p) - f(*args_m)) / (2 * h)
                tol = 1e-6 * max(1.0, abs(fd)) + rounding
                assert abs(got[i] - fd) <= tol, (which, i, got[i], fd, tol)
            if x.ndim == 3:  # cotangents of Cholesky factors are lower triangular
                assert not np.any(np.triu(got, 1))


@pytest.mark.parametrize("method", METHODS)
def test_torch_gradient_flows_into_raw_output_only(method):
    """(The data is the test's own: with the module's shared generator it depended on the order
    the tests ran in, and one draw had an entry of 8.5e-4 among entries near 5, which torch's
    and NumPy's sums then put 1.3e-12 apart relative to itself.)"""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng([10, METHODS.index(method)])
    mean, scale, pm, ps = (torch.asarray(x, requires_grad=True) for x in _case("full", rng))
    trp.trust_region_loss(mean, scale, pm, ps, method=method).sum().backward()
    _, vjp_fn = trp.vjp(
        trp.trust_region_loss, *(x.detach().numpy() for x in (mean, scale, pm, ps)), method=method
    )
    ref = vjp_fn(np.ones(B))
    np.testing.assert_allclose(mean.grad.numpy(), ref[0], rtol=1e-12)
    np.testing.assert_allclose(scale.grad.numpy(), ref[1], rtol=1e-12)
    for x in (pm, ps):
        assert x.grad is None or not torch.any(x.grad)


@pytest.mark.parametrize("method", METHODS)
def test_jax_gradient_matches_numpy(method):
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    mean, scale, pm, ps = _case("full")

    def f(mu, s):
        return jnp.sum(
            trp.trust_region_loss(mu, s, jnp.asarray(pm), jnp.asarray(ps), method=method)
        )

    gm, gs = jax.jit(jax.grad(f, argnums=(0, 1)))(jnp.asarray(mean), jnp.asarray(scale))
    _, vjp_fn = trp.vjp(trp.trust_region_loss, mean, scale, pm, ps, method=method)
    ref = vjp_fn(np.ones(B))
    np.testing.assert_allclose(np.asarray(gm), ref[0], rtol=1e-12)
    np.testing.assert_allclose(np.asarray(gs), ref[1], rtol=1e-12)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["diag", "full"])
def test_gradient_is_zero_and_finite_at_the_projection(method, kind):
    """Inside the region the projection is the output itself: loss 0, gradient exactly 0 and
    finite, also for an isotropic covariance (repeated eigenvalues)."""
    mean = RNG.normal(size=(B, D))
    scale = np.broadcast_to(
        np.eye(D) if kind == "full" else np.ones(D), (B,) + ((D, D) if kind == "full" else (D,))
    ).copy()
    loss = trp.trust_region_loss(mean, scale, mean, scale, method=method)
    np.testing.assert_allclose(loss, 0.0, atol=1e-15)
    _, vjp_fn = trp.vjp(trp.trust_region_loss, mean, scale, mean, scale, method=method)
    g_mean, g_scale, _, _ = vjp_fn(np.ones(B))
    assert np.all(np.isfinite(g_mean)) and np.all(np.isfinite(g_scale))
    np.testing.assert_allclose(g_mean, 0.0, atol=1e-14)
    np.testing.assert_allclose(g_scale, 0.0, atol=1e-14)


def test_unknown_method_is_a_clear_error():
    with pytest.raises(ValueError, match="`method` must be one of"):
        trp.trust_region_loss(*_case("diag"), method="hellinger")


def test_scale_prec_false_with_kl_is_an_error(backend):
    """The KL distance is always scaled by the old precision: ``scale_prec=False`` with KL is
    refused by name (it was silently ignored), on every backend; ``True`` describes KL and
    is accepted, with the same value as without it."""
    args = [backend.asarray(x) for x in _case("diag", np.random.default_rng(2))]
    with pytest.raises(ValueError, match="`scale_prec=False` applies to method='frobenius'"):
        trp.trust_region_loss(*args, method="kl", scale_prec=False)
    np.testing.assert_array_equal(
        backend.to_numpy(trp.trust_region_loss(*args, method="kl", scale_prec=True)),
        backend.to_numpy(trp.trust_region_loss(*args, method="kl")),
    )
