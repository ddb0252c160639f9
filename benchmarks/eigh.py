"""Batched ``eigh`` of small symmetric matrices, by every route the package can take.

The full-Gaussian projections' one decomposition is a batched ``eigh`` of d×d matrices. On a GPU
torch's own routine fails from 65,536 matrices (``tr_projections._compat`` then runs it in chunks
of :data:`~tr_projections._compat.TORCH_CUDA_MAX_BATCH`), while CuPy's takes a million in one
call; torch CUDA tensors can be handed to CuPy zero-copy through DLPack
(``_compat.TORCH_CUDA_EIGH``). This script times, on the same seeded float64 SPD matrices:

- ``torch``: ``torch.linalg.eigh`` in one call (fails where the library fails: shown as such),
- ``torch chunked``: ``_compat.eigh`` with ``TORCH_CUDA_EIGH = "torch"``,
- ``torch→cupy``: ``_compat.eigh`` with ``"cupy"`` (DLPack both ways, torch's stream, chunks
  of ``CUPY_MAX_BATCH``),
- ``cupy``: ``cupy.linalg.eigh`` on CuPy arrays in one call,
- ``cupy chunked``: ``_compat.eigh`` of CuPy arrays (chunks of ``CUPY_MAX_BATCH``),
- ``jax``: ``jax.numpy.linalg.eigh``, jitted (compilation excluded).

On the CPU (``--device cpu``) the torch routes are one and the same and CuPy is absent; there
the package's host build of its small-matrix kernels (``TRP_FUSED_CPU=on``) adds

- ``numpy (_compat)``: ``_compat.eigh`` of NumPy arrays, LAPACK's routine split over the
  threads (the package's default),
- ``kernel (_compat)``: the same call with the host build on: its Jacobi kernel
  (``_small_kernels.eigh``), split over the threads from ``EIGH_PARALLEL_MIN_WORK``,
- ``kernel, 1 thread``: ``_small_kernels.eigh`` in one call, for every size it is built for
  (up to ``MAX_D``, beyond the ``EIGH_MAX_D`` the package gives it),
- ``kernel, split``: the kernel split over the threads whatever the batch (what
  ``EIGH_PARALLEL_MIN_WORK`` decides from).

A route that does not take a batch (the package keeps LAPACK's routine for it) reads "n/a".

    python benchmarks/eigh.py --device cuda                 # d = 6, B up to 1e6
    python benchmarks/eigh.py --device cpu --batches 1000   # a few seconds
    python benchmarks/eigh.py --device cpu --d 2,6,16 --batches 1000,100000

Medians of repeated synchronised runs after a warm-up, the routes of one batch in turn in every
round (on a shared machine, slow phases then hit every route alike); the table, the machine,
thread counts and library versions go to stdout, everything to ``--json``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def spd(batch: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((batch, d, d))
    return m @ np.swapaxes(m, -1, -2) + d * np.eye(d)


def timed(calls: dict, *, warmup: int, repeat: int, budget: float) -> dict[str, dict]:
    """``name -> (call, sync)`` timed in turn, one call of each per round, after ``warmup``
    calls each: at most ``repeat`` rounds, at least 3, until ``budget`` seconds per route. A
    route that fails is reported, not fatal."""
    cells: dict[str, dict] = {}
    times: dict[str, list[float]] = {}
    for name, (fn, sync) in calls.items():
        try:
            for _ in range(warmup):
                sync(fn())
            times[name] = []
        except Exception as exc:
            cells[name] = {"status": "error", "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    start = time.perf_counter()
    rounds = 0
    while (
        times
        and rounds < repeat
        and (rounds < 3 or time.perf_counter() - start < budget * len(times))
    ):
        for name in list(times):
            fn, sync = calls[name]
            try:
                t0 = time.perf_counter()
                sync(fn())
                times[name].append(time.perf_counter() - t0)
            except Exception as exc:
                cells[name] = {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:200]}
                del times[name]
        rounds += 1
    for name, ts in times.items():
        if ts:
            cells[name] = {"status": "ok", "median_s": statistics.median(ts), "n": len(ts)}
        else:
            cells[name] = {"status": "error", "error": "no timed run (--repeat 0)"}
    return cells


class NotTaken(Exception):
    """A route that does not take this batch (the package keeps another route for it)."""


@contextlib.contextmanager
def host_build(on: bool):
    """The package's host build of its kernels on (``TRP_FUSED_CPU=on``) or off, within."""
    from tr_projections.projections import _kl_diag_fused as fused

    old = fused.FUSED_CPU
    fused.FUSED_CPU = "on" if on else "off"
    try:
        yield
    finally:
        fused.FUSED_CPU = old


