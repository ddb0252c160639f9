"""Large eager NumPy projections run in chunks of rows (``backends._common.CHUNK_ROWS``): the
same outputs and cotangents as one call, the same errors, and the torch adapter's NumPy route
carries the chunks' residuals from its forward to its backward."""

from __future__ import annotations

import numpy as np
import pytest
from test_gradients import METHODS, make_case, median_bounds

import tr_projections as trp
from tr_projections.backends import _common

FNS = {
    "kl": trp.project_kl,
    "frobenius": trp.project_frobenius,
    "wasserstein": trp.project_wasserstein,
}


def _plans(*args) -> bool:
    """Whether ``_common._plan`` splits a call of these arguments into chunks."""
    return _common._plan(*args) is not None


def _chunk_sizes(monkeypatch, op: str) -> list:
    """The number of rows of every forward call of operation ``op`` from now on."""
    calls = []
    real = _common.OPERATIONS[op].forward
    monkeypatch.setitem(
        _common.OPERATIONS,
        op,
        _common.OPERATIONS[op]._replace(
            forward=lambda a, b, o: calls.append(a[0].shape[0]) or real(a, b, o)
        ),
    )
    return calls


def _grads_across_routes(monkeypatch, case, kw, g, forward: dict, backward: dict) -> list:
    """The gradients of every argument of ``case`` for output cotangents ``g``, with the torch
    adapter's settings ``forward`` during the forward and ``backward`` during the backward."""
    import torch

    from tr_projections.backends import torch as adapter

    leaves = [torch.tensor(a, requires_grad=True) for a in case.args]
    for name, value in forward.items():
        monkeypatch.setattr(adapter, name, value)
    out = case.fn(*leaves, **kw)
    for name, value in backward.items():
        monkeypatch.setattr(adapter, name, value)
    torch.autograd.backward(list(out), g)
    return [a.grad.numpy() for a in leaves]


def _outputs_and_cotangents(fn, args, kwargs, g):
    out, vjp_fn = trp.vjp(fn, *args, **kwargs)
    return [np.asarray(x) for x in (*out, *vjp_fn(trp.Gaussian(*g)))]


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("kind", ["diag", "full"])
@pytest.mark.parametrize("bounds", ["numbers", "per-state"])
def test_chunks_equal_one_call(monkeypatch, method, kind, bounds):
    """50 states in chunks of at most 16 rows (4 chunks of 13, 13, 13, 11) against one call:
    outputs and all four cotangents to rounding (the chunks may select other rows to work on),
    with the states' own bounds sliced along."""
    case = make_case(40, method, kind == "full", d=3, batch=(50,))
    kwargs = dict(case.kwargs)  # (make_case's bounds are per state)
    if bounds == "numbers":
        kwargs = median_bounds(kwargs)
    fn, op = case.fn, method.split("_")[0]  # (variants: frobenius_euclid, ...)
    rng = np.random.default_rng(1)
    out = fn(*case.args, **kwargs)
    g = [rng.standard_normal(np.shape(x)) for x in out]
    monkeypatch.setattr(_common, "CHUNK_ROWS", 0)
    want = _outputs_and_cotangents(fn, case.args, kwargs, g)
    monkeypatch.setattr(_common, "CHUNK_ROWS", 16)
    calls = _chunk_sizes(monkeypatch, op)
    got = _outputs_and_cotangents(fn, case.args, kwargs, g)
    assert calls == [13, 13, 13, 11]
    for x, y in zip(got, want, strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-14)


def test_what_is_not_chunked(monkeypatch):
    """Batches up to CHUNK_ROWS, arrays broadcast along the batch, bounds of another shape
    (one entry for every state), and arrays of other libraries run as one call."""
    monkeypatch.setattr(_common, "CHUNK_ROWS", 16)
    case = make_case(41, "kl", False, d=3, batch=(50,))
    mean, scale, old_mean, old_scale = case.args
    assert _plans("kl", case.args, (0.1, 0.1))
    assert not _plans("kl", (mean[:16], scale[:16], old_mean[:16], old_scale[:16]), (0.1, 0.1))
    assert not _plans("kl", (mean, scale, old_mean[:1], old_scale), (0.1, 0.1))
    assert not _plans("kl", case.args, (np.full(1, 0.1), 0.1))
    assert _plans("kl", case.args, (np.full(50, 0.1), np.asarray(0.1)))
    assert not _plans("entropy", (scale,), (0.1,))
    strict = pytest.importorskip("array_api_strict")
    assert not _plans("kl", tuple(strict.asarray(x) for x in case.args), (0.1, 0.1))


