"""The fused diagonal KL kernels (``tr_projections.projections._kl_diag_fused``).

On the CPU their source is built as plain C++ (each kernel a loop over the states) and run from
the package's own wrapper on NumPy arrays: the whole public path, ``trp.project_kl`` and
``trp.vjp``, then goes through the kernels, and is compared with the array-API form. On a GPU
(``TRP_BACKENDS=torch_cuda,cupy``) the CUDA build is compared with it the same way.
"""

from __future__ import annotations

import ctypes
import math
import shutil
import subprocess

import numpy as np
import pytest

import tr_projections as trp
from tr_projections.projections import _kl_diag_fused as fused
from tr_projections.testing import available_backends, get_backend
from tr_projections.testing import invariants as inv

COMPILER = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
DTYPES = ("float64", "float32")


@pytest.fixture(scope="module")
def host_kernels(tmp_path_factory):
    """The kernels' source built for the host, one library per dtype."""
    if COMPILER is None:
        pytest.skip("no C++ compiler to build the kernels' host form")
    folder = tmp_path_factory.mktemp("kl_fused")
    source = folder / "kl_diag.cpp"
    source.write_text(fused.SOURCE)
    libs = {}
    for dtype in DTYPES:
        lib = folder / f"kl_diag_{dtype}.so"
        defines = [f"-D{k}={v}" for k, v in fused.defines(dtype).items()]
        # (-ffp-contract=off: no fused multiply-adds, as NumPy computes)
        cmd = [COMPILER, "-O2", "-std=c++17", "-ffp-contract=off", "-shared", "-fPIC"]
        subprocess.run([*cmd, *defines, "-o", str(lib), str(source)], check=True)
        libs[dtype] = ctypes.CDLL(str(lib))
    return libs


@pytest.fixture
def on_host(host_kernels, monkeypatch):
    """Diagonal KL projections of NumPy arrays run in the host build of the kernels; returns
    the list of kernel names launched."""
    launched: list[str] = []

    def launch(p, name, args):
        lib = host_kernels[str(p.dtype)]
        fn = lib.kl_diag_fwd if name == "fwd" else lib.kl_diag_vjp
        c_args = [ctypes.c_longlong(math.prod(p.batch)), ctypes.c_int(p.d)]
        for a in args:
            is_ptr = isinstance(a, np.uint64)
            c_args.append(ctypes.c_ulonglong(int(a)) if is_ptr else ctypes.c_int(int(a)))
        fn(*c_args)
        launched.append(name)
        return True

    monkeypatch.setattr(fused, "applies", lambda p: not p.full)
    monkeypatch.setattr(fused, "_launch", launch)
    return launched


def _policies(rng, n, d, dtype="float64"):
    """Diagonal Gaussians from inside their bounds to far outside: new stds from 1e-5 to 1e5
    times the old ones on some rows (float64; float32: within about e^+-3, where the
    cotangents' terms, up to the ratio squared times their result, stay within its
    tolerance)."""
    old_scale = np.exp(rng.uniform(-2.0, 2.0, (n, d)))
    spreads = [0.0, 0.01, 0.3, 3.0, 12.0] if dtype == "float64" else [0.0, 0.01, 0.3, 1.0]
    spread = rng.choice(spreads, size=(n, 1))
    scale = old_scale * np.exp(np.clip(spread * rng.standard_normal((n, d)), -11.5, 11.5))
    old_mean = rng.standard_normal((n, d))
    mean = old_mean + rng.choice([0.0, 0.1, 3.0], size=(n, 1)) * rng.standard_normal((n, d))
    return tuple(x.astype(dtype) for x in (mean, scale, old_mean, old_scale))


def _results(args, eps_mean, eps_cov, cotangents):
    out, vjp_fn = trp.vjp(trp.project_kl, *args, eps_mean=eps_mean, eps_cov=eps_cov)
    return tuple(out), tuple(vjp_fn(trp.Gaussian(*cotangents)))


def _worst(got, want, dtype):
    """The largest relative difference of ``got`` from ``want``, array by array."""
    out = []
    for g, w in zip(got, want, strict=True):
        g, w = np.asarray(g, dtype=np.float64), np.asarray(w, dtype=np.float64)
        scale = np.maximum(np.abs(w), 1e-3 * np.max(np.abs(w)))
        out.append(float(np.max(np.abs(g - w) / np.maximum(scale, np.finfo(dtype).tiny))))
    return out


