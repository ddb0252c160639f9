"""``torch.compile`` of a projection's forward + backward: graph breaks, graphs, compile time
and the time of the calls after it, for this checkout and (``--baseline REF``) a git revision.

    python benchmarks/torch_compile.py [--baseline REF] [--rounds 2] [--dim 2] [--batch 3]

Each (version, case) runs in a fresh process of its own, with inductor's compile caches off,
so every compile starts from nothing; versions alternate case by case and round by round, so
that the machine's load hits both alike. A case is ``loss(mean, scale, old_mean, old_scale) =
sum(out.mean) + sum(out.scale)`` of one projection method and kind, compiled with
``torch.compile`` (inductor; graph breaks allowed, to count them) and differentiated with
``torch.autograd.grad``. Printed per case: graph breaks and graphs (dynamo's counters), the first
call with its backward (compilation included), the median of five later calls on the same
tensors (a recompile shows here), and whether values and gradients equal the eager call's.
Data: ``run.py``'s (``_worker.make_data``, bounds at the 0.7 quantile).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CASES = [(m, k) for m in ("kl", "frobenius", "wasserstein") for k in ("diag", "full")]


def child(method: str, kind: str, dim: int, batch: int) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    from torch._dynamo.utils import counters

    sys.path.insert(0, str(HERE))
    from _worker import bounds_for, make_data

    import tr_projections as trp

    torch.set_num_threads(2)
    data = make_data(kind, dim, batch, seed=20210503)
    eps_mean, eps_cov, _ = bounds_for(data, method)
    args = [torch.asarray(a).requires_grad_(True) for a in data["arrays"]]

    def loss(mean, scale, old_mean, old_scale):
        out = trp.project(
            mean, scale, old_mean, old_scale, method=method, eps_mean=eps_mean, eps_cov=eps_cov
        )
        return out.mean.sum() + out.scale.sum()

    def call(fn):
        value = fn(*args)
        return value, torch.autograd.grad(value, args)

    compiled = torch.compile(loss)
    t0 = time.perf_counter()
    value, grads = call(compiled)
    first_s = time.perf_counter() - t0
    later = []
    for _ in range(5):
        t0 = time.perf_counter()
        call(compiled)
        later.append(time.perf_counter() - t0)
    want, want_grads = call(loss)
    agree = bool(torch.allclose(value, want, rtol=1e-12, atol=1e-12)) and all(
        bool(torch.allclose(a, b, rtol=1e-10, atol=1e-12))
        for a, b in zip(grads, want_grads, strict=True)
    )
    return {
        "breaks": sum(counters["graph_break"].values()),
        "graphs": counters["stats"]["unique_graphs"],
        "first_s": first_s,
        "later_ms": 1e3 * statistics.median(later),
        "agree": agree,
        "torch": torch.__version__,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", metavar="REF", help="also run the package at git REF")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dim", type=int, default=2)
    ap.add_argument("--batch", type=int, default=3)
    ap.add_argument("--cases", default=",".join(f"{m}:{k}" for m, k in CASES))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        method, kind = args.child.split(":")
        print(json.dumps(child(method, kind, args.dim, args.batch)))
        return 0

    from _worker import machine_line
    from ab import extract

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    versions = {"this": ROOT}
    if args.baseline:
        versions = {args.baseline: extract(args.baseline, "trp_compile_"), **versions}
    env = dict(
        os.environ,
        TORCHINDUCTOR_FX_GRAPH_CACHE="0",
        TORCHINDUCTOR_AUTOGRAD_CACHE="0",
    )
    cases = [tuple(c.split(":")) for c in args.cases.split(",")]
    results: dict = {}
    torch_version = "?"
    for _ in range(args.rounds):
        for method, kind in cases:
            for name, tree in versions.items():
                out = subprocess.run(
                    [sys.executable, __file__, "--child", f"{method}:{kind}",
                     "--dim", str(args.dim), "--batch", str(args.batch)],
                    env=dict(env, PYTHONPATH=str(tree)), capture_output=True, text=True,
                    check=False,
                )  # fmt: skip
                if out.returncode != 0:
                    print(out.stderr[-3000:], file=sys.stderr)
                    return 1
                r = json.loads(out.stdout.strip().splitlines()[-1])
                torch_version = r["torch"]
                results.setdefault((method, kind, name), []).append(r)

    print(machine_line(f"torch {torch_version}, 2 threads"))
    print(f"# d = {args.dim}, {args.batch} states; {args.rounds} rounds; medians over rounds")
    print()
    print(
        "| projection | version | graph breaks | graphs | first call (s) | later calls (ms) "
        "| agree |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | --- |")
    for method, kind in cases:
        for name in versions:
            rs = results[(method, kind, name)]
            first = statistics.median(r["first_s"] for r in rs)
            later = statistics.median(r["later_ms"] for r in rs)
            print(
                f"| {method} {kind} | {name} | {rs[0]['breaks']} | {rs[0]['graphs']} | "
                f"{first:.1f} | {later:.2f} | {all(r['agree'] for r in rs)} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
