r"""Batched kernels for small matrices, one thread per matrix (or per right-hand side): on the
GPU compiled by CuPy's NVRTC at first use and cached per device, dtype and size; on the CPU, as
an option (``TRP_FUSED_CPU=on``), built by the system's C++ compiler.

CuPy has no batched QR of its own (``cupy.linalg.qr`` calls cuSOLVER once per matrix), and a
batch of small triangular systems went through cuBLAS's batched LU (``getrf``/``getrs``), both
several library calls or several whole-batch passes per step. Here:

- :func:`gram_cholesky` is the Cholesky factor :math:`L` of :math:`M^\top M` from Householder
  reflections of :math:`M` (as :func:`tr_projections._compat.householder_r`, then the rows of
  :math:`R` signed and transposed): one thread holds one matrix;
- :func:`solve_triangular` is forward or back substitution, one thread per right-hand side;
- :func:`eigh` (the host build only, for now) is the eigendecomposition of symmetric matrices
  by the cyclic Jacobi method, eight float64 (sixteen float32) matrices at a time in vector
  lanes: LAPACK's ``syevd`` through NumPy took about 3 us per 6x6 float64 matrix on this
  project's 2-core machines, the kernel about 1.2 us on one thread
  (``benchmarks/results/cpu-2core-r16-eigh-2026-11-27``).

They read their inputs through strides (a transposed view costs no copy) and write new,
contiguous arrays. The first two run for CuPy arrays and plain torch CUDA tensors
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
import os
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

EIGH_SOURCE = r"""
// tr_projections: eigendecompositions of small symmetric matrices (the host build only), by the
// cyclic Jacobi method on W matrices at a time: their entries innermost, so that every step is
// the same arithmetic on W lanes and the compiler turns it into vector instructions. REAL and
// TRP_D (the matrix size) are defined by the compile options.
//
// Each matrix is read from its lower triangle and scaled by the power of two that brings its
// largest entry into [1/2, 1) (exact: no overflow, and underflow only of squares far below the
// tolerance), rotated until the sum of squares of its off-diagonal entries is at most eps^2
// times that of all its entries (every eigenvalue is then within a few eps of the largest
// one's magnitude), and its eigenvalues are scaled back and sorted ascending with the
// eigenvectors as columns, as LAPACK's syevd returns them. A matrix with an entry that is not
// finite, or one that has not converged after SWEEPS sweeps (a cap, not a measured need),
// comes out as NaN: the caller redoes those with the library's routine.
#include <cmath>
#include <limits>
using std::fabs; using std::sqrt;  // (the float overloads for float32)
typedef REAL real;
#define D TRP_D
#define R(x) ((real)(x))
#define W (64 / (int)sizeof(real))  // lanes: one 512-bit vector of entries
#define SWEEPS 40
typedef unsigned long long ptr_t;

// gcc vectorises these loops from -O3, and builds a copy for AVX-512 and AVX2 chosen at load
// time (an ifunc: glibc on x86-64 only).
#if defined(__GNUC__) && !defined(__clang__) && !defined(__INTEL_COMPILER)
#define TRP_O3 __attribute__((optimize("O3")))
#if defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__) && __GNUC__ >= 8
#define TRP_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#endif
#ifndef TRP_O3
#define TRP_O3
#endif
#ifndef TRP_CLONES
#define TRP_CLONES
#endif

