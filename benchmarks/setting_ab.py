"""In-process A/B of one package setting: run.py's cells with a module attribute as it is and
set to another value, alternated round by round on the same arrays.

    python benchmarks/setting_ab.py _compat.ONE_BLAS_THREAD_IN_LANES=0 --kind diag --batch 100000
    python benchmarks/setting_ab.py _compat.LAPACK_THREADS=1 --method wasserstein --dim 32

``MODULE.NAME=VALUE`` names an attribute of a module of the package (``tr_projections.`` may be
left out; the value is parsed as a Python literal where it is one, else kept as text) that the
package reads when it runs or traces. Each backend (``--backends``: run.py's workers' ``torch``
and ``numpy``, and ``jax``, jitted) prepares the cell as ``run.py`` does (same data, bounds and
cotangents; torch's forward + backward is ``loss.backward()``, NumPy's ``trp.vjp``, JAX's
``value_and_grad``), once with the attribute as it is ("as is") and once with the value
("set"), so that JAX traces and compiles each with its own; then it times both, interleaved,
each call under its value (the attribute is put back after each). One process, so the two
variants share the machine's load and the allocator's state, where run.py's ``--variant-env``
compares separate processes (whose cells of tens of milliseconds move by 10-50 % between
processes). Prints the machine, the medians and "as is" over "set" (above 1: the setting is
faster).
"""

from __future__ import annotations

import argparse
import ast
import functools
import importlib
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
from ab import cell_options, thread_environment  # noqa: E402


def parse_setting(text: str) -> tuple[object, str, object]:
    """``(module, attribute, value)`` of ``MODULE.NAME=VALUE``, or an error naming what is
    wrong."""
    target, sep, raw = text.partition("=")
    module_name, dot, attr = target.strip().rpartition(".")
    if not sep or not dot or not attr:
        raise SystemExit(f"setting_ab.py: expected MODULE.NAME=VALUE, got {text!r}")
    if not module_name.startswith("tr_projections"):
        module_name = "tr_projections." + module_name
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SystemExit(f"setting_ab.py: no module {module_name!r} ({exc})") from None
    if not hasattr(module, attr):
        raise SystemExit(f"setting_ab.py: {module_name} has no attribute {attr!r}")
    try:
        value = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
        value = raw.strip()
    return module, attr, value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("setting", help="MODULE.NAME=VALUE, e.g. _compat.LAPACK_THREADS=1")
    ap.add_argument("--backends", default="torch,numpy")
    cell_options(ap, kind="full", batch=100_000)
    ap.add_argument("--rounds", type=int, default=21)
    args = ap.parse_args(argv)

    thread_environment(args.threads)  # (before any array library is imported)
    limit_threads(args.threads)
    module, attr, value = parse_setting(args.setting)
    data = make_data(args.kind, args.dim, args.batch, 0)
    eps_mean, eps_cov, frac = bounds_for(data, args.method, args.quantile)
    backends = [make_backend(name, args.threads) for name in args.backends.split(",")]
    versions = ", ".join(f"{k} {v}" for b in backends for k, v in b.versions().items())
    print(machine_line(versions))
    print(
        f"# {args.method} {args.kind} d={args.dim} B={args.batch}, bounds at quantile "
        f"{args.quantile} ({frac:.0%} projected); {module.__name__}.{attr}: "
        f"{getattr(module, attr)!r} (as is) against {value!r} (set); median ms of "
        f"{args.rounds} interleaved rounds"
    )
    print("| backend | mode | as is | set | as is / set |")
    print("|---|---|---:|---:|---:|")
    as_is = getattr(module, attr)

    def under(new: object, fn, *a):  # fn(*a) with the attribute at `new`, then put back
        old = getattr(module, attr)
        setattr(module, attr, new)
        try:
            return fn(*a)
        finally:
            setattr(module, attr, old)

    for backend in backends:
        for mode in ("forward", "backward"):
            # (prepared under each value: JAX traces and compiles here, with the setting)
            calls = {}
            for name, v in (("as is", as_is), ("set", value)):
                prepared = under(
                    v, backend.prepare,
                    data["arrays"], data["cotangents"], mode, args.method, eps_mean, eps_cov,
                )  # fmt: skip
                run = functools.partial(lambda p: p.sync(p.call()), prepared)
                calls[name] = functools.partial(under, v, run)
            t = interleaved_ms(calls, args.rounds)
            label = "fwd" if mode == "forward" else "fwd+bwd"
            print(
                f"| {backend.name} | {label} | {t['as is']:.2f} | {t['set']:.2f} | "
                f"{t['as is'] / t['set']:.2f}× |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
