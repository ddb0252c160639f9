r"""The diagonal KL projection and its VJP as two fused CUDA kernels, one thread per state.

On a GPU the array-API form of the diagonal KL projection (:mod:`.kl`) is a few hundred short
array operations, forward and backward, each a kernel launch and its Python dispatch: about
12 ms per forward + backward whatever the batch (an H100 ran its 523 kernels for a million 6-D
states in 5.6 ms of GPU time, within 12.4 ms of wall time). Here each state's whole projection,
the mean part, the bound test, the safeguarded Halley solve of :func:`.kl.solve_log_tau` (the
same start, steps, bracket and tolerances, with a state's own iteration count) and the
projected scale, is one thread's work, and so is its VJP: one launch each way.

Used for CuPy arrays and torch CUDA tensors of float32 or float64, when CuPy is installed and
sees the GPU (the kernels are compiled by CuPy's NVRTC at first use, then cached), for diagonal
Gaussians whose scales span the batch (no covariance shared between states, which
:func:`._core.cov_problem` computes once). torch tensors are read and written in place through
their device pointers, on torch's current stream, outside ``torch.func`` transforms and
``torch.compile`` tracing and under no ``__torch_function__`` mode other than a default device
and no dispatch mode (whose observers would see none of the work). A backward that the kernels
cannot take (``torch.func.grad`` lowers its transform for the forward, so the forward may run
fused and the backward see wrapped tensors) goes on with the array-API VJP, its residuals
rebuilt from the kernels' (:func:`.kl._from_fused`). :data:`FUSED` (environment variable
``TRP_FUSED``) turns the kernels off.

The same source compiles as plain C++ for the host (without ``TRP_CUDA``), where each kernel
runs its states in a loop. With :data:`FUSED_CPU` on (opt-in: environment variable
``TRP_FUSED_CPU=on``), NumPy arrays and torch CPU tensors (on either of the torch adapter's
routes) take that build, compiled by the system's C++ compiler at first use and cached on disk
(:func:`_host_library`); the package's chunks and lanes (:mod:`..backends._common`) run it on
every thread, as ``ctypes`` releases the GIL. ``tests/test_kl_fused.py`` checks the host build
against the array-API form on the CPU, and the CUDA build on a GPU.
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .. import _compat
from ..gaussian import Gaussian

Array = Any

#: ``"auto"`` (default; environment variable ``TRP_FUSED``): the fused kernels, and the
#: small-matrix kernels of :mod:`tr_projections._small_kernels`, where they apply (see the
#: modules' docstrings); ``"off"``: never (the array-API form and the libraries' routines
#: everywhere).
FUSED = os.environ.get("TRP_FUSED", "auto").strip().lower()
_FUSED_VALUES = ("auto", "off")

#: ``"off"`` (default; environment variable ``TRP_FUSED_CPU``): NumPy arrays and torch CPU
#: tensors take the array-API form; ``"on"``: their diagonal KL projections run in the kernels'
#: host build, and their small triangular solves and Gram-matrix factors (d <= 16) and
#: ``eigh`` (d <= 12) in those of :mod:`tr_projections._small_kernels`, compiled with the
#: system's C++ compiler
#: (:func:`compiler`) at first use and cached (:func:`build_host`). Where no compiler is found
#: or the build fails: one ``RuntimeWarning``, and the array-API form.
FUSED_CPU = os.environ.get("TRP_FUSED_CPU", "off").strip().lower()
_FUSED_CPU_VALUES = ("off", "on")

#: The host build's compiler flags: IEEE arithmetic (no fast-math, no contraction into FMAs;
#: the flags are those of gcc and clang).
HOST_FLAGS = (
    "-O2",
    "-std=c++17",
    "-fno-fast-math",
    "-fno-math-errno",
    "-ffp-contract=off",
    "-shared",
    "-fPIC",
)

#: Threads per block.
BLOCK = 256

SOURCE = r"""
// tr_projections: the diagonal KL projection and its VJP, one thread per state (row).
// REAL and the constants below are defined by the compile options.
#ifdef TRP_CUDA
#define TRP_DEV __device__ __forceinline__
#define TRP_KERNEL extern "C" __global__
#define TRP_INF __longlong_as_double(0x7ff0000000000000ULL)
#else
#include <cmath>
using std::exp; using std::expm1; using std::fabs; using std::fmax; using std::fmin;
using std::log; using std::log1p; using std::sqrt;
#define TRP_DEV static inline
#define TRP_KERNEL extern "C"
#define TRP_INF INFINITY
#endif

typedef REAL real;
typedef unsigned long long ptr_t;
#define R(x) ((real)(x))
#define P(p) ((real*)(p))

// lambda = (sigma_o / sigma)^2 and a = lambda - 1, both without cancellation.
TRP_DEV void eig(real s, real so, real& a, real& lam) {
    real q = so / s;
    a = (q - R(1)) * (q + R(1));
    lam = fmax(q * q, R(TRP_TINY));
}

