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

On the CPU (``--device cpu``) the torch routes are one and the same, and CuPy is absent.

    python benchmarks/eigh.py --device cuda                 # d = 6, B up to 1e6
    python benchmarks/eigh.py --device cpu --batches 1000   # a few seconds

Medians of repeated synchronised runs after a warm-up; the table, the machine and library
versions go to stdout, everything to ``--json``.
"""

from __future__ import annotations

import argparse
import json
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


def timed(fn, sync, *, warmup: int, repeat: int, budget: float) -> dict[str, Any]:
    try:
        for _ in range(warmup):
            sync(fn())
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < repeat and (len(times) < 3 or time.perf_counter() - start < budget):
            t0 = time.perf_counter()
            sync(fn())
            times.append(time.perf_counter() - t0)
    except Exception as exc:  # a route that fails is reported, not fatal
        return {"status": "error", "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    return {"status": "ok", "median_s": statistics.median(times), "n": len(times)}


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
            out["torch (_compat)"] = (via("auto"), tsync)
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
        out["numpy"] = (lambda a: lambda: np.linalg.eigh(a), lambda _r: None)
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
    p.add_argument("--d", type=int, default=6)
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

    available = routes(args.device)
    machine = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "gpu": gpu_name() if args.device == "cuda" else None,
        "packages": versions(),
    }
    print(f"# {machine}")
    rows = []
    for batch in batches:
        a = spd(batch, args.d, seed=batch)
        want = np.linalg.eigvalsh(a[:64])
        for name, (prepare, sync) in available.items():
            call = None
            try:
                call = prepare(a)
                w = call()[0]
                w = w[:64]
                got = w.cpu() if hasattr(w, "cpu") else w.get() if hasattr(w, "get") else w
                got = np.asarray(got)
                err = float(np.max(np.abs(got - want) / np.abs(want)))
                cell = timed(call, sync, warmup=1, repeat=args.repeat, budget=args.budget)
                cell["max_rel_err"] = err
            except Exception as exc:  # reported in the table
                cell = {"status": "error", "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            cell.update(route=name, batch=batch, d=args.d)
            rows.append(cell)
            del call
    names = list(available)
    print(f"\n### eigh of B float64 {args.d}x{args.d} SPD matrices, median ms ({args.device})\n")
    print("| B | " + " | ".join(names) + " |")
    print("|---:|" + "---:|" * len(names))
    for batch in batches:
        cells = []
        for name in names:
            c = next(r for r in rows if r["batch"] == batch and r["route"] == name)
            cells.append(f"{c['median_s'] * 1e3:.3g}" if c["status"] == "ok" else "fails")
        print(f"| {batch:,} | " + " | ".join(cells) + " |")
    for r in rows:
        if r["status"] != "ok":
            print(f"# {r['route']} B={r['batch']:,}: {r['error']}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