TRP_CLONES TRP_O3 static void eigh_group(int lanes, const real* a, long long sb, long long sr,
                                         long long sc, real* w, real* v) {
    real A[D][D][W], V[D][D][W], fro[W], good[W];
    int expo[W];
    const real big_max = std::numeric_limits<real>::max();
    for (int l = 0; l < W; ++l) {
        const real* m = a + (l < lanes ? l : 0) * sb;  // (spare lanes repeat the first matrix)
        real big = R(0);
        bool finite = true;
        for (int i = 0; i < D; ++i)
            for (int j = 0; j <= i; ++j) {
                real x = fabs(m[i * sr + j * sc]);
                finite = finite && x <= big_max;  // (false for NaN and inf)
                big = x > big ? x : big;
            }
        int e = 0;
        if (finite && big > R(0)) std::frexp(big, &e);
        expo[l] = e;
        good[l] = finite ? R(1) : R(0);
        for (int i = 0; i < D; ++i)
            for (int j = 0; j <= i; ++j) {
                real x = finite ? std::ldexp(m[i * sr + j * sc], -e) : R(0);
                A[i][j][l] = x;
                A[j][i][l] = x;
            }
    }
    for (int i = 0; i < D; ++i)
        for (int j = 0; j < D; ++j)
            for (int l = 0; l < W; ++l) V[i][j][l] = i == j ? R(1) : R(0);
    for (int l = 0; l < W; ++l) fro[l] = R(0);
    for (int i = 0; i < D; ++i)
        for (int j = 0; j < D; ++j)
            for (int l = 0; l < W; ++l) fro[l] += A[i][j][l] * A[i][j][l];
    const real tol = std::numeric_limits<real>::epsilon() * std::numeric_limits<real>::epsilon();
    // Lanes that have converged are rotated by t = 0 (c = 1, s = 0: their finite entries keep
    // their values, a zero may change sign), so that every matrix gets the rotations it would
    // get alone: with zeros written as +0, the results do not depend on the other matrices of
    // the batch, bit for bit. (1 and 0 as reals: the loops below stay vectorised.)
    real rotate[W];
    for (int sweep = 0; sweep <= SWEEPS; ++sweep) {
        real off[W];
        for (int l = 0; l < W; ++l) off[l] = R(0);
        for (int p = 0; p < D; ++p)
            for (int q = p + 1; q < D; ++q)
                for (int l = 0; l < W; ++l) off[l] += A[p][q][l] * A[p][q][l];
        bool done = true;
        for (int l = 0; l < W; ++l) {
            rotate[l] = off[l] > tol * fro[l] ? R(1) : R(0);
            done = done && rotate[l] == R(0);
        }
        if (done || sweep == SWEEPS) break;
        for (int p = 0; p + 1 < D; ++p)
            for (int q = p + 1; q < D; ++q) {
                // The rotation that zeroes A[p][q]: t = tan(angle), the smaller root of
                // t^2 + 2 theta t - 1 = 0 (none where A[p][q] is already zero).
                real c[W], s[W];
                for (int l = 0; l < W; ++l) {
                    real apq = A[p][q][l];
                    real theta = (A[q][q][l] - A[p][p][l]) / (R(2) * (apq != R(0) ? apq : R(1)));
                    real t = (theta >= R(0) ? R(1) : R(-1)) /
                             (fabs(theta) + sqrt(theta * theta + R(1)));
                    t = (rotate[l] != R(0)) & (apq != R(0)) ? t : R(0);
                    c[l] = R(1) / sqrt(t * t + R(1));
                    s[l] = t * c[l];
                }
                for (int k = 0; k < D; ++k)
                    for (int l = 0; l < W; ++l) {
                        real x = A[k][p][l], y = A[k][q][l];
                        A[k][p][l] = c[l] * x - s[l] * y;
                        A[k][q][l] = s[l] * x + c[l] * y;
                    }
                for (int k = 0; k < D; ++k)
                    for (int l = 0; l < W; ++l) {
                        real x = A[p][k][l], y = A[q][k][l];
                        A[p][k][l] = c[l] * x - s[l] * y;
                        A[q][k][l] = s[l] * x + c[l] * y;
                    }
                for (int k = 0; k < D; ++k)
                    for (int l = 0; l < W; ++l) {
                        real x = V[k][p][l], y = V[k][q][l];
                        V[k][p][l] = c[l] * x - s[l] * y;
                        V[k][q][l] = s[l] * x + c[l] * y;
                    }
            }
    }
    const real nan = std::numeric_limits<real>::quiet_NaN();
    for (int l = 0; l < lanes; ++l) {
        bool ok = good[l] != R(0) && rotate[l] == R(0);  // (finite, and converged)
        int order[D];  // ascending eigenvalues (insertion sort: D is small)
        for (int i = 0; i < D; ++i) {
            int j = i;
            for (; j > 0 && A[order[j - 1]][order[j - 1]][l] > A[i][i][l]; --j)
                order[j] = order[j - 1];
            order[j] = i;
        }
        for (int i = 0; i < D; ++i) {
            // (+ 0: a zero comes out as +0, whatever rotations by t = 0 made of its sign)
            w[l * D + i] = ok ? std::ldexp(A[order[i]][order[i]][l], expo[l]) + R(0) : nan;
            for (int k = 0; k < D; ++k)
                v[(l * D + k) * D + i] = ok ? V[k][order[i]][l] + R(0) : nan;
        }
    }
}

