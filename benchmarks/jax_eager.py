"""Eager JAX calls: compiled programs (``EAGER_JIT``) against op by op, each in fresh processes.

    python benchmarks/jax_eager.py [--methods kl,frobenius,wasserstein] [--kinds diag,full]
                                   [--dim 6] [--batches 1e3,1e4,1e5] [--calls 8] [--procs 1]

A JAX user who calls ``trp.project`` (or ``jax.vjp`` of it) outside ``jax.jit`` passes concrete
arrays. ``tr_projections.backends.jax.EAGER_JIT`` (on by default) runs such calls as one compiled
program per operation, options and shapes; off, they run op by op, where JAX compiles each
operation for each shape it meets and the eager route's row selection makes the shapes of the
costly stages follow the data. Every (route, cell, process) runs in a fresh process of its own,
with the routes alternating, so compilation caches carry over from nothing. Each process times:

* ``first``: the first call (its compilation included);
* ``new``: the median of ``--calls`` calls that each move the bounds (their quantile over the
  distance parts runs from 0.3 to 0.8), so that other states are outside their bounds each
  time, as new data in a training loop would be; with the number of XLA compilations per call;
* ``same``: the median of ``--calls`` calls repeating the last one.

``fwd`` is ``trp.project``; ``fwd+bwd`` is ``jax.vjp`` of it in the new policy's mean and scale
and its VJP of fixed cotangents. ``vmap`` is an eager ``jax.vmap`` of ``trp.project`` over the
states (each call one state), ``vmap+grad`` an eager ``jax.vmap`` of ``jax.grad`` of the sum of
its outputs times fixed cotangents, in the new policy's mean and scale (a per-state gradient).

``dist`` is the distance of the same name (``trp.kl``, ``trp.frobenius``, ``trp.wasserstein``)
alone, ``dist+grad`` an eager ``jax.grad`` of the sum of its two parts in the new policy's mean
and scale; there ``new`` means new data on every call (the seeds of :func:`_worker.make_data`),
and a third route, ``torch``, times the same calls with torch CPU tensors (``backward()`` for
the gradient) for reference. ``--data near`` (default) is the benchmark's data, new policies a
small step from the old ones; ``--data far`` pairs each old policy with the new policy of
another seed's old one (every state far outside any trust region, as the KL between the first
and the current policy of a training run would be). ``--ref REV`` adds a route that runs the
package as it was at git revision ``REV``, JAX arrays, with that revision's own defaults;
``--no-op-by-op`` leaves out the op-by-op route.

float64 (``jax_enable_x64``), 2 threads (CPU affinity). Prints a table with the machine and
library versions; times in ms.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

_CHILD = r"""
import json, os, statistics, sys, time
sys.path.insert(0, os.environ["TRP_PATH"])
sys.path.insert(1, os.environ["TRP_BENCH"])
from _worker import bounds_for, limit_threads, make_data
limit_threads(int(os.environ["TRP_THREADS"]))
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import numpy as np
import tr_projections as trp
import tr_projections.backends.jax as adapter

route = os.environ["TRP_ROUTE"]
if route in ("ops", "compiled"):  # (another revision's package keeps its own default)
    adapter.EAGER_JIT = route == "compiled"
compiles = [0]

def listen(name, _duration, **_kw):
    if name == "/jax/core/compile/backend_compile_duration":
        compiles[0] += 1

jax.monitoring.register_event_duration_secs_listener(listen)
kind, method, mode = os.environ["TRP_KIND"], os.environ["TRP_METHOD"], os.environ["TRP_MODE"]
dim, batch = int(os.environ["TRP_DIM"]), int(os.environ["TRP_BATCH"])
calls = int(os.environ["TRP_CALLS"])

if mode.startswith("dist"):
    if route == "torch":
        import torch
        torch.set_num_threads(int(os.environ["TRP_THREADS"]))
    fn = getattr(trp, method)

    def arrays(seed):
        a = make_data(kind, dim, batch, seed)["arrays"]
        if os.environ["TRP_DATA"] == "far":  # another seed's old policy as the new one
            other = make_data(kind, dim, batch, seed + 10_000)["arrays"]
            a = (a[0], other[3], a[2], a[3])
        if route == "torch":
            return [torch.asarray(v) for v in a]
        return [jnp.asarray(v) for v in a]

    def call(x):
        if route == "torch":
            if mode == "dist":
                return fn(*x)
            m, s = (v.detach().requires_grad_() for v in x[:2])
            parts = fn(m, s, x[2], x[3])
            (parts.mean.sum() + parts.cov.sum()).backward()
            return m.grad, s.grad
        if mode == "dist":
            return jax.block_until_ready(fn(*x))
        grad = jax.grad(lambda m, s: sum(jnp.sum(p) for p in fn(m, s, x[2], x[3])), (0, 1))
        return jax.block_until_ready(grad(x[0], x[1]))

    inputs = [arrays(i) for i in range(calls + 1)]
else:
    data = make_data(kind, dim, batch, 0)
    x = [jnp.asarray(a) for a in data["arrays"]]
    g = trp.Gaussian(*(jnp.asarray(a) for a in data["cotangents"]))
    quantiles = np.linspace(0.3, 0.8, calls + 1)
    inputs = [bounds_for(data, method, float(q))[:2] for q in quantiles]

    def call(b):
        kw = dict(method=method, eps_mean=b[0], eps_cov=b[1])
        if mode == "fwd":
            return jax.block_until_ready(trp.project(*x, **kw))
        if mode.startswith("vmap"):  # (an eager jax.vmap over the states, one state a call)
            def project(m, s, om, os_):
                return trp.project(m, s, om, os_, **kw)

            if mode == "vmap":
                return jax.block_until_ready(jax.vmap(project)(*x))

            def loss(m, s, om, os_, gm, gs):
                out = project(m, s, om, os_)
                return jnp.sum(out.mean * gm) + jnp.sum(out.scale * gs)

            return jax.block_until_ready(jax.vmap(jax.grad(loss, (0, 1)))(*x, *g))
        out, vjp_fn = jax.vjp(lambda m, s: trp.project(m, s, x[2], x[3], **kw), x[0], x[1])
        return jax.block_until_ready(vjp_fn(g))

