"""The small-matrix kernels (``tr_projections._small_kernels``): the Cholesky factor of a Gram
matrix by Householder reflections, and batched triangular solves, one thread per matrix; and,
in the host build only, ``eigh`` by the cyclic Jacobi method in vector lanes.

On the CPU their source is built as plain C++ (a loop over the matrices) by the package's host
build and called on NumPy arrays, directly (the module's ``gram_cholesky`` and
``solve_triangular``) and through the package's host route (``TRP_FUSED_CPU=on``); the results
are compared with NumPy's and with the package's own routes (the host build off). On a GPU
(``TRP_BACKENDS=torch_cuda,cupy``) the CUDA build runs inside ``cholesky_of_gram`` and
``solve_triangular``, and both it and the library routes (``TRP_FUSED=off``) are compared with
NumPy's float64 results.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from _data import NEAR_FLOAT32_MAX

from tr_projections import _compat
from tr_projections import _small_kernels as sk
from tr_projections.gaussian import cholesky_of_gram
from tr_projections.projections import _kl_diag_fused as fused
from tr_projections.testing import available_backends, get_backend

# Relative tolerance by dtype: both routes are backward stable, so they agree to a small
# multiple of eps times the condition number (the test matrices' is below 1e3).
RTOL = {"float64": 1e-11, "float32": 2e-3}

# The Jacobi eigendecompositions' tolerance by dtype, times d, relative to the largest
# eigenvalue's magnitude: eigenvalues against NumPy's float64 ones, the residual A U - U diag(w)
# and U's orthonormality (measured: at most 3d eps for d <= 16).
EIGH_TOL = {dt: 8 * float(np.finfo(dt).eps) for dt in ("float64", "float32")}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("small_kernels")


@pytest.fixture
def host_route(cache_dir, monkeypatch):
    """The package's host route of the kernels on (``FUSED_CPU``), built into a test folder
    (once per dtype and size for the module); returns the list of kernel calls made."""
    if fused.compiler() is None:
        pytest.skip("no C++ compiler to build the kernels' host form")
    monkeypatch.setenv("TRP_CACHE_DIR", str(cache_dir))
    monkeypatch.setattr(fused, "FUSED", "auto")
    monkeypatch.setattr(fused, "FUSED_CPU", "on")
    monkeypatch.setattr(sk, "_host", {})
    monkeypatch.setattr(sk, "_host_failed", {})
    calls: list[str] = []
    launch = sk._launch
    monkeypatch.setattr(sk, "_launch", lambda name, *a: calls.append(name) or launch(name, *a))
    return calls


def _library(fn, *args, **kwargs):
    """``fn`` with the kernels' host build off: the library's own routes."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fused, "FUSED_CPU", "off")
        return fn(*args, **kwargs)


def _matrices(rng, n, d, dtype):
    """Square matrices of condition number below 1e3 (a random orthogonal times a diagonal of
    1 to 100 times another orthogonal), some with a negative leading entry."""
    q1, _ = np.linalg.qr(rng.standard_normal((n, d, d)))
    q2, _ = np.linalg.qr(rng.standard_normal((n, d, d)))
    s = np.exp(rng.uniform(0.0, np.log(100.0), (n, 1, d)))
    return ((q1 * s) @ q2).astype(dtype)


def _triangular(rng, n, d, dtype, lower=True):
    """Lower (or upper) triangular factors of condition number below 100: the Cholesky factors
    of the Gram matrices of :func:`_matrices` (random triangular matrices are ill-conditioned,
    exponentially in d)."""
    m = _matrices(rng, n, d, "float64")
    L = np.linalg.cholesky(np.swapaxes(m, -1, -2) @ m)
    return (L if lower else np.swapaxes(L, -1, -2).copy()).astype(dtype)


