"""W2 projections of full Gaussians given by their symmetric square roots (``root=True``).

The reference is the same projection of the same Gaussians given by Cholesky factors: the
projected roots squared must equal the projected factors' covariances, the distances must agree,
and the VJPs must match central differences and every library's autodiff.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tr_projections as trp
from tr_projections.testing import strategies as trs
from tr_projections.testing.invariants import tolerance

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _root(L: np.ndarray) -> np.ndarray:
    """The symmetric root of L L^T, from the SVD of L (accurate for ill-conditioned L)."""
    U, s, _ = np.linalg.svd(L)
    S = (U * s[..., None, :]) @ np.swapaxes(U, -1, -2)
    return 0.5 * (S + np.swapaxes(S, -1, -2))


def _pair(pair) -> tuple[tuple, tuple]:
    new, old = pair.new, pair.old
    chol = (new.mean, new.scale, old.mean, old.scale)
    roots = (new.mean, _root(new.scale), old.mean, _root(old.scale))
    return chol, roots


@SETTINGS
@given(
    pair=trs.policy_pairs(kind="full", dims=(1, 5), max_cond=1e3),
    scale_prec=st.booleans(),
    data=st.data(),
)
def test_roots_project_as_cholesky_factors_do(backend, pair, scale_prec, data):
    """Same Gaussians, two parametrisations: the projected root squared is the projected
    factor's covariance, the means agree, the bound holds and rows inside keep their root."""
    chol, roots = _pair(pair)
    m, c = trp.wasserstein(*chol, scale_prec=scale_prec)
    m_r, c_r = trp.wasserstein(*roots, scale_prec=scale_prec, root=True)
    tol = tolerance("float64")
    np.testing.assert_allclose(m_r, m, rtol=tol.chart, atol=1e-12)
    np.testing.assert_allclose(c_r, c, rtol=1e-7, atol=1e-12)
    eps_mean, eps_cov = data.draw(trs.bounds_for(m, c))
    kw = {"eps_mean": eps_mean, "eps_cov": eps_cov, "scale_prec": scale_prec}
    ref = trp.project_wasserstein(*chol, **kw)
    args = [backend.asarray(x) for x in roots]
    before = [np.array(x, copy=True) for x in roots]
    out = trp.project_wasserstein(*args, **kw, root=True)
    for x, b in zip(args, before, strict=True):  # nothing written into the caller's arrays
        np.testing.assert_array_equal(backend.to_numpy(x), b)
    mean, S = backend.to_numpy(out.mean), backend.to_numpy(out.scale)
    assert S.shape == np.broadcast_shapes(roots[1].shape, roots[3].shape)
    cov = ref.scale @ np.swapaxes(ref.scale, -1, -2)
    big = np.max(np.abs(cov), axis=(-2, -1), keepdims=True)
    np.testing.assert_allclose(mean, ref.mean, rtol=tol.chart, atol=1e-12)
    assert np.all(np.abs(S @ S - cov) <= 1e-7 * big)
    _, c_out = trp.wasserstein(mean, S, roots[2], roots[3], scale_prec=scale_prec, root=True)
    assert np.all(c_out <= eps_cov * (1.0 + tol.bound))
    inside = np.broadcast_to(c_r <= eps_cov, S.shape[:-2])
    np.testing.assert_array_equal(S[inside], np.broadcast_to(roots[1], S.shape)[inside])


def _data(seed: int, batch: int = 7, d: int = 3):
    """Seeded roots of a batch (new near old), median bounds and cotangents."""
    rng = np.random.default_rng(seed)
    old = trs.cholesky_factors(rng, (batch,), d, cond=30.0, center=0.0)
    new = old @ trs.cholesky_factors(rng, (batch,), d, cond=3.0, center=0.0)
    old_mean = rng.standard_normal((batch, d))
    mean = old_mean + 0.3 * rng.standard_normal((batch, d))
    roots = (mean, _root(new), old_mean, _root(old))
    m, c = trp.wasserstein(*roots, root=True)
    bounds = (float(np.quantile(m, 0.45)), float(np.quantile(c, 0.45)))  # (between rows)
    cots = (rng.standard_normal(roots[0].shape), rng.standard_normal(roots[1].shape))
    return roots, bounds, cots, rng


