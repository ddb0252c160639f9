"""In-process A/B of this checkout against a git revision, torch (or jitted JAX, or NumPy) on
the CPU.

    python benchmarks/ab.py REF --kind full --method kl --batch 1000 [--rounds 30] [--quantile 0.7]
    python benchmarks/ab.py REF --backend jax ...   # jitted JAX on the CPU, compilation excluded
    python benchmarks/ab.py REF --backend numpy ... # NumPy: trp.project, and trp.vjp after it
    python benchmarks/ab.py REF --method wasserstein --root ...  # full scales as symmetric roots

Both versions of the package are imported into one process (REF extracted with ``git archive``
under a temporary name) and their calls are alternated round by round on the same tensors, so
that the machine's load hits both alike: on a shared machine this resolves differences of a few
per cent that separate runs of ``run.py`` cannot (its cells moved by 0.7–1.4× between runs).
Prints the median forward and forward + backward times of both and their ratio, with the machine
and thread count. Data and bounds are ``run.py``'s (``_worker.make_data``/``bounds_for``); only the
new policy requires grad, as in ``run.py``. With ``--root`` (W2, full), the full scales are the
symmetric roots of the same covariances (``w2_roots.roots_of``) and both versions project them
with ``root=True``.
"""

from __future__ import annotations

import argparse
import inspect
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def extract(ref: str, prefix: str) -> Path:
    """A new temporary folder holding the package as it was at git ``ref``."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", ref, "tr_projections"],
        check=True, capture_output=True,
    ).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
    return tmp


def cell_options(ap: argparse.ArgumentParser, *, kind: str, batch: int) -> None:
    """Add the options of one ``run.py`` cell that the A/B scripts share (this one,
    ``fresh.py`` and ``setting_ab.py``): kind, method, d, B, bounds' quantile, threads."""
    ap.add_argument("--kind", choices=("diag", "full"), default=kind)
    ap.add_argument("--method", choices=("kl", "frobenius", "wasserstein"), default="kl")
    ap.add_argument("--dim", type=int, default=6)
    ap.add_argument("--batch", type=int, default=batch)
    ap.add_argument("--quantile", type=float, default=0.7, help="bounds' quantile (run.py's)")
    ap.add_argument("--threads", type=int, default=2)


