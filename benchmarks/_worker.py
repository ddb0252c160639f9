"""One benchmark worker: a child process that times cells of one backend (see ``run.py``).

``run.py`` starts one worker per backend, with the thread-count environment variables already set
(so NumPy's BLAS, OpenMP and XLA size their pools before they are imported), and sends it one JSON
line per cell on stdin; the worker answers one JSON line per cell. Keeping each backend in its own
process isolates thread pools and memory, and lets ``run.py`` kill and restart a worker whose cell
hangs or crashes without losing the rest of the run.

Everything numeric is deterministic: the data of a cell depend only on ``(seed, kind, d, B)`` and
are generated here with NumPy in float64, so every backend projects the same states with the same
bounds.
"""

from __future__ import annotations

import gc
import inspect
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

#: Quantile of each distance part used as its bound: a state is left alone with probability about
#: 0.7 for each part, so about half of the states (1 - 0.7²) are projected.
BOUND_QUANTILE = 0.7


def limit_threads(threads: int) -> list[int] | None:
    """Pin this process to ``threads`` CPUs (caps XLA's pool, which reads the affinity mask).

    Returns the CPUs pinned to, or ``None`` when nothing was changed.
    """
    if threads <= 0 or not hasattr(os, "sched_setaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) <= threads:
        return None
    os.sched_setaffinity(0, allowed[:threads])
    return allowed[:threads]


def machine_line(versions: str) -> str:
    """The first line of the small A/B scripts' tables (``lapack_threads.py``, ``shared_cov.py``,
    ``triangular.py``, ``jax_routes.py``): machine, CPUs, Python, ``versions`` and the
    ``OMP_WAIT_POLICY`` in effect."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
        f"({usable} usable); python {platform.python_version()}, {versions}; "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')}"
    )


def interleaved_ms(
    fns: dict[Any, Callable[[], Any]], rounds: int, number: int = 1
) -> dict[Any, float]:
    """Median milliseconds per call of each of ``fns``, timed in turn round by round (in
    reverse order every other round, so that neither always goes first), ``number`` calls a
    timing, after one untimed round: variants compared on a shared, noisy machine."""
    times: dict[Any, list[float]] = {k: [] for k in fns}
    for r in range(rounds + 1):
        for name in fns if r % 2 else reversed(list(fns)):
            t0 = time.perf_counter()
            for _ in range(number):
                fns[name]()
            if r:  # (round 0 warms up)
                times[name].append((time.perf_counter() - t0) / number)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


# --------------------------------------------------------------------------------------- data


def make_data(kind: str, d: int, batch: int, seed: int) -> dict[str, Any]:
    """Seeded float64 NumPy data of one cell: new and old Gaussians and fixed cotangents
    (:func:`run_cell` rounds them to the cell's dtype).

    Old covariances have a random orthogonal eigenbasis and eigenvalues log-uniform in [0.1, 10]
    (condition number at most 100); the new Gaussian is the old one perturbed in the old
    policy's own metric (relative eigenvalues ``exp(±2σ z)`` with ``σ = 0.2/√d``), so the
    divergences have the same scale for every ``d``.
    """
    import numpy as np

    rng = np.random.default_rng([seed, d, batch, 0 if kind == "diag" else 1])
    sigma = 0.2 / math.sqrt(d)
    old_mean = rng.standard_normal((batch, d))
    eig = np.exp(rng.uniform(math.log(0.1), math.log(10.0), (batch, d)))
    if kind == "diag":
        old_scale = np.sqrt(eig)
        scale = old_scale * np.exp(sigma * rng.standard_normal((batch, d)))
        mean = old_mean + sigma * old_scale * rng.standard_normal((batch, d))
        g_scale = rng.standard_normal((batch, d))
    else:
        q, _ = np.linalg.qr(rng.standard_normal((batch, d, d)))
        old_cov = (q * eig[:, None, :]) @ np.swapaxes(q, -1, -2)
        old_scale = np.linalg.cholesky(0.5 * (old_cov + np.swapaxes(old_cov, -1, -2)))
        del old_cov
        q2, _ = np.linalg.qr(rng.standard_normal((batch, d, d)))
        rel = np.exp(2.0 * sigma * rng.standard_normal((batch, d)))
        rel_cov = (q2 * rel[:, None, :]) @ np.swapaxes(q2, -1, -2)
        del q, q2
        cov = old_scale @ rel_cov @ np.swapaxes(old_scale, -1, -2)
        del rel_cov
        scale = np.linalg.cholesky(0.5 * (cov + np.swapaxes(cov, -1, -2)))
        del cov
        mean = old_mean + sigma * (old_scale @ rng.standard_normal((batch, d, 1)))[..., 0]
        g_scale = np.tril(rng.standard_normal((batch, d, d)))
    g_mean = rng.standard_normal((batch, d))
    return {
        "arrays": (mean, scale, old_mean, old_scale),
        "cotangents": (g_mean, g_scale),
        "bounds": {},
    }


def shared_data(kind: str, d: int, batch: int, seed: int) -> dict[str, Any]:
    """:func:`make_data`, made once per run: the first worker to need a cell's data saves it
    under ``TRP_BENCH_DATA`` (a folder ``run.py`` sets), the others load it (a million full 6-D
    Gaussians take about 20 s to make on 2 threads, a second to load)."""
    folder = os.environ.get("TRP_BENCH_DATA")
    if not folder:
        return make_data(kind, d, batch, seed)
    import numpy as np

    path = Path(folder) / f"{kind}-{d}-{batch}-{seed}.npz"
    if path.exists():
        with np.load(path) as f:
            arrays = tuple(f[f"a{i}"] for i in range(4))
            cotangents = (f["g0"], f["g1"])
        return {"arrays": arrays, "cotangents": cotangents, "bounds": {}}
    data = make_data(kind, d, batch, seed)
    # run.py sends one cell at a time, group by group: no other worker is writing now, and the
    # older groups' data is done with.
    for old in Path(folder).glob("*.npz"):
        old.unlink(missing_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    named = {f"a{i}": a for i, a in enumerate(data["arrays"])}
    try:
        np.savez(tmp, **named, g0=data["cotangents"][0], g1=data["cotangents"][1])
        tmp.replace(path)  # (atomic: another worker never loads half a file)
    except OSError:  # (a full disk: the other workers make the data themselves)
        tmp.unlink(missing_ok=True)
    return data


def bounds_for(
    data: dict[str, Any], method: str, quantile: float = BOUND_QUANTILE
) -> tuple[float, float, float]:
    """``(eps_mean, eps_cov, fraction projected)`` for ``method`` on ``data`` (cached).

    Each bound is the ``quantile`` quantile of its distance part over the batch.
    """
    key = (method, quantile)
    if key not in data["bounds"]:
        import numpy as np

        import tr_projections as trp

        distance = {"kl": trp.kl, "frobenius": trp.frobenius, "wasserstein": trp.wasserstein}
        mean_part, cov_part = distance[method](*data["arrays"])
        eps_mean = float(np.quantile(mean_part, quantile))
        eps_cov = float(np.quantile(cov_part, quantile))
        frac = float(np.mean((mean_part > eps_mean) | (cov_part > eps_cov)))
        data["bounds"][key] = (eps_mean, eps_cov, frac)
    return data["bounds"][key]


# ----------------------------------------------------------------------------------- backends


@dataclass
class Prepared:
    """The callables of one cell on one backend."""

    call: Any  # () -> result; the timed work
    sync: Any  # (result) -> None; waits until the work is done on the device
    compile_s: float | None = None  # JAX: ahead-of-time compilation, excluded from the times


def _tracemalloc_peak(prepared: Prepared) -> int:
    """The tracemalloc peak (bytes) of one call; NumPy reports its buffers to tracemalloc."""
    import tracemalloc

    tracemalloc.start()
    try:
        result = prepared.call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del result
    return peak


class Backend:
    """Common interface; subclasses convert the data and build the timed callables."""

    name = "?"
    device = "cpu"

    def versions(self) -> dict[str, str]:
        return {}

    def prepare(
        self, arrays, cotangents, mode, method, eps_mean, eps_cov, options=None
    ) -> Prepared:
        raise NotImplementedError

    def memory(self, prepared: Prepared) -> tuple[int | None, str]:
        """Peak bytes allocated by one call beyond what existed before it (outputs included)."""
        return None, "not measured for this backend"


class NumpyLike(Backend):
    """NumPy and CuPy: forward is the projection, backward goes through ``trp.vjp``."""

    def __init__(self, name: str) -> None:
        import numpy as np

        self.name = name
        self.np = np
        if name == "cupy":
            import cupy

            self.xp = cupy
            self.device = f"cuda:{cupy.cuda.runtime.getDevice()}"
            cupy.zeros(1).sum()  # initialise the context outside the timings
        else:
            self.xp = np

    def versions(self) -> dict[str, str]:
        out = {"numpy": self.np.__version__}
        if self.name == "cupy":
            out["cupy"] = self.xp.__version__
        return out

    def to(self, a):
        return self.xp.asarray(a) if self.name == "cupy" else self.np.array(a, copy=True)

    def prepare(
        self, arrays, cotangents, mode, method, eps_mean, eps_cov, options=None
    ) -> Prepared:
        import tr_projections as trp

        x = [self.to(a) for a in arrays]
        kw = {"method": method, "eps_mean": eps_mean, "eps_cov": eps_cov, **(options or {})}
        if mode == "forward":

            def call():
                return trp.project(*x, **kw)
        else:
            ct = trp.Gaussian(*(self.to(g) for g in cotangents))

            # The new policy's cotangents only, as torch and JAX are asked for (the old policy
            # is a constant); a baseline without `wrt` computes all four.
            wrt: dict[str, Any] = {}

            def call():
                _, vjp_fn = trp.vjp(trp.project, *x, **kw)
                if not wrt:
                    has = "wrt" in inspect.signature(vjp_fn).parameters
                    wrt["kw"] = {"wrt": ("mean", "scale")} if has else {}
                return vjp_fn(ct, **wrt["kw"])

        return Prepared(call, self._sync)

    def _sync(self, _result) -> None:
        if self.name == "cupy":
            self.xp.cuda.get_current_stream().synchronize()

    def memory(self, prepared: Prepared) -> tuple[int | None, str]:
        if self.name == "cupy":
            pool = self.xp.get_default_memory_pool()
            self._sync(None)
            pool.free_all_blocks()
            before = pool.total_bytes()
            result = prepared.call()
            self._sync(result)
            peak = pool.total_bytes() - before
            del result
            return peak, "CuPy memory-pool growth (an upper bound on the peak)"
        return _tracemalloc_peak(prepared), "tracemalloc peak (NumPy reports its buffers to it)"


class TorchBackend(Backend):
    """PyTorch on CPU or CUDA: backward is ``loss.backward()`` into the new ``(mean, scale)``."""

    def __init__(self, name: str, threads: int) -> None:
        import torch

        self.torch = torch
        self.name = name
        if threads > 0:
            torch.set_num_threads(threads)
            try:
                torch.set_num_interop_threads(threads)
            except RuntimeError:  # already set: interop pool started
                pass
        #: ``torch_compile``/``torch_cuda_compile``: the call (forward, or the loss and its
        #: backward) under ``torch.compile(fullgraph=True, dynamic=False)``, compiled in
        #: ``prepare`` (the time reported as ``compile_s``, excluded from the timings)
        self.compiled = name.endswith("_compile")
        if name.startswith("torch_cuda"):
            if not torch.cuda.is_available():
                raise RuntimeError("torch reports no CUDA device")
            self.device = "cuda"
            torch.zeros(1, device="cuda").sum().item()
        else:
            self.device = "cpu"

    def versions(self) -> dict[str, str]:
        out = {"torch": self.torch.__version__, "torch_threads": str(self.torch.get_num_threads())}
        if self.device == "cuda":
            out["cuda"] = str(self.torch.version.cuda)
            out["gpu"] = self.torch.cuda.get_device_name()
        return out

    def prepare(
        self, arrays, cotangents, mode, method, eps_mean, eps_cov, options=None
    ) -> Prepared:
        import tr_projections as trp

        torch = self.torch
        x = [torch.asarray(a, device=self.device) for a in arrays]
        kw = {"method": method, "eps_mean": eps_mean, "eps_cov": eps_cov, **(options or {})}

        def maybe_compiled(fn):
            if not self.compiled:
                return fn
            # (each cell compiles the same code anew: without a reset, dynamo's limit of
            # recompiles per function stops it after eight cells)
            torch._dynamo.reset()
            return torch.compile(fn, fullgraph=True, dynamic=False)

        if mode == "forward":
            project = maybe_compiled(lambda m, s, om, os_: tuple(trp.project(m, s, om, os_, **kw)))

            def call():
                return project(*x)
        else:
            leaves = [x[0].detach().requires_grad_(True), x[1].detach().requires_grad_(True)]
            g_mean, g_scale = (torch.asarray(g, device=self.device) for g in cotangents)

            def weighted(m, s, om, os_):
                out = trp.project(m, s, om, os_, **kw)
                return (out.mean * g_mean).sum() + (out.scale * g_scale).sum()

            loss_of = maybe_compiled(weighted)

            def call():
                for leaf in leaves:
                    leaf.grad = None
                loss = loss_of(leaves[0], leaves[1], x[2], x[3])
                loss.backward()
                return leaves[0].grad, leaves[1].grad

        compile_s = None
        if self.compiled:
            t0 = time.perf_counter()
            self._sync(call())
            compile_s = time.perf_counter() - t0
        return Prepared(call, self._sync, compile_s)

    def _sync(self, _result) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def memory(self, prepared: Prepared) -> tuple[int | None, str]:
        torch = self.torch
        if self.device == "cuda":
            # eigh may run in CuPy (tr_projections._compat.TORCH_CUDA_EIGH), whose memory pool
            # torch does not see: its growth is added (the sum: an upper bound on the peak).
            pool = sys.modules["cupy"].get_default_memory_pool() if "cupy" in sys.modules else None
            if pool is not None:
                pool.free_all_blocks()
            pool_before = pool.total_bytes() if pool is not None else 0
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            result = prepared.call()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - before
            del result
            if pool is not None:
                peak += pool.total_bytes() - pool_before
                return peak, "torch.cuda.max_memory_allocated plus CuPy memory-pool growth"
            return peak, "torch.cuda.max_memory_allocated"

        from torch.profiler import ProfilerActivity, profile

        # Small CPU calls (and diagonal ones up to about 1.4 million states) run on NumPy views
        # inside the adapter, whose buffers torch's profiler does not see but tracemalloc does:
        # the sum of both peaks (an upper bound on the true peak). Two calls: under torch's
        # profiler with profile_memory=True, tracemalloc's peak of NumPy work is inflated (10
        # allocations of 4.8 MB, each freed before the next: 74 MB instead of 9.6 MB).
        numpy_peak = _tracemalloc_peak(prepared)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = prepared.call()
        del result
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "trace.json")
            prof.export_chrome_trace(path)
            with open(path) as fh:
                events = json.load(fh)["traceEvents"]
        events = [e for e in events if e.get("name") == "[memory]"]
        events.sort(key=lambda e: e["ts"])
        current = peak = 0
        for e in events:  # allocations (+) and frees (-) in time order
            current += int(e["args"].get("Bytes", 0))
            peak = max(peak, current)
        return peak + numpy_peak, (
            "torch profiler allocation events (profile_memory=True) plus the tracemalloc peak of "
            "the NumPy route's buffers (their sum: an upper bound on the peak)"
        )


class JaxBackend(Backend):
    """JAX, jitted: times the compiled executable (compilation reported separately)."""

    def __init__(self, name: str) -> None:
        import jax

        jax.config.update("jax_enable_x64", True)
        self.jax = jax
        self.name = name
        if name == "jax_cuda":
            gpus = [dv for dv in jax.devices() if dv.platform in ("gpu", "cuda", "rocm")]
            if not gpus:
                raise RuntimeError("JAX sees no GPU")
            self.dev = gpus[0]
        else:
            self.dev = jax.devices("cpu")[0]
        self.device = f"{self.dev.platform}:{self.dev.id}"

    def versions(self) -> dict[str, str]:
        import jaxlib

        return {"jax": self.jax.__version__, "jaxlib": jaxlib.__version__}

    def prepare(
        self, arrays, cotangents, mode, method, eps_mean, eps_cov, options=None
    ) -> Prepared:
        import tr_projections as trp

        jax = self.jax
        x = [jax.device_put(a, self.dev) for a in arrays]
        kw = {"method": method, "eps_mean": eps_mean, "eps_cov": eps_cov, **(options or {})}
        if mode == "forward":

            def fn(m, s, om, os_):
                return tuple(trp.project(m, s, om, os_, **kw))

            args = tuple(x)
        else:

            def loss(m, s, om, os_, gm, gs):
                out = trp.project(m, s, om, os_, **kw)
                return (out.mean * gm).sum() + (out.scale * gs).sum()

            fn = jax.value_and_grad(loss, argnums=(0, 1))
            args = (*x, *(jax.device_put(g, self.dev) for g in cotangents))
        t0 = time.perf_counter()
        compiled = jax.jit(fn).lower(*args).compile()
        compile_s = time.perf_counter() - t0

        def call():
            return compiled(*args)

        return Prepared(call, jax.block_until_ready, compile_s)


def make_backend(name: str, threads: int) -> Backend:
    if name in ("numpy", "cupy"):
        return NumpyLike(name)
    if name in ("torch", "torch_cuda", "torch_compile", "torch_cuda_compile"):
        return TorchBackend(name, threads)
    if name in ("jax", "jax_cuda"):
        return JaxBackend(name)
    raise ValueError(f"unknown backend {name!r}")


def probe_backward(backend: Backend) -> str | None:
    """``None`` if gradients work on a tiny problem, else the reason they do not."""
    data = make_data("diag", 2, 4, seed=0)
    try:
        p = backend.prepare(data["arrays"], data["cotangents"], "backward", "kl", 0.01, 0.01)
        p.sync(p.call())
    except Exception as exc:  # any failure: the backward cells become "n/a"
        return f"{type(exc).__name__}: {exc}"
    return None


# ------------------------------------------------------------------------------------- timing


def summarize(times: list[float]) -> dict[str, Any]:
    times_sorted = sorted(times)
    if len(times) >= 2:
        q1, _, q3 = statistics.quantiles(times_sorted, n=4, method="inclusive")
    else:
        q1 = q3 = times_sorted[0]
    return {
        "median_s": statistics.median(times_sorted),
        "q1_s": q1,
        "q3_s": q3,
        "iqr_s": q3 - q1,
        "min_s": times_sorted[0],
        "n": len(times),
        "times_s": [float(f"{t:.4g}") for t in times],  # raw runs; 4 digits are plenty
    }


def dtype_name(result: Any) -> str | None:
    """The dtype of the first array in a call's result (tuples and named tuples searched in
    order), as ``"float32"`` whatever the library; ``None`` where there is none."""
    if isinstance(result, (tuple, list)):
        for x in result:
            name = dtype_name(x)
            if name is not None:
                return name
        return None
    dtype = getattr(result, "dtype", None)
    return None if dtype is None else str(dtype).rsplit(".", 1)[-1]


def time_cell(prepared: Prepared, cfg: dict[str, Any]) -> dict[str, Any]:
    """Warm up, then time repeated calls; the repeat count adapts to the cost of one call."""
    call, sync = prepared.call, prepared.sync
    t_warm = math.inf
    out_dtype = None
    for i in range(max(1, cfg["warmup"]) + 1):
        if i == max(1, cfg["warmup"]) and t_warm < 0.5:
            break  # (one more warm-up only after a slow one: a compilation, e.g. CuPy's kernels)
        t0 = time.perf_counter()
        result = call()
        sync(result)
        t_warm = min(t_warm, time.perf_counter() - t0)
        out_dtype = out_dtype or dtype_name(result)
        del result
    n = math.ceil(cfg["budget_s"] / max(t_warm, 1e-9))
    n = max(cfg["min_repeat"], min(cfg["max_repeat"], n))
    note = None
    if n * t_warm > cfg["max_cell_s"]:
        n = max(1, int(cfg["max_cell_s"] // t_warm))
        note = f"slow cell: {n} timed run(s) after warm-up"
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        sync(call())
        times.append(time.perf_counter() - t0)
    out = summarize(times)
    out["warmup_s"] = t_warm
    out["out_dtype"] = out_dtype
    if note:
        out["note"] = note
    return out


#: The dtypes a cell may be projected in, and the environment variable that gives a worker its
#: own (``run.py --variant-env``).
DTYPES = ("float64", "float32")
DTYPE_ENV = "TRP_BENCH_DTYPE"


def cell_dtype(req: dict[str, Any]) -> str:
    """The dtype this worker projects a cell in: ``TRP_BENCH_DTYPE`` where set (a variant
    worker's), else the request's (``run.py --dtype``), else float64."""
    dtype = os.environ.get(DTYPE_ENV) or req.get("dtype") or "float64"
    if dtype not in DTYPES:
        raise ValueError(f"TRP_BENCH_DTYPE / --dtype must be one of {DTYPES}, got {dtype!r}")
    return dtype


def run_cell(
    backend: Backend, req: dict[str, Any], cache: dict[str, Any], backward_error: str | None
) -> dict[str, Any]:
    """Time one cell; ``cache`` keeps the data of the last ``(kind, d, B)`` between cells."""
    key = (req["kind"], req["d"], req["batch"], req["seed"])
    if cache.get("key") != key:
        cache.clear()
        gc.collect()
        cache["key"] = key
        cache["data"] = shared_data(req["kind"], req["d"], req["batch"], req["seed"])
    data = cache["data"]
    eps_mean, eps_cov, frac = bounds_for(
        data, req["method"], req.get("bound_quantile", BOUND_QUANTILE)
    )
    dtype = cell_dtype(req)
    if dtype not in cache:  # (the data rounded once per dtype, the bounds the float64 data's)
        cache[dtype] = tuple(
            tuple(a.astype(dtype, copy=False) for a in data[k]) for k in ("arrays", "cotangents")
        )
    arrays, cotangents = cache[dtype]
    input_bytes = sum(a.nbytes for a in arrays)
    out: dict[str, Any] = {
        "dtype": dtype,
        "eps_mean": eps_mean,
        "eps_cov": eps_cov,
        "frac_projected": frac,
        "input_bytes": input_bytes,
    }
    if req["mode"] == "backward" and backward_error is not None:
        return {**out, "status": "n/a", "note": "no gradients: " + backward_error}
    try:
        prepared = backend.prepare(
            arrays, cotangents, req["mode"], req["method"], eps_mean, eps_cov
        )
        out.update(time_cell(prepared, req))
        if prepared.compile_s is not None:
            out["compile_s"] = prepared.compile_s
        if req.get("memory", True):
            peak, how = backend.memory(prepared)
            out["mem_peak_bytes"] = peak
            out["mem_method"] = how
            if peak is not None:
                out["mem_ratio"] = peak / input_bytes
        out["status"] = "ok"
    except Exception as exc:  # record and go on with the next cell
        status = "n/a" if req["mode"] == "backward" else "error"
        out.update(status=status, note=f"{type(exc).__name__}: {exc}")
        out["traceback"] = traceback.format_exc(limit=6)
    finally:
        prepared = None  # frees the backend's copies of the data (and JAX's executable)
    return out


def main(argv: list[str]) -> int:
    name, threads = argv[0], int(argv[1])
    pinned = limit_threads(threads)
    # The protocol owns the original stdout; anything a library prints goes to stderr.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    # A baseline worker imports the package of another git ref (see run.py --baseline).
    sys.path.insert(0, os.environ.get("TRP_BENCH_SOURCE") or str(REPO))

    def send(obj: dict[str, Any]) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    try:
        cell_dtype({})  # (a TRP_BENCH_DTYPE that names no dtype: this backend is not available)
        backend = make_backend(name.split("@")[0].split("+")[0], threads)
        import tr_projections as trp

        backward_error = probe_backward(backend)
    except Exception as exc:
        send({"ready": False, "error": f"{type(exc).__name__}: {exc}"})
        return 1
    send(
        {
            "ready": True,
            "backend": name,
            "device": backend.device,
            "versions": {**backend.versions(), "tr_projections": trp.__version__},
            "source": str(Path(trp.__file__).parent),
            "backward": backward_error is None,
            "backward_error": backward_error,
            "affinity": pinned,
            "dtype": os.environ.get(DTYPE_ENV) or None,
        }
    )
    cache: dict[str, Any] = {}
    for line in sys.stdin:
        req = json.loads(line)
        if req.get("quit"):
            break
        send(run_cell(backend, req, cache, backward_error))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