def _close(got, want, dtype, scale):
    err = np.max(np.abs(got.astype(np.float64) - want)) / scale
    assert err <= RTOL[dtype], f"relative error {err:.3g} > {RTOL[dtype]}"


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("d", [1, 2, 6, 16])
def test_host_gram_cholesky(host_route, dtype, d):
    """L L^T = M^T M, L lower triangular with a non-negative diagonal, equal to the package's
    QR route (NumPy), for contiguous and transposed input."""
    rng = np.random.default_rng(d)
    m = _matrices(rng, 300, d, dtype)
    for x in (m, np.swapaxes(m, -1, -2)):
        L = sk.gram_cholesky(x, xp=np)
        x64 = x.astype(np.float64)
        scale = np.max(np.abs(x64)) ** 2
        assert np.all(np.triu(L, 1) == 0) and np.all(np.diagonal(L, 0, -2, -1) >= 0)
        _close(L @ np.swapaxes(L, -1, -2), np.swapaxes(x64, -1, -2) @ x64, dtype, scale)
        want = _library(cholesky_of_gram, x64, xp=_compat.array_namespace(x64))
        _close(L, want, dtype, np.sqrt(scale))


def test_host_gram_cholesky_degenerate_columns(host_route):
    """A zero column (nothing to reflect: no NaN) and a column already along e1 give the
    factor of the Gram matrix all the same."""
    d = 4
    m = np.random.default_rng(0).standard_normal((3, d, d))
    m[0, :, 1] = 0.0  # a zero column
    m[1, 1:, 0] = 0.0  # the first column along e1, positive lead
    m[2, 1:, 0] = 0.0
    m[2, 0, 0] = -2.0  # negative lead
    L = sk.gram_cholesky(m, xp=np)
    assert np.all(np.isfinite(L))
    _close(L @ np.swapaxes(L, -1, -2), np.swapaxes(m, -1, -2) @ m, "float64", 10.0)
    assert L[0, 1, 1] == 0.0


def test_host_gram_cholesky_near_the_largest_float32(host_route):
    """A float32 column whose norm is representable but whose ``x0 + |x|`` is not gives the
    factor of the Gram matrix (float64) to float32 rounding: the column is scaled before its
    reflector is formed."""
    m = NEAR_FLOAT32_MAX
    L = sk.gram_cholesky(m, xp=np).astype(np.float64)
    m64 = m.astype(np.float64)
    want = _library(cholesky_of_gram, m64, xp=_compat.array_namespace(m64))
    scale = np.abs(want).max(axis=-2, keepdims=True)  # (column by column: the first is 1e38)
    assert np.all(np.isfinite(L)) and np.all(np.abs(L - want) <= 1e-5 * scale)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("lower", [True, False])
@pytest.mark.parametrize("d, k", [(1, 1), (6, 1), (6, 6), (16, 3)])
def test_host_trsm(host_route, dtype, lower, d, k):
    """A X = B for lower and upper triangular A, contiguous and transposed A and B, equal to
    NumPy's solve."""
    rng = np.random.default_rng(10 * d + k)
    n = 200
    a = _triangular(rng, n, d, dtype, lower)
    b = rng.standard_normal((n, d, k)).astype(dtype)
    want = np.linalg.solve(a.astype(np.float64), b.astype(np.float64))
    for aa in (a, np.swapaxes(np.swapaxes(a, -1, -2).copy(), -1, -2)):
        for bb in (b, np.swapaxes(np.swapaxes(b, -1, -2).copy(), -1, -2)):
            got = sk.solve_triangular(aa, bb, lower=lower, xp=np)
            _close(got, want, dtype, np.max(np.abs(want)))


def _symmetric(rng, n, d, dtype):
    """Symmetric matrices with eigenvalues of both signs and magnitudes from 1e-3 to 1e3
    (every third with a double eigenvalue, every fifth with a zero one), in random bases."""
    q, _ = np.linalg.qr(rng.standard_normal((n, d, d)))
    w = rng.choice([-1.0, 1.0], (n, d)) * np.exp(rng.uniform(np.log(1e-3), np.log(1e3), (n, d)))
    if d > 1:
        w[::3, 1] = w[::3, 0]
        w[::5, -1] = 0.0
    a = (q * w[:, None, :]) @ np.swapaxes(q, -1, -2)
    return ((a + np.swapaxes(a, -1, -2)) / 2).astype(dtype)