def cell_arguments(doc: str, *, kind: str, batch: int) -> argparse.ArgumentParser:
    """The arguments of an A/B against a revision (this script and ``fresh.py``): the revision
    and the cell (:func:`cell_options`)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("ref", help="git revision to compare against (e.g. cb96c53)")
    cell_options(ap, kind=kind, batch=batch)
    return ap


def thread_environment(threads: int, env: dict | None = None) -> dict:
    """``env`` (default: this process's ``os.environ``) with the BLAS/OpenMP thread counts set
    to ``threads`` and ``OMP_WAIT_POLICY=PASSIVE`` unless set: before any array library is
    imported in the process that reads it."""
    env = os.environ if env is None else env
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    return env


def main(argv: list[str] | None = None) -> int:
    ap = cell_arguments(__doc__, kind="full", batch=1000)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--backend", choices=("torch", "jax", "numpy"), default="torch")
    ap.add_argument("--root", action="store_true", help="W2 of symmetric roots (root=True)")
    args = ap.parse_args(argv)
    if args.root and (args.method, args.kind) != ("wasserstein", "full"):
        ap.error("--root needs --method wasserstein --kind full")

    thread_environment(args.threads)
    sys.path.insert(0, str(HERE))
    from _worker import bounds_for, interleaved_ms, limit_threads, make_data

    limit_threads(args.threads)
    tmp = extract(args.ref, "trp_ab_")
    (tmp / "tr_projections").rename(tmp / "trp_ab_base")
    sys.path.insert(0, str(tmp))
    sys.path.insert(0, str(ROOT))
    import trp_ab_base as base

    import tr_projections as new

    data = make_data(args.kind, args.dim, args.batch, 0)
    eps_mean, eps_cov, frac = bounds_for(data, args.method, args.quantile)
    options = {}
    if args.root:
        from w2_roots import roots_of

        m, L, old_m, old_L = data["arrays"]
        data = {**data, "arrays": (m, roots_of(L), old_m, roots_of(old_L))}
        options = {"root": True}
    if args.backend == "jax":
        calls, library = jax_calls(data, args.method, eps_mean, eps_cov, options)
    elif args.backend == "numpy":
        calls, library = numpy_calls(data, args.method, eps_mean, eps_cov, options)
    else:
        calls, library = torch_calls(data, args.method, eps_mean, eps_cov, args.threads, options)
    fns = {"new": calls(new), "base": calls(base)}
    for v in fns:  # warm-up (interleaved_ms adds one untimed round)
        for fn in fns[v].values():
            fn()
    times = interleaved_ms(
        {(v, m): fn for v in fns for m, fn in fns[v].items()}, args.rounds
    )  # (alternated round by round, neither version always first)
    print(
        f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{args.threads} threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}; "
        f"{platform.platform()}; {library}"
    )
    form = " (symmetric roots, root=True)" if args.root else ""
    print(f"# {args.method} {args.kind}{form} d={args.dim} B={args.batch}, bounds at quantile "
          f"{args.quantile} ({frac:.0%} projected), {args.rounds} rounds, medians")  # fmt: skip
    print("| mode | this checkout [ms] | " + args.ref + " [ms] | speed-up |")
    print("|---|---:|---:|---:|")
    for m in ("fwd", "fwd+bwd"):
        a, b = (times[(v, m)] for v in ("new", "base"))
        print(f"| {m} | {a:.2f} | {b:.2f} | {b / a:.2f}× |")
    return 0


def torch_calls(
    data: dict, method: str, eps_mean: float, eps_cov: float, threads: int, options: dict
):
    """``(calls, library)``: ``calls(module)`` gives the forward and forward + backward of
    ``module.project`` on torch tensors (the new policy requires grad), with ``options``
    (e.g. ``root=True``)."""
    import torch

    torch.set_num_threads(threads)
    x = [torch.tensor(a, requires_grad=i < 2) for i, a in enumerate(data["arrays"])]
    g = [torch.tensor(a) for a in data["cotangents"]]

    def calls(mod):
        def fwd():
            with torch.no_grad():
                mod.project(*x, method=method, eps_mean=eps_mean, eps_cov=eps_cov, **options)

        def both():
            out = mod.project(*x, method=method, eps_mean=eps_mean, eps_cov=eps_cov, **options)
            torch.autograd.backward(list(out), g)

        return {"fwd": fwd, "fwd+bwd": both}

    return calls, f"torch {torch.__version__}"


def numpy_calls(data: dict, method: str, eps_mean: float, eps_cov: float, options: dict):
    """``(calls, library)`` as :func:`torch_calls`, for NumPy arrays: each module's forward,
    and its ``vjp`` with the new policy's cotangents (``run.py``'s NumPy cells)."""
    import numpy as np

    x = [np.array(a, copy=True) for a in data["arrays"]]
    kw = {"method": method, "eps_mean": eps_mean, "eps_cov": eps_cov, **options}

    def calls(mod):
        ct = mod.Gaussian(*(np.array(a, copy=True) for a in data["cotangents"]))

        def both():
            _, vjp_fn = mod.vjp(mod.project, *x, **kw)
            # (revisions before `wrt` compute all four cotangents, as run.py's workers do)
            if "wrt" in inspect.signature(vjp_fn).parameters:
                return vjp_fn(ct, wrt=("mean", "scale"))
            return vjp_fn(ct)

        return {"fwd": lambda: mod.project(*x, **kw), "fwd+bwd": both}

    return calls, f"numpy {np.__version__}"


def jax_calls(data: dict, method: str, eps_mean: float, eps_cov: float, options: dict):
    """``(calls, library)`` as :func:`torch_calls`, for JAX arrays on the CPU: each module's
    forward and ``value_and_grad`` (of the outputs against the fixed cotangents, by the mean
    and scale) jitted and compiled before timing."""
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    x = [jnp.asarray(a) for a in data["arrays"]]
    gm, gs = (jnp.asarray(a) for a in data["cotangents"])
    kw = {"method": method, "eps_mean": eps_mean, "eps_cov": eps_cov, **options}

    def calls(mod):
        def loss(m, s, om, os_):
            out = mod.project(m, s, om, os_, **kw)
            return (out.mean * gm).sum() + (out.scale * gs).sum()

        fwd = jax.jit(lambda *a: tuple(mod.project(*a, **kw))).lower(*x).compile()
        both = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*x).compile()
        return {
            "fwd": lambda: jax.block_until_ready(fwd(*x)),
            "fwd+bwd": lambda: jax.block_until_ready(both(*x)),
        }

    return calls, f"jax {jax.__version__} (jitted)"


if __name__ == "__main__":
    raise SystemExit(main())
