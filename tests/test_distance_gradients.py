"""Gradients of the public distances under each library's own autodiff.

``trp.wasserstein``'s covariance part of full Gaussians is an operation with a hand-written VJP:
torch's and JAX's derivatives of ``eigh`` and the SVD divide by differences of eigenvalues, and
returned NaN for an identity covariance (every d, both libraries) before it was. Every part's
gradient with respect to a Cholesky factor is zero in the strict upper triangle.
"""

from __future__ import annotations

import numpy as np
import pytest
from _data import full_policies

import tr_projections as trp
from tr_projections.testing.strategies import cholesky_factors


def _points(d: int):
    """(scale, old_scale) pairs: random, repeated eigenvalues (multiples of the identity), equal
    policies at the identity, and a shared old policy broadcast against a batch."""
    rng = np.random.default_rng(d)
    eye = np.broadcast_to(np.eye(d), (2, d, d)).copy()
    return [
        (cholesky_factors(rng, (2,), d, cond=30.0), cholesky_factors(rng, (2,), d, cond=30.0)),
        (2.0 * eye, eye),
        (eye, eye.copy()),
        (cholesky_factors(rng, (2,), d, cond=30.0), np.eye(d) * 0.7),
    ]


@pytest.mark.parametrize("scale_prec", [True, False])
@pytest.mark.parametrize("d", [1, 3])
def test_torch_wasserstein_cov_gradients(d, scale_prec):
    torch = pytest.importorskip("torch")

    def part(L, Lo):
        z = torch.zeros(L.shape[:-1], dtype=L.dtype)
        zo = torch.zeros(Lo.shape[:-1], dtype=Lo.dtype)
        return trp.wasserstein(z, torch.tril(L), zo, torch.tril(Lo), scale_prec=scale_prec)[1]

    for L, Lo in _points(d):
        args = tuple(torch.asarray(x).requires_grad_() for x in (L, Lo))
        value = part(*args)
        g = torch.autograd.grad(value.sum(), args)
        assert all(bool(torch.isfinite(x).all()) for x in g)
        assert torch.autograd.gradcheck(part, args, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("scale_prec", [True, False])
@pytest.mark.parametrize("d", [1, 3])
def test_jax_wasserstein_cov_gradients(d, scale_prec):
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from jax.test_util import check_grads

    def part(L, Lo):
        L, Lo = jnp.tril(jnp.asarray(L)), jnp.tril(jnp.asarray(Lo))
        z, zo = jnp.zeros(L.shape[:-1]), jnp.zeros(Lo.shape[:-1])
        return trp.wasserstein(z, L, zo, Lo, scale_prec=scale_prec)[1]

    for L, Lo in _points(d):
        args = (jnp.asarray(L), jnp.asarray(Lo))
        for fn in (part, jax.jit(part)):
            g = jax.grad(lambda *a, fn=fn: jnp.sum(fn(*a)), argnums=(0, 1))(*args)
            assert all(bool(jnp.isfinite(x).all()) for x in g)
        check_grads(part, args, order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_torch_wasserstein_cov_gradients_are_autodiffs(dtype):
    """At random points (distinct eigenvalues, where differentiating ``eigh`` is fine) the
    hand-written VJP gives what torch's autodiff of the plain computation gives, for either
    policy alone, on the NumPy-view route and on torch's kernels."""
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as tns

    from tr_projections import distances
    from tr_projections.backends import torch as adapter

    rng = np.random.default_rng(5)
    L, Lo = (torch.asarray(cholesky_factors(rng, (4,), 3, cond=20.0)) for _ in range(2))
    L, Lo = L.to(getattr(torch, dtype)), Lo.to(getattr(torch, dtype))
    tol = {"float64": 1e-10, "float32": 2e-3}[dtype]
    for which in (0, 1):
        for limit in (adapter.NUMPY_MAX_ELEMENTS, 0):  # (0: torch's kernels)
            args = [L.clone(), Lo.clone()]
            args[which].requires_grad_()
            old_limit, adapter.NUMPY_MAX_ELEMENTS = adapter.NUMPY_MAX_ELEMENTS, limit
            try:
                z = torch.zeros(4, 3, dtype=L.dtype)
                got = torch.autograd.grad(
                    trp.wasserstein(z, *args[:1], z, args[1])[1].sum(), args[which]
                )[0]
            finally:
                adapter.NUMPY_MAX_ELEMENTS = old_limit
            plain = distances.wasserstein_cov(*args, full=True, scale_prec=True, xp=tns)[0]
            want = torch.tril(torch.autograd.grad(plain.sum(), args[which])[0])
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_jax_distance_decompositions_in_turn():
    """d > 32: the mean part's solve is jaxlib's ``trsm``; it waits for the covariance part's
    operation (its SVDs), one LAPACK call at a time."""
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from test_jax_serial import _assert_in_turn, _decompositions

    rng = np.random.default_rng(8)
    d = 33
    args = [
        jnp.asarray(rng.standard_normal((2, d))),
        jnp.asarray(cholesky_factors(rng, (2,), d, cond=10.0)),
        jnp.asarray(rng.standard_normal((2, d))),
        jnp.asarray(cholesky_factors(rng, (2,), d, cond=10.0)),
    ]
    jaxpr = jax.make_jaxpr(trp.wasserstein)(*args).jaxpr
    assert len(_decompositions(jaxpr)) == 2  # the operation (a custom_vjp call) and the solve
    _assert_in_turn(jaxpr)


def test_wasserstein_cov_values_unchanged():
    """The operation returns what the plain computation does, on every library (NumPy takes
    the same forward)."""
    from tr_projections import distances

    for L, Lo in _points(3):
        for scale_prec in (True, False):
            got = trp.wasserstein(np.zeros(3), L, np.zeros(3), Lo, scale_prec=scale_prec)[1]
            want, _ = distances.wasserstein_cov(L, Lo, full=True, scale_prec=scale_prec, xp=np)
            np.testing.assert_array_equal(got, np.broadcast_to(want, got.shape))


@pytest.mark.parametrize("name", ["kl", "frobenius", "wasserstein"])
def test_torch_distance_gradients_are_lower_triangular(name):
    """Under torch's autodiff the gradient of each part of every distance with respect to
    either Cholesky factor is zero in the strict upper triangle (the package's convention for
    factors, as in the projections' VJPs: autodiff of the products and solves inside used to
    fill it), and gradcheck confirms the rest."""
    torch = pytest.importorskip("torch")
    fn = getattr(trp, name)
    m, L, mo, Lo = full_policies(np.random.default_rng(7), 2, 3)
    m, mo = torch.asarray(m), torch.asarray(mo)
    args = tuple(torch.asarray(x).requires_grad_() for x in (L, Lo))
    for part in (0, 1):
        grads = torch.autograd.grad(
            fn(m, args[0], mo, args[1])[part].sum(), args, allow_unused=True
        )
        for g in grads:
            if g is not None:
                assert bool(torch.all(torch.triu(g, 1) == 0)), (name, part)

    def both(L, Lo):
        return sum(fn(m, torch.tril(L), mo, torch.tril(Lo)))

    assert torch.autograd.gradcheck(both, args, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("name", ["kl", "frobenius", "wasserstein"])
def test_jax_distance_gradients_are_lower_triangular(name):
    """The same under JAX's autodiff, eagerly and under ``jit``."""
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from jax.test_util import check_grads

    fn = getattr(trp, name)
    m, L, mo, Lo = (jnp.asarray(x) for x in full_policies(np.random.default_rng(7), 2, 3))
    for part in (0, 1):

        def value(L, Lo, part=part):
            return jnp.sum(fn(m, L, mo, Lo)[part])

        for f in (value, jax.jit(value)):
            for g in jax.grad(f, argnums=(0, 1))(L, Lo):
                assert bool(jnp.all(jnp.triu(g, 1) == 0)), (name, part)

    def both(L, Lo):
        return sum(fn(m, jnp.tril(L), mo, jnp.tril(Lo)))

    check_grads(both, (L, Lo), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ["kl", "frobenius"])
def test_distance_values_ignore_the_gradient_convention(name):
    """The zero upper-triangle gradient changes no value: with the value checks off (as under
    ``jit``), a factor with entries above its diagonal gives torch and JAX the value NumPy
    computes from the whole matrix, and a shared (unbatched) old factor the batched one's."""
    torch = pytest.importorskip("torch")
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    fn = getattr(trp, name)
    m, L, mo, Lo = full_policies(np.random.default_rng(7), 2, 3)
    L = L + 0.1 * np.triu(np.ones((3, 3)), 1)  # (out of contract: not lower triangular)
    with trp.checks(False):
        want = [np.asarray(x) for x in fn(m, L, mo, Lo)]
        shared = [np.asarray(x) for x in fn(m, L, mo, np.broadcast_to(Lo[0], L.shape))]
        for conv in (torch.asarray, jax.numpy.asarray):
            got = fn(*(conv(x) for x in (m, L, mo, Lo)))
            for g, w in zip(got, want, strict=True):
                np.testing.assert_allclose(np.asarray(g), w, rtol=1e-13)
            got = fn(conv(m), conv(L), conv(mo), conv(Lo[0]))
            for g, w in zip(got, shared, strict=True):
                np.testing.assert_allclose(np.asarray(g), w, rtol=1e-13)