def _assert_close(got, want, dtype, what, *, like=None):
    """``got`` within the dtype's batch tolerance of ``want``, or, where ``like`` (the same
    quantities computed another way) is given, no more than twice as far as ``like``."""
    tol = inv.tolerance(dtype).batch
    allowed = (
        [tol] * len(got) if like is None else [max(tol, 2 * e) for e in _worst(like, want, dtype)]
    )
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        g, w = np.asarray(g, dtype=np.float64), np.asarray(w, dtype=np.float64)
        assert g.shape == w.shape, (what, i, g.shape, w.shape)
        assert np.all(np.isfinite(g)), (what, i)
        # (relative to each entry, but at least to a thousandth of the largest: a cotangent
        # that cancels to zero, like the std's of a 1-D state at its bound, is zero to rounding)
        scale = np.maximum(np.abs(w), 1e-3 * np.max(np.abs(w)))
        worst = float(np.max(np.abs(g - w) / np.maximum(scale, np.finfo(dtype).tiny)))
        assert worst <= allowed[i], (
            f"{what}[{i}]: relative difference {worst:.2e} > {allowed[i]:.1e}"
        )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 2, 6, 17])
@pytest.mark.parametrize("per_state", [False, True], ids=["scalar_bounds", "per_state_bounds"])
def test_host_kernels_match_array_api(on_host, dtype, d, per_state):
    """Outputs and all four cotangents of the kernels equal the array-API form's to the
    batch tolerance of the dtype, on states from inside their bounds to far outside. float32
    results are compared with the float64 answer for the same (float32) inputs, within the
    tolerance or at most twice as far as the array-API form's own float32 results (bounds
    down to 1e-6 are at float32's resolution: both are up to 7e-4 from it there)."""
    rng = np.random.default_rng([d, per_state, len(dtype)])
    n = 400
    args = _policies(rng, n, d, dtype)
    if per_state:
        eps_mean = np.exp(rng.uniform(np.log(1e-4), np.log(1.0), n)).astype(dtype)
        eps_cov = np.exp(rng.uniform(np.log(1e-6), np.log(10.0), n)).astype(dtype)
    else:
        eps_mean, eps_cov = 0.05, 0.01
    cots = tuple(rng.standard_normal((n, d)).astype(dtype) for _ in range(2))
    got = _results(args, eps_mean, eps_cov, cots)
    assert on_host == ["fwd", "vjp"]
    on_host.clear()
    fused_ = fused.applies
    try:
        fused.applies = lambda p: False
        like = want = _results(args, eps_mean, eps_cov, cots)
        if dtype == "float32":
            up = lambda x: x if isinstance(x, float) else x.astype("float64")  # noqa: E731
            want = _results(tuple(map(up, args)), up(eps_mean), up(eps_cov), tuple(map(up, cots)))
        else:
            like = (None, None)
    finally:
        fused.applies = fused_
    assert on_host == []
    _assert_close(got[0], want[0], dtype, "outputs", like=like[0])
    _assert_close(got[1], want[1], dtype, "cotangents", like=like[1])
    out = [np.asarray(x) for x in got[0]]
    inv.check_bounds(
        "kl", out, args[2:], full=False, eps_mean=eps_mean, eps_cov=eps_cov, dtype=dtype
    )
    _, c = inv.reference_distances("kl", args[:2], args[2:], full=False)
    inside = np.asarray(c) < np.asarray(eps_cov) * (1 - inv.tolerance(dtype).margin)
    assert np.any(inside) and np.any(~inside)  # both kinds of state were there
    np.testing.assert_array_equal(out[1][inside], args[1][inside])  # returned bit for bit


def test_host_kernels_extremes(on_host):
    """Bounds from 1e-9 to 100 and stds 1e-6 to 1e6 times the old ones: finite, within the
    bounds, and equal to the array-API form."""
    rng = np.random.default_rng(3)
    d = 6
    rows = []
    for ratio in (1e-6, 1e-3, 0.5, 2.0, 1e3, 1e6):
        for eps in (1e-9, 1e-3, 1.0, 100.0):
            rows.append((ratio, eps))
    n = len(rows)
    old_scale = np.exp(rng.uniform(-1.0, 1.0, (n, d)))
    ratio = np.array([r for r, _ in rows])[:, None] * np.exp(0.1 * rng.standard_normal((n, d)))
    scale = old_scale * ratio
    old_mean = rng.standard_normal((n, d))
    mean = old_mean + 10.0 * rng.standard_normal((n, d))
    eps_cov = np.array([e for _, e in rows])
    args = (mean, scale, old_mean, old_scale)
    cots = tuple(rng.standard_normal((n, d)) for _ in range(2))
    got = _results(args, 1e-2, eps_cov, cots)
    fused_ = fused.applies
    try:
        fused.applies = lambda p: False
        want = _results(args, 1e-2, eps_cov, cots)
    finally:
        fused.applies = fused_
    _assert_close(got[0], want[0], "float64", "outputs")
    _assert_close(got[1], want[1], "float64", "cotangents")
    inv.check_bounds("kl", got[0], args[2:], full=False, eps_mean=1e-2, eps_cov=eps_cov,
                     dtype="float64")  # fmt: skip


