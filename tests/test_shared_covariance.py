"""A covariance shared by the states (scales and bound passed without the batch axes): the
covariance part is computed once per distinct covariance, with the same values and cotangents
as for the explicitly broadcast arrays, on every backend."""

from __future__ import annotations

import numpy as np
import pytest
from _data import spd

import tr_projections as trp
from tr_projections import _compat
from tr_projections.projections import _core

METHODS = ["kl", "frobenius", "wasserstein"]


def _case(rng, full, batch, scale_batch, old_batch, d=3):
    mean = rng.standard_normal(batch + (d,))
    old_mean = mean + 0.3 * rng.standard_normal(batch + (d,))
    if full:
        scale, old_scale = (np.linalg.cholesky(spd(rng, b, d)) for b in (scale_batch, old_batch))
    else:
        scale = rng.uniform(0.3, 3.0, scale_batch + (d,))
        old_scale = rng.uniform(0.3, 3.0, old_batch + (d,))
    return mean, scale, old_mean, old_scale


# (batch, scale's batch, old scale's batch, eps_cov's shape, the covariance part's batch)
SHAPES = [
    ((40,), (), (), (), (1,)),  # one covariance for every state
    ((40,), (1,), (), (1,), (1,)),
    ((4, 10), (4, 1), (1, 1), (), (4, 1)),  # shared along the second axis only
    ((4, 10), (), (), (4, 1), (4, 1)),  # ... through the bound
    ((40,), (40,), (), (), None),  # not shared: the new scales differ
    ((40,), (), (), (40,), None),  # ... the bounds differ
]


