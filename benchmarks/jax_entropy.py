"""The entropy and its projection of concrete JAX arrays: compiled programs against op by op.

``trp.entropy`` and ``trp.project_entropy`` of JAX arrays whose values are known (outside
``jax.jit``, and inside an eager ``jax.grad``) run as compiled programs, as the projections and
the distances do (``tr_projections.backends.jax.EAGER_JIT``); before, they ran op by op on
every call. This script times, interleaved round by round in one process, each call on the
``compiled`` route (as shipped), ``op by op`` (``EAGER_JIT`` off: the entropy, its projection
and their value checks op by op, as before) and, for reference, the same call under ``jax.jit``
(``jitted``, compiled ahead, checks skipped as under any trace):

    python benchmarks/jax_entropy.py                  # d = 6; B = 1e3, 1e4, 1e5
    python benchmarks/jax_entropy.py --quick          # one small cell (CI)

Calls: ``entropy`` (``trp.entropy``), ``project`` (``trp.project_entropy`` with the batch's
median entropy as the bound: half the states rescaled), ``grad`` (an eager ``jax.grad`` of
``sum(project_entropy(scale) * g)``). Scales are ``run.py``'s new ones (``_worker.make_data``);
float64, 2 CPUs. Prints the medians in ms, the speed-up of the compiled route over op by op,
and the machine.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # (the checkout; this folder is on the path already)

from _worker import make_data  # noqa: E402
from jax_checks import table  # noqa: E402


def calls(kind: str, d: int, batch: int) -> dict:
    """``{call: {route: fn}}`` of one cell, on concrete JAX arrays (each blocks until done)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import tr_projections as trp
    from tr_projections.backends import jax as adapter

    data = make_data(kind, d, batch, 0)
    scale = jnp.asarray(data["arrays"][1])
    g = jnp.asarray(data["cotangents"][1])
    beta = float(np.median(np.asarray(trp.entropy(scale))))

    def project(s):
        return trp.project_entropy(s, beta)

    def loss(s):
        return jnp.sum(project(s) * g)

    fns = {"entropy": trp.entropy, "project": project, "grad": jax.grad(loss)}
    jitted = {
        "entropy": jax.jit(trp.entropy),
        "project": jax.jit(project),
        "grad": jax.jit(jax.grad(loss)),
    }

    def eager(fn, on: bool):
        def call():
            shipped = adapter.EAGER_JIT
            adapter.EAGER_JIT = on
            try:
                jax.block_until_ready(fn(scale))
            finally:
                adapter.EAGER_JIT = shipped

        return call

    return {
        name: {
            "compiled": eager(fn, True),
            "op by op": eager(fn, False),
            "jitted": lambda f=jitted[name]: jax.block_until_ready(f(scale)),
        }
        for name, fn in fns.items()
    }


def main(argv: list[str] | None = None) -> int:
    return table(argv, __doc__, calls, ("compiled", "op by op", "jitted"), "diag")


if __name__ == "__main__":
    raise SystemExit(main())