// h(x) = log(1 + x) - x / t with t = 1 + x; the alternating series near 0.
TRP_DEV real kl_h(real x, real t) {
    if (fabs(x) < R(TRP_SERIES_BELOW)) {
        real poly = R(0);
        for (int k = 10; k > 1; --k)
            poly = poly * x + R((k % 2 ? -1.0 : 1.0) * (k - 1) / (double)k);
        return poly * x * x;
    }
    return log1p(fmax(x, R(TRP_EPS - 1.0))) - x / t;
}

// f = log g - log eps at s = log tau, Newton's step on it, the step taken (Halley's where its
// correction |c| <= 1/2, float64 only) and whether it was Halley's.
TRP_DEV void step(const real* s_row, const real* so_row, int d, real s, real log_eps,
                  real& f, real& newton, real& ds, bool& halley) {
    real e = exp(s), em = expm1(s);
    real g = R(0), slope = R(0), curv = R(0);
    for (int i = 0; i < d; ++i) {
        real a, lam;
        eig(s_row[i], so_row[i], a, lam);
        real x = e * a, t = e * lam - em, r = x / t;
        g += TRP_HALLEY ? log1p(fmax(x, R(TRP_EPS - 1.0))) - r : kl_h(x, t);
        real r2 = r * r;
        slope += r2;
        if (TRP_HALLEY) curv += r2 / t;
    }
    g = fmax(R(0.5) * g, R(TRP_TINY));
    slope = fmax(R(0.5) * slope, R(TRP_TINY));
    f = log(g) - log_eps;
    newton = -f * (g / slope);
    ds = newton;
    halley = false;
    if (TRP_HALLEY) {
        real c = R(0.5) * newton * (curv / slope - slope / g);
        halley = fabs(c) <= R(0.5);
        if (halley) ds = newton / (R(1) + c);
    }
}

// s = log tau with g(tau) = eps for a row with g(1) = g1 > eps (kl.solve_log_tau's steps).
TRP_DEV real solve(const real* s_row, const real* so_row, int d, real g1, real eps) {
    real S = R(0);
    for (int i = 0; i < d; ++i) {
        real a, lam;
        eig(s_row[i], so_row[i], a, lam);
        S += a * a;
    }
    real tau0 = fmin(R(1), R(2) * sqrt(eps / S));
    real lo = fmin(R(0.5), R(0.5) * tau0);
    real log_lo = log(lo);
    real corr = R(0), slope = R(0), curv = R(0);
    for (int i = 0; i < d; ++i) {
        real a, lam;
        eig(s_row[i], so_row[i], a, lam);
        corr += (a * a / S) * (tau0 * a);
        real r2 = a / lam;
        r2 = r2 * r2;
        slope += r2;
        if (TRP_HALLEY) curv += r2 / lam;
    }
    corr = R(1) + R(2.0 / 3.0) * corr;
    real s_cubic = log(fmin(fmax(tau0 * fmin(fmax(corr, R(0.5)), R(2)), lo), R(1)));
    real log_eps = log(eps);
    real f_hi = log(g1) - log_eps;
    slope = fmax(R(0.5) * slope, R(TRP_TINY));
    real ds = -f_hi * (g1 / slope);
    if (TRP_HALLEY) {
        real c = R(0.5) * ds * (curv / slope - slope / g1);
        if (fabs(c) <= R(0.5)) ds = ds / (R(1) + c);
    }
    real s = f_hi <= R(1) ? fmin(fmax(ds, log_lo), R(0)) : s_cubic;
    real f, newton;
    bool halley;
    // Unguarded steps first, kept in [log_lo, 0].
    for (int k = 0; k < TRP_FAST_STEPS; ++k) {
        step(s_row, so_row, d, s, log_eps, f, newton, ds, halley);
        real err = fmax(fabs(newton), fabs(f));
        bool converged = TRP_HALLEY ? (err <= R(TRP_TOL3) && halley) : err <= R(TRP_TOL);
        s = fmin(fmax(s + ds, log_lo), R(0));
        if (converged) return s;
    }
    // The safeguarded iteration: bracket [s_lo, s_hi], the step where it stays inside and
    // shrinks at least by half, else the secant (Illinois rule) or the midpoint.
    real s_lo = log_lo, s_hi = R(0), f_lo = -TRP_INF, ds_old = TRP_INF;
    bool last_below = false;
    for (int it = 0; it < TRP_MAX_ITER; ++it) {
        step(s_row, so_row, d, s, log_eps, f, newton, ds, halley);
        bool below = f <= R(0);
        bool same = below == last_below;
        if (same && !below) f_lo = R(0.5) * f_lo;
        if (same && below) f_hi = R(0.5) * f_hi;
        if (below) { s_lo = s; f_lo = f; } else { s_hi = s; f_hi = f; }
        real next = s + ds;
        real slack = R(4) * R(TRP_EPS) * fabs(s) + R(TRP_TINY);
        bool inside = next >= s_lo - slack && next <= s_hi + slack;
        real abs_ds = fabs(ds);
        real err = fmax(abs_ds, fabs(f));
        bool converged = err <= R(TRP_TOL) || (TRP_HALLEY && halley && err <= R(TRP_TOL3));
        converged = inside && converged;
        bool ok = converged || (inside && R(2) * abs_ds <= fabs(ds_old));
        real span = f_hi - f_lo;
        bool known = f_lo > -TRP_INF && span > R(0);
        real fallback = known ? s_lo - f_lo * (s_hi - s_lo) / span : R(0.5) * (s_lo + s_hi);
        real s_new = ok ? fmin(fmax(next, s_lo), s_hi) : fallback;
        ds_old = s_new - s;
        last_below = below;
        s = s_new;
        if (converged) break;
    }
    return s;
}

