"""Property tests of the projections: every invariant, method, kind, dtype and backend.

Data are float64 NumPy cases from :mod:`tr_projections.testing.strategies`, cast to the dtype and
backend under test; checks are the public :mod:`tr_projections.testing.invariants`, which compare
against dense float64 NumPy references with the tolerances stated once in ``TOLERANCES``.
"""

from __future__ import annotations

import numpy as np
import pytest
from _report import count, record
from _robust_refs import root_of_factor
from array_api_compat import device
from hypothesis import given
from hypothesis import strategies as st

import tr_projections as trp
from tr_projections.testing import available_backends, get_backend
from tr_projections.testing import invariants as inv
from tr_projections.testing.strategies import bounds_for, policy_pairs

METHODS = ["kl", "frobenius", "wasserstein"]
KINDS = ["diag", "full"]
DTYPES = ["float64", "float32"]

# The data each dtype is tested on: float32 gets milder conditioning and steps that are not
# below its resolution (the extremes are the robustness suite's business). Shapes come from a
# small set, since eager JAX compiles every operation anew for every shape it meets.
DIMS = st.sampled_from([1, 2, 3, 6])
BATCHES = st.sampled_from([(), (1,), (4,), (2, 3)])
DATA = {
    "float64": dict(max_cond=1e3, min_step=1e-4, dims=DIMS, batch=BATCHES),
    "float32": dict(max_cond=1e2, min_step=1e-2, dims=DIMS, batch=BATCHES),
}


#: Eager JAX compiles one program per combination of shapes (and dtype, method, kind), about
#: 1.5 s each for a full KL projection: its data take their dimension, batch shape and whether
#: the old policy is shared from these eight combinations, which hold every value of ``DIMS``
#: and ``BATCHES`` and both old-policy shapes (the other backends draw each on its own).
JAX_SHAPES = [(1, (4,), False), (1, (2, 3), True), (2, (1,), False), (2, (4,), True),
              (3, (), False), (3, (1,), True), (6, (2, 3), False), (6, (4,), True)]  # fmt: skip


@st.composite
def pairs(draw, kind: str, dtype: str, backend=None, **overrides):
    """``policy_pairs`` for ``dtype``; on JAX, shapes from ``JAX_SHAPES`` (unless overridden)."""
    if getattr(backend, "name", None) == "jax" and not overrides:
        d, batch, shared_old = draw(st.sampled_from(JAX_SHAPES))
        overrides = dict(dims=st.just(d), batch=st.just(batch), shared_old=shared_old)
    return draw(policy_pairs(kind=kind, **{**DATA[dtype], **overrides}))


@st.composite
def cases(draw, method: str, kind: str, dtype: str, backend=None, **overrides):
    pair = draw(pairs(kind, dtype, backend, **overrides))
    m, c = inv.reference_distances(method, pair.new, pair.old, full=pair.full)
    eps_mean, eps_cov = draw(bounds_for(m, c))
    return pair, eps_mean, eps_cov


def _to(backend, x: np.ndarray, dtype: str):
    return backend.asarray(np.asarray(x, dtype=dtype))


def _run(backend, method, pair, eps_mean, eps_cov, dtype):
    args = [_to(backend, x, dtype) for x in (*pair.new, *pair.old)]
    out = trp.project(*args, method=method, eps_mean=eps_mean, eps_cov=eps_cov)
    return args, out


param_all = pytest.mark.parametrize(
    "method,kind,dtype",
    [(m, k, t) for m in METHODS for k in KINDS for t in DTYPES],
)


@param_all
def test_bounds_hold(backend, method, kind, dtype):
    @given(cases(method, kind, dtype, backend))
    def run(case):
        pair, em, ec = case
        args, out = _run(backend, method, pair, em, ec, dtype)
        rep = inv.check_bounds(
            method, out, args[2:], full=pair.full, eps_mean=em, eps_cov=ec, dtype=dtype
        )
        record(f"bound excess, mean ({method})", dtype, rep.mean_excess)
        record(f"bound excess, cov ({method})", dtype, rep.cov_excess)
        count("examples: bounds")

    run()


