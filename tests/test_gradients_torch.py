"""The torch adapter: ``torch.autograd.gradcheck`` on every projection, active and inactive
states; ``loss.backward()`` and ``torch.func`` give the hand-written VJP (``torch.compile``:
``test_torch_compile.py``)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from test_gradients import (  # noqa: E402
    KINDS,
    METHODS,
    assert_cotangents_close,
    make_case,
    numpy_vjp,
    random_cholesky,
)

import tr_projections as trp  # noqa: E402

ARGS = ("mean", "scale", "old_mean", "old_scale")


def _tensors(case, requires_grad=True):
    args = tuple(torch.tensor(a, requires_grad=requires_grad) for a in case.args)
    kwargs = {
        k: torch.tensor(v) if isinstance(v, np.ndarray) else v for k, v in case.kwargs.items()
    }
    return args, kwargs


def _function(case, kwargs):
    """The projection as a function of tensors; full scales enter through ``tril`` so that
    gradcheck's perturbations of the (unused) upper triangle are no-ops, as for the VJP."""

    def f(mean, scale, old_mean, old_scale):
        if case.full:
            scale, old_scale = torch.tril(scale), torch.tril(old_scale)
        out = case.fn(mean, scale, old_mean, old_scale, **kwargs)
        return out.mean, out.scale

    return f