def test_chunked_errors_name_the_callers_index(monkeypatch):
    """Value checks run on the whole call before the chunks: the message gives the index in
    the caller's array, not in a chunk."""
    monkeypatch.setattr(_common, "CHUNK_ROWS", 16)
    case = make_case(42, "kl", False, d=3, batch=(50,))
    mean, scale, old_mean, old_scale = (np.array(x) for x in case.args)
    scale[40, 1] = -1.0
    with pytest.raises(ValueError, match=r"`scale`.*index \(40, 1\)"):
        trp.project_kl(mean, scale, old_mean, old_scale, eps_mean=0.1, eps_cov=0.1)
    with pytest.raises(ValueError, match="eps_cov"):
        trp.project_kl(*case.args, eps_mean=0.1, eps_cov=np.r_[np.full(49, 0.1), -1.0])


@pytest.mark.numpy_route
@pytest.mark.parametrize("kind", ["diag", "full"])
def test_torch_route_carries_chunked_residuals(monkeypatch, kind):
    """torch tensors on the NumPy route, chunked: the outputs and gradients of torch's own
    kernels, through ``loss.backward()``."""
    torch = pytest.importorskip("torch")
    from tr_projections.backends import torch as adapter

    case = make_case(43, "kl", kind == "full", d=3, batch=(50,))
    rng = np.random.default_rng(3)

    def run():
        leaves = [torch.tensor(a, requires_grad=True) for a in case.args]
        kw = {
            k: torch.tensor(v) if isinstance(v, np.ndarray) else v for k, v in case.kwargs.items()
        }
        out = case.fn(*leaves, **kw)
        g = [torch.tensor(rng.standard_normal(tuple(o.shape))) for o in out]
        torch.autograd.backward(list(out), g)
        return [o.detach().numpy() for o in out] + [a.grad.numpy() for a in leaves]

    monkeypatch.setattr(adapter, "NUMPY_MAX_ELEMENTS", 0)
    rng = np.random.default_rng(3)
    want = run()
    monkeypatch.setattr(adapter, "NUMPY_MAX_ELEMENTS", 1 << 20)
    monkeypatch.setattr(_common, "CHUNK_ROWS", 16)
    rng = np.random.default_rng(3)
    seen = []
    real = _common.backward
    monkeypatch.setattr(
        _common, "backward", lambda k, a, r, *rest: seen.append(type(r)) or real(k, a, r, *rest)
    )
    got = run()
    assert seen == [list]
    for x, y in zip(got, want, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-12)


def test_broadcast_cotangents_reach_every_chunk(monkeypatch):
    """A cotangent that broadcasts against the output (one row, or no batch axis) goes to every
    chunk of ``_common.backward`` whole: the cotangents equal those of one call. (``vjp_fn``
    takes its output's shape only, as ``jax.vjp`` does; the broadcast is ``_common``'s.)"""
    case = make_case(44, "kl", False, d=3, batch=(50,))
    g_mean = np.linspace(-1.0, 1.0, 3)
    g_scale = np.full((1, 3), 0.5)
    bounds = (case.kwargs["eps_mean"], case.kwargs["eps_cov"])
    got = {}
    for rows in (0, 16):
        monkeypatch.setattr(_common, "CHUNK_ROWS", rows)
        _, res = _common.forward("kl", case.args, bounds, {})
        assert isinstance(res, list) == bool(rows)
        got[rows] = _common.backward("kl", case.args, res, (g_mean, g_scale), {})
    for x, y in zip(got[16], got[0], strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-14)


@pytest.mark.numpy_route
def test_chunked_forward_with_a_torch_kernel_backward(monkeypatch):
    """A forward on the NumPy route in chunks whose backward runs on torch's kernels (the route
    is decided anew, e.g. under torch.func or with another limit): the chunks' residuals are
    sliced and joined as torch tensors, with the gradients of torch's kernels throughout."""
    torch = pytest.importorskip("torch")

    case = make_case(45, "kl", False, d=3, batch=(50,))
    kw = {k: torch.tensor(v) if isinstance(v, np.ndarray) else v for k, v in case.kwargs.items()}
    rng = np.random.default_rng(6)
    g = [torch.tensor(rng.standard_normal((50, 3))) for _ in range(2)]

    def grads(forward_route: int, backward_route: int):
        return _grads_across_routes(
            monkeypatch,
            case,
            kw,
            g,
            {"NUMPY_MAX_ELEMENTS": forward_route},
            {"NUMPY_MAX_ELEMENTS": backward_route},
        )

    want = grads(0, 0)
    monkeypatch.setattr(_common, "CHUNK_ROWS", 16)
    got = grads(1 << 20, 0)
    for x, y in zip(got, want, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["kl", "frobenius", "wasserstein"])