TRP_DEV void kl_diag_fwd_row(
    long long row, int d, ptr_t mean_p, ptr_t scale_p, ptr_t old_mean_p, ptr_t old_scale_p,
    ptr_t eps_mean_p, int eps_mean_step, ptr_t eps_cov_p, int eps_cov_step,
    ptr_t out_mean_p, ptr_t out_scale_p, ptr_t tau_mean_p, ptr_t dist_mean_p,
    ptr_t active_mean_p, ptr_t tau_p, ptr_t log_tau_p, ptr_t active_p) {
    long long o = row * d;
    const real* m = P(mean_p) + o;
    const real* s = P(scale_p) + o;
    const real* om = P(old_mean_p) + o;
    const real* so = P(old_scale_p) + o;
    real* out_m = P(out_mean_p) + o;
    real* out_s = P(out_scale_p) + o;
    // The mean part: tau = sqrt(eps / dist) above the bound, interpolation of the means.
    real eps_m = P(eps_mean_p)[row * eps_mean_step];
    real dist = R(0);
    for (int i = 0; i < d; ++i) {
        real z = (m[i] - om[i]) / so[i];
        dist += z * z;
    }
    dist = R(0.5) * dist;
    bool act_m = dist > eps_m;
    real tau_m = act_m ? sqrt(eps_m / dist) : R(1);
    for (int i = 0; i < d; ++i)
        out_m[i] = act_m ? tau_m * m[i] + (R(1) - tau_m) * om[i] : m[i];
    P(tau_mean_p)[row] = tau_m;
    P(dist_mean_p)[row] = dist;
    ((bool*)active_mean_p)[row] = act_m;
    // The covariance part: g(1), the weight where it exceeds the bound, the projected stds.
    real eps_c = P(eps_cov_p)[row * eps_cov_step];
    real g1 = R(0);
    for (int i = 0; i < d; ++i) {
        real a, lam;
        eig(s[i], so[i], a, lam);
        g1 += kl_h(a, lam);
    }
    g1 = R(0.5) * g1;
    bool act = g1 > eps_c;
    real log_tau = act ? solve(s, so, d, g1, eps_c) : R(0);
    real e = exp(log_tau), em = expm1(log_tau);
    for (int i = 0; i < d; ++i) {
        if (act) {
            real a, lam;
            eig(s[i], so[i], a, lam);
            out_s[i] = so[i] / sqrt(e * lam - em);
        } else {
            out_s[i] = s[i];
        }
    }
    P(tau_p)[row] = e;
    P(log_tau_p)[row] = log_tau;
    ((bool*)active_p)[row] = act;
}

