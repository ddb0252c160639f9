"""torch's CPU kernels in chunks of rows (``tr_projections.backends.torch.CHUNK_ROWS``): time and
peak extra memory of forward + backward for each chunk size, every measurement in its own
process (the allocator's state of one variant must not carry over to the next), interleaved.

    python benchmarks/torch_chunks.py                          # 0 (one call) against 65,536
    python benchmarks/torch_chunks.py --chunk-rows 0,65536,32768 --quantile 0 --reps 3

Prints the machine, the settings and a table of medians (time) and the peak extra memory over the
input's size (``_worker.TorchBackend.memory``: torch's profiler allocation events, plus the NumPy
route's tracemalloc peak); ``--json`` keeps every run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def child(args: argparse.Namespace) -> None:
    """One measurement: the cell's data, warm-up, ``--runs`` timed calls, then the memory."""
    sys.path[:0] = [str(REPO), str(HERE)]
    from _worker import TorchBackend, bounds_for, make_data

    from tr_projections.backends import torch as adapter

    adapter.CHUNK_ROWS = args.child_rows
    adapter.CHUNKED = (args.methods,)  # (any method, Frobenius too, which runs whole by default)
    data = make_data(args.kind, args.d, args.batch, seed=1)
    eps_mean, eps_cov, _ = bounds_for(data, args.methods, args.quantile)
    backend = TorchBackend("torch", args.threads)
    prep = backend.prepare(
        data["arrays"], data["cotangents"], "backward", args.methods, eps_mean, eps_cov
    )
    prep.sync(prep.call())
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        prep.sync(prep.call())
        times.append(time.perf_counter() - t0)
    peak, _ = backend.memory(prep)
    size = sum(a.nbytes for a in data["arrays"])
    print(json.dumps({"median_s": statistics.median(times), "memory_x": peak / size}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chunk-rows", default="0,65536", help="comma list; 0: one call")
    p.add_argument("--methods", default="kl,frobenius,wasserstein", help="comma list")
    p.add_argument("--kind", default="full", choices=("diag", "full"))
    p.add_argument("--d", type=int, default=6)
    p.add_argument("--batch", type=int, default=100_000)
    p.add_argument("--quantile", type=float, default=0.7, help="bound quantile (0: all projected)")
    p.add_argument("--reps", type=int, default=5, help="processes per variant")
    p.add_argument("--runs", type=int, default=5, help="timed calls per process")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    p.add_argument("--child-rows", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_rows is not None:
        child(args)
        return 0
    chunks = [int(c) for c in args.chunk_rows.split(",")]
    methods = args.methods.split(",")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    print(
        f"# {platform.platform()}, {os.cpu_count()} CPUs, python {platform.python_version()}; "
        f"{args.kind} d={args.d} B={args.batch:,} quantile={args.quantile} fwd+bwd float64, "
        f"{args.threads} threads, {args.reps} processes x {args.runs} calls per variant"
    )
    runs: list[dict] = []
    for rep in range(args.reps):
        for method in methods:
            for rows in chunks:
                cmd = [sys.executable, __file__, "--child-rows", str(rows), "--methods", method]
                for k in ("kind", "d", "batch", "quantile", "runs", "threads"):
                    cmd += [f"--{k}", str(getattr(args, k))]
                out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
                cell = json.loads(out.stdout.strip().splitlines()[-1])
                cell.update(method=method, chunk_rows=rows, rep=rep)
                runs.append(cell)
                ms = cell["median_s"] * 1e3
                print(f"#   {method} chunk_rows={rows}: {ms:.0f} ms", flush=True)
    print("\n| method | chunk rows | median ms (processes) | peak extra memory |")
    print("|---|---:|---:|---:|")
    for method in methods:
        for rows in chunks:
            cells = [c for c in runs if c["method"] == method and c["chunk_rows"] == rows]
            med = statistics.median(c["median_s"] for c in cells) * 1e3
            mem = statistics.median(c["memory_x"] for c in cells)
            print(f"| {method} | {rows:,} | {med:.0f} ({len(cells)}) | {mem:.2f}x |")
    if args.json:
        result = {"settings": vars(args), "runs": runs}
        args.json.write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