def timed(b):
    c0, t0 = compiles[0], time.perf_counter()
    call(b)
    return 1e3 * (time.perf_counter() - t0), compiles[0] - c0

first, first_compiles = timed(inputs[0])
new = [timed(b) for b in inputs[1:]]
same = [timed(inputs[-1])[0] for _ in range(calls)]
print(json.dumps({
    "first": first, "first_compiles": first_compiles,
    "new": statistics.median(t for t, _ in new),
    "new_compiles": statistics.median(c for _, c in new),
    "same": statistics.median(same),
}))
"""


def routes_of(mode: str, *, op_by_op: bool, ref: str | None) -> tuple[str, ...]:
    """The routes a cell of ``mode`` is timed on: op by op (unless left out), compiled, torch
    for the distance modes, and the revision ``ref``."""
    routes = ("op by op", "compiled") if op_by_op else ("compiled",)
    if mode.startswith("dist"):
        routes += ("torch",)
    return routes + ((ref,) if ref else ())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--methods", default="kl,frobenius,wasserstein")
    ap.add_argument("--kinds", default="diag,full")
    ap.add_argument(
        "--modes",
        default="fwd,fwd+bwd",
        help="among fwd, fwd+bwd, vmap, vmap+grad, dist, dist+grad",
    )
    ap.add_argument("--data", default="near", choices=("near", "far"), help="for dist modes")
    ap.add_argument("--dim", type=int, default=6)
    ap.add_argument("--batches", default="1e3,1e4,1e5")
    ap.add_argument("--calls", type=int, default=8, help="timed calls per measurement")
    ap.add_argument("--procs", type=int, default=1, help="fresh processes per (route, cell)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per process")
    ap.add_argument(
        "--ref", help="also time the package at this git revision, as it is (its own defaults)"
    )
    ap.add_argument(
        "--no-op-by-op", action="store_true", help="leave out the op-by-op route (slow to compile)"
    )
    args = ap.parse_args(argv)

    sys.path.insert(0, str(HERE))
    import jax
    from _report import fmt_batch, fmt_ms, load_line
    from _worker import machine_line
    from w2_roots import _batch

    print(machine_line(f"jax {jax.__version__}, {args.threads} threads, float64"))
    print(load_line("start"))
    print(
        f"# d = {args.dim}; {args.calls} calls per median; {args.procs} fresh process(es) per "
        "route and cell (median of their values); times in ms; `compiles`: XLA compilations; "
        f"dist modes: `new bounds` is new data ({args.data})"
    )
    print()
    print(
        "| method | kind | mode | B | route | first | compiles | new bounds | compiles per call "
        "| same bounds |"
    )
    print("|---|---|---|---:|---|---:|---:|---:|---:|---:|")
    env0 = {
        **os.environ,
        "TRP_PATH": str(ROOT),
        "TRP_BENCH": str(HERE),
        "TRP_THREADS": str(args.threads),
        "TRP_DIM": str(args.dim),
        "TRP_CALLS": str(args.calls),
        "TRP_DATA": args.data,
    }
    env0.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    ref_path = None
    if args.ref:
        from ab import extract

        ref_path = str(extract(args.ref, "trp_eager_"))
    for method in args.methods.split(","):
        for kind in args.kinds.split(","):
            for mode in args.modes.split(","):
                routes = routes_of(mode, op_by_op=not args.no_op_by_op, ref=args.ref)
                for batch in (_batch(b) for b in args.batches.split(",")):
                    results: dict[str, list[dict]] = {r: [] for r in routes}
                    for i in range(args.procs):
                        for route in routes if i % 2 == 0 else routes[::-1]:
                            env = {
                                **env0,
                                "TRP_ROUTE": {"op by op": "ops"}.get(route, route),
                                "TRP_PATH": ref_path if route == args.ref else str(ROOT),
                                "TRP_KIND": kind,
                                "TRP_METHOD": method,
                                "TRP_MODE": mode,
                                "TRP_BATCH": str(batch),
                            }
                            try:
                                out = subprocess.run(
                                    [sys.executable, "-c", _CHILD],
                                    env=env,
                                    capture_output=True,
                                    text=True,
                                    timeout=args.timeout,
                                )
                            except subprocess.TimeoutExpired:
                                continue
                            if out.returncode != 0:
                                last = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
                                print(f"# {route} {method} {kind} {mode} {batch}: failed: {last}")
                                continue
                            results[route].append(json.loads(out.stdout.strip().splitlines()[-1]))
                    for route in routes:
                        rs = results[route]
                        if not rs:
                            print(
                                f"| {method} | {kind} | {mode} | {fmt_batch(batch)} | {route} "
                                "| timeout | | | | |"
                            )
                            continue

                        def med(key: str, rs: list = rs) -> float:
                            return statistics.median(r[key] for r in rs)

                        print(
                            f"| {method} | {kind} | {mode} | {fmt_batch(batch)} | {route} "
                            f"| {fmt_ms(med('first') / 1e3)} | {med('first_compiles'):.0f} "
                            f"| {fmt_ms(med('new') / 1e3)} | {med('new_compiles'):.0f} "
                            f"| {fmt_ms(med('same') / 1e3)} |",
                            flush=True,
                        )
    print(load_line("end"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