TRP_DEV void kl_diag_vjp_row(
    long long row, int d, ptr_t mean_p, ptr_t scale_p, ptr_t old_mean_p, ptr_t old_scale_p,
    ptr_t g_mean_p, ptr_t g_scale_p, ptr_t tau_mean_p, ptr_t dist_mean_p, ptr_t active_mean_p,
    ptr_t tau_p, ptr_t log_tau_p, ptr_t active_p,
    ptr_t mean_bar_p, ptr_t scale_bar_p, ptr_t old_mean_bar_p, ptr_t old_scale_bar_p) {
    long long o = row * d;
    const real* m = P(mean_p) + o;
    const real* s = P(scale_p) + o;
    const real* om = P(old_mean_p) + o;
    const real* so = P(old_scale_p) + o;
    const real* gm = P(g_mean_p) + o;
    const real* gs = P(g_scale_p) + o;
    real* mean_bar = P(mean_bar_p) + o;
    real* scale_bar = P(scale_bar_p) + o;
    bool old = old_mean_bar_p != 0;
    // The mean part (coefficient 1/2 on the Mahalanobis distance): with z = delta / sigma_o
    // and w = z / sigma_o, mean_bar = tau g + k w, k = -tau <g, delta> / (2 dist).
    bool act_m = ((const bool*)active_mean_p)[row];
    real tau_m = P(tau_mean_p)[row];
    real k = R(0);
    if (act_m) {
        real gd = R(0);
        for (int i = 0; i < d; ++i) gd += gm[i] * (m[i] - om[i]);
        k = R(-0.5) * gd * tau_m / P(dist_mean_p)[row];
    }
    for (int i = 0; i < d; ++i) {
        real z = (m[i] - om[i]) / so[i], w = z / so[i];
        real mb = act_m ? tau_m * gm[i] + k * w : gm[i];
        mean_bar[i] = mb;
        if (old) {
            P(old_mean_bar_p)[o + i] = act_m ? gm[i] - mb : R(0);
            P(old_scale_bar_p)[o + i] = act_m ? -k * (z * w) : R(0);
        }
    }
    // The covariance part, by the implicit function theorem on g(tau) = eps.
    if (!((const bool*)active_p)[row]) {
        for (int i = 0; i < d; ++i) scale_bar[i] = gs[i];
        return;
    }
    real tau = P(tau_p)[row], log_tau = P(log_tau_p)[row];
    real e = exp(log_tau), em = expm1(log_tau);
    real dg = R(0), tb_a = R(0);
    for (int i = 0; i < d; ++i) {
        real a, lam;
        eig(s[i], so[i], a, lam);
        real t = e * lam - em;
        real m_eig = R(0.5) * tau * a / (t * t);
        dg += m_eig * a;
        tb_a += (R(-0.5) * gs[i] * (so[i] / sqrt(t)) / t) * a;
    }
    real kappa = tb_a / dg;
    for (int i = 0; i < d; ++i) {
        real a, lam;
        eig(s[i], so[i], a, lam);
        real t = e * lam - em;
        real sq = sqrt(t);
        real m_eig = R(0.5) * tau * a / (t * t);
        real t_bar = R(-0.5) * gs[i] * (so[i] / sq) / t;
        real a_bar = tau * t_bar - kappa * tau * m_eig;
        scale_bar[i] = R(-2) * a_bar * lam / s[i];
        if (old) P(old_scale_bar_p)[o + i] += gs[i] / sq + R(2) * a_bar * lam / so[i];
    }
}

#ifdef TRP_CUDA
#define TRP_ROWS(n) \
    long long row = blockIdx.x * (long long)blockDim.x + threadIdx.x; \
    if (row < n)
#else
#define TRP_ROWS(n) for (long long row = 0; row < n; ++row)
#endif

TRP_KERNEL void kl_diag_fwd(
    long long n, int d, ptr_t mean_p, ptr_t scale_p, ptr_t old_mean_p, ptr_t old_scale_p,
    ptr_t eps_mean_p, int eps_mean_step, ptr_t eps_cov_p, int eps_cov_step,
    ptr_t out_mean_p, ptr_t out_scale_p, ptr_t tau_mean_p, ptr_t dist_mean_p,
    ptr_t active_mean_p, ptr_t tau_p, ptr_t log_tau_p, ptr_t active_p) {
    TRP_ROWS(n) kl_diag_fwd_row(
        row, d, mean_p, scale_p, old_mean_p, old_scale_p, eps_mean_p, eps_mean_step,
        eps_cov_p, eps_cov_step, out_mean_p, out_scale_p, tau_mean_p, dist_mean_p,
        active_mean_p, tau_p, log_tau_p, active_p);
}