def _check_eigh(a, w, U, dtype):
    """Ascending eigenvalues equal to NumPy's float64 ones, A U = U diag(w), U orthonormal,
    to :data:`EIGH_TOL` times d relative to the largest eigenvalue of each matrix."""
    a64, w64, U64 = (np.asarray(x, dtype=np.float64) for x in (a, w, U))
    d = a64.shape[-1]
    want = np.linalg.eigvalsh(a64)
    scale = np.maximum(np.max(np.abs(want), axis=-1), np.finfo(np.float64).tiny)
    tol = EIGH_TOL[dtype] * d
    assert np.all(np.diff(w64, axis=-1) >= 0)
    assert np.max(np.abs(w64 - want).max(axis=-1) / scale) <= tol
    resid = np.abs(a64 @ U64 - U64 * w64[..., None, :]).max(axis=(-2, -1)) / scale
    assert np.max(resid) <= tol
    assert np.max(np.abs(np.swapaxes(U64, -1, -2) @ U64 - np.eye(d))) <= tol


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("d", [1, 2, 3, 6, 16])
def test_host_eigh(host_route, dtype, d):
    """The Jacobi kernel's eigenvalues and eigenvectors (:func:`_check_eigh`) for symmetric
    matrices with eigenvalues of both signs over six decades, repeated and zero ones; only the
    lower triangle is read (NaN above it changes no bit)."""
    rng = np.random.default_rng(40 + d)
    a = _symmetric(rng, 301, d, dtype)
    w, U = sk.eigh(a, xp=np)
    assert w.dtype == U.dtype == np.dtype(dtype) and w.shape == (301, d) and U.shape == a.shape
    _check_eigh(a, w, U, dtype)
    lower = np.where(np.tril(np.ones((d, d), dtype=bool)), a, np.nan)
    w2, U2 = sk.eigh(lower, xp=np)
    assert np.array_equal(w, w2) and np.array_equal(U, U2)
    assert host_route == ["sym_eigh", "sym_eigh"]


def test_host_eigh_hard_matrices(host_route):
    """Zero, identity, diagonal with repeated entries, rank one, entries near the float64
    limits (scaled by a power of two inside: no overflow, no underflow), off-diagonal entries
    far below the diagonal ones. Matrices with an entry that is not finite come out as
    NumPy's ``eigh`` gives them (NaN off the diagonal: NaN results; NaN on it: its error),
    and the others in their batch as they would alone."""
    rng = np.random.default_rng(3)
    d = 5
    v = rng.standard_normal(d)
    base = _symmetric(rng, 1, d, "float64")[0]
    tiny_off = np.diag(np.arange(1.0, d + 1)) + 1e-200 * (np.ones((d, d)) - np.eye(d))
    cases = [
        np.zeros((d, d)),
        np.eye(d),
        np.diag([2.0, 1.0, 2.0, -3.0, 1.0]),
        np.outer(v, v),
        base * 1e300,
        base * 1e-300,
        base * 2.0**-1070,  # (subnormal entries)
        tiny_off,
    ]
    a = np.stack(cases)
    w, U = sk.eigh(a, xp=np)
    assert np.all(np.isfinite(w)) and np.all(np.isfinite(U))
    for i, x in enumerate(cases):
        if i == 6:  # subnormal: the eigenvalues to the absolute resolution left there
            want = np.linalg.eigvalsh(base) * 2.0**-1070
            assert np.max(np.abs(w[i] - want)) <= 2.0**-1070 * 1e-12 + 2 * 2.0**-1074 * d
            continue
        _check_eigh(x, w[i], U[i], "float64")
    assert np.array_equal(w[1], np.ones(d)) and np.array_equal(U[1], np.eye(d))
    assert np.array_equal(w[0], np.zeros(d))
    # Not finite: 2x2 matrices with NaN or +-inf off the diagonal, whose eigh NumPy gives as
    # NaN, beside finite ones; a NaN on the diagonal of a 5x5 one, for which it raises.
    pair = _symmetric(rng, 4, 2, "float64")
    for value in (np.nan, np.inf, -np.inf):
        batch = pair.copy()
        batch[1, 0, 1] = batch[1, 1, 0] = value
        want_w, want_U = np.linalg.eigh(batch)
        assert np.all(np.isnan(want_w[1])) and not np.any(np.isnan(want_w[[0, 2, 3]]))
        got_w, got_U = sk.eigh(batch, xp=np)
        assert np.array_equal(got_w[1], want_w[1], equal_nan=True)
        assert np.array_equal(got_U[1], want_U[1], equal_nan=True)
        alone_w, alone_U = sk.eigh(pair[[0, 2, 3]], xp=np)
        assert np.array_equal(got_w[[0, 2, 3]], alone_w)
        assert np.array_equal(got_U[[0, 2, 3]], alone_U)
    on_diagonal = np.concatenate([a[:2], np.full((1, d, d), np.nan)])
    with pytest.raises(np.linalg.LinAlgError):
        np.linalg.eigh(on_diagonal)
    with pytest.raises(np.linalg.LinAlgError):
        sk.eigh(on_diagonal, xp=np)


