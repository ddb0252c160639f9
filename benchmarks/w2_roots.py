"""W2 projections of full Gaussians: Cholesky factors (the default) against symmetric roots
(``root=True``), the same Gaussians, in one process.

    python benchmarks/w2_roots.py [--dims 6] [--batches 1e3,1e4,1e5] [--backends torch,numpy,jax]

The data, bounds and cotangents are ``run.py``'s (``_worker.make_data``/``bounds_for``, W2 at
the bounds' quantile); the roots are those of the same covariances, :math:`S = U\\,\\mathrm{diag}
(s)\\,U^\\top` from the SVD :math:`L = U\\,\\mathrm{diag}(s)\\,V^\\top` of each factor. Each backend
prepares the cell as ``run.py`` does (torch's forward + backward is ``loss.backward()`` into the
new policy, NumPy's ``trp.vjp``, JAX's jitted ``value_and_grad``), once per input form; the
forms are timed interleaved round by round, and the roots also with the value checks off
(``trp.checks(False)``; JAX's jitted calls check nothing either way). Prints the machine, the
medians, Cholesky over roots, and how far apart the two forms' projected covariances are
(:math:`\\tilde S^2` against :math:`\\tilde L\\tilde L^\\top`, the largest difference over the
largest entry of the covariance). ``--memory`` adds, at the largest batch, the peak extra
memory of one forward + backward call of each form over the size of its four inputs, as
``run.py`` measures it (tracemalloc for NumPy; torch's profiler plus tracemalloc for torch).
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # (the checkout; this folder is on the path already)

from _worker import (  # noqa: E402
    bounds_for,
    interleaved_ms,
    limit_threads,
    machine_line,
    make_backend,
    make_data,
)
from ab import thread_environment  # noqa: E402


def roots_of(scale):
    """The symmetric roots of ``scale @ scale.T`` (NumPy float64), from the SVD of ``scale``:
    accurate in the factor's own condition number, and symmetric to the last bit."""
    import numpy as np

    U, s, _ = np.linalg.svd(scale)
    S = (U * s[..., None, :]) @ np.swapaxes(U, -1, -2)
    return 0.5 * (S + np.swapaxes(S, -1, -2))


def agreement(arrays, roots, eps_mean, eps_cov) -> float:
    """The largest difference between the two forms' projected covariances, over the largest
    entry of the covariance (NumPy, whole batch)."""
    import numpy as np

    import tr_projections as trp

    kw = {"eps_mean": eps_mean, "eps_cov": eps_cov}
    L = trp.project_wasserstein(*arrays, **kw).scale
    S = trp.project_wasserstein(*roots, **kw, root=True).scale
    cov = L @ np.swapaxes(L, -1, -2)
    return float(np.max(np.abs(S @ S - cov)) / np.max(np.abs(cov)))


def _batch(text: str) -> int:
    return int(float(text))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dims", default="6", help="comma-separated d")
    ap.add_argument("--batches", default="1e3,1e4,1e5", help="comma-separated batch sizes")
    ap.add_argument("--backends", default="torch,numpy,jax")
    ap.add_argument("--modes", default="forward,backward", help="'none': memory only")
    ap.add_argument("--quantile", type=float, default=0.7, help="bounds' quantile (run.py's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--memory", action="store_true", help="peak extra memory at the largest B")
    args = ap.parse_args(argv)

    thread_environment(args.threads)  # (before any array library is imported)
    limit_threads(args.threads)
    import tr_projections as trp

    backends = [make_backend(name, args.threads) for name in args.backends.split(",")]
    versions = ", ".join(f"{k} {v}" for b in backends for k, v in b.versions().items())
    print(machine_line(versions))
    modes = [] if args.modes == "none" else args.modes.split(",")
    if modes:
        print(
            f"# W2 full, bounds at quantile {args.quantile}; median ms of {args.rounds} "
            "interleaved rounds; fwd+bwd into the new policy only"
        )
        print(
            "| backend | d | B | mode | Cholesky | roots | roots, checks off | Cholesky / roots |\n"
            "|---|---:|---:|---|---:|---:|---:|---:|"
        )

    def unchecked(run):
        with trp.checks(False):
            return run()

    notes = []
    for d in (int(x) for x in args.dims.split(",")):
        for batch in (_batch(x) for x in args.batches.split(",")):
            data = make_data("full", d, batch, 0)
            eps_mean, eps_cov, frac = bounds_for(data, "wasserstein", args.quantile)
            arrays = data["arrays"]
            roots = (arrays[0], roots_of(arrays[1]), arrays[2], roots_of(arrays[3]))
            gap = agreement(arrays, roots, eps_mean, eps_cov)
            notes.append(f"d={d} B={batch}: {frac:.0%} projected; covariances agree to {gap:.1e}")
            for backend in backends:
                for mode in modes:
                    calls = {}
                    for name, x, options in (
                        ("chol", arrays, None),
                        ("roots", roots, {"root": True}),
                    ):
                        prepared = backend.prepare(
                            x, data["cotangents"], mode, "wasserstein", eps_mean, eps_cov,
                            options=options,
                        )  # fmt: skip
                        calls[name] = functools.partial(lambda p: p.sync(p.call()), prepared)
                    calls["unchecked"] = functools.partial(unchecked, calls["roots"])
                    for run in calls.values():  # (warm-up)
                        run()
                    t = interleaved_ms(calls, args.rounds)
                    label = "fwd" if mode == "forward" else "fwd+bwd"
                    print(
                        f"| {backend.name} | {d} | {batch} | {label} | {t['chol']:.3g} | "
                        f"{t['roots']:.3g} | {t['unchecked']:.3g} | "
                        f"{t['chol'] / t['roots']:.2f}× |",
                        flush=True,
                    )
    for note in notes:
        print(f"# {note}")
    if args.memory:
        print_memory(backends, args, trp)
    return 0


def print_memory(backends, args, trp) -> None:
    """Peak extra memory of forward + backward over the inputs' size, both forms, at the
    largest batch of the first d (backends that measure it: NumPy, torch on the CPU)."""
    d = int(args.dims.split(",")[0])
    batch = max(_batch(x) for x in args.batches.split(","))
    data = make_data("full", d, batch, 0)
    eps_mean, eps_cov, _ = bounds_for(data, "wasserstein", args.quantile)
    arrays = data["arrays"]
    roots = (arrays[0], roots_of(arrays[1]), arrays[2], roots_of(arrays[3]))
    print(f"# peak extra memory over the inputs' size, fwd+bwd, d={d} B={batch}")
    print("| backend | Cholesky | roots | how |")
    print("|---|---:|---:|---|")
    for backend in backends:
        ratios, how = [], ""
        for x, options in ((arrays, None), (roots, {"root": True})):
            prepared = backend.prepare(
                x, data["cotangents"], "backward", "wasserstein", eps_mean, eps_cov,
                options=options,
            )  # fmt: skip
            prepared.sync(prepared.call())  # (warm-up)
            peak, how = backend.memory(prepared)
            ratios.append("n/a" if peak is None else f"{peak / sum(a.nbytes for a in x):.2f}×")
        print(f"| {backend.name} | {ratios[0]} | {ratios[1]} | {how} |", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
