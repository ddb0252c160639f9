"""Two routes of the W2 projection of symmetric roots (``root=True``) on torch CPU tensors, each
timed both ways in one process:

- ``S_o^-1`` (``projections.wasserstein.inverse_root``): the Cholesky form (``S_o = C C^T``,
  ``X = C^-1`` by a triangular solve, ``X^T X``: three calls, each a pass over the batch)
  against one LU solve ``torch.linalg.solve(S_o, I)``
  (``wasserstein.TORCH_CPU_LU_INVERSE``);
- the value checks' positive-definiteness test (``_compat.positive_definite``,
  ``torch.linalg.cholesky_ex``): one call on the whole batch against the batch split over
  torch's threads (``_compat.PD_PARALLEL_MIN_BATCH``, ``PD_PARALLEL_MIN_ENTRIES``).

    python benchmarks/root_routes.py [--dims 2,6,17,32] [--batches 1e3,1e4,1e5] [--rounds 21]
    python benchmarks/root_routes.py --dims 2,3,4,6 --batches 2e4,3e4,5e4,1e5  # the split's limits
    python benchmarks/root_routes.py --quick      # one small cell (CI)

The roots are those of ``run.py``'s old factors (``_worker.make_data``, the roots of
``w2_roots.py``). Cells of more than ``--max-entries`` matrix entries are skipped. Prints the
machine, the medians, their ratios, how far the LU inverse is from the Cholesky form's (largest
difference over the largest entry of that matrix, over the batch) and how far from symmetric
(largest ``|X - X^T|`` over the largest entry), and whether both PD tests agree (a valid batch,
then one with a negative definite matrix in its middle).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # (the checkout; this folder is on the path already)

from _worker import interleaved_ms, limit_threads, machine_line, make_data  # noqa: E402
from ab import thread_environment  # noqa: E402
from w2_roots import _batch, roots_of  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dims", default="2,6,17,32", help="comma-separated d")
    ap.add_argument("--batches", default="1e3,1e4,1e5", help="comma-separated batch sizes")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--max-entries", type=float, default=3e7, help="skip larger B * d * d")
    ap.add_argument("--quick", action="store_true", help="one small cell (CI)")
    args = ap.parse_args(argv)
    if args.quick:
        args.dims, args.batches, args.rounds = "6", "2e3", 3

    thread_environment(args.threads)  # (before any array library is imported)
    limit_threads(args.threads)
    import torch

    from tr_projections import _compat
    from tr_projections.projections import wasserstein

    torch.set_num_threads(args.threads)
    print(machine_line(f"torch {torch.__version__}, {torch.get_num_threads()} threads"))
    print(f"# median ms of {args.rounds} interleaved rounds")
    print(
        "| d | B | inverse: Cholesky form | LU | speed-up | LU vs Cholesky | LU asymmetry "
        "| PD test: one call | in parts | speed-up | agree |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    )
    xp = _compat.array_namespace(torch.zeros(1))
    shipped = (
        wasserstein.TORCH_CPU_LU_INVERSE,
        _compat.PD_PARALLEL_MIN_BATCH,
        _compat.PD_PARALLEL_MIN_ENTRIES,
    )

    def inverse(S, lu: bool):
        wasserstein.TORCH_CPU_LU_INVERSE = lu
        try:
            return wasserstein.inverse_root(S, xp=xp)
        finally:
            wasserstein.TORCH_CPU_LU_INVERSE = shipped[0]

    def pd(S, split: bool):
        least = 0 if split else 1 << 62
        _compat.PD_PARALLEL_MIN_BATCH = _compat.PD_PARALLEL_MIN_ENTRIES = least
        try:
            return _compat.positive_definite(S, xp=xp)
        finally:
            _compat.PD_PARALLEL_MIN_BATCH, _compat.PD_PARALLEL_MIN_ENTRIES = shipped[1:]

    for d in (int(x) for x in args.dims.split(",")):
        for batch in (_batch(x) for x in args.batches.split(",")):
            if batch * d * d > args.max_entries:
                print(f"| {d} | {batch} | (skipped: more than {args.max_entries:.3g} entries) |")
                continue
            S = torch.as_tensor(roots_of(make_data("full", d, batch, 0)["arrays"][3]))
            t = interleaved_ms(
                {
                    "chol": lambda S=S: inverse(S, False),
                    "lu": lambda S=S: inverse(S, True),
                    "one": lambda S=S: pd(S, False),
                    "parts": lambda S=S: pd(S, True),
                },
                args.rounds,
            )
            X_c, X_l = inverse(S, False), inverse(S, True)
            top = torch.amax(torch.abs(X_c), dim=(-2, -1))
            gap = float(torch.max(torch.amax(torch.abs(X_l - X_c), dim=(-2, -1)) / top))
            asym = float(torch.max(torch.amax(torch.abs(X_l - X_l.mT), dim=(-2, -1)) / top))
            bad = S.clone()
            bad[batch // 2] = -bad[batch // 2]  # (negative definite)
            agree = all(
                bool(torch.equal(pd(x, False), pd(x, True))) for x in (S, bad)
            ) and not bool(pd(bad, True)[batch // 2])
            print(
                f"| {d} | {batch} | {t['chol']:.3g} | {t['lu']:.3g} | {t['chol'] / t['lu']:.2f}× "
                f"| {gap:.1e} | {asym:.1e} | {t['one']:.3g} | {t['parts']:.3g} "
                f"| {t['one'] / t['parts']:.2f}× | {'yes' if agree else 'NO'} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
