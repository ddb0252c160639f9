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


def _second_order_cases():
    """Ways to differentiate a projection's gradient again, each returning what it got."""
    from torch.func import grad, jacrev

    def cubic(kl, m):
        return (kl(m).mean ** 3).sum() + (m**2).sum()  # (a term of its own beside)

    def grad_inputs(kl, m):  # autograd.grad with inputs=: runs only nodes on paths to m
        (g,) = torch.autograd.grad(cubic(kl, m), m, create_graph=True)
        return torch.autograd.grad(g.sum(), m)[0]

    def linear_loss(kl, m):  # the cotangent itself records no graph
        (g,) = torch.autograd.grad(kl(m).mean.sum(), m, create_graph=True)
        return torch.autograd.grad(g.sum(), m)[0]

    def backward_twice(kl, m):
        cubic(kl, m).backward(create_graph=True)
        g, m.grad = m.grad, None
        g.sum().backward()
        return m.grad

    def func_jacrev_grad(kl, m):
        return jacrev(grad(lambda x: cubic(kl, x)))(m.detach())

    return [grad_inputs, linear_loss, backward_twice, func_jacrev_grad]


@pytest.mark.parametrize("route", ["torch", pytest.param("numpy", marks=pytest.mark.numpy_route)])
@pytest.mark.parametrize("second", _second_order_cases(), ids=lambda f: f.__name__)
def test_second_derivative_through_a_projection_raises(second, route):
    """Differentiating a projection's gradient raises, by every route that reaches it: before,
    ``torch.autograd.grad(..., inputs=)`` and ``torch.func.jacrev(grad(...))`` silently
    returned the other terms' second derivatives alone (here 2 everywhere, or zeros). First
    derivatives taken with ``create_graph=True`` keep their values."""
    from tr_projections.backends import torch as adapter

    rng = np.random.default_rng(5)
    old_mean = torch.tensor(rng.standard_normal((3, 2)))
    scale, old_scale = torch.full((3, 2), 1.5, dtype=torch.float64), torch.ones(3, 2).double()
    m = (old_mean + torch.tensor(rng.standard_normal((3, 2)))).requires_grad_(True)

    def kl(x):
        return trp.project_kl(x, scale, old_mean, old_scale, eps_mean=0.05, eps_cov=0.01)

    plain = torch.autograd.grad((kl(m).mean ** 3).sum(), m)[0]
    with_graph = torch.autograd.grad((kl(m).mean ** 3).sum(), m, create_graph=True)[0]
    torch.testing.assert_close(with_graph.detach(), plain, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="first order only") as info:
        second(kl, m)
    assert info.value.args[0] == adapter.SECOND_ORDER_ERROR


@pytest.mark.parametrize("route", ["torch", pytest.param("numpy", marks=pytest.mark.numpy_route)])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", list(METHODS))
def test_bound_tensors_get_their_gradients(method, kind, route):
    """Bound tensors that require grad get d<g, out>/d eps (central differences, per state),
    and a 0-d bound the sum over the states; the arrays' gradients are those of constant
    bounds. Before, a bound's ``.grad`` stayed ``None``."""
    from test_gradients import FD_RTOL, bound_fd, mixed_case, random_cotangent

    case = mixed_case(method, kind == "full")
    out = case.fn(*case.args, **case.kwargs)
    g = random_cotangent(out, case.full, 3)
    want = bound_fd(case, g)
    args = [torch.tensor(a, requires_grad=True) for a in case.args]
    eps = {k: torch.tensor(case.kwargs[k], requires_grad=True) for k in ("eps_mean", "eps_cov")}
    options = {k: v for k, v in case.kwargs.items() if k not in eps}
    o = case.fn(*args, **eps, **options)
    (sum((x * torch.tensor(y)).sum() for x, y in zip(o, g, strict=True))).backward()
    for name, w in zip(("eps_mean", "eps_cov"), want, strict=True):
        got = eps[name].grad.numpy()
        assert np.all((got != 0) == (w != 0))  # (rows outside their bound, and inside)
        np.testing.assert_allclose(got, w, rtol=0, atol=FD_RTOL * np.max(np.abs(w)))
    constant = [a.detach().requires_grad_(True) for a in args]
    o2 = case.fn(*constant, **{k: v.detach() for k, v in eps.items()}, **options)
    (sum((x * torch.tensor(y)).sum() for x, y in zip(o2, g, strict=True))).backward()
    for a, c in zip(args, constant, strict=True):
        torch.testing.assert_close(a.grad, c.grad, rtol=0, atol=0)
    # one bound for every state: its gradient sums the states'
    shared = torch.tensor(np.median(case.kwargs["eps_cov"]), requires_grad=True)
    o3 = case.fn(*args, eps_mean=eps["eps_mean"].detach(), eps_cov=shared, **options)
    (o3.scale * torch.tensor(g[1])).sum().backward()
    per_state = torch.tensor(np.full(4, shared.item()), requires_grad=True)
    o4 = case.fn(*args, eps_mean=eps["eps_mean"].detach(), eps_cov=per_state, **options)
    (o4.scale * torch.tensor(g[1])).sum().backward()
    torch.testing.assert_close(shared.grad, per_state.grad.sum(), rtol=1e-12, atol=1e-14)


