r"""Batched kernels for small matrices, one thread per matrix (or per right-hand side): on the
GPU compiled by CuPy's NVRTC at first use and cached per device, dtype and size; on the CPU, as
an option (``TRP_FUSED_CPU=on``), built by the system's C++ compiler.

CuPy has no batched QR of its own (``cupy.linalg.qr`` calls cuSOLVER once per matrix), and a
batch of small triangular systems went through cuBLAS's batched LU (``getrf``/``getrs``), both
several library calls or several whole-batch passes per step. Here:

- :func:`gram_cholesky` is the Cholesky factor :math:`L` of :math:`M^\top M` from Householder
  reflections of :math:`M` (as :func:`tr_projections._compat.householder_r`, then the rows of
  :math:`R` signed and transposed): one thread holds one matrix;
- :func:`solve_triangular` is forward or back substitution, one thread per right-hand side.

Both read their inputs through strides (a transposed view costs no copy) and write new,
contiguous arrays. They run for CuPy arrays and plain torch CUDA tensors
(:func:`tr_projections._compat._torch_plain`, no torch mode but a default device; on torch's
current stream) of float32 or float64 with ``d <= MAX_D``, where CuPy sees the GPU; the
callers (:func:`tr_projections.gaussian.cholesky_of_gram`,
:func:`tr_projections._compat.solve_triangular`) take their own routes otherwise, and where
``TRP_FUSED=off`` (:data:`tr_projections.projections._kl_diag_fused.FUSED`). The same source
compiles as plain C++ (without ``TRP_CUDA``), a loop over the matrices: with
``TRP_FUSED_CPU=on`` (:data:`tr_projections.projections._kl_diag_fused.FUSED_CPU`), NumPy
arrays and plain torch CPU tensors take that build (compiled and cached by
:func:`tr_projections.projections._kl_diag_fused.build_host`), and
``tests/test_small_kernels.py`` checks it against NumPy.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from . import _compat

Array = Any

#: The largest matrix size the kernels take (a thread holds a ``d x d`` matrix).
MAX_D = 16

#: Threads per block.
BLOCK = 128

SOURCE = r"""
// tr_projections: kernels for batches of small matrices. REAL and TRP_D (the matrix size) are
// defined by the compile options.
#ifdef TRP_CUDA
#define TRP_DEV __device__ __forceinline__
#define TRP_KERNEL extern "C" __global__
#define TRP_ROWS(n) \
    long long row = blockIdx.x * (long long)blockDim.x + threadIdx.x; \
    if (row < n)
#else
#include <cmath>
using std::fabs; using std::fmax; using std::sqrt;
#define TRP_DEV static inline
#define TRP_KERNEL extern "C"
#define TRP_ROWS(n) for (long long row = 0; row < n; ++row)
#endif

typedef REAL real;
typedef unsigned long long ptr_t;
#define D TRP_D
#define R(x) ((real)(x))

// The Euclidean norm of v[k:D], a column already scaled by its largest entry (no overflow;
// what underflows is negligible next to that entry).
TRP_DEV real norm(const real* v, int k) {
    real ss = R(0);
    for (int i = k; i < D; ++i) ss += v[i] * v[i];
    return sqrt(ss);
}

