"""``torch.compile`` of the package's functions: each is captured as one graph
(``fullgraph=True`` fails on any graph break), agrees with eager torch and with the NumPy VJP,
and is not compiled again for new values of the same shapes, nor more than once more for other
batch sizes."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from test_gradients import assert_cotangents_close, make_case, numpy_vjp  # noqa: E402

import tr_projections as trp  # noqa: E402

# dynamo's note on tracing through (array_api_compat's) lru_cache-wrapped helpers is benign
pytestmark = pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")

TOL = {"rtol": 1e-12, "atol": 1e-12}  # the same float64 operations, compiled or not


class Counting:
    """A ``torch.compile`` backend that counts the graphs it is given and runs them with
    ``aot_eager`` (dynamo's capture and AOT autograd, without code generation)."""

    def __init__(self) -> None:
        from torch._dynamo.backends.registry import lookup_backend

        self.graphs = 0
        self._inner = lookup_backend("aot_eager")

    def __call__(self, gm, inputs):
        self.graphs += 1
        return self._inner(gm, inputs)


def _tensors(arrays, requires_grad=True):
    return [torch.tensor(a, requires_grad=requires_grad) for a in arrays]


def _kwargs(case):
    return {k: torch.tensor(v) if isinstance(v, np.ndarray) else v for k, v in case.kwargs.items()}


def _agree(fn, args, compiled):
    """``compiled(*args)`` and its gradients equal ``fn``'s, eager."""
    got = compiled(*args)
    want = fn(*args)
    torch.testing.assert_close(got, want, **TOL)
    g_got = torch.autograd.grad(got, args, allow_unused=True, materialize_grads=True)
    g_want = torch.autograd.grad(want, args, allow_unused=True, materialize_grads=True)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def _weighted(out, weights):
    return sum((x * w).sum() for x, w in zip(out, weights, strict=True))


def _case_fn(what: str, method: str, kind: str):
    """(the function of the four Gaussian arrays, the NumPy case it is drawn from)."""
    case = make_case(31, method, kind == "full", d=3, batch=(4,))
    rng = np.random.default_rng(5)
    weights = [torch.tensor(rng.standard_normal(case.args[k].shape)) for k in (0, 1)]
    kwargs = _kwargs(case)  # (once, outside the compiled function)
    if what == "project":
        return (lambda *a: _weighted(case.fn(*a, **kwargs), weights)), case
    if what == "loss":
        return (
            lambda *a: (trp.trust_region_loss(*a, method=method) * weights[0][..., 0]).sum()
        ), case
    if what == "distance":
        fn = getattr(trp, method)
        return (lambda *a: _weighted(fn(*a), (weights[0][..., 0], weights[0][..., 1]))), case
    if what == "entropy":
        beta = torch.tensor(rng.uniform(-1.0, 1.0, (4,)))
        return (lambda m, s, om, os: (trp.project_entropy(s, beta) * weights[1]).sum()), case

    # W2 of symmetric roots: the roots of the case's covariances
    sq = (lambda L: L @ L.mT) if kind == "full" else (lambda x: x)

    def roots(m, s, om, os):
        out = trp.project_wasserstein(m, sq(s), om, sq(os), root=True, **kwargs)
        return _weighted(out, weights)

    return roots, case


CASES = [
    *(("project", m, k) for m in ("kl", "frobenius", "wasserstein") for k in ("diag", "full")),
    ("loss", "kl", "full"),
    ("loss", "frobenius", "diag"),
    ("loss", "wasserstein", "full"),
    ("distance", "kl", "diag"),
    ("distance", "frobenius", "full"),
    ("distance", "wasserstein", "diag"),
    ("entropy", "kl", "diag"),
    ("roots", "wasserstein", "full"),
]


@pytest.mark.parametrize(("what", "method", "kind"), CASES, ids=["-".join(c) for c in CASES])
def test_captured_whole_and_compiled_once(what, method, kind):
    fn, case = _case_fn(what, method, kind)
    backend = Counting()
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    _agree(fn, _tensors(case.args), compiled)
    assert backend.graphs == 1
    # new values of the same shapes: the same graph (a guard on a cache or a setting the first
    # call changed would compile it again)
    _agree(fn, _tensors([a * 1.01 for a in case.args]), compiled)
    assert backend.graphs == 1


def test_other_batch_sizes_compile_once_more():
    def fn(*a):
        return trp.project_kl(*a, eps_mean=0.05, eps_cov=0.02).scale.sum()

    backend = Counting()
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    for n in (5, 9, 300, 17):
        case = make_case(n, "kl", False, d=3, batch=(n,))
        _agree(fn, _tensors(case.args), compiled)
    assert backend.graphs == 2  # the first shape, then every batch size at once


@pytest.mark.parametrize(("method", "kind"), [("kl", "diag"), ("wasserstein", "full")])
def test_inductor_agrees_with_numpy_vjp(method, kind):
    # with the default backend (inductor's generated code)
    case = make_case(25, method, kind == "full", d=2, batch=(3,))
    args, kwargs = _tensors(case.args), _kwargs(case)
    rng = np.random.default_rng(2)
    gm = torch.tensor(rng.standard_normal(case.args[0].shape))
    gs = torch.tensor(rng.standard_normal(case.args[1].shape))

    def loss(mean, scale, old_mean, old_scale):
        out = case.fn(mean, scale, old_mean, old_scale, **kwargs)
        return (out.mean * gm).sum() + (out.scale * gs).sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True)
    value = compiled(*args)
    grads = torch.autograd.grad(value, args)
    torch.testing.assert_close(value, loss(*args), **TOL)
    assert_cotangents_close([x.numpy() for x in grads], numpy_vjp(case, (gm.numpy(), gs.numpy())))


