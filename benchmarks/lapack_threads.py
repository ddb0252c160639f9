"""Batched decompositions split over threads against one call, torch CPU and NumPy.

torch's CPU and NumPy's batched ``eigh``, SVD and QR call LAPACK for one matrix after another on
the calling thread. ``tr_projections._compat`` splits batches of at least
``PARALLEL_MIN_BATCH`` matrices (``PARALLEL_MIN_BATCH_QR`` for QR) into one part per thread and
decomposes the parts at the same time (``_compat.LAPACK_THREADS``, see docs/backends.md). This
script times the wrappers (``_compat.eigh``, ``_compat.svd``, ``_compat.qr_r``) with the split
off (``LAPACK_THREADS = 1``) and on (the automatic thread count), on the same seeded float64
data, interleaved round by round, and prints the medians and their ratio with the machine. The
split is forced for every batch and size asked for up to ``PARALLEL_MAX_D`` (where NumPy's
OpenBLAS is left alone in lanes, the package splits NumPy's ``eigh`` and SVD only up to
``NUMPY_EIGH_PARALLEL_MAX_D`` and ``NUMPY_SVD_PARALLEL_MAX_D``, as measured here). The parts
run as the package runs them: with OpenBLAS on one thread while they do
(``ONE_BLAS_THREAD_IN_LANES``); ``--blas-alone`` adds a column of the split with OpenBLAS left
alone (its own thread count in every part), timed in the same rounds. OpenBLAS's threads keep
spinning for a while after a call that used them (NumPy's ``eigh`` and SVD from about 26x26),
so a variant timed after such a call finds a core taken: ``OPENBLAS_NUM_THREADS=1`` in the
environment times the split without them
(``benchmarks/results/cpu-2core-r19-lapack-threads-2026-11-28.md``):

    python benchmarks/lapack_threads.py                         # d = 6, B = 128 ... 1e5
    python benchmarks/lapack_threads.py --dims 6,17 --batches 1e3,1e4 --backends torch
    python benchmarks/lapack_threads.py --dims 24,32,48 --backends numpy --blas-alone

The matrices are random symmetric positive definite with eigenvalues log-uniform in [0.1, 10]
(SVD: their Cholesky factors), like the covariances of ``run.py``.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # (the checkout; this folder is on the path already)

from _worker import interleaved_ms, machine_line  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", default="6")
    ap.add_argument("--batches", default="128,256,512,1024,4096,1e4,1e5")
    ap.add_argument("--backends", default="torch,numpy")
    ap.add_argument("--ops", default="eigh,svd,qr")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument(
        "--blas-alone", action="store_true",
        help="also time the split with OpenBLAS's own thread count in every part",
    )  # fmt: skip
    args = ap.parse_args(argv)

    from tr_projections import _compat

    backends = args.backends.split(",")
    namespaces = {}
    if "torch" in backends:
        import array_api_compat.torch as xpt
        import torch

        namespaces["torch"] = (xpt, torch.from_numpy)
    if "numpy" in backends:
        import array_api_compat.numpy as xpn

        namespaces["numpy"] = (xpn, lambda a: a)
    versions = f"numpy {np.__version__}"
    if "torch" in namespaces:
        versions += f", torch {torch.__version__} ({torch.get_num_threads()} threads)"
    auto = {name: _compat._lapack_threads(conv(np.eye(2)[None]), xp) for name, (xp, conv) in
            namespaces.items()}  # fmt: skip
    print(machine_line(versions))
    print(f"# parts when split: {auto}; float64, median ms of {args.rounds} interleaved rounds")
    counts = [get() for get, _ in _compat._openblas_controls()]
    print(f"# OpenBLAS loaded with a settable thread count: {counts or 'none'} thread(s)")
    if args.blas_alone and not _compat._blas_controlled():
        print("# (lanes leave OpenBLAS alone here: both split columns run the same way)")
    if args.blas_alone:
        print(
            "| backend | op | d | B | one call | split, BLAS alone | split | speed-up "
            "| speed-up, BLAS alone |"
        )
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    else:
        print("| backend | op | d | B | one call | split | speed-up |")
        print("|---|---|---:|---:|---:|---:|---:|")
    ops = {
        "eigh": lambda a, xp: _compat.eigh(a, xp=xp),
        "svd": lambda a, xp: _compat.svd(a, xp=xp),
        "qr": lambda a, xp: _compat.qr_r(a, xp=xp),
    }

    def decompose(threads, one_blas, fn, a, xp):  # (1: one call; 0: split as configured)
        _compat.LAPACK_THREADS = threads
        _compat.ONE_BLAS_THREAD_IN_LANES = one_blas
        fn(a, xp)

    rng = np.random.default_rng(0)
    numpy_limits = ("NUMPY_EIGH_PARALLEL_MAX_D", "NUMPY_SVD_PARALLEL_MAX_D")
    names = (
        "LAPACK_THREADS",
        "PARALLEL_MIN_BATCH",
        "PARALLEL_MIN_BATCH_QR",
        "ONE_BLAS_THREAD_IN_LANES",
    )
    saved = {k: getattr(_compat, k) for k in names + numpy_limits if hasattr(_compat, k)}
    try:
        # (thresholds at 2, and NumPy's sizes at the package's largest: every batch below is
        # split when "split" is asked for, whatever the package itself would do)
        _compat.PARALLEL_MIN_BATCH = _compat.PARALLEL_MIN_BATCH_QR = 2
        for k in numpy_limits:
            if k in saved:
                setattr(_compat, k, _compat.PARALLEL_MAX_D)
        for d in [int(x) for x in args.dims.split(",")]:
            for B in [int(float(x)) for x in args.batches.split(",")]:
                q, _ = np.linalg.qr(rng.standard_normal((B, d, d)))
                w = np.exp(rng.uniform(np.log(0.1), np.log(10.0), (B, 1, d)))
                spd = (q * w) @ np.swapaxes(q, -1, -2)
                spd = 0.5 * (spd + np.swapaxes(spd, -1, -2))
                chol = np.linalg.cholesky(spd)
                for name, (xp, conv) in namespaces.items():
                    for op in args.ops.split(","):
                        a = conv(chol if op == "svd" else spd)
                        variants = [(1, True), (0, True)] + [(0, False)] * args.blas_alone
                        calls = {
                            v: functools.partial(decompose, *v, ops[op], a, xp) for v in variants
                        }
                        t = interleaved_ms(calls, args.rounds)
                        one, split = t[(1, True)], t[(0, True)]
                        row = f"| {name} | {op} | {d} | {B:,} | {one:.3f} | "
                        if args.blas_alone:
                            alone = t[(0, False)]
                            row += f"{alone:.3f} | {split:.3f} | {one / split:.2f}× | "
                            row += f"{one / alone:.2f}× |"
                        else:
                            row += f"{split:.3f} | {one / split:.2f}× |"
                        print(row, flush=True)
    finally:
        for k, v in saved.items():
            setattr(_compat, k, v)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