TRP_KERNEL void kl_diag_vjp(
    long long n, int d, ptr_t mean_p, ptr_t scale_p, ptr_t old_mean_p, ptr_t old_scale_p,
    ptr_t g_mean_p, ptr_t g_scale_p, ptr_t tau_mean_p, ptr_t dist_mean_p, ptr_t active_mean_p,
    ptr_t tau_p, ptr_t log_tau_p, ptr_t active_p,
    ptr_t mean_bar_p, ptr_t scale_bar_p, ptr_t old_mean_bar_p, ptr_t old_scale_bar_p) {
    TRP_ROWS(n) kl_diag_vjp_row(
        row, d, mean_p, scale_p, old_mean_p, old_scale_p, g_mean_p, g_scale_p, tau_mean_p,
        dist_mean_p, active_mean_p, tau_p, log_tau_p, active_p, mean_bar_p, scale_bar_p,
        old_mean_bar_p, old_scale_bar_p);
}
"""


def defines(dtype: Any) -> dict[str, str]:
    """The compile-time constants of the kernels for NumPy dtype ``dtype`` (float32 or
    float64): the same as the array-API form's (:func:`.kl._tolerances`, :func:`.kl._halley`,
    the series threshold of :func:`~tr_projections.distances.kl_h`)."""
    from .kl import FAST_STEPS, MAX_ITER  # (kl imports this module)

    fi = np.finfo(dtype)
    eps = float(fi.eps)
    halley = eps < 1e-10
    return {
        "REAL": "double" if fi.bits == 64 else "float",
        "TRP_EPS": repr(eps),
        "TRP_TINY": repr(float(fi.smallest_normal)),
        "TRP_TOL": repr(math.sqrt(eps)),
        "TRP_TOL3": repr(0.25 * eps ** (1.0 / 3.0)),
        "TRP_HALLEY": "1" if halley else "0",
        "TRP_SERIES_BELOW": "0.01" if halley else "0.1",
        "TRP_FAST_STEPS": str(FAST_STEPS),
        "TRP_MAX_ITER": str(MAX_ITER),
    }


_lock = threading.Lock()
_modules: dict[tuple[int, str], Any] = {}
_failed: dict[str, str] = {}  # dtype name -> why its kernels could not be built here
_host: dict[str, Any] = {}  # dtype name -> the host build (a ctypes library)
_host_failed: dict[str, str] = {}


def _warn_failed(what: str, dtype_name: str, reason: str, stacklevel: int = 5) -> None:
    warnings.warn(
        f"tr_projections: the fused diagonal KL kernels ({what}, {dtype_name}) could not be "
        f"built ({reason}); the array-API form is used instead",
        RuntimeWarning,
        stacklevel=stacklevel,
    )


def compiler() -> list[str] | None:
    """The command of the host build's C++ compiler: ``CXX`` where set (split like a shell
    word list: ``"ccache g++"``), else the first of ``g++``, ``c++``, ``clang++`` on the
    ``PATH`` (``None``: none)."""
    cxx = os.environ.get("CXX", "").strip()
    if cxx:
        return shlex.split(cxx)
    found = next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)
    return None if found is None else [found]


def _private_folder() -> Path:
    """A folder of this process's own, removed at exit: where the host build goes when the
    cache folder cannot take it or holds a file that is not to be trusted."""
    folder = Path(tempfile.mkdtemp(prefix="tr_projections-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def _trusted(path: Path) -> bool:
    """Whether an existing cache file may be loaded: owned by this user and writable by no one
    else (a shared or group-writable cache folder could hold anyone's library)."""
    st = path.stat()
    getuid = getattr(os, "getuid", None)  # (POSIX)
    return (getuid is None or st.st_uid == getuid()) and not st.st_mode & 0o022


def _build(cxx: list[str], defs: list[str], path: Path, source: str = SOURCE) -> None:
    # Compile into a temporary folder beside ``path`` and rename: concurrent processes never
    # load half a file.
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        src = Path(tmp) / "kernels.cpp"
        src.write_text(source)
        out = Path(tmp) / path.name
        cmd = [*cxx, *HOST_FLAGS, *defs, "-o", str(out), str(src)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cxx)} failed: {done.stderr.strip()[-500:]}")
        out.chmod(0o755)  # (writable by no one else whatever the umask: see _trusted)
        os.replace(out, path)


def cache_path(dtype_name: str, cxx: list[str]) -> Path:
    """Where the host build for ``dtype_name`` by compiler command ``cxx`` is cached: under
    ``TRP_CACHE_DIR`` (default ``~/.cache/tr_projections``), named by a hash of the source,
    the dtype's constants, the compiler (its command and ``--version``), the flags and the
    platform."""
    defs = [f"-D{k}={v}" for k, v in defines(dtype_name).items()]
    return host_cache_path(f"kl_diag_{dtype_name}", SOURCE, defs, cxx)


