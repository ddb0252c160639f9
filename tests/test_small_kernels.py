"""The small-matrix kernels (``tr_projections._small_kernels``): the Cholesky factor of a Gram
matrix by Householder reflections, and batched triangular solves, one thread per matrix.

On the CPU their source is built as plain C++ (a loop over the matrices) with the compiler of
the fused KL kernels' host build and called through ``ctypes`` on NumPy arrays; the results are
compared with NumPy's and with the package's own routes. On a GPU
(``TRP_BACKENDS=torch_cuda,cupy``) the CUDA build runs inside ``cholesky_of_gram`` and
``solve_triangular`` and is compared with the library routes (``TRP_FUSED=off``).
"""

from __future__ import annotations

import ctypes
import subprocess

import numpy as np
import pytest

from tr_projections import _compat
from tr_projections import _small_kernels as sk
from tr_projections.gaussian import cholesky_of_gram
from tr_projections.projections import _kl_diag_fused as fused
from tr_projections.testing import available_backends, get_backend

# Relative tolerance by dtype: both routes are backward stable, so they agree to a small
# multiple of eps times the condition number (the test matrices' is below 1e3).
RTOL = {"float64": 1e-11, "float32": 2e-3}


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """``build(dtype_name, d)``: the kernels' host build for that dtype and size, as a
    ``ctypes`` library (built once per pair)."""
    cxx = fused.compiler()
    if cxx is None:
        pytest.skip("no C++ compiler to build the kernels' host form")
    folder = tmp_path_factory.mktemp("small_kernels")
    (folder / "small.cpp").write_text(sk.SOURCE)
    built = {}

    def build(dtype_name, d):
        if (dtype_name, d) not in built:
            out = folder / f"small_{dtype_name}_{d}.so"
            defs = [f"-D{k}={v}" for k, v in sk.defines(dtype_name, d).items()]
            cmd = [*cxx, *fused.HOST_FLAGS, *defs, "-o", str(out), str(folder / "small.cpp")]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr
            built[(dtype_name, d)] = ctypes.CDLL(str(out))
        return built[(dtype_name, d)]

    return build


def _strides(x):
    return [ctypes.c_longlong(s // x.itemsize) for s in x.strides]


def _ptr(x):
    return ctypes.c_ulonglong(x.ctypes.data)


def host_gram_cholesky(build, m):
    n, d, _ = m.shape
    out = np.empty((n, d, d), dtype=m.dtype)
    build(m.dtype.name, d).gram_cholesky(ctypes.c_longlong(n), _ptr(m), *_strides(m), _ptr(out))
    return out


def host_trsm(build, a, b, lower):
    n, d, k = b.shape
    out = np.empty((n, d, k), dtype=b.dtype)
    build(a.dtype.name, d).trsm(
        ctypes.c_longlong(n * k), ctypes.c_int(k), ctypes.c_int(int(lower)),
        _ptr(a), *_strides(a), _ptr(b), *_strides(b), _ptr(out),
    )  # fmt: skip
    return out


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
def test_host_gram_cholesky(host, dtype, d):
    """L L^T = M^T M, L lower triangular with a non-negative diagonal, equal to the package's
    QR route (NumPy), for contiguous and transposed input."""
    rng = np.random.default_rng(d)
    m = _matrices(rng, 300, d, dtype)
    for x in (m, np.swapaxes(m, -1, -2)):
        L = host_gram_cholesky(host, x)
        x64 = x.astype(np.float64)
        scale = np.max(np.abs(x64)) ** 2
        assert np.all(np.triu(L, 1) == 0) and np.all(np.diagonal(L, 0, -2, -1) >= 0)
        _close(L @ np.swapaxes(L, -1, -2), np.swapaxes(x64, -1, -2) @ x64, dtype, scale)
        want = cholesky_of_gram(x64, xp=_compat.array_namespace(x64))
        _close(L, want, dtype, np.sqrt(scale))


def test_host_gram_cholesky_degenerate_columns(host):
    """A zero column (nothing to reflect: no NaN) and a column already along e1 give the
    factor of the Gram matrix all the same."""
    d = 4
    m = np.random.default_rng(0).standard_normal((3, d, d))
    m[0, :, 1] = 0.0  # a zero column
    m[1, 1:, 0] = 0.0  # the first column along e1, positive lead
    m[2, 1:, 0] = 0.0
    m[2, 0, 0] = -2.0  # negative lead
    L = host_gram_cholesky(host, m)
    assert np.all(np.isfinite(L))
    _close(L @ np.swapaxes(L, -1, -2), np.swapaxes(m, -1, -2) @ m, "float64", 10.0)
    assert L[0, 1, 1] == 0.0


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("lower", [True, False])
@pytest.mark.parametrize("d, k", [(1, 1), (6, 1), (6, 6), (16, 3)])
def test_host_trsm(host, dtype, lower, d, k):
    """A X = B for lower and upper triangular A, contiguous and transposed A and B, equal to
    NumPy's solve."""
    rng = np.random.default_rng(10 * d + k)
    n = 200
    a = _triangular(rng, n, d, dtype, lower)
    b = rng.standard_normal((n, d, k)).astype(dtype)
    want = np.linalg.solve(a.astype(np.float64), b.astype(np.float64))
    for aa in (a, np.swapaxes(np.swapaxes(a, -1, -2).copy(), -1, -2)):
        for bb in (b, np.swapaxes(np.swapaxes(b, -1, -2).copy(), -1, -2)):
            _close(host_trsm(host, aa, bb, lower), want, dtype, np.max(np.abs(want)))


def test_applies_only_where_it_should(monkeypatch):
    """The kernels never take NumPy arrays, unbatched or too large matrices, or other dtypes,
    nor anything with ``TRP_FUSED=off``; a bad setting is an error naming it."""
    x = np.ones((4, 6, 6))
    assert not sk.applies(x, xp=_compat.array_namespace(x))
    monkeypatch.setattr(fused, "FUSED", "sometimes")
    with pytest.raises(ValueError, match="FUSED"):
        sk.applies(x, xp=_compat.array_namespace(x))


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