@pytest.mark.parametrize("states", ["mixed", "active", "inactive"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", list(METHODS))
def test_gradcheck(method, kind, states):
    case = make_case(21, method, kind == "full", d=2, batch=(3,), states=states)
    args, kwargs = _tensors(case)
    assert torch.autograd.gradcheck(_function(case, kwargs), args)


@pytest.mark.parametrize("equality", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_entropy(kind, equality):
    rng = np.random.default_rng(3)
    if kind == "full":
        scale = random_cholesky(rng, (3,), 2, cond=10, scale=1.0)
    else:
        scale = rng.uniform(0.3, 2.0, (3, 2))
    beta = torch.tensor(np.asarray(trp.entropy(scale)) + np.array([0.5, -0.5, 0.3]))
    s = torch.tensor(scale, requires_grad=True)

    def f(x):
        x = torch.tril(x) if kind == "full" else x
        return trp.project_entropy(x, beta, equality=equality)

    assert torch.autograd.gradcheck(f, (s,))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", list(METHODS))
def test_backward_equalsnumpy_vjp(method, kind):
    """``loss.backward()`` through the autograd.Function gives the NumPy ``trp.vjp``
    cotangents, in each argument's shape (shared old policy) and dtype."""
    case = make_case(22, method, kind == "full", d=3, batch=(4,))
    case.args = case.args[:2] + (case.args[2][0], case.args[3][0])  # state-independent old
    args, kwargs = _tensors(case)
    out = case.fn(*args, **kwargs)
    rng = np.random.default_rng(0)
    g = (rng.standard_normal(out.mean.shape), rng.standard_normal(tuple(out.scale.shape)))
    loss = (out.mean * torch.tensor(g[0])).sum() + (out.scale * torch.tensor(g[1])).sum()
    loss.backward()
    got = [a.grad.numpy() for a in args]
    assert [x.shape for x in got] == [a.shape for a in case.args]
    assert_cotangents_close(got, numpy_vjp(case, g))


@pytest.mark.parametrize("used", ["mean", "scale"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", list(METHODS))
def test_backward_of_one_output(method, kind, used):
    """A loss of one output only: autograd hands the Function no cotangent for the other (nor
    for the residuals, which get none materialised); the gradients are the NumPy VJP's with a
    zero cotangent there."""
    case = make_case(23, method, kind == "full", d=3, batch=(4,))
    args, kwargs = _tensors(case)
    out = case.fn(*args, **kwargs)
    rng = np.random.default_rng(2)
    g = [rng.standard_normal(out.mean.shape), rng.standard_normal(tuple(out.scale.shape))]
    if used == "mean":
        (out.mean * torch.tensor(g[0])).sum().backward()
        g[1] = np.zeros_like(g[1])
    else:
        (out.scale * torch.tensor(g[1])).sum().backward()
        g[0] = np.zeros_like(g[0])
    got = [a.grad.numpy() for a in args]
    assert all(np.all(np.isfinite(x)) for x in got)
    assert_cotangents_close(got, numpy_vjp(case, tuple(g)))


@pytest.mark.parametrize("states", ["mixed", "active"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", list(METHODS))
def test_constant_old_policy_skips_its_cotangents(method, kind, states, monkeypatch):
    """With the old policy a constant (the usual case in training) only the new policy's
    cotangents are computed, and they equal the NumPy ``trp.vjp`` ones; the VJP is told so."""
    from tr_projections.backends import _common

    case = make_case(24, method, kind == "full", d=3, batch=(5,), states=states)
    args, kwargs = _tensors(case, requires_grad=False)
    mean, scale = (a.detach().requires_grad_(True) for a in args[:2])
    seen = []
    real = _common.backward

    def spy(kind_, arrays, res, cots, options, needs=None):
        seen.append(tuple(needs))
        return real(kind_, arrays, res, cots, options, needs)

    rng = np.random.default_rng(1)
    shapes = (case.args[0].shape, case.args[1].shape)
    g = tuple(rng.standard_normal(shape) for shape in shapes)
    want = numpy_vjp(case, g)
    monkeypatch.setattr(_common, "backward", spy)
    out = case.fn(mean, scale, args[2], args[3], **kwargs)
    loss = (out.mean * torch.tensor(g[0])).sum() + (out.scale * torch.tensor(g[1])).sum()
    loss.backward()
    assert seen == [(True, True, False, False)]
    assert args[2].grad is None and args[3].grad is None
    assert_cotangents_close([mean.grad.numpy(), scale.grad.numpy()], want[:2])


def test_trp_vjp_on_tensors_leaves_no_graph():
    case = make_case(23, "kl", True, d=2)
    args, kwargs = _tensors(case)
    out, vjp_fn = trp.vjp(case.fn, *args, **kwargs)
    assert not out.mean.requires_grad and not out.scale.requires_grad
    cots = vjp_fn(trp.Gaussian(torch.ones_like(out.mean), torch.ones_like(out.scale)))
    assert all(isinstance(c, torch.Tensor) and c.dtype == torch.float64 for c in cots)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["kl", "frobenius", "wasserstein"])
def test_torch_func_grad_and_vmap_agree_with_eager(method, kind):
    case = make_case(24, method, kind == "full", d=2, batch=(3,))
    args, kwargs = _tensors(case, requires_grad=False)
    kw = {k: v for k, v in kwargs.items() if not k.startswith("eps")}
    rng = np.random.default_rng(1)
    gm = torch.tensor(rng.standard_normal(case.args[0].shape))
    gs = torch.tensor(rng.standard_normal(case.args[1].shape))

    def loss(mean, scale, old_mean, old_scale, eps_mean, eps_cov, gm, gs):
        out = case.fn(mean, scale, old_mean, old_scale, eps_mean=eps_mean, eps_cov=eps_cov, **kw)
        return (out.mean * gm).sum() + (out.scale * gs).sum()

    em, ec = kwargs["eps_mean"], kwargs["eps_cov"]
    want = numpy_vjp(case, (gm.numpy(), gs.numpy()))

    grads = torch.func.grad(loss, argnums=(0, 1, 2, 3))(*args, em, ec, gm, gs)
    assert_cotangents_close([x.numpy() for x in grads], want)

    # per-state gradients: vmap over the batch of grad of the per-state loss
    per_state = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1, 2, 3)))(*args, em, ec, gm, gs)
    assert_cotangents_close([x.numpy() for x in per_state], want)

    # vmap of the projection itself equals the batched call
    def project(mean, scale, old_mean, old_scale, eps_mean, eps_cov):
        out = case.fn(mean, scale, old_mean, old_scale, eps_mean=eps_mean, eps_cov=eps_cov, **kw)
        return out.mean, out.scale

    vm = torch.func.vmap(project)(*args, em, ec)
    direct = project(*args, em, ec)
    for a, b in zip(vm, direct, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

    # jacrev composes too (the Jacobian of the mean output, contracted with gm)
    jac = torch.func.jacrev(lambda m: project(m, *args[1:], em, ec)[0])(args[0])
    contracted = torch.einsum("bi,bicj->cj", gm, jac)
    # only the mean part reaches the mean output: compare with the VJP of g = (gm, 0)
    want_mean = numpy_vjp(case, (gm.numpy(), np.zeros_like(gs.numpy())))[0]
    np.testing.assert_allclose(contracted.numpy(), want_mean, rtol=1e-10, atol=1e-12)
