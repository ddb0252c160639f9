"""A/B of this checkout against a git revision, each measurement in a fresh process.

    python benchmarks/fresh.py REF --kind diag --method kl --batch 100000 [--procs 3] [--calls 25]

``ab.py`` alternates both versions in one process, which resolves small differences in compute;
but the C allocator's state (which freed blocks it keeps, which it returns to the system and
faults in again on the next call) then carries over from one version to the other and can
decide the comparison. Here every (version, repeat) pair runs in a process of its own, in
alternation: a warm-up of 3 calls, then ``--calls`` timed forward + backward calls of torch
tensors through autograd (the user's view: the adapter picks its route). Prints the median of
the per-process medians, their range, and the page faults per call (``ru_minflt``), with the
machine and thread count. ``--route torch`` forces torch's own kernels in both versions (the
adapter's NumPy route off), ``--route numpy`` the NumPy route at any size.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

_CHILD = r"""
import json, os, resource, sys, time
sys.path.insert(0, os.environ["TRP_PATH"])
sys.path.insert(1, os.environ["TRP_BENCH"])
import numpy as np
import torch
from _worker import bounds_for, limit_threads, make_data
threads = int(os.environ["TRP_THREADS"])
limit_threads(threads)
torch.set_num_threads(threads)
import tr_projections as trp
import tr_projections.backends.torch as adapter
route = os.environ["TRP_ROUTE"]
if route == "torch":
    adapter.NUMPY_MAX_ELEMENTS = 0
elif route == "numpy":
    adapter.NUMPY_MAX_ELEMENTS = 1 << 40
kind, method = os.environ["TRP_KIND"], os.environ["TRP_METHOD"]
dim, batch = int(os.environ["TRP_DIM"]), int(os.environ["TRP_BATCH"])
data = make_data(kind, dim, batch, 0)
eps_mean, eps_cov, frac = bounds_for(data, method, float(os.environ["TRP_QUANTILE"]))
x = [torch.tensor(a, requires_grad=i < 2) for i, a in enumerate(data["arrays"])]
g = [torch.tensor(a) for a in data["cotangents"]]

def call():
    out = trp.project(*x, method=method, eps_mean=eps_mean, eps_cov=eps_cov)
    torch.autograd.backward(list(out), g)
    for t in x[:2]:
        t.grad = None

for _ in range(3):
    call()
times = []
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(int(os.environ["TRP_CALLS"])):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
print(json.dumps({"median": float(np.median(times)), "faults": faults / len(times), "frac": frac}))
"""


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(HERE))
    from ab import cell_arguments, extract, thread_environment

    ap = cell_arguments(__doc__, kind="diag", batch=100000)
    ap.add_argument("--procs", type=int, default=3, help="fresh processes per version")
    ap.add_argument("--calls", type=int, default=25, help="timed calls per process")
    ap.add_argument("--route", choices=("auto", "torch", "numpy"), default="auto")
    args = ap.parse_args(argv)

    tmp = extract(args.ref, "trp_fresh_")
    env = thread_environment(args.threads, dict(os.environ))
    env.update(
        TRP_BENCH=str(HERE), TRP_THREADS=str(args.threads), TRP_ROUTE=args.route,
        TRP_KIND=args.kind, TRP_METHOD=args.method, TRP_DIM=str(args.dim),
        TRP_BATCH=str(args.batch), TRP_QUANTILE=str(args.quantile), TRP_CALLS=str(args.calls),
    )  # fmt: skip
    paths = {"this checkout": str(ROOT), args.ref: str(tmp)}
    runs: dict[str, list[dict]] = {v: [] for v in paths}
    try:
        for _ in range(args.procs):
            for version, path in paths.items():
                proc = subprocess.run(
                    [sys.executable, "-c", _CHILD], env={**env, "TRP_PATH": path},
                    capture_output=True, text=True,
                )  # fmt: skip
                if proc.returncode != 0:
                    print(f"# {version}: the measuring process failed:\n{proc.stderr}")
                    return 1
                runs[version].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    import numpy as np

    print(
        f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{args.threads} threads, OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']}; {platform.platform()}"
    )
    print(
        f"# {args.method} {args.kind} d={args.dim} B={args.batch}, forward + backward, torch "
        f"tensors, route {args.route}, bounds at quantile {args.quantile} "
        f"({runs[args.ref][0]['frac']:.0%} projected); {args.procs} fresh processes per version "
        f"x {args.calls} calls; median of the per-process medians [range]"
    )
    print("| version | time [ms] | range [ms] | page faults per call |")
    print("|---|---:|---:|---:|")
    medians = {}
    for version, rs in runs.items():
        ms = [1e3 * r["median"] for r in rs]
        medians[version] = float(np.median(ms))
        faults = float(np.median([r["faults"] for r in rs]))
        print(
            f"| {version} | {medians[version]:.1f} | {min(ms):.1f}–{max(ms):.1f} | {faults:.0f} |"
        )
    print(f"speed-up over {args.ref}: {medians[args.ref] / medians['this checkout']:.2f}×")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