def test_host_eigh_is_per_matrix(host_route, monkeypatch):
    """Each matrix's result depends on that matrix alone (a converged one is rotated no more
    while others in its vector lanes go on): the same bits in a batch, alone, in strided,
    flipped and broadcast views, and with ``_compat.eigh`` split over threads; float32 (16
    lanes) too, and a zero matrix beside others keeps +0 everywhere."""
    rng = np.random.default_rng(11)
    for dtype in ("float32", "float64"):
        b = _symmetric(rng, 40, 5, dtype)
        b[7] = -0.0
        wb, Ub = sk.eigh(b, xp=np)
        for i in (0, 7, 17, 39):
            wi, Ui = sk.eigh(b[i : i + 1], xp=np)
            assert np.array_equal(wi[0], wb[i]) and np.array_equal(Ui[0], Ub[i])
        assert not np.any(np.signbit(wb[7])) and not np.any(np.signbit(Ub[7]))
    a = _symmetric(rng, 37, 6, "float64")
    w, U = sk.eigh(a, xp=np)
    for i in (0, 5, 36):
        wi, Ui = sk.eigh(a[i : i + 1], xp=np)
        assert np.array_equal(wi[0], w[i]) and np.array_equal(Ui[0], U[i])
    wf, Uf = sk.eigh(a[::-1], xp=np)
    assert np.array_equal(wf, w[::-1]) and np.array_equal(Uf, U[::-1])
    wt, Ut = sk.eigh(np.swapaxes(a, -1, -2), xp=np)  # (symmetric: the same matrices)
    assert np.array_equal(wt, w) and np.array_equal(Ut, U)
    wb, Ub = sk.eigh(np.broadcast_to(a[2], (3, 4, 6, 6)), xp=np)
    assert wb.shape == (3, 4, 6) and np.array_equal(wb, np.broadcast_to(w[2], (3, 4, 6)))
    assert np.array_equal(Ub, np.broadcast_to(U[2], (3, 4, 6, 6)))
    monkeypatch.setattr(sk, "EIGH_PARALLEL_MIN_WORK", 2)
    monkeypatch.setattr(_compat, "LAPACK_THREADS", 3)
    host_route.clear()
    ws, Us = _compat.eigh(a, xp=np)
    assert host_route == ["sym_eigh"] * 3
    assert np.array_equal(ws, w) and np.array_equal(Us, U)


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_host_eigh_in_the_package(host_route, monkeypatch, lib):
    """With the host build on, ``_compat.eigh`` of NumPy arrays and torch CPU tensors takes the
    kernel (d <= ``EIGH_MAX_D``), and LAPACK's routine with ``EIGH`` off, for d = 13 and
    without the host build; a bad setting is an error naming it."""
    rng = np.random.default_rng(12)
    a = _symmetric(rng, 40, 4, "float64").reshape(2, 20, 4, 4)
    big = _symmetric(rng, 3, sk.EIGH_MAX_D + 1, "float64")
    if lib == "torch":
        torch = pytest.importorskip("torch")
        a, big = torch.as_tensor(a), torch.as_tensor(big)
    xp = _compat.array_namespace(a)
    w, U = _compat.eigh(a, xp=xp)
    assert type(w) is type(a) and tuple(w.shape) == (2, 20, 4)
    assert host_route == ["sym_eigh"]
    _check_eigh(np.asarray(a), np.asarray(w), np.asarray(U), "float64")
    monkeypatch.setattr(sk, "EIGH", "off")
    w_lib, _ = _compat.eigh(a, xp=xp)
    _compat.eigh(big, xp=xp)
    monkeypatch.setattr(sk, "EIGH", "on")
    _compat.eigh(big, xp=xp)
    _library(_compat.eigh, a, xp=xp)
    assert host_route == ["sym_eigh"]
    np.testing.assert_allclose(np.asarray(w), np.asarray(w_lib), rtol=0, atol=1e-13 * 1e3)
    monkeypatch.setattr(fused, "FUSED", "off")
    assert not sk.eigh_applies(a, xp=xp)
    monkeypatch.setattr(fused, "FUSED", "auto")
    monkeypatch.setattr(sk, "EIGH", "sometimes")
    with pytest.raises(ValueError, match="TRP_FUSED_EIGH"):
        _compat.eigh(a, xp=xp)
    with pytest.MonkeyPatch.context() as mp:  # (not asked where it cannot apply)
        mp.setattr(fused, "FUSED_CPU", "off")
        _compat.eigh(a, xp=xp)


