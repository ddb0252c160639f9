"""Time every projection on every available backend and print (and save) the tables.

One command::

    python benchmarks/run.py            # the full grid on CPU, ~10 min on 2 cores
    python benchmarks/run.py --quick    # a few seconds: keeps the benchmark working (CI)
    python benchmarks/run.py --device cuda --label h100   # GPU backends, B up to 1e6

The grid is method (kl, frobenius, wasserstein) × kind (diag, full) × d × batch size × mode
(forward; forward + backward) × backend. Each backend runs in its own worker process
(``_worker.py``); cells are interleaved across backends, so variants are compared in the same run
and under the same load. Every backend gets the same seeded data, made in float64 and projected
in float64 or, with ``--dtype float32``, rounded to float32 (the bounds stay those of the float64
data). A variant worker with ``TRP_BENCH_DTYPE`` in its environment projects in that dtype
instead, so ``--variant-env TRP_BENCH_DTYPE=float32`` times float32 against float64 in the same
run (the variable is not inherited from run.py's own environment).

Threads: ``--threads N`` (default 2) is applied *before* any array library is imported: the
workers start with ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``,
``VECLIB_MAXIMUM_THREADS`` and ``NUMEXPR_NUM_THREADS`` set to N, are pinned to N CPUs (which also
caps XLA's thread pool) and call ``torch.set_num_threads(N)``. ``--threads 0`` changes nothing.

Timing: ``time.perf_counter`` around each call, with synchronisation (``torch.cuda.synchronize``,
``jax.block_until_ready``, the CuPy stream); warm-up first; then repeated runs, as many as fit in
``--budget`` seconds (at least ``--min-repeat``, at most ``--repeat``); median and IQR reported.
JAX functions are jitted and compiled ahead of time; compilation is reported separately.
Forward + backward: torch ``loss.backward()`` and ``jax.value_and_grad`` of
``sum(mean·g_mean) + sum(scale·g_scale)`` into the new ``(mean, scale)``, with fixed random
cotangents; NumPy and CuPy ``trp.vjp`` with ``wrt=("mean", "scale")``, the same two cotangents
(a baseline whose ``vjp`` has no ``wrt`` computes all four). Where gradients are not available
the backward cells say "n/a".

Results: a markdown report on stdout and JSON (machine, settings, every cell) in
``benchmarks/results/<label>-<date>.json`` (``--quick``: a temporary file unless ``--json``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import importlib.util
import json
import os
import platform
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _report
from _worker import BOUND_QUANTILE, DTYPE_ENV, DTYPES

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORKER = HERE / "_worker.py"

METHODS = ("kl", "frobenius", "wasserstein")
KINDS = ("diag", "full")
MODES = ("forward", "backward")
CPU_BACKENDS = ("numpy", "torch", "jax")
GPU_BACKENDS = ("torch_cuda", "cupy", "jax_cuda")
QUICK_CPU_BACKENDS = ("numpy", "torch")
#: A cell counts as hung after this multiple of the slowest other backend's time on it ...
HANG_FACTOR = 6.0
#: ... but never before this many seconds.
HANG_FLOOR_S = 30.0
#: A backend that hangs this often on one kind of Gaussian skips that kind's larger batches.
HANGS_BEFORE_SKIP = 2
BACKEND_MODULE = {
    "numpy": "numpy",
    "torch": "torch",
    "torch_cuda": "torch",
    "torch_compile": "torch",  # (torch.compile of each call: asked for by name only)
    "torch_cuda_compile": "torch",
    "jax": "jax",
    "jax_cuda": "jax",
    "cupy": "cupy",
}
THREAD_ENV = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)
PACKAGES = (
    "numpy",
    "torch",
    "jax",
    "jaxlib",
    "array-api-compat",
    "scipy",
    "cupy-cuda12x",
    "cupy-cuda13x",
)

#: The workers of ``--variant-env``: torch (torch_cuda with ``--device cuda``), or the
#: ``--variant-backends``, with extra environment variables, named ``<backend>+env``.
VARIANT_SUFFIX = "+env"

FULL = {
    "dims": [1, 2, 6, 17, 32],
    "batches_cpu": [1_000, 10_000, 100_000],
    "batches_gpu": [1_000, 10_000, 100_000, 1_000_000],
    "repeat": 30,
    "min_repeat": 3,
    "warmup": 1,
    "budget": 0.5,
    "max_cell_s": 6.0,
    "cell_timeout": 120.0,
}
QUICK = {
    "dims": [2, 6],
    "batches_cpu": [100, 1_000],
    "batches_gpu": [100, 1_000],
    "repeat": 3,
    "min_repeat": 3,
    "warmup": 1,
    "budget": 0.0,
    "max_cell_s": 2.0,
    "cell_timeout": 60.0,
}


def _csv(kind):
    def parse(text: str) -> list:
        return [kind(float(t)) if kind is int else kind(t) for t in text.split(",") if t.strip()]

    return parse


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark tr_projections (see the module docstring).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="tiny grid in seconds (for CI)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--backends",
        type=_csv(str),
        help=f"comma list from {CPU_BACKENDS + GPU_BACKENDS}, or torch_compile (each call "
        "under torch.compile; by name only); default: the installed ones of --device (cpu: "
        "numpy,torch,jax, with --quick numpy,torch; cuda: torch_cuda,cupy,jax_cuda)",
    )
    p.add_argument("--methods", type=_csv(str), default=list(METHODS))
    p.add_argument("--kinds", type=_csv(str), default=list(KINDS))
    p.add_argument("--dims", type=_csv(int), help="default 1,2,6,17,32 (quick: 2,6)")
    p.add_argument(
        "--batches", type=_csv(int), help="default 1e3,1e4,1e5 (+1e6 on cuda; quick: 100,1000)"
    )
    p.add_argument("--modes", type=_csv(str), default=list(MODES), help="forward,backward")
    p.add_argument("--repeat", type=int, help="at most this many timed runs per cell (30)")
    p.add_argument("--min-repeat", type=int, help="at least this many timed runs (3)")
    p.add_argument("--warmup", type=int, help="untimed calls before timing (1)")
    p.add_argument("--budget", type=float, help="target seconds of timed runs per cell (0.5)")
    p.add_argument(
        "--max-cell-s", type=float, help="fewer than --min-repeat runs beyond this (6 s)"
    )
    p.add_argument(
        "--cell-timeout",
        type=float,
        help="kill and restart a worker stuck this long on one cell (120 s); once another "
        f"backend has run the cell, {HANG_FACTOR:g}x its time (at least {HANG_FLOOR_S:g} s)",
    )
    p.add_argument("--threads", type=int, default=2, help="threads per backend; 0: leave alone")
    p.add_argument(
        "--omp-wait-policy",
        default=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
        help="OMP_WAIT_POLICY of the workers ('' to leave unset); PASSIVE keeps OpenMP threads "
        "from spinning, which on a loaded machine with few cores slows torch 10-100x",
    )
    p.add_argument("--xla-flags", default="", help="extra XLA_FLAGS for the JAX workers")
    p.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        type=_env_pair,
        help="set in every worker's environment (repeatable; recorded in the results), e.g. "
        "glibc's MALLOC_MMAP_THRESHOLD_ to compare allocator settings",
    )
    p.add_argument(
        "--max-mem-gb",
        type=float,
        help="skip cells whose estimated peak memory exceeds this (cpu 4, cuda 40)",
    )
    p.add_argument(
        "--no-memory",
        action="store_true",
        help="skip the peak-memory measurement (else one extra call per cell at the largest B)",
    )
    p.add_argument(
        "--baseline",
        metavar="REF",
        help="also time the tr_projections of git REF (e.g. a commit before an optimisation) "
        "in the same run, interleaved, as backends named '<backend>@REF'",
    )
    p.add_argument(
        "--baseline-backends",
        type=_csv(str),
        default=["torch"],
        help="which backends also run the --baseline version",
    )
    p.add_argument(
        "--variant-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        type=_env_pair,
        help="also run torch (with --device cuda: torch_cuda; or the --variant-backends) in "
        f"a worker named '<backend>{VARIANT_SUFFIX}' with this set in its environment "
        "(repeatable), interleaved with the plain one, and print the speed-up: e.g. glibc's "
        "MALLOC_MMAP_THRESHOLD_, or TRP_TORCH_CUDA_EIGH=torch on the GPU",
    )
    p.add_argument(
        "--variant-backends",
        type=_csv(str),
        default=None,
        help="the backends that --variant-env runs a variant of (default: torch, with "
        "--device cuda torch_cuda), e.g. torch_cuda,cupy",
    )
    p.add_argument(
        "--bound-quantile",
        type=float,
        default=BOUND_QUANTILE,
        help="each bound is this quantile of its distance part over the batch (0.7: about half "
        "the states projected; 0: all but one)",
    )
    p.add_argument(
        "--verbose", action="store_true", help="print every cell's median as it is timed"
    )
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float64",
        help="dtype the backends project in (the data are made in float64 and rounded); a "
        "variant worker's TRP_BENCH_DTYPE (--variant-env) overrides it",
    )
    p.add_argument("--seed", type=int, default=20210503)
    p.add_argument("--label", help="name of the results file (default: the hostname)")
    p.add_argument("--json", type=Path, help="where to write the JSON results")
    p.add_argument("--markdown", type=Path, help="also write the markdown report here")
    args = p.parse_args(argv)

    preset = QUICK if args.quick else FULL
    gpu = args.device == "cuda"
    if args.dims is None:
        args.dims = preset["dims"]
    if args.batches is None:
        args.batches = preset["batches_gpu" if gpu else "batches_cpu"]
    for name in ("repeat", "min_repeat", "warmup", "budget", "max_cell_s", "cell_timeout"):
        if getattr(args, name) is None:
            setattr(args, name, preset[name])
    args.min_repeat = max(1, min(args.min_repeat, args.repeat))
    if args.max_mem_gb is None:
        args.max_mem_gb = 40.0 if gpu else 4.0
    args.methods = [{"w2": "wasserstein"}.get(m, m) for m in args.methods]
    for name, allowed in (("methods", METHODS), ("kinds", KINDS), ("modes", MODES)):
        bad = sorted(set(getattr(args, name)) - set(allowed))
        if bad:
            p.error(f"--{name}: unknown {bad}; choose from {list(allowed)}")
    if args.backends is None:
        wanted = GPU_BACKENDS if gpu else CPU_BACKENDS
        if args.quick and not gpu:  # JAX compiles every shape anew: ~1 s a cell
            wanted = QUICK_CPU_BACKENDS
        args.backends = [b for b in wanted if importlib.util.find_spec(BACKEND_MODULE[b])]
        args.explicit_backends = False
    else:
        if gpu:  # "torch"/"jax" with --device cuda mean the GPU variants
            args.backends = [
                {
                    "torch": "torch_cuda",
                    "jax": "jax_cuda",
                    "torch_compile": "torch_cuda_compile",
                }.get(b, b)
                for b in args.backends
            ]
        bad = sorted(set(args.backends) - set(BACKEND_MODULE))
        if bad:
            p.error(f"--backends: unknown {bad}; choose from {list(BACKEND_MODULE)}")
        args.explicit_backends = True
    if not 0.0 <= args.bound_quantile < 1.0:
        p.error("--bound-quantile must be in [0, 1)")
    if DTYPE_ENV in dict(args.worker_env):
        p.error(f"--worker-env {DTYPE_ENV}: use --dtype for every worker")
    args.baseline_src = None
    if args.baseline:
        missing = sorted(set(args.baseline_backends) - set(args.backends))
        if missing:
            p.error(f"--baseline-backends {missing} are not among --backends {args.backends}")
        args.backends = args.backends + [f"{b}@{args.baseline}" for b in args.baseline_backends]
    if args.variant_backends and not args.variant_env:
        p.error("--variant-backends needs --variant-env")
    bases = args.variant_backends or ["torch"]
    if gpu:
        bases = [{"torch": "torch_cuda", "jax": "jax_cuda"}.get(b, b) for b in bases]
    if len(set(bases)) != len(bases):
        p.error(f"--variant-backends: {bases} names a backend twice")
    args.variants = [b + VARIANT_SUFFIX for b in bases] if args.variant_env else []
    for base in bases if args.variant_env else ():
        if base not in args.backends:
            p.error(f"--variant-env needs the {base} backend")
    args.backends = args.backends + args.variants
    return args


def export_baseline(ref: str) -> str:
    """The package tree of git ``ref`` in a temporary directory (``git archive``), for the
    baseline workers to import instead of this checkout."""
    out = tempfile.mkdtemp(prefix="trp-baseline-")
    archive = subprocess.run(
        ["git", "archive", "--format=tar", ref, "tr_projections"],
        cwd=REPO,
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", out], input=archive, check=True)
    return out


# ------------------------------------------------------------------------------------ machine


def machine_info(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory_gb = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal"):
                    memory_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "cpus_usable": usable,
        "memory_gb": memory_gb,
        "python": platform.python_version(),
        "packages": packages,
        "tr_projections": _tr_version(),
        "git": _git_describe(),
        "load_start": _load(),
        "threads": threads,
    }


def _tr_version() -> str:
    text = (REPO / "tr_projections" / "__init__.py").read_text()
    for line in text.splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    return "?"


def _git_describe() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "tr_projections"],
            cwd=REPO,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def _load() -> str | None:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return None


# -------------------------------------------------------------------------------- the workers


class WorkerError(RuntimeError):
    pass


class Worker:
    """A child process timing the cells of one backend; one JSON line per request and reply."""

    def __init__(
        self,
        name: str,
        threads: int,
        log_dir: str,
        omp_wait_policy: str = "",
        xla_flags: str = "",
        source: str | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.name, self.threads, self.source = name, threads, source
        self.extra_env = dict(extra_env or {})
        self.omp_wait_policy, self.xla_flags = omp_wait_policy, xla_flags
        self.log_path = os.path.join(log_dir, f"{name}.log")
        self.proc: subprocess.Popen | None = None
        self.hello: dict[str, Any] = {}

    def start(self, timeout: float = 300.0) -> dict[str, Any]:
        env = dict(os.environ)
        env.pop(DTYPE_ENV, None)  # (a variant's own only: the others project in --dtype)
        if self.threads > 0:
            env.update({k: str(self.threads) for k in THREAD_ENV})
        if self.omp_wait_policy:
            env["OMP_WAIT_POLICY"] = self.omp_wait_policy
        if self.xla_flags and self.name.startswith("jax"):
            env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {self.xla_flags}".strip()
        env.update(self.extra_env)
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        # (JAX on a GPU otherwise takes 75% of its memory up front, which the workers of the
        # other backends, running at the same time, need)
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        if self.source:
            env["TRP_BENCH_SOURCE"] = self.source
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), self.name, str(self.threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            env=env,
            cwd=REPO,
        )
        log.close()
        self._buf = b""
        self.hello = self._read(timeout)
        if not self.hello.get("ready"):
            self.kill()
            raise WorkerError(self.hello.get("error", "worker failed to start"))
        return self.hello

    def _read(self, timeout: float) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer within {timeout:.0f} s")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise WorkerError(f"worker exited (code {self.proc.wait()}); {self.log_tail()}")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def request(self, req: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(req) + "\n").encode())
        self.proc.stdin.flush()
        return self._read(timeout)

    def log_tail(self, n: int = 600) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-n:].strip()
        except OSError:
            return ""

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # our own child, by its handle
            self.proc.wait()

    def close(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            self.request({"quit": True}, timeout=0.1)
        except (TimeoutError, WorkerError, OSError, ValueError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()


# ---------------------------------------------------------------------------------- the grid


def estimate_peak_bytes(kind: str, d: int, batch: int) -> int:
    """A rough upper bound of one cell's peak memory in a worker: data, generation, projection."""
    size = d if kind == "diag" else d * d
    inputs = 8 * batch * (2 * d + 2 * size)
    # measured peaks (forward + backward, outputs and gradients included) reach ~6x the inputs
    # for diagonal and ~14x for full Gaussians; add the inputs and the cotangents
    return int(inputs * (7 if kind == "diag" else 15))


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every cell, data-sharing cells adjacent and backends innermost (interleaved)."""
    cells = []
    mem_batch = max(args.batches)
    for kind in args.kinds:
        for d in args.dims:
            for batch in args.batches:
                est = estimate_peak_bytes(kind, d, batch)
                for method in args.methods:
                    for mode in args.modes:
                        for backend in args.backends:
                            cell = {
                                "method": method,
                                "kind": kind,
                                "d": d,
                                "batch": batch,
                                "mode": mode,
                                "backend": backend,
                                "est_peak_bytes": est,
                                "memory": not args.no_memory and batch == mem_batch,
                            }
                            if est > args.max_mem_gb * 2**30:
                                cell.update(
                                    status="skipped",
                                    note=f"estimated peak {est / 2**30:.1f} GB > --max-mem-gb "
                                    f"{args.max_mem_gb:g}",
                                )
                            cells.append(cell)
    return cells


def run_grid(args: argparse.Namespace, cells: list[dict[str, Any]]) -> dict[str, dict]:
    """Time every cell in place; returns what each backend reported about itself."""
    log_dir = tempfile.mkdtemp(prefix="trp-bench-")
    data_dir = os.path.join(log_dir, "data")  # each cell's data, made once for all workers
    os.makedirs(data_dir)
    workers: dict[str, Worker] = {}
    info: dict[str, dict] = {}
    for name in args.backends:
        source = args.baseline_src if "@" in name else None
        extra_env = {"TRP_BENCH_DATA": data_dir, **dict(args.worker_env)}
        if name in args.variants:
            extra_env.update(args.variant_env)
        w = Worker(
            name,
            args.threads,
            log_dir,
            args.omp_wait_policy,
            args.xla_flags,
            source,
            extra_env,
        )
        try:
            info[name] = w.start()
            workers[name] = w
            print(f"# {name}: ready on {w.hello.get('device')}", file=sys.stderr)
        except (WorkerError, TimeoutError) as exc:
            info[name] = {"ready": False, "error": str(exc)}
            print(f"# {name}: not available ({exc})", file=sys.stderr)
    req_common = {
        "dtype": args.dtype,
        "seed": args.seed,
        "warmup": args.warmup,
        "budget_s": args.budget,
        "min_repeat": args.min_repeat,
        "max_repeat": args.repeat,
        "max_cell_s": args.max_cell_s,
        "bound_quantile": args.bound_quantile,
    }
    walls: dict[tuple, float] = {}  # the slowest backend's wall time per cell so far
    hangs: dict[tuple[str, str], list[int]] = {}  # (backend, kind) -> batches that timed out
    t_start = time.perf_counter()
    todo = [c for c in cells if c.get("status") != "skipped"]
    last_group = None
    try:
        for i, cell in enumerate(todo):
            group = (cell["kind"], cell["d"], cell["batch"])
            if group != last_group:
                last_group = group
                print(
                    f"# [{i}/{len(todo)} cells, {time.perf_counter() - t_start:.0f} s] "
                    f"{cell['kind']} d={cell['d']} B={cell['batch']}",
                    file=sys.stderr,
                )
            w = workers.get(cell["backend"])
            if w is None:
                cell.update(status="n/a", note=f"backend {cell['backend']} not available")
                continue
            hung = [b for b in hangs.get((cell["backend"], cell["kind"]), []) if b <= cell["batch"]]
            if len(hung) >= HANGS_BEFORE_SKIP:
                cell.update(
                    status="skipped",
                    note=f"{cell['backend']} hung {len(hung)} times on {cell['kind']} cells "
                    f"at B <= {cell['batch']:,}",
                )
                continue
            keys = ("method", "kind", "d", "batch", "mode", "memory")
            req = {**req_common, **{k: cell[k] for k in keys}}
            key = tuple(cell[k] for k in keys)
            timeout = args.cell_timeout
            if key in walls:
                timeout = min(timeout, max(HANG_FLOOR_S, HANG_FACTOR * walls[key]))
            t_cell = time.perf_counter()
            try:
                cell.update(w.request(req, timeout))
                cell["cell_wall_s"] = round(time.perf_counter() - t_cell, 3)
                walls[key] = max(walls.get(key, 0.0), cell["cell_wall_s"])
            except (TimeoutError, WorkerError, OSError) as exc:
                if isinstance(exc, TimeoutError):
                    hangs.setdefault((cell["backend"], cell["kind"]), []).append(cell["batch"])
                cell.update(status="error", note=f"{exc} (worker restarted)")
                print(f"# {cell['backend']} {key}: {exc}", file=sys.stderr)
                w.kill()
                try:
                    w.start()
                except (WorkerError, TimeoutError) as exc2:
                    print(f"# {cell['backend']}: cannot restart ({exc2})", file=sys.stderr)
                    del workers[cell["backend"]]
            if cell.get("status") == "error":
                print(f"# error: {cell.get('note')}", file=sys.stderr)
            elif args.verbose and cell.get("status") == "ok":
                print(
                    f"#   {cell['backend']} {cell['method']} {cell['kind']} d={cell['d']} "
                    f"B={cell['batch']} {cell['mode']}: {cell['median_s'] * 1e3:.3f} ms "
                    f"(n={cell['n']}, cell {cell.get('cell_wall_s', 0):.1f} s)",
                    file=sys.stderr,
                )
    finally:
        for w in workers.values():
            w.close()
        shutil.rmtree(data_dir, ignore_errors=True)
    print(f"# timed {len(todo)} cells in {time.perf_counter() - t_start:.0f} s", file=sys.stderr)
    return info


def default_json_path(args: argparse.Namespace, date: str) -> Path:
    if args.json is not None:
        return args.json
    label = args.label or socket.gethostname()
    if args.quick:
        return Path(tempfile.gettempdir()) / f"trp-bench-quick-{label}-{os.getpid()}.json"
    return HERE / "results" / f"{label}-{date}.json"


def dump_json(result: dict[str, Any]) -> str:
    """Indented JSON with one line per cell: readable, and small diffs between runs."""
    head = json.dumps({k: v for k, v in result.items() if k != "cells"}, indent=1)
    cells = ",\n  ".join(json.dumps(c) for c in result["cells"])
    return f'{head[:-2]},\n "cells": [\n  {cells}\n ]\n}}\n'


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Stopped by `timeout` (SIGTERM): exit through the `finally`s, which stop the workers and
    # remove the shared data (about 1 GB for a million full Gaussians).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t0 = time.perf_counter()
    now = dt.datetime.now(dt.timezone.utc)
    machine = machine_info(args.threads)
    cells = plan(args)
    if args.baseline:
        args.baseline_src = export_baseline(args.baseline)
    backend_info = run_grid(args, cells)
    machine["load_end"] = _load()
    ready = [b for b in args.backends if backend_info.get(b, {}).get("ready")]
    result = {
        "schema": 1,
        "label": args.label or machine["hostname"],
        "date": now.isoformat(timespec="seconds"),
        "command": [Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)],
        "machine": machine,
        "settings": {
            "quick": args.quick,
            "device": args.device,
            "threads": args.threads,
            "omp_wait_policy": args.omp_wait_policy or None,
            "xla_flags": args.xla_flags or None,
            "worker_env": dict(args.worker_env) or None,
            "variant_env": dict(args.variant_env) or None,
            "dtype": args.dtype,
            "methods": args.methods,
            "kinds": args.kinds,
            "dims": args.dims,
            "batches": args.batches,
            "modes": args.modes,
            "warmup": args.warmup,
            "min_repeat": args.min_repeat,
            "max_repeat": args.repeat,
            "budget_s": args.budget,
            "max_cell_s": args.max_cell_s,
            "max_mem_gb": args.max_mem_gb,
            "seed": args.seed,
            "bound_quantile": args.bound_quantile,
            "baseline": args.baseline,
        },
        "backends": {b: backend_info.get(b, {}) for b in args.backends},
        "cells": cells,
    }
    result["targets"] = _report.evaluate_targets(cells, [b for b in ready if "@" not in b])
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    text = _report.render(result)
    print(text)
    path = default_json_path(args, now.date().isoformat())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_json(result))
    if args.markdown is not None:
        args.markdown.write_text(text + "\n")
    print(f"# results: {path} ({result['wall_s']} s)", file=sys.stderr)
    errors = [c for c in cells if c.get("status") == "error"]
    timed = [c for c in cells if c.get("status") == "ok"]
    if errors or not timed:
        print(f"# {len(errors)} cell(s) failed, {len(timed)} timed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
