"""The only module that talks to ``array_api_compat`` and to individual array libraries.

Everything else in the package is written against the array API standard and receives the
namespace ``xp`` explicitly. This module fills the gaps of the standard that the projections need
(triangular solves, a fixed-point loop that JAX can trace, stop-gradient), each with a native route
per library and a pure-standard fallback. No array library is imported at module import time:
a library is only touched once the caller's arrays prove it is in use.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import os
import sys
import threading
import warnings
from collections.abc import Callable
from typing import Any

import array_api_compat as _aac

from ._config import torch_compiling

__all__ = [
    "array_namespace",
    "cholesky",
    "cond_rows",
    "copy",
    "count_true",
    "cupy_stream",
    "device",
    "eager_any",
    "eigh",
    "eigh_through",
    "householder_r",
    "in_lanes",
    "is_jax",
    "is_numpy",
    "is_torch",
    "matmul",
    "maximum",
    "minimum",
    "nonzero_padded",
    "numpy_threads",
    "on_device",
    "on_host",
    "put_rows",
    "qr_r",
    "row_sum",
    "serial_decompositions",
    "solve_triangular",
    "split_threads",
    "stop_gradient",
    "svd",
    "take_rows",
    "while_loop",
]

Array = Any
Namespace = Any


def array_namespace(*arrays: Any) -> Namespace:
    """The array API namespace of ``arrays`` (Python scalars and ``None`` are ignored)."""
    arrays = tuple(a for a in arrays if a is not None and not isinstance(a, (int, float)))
    return _aac.array_namespace(*arrays)


def device(x: Array) -> Any:
    return _aac.device(x)


def is_torch(xp: Namespace) -> bool:
    return _aac.is_torch_namespace(xp)


def is_jax(xp: Namespace) -> bool:
    return _aac.is_jax_namespace(xp)


def is_numpy(xp: Namespace) -> bool:
    return _aac.is_numpy_namespace(xp)


def is_cupy(xp: Namespace) -> bool:
    return _aac.is_cupy_namespace(xp)


def on_host(x: Array, xp: Namespace) -> bool:
    """Whether ``x`` is host memory the package reads directly: NumPy arrays and torch CPU
    tensors (the kernels' host build, the value checks' reductions over the batch)."""
    return is_numpy(xp) or (is_torch(xp) and x.device.type == "cpu")


# ------------------------------------------------------- one decomposition at a time (JAX)

# jaxlib's CPU LAPACK kernels (0.10.2, the newest on PyPI here) split each batched call over
# XLA's intra-op thread pool and block the pool thread that runs them until the parts are done.
# XLA runs independent operations of one program at the same time, so as many concurrent batched
# calls as the pool has threads (two on a 2-core machine) each hold a thread and wait for parts
# that no free thread is left to run: the program never finishes. Seen here: every jitted
# forward + backward of a full-Gaussian projection of 10,000 or more states hung by its second
# call, its threads in ``ParallelBatchMap`` -> ``BlockingCounter::Wait`` under ``dtrsm`` and
# ``dsyevd``. Within :func:`serial_decompositions`, every decomposition or triangular solve of
# traced JAX arrays in this module waits for the output of the one before it (a data dependence,
# :func:`_after`), so at most one of ours runs at a time.
_serial: contextvars.ContextVar[list | None] = contextvars.ContextVar(
    "tr_projections_serial", default=None
)


@contextlib.contextmanager
def serial_decompositions(after: Array | None = None):
    """Within this block, decompositions and triangular solves of traced JAX arrays run one at a
    time, the first after ``after`` (an array, e.g. the last output of a forward pass that a
    backward pass continues). Yields a one-item list holding the last such output (``None``
    while there is none): the ``after`` of a block that must follow this one."""
    box = [after]
    if torch_compiling():
        yield box  # (for JAX only; and dynamo cannot trace the ContextVar)
        return
    reset = _serial.set(box)
    try:
        yield box
    finally:
        _serial.reset(reset)


def _after(a: Array, previous: Array, *, xp: Namespace) -> Array:
    """``a``, computed only once ``previous`` is: ``a + (t - t)`` for one finite element ``t`` of
    ``previous`` (exactly zero). A data dependence, which XLA's CPU runtime schedules by;
    ``lax.optimization_barrier`` orders the compiler's schedule only, and the runtime still ran
    the calls at the same time."""
    if math.prod(previous.shape) == 0:
        return a  # (nothing was decomposed: nothing to wait for)
    t = xp.reshape(previous, (-1,))[:1]
    t = xp.where(xp.isfinite(t), t, xp.zeros_like(t))
    return a + xp.astype(xp.reshape(t - t, (1,) * a.ndim), a.dtype)


def _in_turn(fn: Callable) -> Callable:
    """Decorator for the wrappers below (first argument: the array decomposed or solved with):
    inside :func:`serial_decompositions`, traced JAX input waits for the previous call's output,
    and this call's first output is what the next one waits for."""

    @functools.wraps(fn)
    def wrapped(a: Array, *args: Any, xp: Namespace, **kwargs: Any) -> Any:
        # (is_jax first: torch.compile cannot trace the ContextVar's get)
        box = _serial.get() if is_jax(xp) else None
        if box is None or not _is_traced(a, xp):
            return fn(a, *args, xp=xp, **kwargs)
        if box[0] is not None:
            a = _after(a, box[0], xp=xp)
        out = fn(a, *args, xp=xp, **kwargs)
        box[0] = out[0] if isinstance(out, tuple) else out
        return out

    return wrapped


# --------------------------------------------------------------------------- triangular solves


@_in_turn
def solve_triangular(a: Array, b: Array, *, lower: bool = True, xp: Namespace) -> Array:
    r"""Solve :math:`A X = B` for triangular ``a`` of shape ``(..., d, d)`` and ``b`` of shape
    ``(..., d, k)``; batch dimensions must already agree.

    The standard has no triangular solve. Each library's native one is used where it exists
    (O(d^2) per right-hand side and exact on the structure); the general ``linalg.solve`` of the
    standard is the fallback, which is correct for triangular matrices too. Batches of small
    systems on a GPU (CuPy, torch CUDA; d <= 16) take the package's substitution kernel
    (:mod:`tr_projections._small_kernels`: 4x faster than torch's and cuBLAS's batched trsm for
    1e6 6x6 systems with 6 right-hand sides on an H100), and so do NumPy arrays and torch CPU
    tensors with the kernels' host build on (``TRP_FUSED_CPU=on``).
    """
    from . import _small_kernels

    if _small_kernels.applies(a, b, xp=xp):
        x = _small_kernels.solve_triangular(a, b, lower=lower, xp=xp)
        if x is not None:
            return x
    if is_torch(xp):
        import torch

        n = a.shape[0] if a.ndim >= 3 else 0
        if (
            TRSM_PARALLEL_MIN_BATCH
            and not torch_compiling()
            and n >= 2
            and math.prod(tuple(a.shape[:-2])) >= TRSM_PARALLEL_MIN_BATCH
            and a.ndim == b.ndim
            and a.shape[:-2] == b.shape[:-2]
            and a.dtype == b.dtype
            and a.device.type == "cpu"
            and (a.is_contiguous() or a.mT.is_contiguous())
        ):
            threads = split_threads(xp, a) if _torch_plain(a, b) else 1
            if threads > 1:
                return _torch_trsm_in_parts(a, b, lower=lower, threads=threads)
        return torch.linalg.solve_triangular(a, b, upper=not lower)
    d, k = a.shape[-1], b.shape[-1]
    if is_jax(xp):
        if (
            a.ndim > 2
            and ((k == 1 and d <= 32) or d <= JAX_CPU_SUBSTITUTION_MAX_D)
            and _jax_on_cpu()
        ):
            # jaxlib's batched CPU ``trsm`` took 20.8 ms for 1e5 6x1 systems where XLA's fused
            # substitution took 3.7 ms (25 against 16 ms for 6x6 right-hand sides,
            # benchmarks/jax_routes.py), and it is a call that can deadlock (see
            # serial_decompositions). (Capped: the substitution is d^2/2 operations to compile.)
            return _substitution(a, b, lower=lower, xp=xp)
        import jax.scipy.linalg as jsl

        return jsl.solve_triangular(a, b, lower=lower)
    if is_cupy(xp) and (a.ndim == 2 or tuple(a.shape[:-2]) == tuple(b.shape[:-2])):
        # cupyx's triangular solve takes batches too (cuBLAS's batched trsm: 1.9x faster than
        # the batched LU solve of 1e6 6x6 systems on an H100, benchmarks/gpu_small.py), but
        # not empty ones.
        if math.prod(tuple(b.shape)) == 0:
            with on_device(b, xp):
                return xp.zeros(b.shape, dtype=b.dtype)
        try:
            import cupyx.scipy.linalg as csl
        except ImportError:  # pragma: no cover - cupy without cupyx.scipy
            pass
        else:
            return csl.solve_triangular(a, b, lower=lower)
    if is_numpy(xp) and a.ndim == 2 and "scipy" in sys.modules:
        # scipy is optional; only used when the caller already imported it.
        import scipy.linalg as sl

        return sl.solve_triangular(a, b, lower=lower, check_finite=False)
    if is_numpy(xp) and a.ndim > 2:
        # NumPy has no batched triangular solve, and its batched LU solve is slow on many
        # small systems: substitution, each step one pass over the batch, is 3x faster for one
        # right-hand side (measured on 1e5 systems); for several, substitution with the batch
        # axis innermost (_batch_last_substitution) where it was measured faster.
        import numpy as np

        n = math.prod(np.broadcast_shapes(a.shape[:-2], b.shape[:-2]))
        least = BATCH_LAST_MIN_BATCH if d <= 8 else BATCH_LAST_MIN_BATCH_LARGE_D
        if k > 1 and d <= BATCH_LAST_MAX_D and n >= least:
            return _batch_last_substitution(a, b, lower=lower)
        if k == 1 or d <= 8:
            return _substitution(a, b, lower=lower, xp=xp)
    return xp.linalg.solve(a, b)


#: Traced JAX triangular solves on the CPU with several right-hand sides and at most this many
#: unknowns take XLA's fused substitution (:func:`_substitution`) instead of jaxlib's ``trsm``
#: (one right-hand side: up to 32 unknowns).
JAX_CPU_SUBSTITUTION_MAX_D = 8

#: Batches of at least this many triangular systems of plain torch CPU tensors (the same batch
#: shape and dtype on both sides, the factors row- or column-major) are solved in parts of the
#: first batch axis on :func:`split_threads` threads at once, each part writing its rows of one
#: output: torch solves a batch on one thread. The output has torch's own layout (column-major
#: matrices): into it the parts give torch's whole call bit for bit (tested up to d = 32; into
#: a row-major output torch rounds differently for d >= 16 with several right-hand sides).
#: Factors of other layouts (a broadcast or stepped batch) run whole: torch copies them, but
#: not a part that happens to be contiguous, whose bits then differ. 100,000 6x6 systems,
#: 2 threads: 6 right-hand sides 1.53x, one 1.58x; 1.14-1.36x at 10,000; slower at 1,000
#: (``benchmarks/parallel_rows.py``). 0: never.
TRSM_PARALLEL_MIN_BATCH = 4096