// Eigenvalues w (n, D) and eigenvectors v (n, D, D), as columns, of the symmetric matrices a
// (strides in entries; the lower triangle is read).
extern "C" void sym_eigh(long long n, ptr_t a_p, long long sb, long long sr, long long sc,
                         ptr_t w_p, ptr_t v_p) {
    const real* a = (const real*)a_p;
    real* w = (real*)w_p;
    real* v = (real*)v_p;
    for (long long r = 0; r < n; r += W) {
        int lanes = n - r < W ? (int)(n - r) : W;
        eigh_group(lanes, a + r * sb, sb, sr, sc, w + r * D, v + r * D * D);
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
    host = _compat.on_host(a, xp)
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


def _warn_failed(what: str, dtype_name: str, d: int, stacklevel: int = 8) -> Any:
    """The one warning of a build that failed (``what``: "host build" or "CUDA"), pointing at
    the package's function that asked for it (``stacklevel`` frames up from the warning)."""

    def warn(reason: str) -> None:
        warnings.warn(
            f"tr_projections: the small-matrix kernels ({what}, {dtype_name}, d = {d}) could "
            f"not be built ({reason}); the library routines are used instead",
            RuntimeWarning,
            stacklevel=stacklevel,
        )

    return warn


def _host_library(dtype_name: str, d: int, *, eigh: bool = False) -> Any | None:
    """The host build for ``(dtype_name, d)`` of :data:`SOURCE`, or with ``eigh`` of
    :data:`EIGH_SOURCE` (a library of its own: a compiler that cannot build it keeps the other
    kernels), built or loaded once (the fused KL kernels' cache:
    :func:`tr_projections.projections._kl_diag_fused.build_host_once`); ``None``, warned once,
    where it cannot be built."""
    from .projections import _kl_diag_fused as fused

    defs = [f"-D{k}={v}" for k, v in defines(dtype_name, d).items()]
    if eigh:  # (its warning points at _compat.eigh, which builds it through eigh_applies)
        key, tag, source = ("eigh", dtype_name, d), f"eigh_{dtype_name}_{d}", EIGH_SOURCE
        warn = _warn_failed("host build of the eigh kernel", dtype_name, d, 5)
    else:
        key, tag, source = (dtype_name, d), f"small_{dtype_name}_{d}", SOURCE
        warn = _warn_failed("host build", dtype_name, d)
    return fused.build_host_once(key, tag, source, defs, _host, _host_failed, warn)


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
    eigh = name == "sym_eigh"  # (its own library; the host build only)
    return fused.run_kernel(
        name, x, xp, n_threads, args, lambda: _host_library(name_d, d, eigh=eigh),
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


#: Whether batched ``eigh`` of NumPy arrays and torch CPU tensors takes the host build's
#: Jacobi kernel (``sym_eigh``) where the host build is on (``TRP_FUSED_CPU=on``): ``"on"``
#: (default) or ``"off"`` (LAPACK's ``syevd`` through the library); environment variable
#: ``TRP_FUSED_EIGH``. 2.8x faster than the package's LAPACK routes for 100,000 6x6 float64
#: matrices on this project's 2-core machines, 1.7x for 12x12 (``benchmarks/eigh.py --device
#: cpu``).
EIGH = os.environ.get("TRP_FUSED_EIGH", "on").strip().lower()
_EIGH_VALUES = ("on", "off")

#: The largest matrices :func:`eigh_applies` gives the kernel (it is built for any d up to
#: :data:`MAX_D`). 16x16 float64 at 100,000 matrices on 2 threads, the package's calls: the
#: kernel 1,033 ms, torch's LAPACK route 924, NumPy's 1,369 (12x12: 364, 613 and 834;
#: ``benchmarks/results/cpu-2core-r16-eigh-2026-11-27``).
EIGH_MAX_D = 12

#: The kernel's batches of d x d matrices are split over the CPU threads
#: (:func:`tr_projections._compat.split_threads`), each part in a thread of its own, from
#: this many times 1/d^3 matrices (its work grows as d^3): 1,024 6x6 ones. Split on 2 threads
#: against one call (``benchmarks/results/cpu-2core-r16-eigh-2026-11-27``, "kernel, split"
#: and "kernel, 1 thread"): 6x6 float64 0.45x at 256 matrices, 1.00x at 1,000, 1.57x at
#: 10,000; 2x2 0.62x at 10,000, 1.37x at 100,000.
EIGH_PARALLEL_MIN_WORK = 1024 * 6**3


def eigh_parallel_from(d: int) -> int:
    """The least batch of d x d matrices that :data:`EIGH_PARALLEL_MIN_WORK` splits."""
    return max(2, -(-EIGH_PARALLEL_MIN_WORK // max(1, d) ** 3))


def eigh_applies(a: Array, *, xp: Any) -> bool:
    """Whether :func:`eigh` takes the batch ``a`` (``(..., d, d)``): where :func:`applies` in
    the host build (NumPy arrays and plain torch CPU tensors with ``TRP_FUSED_CPU=on``) with
    d <= :data:`EIGH_MAX_D`, with :data:`EIGH` on and the host build built (it is built here
    at first use)."""
    from .projections import _kl_diag_fused as fused

    if a.ndim < 3 or a.shape[-1] > EIGH_MAX_D or not _compat.on_host(a, xp):
        return False  # (the cheap tests first: every eigh asks)
    if not applies(a, xp=xp):
        return False
    if EIGH not in _EIGH_VALUES:
        raise ValueError(
            f"tr_projections._small_kernels.EIGH (or TRP_FUSED_EIGH) must be one of "
            f"{_EIGH_VALUES}, got {EIGH!r}"
        )
    return EIGH == "on" and _host_library(fused._dtype_name(a), a.shape[-1], eigh=True) is not None


def eigh(a: Array, *, xp: Any) -> tuple[Array, Array] | None:
    """``(eigenvalues, eigenvectors)`` of the symmetric batch ``a`` (its lower triangle read)
    where :func:`eigh_applies`, as ``linalg.eigh`` returns them (ascending eigenvalues, the
    eigenvectors as columns), by the host build's Jacobi kernel; ``None`` where the kernels
    cannot be built or ``a`` is not a host array. The matrices the kernel gives back as NaN
    (an entry that is not finite, or no convergence) are redone by ``xp.linalg.eigh``: what
    the library gives for them (its results, or its error for the whole batch)."""
    from .projections import _kl_diag_fused as fused

    if not _compat.on_host(a, xp):
        return None  # (the host build only: there is no CUDA build of this kernel)
    batch, d = tuple(a.shape[:-2]), a.shape[-1]
    n = math.prod(batch)
    dev = _compat.device(a)
    if n == 0:
        return (
            xp.zeros(batch + (d,), dtype=a.dtype, device=dev),
            xp.zeros(a.shape, dtype=a.dtype, device=dev),
        )
    x, (sb, sr, sc) = _as_batch(a, n, xp)
    w = xp.empty((n, d), dtype=a.dtype, device=dev)
    v = xp.empty((n, d, d), dtype=a.dtype, device=dev)
    ptr = fused.pointer
    args = (ptr(x), np.int64(sb), np.int64(sr), np.int64(sc), ptr(w), ptr(v))
    if not _launch("sym_eigh", x, n, args, xp):
        return None
    redo = xp.nonzero(xp.isnan(w[:, 0]))[0]  # (the kernel's NaN rows are NaN throughout)
    if redo.shape[0]:
        try:
            w[redo, ...], v[redo, ...] = xp.linalg.eigh(_compat.take_rows(x, redo, xp=xp))
        except Exception:
            # The library's error for the whole batch, naming the caller's batch index (torch
            # does), not the index among the rows redone.
            xp.linalg.eigh(xp.reshape(x, a.shape))
            raise
    return xp.reshape(w, batch + (d,)), xp.reshape(v, a.shape)


__all__ = [
    "EIGH",
    "EIGH_MAX_D",
    "EIGH_SOURCE",
    "MAX_D",
    "SOURCE",
    "applies",
    "defines",
    "eigh",
    "eigh_applies",
    "eigh_parallel_from",
    "gram_cholesky",
    "solve_triangular",
]
