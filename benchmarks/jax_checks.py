"""The value checks of concrete JAX arrays: one compiled program against the checks op by op.

Outside ``jax.jit`` (and inside an eager ``jax.grad`` or ``jax.vjp``, whose tracers carry their
values) the package checks a call's arguments on their values before it runs its compiled
programs. The conditions (finite means; stds or Cholesky factors finite, bounded, lower
triangular, with a positive diagonal) are a few dozen reductions and comparisons; the JAX adapter
evaluates them as one ``jax.jit`` program (``tr_projections.backends.jax.values_hold``) and forms
them one by one only on the error path. This script times, interleaved round by round in one
process, each call three ways: ``program`` (as shipped), ``op by op`` (``values_hold`` bypassed:
the conditions formed eagerly, as before the program) and ``off`` (``trp.checks(False)``):

    python benchmarks/jax_checks.py                   # d = 6; B = 1e3, 1e4, 1e5
    python benchmarks/jax_checks.py --batches 1e3 --rounds 41
    python benchmarks/jax_checks.py --quick           # one small cell (CI)

Calls: ``checks`` (``_values.check_gaussian_values`` of the four arguments alone, nothing
with the checks off), ``kl``
(``trp.kl``), ``project`` (``trp.project_kl``), ``vjp`` (``trp.vjp`` of it and its backward),
``grad kl`` (an eager ``jax.grad`` of the sum of ``trp.kl``'s parts in the new mean and scale).
Data and bounds are ``run.py``'s (``_worker.make_data``/``bounds_for``); float64, 2 CPUs.
Prints the medians in ms, the speed-up of the program over op by op, and the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # (the checkout; this folder is on the path already)

from _worker import bounds_for, interleaved_ms, limit_threads, machine_line, make_data  # noqa: E402


@contextlib.contextmanager
def route(name: str):
    """The checks of ``name``: ``program`` (as shipped), ``op by op`` or ``off``."""
    import tr_projections as trp
    from tr_projections.backends import jax as adapter

    shipped = adapter.values_hold
    if name == "op by op":
        adapter.values_hold = lambda kinds, arrays: None
    try:
        with trp.checks(name != "off"):
            yield
    finally:
        adapter.values_hold = shipped


def calls(kind: str, d: int, batch: int) -> dict:
    """The timed calls of one cell, on concrete JAX arrays (each blocks until done)."""
    import jax
    import jax.numpy as jnp

    import tr_projections as trp
    from tr_projections import _values

    data = make_data(kind, d, batch, 0)
    eps_mean, eps_cov, _ = bounds_for(data, "kl")
    x = [jnp.asarray(a) for a in data["arrays"]]
    g = trp.Gaussian(*(jnp.asarray(a) for a in data["cotangents"]))
    kw = {"eps_mean": eps_mean, "eps_cov": eps_cov}
    named = dict(zip(("mean", "scale", "old_mean", "old_scale"), x, strict=True))

    def vjp():
        out, fn = trp.vjp(trp.project_kl, *x, **kw)
        return out, fn(g)

    grad = jax.grad(lambda m, s: sum(jnp.sum(p) for p in trp.kl(m, s, *x[2:])), argnums=(0, 1))
    return {
        "checks": lambda: (
            trp.checks_enabled()
            and _values.check_gaussian_values(named, full=kind == "full", dtype=x[0].dtype, xp=jnp)
        ),
        "kl": lambda: jax.block_until_ready(trp.kl(*x)),
        "project": lambda: jax.block_until_ready(trp.project_kl(*x, **kw)),
        "vjp": lambda: jax.block_until_ready(vjp()),
        "grad kl": lambda: jax.block_until_ready(grad(x[0], x[1])),
    }


def cells(kind: str, d: int, batch: int) -> dict:
    """``{call: {route: fn}}`` of one cell: each call of :func:`calls` under each route."""

    def under(r: str, fn):
        def timed():
            with route(r):
                fn()

        return timed

    return {
        name: {r: under(r, fn) for r in ("program", "op by op", "off")}
        for name, fn in calls(kind, d, batch).items()
    }


def table(argv: list[str] | None, doc: str, cells_of, routes: tuple, quick_kind: str) -> int:
    """The main of this script and of ``jax_entropy.py``: the cells' options (``doc``'s first
    paragraph their description; ``--quick``: one cell of ``quick_kind`` and 100 states), the CPUs
    pinned, then one row per kind, batch and call with the medians of ``routes`` (``cells_of(kind,
    d, batch)``: ``{call: {route: fn}}``) and the second route's over the first's."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--kinds", default="full,diag")
    ap.add_argument("--dim", type=int, default=6)
    ap.add_argument("--batches", default="1e3,1e4,1e5")
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--threads", type=int, default=2, help="CPUs to pin to (0: leave alone)")
    ap.add_argument("--quick", action="store_true", help="one small cell (CI)")
    args = ap.parse_args(argv)
    if args.quick:
        args.kinds, args.batches, args.rounds = quick_kind, "100", 3
    limit_threads(args.threads)
    import jax

    jax.config.update("jax_enable_x64", True)
    print(machine_line(f"jax {jax.__version__}, float64"))
    print(f"# d = {args.dim}; medians of {args.rounds} interleaved rounds, ms")
    print()
    first, second = routes[:2]
    print(f"| kind | B | call | {' | '.join(routes)} | {first} vs {second} |")
    print("|---|---:|---|" + "---:|" * (len(routes) + 1))
    for kind in args.kinds.split(","):
        for batch in (int(float(b)) for b in args.batches.split(",")):
            for name, fns in cells_of(kind, args.dim, batch).items():
                ms = interleaved_ms(fns, args.rounds)
                times = " | ".join(f"{ms[r]:.3g}" for r in routes)
                print(
                    f"| {kind} | {batch:,} | {name} | {times} | {ms[second] / ms[first]:.2f}× |",
                    flush=True,
                )
    return 0


def main(argv: list[str] | None = None) -> int:
    return table(argv, __doc__, cells, ("program", "op by op", "off"), "diag")


if __name__ == "__main__":
    raise SystemExit(main())
