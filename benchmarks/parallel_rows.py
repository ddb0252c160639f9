"""Work on the rows of a batch in parts on several threads at once, against one call.

Three pieces of the eager CPU routes (float64, 6x6 matrices), each timed both ways,
interleaved round by round in one process, medians and their ratio:

- ``matmul``: NumPy's batched product (also what torch CPU tensors' products run on,
  ``_compat.TORCH_CPU_MATMUL_VIA_NUMPY``) in parts of the first axis
  (``_compat.MATMUL_PARALLEL_MIN_WORK``), with contiguous factors and with ``L @ L.mT``
  (a transposed view, copied per part);
- ``trsm``: torch's CPU triangular solve in parts (``_compat.TRSM_PARALLEL_MIN_BATCH``), 6 and
  1 right-hand sides;
- ``join``: two lanes' chunk outputs joined afterwards (``concat``) against each lane writing
  its rows of one array (``_compat.Joined``), as a chunked projection's lanes do.

The pieces' "in parts" column always splits (thresholds 1), to show where splitting starts to
pay; the shipped thresholds split only from there.

Then whole projections (``run.py``'s data and bounds; torch tensors, forward + backward as
``run.py`` times them) with the parts off (both thresholds 0) and as shipped::

    python benchmarks/parallel_rows.py                 # B = 1e3, 1e4, 1e5
    python benchmarks/parallel_rows.py --quick         # one small batch (CI)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # (the checkout; this folder is on the path already)

from _worker import (  # noqa: E402
    bounds_for,
    interleaved_ms,
    machine_line,
    make_backend,
    make_data,
)


def _row(piece: str, batch: int, one: float, parts: float) -> str:
    return f"| {piece} | {batch:,} | {one:.3f} | {parts:.3f} | {one / parts:.2f}x |"


def _product(a, b, least: int):
    # (least: the threshold, 0 for one call, 1 for parts)
    import array_api_compat.numpy as xpn

    from tr_projections import _compat

    def call():
        _compat.MATMUL_PARALLEL_MIN_WORK = least
        _compat.matmul(a, b, xp=xpn)

    return call


def _solve(L, b, least: int):
    import array_api_compat.torch as xpt

    from tr_projections import _compat

    def call():
        _compat.TRSM_PARALLEL_MIN_BATCH = least
        _compat.solve_triangular(L, b, lower=True, xp=xpt)

    return call


def _join(A, on: bool):
    import array_api_compat.numpy as xpn

    from tr_projections import _compat

    n = A.shape[0]
    half = n // 2

    def call():
        # Two lanes each make one chunk's output (as a chunked projection's lanes do), then
        # either it is joined afterwards on this thread or each lane writes its own rows.
        if not on:
            np.concatenate(_compat.in_lanes([lambda: A[:half] * 1.0, lambda: A[half:] * 1.0]))
            return
        joined = _compat.Joined(n, xp=xpn)
        _compat.in_lanes(
            [
                lambda: joined.put(0, half, (A[:half] * 1.0,)),
                lambda: joined.put(half, n, (A[half:] * 1.0,)),
            ]
        )

    return call


def pieces(batches: list[int], rounds: int) -> list[str]:
    import torch

    rng = np.random.default_rng(0)
    lines = [
        "| piece | B | one call [ms] | in parts [ms] | speed-up |",
        "|---|---:|---:|---:|---:|",
    ]
    for n in batches:
        A = rng.standard_normal((n, 6, 6))
        L = np.linalg.cholesky(A @ np.swapaxes(A, -1, -2) + 6.0 * np.eye(6))
        LT = np.swapaxes(L, -1, -2)
        tL, tA, t1 = (torch.from_numpy(x) for x in (L, A, A[..., :1].copy()))
        cases = {
            "matmul A @ A": [_product(A, A, least) for least in (0, 1)],
            "matmul L @ L.mT": [_product(L, LT, least) for least in (0, 1)],
            "trsm, 6 right-hand sides": [_solve(tL, tA, least) for least in (0, 1)],
            "trsm, 1 right-hand side": [_solve(tL, t1, least) for least in (0, 1)],
            "join of 2 chunks": [_join(A, on) for on in (False, True)],
        }
        for piece, (one, parts) in cases.items():
            got = interleaved_ms({"one": one, "parts": parts}, rounds)
            lines.append(_row(piece, n, got["one"], got["parts"]))
    return lines


def _projection(call, thresholds):
    from tr_projections import _compat

    def run():
        _compat.MATMUL_PARALLEL_MIN_WORK, _compat.TRSM_PARALLEL_MIN_BATCH = thresholds
        call()

    return run


def projections(batches: list[int], rounds: int, methods: list[str], threads: int) -> list[str]:
    from tr_projections import _compat

    backend = make_backend("torch", threads)  # (run.py's torch worker: forward + backward)
    shipped = (_compat.MATMUL_PARALLEL_MIN_WORK, _compat.TRSM_PARALLEL_MIN_BATCH)
    lines = [
        "| projection (torch, full, fwd+bwd) | B | parts off [ms] | shipped [ms] | speed-up |",
        "|---|---:|---:|---:|---:|",
    ]
    for method in methods:
        for n in batches:
            data = make_data("full", 6, n, 20210503)
            eps_mean, eps_cov, _ = bounds_for(data, method)
            call = backend.prepare(
                data["arrays"], data["cotangents"], "backward", method, eps_mean, eps_cov
            ).call
            fns = {key: _projection(call, t) for key, t in (("off", (0, 0)), ("on", shipped))}
            got = interleaved_ms(fns, rounds)
            lines.append(_row(method, n, got["off"], got["on"]))
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1e3,1e4,1e5")
    ap.add_argument("--methods", default="kl,frobenius,wasserstein")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--quick", action="store_true", help="one small batch (CI)")
    args = ap.parse_args(argv)
    if args.quick:
        args.batches, args.methods, args.rounds = "2e3", "frobenius", 1
    import torch

    torch.set_num_threads(args.threads)
    batches = [int(float(b)) for b in args.batches.split(",")]
    print(
        machine_line(
            f"numpy {np.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads)"
        )
    )
    print(f"# medians of {args.rounds} interleaved rounds")
    from tr_projections import _compat

    shipped = (_compat.MATMUL_PARALLEL_MIN_WORK, _compat.TRSM_PARALLEL_MIN_BATCH)
    try:
        print()
        print("\n".join(pieces(batches, args.rounds)))
        print()
        print("\n".join(projections(batches, args.rounds, args.methods.split(","), args.threads)))
    finally:
        _compat.MATMUL_PARALLEL_MIN_WORK, _compat.TRSM_PARALLEL_MIN_BATCH = shipped
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