def test_host_kernels_broadcast_and_old_policy_skipped(on_host):
    """Broadcast inputs (one old mean for the batch, a (3, 1) bound over a (3, 50) batch) run
    in the kernels on materialised rows, and their cotangents are summed back; without the old
    policy's cotangents the kernel skips them."""
    rng = np.random.default_rng(4)
    d = 3
    mean, scale, _, old_scale = (x.reshape(3, 50, d) for x in _policies(rng, 150, d))
    old_mean = rng.standard_normal(d)
    eps_cov = np.array([[1e-3], [1e-2], [1e-1]])
    cots = tuple(rng.standard_normal((3, 50, d)) for _ in range(2))
    args = (mean, scale, old_mean, old_scale)
    got = _results(args, 0.05, eps_cov, cots)
    assert got[1][2].shape == (d,)
    _, vjp_fn = trp.vjp(trp.project_kl, *args, eps_mean=0.05, eps_cov=eps_cov)
    new_only = vjp_fn(trp.Gaussian(*cots), wrt=("mean", "scale"))
    assert new_only[2] is None and new_only[3] is None
    fused_ = fused.applies
    try:
        fused.applies = lambda p: False
        want = _results(args, 0.05, eps_cov, cots)
    finally:
        fused.applies = fused_
    _assert_close(got[0], want[0], "float64", "outputs")
    _assert_close(got[1], want[1], "float64", "cotangents")
    _assert_close(new_only[:2], want[1][:2], "float64", "new policy's cotangents")


def test_shared_covariance_and_full_stay_array_api(on_host):
    """A std shared by every state (its covariance part computed once) and full Gaussians do
    not go to the kernels."""
    rng = np.random.default_rng(5)
    mean, _, old_mean, _ = _policies(rng, 20, 4)
    trp.project_kl(mean, np.full(4, 2.0), old_mean, np.ones(4), eps_mean=0.1, eps_cov=0.01)
    L = np.linalg.cholesky(np.eye(4) * 2.0)
    trp.project_kl(mean, L, old_mean, np.eye(4), eps_mean=0.1, eps_cov=0.01)
    assert on_host == []


def test_fused_switch(monkeypatch):
    """``FUSED = "off"`` keeps every call on the array-API form; an unknown value is an error
    that names the setting."""
    from tr_projections._inputs import prepare

    p = prepare(*(_policies(np.random.default_rng(6), 5, 2)))
    monkeypatch.setattr(fused, "FUSED", "off")
    assert not fused.applies(p)
    monkeypatch.setattr(fused, "FUSED", "sometimes")
    with pytest.raises(ValueError, match="TRP_FUSED"):
        fused.applies(p)
    monkeypatch.setattr(fused, "FUSED", "auto")
    assert not fused.applies(p)  # (NumPy arrays: never)


# ------------------------------------------------------------------------------------ GPU

GPU = [n for n in available_backends() if n in ("torch_cuda", "cupy")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", GPU)
def test_gpu_kernels_match_array_api(name, dtype, monkeypatch):
    """On the GPU: the CUDA kernels run (and only for diagonal KL), and their outputs and
    cotangents equal the array-API form's (torch: through ``loss.backward()``)."""
    backend = get_backend(name)
    rng = np.random.default_rng(8)
    n, d = 70_000, 6
    args = _policies(rng, n, d, dtype)
    cots = tuple(rng.standard_normal((n, d)).astype(dtype) for _ in range(2))
    calls = []
    real_fwd = fused.kl_diag_fwd
    monkeypatch.setattr(fused, "kl_diag_fwd", lambda *a: calls.append(1) or real_fwd(*a))

    def run(arrays, cotangents):
        x = [backend.asarray(a) for a in arrays]
        g = [backend.asarray(c) for c in cotangents]
        if name == "torch_cuda":
            leaves = [t.clone().requires_grad_(True) for t in x]
            out = trp.project_kl(*leaves, eps_mean=0.05, eps_cov=0.01)
            ((out.mean * g[0]).sum() + (out.scale * g[1]).sum()).backward()
            outs, grads = tuple(out), tuple(t.grad for t in leaves)
        else:
            outs, vjp_fn = trp.vjp(trp.project_kl, *x, eps_mean=0.05, eps_cov=0.01)
            grads = vjp_fn(trp.Gaussian(*g))
        return [backend.to_numpy(y) for y in (*outs, *grads)]

    got = run(args, cots)
    assert calls, "the fused kernels did not run"
    monkeypatch.setattr(fused, "FUSED", "off")
    want = like = run(args, cots)
    if dtype == "float32":  # (as on the CPU: against float64, at most twice as far)
        up = [tuple(x.astype("float64") for x in xs) for xs in (args, cots)]
        want = run(*up)
    else:
        like = [None] * 6
    assert len(calls) == 1
    _assert_close(
        got[:2], want[:2], dtype, "outputs", like=like[:2] if like[0] is not None else None
    )
    _assert_close(
        got[2:], want[2:], dtype, "cotangents", like=like[2:] if like[0] is not None else None
    )
    inv.check_bounds("kl", got[:2], args[2:], full=False, eps_mean=0.05, eps_cov=0.01, dtype=dtype)
