"""JAX on the CPU: jaxlib's batched routines against the routes ``tr_projections._compat`` takes.

On the CPU, ``_compat`` replaces two of jaxlib's batched calls (see docs/backends.md, JAX):

- triangular solves with one right-hand side (``d <= 32``) or ``d <= 8``: XLA-fused
  substitution (``_compat._substitution``) instead of LAPACK's ``trsm``;
- batched products with an inner dimension up to ``JAX_CPU_SUM_MAX_K``: a sum of broadcast
  products instead of XLA's dot.

A third candidate, the R factor of a batched QR by ``_compat.householder_r`` (what CuPy batches
take) instead of LAPACK's ``geqrf``, is timed too but not taken for JAX: it was no faster at
d = 6 and 3-8x slower at d = 17 and 32.

Each pair is timed on the same seeded float64 data, jitted (compilation excluded), one call per
program (a single jaxlib LAPACK call cannot deadlock), interleaved, median of repeated runs:

    python benchmarks/jax_routes.py                       # d = 6, B = 1e3, 1e4, 1e5
    python benchmarks/jax_routes.py --dims 6,17,32 --batches 10000

The table, the machine and library versions go to stdout.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # (the checkout; this folder is on the path already)

from _worker import machine_line  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", default="6")
    ap.add_argument("--batches", default="1e3,1e4,1e5")
    ap.add_argument("--repeat", type=int, default=9)
    args = ap.parse_args(argv)

    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import jax.scipy.linalg as jsl

    from tr_projections import _compat

    print(
        machine_line(
            f"jax {jax.__version__}, backend {jax.default_backend()}, float64, jit, "
            f"median ms of {args.repeat} runs"
        )
    )

    def timed(fn, *a) -> float:
        f = jax.jit(fn).lower(*a).compile()
        jax.block_until_ready(f(*a))
        ts = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            jax.block_until_ready(f(*a))
            ts.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(ts)

    def product_as_sum(a, b):
        return _compat.matmul(a, b, xp=jnp)

    print("| operation | d | B | jaxlib / XLA | alternative | ratio |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for d in (int(x) for x in args.dims.split(",")):
        for n in (int(float(x)) for x in args.batches.split(",")):
            rng = np.random.default_rng([d, n])
            m = rng.standard_normal((n, d, d))
            spd = m @ np.swapaxes(m, -1, -2) + d * np.eye(d)
            L = jnp.asarray(np.linalg.cholesky(spd))
            A, B = jnp.asarray(m), jnp.asarray(rng.standard_normal((n, d, d)))
            v = jnp.asarray(rng.standard_normal((n, d, 1)))
            pairs = [
                ("triangular solve, d right-hand sides",
                 lambda L, b: jsl.solve_triangular(L, b, lower=True),
                 lambda L, b: _compat._substitution(L, b, lower=True, xp=jnp), (L, B)),
                ("triangular solve, one right-hand side",
                 lambda L, b: jsl.solve_triangular(L, b, lower=True),
                 lambda L, b: _compat._substitution(L, b, lower=True, xp=jnp), (L, v)),
                ("R of QR (householder_r, not taken)",
                 lambda a: jnp.linalg.qr(a, mode="r"),
                 lambda a: _compat.householder_r(a, xp=jnp), (A,)),
                ("product", jnp.matmul, product_as_sum, (A, B)),
            ]  # fmt: skip
            for name, native, ours, a in pairs:
                t_native, t_ours = timed(native, *a), timed(ours, *a)
                print(f"| {name} | {d} | {n:,} | {t_native:.3g} | {t_ours:.3g} | "
                      f"{t_native / t_ours:.2f}× |", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