@pytest.mark.parametrize("scale_prec", [True, False])
def test_root_vjp_matches_central_differences(scale_prec):
    roots, (em, ec), (gm, gs), rng = _data(0)
    kw = {"eps_mean": em, "eps_cov": ec, "scale_prec": scale_prec, "root": True}
    _, vjp_fn = trp.vjp(trp.project_wasserstein, *roots, **kw)
    cots = vjp_fn(trp.Gaussian(gm, gs))

    def loss(args):
        o = trp.project_wasserstein(*args, **kw)
        return float(np.sum(o.mean * gm) + np.sum(o.scale * gs))

    for i in range(4):
        # Symmetric directions for the roots (their cotangents are the symmetric parts').
        v = rng.standard_normal(roots[i].shape)
        if i in (1, 3):
            v = 0.5 * (v + np.swapaxes(v, -1, -2))
        h = 1e-6
        plus = [x + h * v if k == i else x for k, x in enumerate(roots)]
        minus = [x - h * v if k == i else x for k, x in enumerate(roots)]
        fd = (loss(plus) - loss(minus)) / (2 * h)
        assert abs(float(np.sum(cots[i] * v)) - fd) <= 1e-6 * max(1.0, abs(fd)), i


def test_root_gradients_agree_across_libraries():
    torch = pytest.importorskip("torch")
    roots, (em, ec), (gm, gs), _ = _data(1)
    kw = {"eps_mean": em, "eps_cov": ec, "root": True}
    _, vjp_fn = trp.vjp(trp.project_wasserstein, *roots, **kw)
    ref = vjp_fn(trp.Gaussian(gm, gs))
    t = [torch.tensor(x, requires_grad=True) for x in roots]
    out = trp.project_wasserstein(*t, **kw)
    ((out.mean * torch.tensor(gm)).sum() + (out.scale * torch.tensor(gs)).sum()).backward()
    for x, r in zip(t, ref, strict=True):
        np.testing.assert_allclose(x.grad.numpy(), r, rtol=1e-10, atol=1e-12)
    jax = pytest.importorskip("jax")
    jnp = jax.numpy

    def f(*a):
        o = trp.project_wasserstein(*a, **kw)
        return jnp.sum(o.mean * gm) + jnp.sum(o.scale * gs)

    jax.config.update("jax_enable_x64", True)
    a = [jnp.asarray(x) for x in roots]
    for grad in (jax.grad(f, argnums=(0, 1, 2, 3)), jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))):
        for g, r in zip(grad(*a), ref, strict=True):
            np.testing.assert_allclose(np.asarray(g), r, rtol=1e-10, atol=1e-12)


def test_root_distance_gradient_in_torch():
    """trp.wasserstein(root=True) differentiates in torch (the part through its own VJP, the
    mean part through a general solve), and matches central differences."""
    torch = pytest.importorskip("torch")
    roots, _, _, rng = _data(2)
    t = [torch.tensor(x, requires_grad=True) for x in roots]
    m, c = trp.wasserstein(*t, root=True)
    (m.sum() + c.sum()).backward()
    for i in range(4):
        v = rng.standard_normal(roots[i].shape)
        if i in (1, 3):
            v = 0.5 * (v + np.swapaxes(v, -1, -2))
        h = 1e-6

        def total(args):
            a, b = trp.wasserstein(*args, root=True)
            return float(np.sum(a) + np.sum(b))

        plus = [x + h * v if k == i else x for k, x in enumerate(roots)]
        minus = [x - h * v if k == i else x for k, x in enumerate(roots)]
        fd = (total(plus) - total(minus)) / (2 * h)
        assert abs(float(np.sum(t[i].grad.numpy() * v)) - fd) <= 1e-6 * max(1.0, abs(fd)), i


def test_shared_root_is_computed_once_per_state_pair():
    roots, (em, ec), (gm, gs), _ = _data(3)
    mean, S, old_mean, S_o = roots
    kw = {"eps_mean": em, "eps_cov": ec, "root": True}
    spread = [np.broadcast_to(x[0], S.shape).copy() for x in (S, S_o)]
    out1, f1 = trp.vjp(trp.project_wasserstein, mean, S[0], old_mean, S_o[0], **kw)
    out2, f2 = trp.vjp(trp.project_wasserstein, mean, spread[0], old_mean, spread[1], **kw)
    np.testing.assert_allclose(out1.scale, out2.scale, rtol=1e-13, atol=0)
    c1, c2 = f1(trp.Gaussian(gm, gs)), f2(trp.Gaussian(gm, gs))
    for i in (1, 3):
        np.testing.assert_allclose(c1[i], c2[i].sum(0), rtol=1e-10, atol=1e-12)


def test_diagonal_scales_are_roots_already():
    rng = np.random.default_rng(4)
    args = (rng.standard_normal((5, 3)), np.exp(rng.standard_normal((5, 3))), np.zeros(3),
            np.ones(3))  # fmt: skip
    a = trp.project_wasserstein(*args, eps_mean=0.1, eps_cov=0.1)
    b = trp.project_wasserstein(*args, eps_mean=0.1, eps_cov=0.1, root=True)
    np.testing.assert_array_equal(a.scale, b.scale)


