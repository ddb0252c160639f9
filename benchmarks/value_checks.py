"""The value checks of full factors: each entry's extremes over the batch against ``|L| <= limit``.

A projection's value checks read every argument once more before the work starts (finite
means; full factors finite, bounded, lower triangular, with a positive diagonal;
``tr_projections._values``). For full factors on the host (NumPy arrays, torch CPU tensors) the
package reduces each entry's minimum and maximum over the batch, in rows of
``_values.EXTREMES_ROW_FACTORS`` factors (``_values.entry_extremes``), and compares two
``(d, d)`` arrays with the limits, from ``_values.EXTREMES_MIN_NUMBERS`` entries of an
argument. This script times the package's conditions of one batch of factors
(``_values._conditions``) with that form forced on ("extremes") and off ("elementwise":
``all(|L| <= limit)``, a temporary as large as the batch, and the diagonal's minimum, a strided
reduction; the form of smaller arguments and of other arrays), whatever the batch's size, and
the package's checks of a whole call's four arrays (``check_gaussian_values``, as shipped),
interleaved round by round in one process; it prints the medians, their ratio and the machine:

    python benchmarks/value_checks.py                     # d = 2, 6, 17; B = 1e3, 1e4, 1e5
    python benchmarks/value_checks.py --batches 300,1e3,1e4,1e5
    python benchmarks/value_checks.py --quick             # one small cell per library (CI)

Both forms must agree: the "agree" column says whether the conditions held under both for the
valid batch, and failed under both for the same batch with one bad entry of each kind (NaN;
twice the bound and -inf below the diagonal, and minus twice the bound; a nonzero of either
sign above the diagonal; a diagonal entry below the limit, and a negative one), each in the
first factor, one in the middle and the last (the factors left over where the batch is not a
whole number of rows).
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


def holds(x, *, lo: float, hi: float, xp, extremes: bool) -> bool:
    """Whether the package's conditions of a full factor hold for ``x``, with the extremes form
    forced on or off (``_values.EXTREMES_MIN_NUMBERS`` 0 or larger than any batch)."""
    from tr_projections import _values

    shipped = _values.EXTREMES_MIN_NUMBERS
    _values.EXTREMES_MIN_NUMBERS = 0 if extremes else 1 << 62
    try:
        found = _values._conditions("scale", x, kind="full", lo=lo, hi=hi, xp=xp)
    finally:
        _values.EXTREMES_MIN_NUMBERS = shipped
    ok = found[0].holds
    for c in found[1:]:
        ok = ok & c.holds
    return bool(ok)


def factors(batch: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.tril(rng.normal(size=(batch, d, d))) * 0.3
    i = np.arange(d)
    x[:, i, i] = np.exp(0.3 * rng.normal(size=(batch, d)))
    return x


def bad_copies(x: np.ndarray, lo: float, hi: float):
    """The batch with one bad entry of each kind (not finite, out of range either way, not
    lower triangular either way, a diagonal too small or negative), in the first factor, one
    in the middle and the last."""
    d = x.shape[-1]
    below = (d - 1, 0) if d > 1 else (0, 0)
    above = [((0, d - 1), 0.5), ((0, d - 1), -0.5)] if d > 1 else []
    for row in (0, x.shape[0] // 2, x.shape[0] - 1):
        for where, value in [
            (below, np.nan),
            (below, 2.0 * hi),
            (below, -2.0 * hi),
            (below, -np.inf),
            *above,
            ((0, 0), 0.5 * lo),
            ((d - 1, d - 1), -1.0),
        ]:
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
                forms = {"elementwise": False, "extremes": True}
                agree = all(holds(x, lo=lo, hi=hi, xp=xp, extremes=e) for e in forms.values())
                for y in bad_copies(base, lo, hi):
                    y = convert(y)
                    answers = {holds(y, lo=lo, hi=hi, xp=xp, extremes=e) for e in forms.values()}
                    agree = agree and answers == {False}
                arrays = {
                    "mean": convert(means),
                    "scale": x,
                    "old_mean": convert(means[::-1].copy()),
                    "old_scale": convert(base[::-1].copy()),
                }
                limits = {"lo": lo, "hi": hi, "xp": xp}
                calls = {
                    k: functools.partial(holds, x, **limits, extremes=e) for k, e in forms.items()
                }
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