def _torch_trsm_in_parts(a: Array, b: Array, *, lower: bool, threads: int) -> Array:
    import torch

    a, b = a.detach(), b.detach()  # (plain tensors: no graph is recorded through the parts)
    d, k = b.shape[-2], b.shape[-1]
    out = torch.empty((*b.shape[:-2], k, d), dtype=b.dtype, device=b.device).mT

    def part(i: int, j: int) -> None:
        torch.linalg.solve_triangular(a[i:j], b[i:j], upper=not lower, out=out[i:j])

    size = a.element_size()
    try:
        if _in_parts(part, a.shape[0], threads, tuple(x.stride(0) * size for x in (a, b, out))):
            return out
    except Exception:
        pass  # (torch's one call below raises the error of one call)
    return torch.linalg.solve_triangular(a, b, upper=not lower)


def _substitution(a: Array, b: Array, *, lower: bool, xp: Namespace) -> Array:
    """Forward (``lower``) or back substitution for a batch of triangular systems, vectorised
    over the batch and the right-hand sides: ``d(d - 1)/2`` multiply-subtracts and ``d``
    divisions, as LAPACK's ``trsm`` does per system (backward stable)."""
    d = a.shape[-1]
    if d == 0:
        return xp.zeros_like(b)
    rows: list[Array | None] = [None] * d
    for i in range(d) if lower else range(d - 1, -1, -1):
        acc = b[..., i, :]
        for j in range(i) if lower else range(i + 1, d):
            acc = acc - a[..., i, j, None] * rows[j]
        rows[i] = acc / a[..., i, i, None]
    return xp.stack(rows, axis=-2)


#: NumPy batches of triangular systems with several right-hand sides are solved by
#: :func:`_batch_last_substitution` where ``benchmarks/triangular.py`` measured it faster: at
#: most :data:`BATCH_LAST_MAX_D` unknowns, from :data:`BATCH_LAST_MIN_BATCH` systems with at
#: most 8 unknowns (a cautious threshold: smaller batches keep the row-by-row form, against
#: which the new one was 0.45-1.28x below 4,096 systems) and from
#: :data:`BATCH_LAST_MIN_BATCH_LARGE_D` with more (smaller batches keep NumPy's LU solve, far
#: faster for a few systems: 7 against 59 us for one 12x12 system). At d = 32 neither won
#: throughout (the LU solve faster up to 64 systems, batch last up to 1.35x faster at 500,
#: even at 1,000), so it keeps the LU solve.
BATCH_LAST_MAX_D = 24
BATCH_LAST_MIN_BATCH = 4096
BATCH_LAST_MIN_BATCH_LARGE_D = 64


def _batch_last_substitution(a: Array, b: Array, *, lower: bool) -> Array:
    """:func:`_substitution` for NumPy arrays with the batch axis moved innermost: ``a`` and
    the solution (a C-ordered copy of ``b``, worked in place) become ``(d, d, n)`` and
    ``(d, k, n)``, and each column's elimination is one multiply and one subtract over a
    contiguous block of every row below (above, for an upper ``a``) and every system at once.
    The same operations as the row-by-row form, in the same order for a lower ``a`` (the same
    bits; an upper ``a`` subtracts its columns from the last), in ``2(d - 1) + d`` passes
    instead of ``d(d - 1) + d`` over strided rows, plus the two layout copies and one back.
    Measured by ``benchmarks/triangular.py`` (interleaved medians, NumPy 2.4, 2 cores, float64,
    k = d): against the row-by-row form 1.42-1.74x faster at 14,286 systems for d = 3 to 8,
    0.95-1.22x at 500-1,000 and 0.45-1.28x at 16-64; against NumPy's LU solve, which batches
    with more unknowns took before, 1.19-1.47x faster at 64 systems and 1.58-2.48x at 1,000 for
    d = 12 to 24, slower for 16 systems and fewer. With one right-hand side it was slower than
    the row-by-row form for d <= 6 and from 1,000 systems (0.41-0.89x), faster for d >= 8 below
    500 systems (where the LU solve is faster still for the smallest batches): that case keeps
    the row-by-row form. Hence the routes of :data:`BATCH_LAST_MAX_D` and its neighbours."""
    import numpy as np

    batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    d, k = a.shape[-1], b.shape[-1]
    n = math.prod(batch)
    dtype = np.result_type(a.dtype, b.dtype)
    # (n, d, d) -> (d, d, n), or (d, d, 1) for one matrix shared by the systems (broadcast in
    # the passes); the solution a copy of our own, written in place.
    a3 = a.reshape(1, d, d) if math.prod(a.shape[:-2]) == 1 else None
    if a3 is None:
        a3 = np.broadcast_to(a, batch + (d, d)).reshape(n, d, d)
    aT = np.ascontiguousarray(np.moveaxis(a3, 0, -1))
    x = np.array(np.moveaxis(np.broadcast_to(b, batch + (d, k)).reshape(n, d, k), 0, -1),
                 dtype=dtype, order="C", copy=True)  # fmt: skip
    for i in range(d) if lower else range(d - 1, -1, -1):
        x[i] /= aT[i, i]
        if lower and i + 1 < d:
            x[i + 1 :] -= aT[i + 1 :, i, None, :] * x[i]
        elif not lower and i > 0:
            x[:i] -= aT[:i, i, None, :] * x[i]
    # Back to the batch's layout, C-ordered like every other result.
    return np.ascontiguousarray(np.moveaxis(x, -1, 0)).reshape(batch + (d, k))


# --------------------------------------------------------------------------- decompositions

#: torch's CUDA ``eigh`` (cuSOLVER's batched routine, seen with torch 2.11 / CUDA 13 on an H200
#: and an H100) fails with ``CUSOLVER_STATUS_INTERNAL_ERROR`` for batches of 65,536 matrices and
#: more, and runs out of memory at a million: batched ``eigh`` and ``svd`` of torch CUDA tensors
#: run in chunks of at most this many matrices (each chunk is still one batched call).
TORCH_CUDA_MAX_BATCH = 32768

#: CuPy's batched ``eigh`` (cuSOLVER's batched Jacobi routine) asks for a workspace that grows
#: with the batch: 8.6 GB for a million 6x6 matrices, whose allocation failed on an H100 (CuPy 14,
#: CUDA 13) with most of the GPU's memory free. CuPy arrays, and torch tensors handed to CuPy
#: (:data:`TORCH_CUDA_EIGH`), go in chunks of at most this many matrices.
CUPY_MAX_BATCH = 1 << 17


def _max_batch(a: Array, xp: Namespace) -> int | None:
    """How many matrices one batched decomposition of ``a`` may take (``None``: no limit)."""
    if is_torch(xp) and a.device.type == "cuda":
        return TORCH_CUDA_MAX_BATCH
    if is_cupy(xp):
        return CUPY_MAX_BATCH
    return None


#: torch's CPU and NumPy's batched ``eigh``, SVD and QR call LAPACK for one matrix after another
#: on the calling thread (torch 2.13 and NumPy 2.4 alike: torch's intra-op threads sit idle). For
#: batches of at least :data:`PARALLEL_MIN_BATCH` matrices (:data:`PARALLEL_MIN_BATCH_QR` for QR)
#: of at most :data:`PARALLEL_MAX_D` rows and columns (larger ones LAPACK may thread itself;
#: NumPy's ``eigh`` and SVD where lanes leave OpenBLAS alone: :data:`NUMPY_EIGH_PARALLEL_MAX_D`,
#: :data:`NUMPY_SVD_PARALLEL_MAX_D`), these go in one part per thread, decomposed at the same
#: time on a thread pool (LAPACK runs without the GIL; ``eigh`` of matrices smaller than 6x6
#: from more: :func:`_eigh_parallel_from`).
#: Every matrix gets the same LAPACK call as in one batched call, and the parts
#: start at multiples of 64 bytes into the batch, so the results were the same bit for bit with
#: the LAPACK builds of torch 2.13 and NumPy 2.4 (a cut at another alignment changed torch's
#: eigenvalues in the last bit). Measured on 2 cores (float64, 6x6, ``OMP_WAIT_POLICY=PASSIVE``,
#: ``benchmarks/lapack_threads.py``): ``eigh`` 1.1-1.4x faster at 256 matrices and 1.4-1.9x
#: from 512, the SVD 1.3-1.9x from 256, QR 1.2-1.9x from 10,000 (about 1x at 4,096 for torch).
#: Threads: ``torch.get_num_threads()`` for torch tensors, also where the torch adapter runs
#: NumPy kernels on them; for NumPy the CPUs this process may run on, at most
#: ``OMP_NUM_THREADS`` where that is set; never more than :data:`PARALLEL_MAX_PARTS`.
#: :data:`LAPACK_THREADS` (environment variable ``TRP_LAPACK_THREADS``; 0 or unset: automatic)
#: sets the count for both; 1 turns the split off. torch tensors are split only when nothing is
#: being differentiated through the call (:func:`_torch_plain`).
LAPACK_THREADS: int | str = os.environ.get("TRP_LAPACK_THREADS", "0")
PARALLEL_MIN_BATCH = 256
PARALLEL_MIN_BATCH_QR = 4096
PARALLEL_MAX_D = 64
PARALLEL_MAX_PARTS = 32

#: Where lanes leave OpenBLAS alone (:data:`ONE_BLAS_THREAD_IN_LANES` off, or no OpenBLAS whose
#: thread count can be set), NumPy's ``eigh`` and SVD are split only up to these sizes: from
#: about 26x26 (``eigh``) and 44x44 (SVD) two parts decomposed at the same time with NumPy's
#: LAPACK (OpenBLAS, NumPy 2.4's wheels, two BLAS threads) took longer than one call, where
#: torch's LAPACK kept gaining. 2
#: cores, float64, ``benchmarks/lapack_threads.py``
#: (``benchmarks/results/cpu-2core-r18-lapack-threads-2026-11-28.md``, 256 to 10,000
#: matrices): NumPy's ``eigh`` split 1.22-1.73x faster at 12x12 to 24x24 and 0.37-0.98x from
#: 26x26 to 48x48 (0.50x for 1,000 and for 10,000 32x32 matrices); its SVD 1.58-2.08x faster
#: from 12x12 to 40x40, 0.61x at 44x44 and 0.54-1.00x at 48x48; torch's ``eigh`` and SVD
#: split 1.33-4.10x faster from 12x12 to 48x48. With one BLAS thread in each part they no
#: longer lose at any size (``cpu-2core-r19-lapack-threads-2026-11-28.md``), so these limits
#: apply only where OpenBLAS is left alone.
NUMPY_EIGH_PARALLEL_MAX_D = 24
NUMPY_SVD_PARALLEL_MAX_D = 40

# Where OpenBLAS is left alone, larger NumPy ``eigh`` and SVD calls made in lanes
# (:func:`in_lanes`, the chunks of a large call on every thread) take turns through this lock
# (:func:`_chunked`), for the same reason:
# two at once took longer than one after the other (W2 full, 1,000 32x32 states, 2 lanes:
# 0.59-0.76x against the chunks in turn, ``benchmarks/lanes.py``), while the rest of each lane's
# work still overlaps.
_numpy_lapack_lock = threading.Lock()