@pytest.mark.parametrize("kind", ["diag", "full"])
@pytest.mark.parametrize("bounds", ["numbers", "per-state"])
def test_torch_kernels_in_chunks(monkeypatch, method, kind, bounds):
    """Projections on torch's CPU kernels (``backends.torch.CHUNK_ROWS``) in chunks: the outputs
    and the gradients of all four arguments of one call, through ``loss.backward()``, with the
    states' own bounds (tensors) sliced along."""
    torch = pytest.importorskip("torch")
    from tr_projections.backends import torch as adapter

    monkeypatch.setattr(adapter, "NUMPY_MAX_ELEMENTS", 0)
    monkeypatch.setattr(adapter, "CHUNKED", ("kl", "frobenius", "wasserstein"))
    case = make_case(46, method, kind == "full", d=3, batch=(50,))
    kw = dict(case.kwargs)
    if bounds == "numbers":
        kw = median_bounds(kw)
    kw = {k: torch.tensor(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
    rng = np.random.default_rng(7)
    g = [torch.tensor(rng.standard_normal(np.shape(x))) for x in case.args[:2]]

    def run():
        leaves = [torch.tensor(a, requires_grad=True) for a in case.args]
        out = case.fn(*leaves, **kw)
        torch.autograd.backward(list(out), g)
        return [o.detach().numpy() for o in out] + [a.grad.numpy() for a in leaves]

    monkeypatch.setattr(adapter, "CHUNK_ROWS", 0)
    want = run()
    monkeypatch.setattr(adapter, "CHUNK_ROWS", 16)
    calls = _chunk_sizes(monkeypatch, method)
    got = run()
    assert calls == [13, 13, 13, 11]
    for x, y in zip(got, want, strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-14)


def test_torch_kernels_chunk_kl_and_w2_only(monkeypatch):
    """By default torch's kernels chunk KL and W2 projections; Frobenius ones run whole."""
    torch = pytest.importorskip("torch")
    from tr_projections.backends import torch as adapter

    monkeypatch.setattr(adapter, "NUMPY_MAX_ELEMENTS", 0)
    monkeypatch.setattr(adapter, "CHUNK_ROWS", 16)
    for method, want in [
        ("kl", [13, 13, 13, 11]),
        ("frobenius", [50]),
        ("wasserstein", [13] * 3 + [11]),
    ]:
        case = make_case(50, method, True, d=3, batch=(50,))
        kw = median_bounds(case.kwargs)
        calls = _chunk_sizes(monkeypatch, method)
        case.fn(*(torch.tensor(a) for a in case.args), **kw)
        assert calls == want, method


def test_torch_kernels_whole_under_transforms(monkeypatch):
    """Under ``torch.func.vmap`` the torch adapter does not chunk (``vmap`` batches the call
    itself); the values are those of a direct call."""
    torch = pytest.importorskip("torch")
    from tr_projections.backends import torch as adapter

    x = torch.ones(3)
    assert adapter._eager_cpu((x, 0.1))
    seen = []
    torch.func.vmap(lambda v: seen.append(adapter._eager_cpu((v,))) or v)(torch.ones(2, 3))
    assert seen == [False]
    monkeypatch.setattr(adapter, "NUMPY_MAX_ELEMENTS", 0)
    monkeypatch.setattr(adapter, "CHUNK_ROWS", 16)
    case = make_case(47, "kl", False, d=3, batch=(50,))
    leaves = [torch.tensor(a) for a in case.args]
    kw = median_bounds(case.kwargs)
    direct = case.fn(*leaves, **kw)
    calls = _chunk_sizes(monkeypatch, "kl")
    mapped = torch.func.vmap(lambda *a: tuple(case.fn(*a, **kw)))(*(t[None] for t in leaves))
    assert calls == [50]
    for a, b in zip(direct, mapped, strict=True):
        np.testing.assert_allclose(b[0].numpy(), a.numpy(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backward_route", ["torch", "numpy"])
def test_torch_kernel_chunks_with_either_backward(monkeypatch, backward_route):
    """A forward on torch's kernels in chunks, with 0-d tensor bounds, whose backward runs on
    torch's kernels or on the NumPy route (decided anew): the gradients of one call."""
    torch = pytest.importorskip("torch")

    case = make_case(48, "kl", True, d=3, batch=(50,))
    kw = {k: torch.tensor(float(np.median(v))) for k, v in case.kwargs.items()}
    rng = np.random.default_rng(9)
    g = [torch.tensor(rng.standard_normal(np.shape(x))) for x in case.args[:2]]

    def grads(chunk_rows: int, backward_limit: int):
        return _grads_across_routes(
            monkeypatch,
            case,
            kw,
            g,
            {"NUMPY_MAX_ELEMENTS": 0, "CHUNK_ROWS": chunk_rows},
            {"NUMPY_MAX_ELEMENTS": backward_limit},
        )

    want = grads(0, 0)
    seen = []
    real = _common.backward

    def spy(kind, arrays, res, *rest):
        seen.append((type(arrays[0]).__module__, type(res)))
        return real(kind, arrays, res, *rest)

    monkeypatch.setattr(_common, "backward", spy)
    got = grads(16, 1 << 20 if backward_route == "numpy" else 0)
    assert seen == [(np.__name__ if backward_route == "numpy" else "torch", list)]
    for x, y in zip(got, want, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-12)


def test_chunkable_with_a_row_limit(monkeypatch):
    """``_plan(rows=)`` (the torch adapter's chunks): any eager arrays the caller vouches
    for, longer than ``rows``, with bounds that are numbers, 0-d arrays or per-state arrays;
    ``rows=0`` never."""
    torch = pytest.importorskip("torch")
    case = make_case(49, "kl", False, d=3, batch=(50,))
    args = tuple(torch.tensor(a) for a in case.args)
    assert _plans("kl", args, (0.1, torch.tensor(0.1)), 16)
    assert _plans("kl", args, (torch.full((50,), 0.1), 0.1), 16)
    assert not _plans("kl", args, (torch.full((1,), 0.1), 0.1), 16)
    assert not _plans("kl", args, (0.1, 0.1), 50)
    assert not _plans("kl", args, (0.1, 0.1), 0)
    assert not _plans("kl", args, (0.1, 0.1))  # (without rows: NumPy arrays only)
    assert not _plans("kl", args, (0.1, "0.1"), 16)


def test_torch_vmap_over_a_chunked_backward(monkeypatch):
    """``torch.func.vjp`` runs the forward eagerly (in chunks), and ``vmap`` over its
    ``vjp_fn`` (as ``jacrev`` does) runs the chunked backward on batched cotangents, into
    which the chunks' rows cannot be written: they are joined instead. Each mapped cotangent
    gives the gradients of one backward of a whole call."""
    torch = pytest.importorskip("torch")
    from tr_projections.backends import torch as adapter

    case = make_case(49, "kl", True, d=3, batch=(50,))
    kw = median_bounds(case.kwargs)
    leaves = [torch.tensor(a) for a in case.args]
    rng = np.random.default_rng(10)
    cots = tuple(torch.tensor(rng.standard_normal((2, *leaves[i].shape))) for i in (0, 1))

    def f(m, s):
        return tuple(case.fn(m, s, *leaves[2:], **kw))

    def mapped():
        _, vjp_fn = torch.func.vjp(f, *leaves[:2])
        return torch.func.vmap(vjp_fn)(cots)

    def one_by_one():
        _, vjp_fn = torch.func.vjp(f, *leaves[:2])
        grads = [vjp_fn((c0, c1)) for c0, c1 in zip(*cots, strict=True)]
        return [torch.stack(gs) for gs in zip(*grads, strict=True)]

    whole = one_by_one()  # (no chunks; torch's kernels: conftest's _torch_kernels)
    monkeypatch.setattr(adapter, "CHUNK_ROWS", 16)
    calls = _chunk_sizes(monkeypatch, "kl")
    got = mapped()
    assert calls and max(calls) < 50  # (the forward ran in chunks)
    for x, y in zip(got, whole, strict=True):
        np.testing.assert_allclose(x.detach().numpy(), y.detach().numpy(), rtol=1e-12, atol=1e-14)
    jac = torch.func.jacrev(lambda m: f(m, leaves[1])[0][:2])(leaves[0])
    assert jac.shape == (2, 3, 50, 3) and bool(torch.isfinite(jac).all())