def host_cache_path(tag: str, source: str, defs: list[str], cxx: list[str]) -> Path:
    """Where the host build of ``source`` with the compiler options ``defs`` by compiler
    command ``cxx`` is cached: ``<tag>_<hash>.so`` under ``TRP_CACHE_DIR`` (default
    ``~/.cache/tr_projections``), the hash of the source, the options, the compiler (its
    command and ``--version``), the flags and the platform."""
    try:
        version = subprocess.run(
            [*cxx, "--version"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    parts = (source, *cxx, version, *HOST_FLAGS, *defs, sys.platform, platform.machine())
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    folder = os.environ.get("TRP_CACHE_DIR") or Path.home() / ".cache" / "tr_projections"
    return Path(folder) / f"{tag}_{key}.so"


def build_host(tag: str, source: str, defs: list[str]) -> Any:
    """The host build of ``source`` with the compiler options ``defs``, as a ``ctypes``
    library: loaded from the cache (:func:`host_cache_path`) where a trusted file is there,
    else compiled there, or in a private folder where the cache folder cannot be written or its
    file cannot be trusted or loaded. Raises where it cannot be built (no compiler, a failed
    compilation); callers cache the result and warn once."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    path = host_cache_path(tag, source, defs, cxx)
    lib = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            _build(cxx, defs, path, source)
        if _trusted(path):
            lib = ctypes.CDLL(str(path))
    except OSError:  # (a folder it cannot write, a file it cannot load)
        lib = None
    if lib is None:
        path = _private_folder() / path.name
        _build(cxx, defs, path, source)
        lib = ctypes.CDLL(str(path))
    return lib


def build_host_once(
    key: Any,
    tag: str,
    source: str,
    defs: list[str],
    built: dict,
    failed: dict,
    warn: Any,
) -> Any | None:
    """The host build of ``source`` (:func:`build_host`) for ``key``, built or loaded once per
    process and kept in ``built``; where it cannot be built, the reason is kept in ``failed``,
    ``warn(reason)`` is called once, and ``None`` is returned from then on."""
    lib = built.get(key)
    if lib is not None or key in failed:
        return lib
    with _lock:
        if key in built or key in failed:
            return built.get(key)
        try:
            lib = build_host(tag, source, defs)
        except Exception as exc:
            failed[key] = f"{type(exc).__name__}: {exc}"
            warn(failed[key])
            return None
        built[key] = lib
        return lib


def _host_library(dtype_name: str) -> Any | None:
    """The host build for ``dtype_name`` (:func:`build_host_once`)."""
    defs = [f"-D{k}={v}" for k, v in defines(dtype_name).items()]
    return build_host_once(
        dtype_name, f"kl_diag_{dtype_name}", SOURCE, defs, _host, _host_failed,
        lambda reason: _warn_failed("host build", dtype_name, reason, stacklevel=7),
    )  # fmt: skip


def build_cuda_once(
    key: Any,
    failed_key: Any,
    device_id: int,
    source: str,
    options: tuple[str, ...],
    names: tuple[str, ...],
    built: dict,
    failed: dict,
    warn: Any,
) -> dict | None:
    """The kernels ``names`` of ``source`` compiled by CuPy's NVRTC with ``options`` and loaded
    on CUDA device ``device_id``, once per ``key`` (kept in ``built``, as a dict by name);
    where they cannot be built, the reason is kept in ``failed`` under ``failed_key``,
    ``warn(reason)`` is called once, and ``None`` is returned from then on."""
    module = built.get(key)
    if module is not None or failed_key in failed:
        return module
    import cupy

    with _lock:
        if key in built or failed_key in failed:  # (another thread got here first)
            return built.get(key)
        try:
            with cupy.cuda.Device(device_id):
                raw = cupy.RawModule(code=source, options=options)
                # (compiled and loaded on this device now: errors are caught here)
                module = {name: raw.get_function(name) for name in names}
        except Exception as exc:
            failed[failed_key] = f"{type(exc).__name__}: {exc}"
            warn(failed[failed_key])
            return None
        built[key] = module
    return module


def _kernels(dtype_name: str, device_id: int) -> dict | None:
    """The two compiled kernels for ``dtype_name`` on CUDA device ``device_id``
    (:func:`build_cuda_once`)."""
    options = ("-DTRP_CUDA",) + tuple(f"-D{k}={v}" for k, v in defines(dtype_name).items())
    return build_cuda_once(
        (device_id, dtype_name), dtype_name, device_id, SOURCE, options,
        ("kl_diag_fwd", "kl_diag_vjp"), _modules, _failed,
        lambda reason: _warn_failed("CUDA", dtype_name, reason, stacklevel=8),
    )  # fmt: skip


_dtype_names: dict[tuple[type, Any], str] = {}


def _dtype_name(p: Any) -> str:
    # "float32" for NumPy's, CuPy's and torch's float32 alike (str() of a dtype took about a
    # microsecond, asked a few times per kernel call: the names are kept per dtype).
    # (keyed by the dtype's type too: array-api-strict's dtypes hash as NumPy's, and comparing
    # the two warns)
    dtype = p.dtype
    key = (type(dtype), dtype)
    name = _dtype_names.get(key)
    if name is None:
        name = _dtype_names.setdefault(key, str(dtype).rsplit(".", 1)[-1])
    return name


def _check_settings() -> None:
    for name, value, allowed in (
        ("FUSED", FUSED, _FUSED_VALUES),
        ("FUSED_CPU", FUSED_CPU, _FUSED_CPU_VALUES),
    ):
        if value not in allowed:
            raise ValueError(
                f"tr_projections.projections._kl_diag_fused.{name} (or TRP_{name}) must be one "
                f"of {allowed}, got {value!r}"
            )


def _torch_takes(*ts: Array) -> bool:
    """Whether the kernels may read and write torch tensors ``ts`` through their pointers:
    plain tensors (:func:`tr_projections._compat._torch_plain`: no transform, no tracing) and
    no torch mode but a default device, whose observers would see none of the work."""
    return _compat._torch_plain(*ts) and _compat._torch_modes_plain(default_device=True)


def applies(p: Any) -> bool:
    """Whether the diagonal KL projection of problem ``p`` (the covariance part's problem:
    :func:`._core.cov_problem`, shared by no states) may run in the fused kernels: CuPy arrays
    and torch CUDA tensors where CuPy sees the GPU, NumPy arrays and torch CPU tensors with
    :data:`FUSED_CPU` on; torch tensors outside ``torch.func`` transforms and
    ``torch.compile`` tracing (:func:`tr_projections._compat._torch_plain`) and modes."""
    _check_settings()
    if FUSED == "off" or p.full or math.prod(p.batch) == 0 or p.d == 0:
        return False
    xp = p.xp
    # (torch first: under torch.compile, filling the cache of _dtype_name would be a guard
    # failure, a recompile on the next call)
    if _compat.is_torch(xp) and not _torch_takes(p.mean, p.scale, p.old_mean, p.old_scale):
        return False
    name = _dtype_name(p)
    if name not in ("float32", "float64"):
        return False
    on_cpu = FUSED_CPU == "on" and name not in _host_failed
    on_gpu = name not in _failed
    if _compat.is_numpy(xp):
        return on_cpu
    if _compat.is_cupy(xp):
        return on_gpu and _compat._cupy_sees_gpu()
    if not _compat.is_torch(xp):
        return False
    device = p.scale.device.type
    if device == "cpu":
        return on_cpu
    return device == "cuda" and on_gpu and _compat._cupy_sees_gpu()


def pointer(x: Array) -> np.uint64:
    """The address of ``x``'s first entry: torch, NumPy, CuPy."""
    if isinstance(x, np.ndarray):
        return np.uint64(x.ctypes.data)
    return np.uint64(x.data_ptr() if hasattr(x, "data_ptr") else x.data.ptr)


def _c_arg(a: Any) -> Any:
    # A kernel argument for ctypes: pointers as np.uint64, counts and strides as np.int64,
    # the rest (np.int32) as int.
    if isinstance(a, np.uint64):
        return ctypes.c_ulonglong(int(a))
    if isinstance(a, np.int64):
        return ctypes.c_longlong(int(a))
    return ctypes.c_int(int(a))


#: Whether kernels on ``x`` run in the host build: NumPy arrays and torch CPU tensors.
on_host = _compat.on_host


def run_kernel(
    name: str, x: Array, xp: Any, n: int, args: tuple, host: Any, cuda: Any, block: int
) -> bool:
    """Run kernel ``name`` over ``n`` threads (rows) with ``args`` after the count: in the
    host build ``host()`` (a ``ctypes`` library, ``None`` where it cannot be built) for NumPy
    arrays and torch CPU tensors, else in ``cuda(device_id)`` (kernels by name) on ``x``'s GPU
    and, for torch, torch's current stream there; False where the kernels cannot be built."""
    if on_host(x, xp):
        lib = host()
        if lib is None:
            return False
        # (ctypes releases the GIL: chunks in lanes run at once)
        getattr(lib, name)(ctypes.c_longlong(n), *map(_c_arg, args))
        return True
    if _compat.is_torch(xp):
        import torch

        device_id = x.device.index if x.device.index is not None else torch.cuda.current_device()
        stream = torch.cuda.current_stream(device_id).cuda_stream
    else:
        device_id, stream = x.device.id, None
    module = cuda(device_id)
    if module is None:
        return False
    import cupy

    grid = ((n + block - 1) // block,)
    with cupy.cuda.Device(device_id):
        if stream is None:
            module[name](grid, (block,), (np.int64(n), *args))
        else:
            with _compat.cupy_stream(cupy, device_id, stream):
                module[name](grid, (block,), (np.int64(n), *args))
    return True


def _rows(x: Array, n: int, d: int | None, xp: Any) -> Array:
    # x as a C-contiguous (n, d) or (n,) array (a copy only where it is not one already).
    shape = (n,) if d is None else (n, d)
    if tuple(x.shape) != shape:
        x = xp.reshape(x, shape)
    if _compat.is_torch(xp):
        # (a lazily negated view, e.g. `c.conj().imag`, keeps its memory un-negated: the
        # kernels read memory)
        return x.resolve_neg().contiguous()
    native = np if isinstance(x, np.ndarray) else __import__("cupy")
    return native.ascontiguousarray(x)


def _bound(eps: Array, batch: tuple, n: int, xp: Any) -> tuple[Array, np.int32]:
    # A bound as a pointer and a step: 0 for one value, 1 for one per state.
    if math.prod(tuple(eps.shape)) == 1:
        return _rows(xp.reshape(eps, (1,)), 1, None, xp), np.int32(0)
    return _rows(xp.reshape(xp.broadcast_to(eps, batch), (-1,)), n, None, xp), np.int32(1)


def _launch(p: Any, name: str, args: tuple) -> bool:
    """Launch kernel ``name`` ("fwd" or "vjp") over the rows of ``p`` (:func:`run_kernel`);
    False where the kernels cannot be built."""
    dtype_name = _dtype_name(p)
    return run_kernel(
        f"kl_diag_{name}", p.scale, p.xp, math.prod(p.batch), (np.int32(p.d), *args),
        lambda: _host_library(dtype_name), lambda device_id: _kernels(dtype_name, device_id),
        BLOCK,
    )  # fmt: skip


def kl_diag_fwd(p: Any, eps_mean: Array, eps_cov: Array) -> tuple[Gaussian, tuple] | None:
    """The projection of diagonal problem ``p`` (:func:`applies`) and its residuals
    ``(tau_mean, dist_mean, active_mean, tau, log_tau, active)`` (batch-shaped, the last three
    flat), or ``None`` where the kernels cannot be built."""
    with _compat.on_device(p.scale, p.xp):  # (CuPy: copies and outputs on the arrays' GPU)
        return _kl_diag_fwd(p, eps_mean, eps_cov)


def _kl_diag_fwd(p: Any, eps_mean: Array, eps_cov: Array) -> tuple[Gaussian, tuple] | None:
    xp, d, batch = p.xp, p.d, p.batch
    n = math.prod(batch)
    ins = [_rows(x, n, d, xp) for x in (p.mean, p.scale, p.old_mean, p.old_scale)]
    em, em_step = _bound(eps_mean, batch, n, xp)
    ec, ec_step = _bound(eps_cov, batch, n, xp)
    kw = {"dtype": p.dtype, "device": p.device}
    out_mean, out_scale = xp.empty((n, d), **kw), xp.empty((n, d), **kw)
    tau_m, dist_m, tau, log_tau = (xp.empty((n,), **kw) for _ in range(4))
    act_m, act = (xp.empty((n,), dtype=xp.bool, device=p.device) for _ in range(2))
    args = (
        *map(pointer, ins), pointer(em), em_step, pointer(ec), ec_step,
        *map(pointer, (out_mean, out_scale, tau_m, dist_m, act_m, tau, log_tau, act)),
    )  # fmt: skip
    if not _launch(p, "fwd", args):
        return None
    out = Gaussian(xp.reshape(out_mean, batch + (d,)), xp.reshape(out_scale, batch + (d,)))
    mean_res = tuple(xp.reshape(x, batch) for x in (tau_m, dist_m, act_m))
    return out, (*mean_res, tau, log_tau, act)


def kl_diag_vjp(
    p: Any, res: Any, g_mean: Array, g_scale: Array, *, old: bool
) -> tuple[Array, Array, Array | None, Array | None] | None:
    """Cotangents of ``(mean, scale, old_mean, old_scale)`` from the residuals of
    :func:`kl_diag_fwd` (the old ones ``None`` without ``old``), or ``None`` where the kernels
    cannot take these arrays (torch tensors under a transform, say: the caller then goes on
    with the array-API VJP)."""
    xp = p.xp
    arrays = (p.mean, p.scale, p.old_mean, p.old_scale, g_mean, g_scale)
    if _compat.is_torch(xp) and not _torch_takes(*arrays):
        return None
    with _compat.on_device(p.scale, xp):  # (CuPy: copies and outputs on the arrays' GPU)
        return _kl_diag_vjp(p, res, g_mean, g_scale, old=old)


def _kl_diag_vjp(
    p: Any, res: Any, g_mean: Array, g_scale: Array, *, old: bool
) -> tuple[Array, Array, Array | None, Array | None] | None:
    xp, d, batch = p.xp, p.d, p.batch
    n = math.prod(batch)
    ins = [_rows(x, n, d, xp) for x in (p.mean, p.scale, p.old_mean, p.old_scale)]
    gs = [_rows(g, n, d, xp) for g in (g_mean, g_scale)]
    flat = [_rows(x, n, None, xp) for x in (res.tau_mean, res.dist_mean, res.active_mean)]
    flat += [_rows(x, n, None, xp) for x in (res.tau, res.log_tau, res.active)]
    kw = {"dtype": p.dtype, "device": p.device}
    outs = [xp.empty((n, d), **kw) for _ in range(4 if old else 2)]
    ptrs = [pointer(x) for x in outs] + [np.uint64(0)] * (0 if old else 2)
    args = (*map(pointer, ins), *map(pointer, gs), *map(pointer, flat), *ptrs)
    if not _launch(p, "vjp", args):
        return None
    shaped = [xp.reshape(x, batch + (d,)) for x in outs]
    return (shaped[0], shaped[1], shaped[2] if old else None, shaped[3] if old else None)


__all__ = [
    "FUSED",
    "FUSED_CPU",
    "HOST_FLAGS",
    "SOURCE",
    "applies",
    "build_cuda_once",
    "build_host",
    "build_host_once",
    "cache_path",
    "compiler",
    "defines",
    "host_cache_path",
    "kl_diag_fwd",
    "kl_diag_vjp",
    "on_host",
    "pointer",
    "run_kernel",
]