def test_host_eigh_redone_matrices_in_torch_batches(host_route, monkeypatch):
    """torch tensors of several batch axes, whole and split over threads: the matrices the
    kernel gives back (an entry that is not finite) come out as torch's own ``eigh`` gives them,
    results or error. A 2x2 with a NaN off its diagonal: NaN there, the others as the kernel
    gives them; a 4x4 with a NaN on its diagonal: torch's error, naming the caller's batch
    index (flat 5), not the matrix's index among those redone (0)."""
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as tns

    rng = np.random.default_rng(14)
    pairs = _symmetric(rng, 6, 2, "float64").reshape(2, 3, 2, 2)
    want_w, want_U = sk.eigh(pairs, xp=np)
    off = pairs.copy()
    off[1, 1, 1, 0] = off[1, 1, 0, 1] = np.nan  # (flat 4)
    lib_w, lib_U = torch.linalg.eigh(torch.as_tensor(off))
    on = _symmetric(rng, 6, 4, "float64").reshape(2, 3, 4, 4)
    on[1, 2, 3, 3] = np.nan  # (flat 5)
    with pytest.raises(Exception, match=r"\b5\b") as lib_error:
        torch.linalg.eigh(torch.as_tensor(on))
    keep = np.ones((2, 3), dtype=bool)
    keep[1, 1] = False
    for split in (False, True):
        if split:
            monkeypatch.setattr(sk, "EIGH_PARALLEL_MIN_WORK", 2)
            monkeypatch.setattr(_compat, "LAPACK_THREADS", 2)
        host_route.clear()
        w, U = _compat.eigh(torch.as_tensor(off), xp=tns)
        assert host_route == ["sym_eigh"] * (2 if split else 1)
        assert torch.isnan(lib_w[1, 1]).all() and torch.isnan(lib_U[1, 1]).all()
        assert np.array_equal(w.numpy()[1, 1], lib_w.numpy()[1, 1], equal_nan=True)
        assert np.array_equal(U.numpy()[1, 1], lib_U.numpy()[1, 1], equal_nan=True)
        assert np.array_equal(w.numpy()[keep], want_w[keep])
        assert np.array_equal(U.numpy()[keep], want_U[keep])
        with pytest.raises(type(lib_error.value), match=r"\b5\b"):
            _compat.eigh(torch.as_tensor(on), xp=tns)


def test_host_eigh_torch_views(host_route):
    """torch CPU tensors, float32 and float64, transposed, expanded and sliced (strided views):
    the kernel's results equal those of the same values as a contiguous NumPy array, bit for
    bit; a tensor that requires grad keeps torch's differentiable routine."""
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as tns

    rng = np.random.default_rng(13)
    for dtype in ("float32", "float64"):
        a = _symmetric(rng, 30, 4, dtype)
        want_w, want_U = sk.eigh(a[::2], xp=np)
        t = torch.as_tensor(a)
        for view in (t[::2], t.mT[::2], t.expand(2, -1, -1, -1)[1][::2]):
            w, U = _compat.eigh(view, xp=tns)
            assert w.dtype == t.dtype
            assert np.array_equal(w.numpy(), want_w) and np.array_equal(U.numpy(), want_U)
    host_route.clear()
    x = torch.as_tensor(_symmetric(rng, 5, 3, "float64")).requires_grad_(True)
    w, _ = _compat.eigh(x, xp=tns)
    w.sum().backward()
    assert host_route == [] and x.grad is not None