// L (row-major, contiguous) of M^T M for matrix `row` of M (strides in entries): the R of
// M = QR by Householder reflections, each column's onto alpha e1 with alpha = -sign(x0) |x|,
// then L = R^T with the rows of R signed so that the diagonal is non-negative.
TRP_DEV void gram_cholesky_row(long long row, const real* M, long long sb, long long sr,
                               long long sc, real* out) {
    real A[D][D];
    real v[D];
    const real* m = M + row * sb;
    for (int i = 0; i < D; ++i)
        for (int j = 0; j < D; ++j) A[i][j] = m[i * sr + j * sc];
    for (int k = 0; k + 1 < D; ++k) {  // (the last 1x1 block: nothing to reflect)
        // The column scaled by its largest entry (x0 - alpha cannot overflow), its norm and
        // the unit reflector v.
        real big = R(0);
        for (int i = k; i < D; ++i) big = fmax(big, fabs(A[i][k]));
        real safe = big > R(0) ? big : R(1);
        for (int i = k; i < D; ++i) v[i] = A[i][k] / safe;
        real n = norm(v, k);
        real y0 = v[k];
        real alpha = y0 < R(0) ? n : R(0) - n;  // (R(0) - n: +0 for a zero column)
        v[k] = y0 - alpha;
        real vn = norm(v, k);
        for (int i = k; i < D; ++i) v[i] = vn > R(0) ? v[i] / vn : R(0);
        alpha = big * alpha;
        for (int j = k + 1; j < D; ++j) {
            real w = R(0);
            for (int i = k; i < D; ++i) w += v[i] * A[i][j];
            for (int i = k; i < D; ++i) A[i][j] -= R(2) * v[i] * w;
        }
        A[k][k] = alpha;
    }
    real* o = out + row * (long long)(D * D);
    for (int i = 0; i < D; ++i)
        for (int j = 0; j < D; ++j)
            o[i * D + j] = j <= i ? (A[j][j] < R(0) ? -A[j][i] : A[j][i]) : R(0);
}

TRP_KERNEL void gram_cholesky(long long n, ptr_t m_p, long long sb, long long sr,
                              long long sc, ptr_t out_p) {
    TRP_ROWS(n) gram_cholesky_row(row, (const real*)m_p, sb, sr, sc, (real*)out_p);
}

// X = A^-1 B for right-hand side `row` = (matrix b, column c) of n = batch * k: forward
// (LOWER) or back substitution, the products summed in LAPACK's trsm order.
template <bool LOWER>
TRP_DEV void trsm_row(long long row, int k, const real* A, long long ab,
                      long long ar, long long ac, const real* B, long long bb, long long br,
                      long long bc, real* out) {
    long long b = row / k;
    int c = (int)(row - b * k);
    const real* a = A + b * ab;
    const real* y = B + b * bb + c * bc;
    real x[D];
    for (int s = 0; s < D; ++s) {
        int i = LOWER ? s : D - 1 - s;
        real acc = y[i * br];
        for (int t = 0; t < s; ++t) {
            int j = LOWER ? t : D - 1 - t;
            acc -= a[i * ar + j * ac] * x[j];
        }
        x[i] = acc / a[i * ar + i * ac];
    }
    real* o = out + b * (long long)(D * k) + c;
    for (int i = 0; i < D; ++i) o[i * k] = x[i];
}

