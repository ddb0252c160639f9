"""A covariance shared by every state, passed unbatched, against the same covariance copied to
every state: the projections and the trust-region loss compute the covariance part once per
distinct covariance.

    python benchmarks/shared_cov.py                     # d = 6, B = 1e3, 1e5, torch and NumPy
    python benchmarks/shared_cov.py --batches 1e4 --kinds full --backends torch --ops loss

Both policies' scales are one matrix (full: a Cholesky factor ``(d, d)``; diag: stds ``(d,)``),
the bound a number, the means differ per state (the policy of a network with a learned,
state-independent covariance). Each cell times forward + backward (torch: ``backward`` with
the new policy requiring grad; NumPy: ``trp.vjp`` asking for the new policy's cotangents) of
the unbatched call and of the call with the scales copied to ``(B, d, d)``, interleaved, median
of repeated runs after a warm-up; the table, the machine and library versions go to stdout.
The loss (``--ops loss``) is ``trust_region_loss`` with the second policy in the projection's
slot, differentiated the same way (its per-state values summed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # (the checkout; this folder is on the path already)

from _worker import interleaved_ms, machine_line  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", default="6")
    ap.add_argument("--batches", default="1e3,1e5")
    ap.add_argument("--kinds", default="full,diag")
    ap.add_argument("--methods", default="kl,frobenius,wasserstein")
    ap.add_argument("--backends", default="torch,numpy")
    ap.add_argument("--ops", default="project,loss", help="project, loss or both (comma-separated)")
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args(argv)
    for op in args.ops.split(","):
        if op not in ("project", "loss"):
            ap.error(f"--ops takes project and loss, got {op!r}")

    versions = f"numpy {np.__version__}"
    backends = args.backends.split(",")
    if "torch" in backends:
        import torch

        versions += f", torch {torch.__version__} ({torch.get_num_threads()} threads)"
    print(machine_line(versions))
    print(f"# float64, forward + backward, median ms of {args.rounds} interleaved rounds")
    print("| op | backend | method | kind | d | B | copied to every state | shared | speed-up |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for d in [int(x) for x in args.dims.split(",")]:
        for B in [int(float(x)) for x in args.batches.split(",")]:
            for kind in args.kinds.split(","):
                mean = rng.standard_normal((B, d))
                old_mean = mean + 0.2 * rng.standard_normal((B, d))
                if kind == "full":
                    m = rng.standard_normal((2, d, d)) / np.sqrt(d)
                    scale, old_scale = np.linalg.cholesky(m @ np.swapaxes(m, -1, -2) + np.eye(d))
                else:
                    scale, old_scale = rng.uniform(0.5, 2.0, (2, d))
                shape = (B,) + scale.shape
                copies = [np.array(np.broadcast_to(x, shape)) for x in (scale, old_scale)]
                for op, method, backend in (
                    (o, m, b)
                    for o in args.ops.split(",")
                    for m in args.methods.split(",")
                    for b in backends
                ):
                    calls = {
                        name: _call(op, backend, method, mean, s, old_mean, so)
                        for name, (s, so) in (
                            ("copied", copies), ("shared", (scale, old_scale))
                        )
                    }  # fmt: skip
                    t = interleaved_ms(calls, args.rounds)
                    c, s = t["copied"], t["shared"]
                    print(
                        f"| {op} | {backend} | {method} | {kind} | {d} | {B:,} | {c:.3f} | "
                        f"{s:.3f} | {c / s:.1f}× |",
                        flush=True,
                    )
    return 0


def _call(op: str, backend: str, method: str, mean, scale, old_mean, old_scale):
    import tr_projections as trp

    bounds = {"eps_mean": 0.05, "eps_cov": 1e-3}
    if backend == "torch":
        import torch

        t = [torch.asarray(x) for x in (mean, scale, old_mean, old_scale)]

        def run() -> None:
            m, s = t[0].clone().requires_grad_(), t[1].clone().requires_grad_()
            if op == "loss":
                trp.trust_region_loss(m, s, t[2], t[3], method=method).sum().backward()
                return
            out = trp.project(m, s, t[2], t[3], method=method, **bounds)
            (out.mean.sum() + out.scale.sum()).backward()

        return run

    def run_np() -> None:
        if op == "loss":
            out, vjp_fn = trp.vjp(
                trp.trust_region_loss, mean, scale, old_mean, old_scale, method=method
            )
            vjp_fn(np.ones_like(out), wrt=("mean", "scale"))
            return
        out, vjp_fn = trp.vjp(
            trp.project, mean, scale, old_mean, old_scale, method=method, **bounds
        )
        vjp_fn((np.ones_like(out.mean), np.ones_like(out.scale)), wrt=("mean", "scale"))

    return run_np


if __name__ == "__main__":
    raise SystemExit(main())
