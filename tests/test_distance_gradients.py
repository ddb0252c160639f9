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


def _kl_quadratic_form(L_o, vm, vs):
    r"""``v^T H v`` of the summed KL at the old policy, in closed form: the mean part
    :math:`\tfrac12\delta^\top\Lambda_o\delta` gives :math:`|L_o^{-1}v_m|^2`, and the covariance
    part :math:`\tfrac12\|F\|^2 + \sum_i(F_{ii} - \log(1 + F_{ii}))` with
    :math:`F = L_o^{-1}(L - L_o)` gives :math:`\|G\|_F^2 + \sum_i G_{ii}^2`,
    :math:`G = L_o^{-1}v_s` (``vs`` lower triangular)."""
    y = np.linalg.solve(L_o, vm[..., None])[..., 0]
    G = np.linalg.solve(L_o, vs)
    return float(np.sum(y * y) + np.sum(G * G) + np.sum(np.diagonal(G, axis1=-2, axis2=-1) ** 2))


@pytest.mark.parametrize("library", ["torch", "jax"])
@pytest.mark.parametrize("d", [1, 3, 6])
def test_kl_hessian_at_the_old_policy(library, d):
    """The KL's Hessian-vector product where the new policy equals the old one (TRPO's Fisher-
    vector product) is finite and equals the closed form, torch (double backward) and JAX
    (forward over reverse, eager and jitted) alike. Through ``eigh`` it was NaN there: every
    eigenvalue of the problem repeats."""
    rng = np.random.default_rng(d)
    L_o = cholesky_factors(rng, (4,), d, cond=30.0)
    mean = rng.standard_normal((4, d))
    vm, vs = rng.standard_normal((4, d)), np.tril(rng.standard_normal((4, d, d)))
    want = _kl_quadratic_form(L_o, vm, vs)
    got = []
    if library == "torch":
        torch = pytest.importorskip("torch")
        m, L = (torch.asarray(x).requires_grad_() for x in (mean, L_o))
        kl = trp.kl(m, L, torch.asarray(mean), torch.asarray(L_o))
        grads = torch.autograd.grad(kl.mean.sum() + kl.cov.sum(), (m, L), create_graph=True)
        v = (torch.asarray(vm), torch.asarray(vs))
        hv = torch.autograd.grad(sum((g * w).sum() for g, w in zip(grads, v, strict=True)), (m, L))
        got.append(sum(float((h * w).sum()) for h, w in zip(hv, v, strict=True)))
    else:
        jax = pytest.importorskip("jax")
        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp

        old = (jnp.asarray(mean), jnp.asarray(L_o))

        def total(m, L):
            return sum(jnp.sum(part) for part in trp.kl(m, L, *old))

        grad = jax.grad(total, argnums=(0, 1))
        for g in (grad, jax.jit(grad)):
            _, hv = jax.jvp(g, old, (jnp.asarray(vm), jnp.asarray(vs)))
            got.append(sum(float(jnp.sum(h * v)) for h, v in zip(hv, (vm, vs), strict=True)))
    for value in got:
        assert np.isfinite(value)
        np.testing.assert_allclose(value, want, rtol=1e-10)


def _kl_cov_derivatives(library):
    """``(grad, hvp)`` of the summed KL covariance part in the scale, as NumPy functions of
    ``(L, L_o)`` and ``(L, L_o, v)``, by the library's own autodiff."""
    if library == "torch":
        torch = pytest.importorskip("torch")

        def torch_grad(L, L_o, create=False):
            t = torch.asarray(L).requires_grad_()
            zeros = torch.zeros(L.shape[:-1], dtype=t.dtype)
            c = trp.kl(zeros, t, zeros, torch.asarray(L_o)).cov.sum()
            return torch.autograd.grad(c, t, create_graph=create)[0], t

        def torch_hvp(L, L_o, v):
            g, t = torch_grad(L, L_o, create=True)
            return torch.autograd.grad((g * torch.asarray(v)).sum(), t)[0].numpy()

        return (lambda L, L_o: torch_grad(L, L_o)[0].numpy()), torch_hvp
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    def cov(L, L_o):
        zeros = jnp.zeros(L.shape[:-1])
        return jnp.sum(trp.kl(zeros, L, zeros, L_o).cov)

    def jax_grad(L, L_o):
        return np.asarray(jax.grad(cov)(jnp.asarray(L), jnp.asarray(L_o)))

    def jax_hvp(L, L_o, v):
        grad = jax.grad(lambda x: cov(x, jnp.asarray(L_o)))
        return np.asarray(jax.jvp(grad, (jnp.asarray(L),), (jnp.asarray(v),))[1])

    return jax_grad, jax_hvp


@pytest.mark.parametrize("library", ["torch", "jax"])
def test_kl_second_derivatives_match_differences_of_the_gradient(library):
    """Away from the old policy too (and at repeated eigenvalues), the KL's Hessian-vector
    product matches central differences of its gradient; the gradient itself matches central
    differences of the value."""
    grad, hvp = _kl_cov_derivatives(library)
    rng = np.random.default_rng(11)
    d = 4
    eye = np.broadcast_to(np.eye(d), (3, d, d)).copy()
    points = [
        (cholesky_factors(rng, (3,), d, cond=30.0), cholesky_factors(rng, (3,), d, cond=30.0)),
        (2.0 * eye, eye),
    ]
    h = 1e-5
    for L, L_o in points:
        v = np.tril(rng.standard_normal(L.shape))
        want_hv = (grad(L + h * v, L_o) - grad(L - h * v, L_o)) / (2 * h)
        got_hv = hvp(L, L_o, v)
        np.testing.assert_allclose(got_hv, want_hv, rtol=1e-6, atol=1e-7 * np.max(np.abs(want_hv)))
        zeros = np.zeros((3, d))
        value = [float(np.sum(trp.kl(zeros, x, zeros, L_o).cov)) for x in (L + h * v, L - h * v)]
        np.testing.assert_allclose(np.sum(grad(L, L_o) * v), (value[0] - value[1]) / (2 * h),
                                   rtol=1e-7)  # fmt: skip