@pytest.mark.parametrize("no_grad", [False, True], ids=["constants", "no_grad"])
def test_forward_without_gradients(no_grad):
    # the forward alone: inputs that record nothing, or a torch.no_grad block
    case = make_case(33, "kl", True, d=3, batch=(4,))
    args, kwargs = _tensors(case.args, requires_grad=no_grad), _kwargs(case)
    backend = Counting()
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda *a: tuple(case.fn(*a, **kwargs)), fullgraph=True, backend=backend
    )
    with torch.no_grad() if no_grad else torch.enable_grad():
        got = compiled(*args)
        want = case.fn(*args, **kwargs)
    for a, b in zip(got, want, strict=True):
        assert not a.requires_grad
        torch.testing.assert_close(a, b, **TOL)
    assert backend.graphs == 1


def test_eager_calls_while_another_thread_compiles(monkeypatch):
    # While torch.compile compiles (seconds), torch 2.13 sets torch.compiler.is_compiling() for
    # the whole process. Eager calls on other threads meanwhile still check their values and
    # take their eager routes: the package asks whether dynamo traces *this* call.
    monkeypatch.setattr(torch.compiler, "_is_compiling_flag", True)
    assert torch.compiler.is_compiling()
    case = make_case(34, "kl", False, d=3, batch=(4,))
    bad = case.args[1].copy()
    bad[0, 0] = np.nan
    arrays = (case.args[0], bad, *case.args[2:])
    with pytest.raises(ValueError, match="`scale`"):
        trp.project_kl(*arrays, **case.kwargs)  # NumPy
    with pytest.raises(ValueError, match="`scale`"):
        trp.project_kl(*_tensors(arrays, requires_grad=False), **_kwargs(case))
    args = _tensors(case.args)
    out = trp.project_kl(*args, **_kwargs(case))
    assert out.scale.grad_fn is not None  # (through the autograd.Function)
    want = trp.project_kl(*case.args, **case.kwargs)
    np.testing.assert_allclose(out.scale.detach().numpy(), want.scale, rtol=1e-12, atol=1e-14)