def test_applies_only_where_it_should(monkeypatch):
    """NumPy arrays take the kernels only with the host build on (``FUSED_CPU``), batched,
    with 1 <= d <= MAX_D, float32 or float64, and never with ``TRP_FUSED=off``; a bad setting
    is an error naming it."""
    x = np.ones((4, 6, 6))
    xp = _compat.array_namespace(x)
    monkeypatch.setattr(fused, "FUSED", "auto")
    monkeypatch.setattr(fused, "FUSED_CPU", "off")
    assert not sk.applies(x, xp=xp)
    monkeypatch.setattr(fused, "FUSED_CPU", "on")
    assert sk.applies(x, xp=xp)
    for y in (np.ones((6, 6)), np.ones((4, 17, 17)), np.ones((4, 6, 6), dtype=np.float16)):
        assert not sk.applies(y, xp=xp)
    # square matrices, right-hand sides of d rows, one dtype
    assert not sk.applies(np.ones((4, 6, 5)), xp=xp)
    assert not sk.applies(x, np.ones((4, 5, 2)), xp=xp)
    assert not sk.applies(x, np.ones((4, 6, 2), dtype=np.float32), xp=xp)
    assert sk.applies(x, np.ones((4, 6, 2)), xp=xp)
    monkeypatch.setattr(fused, "FUSED", "off")
    assert not sk.applies(x, xp=xp)
    monkeypatch.setattr(fused, "FUSED", "sometimes")
    with pytest.raises(ValueError, match="FUSED"):
        sk.applies(x, xp=xp)


def test_host_route_reads_whole_entries_and_square_matrices(host_route):
    """A field of a structured array (strides that are not whole entries) is read as its
    values (copied first); a non-square matrix or right-hand sides of another height never
    reach the kernels (the library routes answer, or raise)."""
    rng = np.random.default_rng(8)
    a = _triangular(rng, 5, 3, "float64")
    rec = np.zeros((5, 3, 3), dtype=[("x", "f8"), ("pad", "f4")])
    rec["x"] = a
    b = rng.standard_normal((5, 3, 2))
    got = _compat.solve_triangular(rec["x"], b, lower=True, xp=np)
    np.testing.assert_allclose(got, np.linalg.solve(a, b), rtol=1e-12, atol=1e-12)
    m = _matrices(rng, 5, 3, "float64")
    rec["x"] = m
    L = cholesky_of_gram(rec["x"], xp=np)
    _close(L @ np.swapaxes(L, -1, -2), np.swapaxes(m, -1, -2) @ m, "float64", 1e4)
    assert host_route == ["trsm", "gram_cholesky"]
    tall = rng.standard_normal((4, 5, 3))
    L = cholesky_of_gram(tall, xp=np)  # (QR of a tall matrix: the library's route)
    _close(L @ np.swapaxes(L, -1, -2), np.swapaxes(tall, -1, -2) @ tall, "float64", 100.0)
    with pytest.raises((ValueError, IndexError)):  # (the library route's own error)
        _compat.solve_triangular(a, b[:, :2], lower=True, xp=np)
    assert host_route == ["trsm", "gram_cholesky"]