@param_all
def test_inside_states_unchanged(backend, method, kind, dtype):
    @given(cases(method, kind, dtype, backend))
    def run(case):
        pair, em, ec = case
        args, out = _run(backend, method, pair, em, ec, dtype)
        n = inv.check_unchanged_inside(
            method, args[:2], args[2:], out, full=pair.full, eps_mean=em, eps_cov=ec, dtype=dtype
        )
        count("examples: unchanged inside")
        count("inside parts checked bit for bit", n)

    run()


@param_all
def test_one_weight_interpolation_on_boundary(backend, method, kind, dtype):
    @given(cases(method, kind, dtype, backend))
    def run(case):
        pair, em, ec = case
        args, out = _run(backend, method, pair, em, ec, dtype)
        rep = inv.check_interpolation(
            method, args[:2], args[2:], out, full=pair.full, eps_mean=em, eps_cov=ec, dtype=dtype
        )
        record(f"chart residual ({method})", dtype, rep.worst_residual)
        record(f"boundary gap ({method})", dtype, rep.worst_boundary)
        count("examples: interpolation")

    run()


@param_all
def test_batch_equals_rows(backend, method, kind, dtype):
    xp = backend.xp

    @given(cases(method, kind, dtype, batch=st.just((4,)), shared_old=False))
    def run(case):
        pair, em, ec = case
        args, out = _run(backend, method, pair, em, ec, dtype)
        worst = inv.check_batch_consistency(
            trp.project,
            args,
            out,
            full=pair.full,
            dtype=dtype,
            take=lambda x, i: xp.take(x, xp.asarray([i], device=device(x)), axis=0)[0, ...],
            method=method,
            eps_mean=em,
            eps_cov=ec,
        )
        record("batch vs rows", dtype, worst)
        count("examples: batch")

    run()


@param_all
def test_broadcast_old_equals_tiled(backend, method, kind, dtype):
    @given(cases(method, kind, dtype, batch=st.just((4,)), shared_old=True))
    def run(case):
        pair, em, ec = case
        n = pair.new.mean.shape[0]
        args, out = _run(backend, method, pair, em, ec, dtype)
        tiled = [np.broadcast_to(x, (n, *x.shape)) for x in pair.old]
        out_t = trp.project(
            *args[:2],
            *(_to(backend, x, dtype) for x in tiled),
            method=method,
            eps_mean=em,
            eps_cov=ec,
        )
        tol = inv.tolerance(dtype).batch
        for a, b in zip(out, out_t, strict=True):
            a, b = backend.to_numpy(a), backend.to_numpy(b)
            np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.max(np.abs(b)))

    run()


@param_all
def test_metadata_and_no_mutation(backend, method, kind, dtype):
    @given(cases(method, kind, dtype, backend))
    def run(case):
        pair, em, ec = case
        args = [_to(backend, x, dtype) for x in (*pair.new, *pair.old)]
        before = [np.array(backend.to_numpy(a), dtype=np.float64) for a in args]
        out = trp.project(*args, method=method, eps_mean=em, eps_cov=ec)
        batch = np.broadcast_shapes(pair.new.mean.shape[:-1], pair.old.mean.shape[:-1])
        event = (pair.d, pair.d) if pair.full else (pair.d,)
        inv.check_metadata(out, args[0], shapes=[(*batch, pair.d), (*batch, *event)])
        inv.check_not_mutated(before, args)

    run()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_distances_match_dense(backend, method, kind):
    """The library's distances agree with the dense float64 formulas (KL with its closed form)."""

    @given(pairs(kind, "float64", backend))
    def run(pair):
        args = [_to(backend, x, "float64") for x in (*pair.new, *pair.old)]
        for scale_prec in (True, False) if method != "kl" else (True,):
            kw = {} if method == "kl" else {"scale_prec": scale_prec}
            got = getattr(trp, method)(*args, **kw)
            ref = inv.reference_distances(
                method, pair.new, pair.old, full=pair.full, scale_prec=scale_prec
            )
            for g, r in zip(got, ref, strict=True):
                g = backend.to_numpy(g)
                np.testing.assert_allclose(g, r, rtol=1e-9, atol=1e-12 * max(1, np.max(r)))

    run()


