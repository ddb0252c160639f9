"""In-process A/B of the distances and the trust-region loss, this checkout against a git revision.

    python benchmarks/distances.py REF [--functions kl,loss-kl] [--kinds full] [--dims 6]
                                       [--batches 1e3,1e5] [--backends torch,numpy] [--rounds 20]

``kl``, ``frobenius`` and ``wasserstein`` are ``trp.kl`` / ``trp.frobenius`` /
``trp.wasserstein`` (the sum of the two parts); ``loss-kl`` (and ``loss-frobenius``,
``loss-wasserstein``) is ``trp.trust_region_loss`` of the new policy against the old one with
that method. Modes: ``fwd`` the call alone; ``fwd+bwd`` with the gradient in the new policy's
mean and scale (torch ``backward()``; NumPy: the loss's ``trp.vjp``, the distances have none);
``hvp`` (torch, distances) a Hessian-vector product by double backward at the old policy itself
(new = old, where a natural gradient takes it), whose result is also checked for NaN
(``nan`` marks a version that returned one).

Both versions are imported into one process (REF extracted with ``git archive``, as in
``ab.py``) and their calls alternate round by round on the same arrays. Data are ``run.py``'s
(``_worker.make_data``). Prints medians in ms and the speed-up, with the machine and threads.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _calls(trp, name: str, x: list, library: str, mode: str):
    """A function running one call of ``name`` on ``x`` (the library's arrays) in ``mode``."""
    loss = name.startswith("loss-")
    method = name[5:] if loss else name

    def value(m, s, om, os_):
        if loss:
            return trp.trust_region_loss(m, s, om, os_, method=method).sum()
        parts = getattr(trp, method)(m, s, om, os_)
        return parts.mean.sum() + parts.cov.sum()

    if library == "numpy":
        if mode == "fwd":
            return lambda: value(*x)

        def numpy_fwd_bwd():  # (the loss only: the distances have no VJP of their own)
            out, vjp_fn = trp.vjp(trp.trust_region_loss, *x, method=method)
            return vjp_fn(out * 0.0 + 1.0, wrt=("mean", "scale"))

        return numpy_fwd_bwd
    import torch

    if mode == "fwd":
        return lambda: value(*x)
    if mode == "fwd+bwd":

        def torch_fwd_bwd():
            m, s = (a.detach().requires_grad_() for a in x[:2])
            value(m, s, x[2], x[3]).backward()
            return m.grad, s.grad

        return torch_fwd_bwd
    v = [torch.randn_like(a) for a in x[:2]]
    v[1] = torch.tril(v[1]) if x[1].ndim == 3 else v[1]

    def torch_hvp():
        m, s = (a.detach().requires_grad_() for a in x[2:])  # (at the old policy itself)
        grads = torch.autograd.grad(value(m, s, x[2], x[3]), (m, s), create_graph=True)
        directional = sum((g * w).sum() for g, w in zip(grads, v, strict=True))
        out = torch.autograd.grad(directional, (m, s))
        return bool(torch.isfinite(out[0]).all() and torch.isfinite(out[1]).all())

    return torch_hvp


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ref", help="git revision to compare against")
    ap.add_argument("--functions", default="kl,loss-kl")
    ap.add_argument("--kinds", default="full")
    ap.add_argument("--dims", default="6")
    ap.add_argument("--batches", default="1e3,1e5")
    ap.add_argument("--backends", default="torch,numpy")
    ap.add_argument("--modes", default="fwd,fwd+bwd,hvp")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    sys.path.insert(0, str(HERE))
    from ab import extract, thread_environment

    thread_environment(args.threads)
    from _report import load_line
    from _worker import interleaved_ms, limit_threads, machine_line, make_data
    from w2_roots import _batch

    limit_threads(args.threads)
    tmp = extract(args.ref, "trp_dist_")
    (tmp / "tr_projections").rename(tmp / "trp_dist_base")
    sys.path.insert(0, str(tmp))
    sys.path.insert(0, str(ROOT))
    import trp_dist_base as base

    import tr_projections as new

    versions = []
    if "torch" in args.backends:
        import torch

        torch.set_num_threads(args.threads)
        versions.append(f"torch {torch.__version__}")
    import numpy as np

    versions.append(f"numpy {np.__version__}")
    print(machine_line(f"{', '.join(versions)}, {args.threads} threads; {platform.platform()}"))
    print(f"# this checkout against {args.ref}; {args.rounds} rounds, alternated; medians in ms")
    print(load_line("start"))
    print()
    print(f"| function | kind | d | B | backend | mode | this checkout | {args.ref} | speed-up |")
    print("|---|---|---:|---:|---|---|---:|---:|---:|")
    for name in args.functions.split(","):
        for kind in args.kinds.split(","):
            for d in (int(v) for v in args.dims.split(",")):
                for batch in (_batch(b) for b in args.batches.split(",")):
                    arrays = make_data(kind, d, batch, 0)["arrays"]
                    for library in args.backends.split(","):
                        if library == "torch":
                            x = [torch.asarray(a) for a in arrays]
                        else:
                            x = list(arrays)
                        for mode in args.modes.split(","):
                            if library == "numpy" and (
                                mode == "hvp" or (mode == "fwd+bwd" and not name.startswith("loss"))
                            ):
                                continue
                            if mode == "hvp" and name.startswith("loss"):
                                continue  # (the loss's VJP is first order)
                            fns = {v: _calls(t, name, x, library, mode)
                                   for v, t in (("new", new), ("base", base))}  # fmt: skip
                            finite = {v: fn() for v, fn in fns.items()}  # (warm-up)
                            times = interleaved_ms(fns, args.rounds)
                            cells = []
                            for v in ("new", "base"):
                                nan = " (nan)" if mode == "hvp" and not finite[v] else ""
                                cells.append(f"{times[v]:.2f}{nan}")
                            ratio = times["base"] / times["new"]
                            print(
                                f"| {name} | {kind} | {d} | {batch:,} | {library} | {mode} "
                                f"| {cells[0]} | {cells[1]} | {ratio:.2f}× |",
                                flush=True,
                            )
    print(load_line("end"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