def test_torch_jit_trace_keeps_the_library_routes(host_route):
    """Under ``torch.jit.trace`` (shapes are traced values) the kernels are not taken: no
    compiler run for a traced size, no warning, and the traced function is right for other
    inputs."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(9)
    a = torch.as_tensor(_triangular(rng, 6, 4, "float64"))
    b = torch.as_tensor(rng.standard_normal((6, 4, 2)))
    xp = _compat.array_namespace(a)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # (a failed build would warn so)
        warnings.simplefilter("ignore", DeprecationWarning)  # (torch.jit.trace is deprecated)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(  # (check_trace=False: no untraced check run)
            lambda x, y: _compat.solve_triangular(x, y, lower=True, xp=xp),
            (a, b),
            check_trace=False,
        )
    assert host_route == [] and sk._host_failed == {}
    a2 = torch.as_tensor(_triangular(rng, 6, 4, "float64"))
    np.testing.assert_allclose(
        traced(a2, b).numpy(), np.linalg.solve(a2.numpy(), b.numpy()), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_host_route_in_the_package(host_route, monkeypatch, lib):
    """With the host build on, ``cholesky_of_gram`` and ``solve_triangular`` of NumPy arrays
    and torch CPU tensors run the kernels (both triangles, transposed and broadcast-free
    batched input of two batch axes) and equal NumPy's float64 results."""
    rng = np.random.default_rng(5)
    m = _matrices(rng, 60, 5, "float64").reshape(3, 20, 5, 5)
    a = _triangular(rng, 60, 5, "float64").reshape(3, 20, 5, 5)
    b = rng.standard_normal((3, 20, 5, 2))
    if lib == "torch":
        torch = pytest.importorskip("torch")
        M, A, B = (torch.as_tensor(x) for x in (m, a, b))
        At = A.mT
    else:
        M, A, B, At = m, a, b, np.swapaxes(a, -1, -2)
    xp = _compat.array_namespace(M)
    got = [
        cholesky_of_gram(M, xp=xp),
        _compat.solve_triangular(A, B, lower=True, xp=xp),
        _compat.solve_triangular(At, B, lower=False, xp=xp),
    ]
    assert host_route == ["gram_cholesky", "trsm", "trsm"]
    want = [
        _library(cholesky_of_gram, m, xp=_compat.array_namespace(m)),
        np.linalg.solve(a, b),
        np.linalg.solve(np.swapaxes(a, -1, -2), b),
    ]
    for g, w in zip(got, want, strict=True):
        g = np.asarray(g)
        assert g.shape == w.shape
        _close(g, w, "float64", np.max(np.abs(w)))


def test_host_route_strides_and_empty_batches(host_route):
    """The package's glue around the host build: negative, zero (broadcast) and transposed
    strides are read as the arrays' values, and empty batches or no right-hand sides give
    empty results without a launch."""
    rng = np.random.default_rng(7)
    xp = np
    a = _triangular(rng, 8, 3, "float64")
    b = rng.standard_normal((8, 3, 2))
    flipped = a[::-1]  # (negative batch stride)
    got = _compat.solve_triangular(flipped, b, lower=True, xp=xp)
    np.testing.assert_allclose(got, np.linalg.solve(flipped, b), rtol=1e-12, atol=1e-12)
    shared = np.broadcast_to(rng.standard_normal((1, 3, 2)), (8, 3, 2))  # (zero stride)
    got = _compat.solve_triangular(a, shared, lower=True, xp=xp)
    np.testing.assert_allclose(got, np.linalg.solve(a, shared), rtol=1e-12, atol=1e-12)
    m = _matrices(rng, 8, 3, "float64")[:, ::-1, ::-1]
    got = cholesky_of_gram(m, xp=xp)
    _close(got @ np.swapaxes(got, -1, -2), np.swapaxes(m, -1, -2) @ m, "float64", 1e4)
    assert host_route == ["trsm", "trsm", "gram_cholesky"]
    empty = _compat.solve_triangular(a[:0], b[:0], lower=True, xp=xp)
    none = _compat.solve_triangular(a, b[..., :0], lower=True, xp=xp)
    assert empty.shape == (0, 3, 2) and none.shape == (8, 3, 0)
    assert cholesky_of_gram(m[:0], xp=xp).shape == (0, 3, 3)
    assert host_route == ["trsm", "trsm", "gram_cholesky"]  # (no launch for empty ones)


