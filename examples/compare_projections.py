"""Project one batch of random Gaussians with every method, in every installed array library.

The same NumPy data (a batch of states, diagonal and full covariances) is handed to
``tr_projections`` as NumPy, PyTorch and JAX arrays. For each library, method and kind the table
shows the distance parts the projection bounds before and after projecting (measured with the
library's own distance functions ``trp.kl``, ``trp.frobenius``, ``trp.wasserstein``), the fraction
of states whose mean or scale was changed, and the largest difference from the NumPy float64
result. The script exits with status 1 if any projected state exceeds its bound or a library
disagrees with NumPy beyond the dtype's tolerance.

Run::

    python examples/compare_projections.py            # 256 states, d = 6
    python examples/compare_projections.py --quick    # 32 states, d = 4
    python examples/compare_projections.py --batch 1024 --dim 10 --dtypes float64 float32
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import platform
import sys
import time
from typing import Any, NamedTuple

import numpy as np

import tr_projections as trp

#: Bounds per method: (eps_mean, eps_cov), chosen near the median distance of the data below so
#: that roughly half of the states exceed each bound. The KL pair and the W2 mean bound are the
#: typical values of the paper's configurations (its W2 covariance bound, 5e-5, would make almost
#: every state of this data active).
BOUNDS: dict[str, tuple[float, float]] = {
    "kl": (0.03, 1e-3),
    "frobenius": (0.06, 2e-2),
    "wasserstein": (0.085, 1e-3),
}
DISTANCES = {"kl": trp.kl, "frobenius": trp.frobenius, "wasserstein": trp.wasserstein}
LIBRARIES = ("numpy", "torch", "jax", "array_api_strict")

#: How far a projected distance may exceed its bound (relative), and how far a library may be
#: from the NumPy float64 result (absolute, outputs are O(1)), per dtype.
BOUND_RTOL = {"float64": 1e-9, "float32": 1e-3}
AGREE_ATOL = {"float64": 1e-8, "float32": 1e-3}


# --------------------------------------------------------------------------- data


def random_rotations(rng: np.random.Generator, batch: int, d: int) -> np.ndarray:
    """Haar-distributed orthogonal matrices (QR of a Gaussian matrix with the signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((batch, d, d)))
    return q * np.sign(np.diagonal(r, axis1=-2, axis2=-1))[..., None, :]


def log_uniform(rng: np.random.Generator, low: float, high: float, size: Any) -> np.ndarray:
    return np.exp(rng.uniform(np.log(low), np.log(high), size))


def make_problem(rng: np.random.Generator, batch: int, d: int) -> dict[str, tuple[np.ndarray, ...]]:
    """New and old Gaussians ``(mean, scale, old_mean, old_scale)``, diagonal and full.

    Old covariances: ``Q diag(e) Q^T`` with ``Q`` a random rotation and eigenvalues ``e``
    log-uniform between 1/sqrt(c) and sqrt(c), the condition number ``c`` itself log-uniform in
    [1, 1e3] per state. New covariances differ from the old ones by a random rotation of
    relative eigenvalues ``exp(r z)``, with a step size ``r`` log-uniform over two decades so that
    some states lie deep inside and some far outside a typical trust region. Means move by
    ``r_mean`` old standard deviations in a random direction.
    """
    cond = log_uniform(rng, 1.0, 1e3, (batch, 1))
    eig = cond ** rng.uniform(-0.5, 0.5, (batch, d))
    Q = random_rotations(rng, batch, d)
    old_cov = (Q * eig[..., None, :]) @ np.swapaxes(Q, -1, -2)
    old_chol = np.linalg.cholesky(old_cov)

    r_cov = log_uniform(rng, 3e-3, 0.3, (batch, 1))
    rel = np.exp(r_cov * rng.standard_normal((batch, d)))
    R = random_rotations(rng, batch, d)
    rel_cov = (R * rel[..., None, :]) @ np.swapaxes(R, -1, -2)
    new_chol = np.linalg.cholesky(old_chol @ rel_cov @ np.swapaxes(old_chol, -1, -2))

    old_mean = rng.standard_normal((batch, d))
    r_mean = log_uniform(rng, 0.02, 0.5, (batch, 1))
    step = (old_chol @ rng.standard_normal((batch, d, 1)))[..., 0]
    new_mean = old_mean + r_mean * step

    old_std = np.sqrt(eig)
    new_std = old_std * np.exp(0.5 * r_cov * rng.standard_normal((batch, d)))
    diag_step = old_std * rng.standard_normal((batch, d))
    diag_mean = old_mean + r_mean * diag_step
    return {
        "diag": (diag_mean, new_std, old_mean, old_std),
        "full": (new_mean, new_chol, old_mean, old_chol),
    }