@pytest.mark.parametrize(
    ("which", "value", "message"),
    [
        ("scale", "asymmetric", "must be symmetric"),
        ("old_scale", "indefinite", "must be positive definite"),
        ("old_scale", "negative_diagonal", "must have a diagonal of at least"),
        ("scale", "cholesky", "must be symmetric"),
        ("scale", "infinite", "must be finite"),
    ],
)
def test_bad_roots_are_refused_by_name(backend, which, value, message):
    roots, (em, ec), _, _ = _data(5)
    roots = list(roots)
    k = 1 if which == "scale" else 3
    x = roots[k].copy()
    d = x.shape[-1]
    if value == "asymmetric":
        x[2, 0, 1] += 0.1
    elif value == "indefinite":
        x[:] = np.eye(d) + 2.0 * (np.ones((d, d)) - np.eye(d))
    elif value == "negative_diagonal":
        x[4] = -x[4]
    elif value == "cholesky":
        x = np.linalg.cholesky(x @ x)
    else:
        x[1, 0, 0] = np.inf
    roots[k] = x
    args = [backend.asarray(a) for a in roots]
    with pytest.raises(ValueError, match=f"`{which}` \\(a symmetric square root, root=True\\) "
                       f"{message}"):  # fmt: skip
        trp.project_wasserstein(*args, eps_mean=em, eps_cov=ec, root=True)
    with pytest.raises(ValueError, match=f"`{which}`"):
        trp.wasserstein(*args, root=True)


@pytest.mark.parametrize("scale_prec", [True, False])
def test_root_loss_is_the_distance_to_the_projection(scale_prec):
    """trust_region_loss(root=True) is trp.wasserstein's two parts summed, and its VJP into
    (mean, scale) matches central differences; the projected arguments get zeros."""
    roots, (em, ec), _, rng = _data(6)
    kw = {"scale_prec": scale_prec}
    proj = trp.project_wasserstein(*roots, eps_mean=em, eps_cov=ec, root=True, **kw)
    args = (roots[0], roots[1], *proj)
    loss = trp.trust_region_loss(*args, method="wasserstein", root=True, **kw)
    m, c = trp.wasserstein(*args, root=True, **kw)
    np.testing.assert_allclose(loss, m + c, rtol=1e-13, atol=1e-15)
    g = rng.standard_normal(loss.shape)
    _, vjp_fn = trp.vjp(trp.trust_region_loss, *args, method="wasserstein", root=True, **kw)
    cots = vjp_fn(g)
    assert not np.any(cots[2]) and not np.any(cots[3])
    for i in (0, 1):
        v = rng.standard_normal(args[i].shape)
        if i == 1:
            v = 0.5 * (v + np.swapaxes(v, -1, -2))
        h = 1e-6
        plus = [x + h * v if k == i else x for k, x in enumerate(args)]
        minus = [x - h * v if k == i else x for k, x in enumerate(args)]

        def total(a):
            return float(np.sum(g * trp.trust_region_loss(*a, method="wasserstein", root=True,
                                                           **kw)))  # fmt: skip

        fd = (total(plus) - total(minus)) / (2 * h)
        assert abs(float(np.sum(cots[i] * v)) - fd) <= 1e-6 * max(1.0, abs(fd)), i


def test_root_applies_to_wasserstein_only():
    roots, _, _, _ = _data(8)
    with pytest.raises(ValueError, match="method='wasserstein' only"):
        trp.trust_region_loss(*roots, method="kl", root=True)


def test_root_cotangents_symmetric_where_projected_passed_through_inside():
    """On projected rows the new root's cotangent is symmetric (the derivative along symmetric
    perturbations, as the function reads symmetric roots); on rows inside their bound, whose
    output is the input, the incoming cotangent comes back unchanged. The old root's is
    symmetric on every row."""
    roots, (em, ec), (gm, gs), _ = _data(9)
    _, c = trp.wasserstein(*roots, root=True)
    inside = c <= ec
    assert inside.any() and (~inside).any()
    _, vjp_fn = trp.vjp(trp.project_wasserstein, *roots, eps_mean=em, eps_cov=ec, root=True)
    cots = vjp_fn(trp.Gaussian(gm, gs))
    g_new, g_old = cots[1], cots[3]
    np.testing.assert_allclose(
        g_new[~inside], np.swapaxes(g_new[~inside], -1, -2), rtol=1e-12, atol=1e-14
    )
    np.testing.assert_array_equal(g_new[inside], gs[inside])
    # (the old root's: the covariance part's where projected, the mean part's everywhere)
    np.testing.assert_allclose(g_old, np.swapaxes(g_old, -1, -2), rtol=1e-12, atol=1e-14)