#: While :func:`in_lanes` runs tasks at the same time, the OpenBLAS libraries loaded in the
#: process (NumPy's wheels bundle one) use one thread each (:func:`_one_blas_thread`), and are
#: given back their own count once no lanes run. Each lane already has a core of its own; with
#: OpenBLAS's threads on top, NumPy's ``eigh`` of matrices from about 26x26 took longer two at
#: a time than one after the other (the figures above), and with one BLAS thread each it no
#: longer did (1,000 32x32 matrices split: 0.80x with OpenBLAS left alone, 1.00x with one
#: thread, in the same rounds; 1.70x with ``OPENBLAS_NUM_THREADS=1`` for the one call and the
#: split alike, where no OpenBLAS thread is left spinning from the call timed before:
#: ``benchmarks/results/cpu-2core-r19-lapack-threads-2026-11-28.md``). So where the libraries'
#: thread count can be set (:func:`_openblas_controls`) NumPy's ``eigh`` and SVD are split up
#: to :data:`PARALLEL_MAX_D` like torch's and nothing takes turns: full KL and W2 projections
#: of 1,000 32x32 states 1.70-1.88x faster, torch and NumPy (``cpu-2core-r19-blas``, against
#: ac09dd6). OpenBLAS's count is process-wide: the caller's other threads get one BLAS thread
#: too while lanes run. False (environment variable
#: ``TRP_ONE_BLAS_THREAD_IN_LANES=0``; ``1``, the default, for on): leave OpenBLAS alone (and
#: keep :data:`NUMPY_EIGH_PARALLEL_MAX_D`, :data:`NUMPY_SVD_PARALLEL_MAX_D` and the turns).
ONE_BLAS_THREAD_IN_LANES: bool | str = os.environ.get("TRP_ONE_BLAS_THREAD_IN_LANES", "1")

_blas_lock = threading.Lock()
_blas_lanes = 0  # how many in_lanes calls hold OpenBLAS at one thread now
_blas_saved: list[tuple[Callable[[int], Any], int]] = []  # (set, own count), given back at the end


def _openblas_controls() -> tuple[tuple[Callable[[], int], Callable[[int], Any]], ...]:
    """``(get, set)`` of the thread count of every OpenBLAS library loaded in this process that
    exports them and keeps its count process-wide (a build on pthreads, or a sequential one;
    an OpenMP build follows each thread's OpenMP setting instead, so setting its count would
    not hold): NumPy's (its wheels' ``numpy.libs`` or ``.dylibs`` folder) and, on Linux, any
    other mapped into the process (a distribution's NumPy, SciPy's). Libraries are looked up
    without being loaded (``RTLD_NOLOAD``; Windows has no such flag, and a DLL named there is
    one already loaded), and NumPy is imported only where the caller already did. Found again
    whenever modules were imported since the last look. Empty where there is none."""
    return _openblas_controls_for(len(sys.modules))


@functools.lru_cache(maxsize=1)
def _openblas_controls_for(_modules: int) -> tuple:
    return tuple((get, put) for get, put, _ in _openblas_libraries())


def _openblas_paths() -> tuple[list[str], set[str]]:
    # The candidate files, and those of them in NumPy's own folders (its wheels' library).
    import glob

    paths: list[str] = []
    numpy_own: set[str] = set()
    numpy = sys.modules.get("numpy")
    if numpy is not None and getattr(numpy, "__file__", None):
        root = os.path.dirname(os.path.abspath(numpy.__file__))
        for folder in (root + ".libs", os.path.join(root, ".dylibs")):
            found = sorted(glob.glob(os.path.join(folder, "*openblas*")))
            paths += found
            numpy_own.update(os.path.realpath(f) for f in found)
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split(None, 5)[-1].strip() if line.count(" ") >= 5 else ""
                if "openblas" in os.path.basename(path).lower() and path not in paths:
                    paths.append(path)
    except OSError:
        pass  # (not Linux)
    return paths, numpy_own


def _openblas_libraries() -> list[tuple[Callable[[], int], Callable[[int], Any], bool]]:
    """``(get, set, numpy's own)`` of every loaded OpenBLAS whose count can be set (see
    :func:`_openblas_controls`)."""
    import ctypes

    paths, numpy_own = _openblas_paths()
    mode = getattr(os, "RTLD_NOLOAD", 0) | getattr(os, "RTLD_LOCAL", 0)
    found, seen = [], set()
    for path in paths:
        real = os.path.realpath(path)
        if real in seen:
            continue
        seen.add(real)
        try:
            lib = ctypes.CDLL(path, mode=mode)
        except OSError:
            continue  # (not loaded, or not a library)
        for prefix in ("scipy_openblas", "openblas"):
            names = [
                (f"{prefix}_get_num_threads{x}", f"{prefix}_set_num_threads{x}",
                 f"{prefix}_get_parallel{x}")
                for x in ("64_", "_64", "")
            ]  # fmt: skip
            symbols = next(
                (tuple(getattr(lib, n, None) for n in ns) for ns in names
                 if all(getattr(lib, n, None) is not None for n in ns)),
                None,
            )  # fmt: skip
            if symbols is None:
                continue
            get, put, parallel = symbols
            get.restype, get.argtypes = ctypes.c_int, []
            put.restype, put.argtypes = None, [ctypes.c_int]
            parallel.restype, parallel.argtypes = ctypes.c_int, []
            if parallel() in (0, 1):  # (0: sequential, 1: pthreads; 2: OpenMP)
                found.append((get, put, real in numpy_own))
            break
    return found


@functools.cache
def _numpy_blas_is_openblas() -> bool:
    """Whether NumPy's own BLAS is OpenBLAS (its build configuration says so, or its wheels'
    folder holds one): only then do lanes set OpenBLAS's count in place of NumPy's limits."""
    import numpy

    try:
        config = numpy.show_config(mode="dicts")
        name = str(config["Build Dependencies"]["blas"]["name"])
    except Exception:  # (NumPy < 1.26, or a configuration without that entry)
        name = ""
    return "openblas" in name.lower() or any(own for _, _, own in _openblas_libraries())


def _one_blas_thread_in_lanes() -> bool:
    """:data:`ONE_BLAS_THREAD_IN_LANES` as a bool, or an error that names it."""
    from ._config import flag

    value = ONE_BLAS_THREAD_IN_LANES
    on = flag(value)
    if on is None:
        raise ValueError(
            f"tr_projections._compat.ONE_BLAS_THREAD_IN_LANES (or TRP_ONE_BLAS_THREAD_IN_LANES) "
            f"must be 1 or 0 (True or False), got {value!r}"
        )
    return on


def _blas_controlled() -> bool:
    """Whether lanes run NumPy's OpenBLAS on one thread (:data:`ONE_BLAS_THREAD_IN_LANES`, NumPy
    imported and built with OpenBLAS, one whose count can be set loaded)."""
    return (
        _one_blas_thread_in_lanes()
        and "numpy" in sys.modules
        and bool(_openblas_controls())
        and _numpy_blas_is_openblas()
    )


@contextlib.contextmanager
def _one_blas_thread():
    """OpenBLAS on one thread within this block, the libraries' own counts given back when the
    last such block in the process ends (blocks on several threads at once share one setting,
    and the first of them reads the counts to give back). A count changed by someone else
    meanwhile (e.g. threadpoolctl's ``threadpool_limits`` entered or left while lanes run) is
    overwritten by the given-back one."""
    global _blas_lanes, _blas_saved
    controls = _openblas_controls() if _blas_controlled() else ()
    if not controls:
        yield
        return
    entered = False
    try:
        with _blas_lock:
            if _blas_lanes == 0:
                _blas_saved = [(put, get()) for get, put in controls]
                for put, n in _blas_saved:
                    if n != 1:
                        put(1)
            _blas_lanes += 1
            entered = True
        yield
    finally:
        if entered:
            with _blas_lock:
                _blas_lanes -= 1
                if _blas_lanes == 0:
                    for put, n in _blas_saved:
                        put(n)


def _eigh_parallel_from(d: int) -> int:
    """The least batch of ``d x d`` matrices whose LAPACK ``eigh`` is split over threads:
    :data:`PARALLEL_MIN_BATCH` from 6x6 up, and (6/d)^2 times as many below, where one matrix
    costs LAPACK little and the hand-off to a thread weighs more. NumPy on 2 threads, one call
    against the split call at the old threshold (256 whatever d;
    ``benchmarks/results/cpu-2core-r16-eigh-2026-11-27``): 2x2 0.151 against 0.801 ms at 256
    matrices and 0.392 against 0.762 at 1,000, the split 1.33x faster at 10,000; 3x3 0.300
    against 0.617 at 256, 1.09 against 1.21 at 1,000, the split 1.25x faster at 10,000."""
    if d >= 6 or PARALLEL_MIN_BATCH <= 2:  # (2: "split every batch", the tests' setting)
        return PARALLEL_MIN_BATCH
    return math.ceil(PARALLEL_MIN_BATCH * 36 / max(1, d) ** 2)


_pool: Any = None  # the ThreadPoolExecutor: made on first use (its threads start on demand)
_pool_lock = threading.Lock()
# The number of threads for NumPy arrays that the torch adapter made from torch tensors.
_numpy_threads: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "tr_projections_numpy_threads", default=None
)
# Set in the parts that :func:`in_lanes` runs: their work is not split again.
_lane: contextvars.ContextVar[bool] = contextvars.ContextVar("tr_projections_lane", default=False)


def _reset_after_fork() -> None:  # (the child has none of the parent's pool threads)
    global _pool, _pool_lock, _numpy_lapack_lock, _blas_lock, _blas_lanes
    _pool, _pool_lock, _numpy_lapack_lock = None, threading.Lock(), threading.Lock()
    with contextlib.suppress(Exception):  # (lanes forked mid-call: the child's own count back)
        if _blas_lanes:
            for put, n in _blas_saved:
                put(n)
    _blas_lock, _blas_lanes = threading.Lock(), 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


@contextlib.contextmanager
def numpy_threads(n: int):
    """Within this block, NumPy arrays' batched decompositions split over ``n`` threads (what
    the torch adapter sets to ``torch.get_num_threads()`` when it runs NumPy kernels)."""
    reset = _numpy_threads.set(n)
    try:
        yield
    finally:
        _numpy_threads.reset(reset)


def _configured_threads() -> int:
    """:data:`LAPACK_THREADS` as a count (0: automatic), or an error that names it."""
    value = LAPACK_THREADS
    try:
        n = int(str(value).strip() or 0)  # (the environment's text, or a number)
    except ValueError:
        n = -1
    if n < 0:
        raise ValueError(
            f"tr_projections._compat.LAPACK_THREADS (or TRP_LAPACK_THREADS) must be a "
            f"non-negative integer (0: automatic, 1: no split), got {value!r}"
        )
    return n


def split_threads(xp: Namespace, a: Array | None = None) -> int:
    """How many threads the package may split eager CPU work on arrays of ``xp`` over (batched
    decompositions' parts, a large call's chunks of rows): for NumPy the CPUs this process may
    run on, at most ``OMP_NUM_THREADS`` where that is set (or what :func:`numpy_threads` says);
    for plain CPU torch tensors (``a``, when given, is checked) ``torch.get_num_threads()``;
    :data:`LAPACK_THREADS` for both where it is set; never more than :data:`PARALLEL_MAX_PARTS`.
    1 for other arrays, and inside work that already runs split (:func:`in_lanes`)."""
    if is_torch(xp) and torch_compiling():
        return 1  # (traced: nothing runs split; nor can the ContextVar below be read)
    if _lane.get():
        return 1  # (a part of a split call: the call's threads are taken)
    if is_numpy(xp):
        n = _configured_threads() or _numpy_threads.get()
        if not n:
            try:
                n = len(os.sched_getaffinity(0))
            except AttributeError:  # pragma: no cover - not on Linux
                n = os.cpu_count() or 1
            omp = os.environ.get("OMP_NUM_THREADS", "")
            if omp.isdigit() and int(omp) > 0:
                n = min(n, int(omp))
    elif is_torch(xp) and (a is None or (a.device.type == "cpu" and _torch_plain(a))):
        import torch

        if not _torch_thread_state_plain():
            return 1
        n = _configured_threads() or torch.get_num_threads()
    else:
        return 1
    return max(1, min(n, PARALLEL_MAX_PARTS))


