"""The per-library helpers of ``tr_projections._compat`` against plain references."""

from __future__ import annotations

import array_api_compat.numpy as xp
import numpy as np
import pytest
from _data import NEAR_FLOAT32_MAX, full_policies, spd

from tr_projections import _compat
from tr_projections.projections import _kl_diag_fused


@pytest.mark.parametrize("lower", [True, False])
@pytest.mark.parametrize(
    ("d", "k"), [(1, 1), (3, 1), (3, 3), (8, 8), (12, 1), (12, 12), (6, 2), (33, 33)]
)
def test_batched_triangular_solve_matches_lu(d, k, lower):
    """NumPy batches of 14 systems take a substitution route (row by row: one right-hand side,
    or at most 8 unknowns) or the LU solve (several right-hand sides and more unknowns, a batch
    this small): all agree with ``np.linalg.solve``, return a C-ordered array and leave their
    arguments alone."""
    rng = np.random.default_rng(d * 10 + k)
    a = np.tril(rng.uniform(-0.5, 0.5, (7, 2, d, d))) + np.eye(d) * rng.uniform(1, 2, (7, 2, 1, 1))
    if not lower:
        a = np.swapaxes(a, -1, -2).copy()
    b = rng.standard_normal((7, 2, d, k))
    a0, b0 = a.copy(), b.copy()
    got = _compat.solve_triangular(a, b, lower=lower, xp=xp)
    np.testing.assert_allclose(got, np.linalg.solve(a, b), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(a, a0)
    np.testing.assert_array_equal(b, b0)
    assert got.shape == b.shape and got.dtype == b.dtype and got.flags.c_contiguous


@pytest.mark.parametrize(
    ("d", "k", "n", "batch_last"),
    [(6, 6, 4096, True), (3, 2, 5000, True), (6, 1, 5000, False), (6, 6, 4095, False),
     (8, 8, 64, False), (9, 9, 64, True), (12, 12, 64, True), (12, 12, 63, False),
     (24, 24, 64, True), (25, 25, 200, False), (17, 1, 200, False)],
)  # fmt: skip
def test_triangular_solve_routes_by_batch(d, k, n, batch_last, monkeypatch):
    """Several right-hand sides take the batch-last substitution from ``BATCH_LAST_MIN_BATCH``
    systems with at most 8 unknowns and from ``BATCH_LAST_MIN_BATCH_LARGE_D`` with 9 to
    ``BATCH_LAST_MAX_D``; one right-hand side never does; the solution is the LU solve's.
    (The small-matrix kernels' host build, an option, would take these batches: off here.)"""
    monkeypatch.setattr(_kl_diag_fused, "FUSED_CPU", "off")
    rng = np.random.default_rng(n + d)
    a = np.tril(rng.uniform(-0.5, 0.5, (n, d, d))) + np.eye(d)
    b = rng.standard_normal((n, d, k))
    calls = []
    original = _compat._batch_last_substitution
    monkeypatch.setattr(
        _compat, "_batch_last_substitution", lambda *x, **kw: calls.append(1) or original(*x, **kw)
    )
    got = _compat.solve_triangular(a, b, lower=True, xp=xp)
    assert bool(calls) == batch_last
    np.testing.assert_allclose(got, np.linalg.solve(a, b), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("lower", [True, False])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_batch_last_substitution_is_the_row_form(lower, dtype):
    """With the batch axis innermost the substitution does the row-by-row form's operations:
    for a lower matrix in the same order (the same bits), for an upper one from the last column
    (within a few units of rounding); in the input's dtype."""
    rng = np.random.default_rng(11)
    d, k = 6, 6
    a = np.tril(rng.uniform(-1, 1, (300, d, d))) + np.eye(d) * rng.uniform(0.5, 2, (300, 1, 1))
    a = (a if lower else np.swapaxes(a, -1, -2).copy()).astype(dtype)
    b = rng.standard_normal((300, d, k)).astype(dtype)
    got = _compat._batch_last_substitution(a, b, lower=lower)
    rows = _compat._substitution(a, b, lower=lower, xp=xp)
    assert got.dtype == dtype and got.shape == rows.shape
    if lower:
        np.testing.assert_array_equal(got, rows)
    else:
        tol = 64 * np.finfo(dtype).eps
        np.testing.assert_allclose(got, rows, rtol=tol, atol=tol * np.abs(rows).max())


@pytest.mark.parametrize(
    ("a_batch", "b_batch", "d", "k"),
    [((1,), (5,), 4, 4), ((5,), (1,), 4, 4), ((1,), (1,), 6, 6), ((0,), (0,), 6, 6),
     ((4,), (4,), 6, 0), ((3,), (3,), 1, 2)],
)  # fmt: skip
def test_batch_last_substitution_shapes(a_batch, b_batch, d, k):
    """Broadcast batches, a single system (whose moved-axis view of ``b`` is already C-ordered:
    it must still be copied before being worked in place), empty batches and no right-hand
    side; the arguments are left alone."""
    rng = np.random.default_rng(3)
    a = np.tril(rng.uniform(-1, 1, a_batch + (d, d))) + 2 * np.eye(d)
    b = rng.standard_normal(b_batch + (d, k))
    a0, b0 = a.copy(), b.copy()
    got = _compat._batch_last_substitution(a, b, lower=True)
    batch = np.broadcast_shapes(a_batch, b_batch)
    assert got.shape == batch + (d, k) and got.flags.c_contiguous
    want = np.linalg.solve(np.broadcast_to(a, batch + (d, d)), np.broadcast_to(b, batch + (d, k)))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(a, a0)
    np.testing.assert_array_equal(b, b0)


@pytest.mark.parametrize("name", ["numpy", "torch"])
def test_decompositions_in_chunks_equal_one_call(name, monkeypatch):
    """``eigh`` and ``svd`` of a batch split into chunks (as torch CUDA tensors are) give the
    one-call result bit for bit, in the batch's shape, and leave the argument alone."""
    if name == "torch":
        torch = pytest.importorskip("torch")
        import array_api_compat.torch as ns

        conv, back = torch.asarray, np.asarray
    else:
        ns, conv, back = xp, np.asarray, np.asarray
    rng = np.random.default_rng(5)
    a = conv(spd(rng, (3, 5), 4))
    a0 = np.array(back(a), copy=True)
    whole_eigh = _compat.eigh(a, xp=ns)
    whole_svd = _compat.svd(a[..., :3], xp=ns)
    calls = []
    monkeypatch.setattr(_compat, "_max_batch", lambda x, xp: calls.append(x.shape) or 4)
    for got, want in [
        (_compat.eigh(a, xp=ns), whole_eigh),
        (_compat.svd(a[..., :3], xp=ns), whole_svd),
    ]:
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert tuple(g.shape) == tuple(w.shape)
            np.testing.assert_array_equal(back(g), back(w))
    np.testing.assert_array_equal(back(a), a0)
    assert len(calls) == 2


def test_only_torch_cuda_tensors_are_chunked():
    """The chunk limit applies to torch CUDA tensors only."""
    torch = pytest.importorskip("torch")
    from types import SimpleNamespace

    import array_api_compat.torch as ns

    fake_cuda = SimpleNamespace(device=SimpleNamespace(type="cuda"))
    assert _compat._max_batch(fake_cuda, ns) == _compat.TORCH_CUDA_MAX_BATCH
    assert _compat._max_batch(torch.ones(2, 2), ns) is None
    assert _compat._max_batch(np.ones((2, 2)), xp) is None
    assert 0 < _compat.TORCH_CUDA_MAX_BATCH < 65536


def test_eigh_through_another_library():
    """``eigh_through`` (how torch CUDA tensors reach CuPy) hands a torch tensor to another
    library through DLPack and returns torch tensors: here NumPy on the CPU, the same mechanics."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    a_np = spd(rng, (4, 3), 5)
    a = torch.asarray(a_np)
    w, U = _compat.eigh_through(a, np)
    assert isinstance(w, torch.Tensor) and isinstance(U, torch.Tensor)
    assert tuple(w.shape) == (4, 3, 5) and tuple(U.shape) == (4, 3, 5, 5)
    np.testing.assert_allclose(w.numpy(), np.linalg.eigvalsh(a_np), rtol=1e-12)
    rebuilt = (U * w[..., None, :]) @ U.mT
    np.testing.assert_allclose(rebuilt.numpy(), a_np, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(a.numpy(), a_np)


def test_eigh_route_setting(monkeypatch):
    """Only torch CUDA tensors may take another library's ``eigh``; a bad setting is named."""
    torch = pytest.importorskip("torch")
    from types import SimpleNamespace

    import array_api_compat.torch as ns

    fake_cuda = SimpleNamespace(device=SimpleNamespace(type="cuda"))
    assert _compat._eigh_route(torch.ones(2, 2), ns) == "native"
    assert _compat._eigh_route(np.ones((2, 2)), xp) == "native"
    monkeypatch.setattr(_compat, "TORCH_CUDA_EIGH", "torch")
    assert _compat._eigh_route(fake_cuda, ns) == "native"
    monkeypatch.setattr(_compat, "TORCH_CUDA_EIGH", "cusolver")
    with pytest.raises(ValueError, match=r"TORCH_CUDA_EIGH.*'cusolver'"):
        _compat._eigh_route(fake_cuda, ns)
    # "auto": CuPy from CUPY_MIN_BATCH matrices; "cupy": every batch (given a plain tensor).
    monkeypatch.setattr(_compat, "_torch_plain", lambda a: True)
    monkeypatch.setattr(_compat, "_cupy_sees_gpu", lambda: True)
    n = _compat.CUPY_MIN_BATCH

    def fake(*batch):
        return SimpleNamespace(device=SimpleNamespace(type="cuda"), shape=(*batch, 6, 6))

    for route, shape, want in [
        ("auto", (n - 1,), "native"),
        ("auto", (n,), "cupy"),
        ("auto", (2, n // 2), "cupy"),
        ("cupy", (3,), "cupy"),
        ("torch", (10 * n,), "native"),
    ]:
        monkeypatch.setattr(_compat, "TORCH_CUDA_EIGH", route)
        assert _compat._eigh_route(fake(*shape), ns) == want, (route, shape)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_tensors_that_stay_with_torch():
    """Tensors recorded by autograd, carrying a forward-mode tangent, or of another dtype are not
    plain (they stay with torch's routine); a tensor that requires grad outside grad mode is, and
    ``eigh_through`` takes it (detached)."""
    torch = pytest.importorskip("torch")
    from torch.autograd import forward_ad

    a = torch.asarray(spd(np.random.default_rng(2), (4,), 3))
    assert _compat._torch_plain(a)
    assert not _compat._torch_plain(a.clone().requires_grad_())
    assert not _compat._torch_plain(a.to(torch.bfloat16))
    with forward_ad.dual_level():
        assert not _compat._torch_plain(forward_ad.make_dual(a, torch.ones_like(a)))
    with torch.no_grad():
        leaf = a.clone().requires_grad_()
        assert _compat._torch_plain(leaf)
        w, _ = _compat.eigh_through(leaf, np)
    np.testing.assert_allclose(w.numpy(), np.linalg.eigvalsh(a.numpy()), rtol=1e-12)


def test_failing_cupy_eigh_falls_back_to_torch(monkeypatch):
    """Where the CuPy route fails (a CuPy that sees the GPU but cannot run), ``"auto"`` warns once
    and uses torch's routine from then on; an explicit ``"cupy"`` raises the error."""
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as ns

    def broken(a, lib):
        raise RuntimeError("CUSOLVER_STATUS_NOT_SUPPORTED")

    import sys
    from types import SimpleNamespace

    monkeypatch.setitem(sys.modules, "cupy", SimpleNamespace())  # (imports; runs nothing)
    monkeypatch.setattr(_compat, "_eigh_route", lambda a, xp: "cupy")
    monkeypatch.setattr(_compat, "eigh_through", broken)
    monkeypatch.setattr(_compat, "_cupy_failed", False)
    monkeypatch.setattr(_compat, "TORCH_CUDA_EIGH", "auto")
    a = torch.asarray(spd(np.random.default_rng(4), (6,), 3))
    want = torch.linalg.eigh(a)
    with pytest.warns(RuntimeWarning, match="CuPy's eigh failed.*NOT_SUPPORTED"):
        got = _compat.eigh(a, xp=ns)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g.numpy(), w.numpy())
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _compat.eigh(a, xp=ns)  # no second warning, no second try
    monkeypatch.setattr(_compat, "TORCH_CUDA_EIGH", "cupy")
    with pytest.raises(RuntimeError, match="NOT_SUPPORTED"):
        _compat.eigh(a, xp=ns)


def test_cupy_eigh_out_of_memory_falls_back_for_that_call(monkeypatch):
    """CuPy running out of memory sends that call to torch's routine, silently, and keeps the
    CuPy route for the next."""
    torch = pytest.importorskip("torch")
    import sys
    import warnings
    from types import SimpleNamespace

    import array_api_compat.torch as ns

    calls = []

    def oom(a, lib):
        calls.append(1)
        raise MemoryError("Out of memory allocating 8,584,008,704 bytes")

    monkeypatch.setitem(sys.modules, "cupy", SimpleNamespace())
    monkeypatch.setattr(_compat, "_eigh_route", lambda a, xp: "cupy")
    monkeypatch.setattr(_compat, "eigh_through", oom)
    monkeypatch.setattr(_compat, "_cupy_failed", False)
    monkeypatch.setattr(_compat, "TORCH_CUDA_EIGH", "auto")
    a = torch.asarray(spd(np.random.default_rng(5), (6,), 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _compat.eigh(a, xp=ns)
        _compat.eigh(a, xp=ns)
    np.testing.assert_array_equal(got[0].numpy(), torch.linalg.eigh(a)[0].numpy())
    assert len(calls) == 2 and not _compat._cupy_failed


@pytest.mark.parametrize("route", ["torch", "cupy"])
def test_torch_cuda_eigh_routes(route, monkeypatch):
    """On the GPU, torch tensors' ``eigh`` by torch (chunked) or by CuPy (through DLPack) agrees
    with NumPy's for more matrices than torch's CUDA routine takes in one call; tensors that
    autograd records stay with torch."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import array_api_compat.torch as ns

    if route == "cupy" and not _compat._cupy_sees_gpu():
        pytest.skip("needs CuPy with a GPU")
    monkeypatch.setattr(_compat, "TORCH_CUDA_EIGH", route)
    rng = np.random.default_rng(9)
    a_np = spd(rng, (70_000,), 6)
    a = torch.asarray(a_np, device="cuda")
    assert _compat._eigh_route(a, ns) == ("cupy" if route == "cupy" else "native")
    w, U = _compat.eigh(a, xp=ns)
    assert w.device == a.device and U.device == a.device
    np.testing.assert_allclose(w.cpu().numpy(), np.linalg.eigvalsh(a_np), rtol=1e-11)
    rebuilt = ((U * w[..., None, :]) @ U.mT).cpu().numpy()
    np.testing.assert_allclose(rebuilt, a_np, rtol=1e-11, atol=1e-11 * np.max(np.abs(a_np)))
    np.testing.assert_array_equal(a.cpu().numpy(), a_np)
    assert _compat._eigh_route(a.clone().requires_grad_(), ns) == "native"


@pytest.mark.parametrize("method", ["kl", "wasserstein"])
def test_projections_with_chunked_decompositions(method, monkeypatch):
    """A full-Gaussian projection and its gradients are the same, bit for bit, when the batched
    decompositions go in chunks (what torch CUDA batches above the limit do)."""
    torch = pytest.importorskip("torch")
    import tr_projections as trp

    mean, scale, old_mean, old_scale = full_policies(np.random.default_rng(11), 41, 3)

    def run():
        args = [torch.tensor(v, requires_grad=True) for v in (mean, scale, old_mean, old_scale)]
        out = trp.project(*args, method=method, eps_mean=0.05, eps_cov=0.05)
        (out.mean.sum() + (out.scale * out.scale).sum()).backward()
        return [out.mean, out.scale] + [x.grad for x in args]

    whole = run()
    sizes = []
    monkeypatch.setattr(_compat, "_max_batch", lambda x, xp: sizes.append(x.shape[0]) or 5)
    for got, want in zip(run(), whole, strict=True):
        np.testing.assert_array_equal(got.detach().numpy(), want.detach().numpy())
    assert max(sizes) > 5  # the decompositions did go in chunks


def _namespace(name):
    if name == "numpy":
        return xp, np.asarray, np.asarray
    if name == "torch":
        torch = pytest.importorskip("torch")
        import array_api_compat.torch as ns

        return ns, torch.asarray, lambda t: t.numpy()
    strict = pytest.importorskip("array_api_strict")
    return strict, strict.asarray, np.asarray


@pytest.mark.parametrize("name", ["numpy", "torch", "array_api_strict"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("d", [1, 2, 3, 6, 17])
def test_householder_r_is_lapacks_r(name, dtype, d):
    """The batched Householder ``R`` (what CuPy batches take) equals LAPACK's (float64) up to the
    signs of its rows, to rounding relative to the matrix, for random, ill-conditioned (1e8),
    rank-deficient (a zero column) and very large or small matrices (1e±20: norms scaled, no
    overflow or underflow), with RᵀR = AᵀA; the argument is left alone."""
    ns, conv, back = _namespace(name)
    rng = np.random.default_rng(d)
    a = rng.standard_normal((4, 4, d, d))
    u, _, vt = np.linalg.svd(rng.standard_normal((2, d, d)))
    a[0, :2] = (u * np.logspace(0, -8, d)) @ vt  # condition number 1e8
    a[1, 0, :, d // 2] = 0.0
    a[2] *= 1e20
    a[3] *= 1e-20
    a = a.astype(dtype)
    arg = conv(a)
    R = back(_compat.householder_r(arg, xp=ns)).astype(np.float64)
    a64 = a.astype(np.float64)
    want = np.linalg.qr(a64, mode="r")
    sign = np.sign(np.diagonal(R, axis1=-2, axis2=-1) * np.diagonal(want, axis1=-2, axis2=-1))
    sign = np.where(sign == 0, 1.0, sign)[..., None]
    scale = np.linalg.norm(a64, axis=(-2, -1))[..., None, None]
    scale = np.where(scale > 0, scale, 1.0)  # (d = 1: the zero column is the whole matrix)
    eps = float(np.finfo(dtype).eps)
    assert np.all(np.isfinite(R))
    assert np.all(np.abs(R * sign - want) <= 50 * d * eps * scale)
    assert np.all(np.tril(R, -1) == 0.0)
    unit = a64 / scale  # (RᵀR = AᵀA, compared at unit scale)
    gram = np.swapaxes(unit, -1, -2) @ unit
    Ru = R / scale
    assert np.all(np.abs(np.swapaxes(Ru, -1, -2) @ Ru - gram) <= 50 * d * eps)
    np.testing.assert_array_equal(back(arg), a)


@pytest.mark.parametrize("name", ["numpy", "torch", "array_api_strict"])
def test_householder_r_near_the_largest_float32(name):
    """A float32 column whose norm is representable but whose ``x0 + |x|`` is not (2e38 and
    1.5e38: norm 2.5e38, sum 4.5e38 > 3.4e38) gives LAPACK's R (float64) to float32 rounding:
    the column is scaled before its reflector is formed (before, x0 - alpha overflowed and the
    reflection was silently skipped)."""
    ns, conv, back = _namespace(name)
    a = NEAR_FLOAT32_MAX
    R = back(_compat.householder_r(conv(a), xp=ns)).astype(np.float64)
    want = np.linalg.qr(a.astype(np.float64), mode="r")
    sign = np.sign(np.diagonal(R, axis1=-2, axis2=-1) * np.diagonal(want, axis1=-2, axis2=-1))
    assert np.all(np.isfinite(R))
    scale = np.abs(want).max(axis=-1, keepdims=True)  # (row by row: the first is 1e38)
    assert np.all(np.abs(R * sign[..., None] - want) <= 1e-5 * scale)


def test_cupy_batches_take_householder_r(monkeypatch):
    """``qr_r`` of a CuPy batch goes to ``householder_r`` (CuPy's batched QR loops over the
    matrices); single matrices keep the library's QR."""
    calls = []
    real = _compat.householder_r
    monkeypatch.setattr(_compat, "is_cupy", lambda ns: True)
    monkeypatch.setattr(_compat, "_native_namespace", lambda ns: np)
    monkeypatch.setattr(
        _compat, "householder_r", lambda a, xp: calls.append(a.shape) or real(a, xp=xp)
    )
    rng = np.random.default_rng(1)
    a = rng.standard_normal((5, 3, 3))
    _compat.qr_r(a, xp=xp)
    _compat.qr_r(a[0], xp=xp)
    assert calls == [(5, 3, 3)]


@pytest.mark.parametrize("method", ["kl", "wasserstein"])
def test_projections_with_householder_r(method, monkeypatch):
    """KL and W2 projections of full Gaussians (their output factors come from ``qr_r``) and
    their gradients are those of LAPACK's QR to rounding when ``householder_r`` gives R (the
    small-matrix kernels' host build, an option that would replace it, off)."""
    import tr_projections as trp

    monkeypatch.setattr(_kl_diag_fused, "FUSED_CPU", "off")
    from tr_projections import gaussian
    from tr_projections.testing.strategies import cholesky_factors

    rng = np.random.default_rng(12)
    d, n = 5, 30
    old_scale = cholesky_factors(rng, (n,), d, cond=1e6)
    scale = cholesky_factors(rng, (n,), d, cond=1e6)
    mean, old_mean = rng.standard_normal((2, n, d))
    g = [rng.standard_normal((n, d)), np.tril(rng.standard_normal((n, d, d)))]

    def run():
        out, vjp_fn = trp.vjp(
            trp.project, mean, scale, old_mean, old_scale, method=method, eps_mean=1e-3,
            eps_cov=1e-3,
        )  # fmt: skip
        return [*out, *vjp_fn(trp.Gaussian(*g))]

    want = run()
    calls = []
    monkeypatch.setattr(
        gaussian, "qr_r", lambda a, xp: calls.append(1) or _compat.householder_r(a, xp=xp)
    )
    got = run()
    assert calls
    for x, y in zip(got, want, strict=True):
        tol = 1e-10 * max(1.0, float(np.max(np.abs(y))))
        np.testing.assert_allclose(x, y, rtol=0, atol=tol)


@pytest.mark.parametrize("name", ["numpy", "torch", "array_api_strict"])
@pytest.mark.parametrize("shape", [(0, 6), (1, 1), (5, 6), (3, 4, 17), (1000, 2)])
def test_row_sum_is_the_last_axis_sum(name, shape):
    """``row_sum`` (a product with ones for NumPy and torch) equals ``sum(axis=-1)`` up to the
    order of the additions, keeps non-finite values, and has the reduced shape and dtype."""
    mod = pytest.importorskip(name)
    from array_api_compat import array_namespace

    rng = np.random.default_rng(sum(shape))
    ref = rng.standard_normal(shape) * np.exp(rng.standard_normal(shape))
    if ref.size:
        ref.flat[0] = np.inf
    x = mod.asarray(ref)
    ns = array_namespace(x)
    got = np.asarray(_compat.row_sum(x, xp=ns))
    assert got.shape == shape[:-1] and got.dtype == np.float64
    np.testing.assert_allclose(got, ref.sum(axis=-1), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("name", ["numpy", "torch", "array_api_strict"])
def test_take_rows_matches_take(name):
    mod = pytest.importorskip(name)
    from array_api_compat import array_namespace

    rng = np.random.default_rng(1)
    ref = rng.standard_normal((50, 3, 2))
    index = np.sort(rng.choice(50, 20, replace=False))
    x = mod.asarray(ref)
    got = _compat.take_rows(x, mod.asarray(index), xp=array_namespace(x))
    np.testing.assert_array_equal(np.asarray(got), ref[index])


@pytest.mark.parametrize("name", ["numpy", "torch", "array_api_strict"])
@pytest.mark.parametrize("shrink", [0.0, 0.25, 1.0])
def test_eager_loop_shrinks_to_its_running_rows(shrink, name):
    """A loop whose rows finish at different iterations gives the same state with or without
    going on with its running rows alone, once (gathered a single time) at most ``shrink`` of
    its rows are running: 90, 40, 10 and 2 of 100 rows run before the first four steps."""
    mod = pytest.importorskip(name)
    from array_api_compat import array_namespace

    stops = mod.asarray(np.repeat([0, 1, 2, 3, 8], [10, 50, 30, 8, 2]))  # iterations per row
    ns = array_namespace(stops)
    seen = []

    def body(state):
        i, stop, acc = state
        seen.append(i.shape[0])
        running = i < stop
        half = 0.5 * ns.astype(i, ns.float64)
        return (ns.where(running, i + 1, i), stop, ns.where(running, acc + half, acc))

    state = (ns.zeros(100, dtype=ns.int64), stops, ns.zeros(100, dtype=ns.float64))
    out = _compat.while_loop(lambda s: s[0] < s[1], body, state, max_iter=50, shrink=shrink, xp=ns)
    want = np.repeat([0, 1, 2, 3, 8], [10, 50, 30, 8, 2])
    np.testing.assert_array_equal(np.asarray(out[0]), want)
    np.testing.assert_array_equal(np.asarray(out[2]), 0.25 * want * (want - 1))
    assert out[1] is stops  # passed through by the body: the full array itself, no scatter
    expected = {0.0: [100] * 8, 0.25: [100, 100] + [10] * 6, 1.0: [90] * 8}
    assert seen == expected[shrink]


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_torch_cpu_matmul_through_numpy(monkeypatch):
    """Batches of small square-ish torch CPU products go through NumPy (the same values to
    rounding, a torch tensor back, arguments untouched); thin products, small batches, tensors
    autograd records, forward-mode duals and ``torch.func`` transforms stay with torch."""
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as ns
    from torch.autograd import forward_ad

    seen = []
    real = np.matmul
    monkeypatch.setattr(np, "matmul", lambda a, b: seen.append(a.shape) or real(a, b))
    rng = np.random.default_rng(13)
    n = _compat.NUMPY_MATMUL_MIN_BATCH
    a, b = (torch.asarray(rng.standard_normal((n, 6, 6))) for _ in range(2))
    a0 = a.clone()
    got = _compat.matmul(a, b, xp=ns)
    assert seen == [(n, 6, 6)] and isinstance(got, torch.Tensor)
    np.testing.assert_allclose(got.numpy(), (a @ b).numpy(), rtol=1e-14, atol=1e-14)
    assert torch.equal(a, a0)
    seen.clear()
    cases = [
        (a, b[..., :1]),  # a matrix-vector product
        (a[: n - 1], b[: n - 1]),  # a small batch
        (a.clone().requires_grad_(), b),  # recorded by autograd
        (a[..., :3, :3], b[..., :3, :3]),  # matrices below NUMPY_MATMUL_MIN_D
    ]
    for x, y in cases:
        out = _compat.matmul(x, y, xp=ns)
        np.testing.assert_allclose(out.detach().numpy(), (x @ y).detach().numpy(), rtol=1e-14)
    with forward_ad.dual_level():
        _compat.matmul(forward_ad.make_dual(a, torch.ones_like(a)), b, xp=ns)
    torch.func.vmap(lambda x: _compat.matmul(x, b, xp=ns))(a[None])
    assert seen == []
    monkeypatch.setattr(_compat, "TORCH_CPU_MATMUL_VIA_NUMPY", False)
    _compat.matmul(a, b, xp=ns)
    assert seen == []
