"""NumPy's batched triangular solves: substitution with the batch axis innermost against the
row-by-row form (and NumPy's batched LU solve), alone and inside whole projections.

    python benchmarks/triangular.py                 # the solves, then NumPy projections
    python benchmarks/triangular.py --no-projections --dims 6,17 --batches 1000,14286

The solves: ``(B, d, d)`` lower (and upper) triangular systems with ``k`` right-hand sides,
each variant timed on the same arrays, interleaved round by round (median of the rounds). The
projections: forward + backward (``trp.vjp``, every cotangent) of NumPy arrays with the
benchmark's data and bounds (``_worker.make_data``/``bounds_for``), the batch-last route on
(``_compat.BATCH_LAST_MAX_D`` as shipped) and off (0: the previous routes, row by row for
d <= 8 and NumPy's LU solve above), interleaved in one process. Before timing, one
30 MB array is allocated and freed, which raises glibc's allocation thresholds as a long-running
process has them (otherwise every batch-sized temporary is a fresh mapping and page faults weigh
on both variants alike).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # (the checkout; this folder is on the path already)

from _worker import bounds_for, interleaved_ms, machine_line, make_data  # noqa: E402

#: Cells with more numbers in a batch of matrices are skipped (d = 32 at 14,286 systems).
MAX_NUMBERS = 5_000_000


def solves(dims: list[int], batches: list[int], rounds: int) -> None:
    import array_api_compat.numpy as xp

    from tr_projections import _compat

    print(f"# solves (cells with more than {MAX_NUMBERS:,} numbers per batch skipped)")
    print("| d | B | k | triangle | row by row [ms] | batch last [ms] | LU solve [ms] | speed-up |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for d in dims:
        for n in batches:
            if n * d * d > MAX_NUMBERS:
                continue  # (listed in the header)
            a = np.tril(rng.uniform(-1, 1, (n, d, d))) + np.eye(d) * rng.uniform(1, 2, (n, 1, 1))
            for k in sorted({1, d}):
                b = rng.standard_normal((n, d, k))
                for lower in (True, False):
                    m = a if lower else np.ascontiguousarray(np.swapaxes(a, -1, -2))
                    fns = {
                        "rows": lambda m=m, b=b, lo=lower: _compat._substitution(
                            m, b, lower=lo, xp=xp
                        ),
                        "last": lambda m=m, b=b, lo=lower: _compat._batch_last_substitution(
                            m, b, lower=lo
                        ),
                        "lu": lambda m=m, b=b: np.linalg.solve(m, b),
                    }
                    number = max(1, 200_000 // (n * d * d))
                    t = interleaved_ms(fns, rounds, number)
                    print(
                        f"| {d} | {n:,} | {k} | {'lower' if lower else 'upper'} | "
                        f"{t['rows']:.3f} | {t['last']:.3f} | {t['lu']:.3f} | "
                        f"{t['rows'] / t['last']:.2f}× |",
                        flush=True,
                    )


def projections(dims: list[int], batches: list[int], methods: list[str], rounds: int) -> None:
    import tr_projections as trp
    from tr_projections import _compat

    print()
    print("# projections: the previous routes (row by row for d <= 8, LU above) against the new")
    print("| method | kind | d | B | previous [ms] | now [ms] | speed-up |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for d, n, method in ((d, n, m) for d in dims for n in batches for m in methods):
        if n * d * d > 20 * MAX_NUMBERS:
            continue
        data = make_data("full", d, n, 0)
        eps_mean, eps_cov, _ = bounds_for(data, method, 0.7)
        arrays = [np.asarray(x) for x in data["arrays"]]
        cot = trp.Gaussian(*data["cotangents"])

        def both(method=method, arrays=arrays, eps_mean=eps_mean, eps_cov=eps_cov, cot=cot):
            _, vjp_fn = trp.vjp(
                trp.project, *arrays, method=method, eps_mean=eps_mean, eps_cov=eps_cov
            )
            vjp_fn(cot)

        def variant(limit):
            def run():
                _compat.BATCH_LAST_MAX_D = limit
                both()

            return run

        saved = _compat.BATCH_LAST_MAX_D
        try:
            t = interleaved_ms({"rows": variant(0), "last": variant(saved)}, rounds)
        finally:
            _compat.BATCH_LAST_MAX_D = saved
        print(
            f"| {method} | full | {d} | {n:,} | {t['rows']:.2f} | {t['last']:.2f} | "
            f"{t['rows'] / t['last']:.2f}× |",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dims", default="3,6,8,12,17,24,32")
    ap.add_argument("--batches", default="16,64,500,1000,14286")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--projection-dims", default="6,17")
    ap.add_argument("--projection-batches", default="1000,10000,100000")
    ap.add_argument("--methods", default="kl,frobenius,wasserstein")
    ap.add_argument("--projection-rounds", type=int, default=7)
    ap.add_argument("--no-projections", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    warm = np.ones(30 * 2**20 // 8)  # (see the module's notes)
    del warm
    print(machine_line(f"numpy {np.__version__}; float64; median ms of interleaved rounds"))
    solves([int(x) for x in args.dims.split(",")],
           [int(float(x)) for x in args.batches.split(",")], args.rounds)  # fmt: skip
    if not args.no_projections:
        projections([int(x) for x in args.projection_dims.split(",")],
                    [int(float(x)) for x in args.projection_batches.split(",")],
                    args.methods.split(","), args.projection_rounds)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