def _lapack_threads(a: Array, xp: Namespace) -> int:
    """How many parts a batched decomposition of ``a`` is split into (1: not split)."""
    if a.ndim < 3 or max(a.shape[-2:]) > PARALLEL_MAX_D:
        return 1
    return split_threads(xp, a)


def _executor() -> Any:
    """The thread pool, shared by every call and never replaced (so a caller's pool is never
    shut down under it); its threads start as parts need them, at most
    :data:`PARALLEL_MAX_PARTS` - 1."""
    global _pool
    with _pool_lock:
        if _pool is None:
            from concurrent.futures import ThreadPoolExecutor

            _pool = ThreadPoolExecutor(
                PARALLEL_MAX_PARTS - 1, thread_name_prefix="tr_projections-lapack"
            )
        return _pool


def in_lanes(tasks: list[Callable[[], Any]]) -> list[Any]:
    """Run the zero-argument ``tasks`` at the same time: all but the last on the thread pool
    and the last on this thread, each in a copy of the caller's context (its settings, e.g.
    :func:`tr_projections.checks`) with further splitting off (:func:`split_threads` is 1
    there), NumPy's error handling as the caller's (NumPy 1.x keeps it per thread) and, once
    torch is imported, torch's grad mode as the caller's (a pool thread's own default is on).
    Returns their results in order, once every task has finished; if any failed, raises the
    error of the first that failed, in the order of ``tasks``. An interrupt (any exception
    that is not an ``Exception``) on this thread, in its task or while it waits, cancels the
    tasks not yet started and waits for the running ones before it propagates. A task that
    cannot be handed to the pool (the interpreter is shutting down) runs here."""
    from concurrent.futures import wait

    if not tasks:
        return []
    errstate = None
    if "numpy" in sys.modules:
        import numpy

        errstate = {**numpy.geterr(), "call": numpy.geterrcall()}
    grad = None
    if "torch" in sys.modules:
        import torch

        grad = torch.is_grad_enabled()

    def lane(task: Callable[[], Any]) -> Any:
        _lane.set(True)
        with contextlib.ExitStack() as stack:
            if errstate is not None:
                import numpy

                stack.enter_context(numpy.errstate(**errstate))
            if grad is not None:
                import torch

                stack.enter_context(torch.set_grad_enabled(grad))
            return task()

    futures: list = []  # (None: the task runs here)
    outs: list = [None] * len(tasks)
    errors: list = [None] * len(tasks)
    pool = _executor() if len(tasks) > 1 else None
    # (the lanes have the CPUs: OpenBLAS on one thread in each, _one_blas_thread)
    with _one_blas_thread() if pool is not None else contextlib.nullcontext():
        try:
            for task in tasks[:-1]:
                try:
                    futures.append(pool.submit(contextvars.copy_context().run, lane, task))
                except RuntimeError as e:
                    if "shutdown" not in str(e):
                        raise  # (e.g. no thread could be started: the call fails)
                    futures.append(None)  # (a pool shut down at interpreter exit: run it here)
            futures.append(None)
            for k, task in enumerate(tasks):
                if futures[k] is None:
                    try:
                        outs[k] = contextvars.copy_context().run(lane, task)
                    except Exception as e:  # (raised below, once every task has finished)
                        errors[k] = e
            wait([f for f in futures if f is not None])
        except BaseException:  # (an interrupt, here or while waiting: stop what has not started)
            pending = [f for f in futures if f is not None]
            for f in pending:
                f.cancel()
            wait(pending)
            raise
    for k, f in enumerate(futures):
        if f is not None:
            errors[k] = f.exception()
            if errors[k] is None:
                outs[k] = f.result()
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        outs.clear()  # (the error's traceback keeps this frame: not the results with it)
        errors.clear()
        raise first
    return outs


class Joined:
    """Whole arrays of ``n`` rows (first axis) joined from the outputs of the parts of a call
    that run at the same time on row ranges of a batch. Where the parts' outputs are NumPy
    arrays or plain torch tensors (:func:`_torch_plain`), each part writes its rows into whole
    arrays from its own lane: no part's output is then joined afterwards on one thread (two
    lanes' halves of 100,000 6x6 float64 matrices: 3.85 ms joined afterwards, 2.75 ms written
    from the lanes, ``benchmarks/parallel_rows.py``). The whole arrays are made, empty, when
    the first part is done: one per output (``None`` stays ``None``), with that output's
    trailing shape, dtype, device and, for a batch of column-major matrices, that layout.
    Other outputs (e.g. tensors under ``torch.func.vmap``, into which nothing can be written)
    are kept and joined in :meth:`result`."""

    def __init__(self, n: int, *, xp: Namespace) -> None:
        self.n, self.xp = n, xp
        self._whole: tuple | None = None
        self._written: list[tuple[int, int]] = []  # the row ranges written into _whole
        self._kept: list[tuple[int, tuple]] = []  # the parts kept as they are, by first row
        self._lock = threading.Lock()

    def put(self, start: int, stop: int, outs: tuple) -> None:
        """Rows ``start:stop`` of the outputs: ``outs`` holds one array of ``stop - start`` rows,
        or ``None``, per output. A part unlike the first written one (another dtype, an array
        where it had ``None``, one that cannot be written) is kept and joined in
        :meth:`result`, as concatenation would join it."""
        with self._lock:
            if self._whole is None and not self._kept:
                if all(x is None or _writable_rows(x, self.xp) for x in outs):
                    self._whole = tuple(
                        None if x is None else _empty_rows(x, self.n, self.xp) for x in outs
                    )
            if self._whole is None or not all(
                (x is None) == (w is None)
                and (x is None or (x.dtype == w.dtype and _writable_rows(x, self.xp)))
                for x, w in zip(outs, self._whole, strict=True)
            ):
                self._kept.append((start, outs))
                return
            self._written.append((start, stop))
        for whole, x in zip(self._whole, outs, strict=True):
            if x is not None:
                whole[start:stop, ...] = x

    def result(self) -> tuple:
        """The whole outputs, once every part is done."""
        if not self._kept:
            assert self._whole is not None
            return self._whole
        whole = self._whole
        parts = [(i, outs) for i, outs in self._kept] + [
            (i, tuple(None if w is None else w[i:j, ...] for w in whole))
            for i, j in self._written
            if whole is not None
        ]
        parts.sort(key=lambda part: part[0])
        joined = []
        for xs in zip(*(outs for _, outs in parts), strict=True):
            if all(x is None for x in xs):
                joined.append(None)
            elif len(xs) == 1:
                joined.append(xs[0])
            else:
                joined.append(self.xp.concat(list(xs), axis=0))  # (its error: None beside arrays)
        return tuple(joined)


def _writable_rows(x: Array, xp: Namespace) -> bool:
    # Whether Joined may write x into a whole array of its own making.
    if is_numpy(xp):
        import numpy as np

        return type(x) is np.ndarray
    return is_torch(xp) and _torch_plain(x)


def _empty_rows(x: Array, n: int, xp: Namespace) -> Array:
    # An empty array of n rows like x (C order, or a batch of column-major matrices like x).
    shape = (n, *x.shape[1:])
    if x.ndim >= 3:
        swapped = shape[:-2] + (shape[-1], shape[-2])
        if is_torch(xp) and not x.is_contiguous() and x.mT.is_contiguous():
            return xp.empty(swapped, dtype=x.dtype, device=device(x)).mT
        if is_numpy(xp) and not x.flags.c_contiguous and x.swapaxes(-1, -2).flags.c_contiguous:
            return xp.empty(swapped, dtype=x.dtype).swapaxes(-1, -2)
    return xp.empty(shape, dtype=x.dtype, device=device(x))