def routes(device: str) -> dict[str, tuple]:
    """name -> (prepare(np_array) -> call, sync), for the libraries installed here."""
    out: dict[str, tuple] = {}
    try:
        import array_api_compat.torch as tns
        import torch

        from tr_projections import _compat

        dev = "cuda" if device == "cuda" else "cpu"

        def tsync(_r: Any) -> None:
            if dev == "cuda":
                torch.cuda.synchronize()

        def via(route: str):
            def prepare(a: np.ndarray):
                x = torch.asarray(a, device=dev)

                def call():
                    old = _compat.TORCH_CUDA_EIGH
                    _compat.TORCH_CUDA_EIGH = route
                    try:
                        return _compat.eigh(x, xp=tns)
                    finally:
                        _compat.TORCH_CUDA_EIGH = old

                return call

            return prepare

        if dev == "cuda":
            out["torch chunked"] = (via("torch"), tsync)
            if _compat._cupy_sees_gpu():
                out["torch→cupy"] = (via("cupy"), tsync)
        else:

            def plain(prepare):  # (the library's route: the host build off)
                def wrapped(a):
                    call = prepare(a)

                    def run():
                        with host_build(False):
                            return call()

                    return run

                return wrapped

            out["torch (_compat)"] = (plain(via("auto")), tsync)
        out["torch"] = (
            lambda a: (lambda x: lambda: torch.linalg.eigh(x))(torch.asarray(a, device=dev)),
            tsync,
        )
    except ImportError:
        pass
    if device == "cuda":
        try:
            import cupy

            if cupy.is_available():
                import array_api_compat.cupy as cns

                from tr_projections import _compat

                csync = lambda _r: cupy.cuda.get_current_stream().synchronize()  # noqa: E731
                out["cupy"] = (
                    lambda a: (lambda x: lambda: cupy.linalg.eigh(x))(cupy.asarray(a)),
                    csync,
                )
                out["cupy chunked"] = (
                    lambda a: (lambda x: lambda: _compat.eigh(x, xp=cns))(cupy.asarray(a)),
                    csync,
                )
        except ImportError:
            pass
    else:
        import array_api_compat.numpy as nns

        from tr_projections import _compat, _small_kernels
        from tr_projections.projections import _kl_diag_fused as fused

        nsync = lambda _r: None  # noqa: E731
        out["numpy"] = (lambda a: lambda: np.linalg.eigh(a), nsync)

        def compat(on: bool):
            def prepare(a: np.ndarray):
                with host_build(on):  # (asked once here, not in the timed calls)
                    if on and not _small_kernels.eigh_applies(a, xp=nns):
                        raise NotTaken("the package keeps LAPACK's routine for these")

                def call():
                    with host_build(on):
                        return _compat.eigh(a, xp=nns)

                return call

            return prepare

        out["numpy (_compat)"] = (compat(False), nsync)
        if fused.compiler() is not None:
            out["kernel (_compat)"] = (compat(True), nsync)

            def takes(a: np.ndarray) -> None:
                # The kernel itself, for every size it is built for (up to MAX_D, beyond the
                # package's EIGH_MAX_D); asked once, not in the timed calls.
                with host_build(True):
                    if not _small_kernels.applies(a, xp=nns):
                        raise NotTaken("the kernel is not built for these")
                    if _small_kernels.eigh(a[:1], xp=nns) is None:
                        raise RuntimeError("the host build failed")

            def kernel(a: np.ndarray):
                return _small_kernels.eigh(a, xp=nns)

            def single(a: np.ndarray):
                takes(a)
                return functools.partial(kernel, a)

            out["kernel, 1 thread"] = (single, nsync)

            def split(a: np.ndarray):
                takes(a)
                return lambda: _compat._chunked(kernel, a, xp=nns, parallel_from=2)

            out["kernel, split"] = (split, nsync)
    try:
        import jax

        jax.config.update("jax_enable_x64", True)
        gpus = [dv for dv in jax.devices() if dv.platform in ("gpu", "cuda")]
        jdev = gpus[0] if device == "cuda" and gpus else jax.devices("cpu")[0]
        if device == "cpu" or gpus:

            def jprep(a: np.ndarray):
                x = jax.device_put(a, jdev)
                f = jax.jit(jax.numpy.linalg.eigh).lower(x).compile()
                return lambda: f(x)

            out["jax"] = (jprep, jax.block_until_ready)
    except ImportError:
        pass
    return out