def test_bound_gradients_under_torch_func_and_for_min_entropy():
    """``torch.func.grad`` with respect to a bound, and the entropy projection's
    ``min_entropy``, against central differences."""
    from test_gradients import FD_RTOL, bound_fd, random_cotangent

    case = make_case(42, "kl", True, d=2, batch=(4,))
    out = case.fn(*case.args, **case.kwargs)
    g = random_cotangent(out, case.full, 4)
    want = bound_fd(case, g, ("eps_cov",))[0]
    args = [torch.tensor(a) for a in case.args]

    def f(eps_cov):
        o = case.fn(*args, eps_mean=torch.tensor(case.kwargs["eps_mean"]), eps_cov=eps_cov)
        return sum((x * torch.tensor(y)).sum() for x, y in zip(o, g, strict=True))

    got = torch.func.grad(f)(torch.tensor(case.kwargs["eps_cov"])).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=FD_RTOL * np.max(np.abs(want)))
    rng = np.random.default_rng(6)
    scale = random_cholesky(rng, (4,), 2, cond=10, scale=1.0)
    h = np.asarray(trp.entropy(scale))
    for equality in (False, True):
        beta = h + np.array([0.3, -0.4, 0.2, -0.1])  # (rows below and above their bound)
        gs = np.tril(rng.standard_normal((4, 2, 2)))

        def value(b, equality=equality, gs=gs):
            return float(np.sum(gs * trp.project_entropy(scale, b, equality=equality)))

        fd = np.array([(value(beta + 1e-6 * e) - value(beta - 1e-6 * e)) / 2e-6 for e in np.eye(4)])
        b = torch.tensor(beta, requires_grad=True)
        out = trp.project_entropy(torch.tensor(scale), b, equality=equality)
        (out * torch.tensor(gs)).sum().backward()
        np.testing.assert_allclose(b.grad.numpy(), fd, rtol=0, atol=1e-7 * np.max(np.abs(fd)))
        assert equality or np.all(b.grad.numpy()[[1, 3]] == 0)


@pytest.mark.parametrize(
    "eps_mean", [1, "int tensor", np.float64(0.05)], ids=["int", "int-tensor", "np"]
)
def test_bound_tensor_beside_other_kinds_of_eps_mean(eps_mean):
    case = make_case(44, "kl", False, d=2, batch=(3,))
    args = [torch.tensor(a) for a in case.args]
    em = torch.tensor([1, 1, 1]) if isinstance(eps_mean, str) else eps_mean
    grads = []
    for m in (em, 1.0 if isinstance(eps_mean, str) else float(eps_mean)):
        ec = torch.tensor(case.kwargs["eps_cov"], requires_grad=True)
        out = trp.project_kl(*args, eps_mean=m, eps_cov=ec)
        (out.mean.sum() + out.scale.sum()).backward()
        grads.append(ec.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