# --------------------------------------------------------------------------- libraries


class Library(NamedTuple):
    name: str
    version: str
    convert: Any  # (np.ndarray, dtype name) -> array
    to_numpy: Any  # array -> np.ndarray


def load_library(name: str) -> Library | None:
    """The converters for ``name``, or ``None`` (with a note) when it is not installed."""
    try:
        if name == "numpy":
            return Library("numpy", np.__version__, lambda a, dt: a.astype(dt), np.asarray)
        if name == "torch":
            import torch

            def to_torch(a: np.ndarray, dt: str) -> Any:
                return torch.asarray(a.astype(dt))

            return Library("torch", torch.__version__, to_torch, lambda x: x.detach().numpy())
        if name == "jax":
            import jax

            jax.config.update("jax_enable_x64", True)  # otherwise float64 silently becomes float32
            import jax.numpy as jnp

            def to_jax(a: np.ndarray, dt: str) -> Any:
                return jnp.asarray(a, dtype=dt)

            return Library("jax", jax.__version__, to_jax, np.asarray)
        if name == "array_api_strict":
            xp = importlib.import_module("array_api_strict")
            return Library(
                name,
                importlib.metadata.version("array-api-strict"),
                lambda a, dt: xp.asarray(a.astype(dt)),
                np.asarray,
            )
    except ImportError as err:
        print(f"note: skipping {name}: not installed ({err})")
        return None
    raise ValueError(f"unknown library {name!r}; choose from {LIBRARIES}")


def describe_machine(libraries: list[Library]) -> str:
    parts = [
        f"platform: {platform.platform()} ({platform.machine()})",
        f"python:   {platform.python_implementation()} {platform.python_version()}",
        f"tr_projections {trp.__version__}, array-api-compat "
        + importlib.metadata.version("array-api-compat"),
        "libraries: " + ", ".join(f"{lib.name} {lib.version}" for lib in libraries),
    ]
    return "\n".join(parts)


# --------------------------------------------------------------------------- the comparison


class Row(NamedTuple):
    library: str
    method: str
    kind: str
    dtype: str
    eps: tuple[float, float]
    before: tuple[np.ndarray, np.ndarray]
    after: tuple[np.ndarray, np.ndarray]
    moved: tuple[float, float]
    diff: float
    ms: float
    kept: bool  # the output has the input's array type and dtype


def run_one(
    lib: Library, method: str, kind: str, dtype: str, data: tuple[np.ndarray, ...], ref: Any
) -> tuple[Row, tuple[np.ndarray, np.ndarray]]:
    args = tuple(lib.convert(a, dtype) for a in data)
    eps_mean, eps_cov = BOUNDS[method]
    distance = DISTANCES[method]

    trp.project(*args, method=method, eps_mean=eps_mean, eps_cov=eps_cov)  # warm-up (JIT, caches)
    t0 = time.perf_counter()
    out = trp.project(*args, method=method, eps_mean=eps_mean, eps_cov=eps_cov)
    mean, scale = (lib.to_numpy(x) for x in out)  # also waits for asynchronous backends
    ms = 1e3 * (time.perf_counter() - t0)
    kept = all(type(x) is type(args[0]) and x.dtype == args[0].dtype for x in out)

    before = tuple(lib.to_numpy(x) for x in distance(*args))
    after = tuple(lib.to_numpy(x) for x in distance(out.mean, out.scale, *args[2:]))
    axes = tuple(range(1, scale.ndim))
    moved_mean = float(np.mean(np.any(mean != lib.to_numpy(args[0]), axis=-1)))
    moved_cov = float(np.mean(np.any(scale != lib.to_numpy(args[1]), axis=axes)))
    if ref is None:
        diff = 0.0
    else:
        diff = float(max(np.max(np.abs(mean - ref[0])), np.max(np.abs(scale - ref[1]))))
    row = Row(lib.name, method, kind, dtype, (eps_mean, eps_cov), before, after,
              (moved_mean, moved_cov), diff, ms, kept)  # fmt: skip
    return row, (mean, scale)