def versions() -> dict[str, str | None]:
    import importlib.metadata as md

    found: dict[str, str | None] = {}
    for name in ("numpy", "torch", "cupy-cuda12x", "cupy-cuda13x", "jax", "jaxlib"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return found


def gpu_name() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else None
    except ImportError:
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    p.add_argument("--d", default="6", help="matrix size, or a comma list (default 6)")
    p.add_argument(
        "--batches",
        default="1000,10000,32768,100000,1000000",
        help="comma list (default 1e3,1e4,32768,1e5,1e6)",
    )
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--budget", type=float, default=0.3, help="seconds of timed runs per cell")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    batches = [int(float(b)) for b in args.batches.split(",") if b.strip()]

    dims = [int(d) for d in str(args.d).split(",") if d.strip()]

    available = routes(args.device)
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or None,
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "gpu": gpu_name() if args.device == "cuda" else None,
        "packages": versions(),
    }
    try:
        from tr_projections import _compat

        machine["split_threads"] = _compat.split_threads(_compat.array_namespace(np.ones(1)))
        import torch

        machine["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    print(f"# {machine}")
    rows = []
    for d in dims:
        for batch in batches:
            a = spd(batch, d, seed=batch)
            want = np.linalg.eigvalsh(a[:64])
            calls, errors = {}, {}
            for name, (prepare, sync) in available.items():
                try:
                    call = prepare(a)
                    w = call()[0]
                    w = w[:64]
                    got = w.cpu() if hasattr(w, "cpu") else w.get() if hasattr(w, "get") else w
                    got = np.asarray(got)
                    errors[name] = float(np.max(np.abs(got - want) / np.abs(want)))
                    calls[name] = (call, sync)
                except Exception as exc:  # reported in the table
                    rows.append({
                        "status": "n/a" if isinstance(exc, NotTaken) else "error",
                        "error": f"{type(exc).__name__}: {str(exc)[:200]}",
                        "route": name, "batch": batch, "d": d,
                    })  # fmt: skip
            cells = timed(calls, warmup=1, repeat=args.repeat, budget=args.budget)
            for name, cell in cells.items():
                cell.update(route=name, batch=batch, d=d, max_rel_err=errors[name])
                rows.append(cell)
            del calls
    names = list(available)
    for d in dims:
        print(f"\n### eigh of B float64 {d}x{d} SPD matrices, median ms ({args.device})\n")
        print("| B | " + " | ".join(names) + " |")
        print("|---:|" + "---:|" * len(names))
        for batch in batches:
            cells = []
            for name in names:
                c = next(r for r in rows if (r["batch"], r["d"], r["route"]) == (batch, d, name))
                text = {"ok": None, "n/a": "n/a"}.get(c["status"], "fails")
                cells.append(text or f"{c['median_s'] * 1e3:.3g}")
            print(f"| {batch:,} | " + " | ".join(cells) + " |")
    for r in rows:
        if r["status"] != "ok":
            print(f"# {r['route']} B={r['batch']:,}: {r['error']}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
