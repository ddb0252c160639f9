"""The pieces of a full-covariance projection on the GPU, each route against the others, on a
device machine (CuPy and torch CUDA, float64, d = 6 unless given):

- the value checks' reductions: the minimum of a batch of factors' diagonals (a strided view)
  in one reduction and in two (rows first), of a contiguous ``(B, d)`` array, and the
  ``all`` over ``(B, d, d)`` entries;
- triangular solves ``(B, d, d) x (B, d, k)`` for k = d and k = 1: CuPy's batched LU solve
  (``cupy.linalg.solve``), cuBLAS's batched ``trsm`` (``cupyx.scipy.linalg.solve_triangular``),
  torch's ``solve_triangular``, and the package's kernel (``_small_kernels.solve_triangular``);
- the Cholesky factor of a Gram matrix: the Householder passes over the batch
  (``_compat.householder_r``, CuPy) or torch's QR, then signs and a transpose, against the
  package's kernel (``_small_kernels.gram_cholesky``).

    python benchmarks/gpu_small.py [--batches 500000,1000000] [--d 6] [--rounds 15]

Prints the machine, the versions and one line per piece and route: the median milliseconds of
``--rounds`` synchronised calls timed in turn (``_worker.interleaved_ms``), and each route's
largest difference from the first route of its piece.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _worker as w


def _pieces(batch: int, d: int):
    import cupy
    import cupyx.scipy.linalg as csl
    import numpy as np
    import torch

    from tr_projections import _compat
    from tr_projections import _small_kernels as sk
    from tr_projections.gaussian import cholesky_of_gram

    cxp = _compat.array_namespace(cupy.zeros(1))
    txp = _compat.array_namespace(torch.zeros(1))
    rng = np.random.default_rng(0)
    m = rng.standard_normal((batch, d, d))
    a = np.tril(m) + 3.0 * np.eye(d)
    b = rng.standard_normal((batch, d, d))
    M, A, B = (cupy.asarray(x) for x in (m, a, b))
    Mt, At, Bt = (torch.as_tensor(x, device="cuda") for x in (m, a, b))
    diag = cupy.diagonal(A, 0, -2, -1)
    flat = cupy.ascontiguousarray(A[..., 0])

    def cupy_sync(fn):
        return lambda: (fn(), cupy.cuda.get_current_stream().synchronize())[0]

    def torch_sync(fn):
        return lambda: (fn(), torch.cuda.synchronize())[0]

    def householder(x):  # the route before the kernel: R by passes, signed rows, transposed
        R = _compat.householder_r(x, xp=cxp)
        r = cupy.diagonal(R, 0, -2, -1)[..., :, None]
        return cupy.swapaxes(R * cupy.where(r < 0, -1.0, 1.0), -1, -2)

    def torch_qr(x):
        R = torch.linalg.qr(x, mode="r")[1]
        return (R * torch.where(R.diagonal(0, -2, -1) < 0, -1.0, 1.0)[..., :, None]).mT

    pieces = {
        "min of diagonals (strided view)": {
            "cupy one reduction": cupy_sync(lambda: diag.min()),
            "cupy rows first": cupy_sync(lambda: diag.min(axis=-1).min()),
        },
        f"min of a contiguous (B, {d})": {"cupy": cupy_sync(lambda: flat.min())},
        f"all(|L| <= limit) over (B, {d}, {d})": {
            "cupy": cupy_sync(lambda: cupy.all(cupy.abs(A) <= 1e150)),
            "cupy rows first": cupy_sync(
                lambda: cupy.all(cupy.all(cupy.abs(A) <= 1e150, axis=(-2, -1)))
            ),
        },
        f"trsm k={d}": {
            "cupy LU": cupy_sync(lambda: cupy.linalg.solve(A, B)),
            "cupy cublas trsmBatched": cupy_sync(lambda: csl.solve_triangular(A, B, lower=True)),
            "cupy kernel": cupy_sync(lambda: sk.solve_triangular(A, B, lower=True, xp=cxp)),
            "torch": torch_sync(lambda: torch.linalg.solve_triangular(At, Bt, upper=False)),
            "torch kernel": torch_sync(lambda: sk.solve_triangular(At, Bt, lower=True, xp=txp)),
        },
        "trsm k=1": {
            "cupy LU": cupy_sync(lambda: cupy.linalg.solve(A, B[..., :1])),
            "cupy cublas trsmBatched": cupy_sync(
                lambda: csl.solve_triangular(A, B[..., :1], lower=True)
            ),
            "cupy kernel": cupy_sync(
                lambda: sk.solve_triangular(A, B[..., :1], lower=True, xp=cxp)
            ),
            "torch": torch_sync(
                lambda: torch.linalg.solve_triangular(At, Bt[..., :1], upper=False)
            ),
            "torch kernel": torch_sync(
                lambda: sk.solve_triangular(At, Bt[..., :1], lower=True, xp=txp)
            ),
        },
        "trsm k=d, transposed A (upper)": {
            "cupy LU": cupy_sync(lambda: cupy.linalg.solve(cupy.swapaxes(A, -1, -2), B)),
            "cupy kernel": cupy_sync(
                lambda: sk.solve_triangular(cupy.swapaxes(A, -1, -2), B, lower=False, xp=cxp)
            ),
            "torch": torch_sync(lambda: torch.linalg.solve_triangular(At.mT, Bt, upper=True)),
            "torch kernel": torch_sync(lambda: sk.solve_triangular(At.mT, Bt, lower=False, xp=txp)),
        },
        "cholesky of the Gram": {
            "cupy Householder passes": cupy_sync(lambda: householder(M)),
            "cupy kernel": cupy_sync(lambda: sk.gram_cholesky(M, xp=cxp)),
            "cupy cholesky_of_gram (as shipped)": cupy_sync(lambda: cholesky_of_gram(M, xp=cxp)),
            "torch QR": torch_sync(lambda: torch_qr(Mt)),
            "torch kernel": torch_sync(lambda: sk.gram_cholesky(Mt, xp=txp)),
        },
    }
    return pieces


def _as_numpy(x):
    if hasattr(x, "get"):
        return x.get()
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="500000,1000000")
    ap.add_argument("--d", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    import cupy
    import numpy as np
    import torch

    versions = f"torch {torch.__version__}, CuPy {cupy.__version__}, CUDA device " + (
        torch.cuda.get_device_name()
    )
    print(w.machine_line(versions))
    for batch in (int(b) for b in args.batches.split(",")):
        for piece, fns in _pieces(batch, args.d).items():
            ms = w.interleaved_ms(fns, args.rounds)
            first = None
            for route, fn in fns.items():
                out = np.asarray(_as_numpy(fn()), dtype=np.float64)
                if first is None:
                    first = out
                diff = float(np.max(np.abs(out - first)))  # (every route: the same quantity)
                print(
                    f"B={batch:>8} d={args.d} {piece:<40} {route:<36} {ms[route]:9.3f} ms"
                    f"  max |diff| {diff:.2e}"
                )


if __name__ == "__main__":
    main()
