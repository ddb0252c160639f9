"""The fused diagonal KL kernels (``tr_projections.projections._kl_diag_fused``).

On the CPU their source is built as C++ by the package's own host route (``FUSED_CPU = "on"``,
where a C++ compiler is found): ``trp.project_kl`` and ``trp.vjp`` of NumPy arrays, and torch
CPU tensors on the NumPy-view route, then go through the kernels and are compared with the
array-API form. On a GPU (``TRP_BACKENDS=torch_cuda,cupy``) the CUDA build is compared with it
the same way.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

import tr_projections as trp
from tr_projections.projections import _kl_diag_fused as fused
from tr_projections.testing import available_backends, get_backend
from tr_projections.testing import invariants as inv

DTYPES = ("float64", "float32")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("kl_fused_cache")


@pytest.fixture
def on_host(cache_dir, monkeypatch):
    """Diagonal KL projections of NumPy arrays run in the host build of the kernels (built
    into a test folder); returns the list of kernel names launched."""
    if fused.compiler() is None:
        pytest.skip("no C++ compiler to build the kernels' host form")
    monkeypatch.setenv("TRP_CACHE_DIR", str(cache_dir))
    monkeypatch.setattr(fused, "FUSED_CPU", "on")
    launched: list[str] = []
    launch = fused._launch
    monkeypatch.setattr(fused, "_launch", lambda p, k, a: launched.append(k) or launch(p, k, a))
    return launched


@contextlib.contextmanager
def _array_api_form():
    """The array-API form for the calls inside (the host route off)."""
    saved = fused.FUSED_CPU
    fused.FUSED_CPU = "off"
    try:
        yield
    finally:
        fused.FUSED_CPU = saved


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
    with _array_api_form():
        like = want = _results(args, eps_mean, eps_cov, cots)
        if dtype == "float32":
            up = lambda x: x if isinstance(x, float) else x.astype("float64")  # noqa: E731
            want = _results(tuple(map(up, args)), up(eps_mean), up(eps_cov), tuple(map(up, cots)))
        else:
            like = (None, None)
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
    with _array_api_form():
        want = _results(args, 1e-2, eps_cov, cots)
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
    with _array_api_form():
        want = _results(args, 0.05, eps_cov, cots)
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


def test_fused_switches(monkeypatch):
    """``FUSED_CPU`` is off by default and keeps NumPy arrays on the array-API form;
    ``FUSED = "off"`` keeps every call there, the CPU's too; unknown values are errors that name
    the setting."""
    from tr_projections._inputs import prepare

    p = prepare(*(_policies(np.random.default_rng(6), 5, 2)))
    assert fused.FUSED_CPU == "off" or "TRP_FUSED_CPU" in os.environ
    monkeypatch.setattr(fused, "FUSED_CPU", "off")
    assert not fused.applies(p)
    monkeypatch.setattr(fused, "FUSED_CPU", "on")
    assert fused.applies(p) == ("float64" not in fused._host_failed)
    monkeypatch.setattr(fused, "FUSED", "off")
    assert not fused.applies(p)
    for name, value in (("FUSED", "sometimes"), ("FUSED_CPU", "maybe")):
        monkeypatch.setattr(fused, "FUSED", "auto")
        monkeypatch.setattr(fused, "FUSED_CPU", "off")
        monkeypatch.setattr(fused, name, value)
        with pytest.raises(ValueError, match=f"TRP_{name}"):
            fused.applies(p)


def test_no_compiler_warns_once_and_falls_back(monkeypatch, tmp_path):
    """Where the host build cannot be made (here: a compiler that does not exist), one
    ``RuntimeWarning`` names the reason, and the results are the array-API form's."""
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("TRP_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(fused, "FUSED_CPU", "on")
    monkeypatch.setattr(fused, "_host", {})
    monkeypatch.setattr(fused, "_host_failed", {})
    args = _policies(np.random.default_rng(9), 30, 3)
    with pytest.warns(RuntimeWarning, match="host build, float64"):
        got = trp.project_kl(*args, eps_mean=0.05, eps_cov=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = trp.project_kl(*args, eps_mean=0.05, eps_cov=0.01)  # (no second warning)
    with _array_api_form():
        want = trp.project_kl(*args, eps_mean=0.05, eps_cov=0.01)
    for x in (got, again):
        for a, b in zip(x, want, strict=True):
            np.testing.assert_array_equal(a, b)


def _compiles(monkeypatch) -> list:
    """The compiler runs (not its ``--version`` queries) from now on."""
    runs: list = []
    run = fused.subprocess.run
    monkeypatch.setattr(
        fused.subprocess,
        "run",
        lambda cmd, **kw: (runs.append(cmd) if "-o" in cmd else None) or run(cmd, **kw),
    )
    return runs


def test_host_build_is_cached(on_host, cache_dir, monkeypatch):
    """The host build is compiled once per dtype into the cache folder, and a new process
    (nothing loaded yet) loads it from there without compiling."""
    monkeypatch.setattr(fused, "_host", {})  # (as in a new process)
    monkeypatch.setattr(fused, "_host_failed", {})
    for old in cache_dir.glob("kl_diag_float64_*.so"):
        old.unlink()
    runs = _compiles(monkeypatch)
    args = _policies(np.random.default_rng(10), 20, 3)
    want = trp.project_kl(*args, eps_mean=0.05, eps_cov=0.01)
    built = sorted(p.name for p in cache_dir.glob("kl_diag_float64_*.so"))
    assert len(built) == 1 and len(runs) == 1
    monkeypatch.setattr(fused, "_host", {})  # (another new process)
    got = trp.project_kl(*args, eps_mean=0.05, eps_cov=0.01)
    assert len(runs) == 1  # (loaded, not compiled)
    assert sorted(p.name for p in cache_dir.glob("kl_diag_float64_*.so")) == built
    assert on_host == ["fwd", "fwd"]
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("case", ["untrusted", "not_a_library", "unwritable", "cxx_with_args"])
def test_host_build_elsewhere(on_host, tmp_path, monkeypatch, case):
    """A cache file writable by others is not loaded, nor is one that does not load, and a
    cache folder that cannot be written is not used: the build goes to a private folder, and
    the results are the kernels'. A ``CXX`` with arguments (``"g++ -Wall"``) is split like a
    command line."""
    monkeypatch.setattr(fused, "_host", {})
    monkeypatch.setattr(fused, "_host_failed", {})
    monkeypatch.setenv("TRP_CACHE_DIR", str(tmp_path))
    if case == "cxx_with_args":
        monkeypatch.setenv("CXX", f"{fused.compiler()[0]} -Wall")
        assert fused.compiler()[1:] == ["-Wall"]
    planted = fused.cache_path("float64", fused.compiler())
    if case in ("untrusted", "not_a_library"):
        planted.write_bytes(b"not a shared library")
        planted.chmod(0o666 if case == "untrusted" else 0o644)
    if case == "unwritable":
        monkeypatch.setenv("TRP_CACHE_DIR", "/proc/self")  # (exists; no one can write there)
    runs = _compiles(monkeypatch)
    args = _policies(np.random.default_rng(14), 20, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no fallback to the array-API form)
        got = trp.project_kl(*args, eps_mean=0.05, eps_cov=0.01)
    assert on_host == ["fwd"] and len(runs) == 1
    inside_cache = Path(runs[0][runs[0].index("-o") + 1]).parent.parent == tmp_path
    assert inside_cache == (case == "cxx_with_args")
    if case in ("untrusted", "not_a_library"):
        assert planted.read_bytes() == b"not a shared library"  # (left alone)
    with _array_api_form():
        want = trp.project_kl(*args, eps_mean=0.05, eps_cov=0.01)
    _assert_close(got, want, "float64", "outputs")


def test_negated_views_are_read_as_their_values(on_host):
    """torch tensors that are lazily negated views (``c.conj().imag``: memory un-negated, a
    flag) give the same projection as plain copies, as inputs and as bounds."""
    torch = pytest.importorskip("torch")

    def neg_view(x):  # a view equal to x whose memory holds -x
        t = torch.complex(torch.zeros_like(x), -x).conj().imag
        assert t.is_neg() and torch.equal(t, x)
        return t

    args = [torch.tensor(a) for a in _policies(np.random.default_rng(15), 30, 3)]
    eps_cov = torch.tensor(0.01, dtype=torch.float64)
    want = trp.project_kl(*args, eps_mean=0.05, eps_cov=eps_cov)
    got = trp.project_kl(
        neg_view(args[0]), neg_view(args[1]), args[2], args[3],
        eps_mean=0.05, eps_cov=neg_view(eps_cov),
    )  # fmt: skip
    assert "fwd" in on_host
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_backward_without_the_kernels(on_host, monkeypatch):
    """A fused forward whose backward the kernels cannot take (a transform's wrapped tensors,
    say) goes on with the array-API VJP from residuals rebuilt from the kernels' (the same
    cotangents)."""
    rng = np.random.default_rng(11)
    args = _policies(rng, 60, 4)
    cots = tuple(rng.standard_normal((60, 4)) for _ in range(2))
    got = _results(args, 0.05, 0.01, cots)
    monkeypatch.setattr(fused, "kl_diag_vjp", lambda *a, **k: None)
    rebuilt = _results(args, 0.05, 0.01, cots)
    assert on_host == ["fwd", "vjp", "fwd"]
    _assert_close(rebuilt[1], got[1], "float64", "cotangents")


@pytest.mark.numpy_route
def test_torch_cpu_on_the_host_kernels(on_host, monkeypatch):
    """torch CPU tensors: the NumPy-view route takes the host kernels, forward and backward;
    a backward that goes to torch's own kernels (decided anew) runs the host VJP on the
    tensors; the gradients are the array-API form's."""
    torch = pytest.importorskip("torch")
    from tr_projections.backends import torch as adapter

    rng = np.random.default_rng(12)
    args = _policies(rng, 50, 3)
    g = [torch.tensor(rng.standard_normal((50, 3))) for _ in range(2)]

    def grads(backward_limit=None):
        leaves = [torch.tensor(a, requires_grad=True) for a in args]
        out = trp.project_kl(*leaves, eps_mean=0.05, eps_cov=0.01)
        if backward_limit is not None:
            monkeypatch.setattr(adapter, "NUMPY_MAX_ELEMENTS", backward_limit)
        torch.autograd.backward(list(out), g)
        return [x.detach().numpy() for x in out] + [a.grad.numpy() for a in leaves]

    limit = adapter.NUMPY_MAX_ELEMENTS
    got = grads()
    assert on_host == ["fwd", "vjp"]
    across = grads(backward_limit=0)  # (the backward on torch's kernels)
    assert on_host == ["fwd", "vjp", "fwd", "vjp"]
    monkeypatch.setattr(adapter, "NUMPY_MAX_ELEMENTS", limit)
    with _array_api_form():
        want = grads()
    _assert_close(got, want, "float64", "torch")
    _assert_close(across, want, "float64", "torch, backward on torch's kernels")


def test_torch_kernels_route_and_transforms(on_host, monkeypatch):
    """torch CPU tensors on torch's own kernels (the tests' default route) take the host
    kernels with ``FUSED_CPU`` on, also inside a default-device context; under a dispatch mode
    they do not (its observer would see none of the work); under ``torch.func.grad`` and
    ``jacrev`` the forward may run fused and the backward, on wrapped tensors, goes on with the
    array-API VJP: every gradient equals the array-API form's."""
    torch = pytest.importorskip("torch")
    from torch.utils._python_dispatch import TorchDispatchMode

    rng = np.random.default_rng(13)
    args = [torch.tensor(a) for a in _policies(rng, 40, 3)]
    g = torch.tensor(rng.standard_normal((40, 3)))

    def loss(m, s):
        out = trp.project_kl(m, s, args[2], args[3], eps_mean=0.05, eps_cov=0.01)
        return (out.mean * g).sum() + (out.scale * g).sum()

    def everything():
        leaves = [args[0].clone().requires_grad_(True), args[1].clone().requires_grad_(True)]
        loss(*leaves).backward()
        grads = torch.func.grad(loss, argnums=(0, 1))(args[0], args[1])
        jac = torch.func.jacrev(
            lambda s: (
                trp.project_kl(
                    args[0][:2], s, args[2][:2], args[3][:2], eps_mean=0.05, eps_cov=0.01
                ).scale
            )
        )
        return [leaves[0].grad, leaves[1].grad, *grads, jac(args[1][:2].clone())]

    from tr_projections.projections import kl

    rebuilt = []
    from_fused = kl._from_fused
    monkeypatch.setattr(kl, "_from_fused", lambda p, r: rebuilt.append(1) or from_fused(p, r))
    got = [x.numpy() for x in everything()]
    assert "fwd" in on_host and "vjp" in on_host  # (loss.backward(): both in the kernels)
    assert len(rebuilt) == 2  # (torch.func.grad and jacrev: the array-API VJP)
    with _array_api_form():
        want = [x.numpy() for x in everything()]
    _assert_close(got, want, "float64", "torch kernels' route and torch.func")

    on_host.clear()
    with torch.device("cpu"):
        loss(*args[:2])
    assert on_host == ["fwd"]

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    on_host.clear()
    with Watch():
        loss(*args[:2])
    assert on_host == []
    leaves = [args[0].clone().requires_grad_(True), args[1].clone().requires_grad_(True)]
    value = loss(*leaves)  # (the forward in the kernels, the backward under the mode)
    with Watch():
        value.backward()
    assert on_host == ["fwd"]
    _assert_close([leaves[0].grad.numpy(), leaves[1].grad.numpy()], want[:2], "float64",
                  "a backward under a dispatch mode")  # fmt: skip


# ------------------------------------------------------------------------------------ GPU

GPU = [n for n in available_backends() if n in ("torch_cuda", "cupy")]


@pytest.mark.parametrize("per_state", [False, True], ids=["scalar_bounds", "per_state_bounds"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", GPU)
def test_gpu_kernels_match_array_api(name, dtype, per_state, monkeypatch):
    """On the GPU: the CUDA kernels run, and their outputs and cotangents equal the array-API
    form's (torch: through ``loss.backward()``), with bounds for the whole batch or per state.
    (The H100 run of the thirteenth round had the scalar bounds only.)"""
    backend = get_backend(name)
    rng = np.random.default_rng(8)
    n, d = 70_000, 6
    args = _policies(rng, n, d, dtype)
    cots = tuple(rng.standard_normal((n, d)).astype(dtype) for _ in range(2))
    if per_state:
        eps = [np.exp(rng.uniform(np.log(lo), np.log(1.0), n)).astype(dtype) for lo in (1e-3, 1e-4)]
    else:
        eps = [0.05, 0.01]
    calls = []
    real_fwd = fused.kl_diag_fwd
    monkeypatch.setattr(fused, "kl_diag_fwd", lambda *a: calls.append(1) or real_fwd(*a))

    def run(arrays, cotangents, bounds):
        x = [backend.asarray(a) for a in arrays]
        g = [backend.asarray(c) for c in cotangents]
        kw = {
            k: b if isinstance(b, float) else backend.asarray(b)
            for k, b in zip(("eps_mean", "eps_cov"), bounds, strict=True)
        }
        if name == "torch_cuda":
            leaves = [t.clone().requires_grad_(True) for t in x]
            out = trp.project_kl(*leaves, **kw)
            ((out.mean * g[0]).sum() + (out.scale * g[1]).sum()).backward()
            outs, grads = tuple(out), tuple(t.grad for t in leaves)
        else:
            outs, vjp_fn = trp.vjp(trp.project_kl, *x, **kw)
            grads = vjp_fn(trp.Gaussian(*g))
        return [backend.to_numpy(y) for y in (*outs, *grads)]

    got = run(args, cots, eps)
    assert calls, "the fused kernels did not run"
    monkeypatch.setattr(fused, "FUSED", "off")
    want = like = run(args, cots, eps)
    if dtype == "float32":  # (as on the CPU: against float64, at most twice as far)
        up = lambda x: x if isinstance(x, float) else x.astype("float64")  # noqa: E731
        want = run(tuple(map(up, args)), tuple(map(up, cots)), tuple(map(up, eps)))
    else:
        like = [None] * 6
    assert len(calls) == 1
    _assert_close(
        got[:2], want[:2], dtype, "outputs", like=like[:2] if like[0] is not None else None
    )
    _assert_close(
        got[2:], want[2:], dtype, "cotangents", like=like[2:] if like[0] is not None else None
    )
    inv.check_bounds(
        "kl", got[:2], args[2:], full=False, eps_mean=eps[0], eps_cov=eps[1], dtype=dtype
    )
