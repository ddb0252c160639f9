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


def test_unbatched_bad_roots_are_refused_by_name(backend):
    """A single ``(d, d)`` root (a state-independent covariance) that is not symmetric, or not
    positive definite, is refused with the argument's name and the offending value."""
    mean, old_mean = np.zeros((4, 3)), np.ones((4, 3))
    asym = np.eye(3)
    asym[0, 1] = 0.5
    indefinite = np.eye(3) + 2.0 * (np.ones((3, 3)) - np.eye(3))
    kw = {"eps_mean": 0.1, "eps_cov": 0.1, "root": True}
    for which, bad, message in (
        ("scale", asym, "must be symmetric"),
        ("old_scale", indefinite, "must be positive definite"),
    ):
        S, So = (bad, np.eye(3)) if which == "scale" else (np.eye(3), bad)
        args = [backend.asarray(x) for x in (mean, S, old_mean, So)]
        with pytest.raises(ValueError, match=f"`{which}` .*{message}.*; got "):
            trp.project_wasserstein(*args, **kw)


def test_numerically_singular_root_is_refused_as_the_factorisation_would():
    """A root whose smallest eigenvalue is positive at rounding level only (its Cholesky
    factorisation fails) is refused by the value check, by name, not by the projection's own
    factorisation: the check tries each matrix as the projection does."""
    rng = np.random.default_rng(0)
    for _ in range(3000):  # (seed 0 finds one within the first few hundred)
        q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
        So = (q * np.array([1.0, 1.0, 10.0 ** rng.uniform(-17, -14)])) @ q.T
        So = 0.5 * (So + So.T)
        try:
            np.linalg.cholesky(So)
        except np.linalg.LinAlgError:
            if np.linalg.eigvalsh(So)[0] > 0.0:
                break
    else:
        pytest.skip("no numerically singular root with a positive eigenvalue found")
    olds = np.stack([np.eye(3), So, np.eye(3)])
    args = (np.zeros((3, 3)), np.broadcast_to(np.eye(3), (3, 3, 3)), np.ones((3, 3)), olds)
    with pytest.raises(ValueError, match=r"`old_scale` .*must be positive definite.*index \(1,\)"):
        trp.project_wasserstein(*args, eps_mean=0.1, eps_cov=0.1, root=True)


@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_root_projection_in_chunks_is_the_whole_call(monkeypatch, library):
    """Large calls run in chunks of rows (NumPy arrays and torch CPU tensors, on the threads at
    once): with ``root=True`` the chunks give the whole call's outputs and cotangents."""
    from tr_projections.backends import _common

    roots, (em, ec), (gm, gs), _ = _data(12, batch=40)
    kw = {"eps_mean": em, "eps_cov": ec, "root": True}

    def run():
        if library == "numpy":
            out, vjp_fn = trp.vjp(trp.project_wasserstein, *roots, **kw)
            return (out.scale, *vjp_fn(trp.Gaussian(gm, gs)))
        torch = pytest.importorskip("torch")
        t = [torch.tensor(x, requires_grad=True) for x in roots]
        out = trp.project_wasserstein(*t, **kw)
        ((out.mean * torch.tensor(gm)).sum() + (out.scale * torch.tensor(gs)).sum()).backward()
        return (out.scale.detach().numpy(), *(x.grad.numpy() for x in t))

    whole = run()
    monkeypatch.setattr(_common, "PARALLEL_MIN_NUMBERS", 16)
    if library == "numpy":
        monkeypatch.setattr(_common, "CHUNK_ROWS", 7)
    else:
        from tr_projections.backends import torch as adapter

        monkeypatch.setattr(adapter, "CHUNK_ROWS", 7)
    chunked = run()
    for a, b in zip(whole, chunked, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-13, atol=1e-15)


