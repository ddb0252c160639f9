"""Jitted JAX KL projections with and without slots, by batch size.

Under ``jax.jit`` a full-covariance KL projection runs its costly stages in slots
(``tr_projections._rows.choose_slots``, docs/backends.md): the first half of the batch always,
the second half only when more than half of the rows may be outside their bound. This script
compiles ``value_and_grad`` of the benchmark's loss (``run.py``'s data and bounds, full 6-D
states) twice for each batch size, with slots (``SLOT_FRACTIONS = (0.5,)``, the minimum batch
lowered to 1 so that every size takes them) and without (``()``), reports both compile times,
times the two programs interleaved round by round and prints their medians and ratio:

    python benchmarks/jax_slots.py                          # B = 16 ... 4096
    python benchmarks/jax_slots.py --batches 1e4,1e5 --rounds 7
    python benchmarks/jax_slots.py --quantile 0     # every state outside: both slots run
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # (the checkout; this folder is on the path already)

from _worker import (  # noqa: E402
    bounds_for,
    interleaved_ms,
    limit_threads,
    machine_line,
    make_data,
)


def compiled_loss(data: dict, quantile: float) -> tuple:
    """``(call, compile seconds)``: ``value_and_grad`` of the benchmark's loss of ``data``'s
    KL projection by the new mean and scale, jitted and compiled under the current settings."""
    import jax
    import jax.numpy as jnp

    import tr_projections as trp

    eps_mean, eps_cov, _ = bounds_for(data, "kl", quantile)
    x = [jnp.asarray(a) for a in data["arrays"]]
    g_mean, g_scale = (jnp.asarray(a) for a in data["cotangents"])

    def loss(m, s, om, os_):
        out = trp.project(m, s, om, os_, method="kl", eps_mean=eps_mean, eps_cov=eps_cov)
        return (out.mean * g_mean).sum() + (out.scale * g_scale).sum()

    t0 = time.perf_counter()
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*x).compile()
    return (lambda: jax.block_until_ready(fn(*x))), time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="16,64,256,512,1024,4096")
    ap.add_argument("--dim", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument(
        "--quantile", type=float, default=0.7,
        help="bounds' quantile (run.py's 0.7: about 30 %% of full states pass the row test; "
        "0: all but one state outside, both slots run)",
    )  # fmt: skip
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    limit_threads(args.threads)
    import jax

    jax.config.update("jax_enable_x64", True)
    from tr_projections import _rows

    _rows.MIN_ROWS_SLOTS = 1
    print(machine_line(f"jax {jax.__version__}, {args.threads} CPUs (affinity)"))
    print(f"# KL full d={args.dim}, value_and_grad jitted, float64, bounds at quantile "
          f"{args.quantile}, medians of {args.rounds} interleaved rounds")  # fmt: skip
    print("| B | projected | compile, no slots [s] | compile, slots [s] | no slots [ms] "
          "| slots [ms] | speed-up |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for batch in (int(float(b)) for b in args.batches.split(",")):
        data = make_data("full", args.dim, batch, 0)  # (diagonal KL takes no slots)
        frac = bounds_for(data, "kl", args.quantile)[2]
        calls, compile_s = {}, {}
        for name, fractions in (("none", ()), ("slots", (0.5,))):
            _rows.SLOT_FRACTIONS = fractions
            calls[name], compile_s[name] = compiled_loss(data, args.quantile)
        ms = interleaved_ms(calls, args.rounds)
        row = [f"{batch:,}", f"{frac:.0%}"]
        row += [f"{compile_s[k]:.2f}" for k in ("none", "slots")]
        row += [f"{ms[k]:.3g}" for k in ("none", "slots")] + [f"{ms['none'] / ms['slots']:.2f}×"]
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