def _cuts(n: int, parts: int, row_bytes: tuple[int, ...]) -> list[tuple[int, int]]:
    # At most `parts` consecutive ranges of n rows, each starting a whole number of 64 bytes
    # into every array whose rows are `row_bytes` apart: LAPACK's vectorised kernels round
    # differently with matrices at other alignments (seen with torch: a cut after 13 5x5
    # float64 matrices changed eigenvalues in the last bit; even cuts did not).
    unit = 1
    for size in row_bytes:
        size = abs(int(size))
        if size:
            unit = math.lcm(unit, 64 // math.gcd(64, size))
    share = -(-n // parts)  # (ceiling divisions)
    step = -(-share // unit) * unit
    return [(i, min(i + step, n)) for i in range(0, n, step)]


def _in_parts(part: Callable[[int, int], Any], n: int, parts: int, row_bytes: tuple) -> bool:
    """``part(start, stop)`` on the row ranges of :func:`_cuts` at the same time
    (:func:`in_lanes`), each writing its own rows of the caller's outputs; False, with nothing
    run, where the batch is one range."""
    cuts = _cuts(n, parts, row_bytes)
    if len(cuts) == 1:
        return False
    in_lanes([functools.partial(part, i, j) for i, j in cuts])
    return True


def _in_parallel(fn: Callable[[Array], tuple], flat: Array, parts: int, *, xp: Namespace) -> tuple:
    """The outputs of ``fn`` on ``flat`` (``(n, m, k)``), computed on at most ``parts``
    consecutive slices at the same time (:func:`in_lanes`), each writing its rows of the
    outputs (:class:`Joined`). If any part fails, ``fn`` runs once more on the whole batch
    here, so that the caller sees the error of one call (its batch indices, not a part's)."""
    n = flat.shape[0]
    if is_torch(xp):
        flat = flat.detach()  # (the slices record no graph on the pool's threads)
    joined = Joined(n, xp=xp)

    def part(i: int, j: int) -> None:
        joined.put(i, j, tuple(fn(flat[i:j, ...])))

    row = int(flat.itemsize) * math.prod(tuple(flat.shape[1:]))
    try:
        if not _in_parts(part, n, parts, (row,)):
            return tuple(fn(flat))
    except Exception:
        return tuple(fn(flat))  # (raises the error of one call)
    return joined.result()


def _chunked(
    fn: Callable[[Array], tuple],
    a: Array,
    *,
    xp: Namespace,
    limit: int | None = None,
    parallel_from: int | None = None,
    numpy_max_d: int | None = None,
) -> tuple:
    # fn on a (..., m, n) batch, in chunks of the flattened batch where the library needs it,
    # or split over threads where the library decomposes one matrix at a time (LAPACK_THREADS).
    # Where lanes leave NumPy's OpenBLAS alone (not _blas_controlled()), NumPy's matrices
    # larger than numpy_max_d are not split, and in lanes they take turns (_numpy_lapack_lock):
    # two such calls at once are slower than one after the other.
    limit = _max_batch(a, xp) if limit is None else limit
    batch = tuple(a.shape[:-2])
    n = math.prod(batch)
    parallel_from = PARALLEL_MIN_BATCH if parallel_from is None else parallel_from
    large = (
        numpy_max_d is not None
        and is_numpy(xp)
        and max(a.shape[-2:]) > numpy_max_d
        and not _blas_controlled()
    )
    threads = 1
    # (not while torch.compile traces: nothing runs split there, and comparing the batch size
    # would be a guard on it)
    if (
        limit is None
        and not large
        and not (is_torch(xp) and torch_compiling())
        and n >= max(parallel_from, 2)
    ):
        threads = min(_lapack_threads(a, xp), n)
    if threads < 2 and (limit is None or n <= limit):
        with _numpy_lapack_lock if large and _lane.get() else contextlib.nullcontext():
            return tuple(fn(a))
    flat = xp.reshape(a, (n,) + tuple(a.shape[-2:]))
    if threads > 1:
        joined = _in_parallel(fn, flat, threads, xp=xp)
    else:
        parts = [tuple(fn(flat[i : i + limit, ...])) for i in range(0, n, limit)]
        joined = tuple(
            outs[0] if len(outs) == 1 else xp.concat(outs, axis=0)
            for outs in zip(*parts, strict=True)
        )
    return tuple(xp.reshape(x, batch + tuple(x.shape[1:])) for x in joined)


#: How :func:`eigh` decomposes torch CUDA tensors. ``"auto"``: batches of at least
#: :data:`CUPY_MIN_BATCH` plain float32/float64 tensors (no autograd graph being recorded, no
#: forward-mode tangent, no ``torch.func`` transform or ``torch.compile`` tracing) go to CuPy's
#: batched ``eigh`` zero-copy through DLPack, on torch's current stream, where CuPy is installed
#: and sees the GPU; everything else uses torch's routine in chunks (:data:`TORCH_CUDA_MAX_BATCH`).
#: ``"torch"``: always torch's routine. ``"cupy"``: CuPy for every plain tensor, and an error
#: where CuPy is missing. The environment variable ``TRP_TORCH_CUDA_EIGH`` sets it at import.
TORCH_CUDA_EIGH = os.environ.get("TRP_TORCH_CUDA_EIGH", "auto")
_EIGH_ROUTES = ("auto", "torch", "cupy")
_cupy_failed = False  # set when the "auto" route's CuPy call failed for want of a working CuPy

#: ``"auto"`` hands torch CUDA batches to CuPy from this many matrices: on an H100 (6x6, float64)
#: torch's routine was faster for 1,000 (0.147 against 0.193 ms) and CuPy's from 10,000 (0.482
#: against 0.530 ms; 27.4 against 42.5 ms at a million, ``benchmarks/eigh.py``).
CUPY_MIN_BATCH = 10_000


@functools.cache
def _cupy_sees_gpu() -> bool:
    try:
        import cupy

        return bool(cupy.is_available())
    except Exception:  # not installed, or a broken CUDA install: CuPy is not usable
        return False


def _torch_modes_plain(*, default_device: bool = False) -> bool:
    """Whether this thread has no torch dispatch mode (a FLOP counter's) and no
    ``__torch_function__`` mode, or, with ``default_device``, none other than a default device
    (``torch.device(...)`` as a context, ``torch.set_default_device``)."""
    import torch

    if torch._C._len_torch_dispatch_stack():
        return False
    if not torch._C._len_torch_function_stack():
        return True
    if not default_device:
        return False
    try:
        from torch.overrides import _get_current_function_mode_stack
        from torch.utils._device import DeviceContext
    except ImportError:  # pragma: no cover - another torch layout
        return False
    return all(isinstance(m, DeviceContext) for m in _get_current_function_mode_stack())


def _torch_thread_state_plain() -> bool:
    """Whether this thread has none of torch's per-thread states that work on another thread
    would not see: autocast, inference mode, ``__torch_function__`` modes (a default device
    too), dispatch modes (:func:`_torch_modes_plain`), the profiler. (Grad mode is carried over
    by :func:`in_lanes`.)"""
    import torch

    try:
        autocast = torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")
    except TypeError:  # pragma: no cover - torch < 2.4 (no device argument)
        autocast = torch.is_autocast_cpu_enabled() or torch.is_autocast_enabled()
    return not (
        autocast
        or torch.is_inference_mode_enabled()
        or not _torch_modes_plain()
        or torch._C._autograd._profiler_enabled()
    )


def _torch_plain(*ts: Array) -> bool:
    """Whether tensors ``ts`` may go to another library (CuPy, NumPy) and back: float tensors
    whose result torch need not differentiate (no autograd graph being recorded, no forward-mode
    tangent), outside ``torch.compile`` and ``torch.jit.trace`` tracing and ``torch.func``
    transforms."""
    import torch
    from torch.autograd import forward_ad

    if torch_compiling() or torch._C._are_functorch_transforms_active() or torch.jit.is_tracing():
        return False
    return all(
        type(t) in (torch.Tensor, torch.nn.Parameter)
        and t.dtype in (torch.float32, torch.float64)
        and not (t.requires_grad and torch.is_grad_enabled())
        and not torch._C._functorch.is_functorch_wrapped_tensor(t)
        and forward_ad.unpack_dual(t).tangent is None
        for t in ts
    )


def _eigh_route(a: Array, xp: Namespace) -> str:
    """``"cupy"`` where :func:`eigh` hands torch tensor ``a`` to CuPy, else ``"native"``."""
    if not (is_torch(xp) and a.device.type == "cuda"):
        return "native"
    if TORCH_CUDA_EIGH not in _EIGH_ROUTES:
        raise ValueError(
            f"tr_projections._compat.TORCH_CUDA_EIGH (or TRP_TORCH_CUDA_EIGH) must be one of "
            f"{_EIGH_ROUTES}, got {TORCH_CUDA_EIGH!r}"
        )
    if TORCH_CUDA_EIGH == "torch" or not _torch_plain(a):
        return "native"
    if TORCH_CUDA_EIGH == "auto" and math.prod(tuple(a.shape[:-2])) < CUPY_MIN_BATCH:
        return "native"
    if TORCH_CUDA_EIGH == "cupy" and not _cupy_sees_gpu():
        raise RuntimeError(
            "tr_projections._compat.TORCH_CUDA_EIGH is 'cupy' but CuPy is not installed or sees "
            "no GPU"
        )
    return "cupy" if _cupy_sees_gpu() else "native"


_cupy_streams: dict[tuple[int | None, int], Any] = {}
_cupy_streams_lock = threading.Lock()


def on_device(x: Array, xp: Namespace) -> Any:
    """A context in which new arrays are made on ``x``'s device: CuPy's device context for a
    CuPy array (array_api_compat's CuPy functions ignore ``device=`` and use the current
    device), else nothing."""
    if is_cupy(xp):
        import cupy

        return cupy.cuda.Device(x.device.id)
    return contextlib.nullcontext()


def cupy_stream(cupy: Any, device_id: int | None, pointer: int) -> Any:
    """CuPy's handle of torch's CUDA stream ``pointer`` on ``device_id``, made once per stream
    (CuPy 14's deprecation warning of ``ExternalStream`` silenced then, under a lock: a warnings
    filter entered on every call is not thread-safe)."""
    key = (device_id, pointer)
    stream = _cupy_streams.get(key)
    if stream is None:
        with _cupy_streams_lock:
            stream = _cupy_streams.get(key)
            if stream is None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    stream = cupy.cuda.ExternalStream(pointer)  # (as run on the H100)
                _cupy_streams[key] = stream
    return stream


def eigh_through(a: Array, lib: Any) -> tuple[Array, Array]:
    """``eigh`` of torch tensor ``a`` computed by array library ``lib`` (``from_dlpack`` and
    ``linalg.eigh``), both ways zero-copy through DLPack; the results are torch tensors on
    ``a``'s device. CuPy runs on ``a``'s device and on torch's current stream there."""
    import torch

    a = a.detach().contiguous()  # (torch exports no tensor that requires grad)
    with contextlib.ExitStack() as on_device:
        if a.device.type == "cuda":
            on_device.enter_context(lib.cuda.Device(a.device.index))
            stream = torch.cuda.current_stream(a.device).cuda_stream
            on_device.enter_context(cupy_stream(lib, a.device.index, stream))
        w, U = lib.linalg.eigh(lib.from_dlpack(a))
        return torch.from_dlpack(w), torch.from_dlpack(U)


@_in_turn
def eigh(a: Array, *, xp: Namespace) -> tuple[Array, Array]:
    """``(eigenvalues, eigenvectors)`` of symmetric ``a`` (``(..., d, d)``, one triangle read),
    as ``xp.linalg.eigh``; torch CUDA tensors may go to CuPy (:data:`TORCH_CUDA_EIGH`); batches
    too large for the library's batched routine go in chunks (:data:`TORCH_CUDA_MAX_BATCH`,
    :data:`CUPY_MAX_BATCH`). With the kernels' host build on (``TRP_FUSED_CPU=on``), batches
    of NumPy arrays and plain torch CPU tensors (no autograd graph being recorded, no
    ``torch.func`` transform) with d <= 12 take its Jacobi kernel
    (:func:`tr_projections._small_kernels.eigh`, :data:`~tr_projections._small_kernels.EIGH`)."""
    global _cupy_failed
    from . import _small_kernels

    failure = None
    route = _eigh_route(a, xp)
    if route == "native" and _small_kernels.eigh_applies(a, xp=xp):  # (an option: the kernel)
        return _chunked(
            functools.partial(_kernel_eigh, xp=xp), a, xp=xp,
            parallel_from=_small_kernels.eigh_parallel_from(a.shape[-1]),
        )  # fmt: skip
    if route == "cupy" and not (_cupy_failed and TORCH_CUDA_EIGH == "auto"):
        try:
            import cupy

            return _chunked(lambda x: eigh_through(x, cupy), a, xp=xp, limit=CUPY_MAX_BATCH)
        except Exception as exc:
            if TORCH_CUDA_EIGH != "auto":
                raise
            failure = exc
    # (torch's error, if it fails too)
    w, U = _chunked(
        xp.linalg.eigh, a, xp=xp, parallel_from=_eigh_parallel_from(a.shape[-1]),
        numpy_max_d=NUMPY_EIGH_PARALLEL_MAX_D,
    )  # fmt: skip
    if failure is not None and not isinstance(failure, MemoryError):  # (OOM: this call only)
        # A CuPy that imports and sees the GPU but cannot run this (e.g. built for another
        # CUDA) while torch can: torch's own routine from now on, said once.
        _cupy_failed = True
        warnings.warn(
            f"tr_projections: CuPy's eigh failed on a torch CUDA tensor "
            f"({type(failure).__name__}: {failure}); using torch's eigh from now on "
            f"(TRP_TORCH_CUDA_EIGH=torch silences this)",
            RuntimeWarning,
            stacklevel=2,
        )
    return w, U


def _kernel_eigh(a: Array, *, xp: Namespace) -> tuple[Array, Array]:
    from . import _small_kernels

    out = _small_kernels.eigh(a, xp=xp)
    return out if out is not None else xp.linalg.eigh(a)


@_in_turn
def svd(a: Array, *, xp: Namespace) -> tuple[Array, Array, Array]:
    """The reduced SVD ``(U, s, Vh)`` of ``a`` (``(..., m, n)``), as
    ``xp.linalg.svd(a, full_matrices=False)``, in chunks where :func:`eigh` takes them."""
    U, s, Vh = _chunked(
        lambda x: xp.linalg.svd(x, full_matrices=False), a, xp=xp,
        numpy_max_d=NUMPY_SVD_PARALLEL_MAX_D,
    )  # fmt: skip
    return U, s, Vh


@_in_turn
def qr_r(a: Array, *, xp: Namespace) -> Array:
    """The triangular factor ``R`` of ``a = QR`` (``(..., d, d)``), without forming ``Q`` where
    the library can skip it (NumPy, CuPy, JAX: ``mode="r"``; torch returns an empty ``Q``).
    Batches of CuPy arrays take :func:`householder_r`: CuPy's batched QR calls cuSOLVER once
    per matrix. (On JAX's CPU it was 0.93x of jaxlib's QR for 1e5 6x6 and 3-8x slower at
    d = 17 and 32: ``benchmarks/jax_routes.py``.)"""
    if is_torch(xp):
        import torch

        if a.device.type != "cpu":
            return torch.linalg.qr(a, mode="r")[1]
        fn = lambda x: (torch.linalg.qr(x, mode="r")[1],)  # noqa: E731
        return _chunked(fn, a, xp=xp, parallel_from=PARALLEL_MIN_BATCH_QR)[0]
    if is_cupy(xp) and a.ndim > 2:
        return householder_r(a, xp=xp)
    if is_numpy(xp):
        fn = lambda x: (_native_namespace(xp).linalg.qr(x, mode="r"),)  # noqa: E731
        return _chunked(fn, a, xp=xp, parallel_from=PARALLEL_MIN_BATCH_QR)[0]
    if is_jax(xp) or is_cupy(xp):
        return _native_namespace(xp).linalg.qr(a, mode="r")
    return xp.linalg.qr(a)[1]


@_in_turn
def cholesky(a: Array, *, xp: Namespace) -> Array:
    """The lower Cholesky factor of symmetric positive-definite ``a`` (``xp.linalg.cholesky``,
    one decomposition at a time within :func:`serial_decompositions`)."""
    return xp.linalg.cholesky(a)


#: The positive-definiteness test (:func:`positive_definite`) of torch CPU tensors is split over
#: threads from :data:`PD_PARALLEL_MIN_BATCH` matrices holding at least
#: :data:`PD_PARALLEL_MIN_ENTRIES` entries in all. torch's own threads gain little in
#: ``torch.linalg.cholesky_ex`` of a large batch, where parts at the same time do; for small
#: batches and matrices the hand-off costs about as much as it saves, or more. 2 cores,
#: float64, the split against one call
#: (``benchmarks/results/cpu-2core-r21-root-routes{,-limits}-2026-11-28.md``), split by these
#: limits: 1.09-1.63x as fast for 30,000-100,000 6x6 matrices, 1.17-1.35x for 10,000 and
#: 100,000 17x17, 1.20x for 10,000 32x32, 0.98x for 100,000 4x4; kept whole: 0.33-1.03x for
#: 2x2 (1,000-100,000), 0.75-0.90x for 3x3 (20,000-100,000), 0.75-1.02x for 20,000-50,000 4x4,
#: 0.48x and 0.98x for 1,000 and 10,000 6x6 (but 1.22x for 20,000), 0.75x for 1,000 17x17 and
#: 0.83x for 1,000 32x32.
PD_PARALLEL_MIN_BATCH = 10_000
PD_PARALLEL_MIN_ENTRIES = 1_000_000


def positive_definite(a: Array, *, xp: Namespace) -> Array:
    """Which of the symmetric matrices ``a`` (``(..., d, d)``, lower triangle read) are positive
    definite, as a boolean array of the batch shape: where a Cholesky factorisation succeeds
    with a finite factor, as :func:`cholesky` then does. torch reports each matrix
    (``cholesky_ex``); NumPy and array-api-strict raise for the whole batch, and then (the
    error path only) the batch is halved until each failing matrix is found alone. Other
    libraries return a factor whatever happened (JAX fills a failed one with NaN; CuPy, with
    its default ``linalg="ignore"``, returns a partly factorised matrix), which is tested
    (:func:`factor_holds`). One call for the whole batch where all is well; plain torch CPU
    tensors of enough work (:data:`PD_PARALLEL_MIN_BATCH`) are split over torch's threads
    (:func:`_chunked`)."""
    if is_torch(xp):
        import torch

        def succeeds(x: Array) -> tuple[Array]:
            return (torch.linalg.cholesky_ex(x).info == 0,)

        if a.device.type != "cpu":
            return succeeds(a)[0]
        # (no gradient flows through the test: detached, a leaf's batch may be split too)
        entries = max(1, a.shape[-1]) ** 2
        least = max(PD_PARALLEL_MIN_BATCH, math.ceil(PD_PARALLEL_MIN_ENTRIES / entries))
        return _chunked(succeeds, a.detach(), xp=xp, parallel_from=least)[0]
    try:
        L = cholesky(a, xp=xp)  # (in turn with the others of a traced program)
    except Exception as e:  # (NumPy's and the strict namespace's LinAlgError)
        if type(e).__name__ != "LinAlgError":
            raise
        return _cholesky_succeeds(a, xp=xp)
    if is_numpy(xp):
        return xp.ones(tuple(a.shape[:-2]), dtype=xp.bool)  # (it raises where one is not)
    return factor_holds(a, L, xp=xp)


#: :func:`factor_holds` accepts ``|L L^T - A| <= FACTOR_ULPS * (d + 1) * eps * tr(A)``
#: entrywise: the Cholesky factorisation's backward error is at most about ``(d + 1) eps``
#: times ``sqrt(a_ii a_jj) <= tr(A)`` in each entry, and the input's own asymmetry (the checks
#: allow 16 eps tr(A)) is within it too.
FACTOR_ULPS = 32


def factor_holds(a: Array, L: Array, *, xp: Namespace) -> Array:
    """Per matrix, whether ``L`` (what a library's Cholesky routine returned for the symmetric
    ``a``, ``(..., d, d)``) is a Cholesky factor of it: finite, with a positive diagonal, and
    ``L L^T`` equal to ``a`` up to the factorisation's rounding (:data:`FACTOR_ULPS`). A
    factorisation that stopped at a non-positive pivot and returned the partly factorised
    matrix (cuSOLVER's ``potrf`` through CuPy) fails the last test; NaN fails the first."""
    d = a.shape[-1]
    eps = float(xp.finfo(a.dtype).eps)
    finite = xp.all(xp.isfinite(L), axis=(-2, -1))
    L = xp.where(finite[..., None, None], L, xp.zeros_like(L))  # (no NaN in the product)
    positive = xp.all(xp.linalg.diagonal(L) > 0.0, axis=-1)
    gap = xp.max(xp.abs(matmul(L, xp.matrix_transpose(L), xp=xp) - a), axis=(-2, -1))
    bound = FACTOR_ULPS * (d + 1) * eps * xp.abs(row_sum(xp.linalg.diagonal(a), xp=xp))
    return finite & positive & (gap <= bound)


def _cholesky_succeeds(a: Array, *, xp: Namespace) -> Array:
    # Per matrix, whether the library's Cholesky factorisation (which raises for a whole batch)
    # succeeds: halves of the failing parts, down to single matrices.
    batch = tuple(a.shape[:-2])
    n = math.prod(batch)
    flat = xp.reshape(a, (n, *a.shape[-2:]))
    ok = [True] * n

    def search(lo: int, hi: int) -> None:
        try:
            xp.linalg.cholesky(flat[lo:hi, ...])
        except Exception as e:
            if type(e).__name__ != "LinAlgError":
                raise
            if hi - lo == 1:
                ok[lo] = False
                return
            mid = (lo + hi) // 2
            search(lo, mid)
            search(mid, hi)

    search(0, n)
    return xp.reshape(xp.asarray(ok, dtype=xp.bool), batch)


def householder_r(a: Array, *, xp: Namespace) -> Array:
    r"""The triangular factor ``R`` of ``a = QR`` for a batch of small square matrices
    (``(..., d, d)``), by Householder reflections vectorised over the batch: ``d - 1`` steps of
    about twenty whole-batch operations each, instead of one library call per matrix. Column
    ``k`` of the trailing block is reflected onto :math:`\alpha e_1` with
    :math:`\alpha = -\operatorname{sign}(x_0)\|x\|` (no cancellation), so ``R`` is backward
    stable as LAPACK's is; its diagonal may have either sign. Each column is scaled by its
    largest entry before its norm and reflector are formed, so neither overflows or underflows
    (``x0 - alpha`` of the unscaled column overflowed in float32 near its largest numbers).
    Standard operations only."""
    d = a.shape[-1]
    T = a
    rows = []

    for k in range(d):
        x = T[..., :, 0]  # (..., d - k)
        lead = xp.zeros_like(a[..., 0, :k])
        if k == d - 1:  # a 1x1 block: nothing to reflect
            rows.append(xp.concat([lead, x], axis=-1))
            break
        # The column scaled by its largest entry, so that y0 - alpha_y cannot overflow.
        m = xp.max(xp.abs(x), axis=-1)
        y = x / xp.where(m > 0, m, xp.ones_like(m))[..., None]
        y0 = y[..., 0]
        n = xp.sqrt(xp.sum(y * y, axis=-1))
        alpha_y = xp.where(y0 < 0, n, 0.0 - n)  # (0.0 - n: +0.0 for a zero column)
        alpha = m * alpha_y
        # v = y - alpha_y e1, scaled to unit length (a zero column: no reflection)
        v = xp.concat([(y0 - alpha_y)[..., None], y[..., 1:]], axis=-1)
        vn = xp.sqrt(xp.sum(v * v, axis=-1))  # (v is scaled: |v_0| >= 1 unless v = 0)
        safe = xp.where(vn > 0, vn, xp.ones_like(vn))
        v = xp.where((vn > 0)[..., None], v / safe[..., None], xp.zeros_like(v))
        rest = T[..., :, 1:]  # (..., d - k, d - k - 1)
        w = xp.matmul(v[..., None, :], rest)  # v^T rest: (..., 1, d - k - 1)
        rest = rest - 2.0 * v[..., :, None] * w
        rows.append(xp.concat([lead, alpha[..., None], rest[..., 0, :]], axis=-1))
        T = rest[..., 1:, :]
    return xp.stack(rows, axis=-2)


#: torch CPU tensors' batched products of small square-ish matrices (every dimension of both
#: between :data:`NUMPY_MATMUL_MIN_D` and :data:`NUMPY_MATMUL_MAX_D`, at least
#: :data:`NUMPY_MATMUL_MIN_BATCH` of them) go through NumPy on zero-copy views: torch's batched
#: ``matmul`` of such matrices is several times slower on the CPU (float64, 2 threads, torch over
#: NumPy: 6x6 products 3.7x at 1,000, 3.8x at 10,000, 3.2x at 100,000; 17x17 2-3x; 32x32 2-4x).
#: Thinner products stay with torch, which is as fast or faster there (6x6 by 6x1: 0.4-0.5x;
#: 2x2: 0.5-0.8x).
TORCH_CPU_MATMUL_VIA_NUMPY = True
NUMPY_MATMUL_MIN_D = 4
NUMPY_MATMUL_MAX_D = 32
NUMPY_MATMUL_MIN_BATCH = 1024


def matmul(a: Array, b: Array, *, xp: Namespace) -> Array:
    """``xp.matmul(a, b)``; batches of small torch CPU matrices go through NumPy
    (:data:`TORCH_CPU_MATMUL_VIA_NUMPY`), outside ``torch.compile``, ``torch.func``
    transforms, forward-mode AD and recorded autograd graphs (:func:`_torch_plain`); batched
    JAX products on the CPU with an inner dimension up to :data:`JAX_CPU_SUM_MAX_K` are sums of
    broadcast products."""
    if (
        TORCH_CPU_MATMUL_VIA_NUMPY
        and is_torch(xp)
        and not torch_compiling()  # (before any test dynamo would have to trace)
        and a.ndim >= 3
        and b.ndim >= 2
        and all(
            NUMPY_MATMUL_MIN_D <= n <= NUMPY_MATMUL_MAX_D
            for n in (a.shape[-2], a.shape[-1], b.shape[-1])
        )
        and math.prod(tuple(a.shape[:-2])) >= NUMPY_MATMUL_MIN_BATCH
        and a.dtype == b.dtype
    ):
        import torch

        if all(
            t.device.type == "cpu" and t.layout == torch.strided and not (t.is_neg() or t.is_conj())
            for t in (a, b)
        ) and _torch_plain(a, b):
            threads = functools.partial(split_threads, xp, a)
            return torch.from_numpy(_numpy_matmul(a.numpy(), b.numpy(), threads=threads))
    if is_numpy(xp) and a.ndim >= 3:
        return _numpy_matmul(a, b, threads=functools.partial(split_threads, xp))
    if (
        is_jax(xp)
        and max(a.ndim, b.ndim) >= 3
        and min(a.ndim, b.ndim) >= 2
        and 1 <= a.shape[-1] <= JAX_CPU_SUM_MAX_K
        and a.shape[-1] == b.shape[-2]  # (a mismatch: XLA's dot says so)
        and _jax_on_cpu()
    ):
        # XLA's CPU dot of a batch of small matrices is slow: 23 ms for 1e5 6x6 products, where
        # a sum of d broadcast products (one fused loop) took 3.4 ms; 1.9x faster at d = 17 and
        # 32 (benchmarks/jax_routes.py).
        out = a[..., :, 0, None] * b[..., None, 0, :]
        for k in range(1, a.shape[-1]):
            out = out + a[..., :, k, None] * b[..., None, k, :]
        return out
    return xp.matmul(a, b)


#: NumPy's batched products (also those of torch CPU tensors, :data:`TORCH_CPU_MATMUL_VIA_NUMPY`)
#: of small float32/float64 matrices (every dimension at most :data:`NUMPY_MATMUL_MAX_D`), at
#: least this many multiply-adds, both factors of the same batch shape, run in parts of the first
#: batch axis on :func:`split_threads` threads at once, each part writing its rows of one output
#: (NumPy computes a batch of products on one thread). A factor whose matrices' rows are not
#: contiguous (e.g. a transposed view) is one NumPy multiplies without BLAS, whose parts took
#: longer than one call: each part copies it first, a block of rows
#: (:data:`MATMUL_COPY_BYTES`) at a time, up to :data:`MATMUL_COPY_MAX_D` (copied, larger
#: matrices go to a BLAS kernel that rounds differently from NumPy's own call from d = 12;
#: such products run whole). The result is NumPy's whole call, bit for bit. 100,000 6x6
#: products, 2 threads: contiguous factors 1.55x, ``L @ L.mT`` 2.21x; at 10,000 the
#: contiguous ones lost (0.90x) and ``L @ L.mT`` gained 1.84x (``benchmarks/parallel_rows.py``).
#: 0: never.
MATMUL_PARALLEL_MIN_WORK = 1 << 22
MATMUL_COPY_MAX_D = 8
#: The most bytes of a factor that one part of :func:`_numpy_matmul` copies at a time.
MATMUL_COPY_BYTES = 1 << 20


def _numpy_matmul(a: Any, b: Any, *, threads: Callable[[], int]) -> Any:
    """``numpy.matmul(a, b)``, in parts on ``threads()`` threads at once where
    :data:`MATMUL_PARALLEL_MIN_WORK` says."""
    import numpy as np

    n = a.shape[0]
    if (
        not MATMUL_PARALLEL_MIN_WORK
        or type(a) is not np.ndarray
        or type(b) is not np.ndarray
        or a.ndim != b.ndim
        or a.shape[:-2] != b.shape[:-2]
        or a.shape[-1] != b.shape[-2]
        or n < 2
        or a.dtype != b.dtype
        or a.dtype not in (np.float32, np.float64)
        or max(*a.shape[-2:], b.shape[-1]) > NUMPY_MATMUL_MAX_D
        or math.prod(a.shape) * b.shape[-1] < MATMUL_PARALLEL_MIN_WORK
    ):
        return np.matmul(a, b)
    copy_a, copy_b = (not _rows_contiguous(x) for x in (a, b))
    if (copy_a or copy_b) and max(*a.shape[-2:], b.shape[-1]) > MATMUL_COPY_MAX_D:
        return np.matmul(a, b)
    k = threads()
    if k < 2:
        return np.matmul(a, b)
    out = np.empty(a.shape[:-1] + b.shape[-1:], dtype=a.dtype)
    copied = [x for x, c in ((a, copy_a), (b, copy_b)) if c]
    row = max((int(x.itemsize) * math.prod(x.shape[1:]) for x in copied), default=1)
    step = max(1, MATMUL_COPY_BYTES // max(1, row)) if copied else n

    def part(i: int, j: int) -> None:
        for lo in range(i, j, step):
            hi = min(lo + step, j)
            x, y = a[lo:hi], b[lo:hi]
            np.matmul(
                np.ascontiguousarray(x) if copy_a else x,
                np.ascontiguousarray(y) if copy_b else y,
                out=out[lo:hi],
            )

    if not _in_parts(part, n, k, (a.strides[0], b.strides[0], out.strides[0])):
        return np.matmul(a, b)
    return out


def _rows_contiguous(x: Any) -> bool:
    # Whether the rows of x's matrices are contiguous (what NumPy hands to BLAS).
    size = x.itemsize
    return x.strides[-1] == size and x.strides[-2] == size * x.shape[-1]


#: Largest inner dimension of a batched JAX CPU product written as a sum of broadcast products
#: (:func:`matmul`).
JAX_CPU_SUM_MAX_K = 32


@functools.cache
def _jax_on_cpu() -> bool:
    """Whether JAX computes on the CPU (its default backend; traced arrays carry no device).
    The JAX CPU routes (fused substitution, products as sums) are measured on the CPU only;
    GPUs keep the library's own batched routines."""
    import jax

    return jax.default_backend() == "cpu"


def copy(x: Array, *, xp: Namespace) -> Array:
    """A new C-contiguous array equal to ``x`` (also when ``x`` is a broadcast view, whose copy
    NumPy would otherwise lay out with the broadcast axis innermost). torch: ``clone``
    (``asarray(copy=True)`` of a tensor that requires grad warns, since torch 2.13 changed what
    it returns)."""
    if is_torch(xp):
        import torch

        return x.clone(memory_format=torch.contiguous_format)
    if is_numpy(xp) or is_cupy(xp):
        return _native_namespace(xp).array(x, copy=True, order="C")
    return xp.asarray(x, copy=True)


def maximum(x: Array, y: Array | float, *, xp: Namespace) -> Array:
    """``xp.maximum(x, y)`` of a real array ``x``. With torch and a Python number ``y`` it is
    ``torch.clamp(x, min=y)``, the same values (NaN stays NaN): array-api-compat's ``maximum``
    first turns the number into a tensor of ``torch.result_type(y, x)``, which costs a small
    tensor per call and, under ``torch.compile``, a graph break. (Where ``x`` equals ``y``
    exactly, autograd gives ``x`` the whole gradient, where ``torch.maximum`` gives half.)"""
    if isinstance(y, (int, float)) and is_torch(xp):
        import torch

        return torch.clamp(x, min=y)
    return xp.maximum(x, y)


def minimum(x: Array, y: Array | float, *, xp: Namespace) -> Array:
    """``xp.minimum(x, y)`` of a real array ``x``; with torch and a Python number ``y``,
    ``torch.clamp(x, max=y)`` (see :func:`maximum`)."""
    if isinstance(y, (int, float)) and is_torch(xp):
        import torch

        return torch.clamp(x, max=y)
    return xp.minimum(x, y)


def row_sum(x: Array, *, xp: Namespace) -> Array:
    """The sum over the last axis of a float array. NumPy, and torch on the CPU, compute it as a
    product with a vector of ones (BLAS ``gemv``): their reductions over a short last axis are
    much slower (float64, 100,000 x 6 on 2 threads: NumPy 1.78 ms against 0.13 ms, torch 0.30
    against 0.17; 30,000 x 6: 0.53 against 0.06, 0.13 against 0.05). Same values up to the
    order of the additions."""
    if x.ndim >= 2 and (is_numpy(xp) or (is_torch(xp) and x.device.type == "cpu")):
        return x @ xp.ones(x.shape[-1], dtype=x.dtype, device=device(x))
    return xp.sum(x, axis=-1)


def take_rows(x: Array, index: Array, *, xp: Namespace) -> Array:
    """``x``'s rows (axis 0) at ``index`` (non-negative). torch gathers with ``index_select``
    directly: array-api-compat's ``take`` first maps negative indices with a comparison, an
    addition and a ``where`` over the index (three passes that cost as much as the gather
    itself at 30,000 of 100,000 rows). JAX clips an index past the end to the last row (the
    padding of :func:`nonzero_padded`: a real row, never the NaN of JAX's default ``fill``)."""
    if is_torch(xp):
        return x.index_select(0, index)
    if is_jax(xp):
        return xp.take(x, index, axis=0, mode="clip")
    return xp.take(x, index, axis=0)


def nonzero_padded(mask: Array, *, xp: Namespace) -> Array:
    """The positions of the true entries of the 1-D ``mask``, ascending, then ``len(mask)``
    repeated up to ``len(mask)`` entries: a static shape under ``jax.jit`` (JAX only). The
    padding is past the end: :func:`take_rows` clips it to the last row and :func:`put_rows`
    drops what is put there."""
    n = mask.shape[0]
    return _native_namespace(xp).nonzero(mask, size=n, fill_value=n)[0]


def cond_rows(
    pred: Array, fn: Callable, operands: tuple, like: tuple, rows: int, *, xp: Namespace
) -> tuple:
    """``fn(*operands)`` where the traced JAX scalar ``pred`` is true (``lax.cond``: only one
    branch runs). ``fn`` returns a tuple of arrays (or ``None``s), each with ``rows`` entries
    along its first axis and otherwise the shape and dtype of the same entry of ``like``
    (``fn``'s output for other rows, at least one). Where ``pred`` is false, each entry is the
    first row of ``like``'s repeated: finite values, so that where the ``cond`` becomes a
    ``select`` that runs both branches (``vmap`` with a predicate that differs between the
    mapped elements) nothing downstream computes on zeros, which a KL VJP divides by.

    Decompositions inside ``fn`` keep the order of :func:`serial_decompositions`: the branch
    starts its own chain after the enclosing one's last output (a closed-over operand of the
    ``cond``, so the whole ``cond`` waits for it), and the enclosing chain goes on after the
    branch's last decomposition, which the ``cond`` returns as one more output (a ``select``
    does not wait for the whole branch); no array traced inside the branch leaks out of it."""
    import jax

    box = _serial.get()
    after = None if box is None else box[0]
    jnp = _native_namespace(xp)
    marker = jnp.zeros((1,), dtype=jnp.float32)  # (what the branch's chain ends with)

    def run(*ops: Array) -> tuple:
        with serial_decompositions(after) as last:
            out = tuple(fn(*ops))
        if last[0] is None or math.prod(last[0].shape) == 0:
            return (*out, marker)
        return (*out, jnp.astype(jnp.ravel(last[0])[:1], jnp.float32))

    def skip(*ops: Array) -> tuple:
        out = tuple(
            None if x is None else jnp.broadcast_to(x[:1], (rows,) + tuple(x.shape[1:]))
            for x in like
        )
        return (*out, marker)

    *result, end = jax.lax.cond(pred, run, skip, *operands)
    if box is not None:
        box[0] = end
    return tuple(result)


def put_rows(
    default: Array,
    index: Array,
    mask: Array,
    sub: Array,
    *,
    xp: Namespace,
    add: bool = False,
    owned: bool = False,
) -> Array:
    """A copy of ``default`` (rows along axis 0) with rows ``index`` (ascending, distinct;
    ``mask`` the same rows as a boolean vector) replaced by ``sub``, or increased by it with
    ``add``.

    The standard has no scatter: the fallback gathers every row of ``sub``'s positions and
    selects with ``where``; NumPy, CuPy, torch and JAX write the selected rows into a copy (or,
    for JAX, ``.at[]``), one pass over the batch instead of three. ``owned``: ``default`` is a
    temporary of the caller's own that nobody else sees, so NumPy, CuPy and torch write into it
    instead of a copy (one batch-sized array less at the peak).
    """
    if is_torch(xp):
        if add:
            return default.index_add_(0, index, sub) if owned else default.index_add(0, index, sub)
        return default.index_copy_(0, index, sub) if owned else default.index_copy(0, index, sub)
    if is_jax(xp):  # (a NumPy ``default``, e.g. an incoming cotangent, becomes a JAX array)
        # (an index past the end, :func:`nonzero_padded`'s padding, puts nothing)
        at = xp.asarray(default).at[index]
        kw = {"mode": "drop", "indices_are_sorted": True}
        return at.add(sub, **kw) if add else at.set(sub, **kw)
    if is_numpy(xp) or is_cupy(xp):
        out = default if owned else default.copy()
        if add:
            out[index] += sub  # distinct indices: no repeated-index accumulation is needed
        else:
            out[index] = sub
        return out
    pos = xp.cumulative_sum(xp.astype(mask, xp.int64)) - 1
    gathered = take_rows(sub, xp.maximum(pos, xp.zeros_like(pos)), xp=xp)
    m = xp.reshape(mask, (-1,) + (1,) * (default.ndim - 1))
    return xp.where(m, default + gathered if add else gathered, default)


def _native_namespace(xp: Namespace) -> Namespace:
    # array_api_compat's numpy/cupy wrappers (and jax.numpy itself) accept mode="r" through to
    # the library; the wrapper namespaces do not expose it, the libraries do.
    if is_numpy(xp):
        import numpy

        return numpy
    if is_cupy(xp):
        import cupy

        return cupy
    import jax.numpy

    return jax.numpy


# --------------------------------------------------------------------------- control flow


def _is_traced(x: Array, xp: Namespace) -> bool:
    """Whether the values of ``x`` cannot be inspected (tracing, vmap, compile)."""
    if is_jax(xp):
        import jax

        return isinstance(x, jax.core.Tracer)
    if is_torch(xp):
        if torch_compiling():
            return True
        try:
            from torch._C._functorch import is_batchedtensor, is_functorch_wrapped_tensor

            return bool(is_functorch_wrapped_tensor(x) or is_batchedtensor(x))
        except ImportError:  # pragma: no cover - older torch
            return False
    return False


def eager_any(x: Array, *, xp: Namespace) -> bool | None:
    """``bool(any(x))`` when values can be inspected, ``None`` under tracing."""
    if _is_traced(x, xp):
        return None
    return bool(xp.any(x))


def while_loop(
    cond: Callable[[tuple], Array],
    body: Callable[[tuple], tuple],
    state: tuple,
    *,
    max_iter: int,
    check_every: int = 1,
    shrink: float = 0.0,
    xp: Namespace,
) -> tuple:
    """Run ``body`` until the mask ``cond(state)`` is false everywhere, at most ``max_iter`` times.

    ``cond`` returns a per-element "still running" mask. The body must already leave finished
    elements unchanged (it is written with ``xp.where``), so running it more often than needed is
    harmless. Under JAX tracing (``jit``, ``vmap``, ``grad``) the loop is one ``lax.while_loop``;
    under ``torch.func`` transforms, where the mask cannot be read, it simply runs ``max_iter``
    times; under ``torch.compile`` it is one ``torch.while_loop`` (torch 2.5 and later; before,
    a graph break that runs it eagerly: unrolling ``max_iter`` iterations into the graph takes
    minutes to compile), whose body returns only the entries it changes (the loop's body may
    not return its inputs unchanged). Eager arrays (JAX included,
    which would otherwise compile the loop anew for every shape) read the mask every
    ``check_every`` iterations, one scalar a check.

    ``shrink``: with eager arrays (not JAX's, which would compile its operations anew for each
    count of running rows) whose state is one row per element of a 1-D mask (every state
    array's first axis), the loop goes on with the running rows alone once they are at most this
    fraction of the rows (gathered with ``take``, put back at the end unless the body returned
    the gathered array itself): a few slow rows then no longer cost a pass over the whole batch
    per iteration.
    """
    if is_jax(xp) and _is_traced(state[0], xp):
        from jax import lax

        jcond, jbody = _jax_loop_functions(cond, body, max_iter)
        return lax.while_loop(jcond, jbody, (0, state))[1]
    if is_torch(xp) and torch_compiling():
        import torch

        if not hasattr(torch, "while_loop"):  # (torch < 2.5: a graph break, the loop eager)
            return _torch_eager_loop()(cond, body, state, max_iter, check_every, shrink, xp)
        # Which entries the body passes through unchanged (constant data): they are closed over
        # rather than carried, since the loop's body may not return its inputs. (This trial
        # call's operations are unused: AOT autograd's backends, inductor's among them, drop
        # them; dynamo's "eager" backend runs them.)
        trial = body(state)
        moving = [k for k, (x, y) in enumerate(zip(state, trial, strict=True)) if y is not x]

        def full(carried):
            s = list(state)
            for k, x in zip(moving, carried, strict=True):
                s[k] = x
            return tuple(s)

        def tcond(i, *carried):
            return (i < max_iter) & torch.any(cond(full(carried)))

        def tbody(i, *carried):
            out = body(full(carried))
            return (i + 1, *(out[k] for k in moving))

        start = torch.zeros((), dtype=torch.int64, device=state[0].device)
        out = torch.while_loop(tcond, tbody, (start, *(state[k] for k in moving)))
        return full(out[1:])
    return _eager_loop(cond, body, state, max_iter, check_every, shrink, xp)


def count_true(mask: Array, *, xp: Namespace) -> int | None:
    """How many entries of the boolean ``mask`` are true (one host read), ``None`` under
    tracing (as :func:`eager_any`)."""
    if _is_traced(mask, xp):
        return None
    return int(xp.sum(xp.astype(mask, xp.int32)))


def _eager_loop(
    cond: Callable,
    body: Callable,
    state: tuple,
    max_iter: int,
    check_every: int,
    shrink: float,
    xp: Namespace,
) -> tuple:
    for i in range(max_iter):
        if i % check_every == 0:
            mask = cond(state)  # (unreadable under torch.func: every iteration runs)
            # (eager JAX is not gathered: it would compile anew for each count of rows)
            n = count_true(mask, xp=xp) if shrink and not is_jax(xp) else None
            if n is None:
                if eager_any(mask, xp=xp) is False:
                    break
            elif n == 0:
                break
            elif n <= shrink * mask.shape[0]:
                index = xp.nonzero(mask)[0]
                sub = tuple(take_rows(x, index, xp=xp) for x in state)
                out = _eager_loop(cond, body, sub, max_iter - i, check_every, 0.0, xp)
                # (entries the body passes through unchanged, such as constant data, keep their
                # full arrays: no scatter)
                return tuple(
                    x if y is z else put_rows(x, index, mask, y, xp=xp)
                    for x, z, y in zip(state, sub, out, strict=True)
                )
        state = body(state)
    return state


_TORCH_EAGER_LOOP: list[Callable] = []


def _torch_eager_loop() -> Callable:
    # Created once, lazily (torch is imported only when used); a plain list rather than
    # lru_cache, which dynamo warns about when it traces through it.
    if not _TORCH_EAGER_LOOP:
        import torch

        _TORCH_EAGER_LOOP.append(torch.compiler.disable(_eager_loop))
    return _TORCH_EAGER_LOOP[0]


@functools.lru_cache(maxsize=64)
def _jax_loop_functions(cond: Callable, body: Callable, max_iter: int) -> tuple[Callable, Callable]:
    # Stable function objects let lax.while_loop reuse its trace across calls with equal shapes.
    import jax.numpy as jnp

    def jcond(carry):
        i, s = carry
        return (i < max_iter) & jnp.any(cond(s))

    def jbody(carry):
        i, s = carry
        with serial_decompositions():  # (a chain of its own: nothing traced here leaks out)
            return i + 1, body(s)

    return jcond, jbody


def readable(x: Array, *, xp: Namespace) -> Array:
    """``x`` with its values where they are known, so that the value checks can read them:

    - a JAX tracer of an eager transform (the arguments of a function that an eager
      ``jax.grad``, ``jax.vjp`` or ``jax.jvp`` calls) comes back as the concrete array of its
      values (``jax.lax.stop_gradient`` returns it), and so does a tracer of an eager
      ``jax.vmap`` (nested ones, and ``grad`` inside or around them, too): the values stacked
      over the mapped axes, which come first, as for ``torch.func.vmap`` below
      (:func:`_jax_values`); a tracer of ``jit`` stays one;
    - a tensor of ``torch.func`` transforms (``vmap``, ``grad``, ``jvp``, nested) outside
      ``torch.compile`` comes back as the plain tensor that holds its values: under ``vmap``
      the arguments stacked over the mapped axes, which come first (innermost ``vmap`` next to
      the argument's own axes), so the trailing axes are still the argument's;
    - anything else is returned as it is."""
    if is_jax(xp):
        import jax

        if isinstance(x, jax.core.Tracer):
            return _jax_values(jax.lax.stop_gradient(x))
    elif is_torch(xp):
        return _torch_values(x)
    return x


def jax_batched(x: Any) -> tuple[list, Any]:
    """``(axes, values)`` of a JAX tracer of eager ``jax.vmap`` calls: the mapped axis of each
    ``vmap`` (the outermost first; ``None`` where it does not map ``x``) and the concrete array
    under the batch tracers, or ``([], None)`` where there is none (no batch tracer, a ``jit``
    trace underneath, a kind of batching this does not know). Read from the tracers'
    ``batch_dim`` and ``val``, which JAX's batch tracers have and its other tracers do not;
    should that change, this finds no values, and the callers act as before it existed."""
    import jax

    axes, v = [], x
    while isinstance(v, jax.core.Tracer) and hasattr(v, "batch_dim"):
        axes.append(v.batch_dim)
        v = getattr(v, "val", None)
    known = all(a is None or isinstance(a, int) for a in axes)
    if not axes or not known or isinstance(v, jax.core.Tracer) or not hasattr(v, "shape"):
        return [], None
    return axes[::-1], v  # (the outermost vmap's tracer is the innermost wrapper)


def _jax_values(x: Array) -> Array:
    """The concrete values under the batch tracers of eager ``jax.vmap`` calls, the mapped axes
    moved first (the outermost ``vmap``'s first; an argument that a ``vmap`` does not map has
    no axis of it), or ``x`` itself where no such values exist (:func:`jax_batched`)."""
    import jax

    axes, v = jax_batched(x)
    if v is None:
        return x
    moved = 0
    for axis in axes:
        if axis is not None:
            v = jax.numpy.moveaxis(v, moved + axis, moved)
            moved += 1
    return v


def _torch_values(x: Array) -> Array:
    # The plain tensor under a torch.func transform's wrappers (see readable).

    try:
        from torch._C import _functorch as ft
    except ImportError:  # pragma: no cover - older torch
        return x
    if torch_compiling():
        return x
    while ft.is_batchedtensor(x) or ft.is_functorch_wrapped_tensor(x):
        if ft.is_batchedtensor(x):
            values, axis = ft._unwrap_batched(x, ft.maybe_get_level(x))
            x = values.movedim(axis, 0)
        else:
            x = ft.get_unwrapped(x)
    return x


def stop_gradient(x: Array, *, xp: Namespace) -> Array:
    """``x`` with gradients blocked in libraries that have autodiff; ``x`` itself elsewhere."""
    if is_torch(xp):
        return x.detach()
    if is_jax(xp):
        import jax

        return jax.lax.stop_gradient(x)
    return x