def _gpu_backends() -> list:
    names = [n for n in available_backends() if n in ("torch_cuda", "cupy")]
    # torch CUDA tensors' eigh: CuPy's where it is usable ("auto"), or torch's own in chunks
    cases = [(n, "auto") for n in names] + [(n, "torch") for n in names if n == "torch_cuda"]
    if "jax" in available_backends():
        import jax

        if jax.default_backend() == "gpu":  # the "jax" backend's arrays live on the GPU
            cases.append(("jax", "auto"))
    return cases


@pytest.mark.parametrize(("name", "eigh_route"), _gpu_backends())
@pytest.mark.parametrize("method", METHODS)
def test_large_gpu_batches(name, eigh_route, method, monkeypatch):
    """70,000 full 6-D Gaussians, every one outside its bound, project on the GPU within their
    bounds: more matrices than torch's CUDA ``eigh`` takes in one call (it fails from 65,536)."""
    from tr_projections import _compat
    from tr_projections.testing.strategies import cholesky_factors

    monkeypatch.setattr(_compat, "TORCH_CUDA_EIGH", eigh_route)
    backend = get_backend(name)
    rng = np.random.default_rng(7)
    n, d = 70_000, 6
    old_scale = cholesky_factors(rng, (n,), d, cond=10.0)
    scale = cholesky_factors(rng, (n,), d, cond=10.0)
    mean, old_mean = rng.standard_normal((2, n, d))
    eps_mean, eps_cov = 1e-3, 1e-3
    args = [backend.asarray(x) for x in (mean, scale, old_mean, old_scale)]
    out = trp.project(*args, method=method, eps_mean=eps_mean, eps_cov=eps_cov)
    out = [backend.to_numpy(x) for x in out]
    assert all(np.all(np.isfinite(x)) for x in out)
    old = (old_mean, old_scale)
    inv.check_bounds(
        method, out, old, full=True, eps_mean=eps_mean, eps_cov=eps_cov, dtype="float64"
    )
    m, c = inv.reference_distances(method, (mean, scale), old, full=True)
    assert np.min(c) > eps_cov and np.min(m) > eps_mean  # every state was projected


def _factors(rng, kappas, d: int = 6) -> np.ndarray:
    # Float32 Cholesky factors of covariances with condition numbers `kappas` (one per row):
    # random eigenbases, eigenvalues 1, kappa and log-uniform between.
    kappas = np.asarray(kappas, dtype=np.float64)
    n = kappas.shape[0]
    q, _ = np.linalg.qr(rng.standard_normal((n, d, d)))
    ev = np.exp(rng.uniform(0.0, 1.0, (n, d)) * np.log(kappas)[:, None])
    ev[:, 0], ev[:, 1] = 1.0, kappas
    cov = (q * ev[:, None, :]) @ np.swapaxes(q, -1, -2)
    return np.linalg.cholesky(0.5 * (cov + np.swapaxes(cov, -1, -2))).astype(np.float32)