def test_root_projection_under_jax_vmap():
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy
    roots, (em, ec), (gm, gs), _ = _data(13)
    _, vjp_fn = trp.vjp(trp.project_wasserstein, *roots, eps_mean=em, eps_cov=ec, root=True)
    ref = vjp_fn(trp.Gaussian(gm, gs))

    def one(m, S, mo, So, g1, g2):  # one state (a batch of one inside)
        o = trp.project_wasserstein(m[None], S[None], mo[None], So[None], eps_mean=em,
                                    eps_cov=ec, root=True)  # fmt: skip
        return jnp.sum(o.mean * g1) + jnp.sum(o.scale * g2)

    grads = jax.jit(jax.vmap(jax.grad(one, argnums=(0, 1, 2, 3))))(
        *(jnp.asarray(x) for x in (*roots, gm, gs))
    )
    for g, r in zip(grads, ref, strict=True):
        np.testing.assert_allclose(np.asarray(g), r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("d", "center", "cond", "step"),
    [
        (6, np.log(1e-4), 1e6, 1.0),
        (6, np.log(1e3), 1e6, 1.0),
        (16, 0.0, 1e4, 3.0),
        (2, 0.0, 1e6, 8.0),
    ],
)
def test_roots_at_the_extremes_stay_finite_and_bounded(backend, d, center, cond, step):
    """Stds from 1e-4 to 1e3, condition numbers up to 1e6, large steps: every output finite and
    the projected distance within the float64 bound tolerance of its bound."""
    rng = np.random.default_rng(int(d + cond))
    old = trs.cholesky_factors(rng, (20,), d, cond=cond, center=2.0 * center)
    rel = trs.cholesky_factors(rng, (20,), d, cond=np.exp(2.0 * step), center=0.0)
    roots = (
        rng.standard_normal((20, d)) * np.exp(center),
        _root(old @ rel),
        np.zeros((20, d)),
        _root(old),
    )
    m, c = trp.wasserstein(*roots, root=True)
    em, ec = float(np.quantile(m, 0.3)), float(np.quantile(c, 0.3))
    out = trp.project_wasserstein(*(backend.asarray(x) for x in roots), eps_mean=em, eps_cov=ec,
                                  root=True)  # fmt: skip
    mean, S = backend.to_numpy(out.mean), backend.to_numpy(out.scale)
    assert np.all(np.isfinite(mean)) and np.all(np.isfinite(S))
    m2, c2 = trp.wasserstein(mean, S, roots[2], roots[3], root=True)
    tol = tolerance("float64")
    assert np.all(m2 <= em * (1.0 + tol.bound)) and np.all(c2 <= ec * (1.0 + tol.bound))


def test_root_with_another_loss_is_refused_before_the_value_checks():
    chol = trs.cholesky_factors(np.random.default_rng(14), (3,), 2, cond=3.0)
    args = (np.zeros((3, 2)), chol, np.ones((3, 2)), chol)
    with pytest.raises(ValueError, match="method='wasserstein' only"):
        trp.vjp(trp.trust_region_loss, *args, method="kl", root=True)