@pytest.mark.parametrize("method", ["kl", "frobenius", "wasserstein"])
def test_host_route_projections_match(host_route, monkeypatch, method):
    """Full projections and their VJPs with the host build on (the kernels run) equal those
    with it off, to 1e-12 relative, NumPy and torch (``loss.backward``)."""
    torch = pytest.importorskip("torch")
    import tr_projections as trp

    fn = {"kl": trp.project_kl, "frobenius": trp.project_frobenius}.get(
        method, trp.project_wasserstein
    )
    rng = np.random.default_rng(6)
    n, d = 400, 4
    old_scale = _triangular(rng, n, d, "float64")
    scale = old_scale @ (np.eye(d) + 0.3 * np.tril(rng.standard_normal((n, d, d))) / d)
    scale = np.linalg.cholesky(scale @ np.swapaxes(scale, -1, -2))
    old_mean = rng.standard_normal((n, d))
    mean = old_mean + 0.3 * rng.standard_normal((n, d))
    args = (mean, scale, old_mean, old_scale)
    bounds = {"kl": (0.05, 0.01), "frobenius": (0.05, 0.5)}.get(method, (0.05, 0.05))
    cots = (rng.standard_normal((n, d)), np.tril(rng.standard_normal((n, d, d))))

    def run():
        out, vjp_fn = trp.vjp(fn, *args, eps_mean=bounds[0], eps_cov=bounds[1])
        numpy_res = [*out, *vjp_fn(trp.Gaussian(*cots))]
        numpy_calls = len(host_route)
        leaves = [torch.as_tensor(x).requires_grad_(True) for x in args[:2]]
        t_out = fn(*leaves, *map(torch.as_tensor, args[2:]), eps_mean=bounds[0],
                   eps_cov=bounds[1])  # fmt: skip
        loss = sum((o * torch.as_tensor(c)).sum() for o, c in zip(t_out, cots, strict=True))
        loss.backward()
        torch_calls = len(host_route) - numpy_calls
        res = numpy_res + [x.detach().numpy() for x in t_out] + [x.grad.numpy() for x in leaves]
        return res, numpy_calls, torch_calls

    got, numpy_calls, torch_calls = run()
    assert numpy_calls > 0 and torch_calls > 0  # (each library's projection took the kernels)
    assert ("sym_eigh" in host_route) == (method != "frobenius")  # (KL and W2 decompose)
    monkeypatch.setattr(fused, "FUSED_CPU", "off")
    host_route.clear()
    want, _, _ = run()
    assert host_route == []
    for g, w in zip(got, want, strict=True):
        _close(np.asarray(g), np.asarray(w), "float64", max(1.0, float(np.max(np.abs(w)))))


# ------------------------------------------------------------------------------------ GPU

GPU = [n for n in available_backends() if n in ("torch_cuda", "cupy")]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("d", [2, 6, 16, 17])
@pytest.mark.parametrize("name", GPU)
def test_gpu_kernels_match_numpy(name, dtype, d, monkeypatch):
    """On the GPU: ``cholesky_of_gram`` and ``solve_triangular`` (both triangles, one and
    several right-hand sides, transposed input) run the kernels for d <= MAX_D (counted), the
    library routes above, and both equal NumPy's float64 results; with ``FUSED`` off the
    kernels do not run."""
    backend = get_backend(name)
    xp = backend.xp
    rng = np.random.default_rng(d)
    n = 20_000
    m = _matrices(rng, n, d, dtype)
    a = _triangular(rng, n, d, dtype)
    b = rng.standard_normal((n, d, 3)).astype(dtype)
    calls = []
    for fn in ("gram_cholesky", "solve_triangular"):
        real = getattr(sk, fn)
        monkeypatch.setattr(sk, fn, lambda *x, _r=real, **kw: calls.append(1) or _r(*x, **kw))

    def run():
        M, A, B = (backend.asarray(x) for x in (m, a, b))
        At = xp.permute_dims(A, (0, 2, 1))
        outs = [
            cholesky_of_gram(M, xp=xp),
            _compat.solve_triangular(A, B, lower=True, xp=xp),
            _compat.solve_triangular(At, B, lower=False, xp=xp),
            _compat.solve_triangular(A, B[..., :1], lower=True, xp=xp),
        ]
        return [backend.to_numpy(o).astype(np.float64) for o in outs]

    m64, a64, b64 = (x.astype(np.float64) for x in (m, a, b))
    want = [
        cholesky_of_gram(m64, xp=_compat.array_namespace(m64)),
        np.linalg.solve(a64, b64),
        np.linalg.solve(np.swapaxes(a64, -1, -2), b64),
        np.linalg.solve(a64, b64[..., :1]),
    ]
    for fused_setting, kernels in (("auto", d <= sk.MAX_D), ("off", False)):
        monkeypatch.setattr(fused, "FUSED", fused_setting)
        calls.clear()
        got = run()
        assert len(calls) == (4 if kernels else 0)
        for g, w in zip(got, want, strict=True):
            assert np.all(np.isfinite(g))
            _close(g, w, dtype, np.max(np.abs(w)))