TRP_KERNEL void trsm(long long n, int k, int lower, ptr_t a_p, long long ab, long long ar,
                     long long ac, ptr_t b_p, long long bb, long long br, long long bc,
                     ptr_t out_p) {
    const real* a = (const real*)a_p;
    const real* b = (const real*)b_p;
    real* out = (real*)out_p;
    TRP_ROWS(n) {
        if (lower) trsm_row<true>(row, k, a, ab, ar, ac, b, bb, br, bc, out);
        else trsm_row<false>(row, k, a, ab, ar, ac, b, bb, br, bc, out);
    }
}
"""

_modules: dict[tuple[int, str, int], Any] = {}
_failed: dict[tuple[str, int], str] = {}  # (dtype name, d) -> why its kernels failed to build
_host: dict[tuple[str, int], Any] = {}  # (dtype name, d) -> the host build (ctypes)
_host_failed: dict[tuple[str, int], str] = {}


def defines(dtype_name: str, d: int) -> dict[str, str]:
    """The compile-time constants for dtype ``dtype_name`` and matrix size ``d``."""
    return {"REAL": "double" if dtype_name == "float64" else "float", "TRP_D": str(d)}


def applies(*arrays: Array, xp: Any) -> bool:
    """Whether the kernels may take ``arrays`` (``(..., d, d)`` or ``(..., d, k)``, ``d`` the
    size of the second-to-last axis of the first, one batch shape): float32 or float64 with
    ``1 <= d <= MAX_D``, the fused kernels not turned off, and either CuPy arrays or plain
    torch CUDA tensors where CuPy sees the GPU, or (the host build, with
    ``TRP_FUSED_CPU=on``) NumPy arrays or plain torch CPU tensors. Plain torch tensors: no
    ``torch.func`` transform, no ``torch.compile`` or ``torch.jit.trace`` tracing, no mode but
    a default device. The cheap tests come first: every triangular solve asks."""
    from .projections import _kl_diag_fused as fused  # (projections import this module)

    a = arrays[0]
    if a.ndim < 3:
        return False
    host = fused.on_host(a, xp)
    if host:
        if fused.FUSED_CPU != "on":
            return False
    elif not (_compat.is_cupy(xp) or (_compat.is_torch(xp) and a.device.type == "cuda")):
        return False
    fused._check_settings()
    d = a.shape[-2]
    if fused.FUSED == "off" or not 1 <= d <= MAX_D or a.shape[-1] != d:
        return False
    batch = tuple(a.shape[:-2])
    if any(x.ndim != a.ndim or x.shape[-2] != d or tuple(x.shape[:-2]) != batch for x in arrays):
        return False  # (square matrices, right-hand sides of d rows, one batch: what is read)
    name = fused._dtype_name(a)
    if name not in ("float32", "float64") or (name, d) in (_host_failed if host else _failed):
        return False
    if any(fused._dtype_name(x) != name for x in arrays):
        return False
    if _compat.is_torch(xp):
        if any(x.device != a.device for x in arrays) or not fused._torch_takes(*arrays):
            return False
        return host or _compat._cupy_sees_gpu()
    if _compat.is_numpy(xp):
        return all(isinstance(x, np.ndarray) for x in arrays)
    if any(x.device.id != a.device.id for x in arrays):
        return False
    return _compat._cupy_sees_gpu()


def _warn_failed(what: str, dtype_name: str, d: int) -> Any:
    """The one warning of a build that failed (``what``: "host build" or "CUDA")."""

    def warn(reason: str) -> None:
        warnings.warn(
            f"tr_projections: the small-matrix kernels ({what}, {dtype_name}, d = {d}) could "
            f"not be built ({reason}); the library routines are used instead",
            RuntimeWarning,
            stacklevel=8,
        )

    return warn


def _host_library(dtype_name: str, d: int) -> Any | None:
    """The host build for ``(dtype_name, d)``, built or loaded once (the fused KL kernels'
    cache: :func:`tr_projections.projections._kl_diag_fused.build_host_once`); ``None``,
    warned once, where it cannot be built."""
    from .projections import _kl_diag_fused as fused

    defs = [f"-D{k}={v}" for k, v in defines(dtype_name, d).items()]
    return fused.build_host_once(
        (dtype_name, d), f"small_{dtype_name}_{d}", SOURCE, defs, _host, _host_failed,
        _warn_failed("host build", dtype_name, d),
    )  # fmt: skip


def _kernels(dtype_name: str, d: int, device_id: int) -> dict | None:
    """The compiled kernels for ``(dtype_name, d)`` on device ``device_id`` (the fused KL
    kernels' :func:`~tr_projections.projections._kl_diag_fused.build_cuda_once`; ``None``,
    warned once, where they cannot be built)."""
    from .projections import _kl_diag_fused as fused

    options = ("-DTRP_CUDA",) + tuple(f"-D{k}={v}" for k, v in defines(dtype_name, d).items())
    return fused.build_cuda_once(
        (device_id, dtype_name, d), (dtype_name, d), device_id, SOURCE, options,
        ("gram_cholesky", "trsm"), _modules, _failed, _warn_failed("CUDA", dtype_name, d),
    )  # fmt: skip


def _as_batch(x: Array, n: int, xp: Any) -> tuple[Array, tuple[int, int, int]]:
    """``x`` as ``(n, r, c)`` (a view where the batch axes merge, else a copy) and its strides
    in entries; a lazily negated torch view is resolved first (the kernels read memory)."""
    r, c = x.shape[-2], x.shape[-1]
    if _compat.is_torch(xp):
        x = x.resolve_neg().reshape(n, r, c)
        return x, tuple(x.stride())
    x = x.reshape(n, r, c)
    if not x.flags.aligned or any(s % x.itemsize for s in x.strides):
        # (a field of a structured array, a misaligned buffer: strides that are not whole
        # entries; the kernels read whole, aligned entries)
        x = (np if isinstance(x, np.ndarray) else __import__("cupy")).ascontiguousarray(x)
    return x, tuple(s // x.itemsize for s in x.strides)


def _launch(name: str, x: Array, n_threads: int, args: tuple, xp: Any) -> bool:
    """Run kernel ``name`` over ``n_threads`` threads on ``x``'s device or in the host build
    (the fused KL kernels' :func:`~tr_projections.projections._kl_diag_fused.run_kernel`)."""
    from .projections import _kl_diag_fused as fused

    name_d, d = fused._dtype_name(x), x.shape[-2]
    return fused.run_kernel(
        name, x, xp, n_threads, args, lambda: _host_library(name_d, d),
        lambda device_id: _kernels(name_d, d, device_id), BLOCK,
    )  # fmt: skip


def gram_cholesky(m: Array, *, xp: Any) -> Array | None:
    """The Cholesky factor of :math:`M^\\top M` for a batch ``m`` of square matrices (where
    :func:`applies`), or ``None`` where the kernels cannot be built."""
    from .projections._kl_diag_fused import pointer

    batch, d = tuple(m.shape[:-2]), m.shape[-1]
    n = math.prod(batch)
    with _compat.on_device(m, xp):
        if n == 0:
            return xp.zeros(m.shape, dtype=m.dtype, device=_compat.device(m))
        x, (sb, sr, sc) = _as_batch(m, n, xp)
        out = xp.empty((n, d, d), dtype=m.dtype, device=_compat.device(m))
        args = (pointer(x), np.int64(sb), np.int64(sr), np.int64(sc), pointer(out))
        if not _launch("gram_cholesky", x, n, args, xp):
            return None
        return xp.reshape(out, m.shape)


def solve_triangular(a: Array, b: Array, *, lower: bool, xp: Any) -> Array | None:
    """``A^-1 B`` for batches ``a`` (``(..., d, d)``, triangular) and ``b`` (``(..., d, k)``,
    the same batch) where :func:`applies`, or ``None`` where the kernels cannot be built."""
    from .projections._kl_diag_fused import pointer

    batch, d, k = tuple(a.shape[:-2]), a.shape[-1], b.shape[-1]
    n = math.prod(batch)
    with _compat.on_device(a, xp):
        if n == 0 or k == 0:
            return xp.zeros(b.shape, dtype=b.dtype, device=_compat.device(b))
        A, (ab, ar, ac) = _as_batch(a, n, xp)
        B, (bb, br, bc) = _as_batch(b, n, xp)
        out = xp.empty((n, d, k), dtype=b.dtype, device=_compat.device(b))
        args = (
            np.int32(k), np.int32(1 if lower else 0),
            pointer(A), np.int64(ab), np.int64(ar), np.int64(ac),
            pointer(B), np.int64(bb), np.int64(br), np.int64(bc), pointer(out),
        )  # fmt: skip
        if not _launch("trsm", A, n * k, args, xp):
            return None
        return xp.reshape(out, b.shape)


__all__ = [
    "MAX_D",
    "SOURCE",
    "applies",
    "defines",
    "gram_cholesky",
    "solve_triangular",
]
