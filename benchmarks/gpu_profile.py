"""Where the time of a GPU projection goes: kernels, GPU time and host work, on a device machine.

    python benchmarks/gpu_profile.py ops [--kinds diag,full] [--batches 1000000,100000]
        torch CUDA (and CuPy, wall time only), KL forward + backward at d = 6: the median wall
        time of 20 calls after one (``_worker.interleaved_ms``), then one call under torch's
        profiler: the CUDA kernels it ran, their summed GPU time, the aten operations, the
        host synchronisations and reads, and the operations that took the most host time.
        Also the cost of one small and one large elementwise operation.
    CUDA_LAUNCH_BLOCKING=1 python benchmarks/gpu_profile.py blocking [--batch 500000]
        full KL forward + backward on CuPy and torch CUDA under cProfile with every kernel
        launch synchronous, so that each Python function's time includes its GPU work.

The data and the bounds are those of ``run.py`` (``_worker.make_data``, the 0.7 quantile).
Results of the thirteenth round: ``results/gpu-h100-r13-profiles-2026-11-27.txt``.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _worker as w


def _elementwise_costs() -> None:
    import cupy
    import torch

    for rows, n in ((1000, 2000), (1_000_000, 200)):
        x = torch.rand(rows, 6, device="cuda", dtype=torch.float64)
        y = x + 1
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            x * y
        torch.cuda.synchronize()
        print(f"torch ({rows}, 6) multiply: {1e6 * (time.perf_counter() - t) / n:.1f} us/op")
    a = cupy.random.rand(1000, 6)
    b = a + 1
    a * b  # (compiles the kernel outside the timing)
    cupy.cuda.get_current_stream().synchronize()
    t = time.perf_counter()
    for _ in range(2000):
        a * b
    cupy.cuda.get_current_stream().synchronize()
    print(f"cupy (1000, 6) multiply: {1e6 * (time.perf_counter() - t) / 2000:.1f} us/op")


def ops(kinds: list[str], batches: list[int], modes: list[str]) -> None:
    from torch.profiler import ProfilerActivity, profile

    _elementwise_costs()
    for kind in kinds:
        for batch in batches:
            data = w.make_data(kind, 6, batch, 0)
            eps_mean, eps_cov, frac = w.bounds_for(data, "kl")
            for mode in modes:
                for name in ("torch_cuda", "cupy"):
                    backend = w.make_backend(name, 0)
                    prepared = backend.prepare(
                        data["arrays"], data["cotangents"], mode, "kl", eps_mean, eps_cov
                    )
                    call = lambda p=prepared: p.sync(p.call())  # noqa: E731
                    ms = w.interleaved_ms({0: call}, 20)[0]
                    print(f"{kind} B={batch} {mode} {name}: {ms:.3f} ms (outside {frac:.2f})")
                    if name != "torch_cuda":
                        continue
                    acts = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
                    with profile(activities=acts) as prof:
                        prepared.sync(prepared.call())
                    events = prof.events()
                    kernels = [e for e in events if e.device_type.name == "CUDA"]
                    gpu_ms = sum(e.device_time for e in kernels) / 1e3
                    host = {}
                    for e in events:
                        if e.name.startswith("cuda") or "item" in e.name or "nonzero" in e.name:
                            host[e.name] = host.get(e.name, 0) + 1
                    aten = sum(1 for e in events if e.name.startswith("aten::"))
                    print(f"   kernels {len(kernels)}, GPU kernel time {gpu_ms:.3f} ms, "
                          f"aten ops {aten}; {host}")  # fmt: skip
                    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))


def blocking(batch: int) -> None:
    if os.environ.get("CUDA_LAUNCH_BLOCKING") != "1":
        print("warning: CUDA_LAUNCH_BLOCKING=1 is not set: times are host times only")
    t = time.perf_counter()
    data = w.make_data("full", 6, batch, 0)
    eps_mean, eps_cov, frac = w.bounds_for(data, "kl")
    print(f"data {time.perf_counter() - t:.1f} s, outside {frac:.2f}")
    for name in ("cupy", "torch_cuda"):
        backend = w.make_backend(name, 0)
        prepared = backend.prepare(
            data["arrays"], data["cotangents"], "backward", "kl", eps_mean, eps_cov
        )
        for _ in range(2):
            prepared.sync(prepared.call())
        t = time.perf_counter()
        prepared.sync(prepared.call())
        print(f"{name} B={batch} blocking: {1e3 * (time.perf_counter() - t):.1f} ms")
        prof = cProfile.Profile()
        prof.enable()
        prepared.sync(prepared.call())
        prof.disable()
        stats = pstats.Stats(prof)
        stats.sort_stats("cumulative").print_stats(40)
        stats.sort_stats("tottime").print_stats(25)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    o = sub.add_parser("ops")
    o.add_argument("--kinds", default="diag", type=lambda s: s.split(","))
    o.add_argument(
        "--batches", default="1000000", type=lambda s: [int(float(b)) for b in s.split(",")]
    )
    o.add_argument("--modes", default="backward", type=lambda s: s.split(","))
    b = sub.add_parser("blocking")
    b.add_argument("--batch", type=int, default=500_000)
    args = p.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    if args.what == "ops":
        ops(args.kinds, args.batches, args.modes)
    else:
        blocking(args.batch)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
