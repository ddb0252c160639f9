"""Chunks of a large eager CPU projection on several threads at once, against one after another.

Eager NumPy projections of more than ``_common.CHUNK_ROWS`` states, and KL and W2 projections of
torch CPU tensors of more than the torch adapter's ``CHUNK_ROWS``, run in chunks of rows. From
``_common.PARALLEL_MIN_NUMBERS`` numbers in the scale, the chunks run on several threads at once
(``_common.lanes``; the threads of ``_compat.split_threads``). This script times the public
calls as ``run.py``'s workers make them (``trp.project`` and ``trp.vjp`` for NumPy;
``trp.project`` and ``backward()`` for torch, the new policy requiring grad) with the lanes off
(``PARALLEL_MIN_NUMBERS = 0``) and on (the shipped value), on ``run.py``'s data and bounds,
interleaved round by round in one process, and prints the medians, their ratio and the machine:

    python benchmarks/lanes.py                              # d = 6, B = 1e4, 3e4, 1e5
    python benchmarks/lanes.py --backends numpy --kinds diag --batches 5e4,1e5,3e5
    python benchmarks/lanes.py --quick                      # one small cell per backend (CI)
    python benchmarks/lanes.py --backends numpy --kinds diag --methods kl --batches 1e5 \
        --chunk-rows 4096 --min-numbers 24576               # short chunks: the GIL's share

``--chunk-rows`` sets both chunk lengths (NumPy's ``_common.CHUNK_ROWS`` and the torch adapter's
``CHUNK_ROWS``) for both settings, and ``--min-numbers`` the value of ``PARALLEL_MIN_NUMBERS`` with
the lanes on.

The last column says whether the first call of each setting gave the same outputs (forward
rows) or new policy's cotangents (forward + backward rows) bit for bit. The lanes run the chunks
of the setting "in turn" at the same time, which gives the same bits (``tests/test_lanes.py``
checks every output and cotangent on small batches); but the lanes' chunks are shorter than
those in turn, and where a routine's rounding depends on how many rows it is given (BLAS
kernels at d = 17 and up, seen here) the two settings may differ in the last bits.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # (the checkout; this folder is on the path already)

from _worker import bounds_for, interleaved_ms, machine_line, make_backend, make_data  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="numpy,torch")
    ap.add_argument("--methods", default="kl,frobenius,wasserstein")
    ap.add_argument("--kinds", default="diag,full")
    ap.add_argument("--dims", default="6")
    ap.add_argument("--batches", default="1e4,3e4,1e5")
    ap.add_argument("--modes", default="forward,backward", help="forward, forward + backward")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (0: leave alone)")
    ap.add_argument("--seed", type=int, default=20210503)
    ap.add_argument("--chunk-rows", type=int, help="both chunk lengths (default: as shipped)")
    ap.add_argument("--min-numbers", type=int, help="PARALLEL_MIN_NUMBERS with the lanes on")
    ap.add_argument("--quick", action="store_true", help="one small cell per backend (CI)")
    args = ap.parse_args(argv)
    if args.quick:
        args.methods, args.kinds, args.batches, args.rounds = "kl", "full", "2000", 1

    from tr_projections.backends import _common

    makers = {}  # (run.py's workers' calls: _worker.NumpyLike, _worker.TorchBackend)
    versions = f"numpy {np.__version__}"
    for name in args.backends.split(","):
        if name not in ("numpy", "torch"):
            raise SystemExit(f"--backends: numpy or torch, not {name!r}")
        makers[name] = make_backend(name, args.threads)
        if name == "torch":
            import torch

            versions += f", torch {torch.__version__} ({torch.get_num_threads()} threads)"
    shipped = _common.PARALLEL_MIN_NUMBERS
    chunks = {"numpy": _common.CHUNK_ROWS}
    if "torch" in makers:
        from tr_projections.backends import torch as adapter

        chunks["torch"] = adapter.CHUNK_ROWS
    if args.chunk_rows is not None:
        _common.CHUNK_ROWS = args.chunk_rows
        if "torch" in makers:
            adapter.CHUNK_ROWS = args.chunk_rows
    on_value = 1 if args.quick else shipped if args.min_numbers is None else args.min_numbers
    from tr_projections import _compat

    threads = _compat.LAPACK_THREADS
    if args.quick:
        _compat.LAPACK_THREADS = 2  # (two lanes whatever the machine has)
    print(machine_line(versions))
    print(
        f"# lanes on: PARALLEL_MIN_NUMBERS = {on_value:,}"
        + (" (--quick: every cell split, in two lanes)" if args.quick else "")
        + f"; chunk rows (NumPy, torch): {_common.CHUNK_ROWS:,}"
        + (f", {adapter.CHUNK_ROWS:,}" if "torch" in makers else "")
        + f"; float64, median ms of {args.rounds} interleaved rounds"
    )
    print("| backend | method | kind | d | B | mode | in turn | lanes | speed-up | same bits |")
    print("|---|---|---|---:|---:|---|---:|---:|---:|---|")
    try:
        for d in [int(x) for x in args.dims.split(",")]:
            for kind in args.kinds.split(","):
                for B in [int(float(x)) for x in args.batches.split(",")]:
                    data = make_data(kind, d, B, args.seed)
                    for method in args.methods.split(","):
                        eps_mean, eps_cov, _ = bounds_for(data, method)
                        for name, backend in makers.items():
                            for mode in args.modes.split(","):
                                call = backend.prepare(
                                    data["arrays"], data["cotangents"], mode, method,
                                    eps_mean, eps_cov,
                                ).call  # fmt: skip

                                def setting(value, call=call):
                                    _common.PARALLEL_MIN_NUMBERS = value
                                    return call()

                                outs = {v: setting(v) for v in (0, on_value)}
                                same = all(
                                    np.array_equal(np.asarray(a), np.asarray(b))
                                    for a, b in zip(outs[0], outs[on_value], strict=True)
                                )
                                del outs
                                t = interleaved_ms(
                                    {v: (lambda v=v, s=setting: s(v)) for v in (0, on_value)},
                                    args.rounds,
                                )
                                label = "fwd" if mode == "forward" else "fwd+bwd"
                                print(
                                    f"| {name} | {method} | {kind} | {d} | {B:,} | {label} | "
                                    f"{t[0]:.2f} | {t[on_value]:.2f} | "
                                    f"{t[0] / t[on_value]:.2f}× | {'yes' if same else 'NO'} |",
                                    flush=True,
                                )
    finally:
        _common.PARALLEL_MIN_NUMBERS = shipped
        _compat.LAPACK_THREADS = threads
        _common.CHUNK_ROWS = chunks["numpy"]
        if "torch" in chunks:
            adapter.CHUNK_ROWS = chunks["torch"]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
