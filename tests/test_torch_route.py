"""The torch adapter's NumPy route: small CPU batches of plain tensors run the package's NumPy
kernels on views of the tensors (``tr_projections.backends.torch.NUMPY_MAX_ELEMENTS``). Every
other test runs torch's own kernels (``conftest.py`` turns the route off); here both routes
are compared: outputs, every gradient, dtypes, devices, no aliasing, and the calls that must
stay on torch kernels (``torch.func``, another library's bound, arrays above the limit)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from test_gradients import KINDS, METHODS, make_case, random_cholesky  # noqa: E402

import tr_projections as trp  # noqa: E402
from tr_projections.backends import _common  # noqa: E402
from tr_projections.backends import torch as adapter  # noqa: E402

pytestmark = pytest.mark.numpy_route

RTOL = {torch.float64: 1e-10, torch.float32: 2e-4}


def _spy(monkeypatch) -> list:
    """Record the array library of every forward and backward the adapter runs."""
    seen = []
    fwd, bwd = _common.forward, _common.backward

    def forward(kind, arrays, bounds, options, **kw):
        seen.append(("forward", type(arrays[0]).__module__.split(".")[0]))
        return fwd(kind, arrays, bounds, options, **kw)

    def backward(kind, arrays, res, cots, options, needs=None):
        seen.append(("backward", type(arrays[0]).__module__.split(".")[0]))
        return bwd(kind, arrays, res, cots, options, needs)

    monkeypatch.setattr(_common, "forward", forward)
    monkeypatch.setattr(_common, "backward", backward)
    return seen


def _run(fn, arrays, kwargs, g):
    """Outputs and the gradients of every array argument for the output cotangents ``g``."""
    args = [a.detach().clone().requires_grad_(True) for a in arrays]
    out = fn(*args, **kwargs)
    outs = list(out) if isinstance(out, tuple) else [out]
    torch.autograd.backward(outs, g)
    return [o.detach() for o in outs], [a.grad for a in args]


def _cases():
    for method in METHODS:
        for kind in KINDS:
            for states in ("mixed", "inactive"):
                case = make_case(31, method, kind == "full", d=3, batch=(4,), states=states)
                yield f"{method}-{kind}-{states}", case.fn, case.args, case.kwargs
    rng = np.random.default_rng(3)
    full = random_cholesky(rng, (4,), 3, cond=10, scale=1.0)
    beta = np.asarray(trp.entropy(full)) + np.array([0.5, -0.5, 0.3, 0.1])
    yield "entropy-full", trp.project_entropy, (full,), {"min_entropy": beta}
    case = make_case(32, "kl", True, d=3, batch=(4,))
    for name, (_, _, options) in METHODS.items():
        kwargs = {"method": name.split("_")[0], **options}
        yield f"loss-{name}", trp.trust_region_loss, case.args, kwargs


CASES = list(_cases())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name,fn,args,kwargs", CASES, ids=[c[0] for c in CASES])
def test_numpy_route_equals_torch_kernels(name, fn, args, kwargs, dtype, monkeypatch):
    """Outputs and gradients of all arguments agree with torch's kernels, in the arguments'
    dtype and on the CPU; the route ran NumPy, the other torch; the inputs are untouched and
    the outputs share no memory with them."""
    seen = _spy(monkeypatch)
    arrays = [torch.tensor(a, dtype=dtype) for a in args]
    kw = {k: torch.tensor(v, dtype=dtype) if isinstance(v, np.ndarray) else v
          for k, v in kwargs.items()}  # fmt: skip
    copies = [a.clone() for a in arrays]
    rng = np.random.default_rng(4)
    monkeypatch.setattr(adapter, "NUMPY_MAX_ELEMENTS", 0)
    out0 = fn(*arrays, **kw)
    outs0 = list(out0) if isinstance(out0, tuple) else [out0]
    g = [torch.tensor(rng.standard_normal(tuple(o.shape)), dtype=dtype) for o in outs0]
    want_out, want_grad = _run(fn, arrays, kw, g)
    assert {lib for _, lib in seen} == {"torch"}
    seen.clear()
    monkeypatch.setattr(adapter, "NUMPY_MAX_ELEMENTS", 1 << 19)
    got_out, got_grad = _run(fn, arrays, kw, g)
    assert seen == [("forward", "numpy"), ("backward", "numpy")]
    for got, want in zip(got_out + got_grad, want_out + want_grad, strict=True):
        assert isinstance(got, torch.Tensor) and got.dtype == dtype and got.device.type == "cpu"
        assert got.shape == want.shape
        scale = max(1.0, float(want.abs().max()))
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=RTOL[dtype] * scale)
    for a, c in zip(arrays, copies, strict=True):
        assert torch.equal(a, c)
    for o in got_out:
        assert all(o.untyped_storage().data_ptr() != a.untyped_storage().data_ptr() for a in arrays)


def test_route_limits(monkeypatch):
    """Above the limit and for another library's bound the torch kernels run (and a NumPy
    bound is still refused)."""
    seen = _spy(monkeypatch)
    monkeypatch.setattr(adapter, "MEASURED_THREADS", max(2, torch.get_num_threads()))
    case = make_case(33, "kl", True, d=3, batch=(4,))
    arrays = [torch.tensor(a) for a in case.args]
    n = sum(a.numel() for a in arrays)
    monkeypatch.setattr(adapter, "NUMPY_MAX_ELEMENTS", n)
    leaves = [a.clone().requires_grad_(True) for a in arrays]
    out = trp.project_kl(*leaves, eps_mean=0.1, eps_cov=0.1)
    (out.mean.sum() + out.scale.sum()).backward()  # the backward counts the same arrays
    monkeypatch.setattr(adapter, "NUMPY_MAX_ELEMENTS", n - 1)
    trp.project_kl(*arrays, eps_mean=0.1, eps_cov=0.1)
    assert [lib for _, lib in seen] == ["numpy", "numpy", "torch"]
    monkeypatch.setattr(adapter, "NUMPY_MAX_ELEMENTS", 1 << 19)
    seen.clear()
    with pytest.raises(TypeError, match=r"one library.*`eps_cov`"):
        trp.project_kl(*arrays, eps_mean=0.1, eps_cov=np.full(4, 0.1))
    assert [lib for _, lib in seen] == ["torch"]
    seen.clear()
    # A lazily negated view (the imaginary part of a conjugate) has no NumPy view: torch kernels.
    c = torch.complex(torch.zeros_like(arrays[0]), -arrays[0])
    neg_mean = c.conj().imag
    assert neg_mean.is_neg() and torch.equal(neg_mean, arrays[0])
    got = trp.project_kl(neg_mean, *arrays[1:], eps_mean=0.1, eps_cov=0.1)
    want = trp.project_kl(*arrays, eps_mean=0.1, eps_cov=0.1)
    assert [lib for _, lib in seen] == ["torch", "numpy"]
    np.testing.assert_allclose(got.mean.numpy(), want.mean.numpy(), rtol=1e-10, atol=1e-12)


def test_route_limit_for_large_full_and_diagonal_gaussians(monkeypatch):
    """Full Gaussians with d >= LARGE_D may hold LARGE_D_FACTOR times as many numbers, diagonal
    ones of a KL or Frobenius projection their DIAG_FACTORS times; diagonal W2 projections and
    full ones with smaller d: the limit itself."""
    seen = _spy(monkeypatch)
    monkeypatch.setattr(adapter, "MEASURED_THREADS", max(2, torch.get_num_threads()))
    rng = np.random.default_rng(5)
    d = adapter.LARGE_D
    case = make_case(35, "kl", True, d=d, batch=(2,))
    arrays = [torch.tensor(a) for a in case.args]
    n = sum(a.numel() for a in arrays)
    monkeypatch.setattr(adapter, "NUMPY_MAX_ELEMENTS", n // adapter.LARGE_D_FACTOR + 1)
    trp.project_kl(*arrays, eps_mean=0.1, eps_cov=0.1)
    monkeypatch.setattr(adapter, "NUMPY_MAX_ELEMENTS", n // adapter.LARGE_D_FACTOR - 1)
    trp.project_kl(*arrays, eps_mean=0.1, eps_cov=0.1)
    assert [lib for _, lib in seen] == ["numpy", "torch"]
    diag = [torch.tensor(rng.uniform(0.5, 1.5, (50, d))) for _ in range(2)]
    mean = torch.zeros(50, d, dtype=torch.float64)
    m = 4 * 50 * d
    for method, factor in [("kl", 64), ("frobenius", 4), ("wasserstein", 1)]:
        assert adapter.DIAG_FACTORS.get(method, 1) == factor
        seen.clear()
        monkeypatch.setattr(adapter, "NUMPY_MAX_ELEMENTS", m // factor + 1)
        trp.project(mean, diag[0], mean, diag[1], method=method, eps_mean=0.1, eps_cov=0.1)
        monkeypatch.setattr(adapter, "NUMPY_MAX_ELEMENTS", m // factor - 1)
        trp.project(mean, diag[0], mean, diag[1], method=method, eps_mean=0.1, eps_cov=0.1)
        assert [lib for _, lib in seen] == ["numpy", "torch"], method


def test_route_limit_shrinks_with_more_threads(monkeypatch):
    """The limits hold for MEASURED_THREADS torch threads; with twice as many, half as many
    numbers take the route."""
    seen = _spy(monkeypatch)
    case = make_case(36, "kl", True, d=3, batch=(4,))
    arrays = [torch.tensor(a) for a in case.args]
    n = sum(a.numel() for a in arrays)
    threads = torch.get_num_threads()
    monkeypatch.setattr(adapter, "MEASURED_THREADS", threads)
    monkeypatch.setattr(adapter, "NUMPY_MAX_ELEMENTS", 2 * n - 1)
    trp.project_kl(*arrays, eps_mean=0.1, eps_cov=0.1)
    torch.set_num_threads(2 * threads)
    try:
        trp.project_kl(*arrays, eps_mean=0.1, eps_cov=0.1)  # limit (2n - 1) / 2 < n
    finally:
        torch.set_num_threads(threads)
    assert [lib for _, lib in seen] == ["numpy", "torch"]


@pytest.mark.parametrize("kind", KINDS)
def test_torch_func_with_the_route(kind):
    """``torch.func.grad`` and ``vmap`` with the route enabled give eager autograd's
    gradients and the looped outputs (vmap batches the tensors: torch kernels)."""
    case = make_case(34, "kl", kind == "full", d=3, batch=(4,))
    arrays = [torch.tensor(a) for a in case.args]

    def loss(mean, scale):
        out = trp.project_kl(mean, scale, *arrays[2:], eps_mean=0.1, eps_cov=0.1)
        return (out.mean * out.mean).sum() + (out.scale * out.scale).sum()

    grads = torch.func.grad(loss, argnums=(0, 1))(arrays[0], arrays[1])
    leaves = [a.clone().requires_grad_(True) for a in arrays[:2]]
    loss(*leaves).backward()
    for got, leaf in zip(grads, leaves, strict=True):
        np.testing.assert_allclose(got.numpy(), leaf.grad.numpy(), rtol=1e-10, atol=1e-12)

    def one(mean, scale, old_mean, old_scale):
        return tuple(trp.project_kl(mean, scale, old_mean, old_scale, eps_mean=0.1, eps_cov=0.1))

    batched = torch.func.vmap(one)(*arrays)
    looped = [one(*(a[i] for a in arrays)) for i in range(4)]
    for j in range(2):
        want = torch.stack([r[j] for r in looped])
        np.testing.assert_allclose(batched[j].numpy(), want.numpy(), rtol=1e-10, atol=1e-12)