def _root_errors(L: np.ndarray, S, s) -> tuple[np.ndarray, np.ndarray]:
    # Per row, in float32 roundings: the largest relative error of the sorted eigenvalues s and
    # the relative Frobenius error of the root S, against the exact root of the float32 factor
    # L (to float64's accuracy: the SVD of L itself).
    L64 = L.astype(np.float64)
    S_ref = root_of_factor(L64)
    s_ref = np.sort(np.linalg.svd(L64, compute_uv=False), axis=-1)
    e32 = float(np.finfo(np.float32).eps)
    s_err = np.max(np.abs(np.sort(np.asarray(s, np.float64), axis=-1) - s_ref) / s_ref, axis=-1)
    S_err = np.linalg.norm(np.asarray(S, np.float64) - S_ref, axis=(-2, -1))
    return s_err / e32, S_err / (e32 * np.linalg.norm(S_ref, axis=(-2, -1)))


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("kappa", [1e1, 1e3, 1e5, 1e6, 1e7])
def test_float32_roots_on_host_take_the_float64_route(lib, kappa, monkeypatch):
    """The symmetric roots of float32 factors in host memory (NumPy, torch CPU): through the
    float64 route (``eigh``; the SVD only on rows where kappa(Sigma) eps64 exceeds
    ``ROUGH_FOR_FLOAT32``, here kappa = 1e7) on an exact float64 copy, then rounded. Every row
    of a float32 batch counted as rough before, so the SVD ran on every row after the
    ``eigh``; now no float32 decomposition runs, and the roots are as accurate as that SVD's:
    eigenvalues within one float32 rounding of the exact root of the float32 factor, the root
    within four, where NumPy's float32 ``eigh`` alone is more than 16 roundings off from
    kappa(Sigma) = 1e5. The root is rebuilt from the rounded basis as the VJP rebuilds it, bit
    for bit."""
    from tr_projections import _compat, gaussian

    if lib == "torch":
        torch = pytest.importorskip("torch")
    L = _factors(np.random.default_rng(int(np.log10(kappa))), np.full(300, kappa))
    calls, eighs = [], []
    svd, eigh = _compat.svd, _compat.eigh
    monkeypatch.setattr(_compat, "svd", lambda a, **k: calls.append(str(a.dtype)) or svd(a, **k))
    monkeypatch.setattr(_compat, "eigh", lambda a, **k: eighs.append(str(a.dtype)) or eigh(a, **k))
    x = torch.from_numpy(L) if lib == "torch" else L
    xp = _compat.array_namespace(x)
    S, U, s = gaussian.root_from_cholesky(x, xp=xp)
    assert len(eighs) == 1 and "float64" in eighs[0]
    rough = kappa * np.finfo(np.float64).eps > gaussian.ROUGH_FOR_FLOAT32
    assert len(calls) == rough and all("float64" in c for c in calls)
    for out in (S, U, s):
        assert str(out.dtype).endswith("float32")
    rebuilt = gaussian.root_from_eig(U, s, xp=xp)
    np.testing.assert_array_equal(np.asarray(S), np.asarray(rebuilt))
    s_err, S_err = _root_errors(L, S, s)
    assert s_err.max() <= 1.0 and S_err.max() <= 4.0, (s_err.max(), S_err.max())
    # What the float64 route is for: a float32 eigh of L L^T alone loses the small roots.
    w, V = np.linalg.eigh(L @ np.swapaxes(L, -1, -2))
    sw = np.sqrt(np.maximum(w, 0.0))
    S32 = gaussian.root_from_eig(V, sw, xp=_compat.array_namespace(V))
    if kappa >= 1e5:
        assert _root_errors(L, S32, sw)[1].max() > 16.0


def test_float32_roots_on_host_of_a_mixed_batch(monkeypatch):
    """A float32 batch whose rows are rough in float64 only in part (kappa(Sigma) = 10 and, on
    30 of 300 rows, 1e12): the SVD runs on those rows alone, in float64, and their roots are put
    back among the others'; every root as accurate as in the test above."""
    from tr_projections import _compat, gaussian

    kappas = np.full(300, 10.0)
    kappas[::10] = 1e12
    L = _factors(np.random.default_rng(8), kappas)
    shapes = []
    svd = _compat.svd
    monkeypatch.setattr(_compat, "svd", lambda a, **k: shapes.append(a.shape) or svd(a, **k))
    S, _, s = gaussian.root_from_cholesky(L, xp=np)
    assert shapes == [(30, 6, 6)]
    s_err, S_err = _root_errors(L, S, s)
    assert s_err.max() <= 1.0 and S_err.max() <= 4.0, (s_err.max(), S_err.max())


@pytest.mark.parametrize("name", [b for b in available_backends() if b not in ("numpy", "torch")])
def test_float32_roots_elsewhere_take_the_svd_alone(name, monkeypatch):
    """Float32 factors outside host memory (eager JAX, array-api-strict; CuPy and torch CUDA
    alike) take the SVD of every row and no ``eigh`` before it: every float32 row counted as
    rough, so the ``eigh`` was discarded. The result is the SVD route's, bit for bit."""
    from tr_projections import _compat, gaussian

    backend = get_backend(name)
    rng = np.random.default_rng(5)
    L = np.tril(rng.standard_normal((40, 4, 4))) + 4.0 * np.eye(4)
    x = _to(backend, L, "float32")
    xp = _compat.array_namespace(x)
    whole = gaussian._root_svd(x, xp=xp)

    def no_eigh(*args, **kwargs):
        raise AssertionError("eigh ran for a float32 factor outside host memory")

    monkeypatch.setattr(_compat, "eigh", no_eigh)
    out = gaussian.root_from_cholesky(x, xp=xp)
    for got, want in zip(out, whole, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