def check(row: Row) -> list[str]:
    """Problems with one row: a bound exceeded, a changed type or dtype, or disagreement with
    NumPy float64."""
    problems = [] if row.kept else ["output changed array type or dtype"]
    for part, after, eps in zip(("mean", "cov"), row.after, row.eps, strict=True):
        worst = float(np.max(after))
        if not worst <= eps * (1.0 + BOUND_RTOL[row.dtype]):
            problems.append(f"{part} part {worst:.6g} exceeds eps {eps:g}")
    if not row.diff <= AGREE_ATOL[row.dtype]:
        problems.append(f"differs from numpy float64 by {row.diff:.3g}")
    return problems


def format_table(rows: list[Row]) -> str:
    head = (
        f"{'library':<16} {'method':<11} {'kind':<4} {'dtype':<7} {'eps_mean':>8} {'eps_cov':>8} "
        f"| {'mean part: max, median before':>29} {'-> after':>19} "
        f"| {'cov part: max, median before':>28} {'-> after':>19} "
        f"| {'moved m/c':>9} | {'max|Δ| vs np':>12} | {'ms':>6}"
    )
    lines = [head, "-" * len(head)]

    def pair(x: np.ndarray) -> str:
        return f"{np.max(x):9.3e} {np.median(x):9.3e}"

    for r in rows:
        lines.append(
            f"{r.library:<16} {r.method:<11} {r.kind:<4} {r.dtype:<7} {r.eps[0]:8.3g} "
            f"{r.eps[1]:8.3g} | {pair(r.before[0]):>29} {pair(r.after[0]):>19} "
            f"| {pair(r.before[1]):>28} {pair(r.after[1]):>19} "
            f"| {r.moved[0]:4.2f}/{r.moved[1]:4.2f} | {r.diff:12.2e} | {r.ms:6.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256, help="number of states (default 256)")
    parser.add_argument("--dim", type=int, default=6, help="action dimension d (default 6)")
    parser.add_argument("--quick", action="store_true", help="32 states, d = 4 (for CI)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtypes", nargs="+", default=["float64"], choices=["float64", "float32"])
    parser.add_argument(
        "--libraries", nargs="+", default=["numpy", "torch", "jax"], choices=LIBRARIES
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.dim = 32, 4
    if "numpy" not in args.libraries:
        args.libraries.insert(0, "numpy")  # the reference every other library is compared with

    libraries = [lib for lib in map(load_library, args.libraries) if lib is not None]
    print(describe_machine(libraries))
    print(f"batch: {args.batch} states, d = {args.dim}, seed {args.seed}\n")

    problem = make_problem(np.random.default_rng(args.seed), args.batch, args.dim)
    rows: list[Row] = []
    failures: list[str] = []
    for method in trp.METHODS:
        for kind, data in problem.items():
            ref = None
            for dtype in ["float64"] + [t for t in args.dtypes if t != "float64"]:
                for lib in libraries:
                    row, result = run_one(lib, method, kind, dtype, data, ref)
                    if ref is None:
                        ref = result  # numpy float64 comes first
                    if dtype in args.dtypes:
                        rows.append(row)
                        failures += [f"{lib.name} {method} {kind} {dtype}: {p}" for p in check(row)]
    print(format_table(rows))
    print(
        "\nmean/cov part: the distance each projection bounds (trp.kl, trp.frobenius, "
        "trp.wasserstein),\nmax and median over states; moved m/c: fraction of states whose "
        "mean / scale changed;\nmax|Δ| vs np: largest absolute difference of mean and scale from "
        "the NumPy float64 result; ms: one call after a warm-up call."
    )
    if failures:
        print("\nFAILED:\n  " + "\n  ".join(failures))
        return 1
    print("\nall projected states satisfy their bounds; all libraries agree with NumPy.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