def _counting(monkeypatch, module, name):
    """Wrap ``module.name`` so that its calls are counted (the returned list's length)."""
    calls = []
    inner = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return inner(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("d", [1, 2, 6, 17])
@pytest.mark.parametrize("cond", [10.0, 1e6])
def test_torch_cpu_inverse_by_lu_agrees_with_the_cholesky_form(monkeypatch, d, cond):
    """torch CPU tensors take S_o^-1 from one LU solve (``TORCH_CPU_LU_INVERSE``): it agrees
    with the Cholesky form to rounding in the root's condition number, and is symmetric up to
    that; batched, shared (one ``(d, d)`` root) alike."""
    torch = pytest.importorskip("torch")
    from tr_projections import _compat
    from tr_projections.projections import wasserstein as W2

    rng = np.random.default_rng(d)
    roots = _root(trs.cholesky_factors(rng, (40,), d, cond=cond))
    kappa = np.sqrt(cond)  # (the root's own condition number)
    solves = _counting(monkeypatch, torch.linalg, "solve")
    for S in (torch.tensor(roots), torch.tensor(roots[3])):
        xp = _compat.array_namespace(S)
        before = len(solves)
        lu = W2.inverse_root(S, xp=xp).numpy()
        assert len(solves) == before + 1  # (the LU route was taken)
        monkeypatch.setattr(W2, "TORCH_CPU_LU_INVERSE", False)
        chol = W2.inverse_root(S, xp=xp).numpy()
        monkeypatch.setattr(W2, "TORCH_CPU_LU_INVERSE", True)
        assert len(solves) == before + 1
        top = np.max(np.abs(chol), axis=(-2, -1), keepdims=True)
        tol = 64 * kappa * np.finfo(np.float64).eps * top
        assert np.all(np.abs(lu - chol) <= tol)
        assert np.all(np.abs(lu - np.swapaxes(lu, -1, -2)) <= tol)
        np.testing.assert_array_equal(
            np.swapaxes(chol, -1, -2), chol
        )  # (the Cholesky form: symmetric by construction)


def test_torch_kernels_project_roots_as_numpy_does(monkeypatch):
    """On torch's own kernels (no NumPy route: the LU inverse, the PD test in parts), the
    projection of roots and its gradients equal NumPy's, bounds held."""
    torch = pytest.importorskip("torch")
    from tr_projections import _compat

    roots, (em, ec), (gm, gs), _ = _data(21, batch=30, d=4)
    kw = {"eps_mean": em, "eps_cov": ec, "root": True}
    out, vjp_fn = trp.vjp(trp.project_wasserstein, *roots, **kw)
    ref = (out.mean, out.scale, *vjp_fn(trp.Gaussian(gm, gs)))
    # (torch's own kernels, no NumPy route: conftest's autouse fixture)
    monkeypatch.setattr(_compat, "PD_PARALLEL_MIN_BATCH", 0)
    monkeypatch.setattr(_compat, "PD_PARALLEL_MIN_ENTRIES", 0)
    monkeypatch.setattr(_compat, "LAPACK_THREADS", 3)
    solves = _counting(monkeypatch, torch.linalg, "solve")
    parts = _counting(monkeypatch, _compat, "_in_parallel")
    t = [torch.tensor(x, requires_grad=True) for x in roots]
    o = trp.project_wasserstein(*t, **kw)
    ((o.mean * torch.tensor(gm)).sum() + (o.scale * torch.tensor(gs)).sum()).backward()
    assert solves and len(parts) >= 2  # (both roots' PD tests in parts)
    got = (o.mean.detach(), o.scale.detach(), *(x.grad for x in t))
    for a, b in zip(got, ref, strict=True):
        np.testing.assert_allclose(a.numpy(), b, rtol=1e-9, atol=1e-12)
    m, c = trp.wasserstein(o.mean.detach(), o.scale.detach(), *t[2:], root=True)
    tol = tolerance("float64")
    assert torch.all(m <= em * (1.0 + tol.bound)) and torch.all(c <= ec * (1.0 + tol.bound))


def test_positive_definite_in_parts_finds_each_failing_matrix(monkeypatch):
    """The PD test split over threads (torch CPU) reports the same matrices as one call, for
    leaves that require grad and batches of several axes; a bad root is still named by its
    index in the whole batch."""
    torch = pytest.importorskip("torch")
    from tr_projections import _compat

    rng = np.random.default_rng(22)
    good = _root(trs.cholesky_factors(rng, (2, 7), 3, cond=10.0))
    S = good.copy()
    bad = [(1, 2), (1, 3), (1, 6)]  # (all in the second part: flat rows 8 to 13)
    for i in bad:
        S[i] = np.eye(3) + 2.0 * (np.ones((3, 3)) - np.eye(3))  # (indefinite, diagonal 1)
    t = torch.tensor(S, requires_grad=True)
    xp = _compat.array_namespace(t)
    expected = np.ones((2, 7), dtype=bool)
    for i in bad:
        expected[i] = False
    np.testing.assert_array_equal(_compat.positive_definite(t, xp=xp).numpy(), expected)
    monkeypatch.setattr(_compat, "PD_PARALLEL_MIN_BATCH", 0)
    monkeypatch.setattr(_compat, "PD_PARALLEL_MIN_ENTRIES", 0)
    monkeypatch.setattr(_compat, "LAPACK_THREADS", 3)
    parts = _counting(monkeypatch, _compat, "_in_parallel")
    np.testing.assert_array_equal(_compat.positive_definite(t, xp=xp).numpy(), expected)
    assert len(parts) == 1
    args = (torch.zeros(2, 7, 3), torch.tensor(good), torch.zeros(2, 7, 3), t)
    named = r"`old_scale` .*must be positive definite.*index \(1, 2\)"
    with pytest.raises(ValueError, match=named):
        trp.project_wasserstein(*args, eps_mean=0.1, eps_cov=0.1, root=True)


def test_indefinite_root_with_checks_off_as_documented():
    """docs/robustness.md: with the value checks off, an indefinite (nonsingular) old root
    raises in NumPy's Cholesky factorisation, and gives finite output on torch's own kernels
    (S_o^-1 by LU)."""
    roots, (em, ec), _, _ = _data(23, batch=6, d=3)
    roots = list(roots)
    roots[3] = roots[3].copy()
    roots[3][2] = np.diag([1.0, -1.0, 2.0])
    kw = {"eps_mean": em, "eps_cov": ec, "root": True}
    with trp.checks(False), pytest.raises(np.linalg.LinAlgError):
        trp.project_wasserstein(*roots, **kw)
    torch = pytest.importorskip("torch")
    with trp.checks(False):
        out = trp.project_wasserstein(*(torch.tensor(x) for x in roots), **kw)
    assert torch.all(torch.isfinite(out.scale)) and torch.all(torch.isfinite(out.mean))


def _gpu_backends() -> list[str]:
    from tr_projections.testing import available_backends

    names = [n for n in available_backends() if n in ("torch_cuda", "cupy")]
    if "jax" in available_backends():
        import jax

        if jax.default_backend() == "gpu":  # the "jax" backend's arrays live on the GPU
            names.append("jax")
    return names


@pytest.mark.parametrize("name", _gpu_backends())
def test_large_gpu_root_batches(name):
    """70,000 symmetric 6-D roots, every one outside its bound, project on the GPU within their
    bounds (more matrices than torch's CUDA ``eigh`` took in one call; the root form factorises
    instead), their VJP is finite, and sampled rows equal NumPy's."""
    from tr_projections.testing import get_backend

    backend = get_backend(name)
    rng = np.random.default_rng(24)
    n, d = 70_000, 6
    S_o = _root(trs.cholesky_factors(rng, (n,), d, cond=10.0))
    S = _root(trs.cholesky_factors(rng, (n,), d, cond=10.0))
    mean, old_mean = rng.standard_normal((2, n, d))
    kw = {"eps_mean": 1e-3, "eps_cov": 1e-3, "root": True}
    roots = (mean, S, old_mean, S_o)
    m, c = trp.wasserstein(*roots, root=True)
    assert np.min(m) > kw["eps_mean"] and np.min(c) > kw["eps_cov"]  # every state projected
    args = [backend.asarray(x) for x in roots]
    out, vjp_fn = trp.vjp(trp.project_wasserstein, *args, **kw)
    cots = vjp_fn(trp.Gaussian(*(backend.asarray(rng.standard_normal(x.shape)) for x in roots[:2])))
    mean_p, S_p = backend.to_numpy(out.mean), backend.to_numpy(out.scale)
    assert np.all(np.isfinite(mean_p)) and np.all(np.isfinite(S_p))
    assert all(np.all(np.isfinite(backend.to_numpy(x))) for x in cots)
    tol = tolerance("float64")
    m_p, c_p = trp.wasserstein(mean_p, S_p, old_mean, S_o, root=True)
    assert np.all(m_p <= kw["eps_mean"] * (1 + tol.bound))
    assert np.all(c_p <= kw["eps_cov"] * (1 + tol.bound))
    rows = rng.choice(n, 64, replace=False)
    ref = trp.project_wasserstein(*(x[rows] for x in roots), **kw)
    np.testing.assert_allclose(S_p[rows], ref.scale, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(mean_p[rows], ref.mean, rtol=1e-10, atol=1e-12)


def _stopped_cholesky(a: np.ndarray) -> np.ndarray:
    """What an unblocked ``potrf`` leaves in the lower triangle of a symmetric matrix that is
    not positive definite, as cuSOLVER's does through CuPy (no error, no NaN): the columns
    before the first non-positive pivot factorised, that pivot and the rest as they stood."""
    L = np.tril(np.array(a, dtype=np.float64, copy=True))
    d = L.shape[-1]
    for j in range(d):
        pivot = L[j, j] - L[j, :j] @ L[j, :j]
        if not pivot > 0.0:
            L[j, j] = pivot
            return L
        L[j, j] = np.sqrt(pivot)
        L[j + 1 :, j] = (L[j + 1 :, j] - L[j + 1 :, :j] @ L[j, :j]) / L[j, j]
    return L


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_factor_holds_tells_a_factor_from_a_stopped_factorisation(dtype):
    """``_compat.factor_holds`` (the PD test of libraries whose Cholesky routine returns
    whatever happened: CuPy, JAX) accepts the factors of positive definite roots up to
    condition number 1e6 and refuses a stopped factorisation, a NaN factor and a factor with a
    non-positive diagonal, matrix by matrix."""
    from tr_projections import _compat

    rng = np.random.default_rng(25)
    xp = _compat.array_namespace(np.zeros(1))
    good = _root(trs.cholesky_factors(rng, (12,), 4, cond=1e6)).astype(dtype)
    L = np.linalg.cholesky(good)
    np.testing.assert_array_equal(_compat.factor_holds(good, L, xp=xp), np.ones(12, bool))
    bad = good.copy()
    bad[1] = np.eye(4) + 2.0 * (np.ones((4, 4)) - np.eye(4))  # (indefinite, diagonal 1)
    bad[5] = np.diag([1.0, -1.0, 2.0, 3.0])
    bad[7] = np.diag([1.0, 2.0, 3.0, 0.0])  # (singular: its last pivot is 0)
    L = np.linalg.cholesky(good).copy()
    for i in (1, 5, 7):
        L[i] = _stopped_cholesky(bad[i])
    L[9] = np.nan  # (JAX's failed factor)
    L[10] = -L[10]  # (a factor with a negative diagonal is not the Cholesky factor)
    bad[9] = good[9]
    expected = np.ones(12, bool)
    expected[[1, 5, 7, 9, 10]] = False
    np.testing.assert_array_equal(_compat.factor_holds(bad, L.astype(dtype), xp=xp), expected)