@pytest.mark.usefixtures("jax_traced_afresh")
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("full", [True, False], ids=["full", "diag"])
@pytest.mark.parametrize(("batch", "sb", "ob", "eb", "cb"), SHAPES)
def test_shared_covariance_equals_broadcast(backend, method, full, batch, sb, ob, eb, cb):
    """Outputs and all four cotangents (``trp.vjp``) equal those of the same arrays broadcast to
    the batch (cotangents summed over the broadcast axes), to rounding; the covariance part saw
    the batch ``cb`` (``None``: the whole batch). JAX arrays take the compiled route, its
    programs traced here (conftest.py), so the spy sees their trace."""
    rng = np.random.default_rng(len(batch) * 100 + len(sb) * 10 + len(eb))
    arrays = _case(rng, full, batch, sb, ob)
    ev = 2 if full else 1
    eps_cov = rng.uniform(0.01, 0.1, eb) if eb else 0.02
    wide = [np.array(np.broadcast_to(x, batch + x.shape[x.ndim - k :]))
            for x, k in zip(arrays, (1, ev, 1, ev), strict=True)]  # fmt: skip
    eps_wide = np.array(np.broadcast_to(eps_cov, batch))
    g_mean = rng.standard_normal(batch + (3,))
    g_scale = rng.standard_normal(batch + ((3, 3) if full else (3,)))
    seen = []
    original = _core.cov_problem

    def spy(p, eps=None, **kw):
        pc, shared = original(p, eps, **kw)
        if eps is not None:
            seen.append(None if shared is None else pc.batch)
        return pc, shared

    conv, back = backend.asarray, backend.to_numpy
    results = []
    for args, eps in ((arrays, eps_cov), (wide, eps_wide)):
        seen.clear()
        eps_b = conv(np.asarray(eps)) if np.ndim(eps) else eps
        mp = pytest.MonkeyPatch()
        mp.setattr(_core, "cov_problem", spy)
        for module in ("kl", "frobenius", "wasserstein"):
            mp.setattr(f"tr_projections.projections.{module}.cov_problem", spy)
        try:
            out, vjp_fn = trp.vjp(
                trp.project, *(conv(x) for x in args),
                method=method, eps_mean=0.05, eps_cov=eps_b,
            )  # fmt: skip
            cots = vjp_fn((conv(g_mean), conv(g_scale)))
        finally:
            mp.undo()
        results.append(([back(out.mean), back(out.scale)], [back(c) for c in cots], seen[:]))
    (out1, cots1, seen1), (out2, cots2, seen2) = results
    assert seen1 == [cb] and seen2 == [None]
    for a, b in zip(out1, out2, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    for c, w, x in zip(cots1, cots2, arrays, strict=True):
        assert c.shape == x.shape
        axes = tuple(range(w.ndim - c.ndim)) + tuple(
            w.ndim - c.ndim + i
            for i, n in enumerate(c.shape)
            if n == 1 != w.shape[w.ndim - c.ndim + i]
        )
        want = np.sum(w, axis=axes).reshape(c.shape) if axes else w
        np.testing.assert_allclose(c, want, rtol=1e-10, atol=1e-10 * (1 + np.abs(want).max()))


@pytest.mark.parametrize("method", METHODS)
def test_shared_covariance_decomposed_once(method, monkeypatch):
    """For full Gaussians with one covariance for all states, the batched decompositions of the
    covariance part take one matrix (not one per state), and the output is a writable array of
    its own for every state."""
    rng = np.random.default_rng(8)
    mean, scale, old_mean, old_scale = _case(rng, True, (500,), (), ())
    sizes = []
    for name in ("eigh", "svd", "qr_r", "cholesky"):
        original = getattr(_compat, name)

        def spy(a, *args, _f=original, **kw):
            sizes.append(int(np.prod(a.shape[:-2])))
            return _f(a, *args, **kw)

        monkeypatch.setattr(_compat, name, spy)
    monkeypatch.setattr("tr_projections.projections.frobenius.cholesky", _compat.cholesky)
    out = trp.project(mean, scale, old_mean, old_scale, method=method, eps_mean=0.05, eps_cov=1e-3)
    assert sizes and max(sizes) == 1
    assert out.scale.shape == (500, 3, 3) and out.scale.flags.writeable
    assert out.scale.flags.c_contiguous  # (a broadcast's copy is laid out as a fresh array)
    out.scale[0] = 0.0  # (no other row changes: not a broadcast view)
    assert np.all(np.diagonal(out.scale[1]) > 0.0)
    np.testing.assert_array_equal(
        out.scale[2], trp.project(mean[:1], scale, old_mean[:1], old_scale, method=method,
                                  eps_mean=0.05, eps_cov=1e-3).scale[0]
    )  # fmt: skip


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("full", [True, False], ids=["full", "diag"])
def test_torch_parameter_covariance(method, full):
    """A state-independent torch parameter passed unexpanded gets the gradient that the expanded
    one gets (autograd's sum over the states)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    arrays = _case(rng, full, (30,), (), ())
    grads = []
    for expand in (False, True):
        mean, scale, old_mean, old_scale = (torch.tensor(x, requires_grad=True) for x in arrays)
        s = scale.expand((30,) + tuple(scale.shape)) if expand else scale
        out = trp.project(mean, s, old_mean, old_scale, method=method, eps_mean=0.05,
                          eps_cov=1e-2)  # fmt: skip
        (out.mean.square().sum() + (out.scale**3).sum()).backward()
        grads.append([x.grad.numpy() for x in (mean, scale, old_mean, old_scale)])
    for a, b in zip(*grads, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_jax_jit_grad_shared_covariance(method):
    """Under ``jax.jit`` and ``jax.grad`` a shared full covariance gives the gradients of the
    broadcast one."""
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    rng = np.random.default_rng(4)
    arrays = [jnp.asarray(x) for x in _case(rng, True, (30,), (), ())]

    def loss(mean, scale, old_mean, old_scale, expand):
        if expand:
            scale = jnp.broadcast_to(scale, (30, 3, 3))
            old_scale = jnp.broadcast_to(old_scale, (30, 3, 3))
        out = trp.project(mean, scale, old_mean, old_scale, method=method, eps_mean=0.05,
                          eps_cov=1e-2)  # fmt: skip
        return jnp.sum(out.mean**2) + jnp.sum(out.scale**3)

    g = [jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)), static_argnums=4)(*arrays, e)
         for e in (False, True)]  # fmt: skip
    for a, b in zip(*g, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12)


@pytest.mark.numpy_route
@pytest.mark.parametrize("full", [True, False], ids=["full", "diag"])
def test_torch_numpy_route_shared_covariance(full):
    """Small torch CPU batches (the adapter's NumPy kernels): a shared covariance gives
    contiguous output tensors and the gradients of the expanded one."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    arrays = _case(rng, full, (50,), (), ())
    grads, outs = [], []
    for expand in (False, True):
        mean, scale, old_mean, old_scale = (torch.tensor(x, requires_grad=True) for x in arrays)
        s = scale.expand((50,) + tuple(scale.shape)) if expand else scale
        out = trp.project_wasserstein(mean, s, old_mean, old_scale, eps_mean=0.05, eps_cov=1e-2)
        assert out.scale.is_contiguous() and out.scale.view(-1).shape[0] == out.scale.numel()
        (out.mean.square().sum() + (out.scale**3).sum()).backward()
        outs.append(out.scale.detach().numpy())
        grads.append([x.grad.numpy() for x in (mean, scale, old_mean, old_scale)])
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-12, atol=1e-14)
    for a, b in zip(*grads, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------- the trust-region loss

# (batch, scale's batch, projected scale's batch, the covariance part's batch)
LOSS_SHAPES = [
    ((40,), (), (), (1,)),  # one covariance and one projection for every state
    ((40,), (1,), (), (1,)),
    ((4, 10), (4, 1), (1, 1), (4, 1)),  # shared along the second axis only
    ((40,), (), (40,), None),  # not shared: the projected scales differ
]


#: (concrete JAX arrays op by op here: the shared covariance on that route, and the loss's
#: spy on the eager computation; the compiled route's is test_shared_covariance_equals_broadcast)
@pytest.mark.usefixtures("jax_op_by_op")
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("full", [True, False], ids=["full", "diag"])
@pytest.mark.parametrize(("batch", "sb", "pb", "cb"), LOSS_SHAPES)
def test_shared_covariance_loss_equals_broadcast(backend, method, full, batch, sb, pb, cb):
    """``trust_region_loss`` with shared scales: per-state values and the cotangents of
    ``(mean, scale)`` (``trp.vjp``) equal those of the broadcast arrays (summed over the
    broadcast axes), and the covariance part saw the batch ``cb`` (``None``: every state); the
    projected arguments' cotangents are zero, of their own shapes."""
    rng = np.random.default_rng(len(batch) * 10 + len(pb))
    mean, scale, proj_mean, proj_scale = _case(rng, full, batch, sb, pb)
    ev = 2 if full else 1
    wide = [
        np.array(np.broadcast_to(x, batch + x.shape[x.ndim - ev :])) for x in (scale, proj_scale)
    ]
    g = rng.standard_normal(batch)
    seen = []

    def spy(p, eps=None, **kw):
        pc, shared = original(p, eps, **kw)
        if "marker" not in kw:
            seen.append(None if shared is None else pc.batch)
        return pc, shared

    original = _core.cov_problem
    conv, back = backend.asarray, backend.to_numpy
    results = []
    for s, ps in ((scale, proj_scale), wide):
        seen.clear()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("tr_projections.losses.cov_problem", spy)
            loss, vjp_fn = trp.vjp(
                trp.trust_region_loss, *(conv(x) for x in (mean, s, proj_mean, ps)), method=method
            )
            cots = [back(c) for c in vjp_fn(conv(g))]
        results.append((back(loss), cots, seen[:]))
    (l1, c1, seen1), (l2, c2, seen2) = results
    assert seen1 == [cb] and seen2 == [None]
    assert l1.shape == batch
    np.testing.assert_allclose(l1, l2, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(c1[0], c2[0], rtol=1e-12, atol=1e-12)
    axes = tuple(range(len(batch) - len(sb))) + tuple(
        len(batch) - len(sb) + i
        for i, n in enumerate(sb)
        if n == 1 != batch[len(batch) - len(sb) + i]
    )
    want = np.sum(c2[1], axis=axes).reshape(scale.shape) if axes else c2[1]
    assert c1[1].shape == scale.shape
    np.testing.assert_allclose(c1[1], want, rtol=1e-10, atol=1e-10 * (1 + np.abs(want).max()))
    for c, x in ((c1[2], proj_mean), (c1[3], proj_scale)):
        assert c.shape == x.shape and not np.any(c)


@pytest.mark.parametrize("method", METHODS)
def test_shared_covariance_loss_decomposed_once(method, monkeypatch):
    """A loss of 500 states with one full covariance and one projected covariance decomposes
    one matrix per decomposition (``eigh``, SVD: what the loss uses), not one per state. (Only
    W2's decomposes: the KL loss takes the closed form of ``distances.kl_cov_closed``.)"""
    rng = np.random.default_rng(9)
    mean, scale, proj_mean, proj_scale = _case(rng, True, (500,), (), ())
    sizes = []
    for name in ("eigh", "svd"):
        original = getattr(_compat, name)

        def spy(a, *args, _f=original, **kw):
            sizes.append(int(np.prod(a.shape[:-2])))
            return _f(a, *args, **kw)

        monkeypatch.setattr(_compat, name, spy)
    loss = trp.trust_region_loss(mean, scale, proj_mean, proj_scale, method=method)
    assert loss.shape == (500,)
    assert max(sizes, default=1) == 1
    assert bool(sizes) == (method == "wasserstein")


@pytest.mark.parametrize(
    "route", ["torch_kernels", pytest.param("numpy_route", marks=pytest.mark.numpy_route)]
)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("full", [True, False], ids=["full", "diag"])
def test_torch_parameter_covariance_loss(method, full, route):
    """In torch (its kernels, and the adapter's NumPy route for small CPU batches), a
    state-independent std or factor passed unexpanded to the loss gets the gradient of the
    expanded one."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    arrays = _case(rng, full, (30,), (), ())
    ev = 2 if full else 1
    grads = []
    for expand in (False, True):
        mean, scale = (torch.tensor(x, requires_grad=True) for x in arrays[:2])
        proj_mean, proj_scale = (torch.tensor(x) for x in arrays[2:])
        s, ps = (x.expand((30,) + tuple(x.shape[x.ndim - ev :])) if expand else x
                 for x in (scale, proj_scale))  # fmt: skip
        loss = trp.trust_region_loss(mean, s, proj_mean, ps, method=method)
        (loss * torch.linspace(0.5, 1.5, 30, dtype=loss.dtype)).sum().backward()
        grads.append([mean.grad.numpy(), scale.grad.numpy()])
    for a, b in zip(*grads, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_torch_vmap_shared_covariance_loss(method):
    """``torch.func.vmap`` over the states with the scales unbatched (``in_dims=None``): the
    per-state losses and the gradient of their weighted sum equal the unmapped call's."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    mean, scale, proj_mean, proj_scale = (torch.tensor(x) for x in _case(rng, True, (12,), (), ()))
    w = torch.linspace(0.5, 1.5, 12, dtype=mean.dtype)

    def one(m, s, pm, ps):
        return trp.trust_region_loss(m, s, pm, ps, method=method)

    mapped = torch.func.vmap(one, in_dims=(0, None, 0, None))(mean, scale, proj_mean, proj_scale)
    whole = one(mean, scale, proj_mean, proj_scale)
    np.testing.assert_allclose(mapped.numpy(), whole.numpy(), rtol=1e-12, atol=1e-12)

    def total(m, s, batched):
        if batched:
            out = torch.func.vmap(one, in_dims=(0, None, 0, None))(m, s, proj_mean, proj_scale)
        else:
            out = one(m, s, proj_mean, proj_scale)
        return (out * w).sum()

    g = [torch.func.grad(total, argnums=(0, 1))(mean, scale, b) for b in (True, False)]
    for a, b in zip(*g, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("full", [True, False], ids=["full", "diag"])
def test_jax_jit_grad_shared_covariance_loss(method, full):
    """Under ``jax.jit`` and ``jax.grad`` a shared std or factor passed to the loss gives the
    gradients of the broadcast one."""
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    rng = np.random.default_rng(6)
    ev = 2 if full else 1
    ja = [jnp.asarray(x) for x in _case(rng, full, (30,), (), ())]

    def total(mean, scale, proj_mean, proj_scale, expand):
        if expand:
            scale, proj_scale = (jnp.broadcast_to(x, (30,) + x.shape[x.ndim - ev :])
                                 for x in (scale, proj_scale))  # fmt: skip
        loss = trp.trust_region_loss(mean, scale, proj_mean, proj_scale, method=method)
        return jnp.sum(loss * jnp.linspace(0.5, 1.5, 30))

    jg = [jax.jit(jax.grad(total, argnums=(0, 1)), static_argnums=4)(*ja, e) for e in (False, True)]
    for a, b in zip(*jg, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12)
