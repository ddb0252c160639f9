"""The value checks of full factors: each entry's extremes over the batch against ``|L| <= limit``.

A projection's value checks read every argument once more before the work starts (finite
means; full factors finite, bounded, lower triangular, with a positive diagonal;
``tr_projections._values``). For full factors on the host (NumPy arrays, torch CPU tensors) the
package reduces each entry's minimum and maximum over the batch, in rows of
``_values.EXTREMES_ROW_FACTORS`` factors (``_values.entry_extremes``), and compares two
``(d, d)`` arrays with the limits, from ``_values.EXTREMES_MIN_NUMBERS`` entries. This script
times that against the elementwise form the package uses for fewer entries and for other arrays
(``all(|L| <= limit)``, a temporary as large as the batch, and the diagonal's minimum, a strided
reduction), for one batch of factors whatever its size, and
the package's checks of a whole call's four arrays (``check_gaussian_values``), interleaved
round by round in one process; it prints the medians, their ratio and the machine:

    python benchmarks/value_checks.py                     # d = 2, 6, 17; B = 1e3, 1e4, 1e5
    python benchmarks/value_checks.py --quick             # one small cell per library (CI)

Both forms must agree: the "agree" column says whether they gave the same answer for the valid
batch and for the same batch with one bad entry of each kind (NaN, a huge entry, a nonzero
above the diagonal, a diagonal entry below the limit), each in the first row of factors and in
the factors left over.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # (the checkout; this folder is on the path already)

from _worker import interleaved_ms, machine_line  # noqa: E402


def elementwise(x, *, lo: float, hi: float, xp) -> bool:
    """The elementwise form: ``|L| <= limit`` (``hi`` on and below the diagonal, 0 above it)
    in one pass with a batch-sized temporary, and the diagonal's minimum."""
    from tr_projections import _values

    limit, _ = _values._triangle_limits(x.shape[-1], hi, x.dtype, _device(x), xp)
    entries = xp.all(xp.abs(x) <= limit)
    diagonal = _values.at_least(xp.linalg.diagonal(x), lo, xp=xp, strided=True)
    return bool(entries & diagonal)


def extremes(x, *, lo: float, hi: float, xp) -> bool:
    """The package's host form: :func:`tr_projections._values.entry_extremes`, then ``(d, d)``
    comparisons."""
    from tr_projections import _values

    limit, _ = _values._triangle_limits(x.shape[-1], hi, x.dtype, _device(x), xp)
    low, high = _values.entry_extremes(x, xp=xp)
    ok = xp.all(high <= limit) & xp.all(low >= -limit)
    return bool(ok & xp.all(xp.linalg.diagonal(low) >= lo))


def _device(x):
    from tr_projections import _compat

    return _compat.device(x)


def factors(batch: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.tril(rng.normal(size=(batch, d, d))) * 0.3
    i = np.arange(d)
    x[:, i, i] = np.exp(0.3 * rng.normal(size=(batch, d)))
    return x


def bad_copies(x: np.ndarray, lo: float, hi: float):
    """The batch with one bad entry of each kind, in the first factor and in the last."""
    d = x.shape[-1]
    for row in (0, x.shape[0] - 1):
        for where, value in (
            ((d - 1, 0), np.nan),
            ((d - 1, 0), 2.0 * hi),
            ((0, d - 1), 0.5) if d > 1 else ((0, 0), -1.0),
            ((0, 0), 0.5 * lo),
        ):
            y = x.copy()
            y[(row, *where)] = value
            yield y


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--libraries", default="numpy,torch")
    ap.add_argument("--dims", default="2,6,17")
    ap.add_argument("--batches", default="1e3,1e4,1e5")
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (0: leave alone)")
    ap.add_argument("--seed", type=int, default=20210503)
    ap.add_argument("--quick", action="store_true", help="one small cell per library (CI)")
    args = ap.parse_args(argv)
    if args.quick:
        args.dims, args.batches, args.rounds = "3", "200", 1

    import array_api_compat

    from tr_projections import _values
    from tr_projections._values import check_gaussian_values, scale_limits

    to = {}
    versions = f"numpy {np.__version__}"
    for name in args.libraries.split(","):
        if name == "numpy":
            to[name] = np.asarray
        elif name == "torch":
            import torch

            if args.threads > 0:
                torch.set_num_threads(args.threads)
            to[name] = torch.from_numpy
            versions += f", torch {torch.__version__} ({torch.get_num_threads()} threads)"
        else:
            raise SystemExit(f"--libraries: numpy or torch, not {name!r}")
    print(machine_line(versions))
    print(
        f"# one batch of full factors (float64), and a whole call's four arrays (means and "
        f"factors); rows of {_values.EXTREMES_ROW_FACTORS} factors; "
        f"median ms of {args.rounds} interleaved rounds"
    )
    print("| library | d | B | elementwise | extremes | speed-up | agree | whole call |")
    print("|---|---:|---:|---:|---:|---:|---|---:|")
    for d in [int(v) for v in args.dims.split(",")]:
        for batch in [int(float(v)) for v in args.batches.split(",")]:
            base = factors(batch, d, args.seed)
            means = np.random.default_rng(args.seed + 1).normal(size=(batch, d))
            for name, convert in to.items():
                x = convert(base)
                xp = array_api_compat.array_namespace(x)
                lo, hi = scale_limits(x.dtype, xp=xp)
                forms = {"elementwise": elementwise, "extremes": extremes}
                agree = all(f(x, lo=lo, hi=hi, xp=xp) for f in forms.values())
                for y in bad_copies(base, lo, hi):
                    y = convert(y)
                    answers = {f(y, lo=lo, hi=hi, xp=xp) for f in forms.values()}
                    agree = agree and answers == {False}
                arrays = {
                    "mean": convert(means),
                    "scale": x,
                    "old_mean": convert(means[::-1].copy()),
                    "old_scale": convert(base[::-1].copy()),
                }
                limits = {"lo": lo, "hi": hi, "xp": xp}
                calls = {k: functools.partial(f, x, **limits) for k, f in forms.items()}
                calls["whole"] = functools.partial(
                    check_gaussian_values, arrays, full=True, dtype=x.dtype, xp=xp
                )
                t = interleaved_ms(calls, args.rounds)
                ratio = t["elementwise"] / t["extremes"] if t["extremes"] > 0 else math.nan
                print(
                    f"| {name} | {d} | {batch:,} | {t['elementwise']:.3f} | {t['extremes']:.3f} | "
                    f"{ratio:.2f}× | {'yes' if agree else 'NO'} | {t['whole']:.3f} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
