"""The exact KL covariance solve against a brute-force reference, and its convergence."""

from __future__ import annotations

import numpy as np
import pytest

import tr_projections as trp
from tr_projections.distances import KLEigs, kl_cov_from_eigs, kl_h
from tr_projections.projections.kl import MAX_ITER, solve_tau
from tr_projections.testing.strategies import cholesky_factors


def _kl_cov_dense(cov: np.ndarray, old_chol: np.ndarray) -> np.ndarray:
    """KL_cov(N(., cov) || N(., Lo Lo^T)) from dense matrices, accurate for tiny values."""
    d = cov.shape[-1]
    M = np.linalg.solve(old_chol, np.linalg.cholesky(cov))
    y = np.linalg.eigvalsh(M @ np.swapaxes(M, -1, -2) - np.eye(d))
    return 0.5 * np.sum(y - np.log1p(y), axis=-1)


def brute_force_kl_cov(L: np.ndarray, Lo: np.ndarray, eps: float, steps: int = 200) -> np.ndarray:
    """Projected covariance by dense bisection on tau over the precision interpolation."""
    lam = np.linalg.inv(L @ np.swapaxes(L, -1, -2))
    lam_o = np.linalg.inv(Lo @ np.swapaxes(Lo, -1, -2))

    def cov_at(tau):
        t = tau[:, None, None]
        return np.linalg.inv(t * lam + (1 - t) * lam_o)

    lo, hi = np.zeros(len(L)), np.ones(len(L))
    active = _kl_cov_dense(cov_at(hi), Lo) > eps
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        below = _kl_cov_dense(cov_at(mid), Lo) <= eps
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return cov_at(np.where(active, 0.5 * (lo + hi), 1.0))


@pytest.mark.parametrize("d", [1, 2, 6, 17])
@pytest.mark.parametrize("eps", [1e-6, 1e-3, 1e-1, 3.0])
def test_full_matches_brute_force(backend, d, eps):
    rng = np.random.default_rng(d * 1000 + int(-np.log10(eps) * 10))
    B = 40
    L = cholesky_factors(rng, (B,), d, cond=30.0, center=rng.normal())
    Lo = cholesky_factors(rng, (B,), d, cond=30.0)
    mu, mu_o = rng.normal(size=(B, d)), rng.normal(size=(B, d))
    args = [backend.asarray(x) for x in (mu, L, mu_o, Lo)]
    out = trp.project_kl(*args, eps_mean=0.01, eps_cov=eps)
    S = backend.to_numpy(out.scale)
    cov = S @ np.swapaxes(S, -1, -2)
    ref = brute_force_kl_cov(L, Lo, eps)
    err = np.max(np.abs(cov - ref)) / np.max(np.abs(ref))
    assert err <= 1e-10, f"projected covariance differs from brute force by {err:.2e}"
    kl_after = _kl_cov_dense(cov, Lo)
    assert np.all(kl_after <= eps * (1 + 1e-9))


@pytest.mark.parametrize("eps", [1e-9, 1e-4, 1e-2, 1.0, 100.0])
def test_diag_matches_scalar_root(eps):
    """Diagonal rows: the closed output sigma_o / sqrt(1 + tau a) at the bisected root."""
    rng = np.random.default_rng(7)
    B, d = 500, 6
    std = np.exp(rng.normal(size=(B, d)) * 2)
    std_o = np.exp(rng.normal(size=(B, d)) * 2)
    out = trp.project_kl(np.zeros((B, d)), std, np.zeros(d), std_o, eps_mean=1.0, eps_cov=eps)
    a = std_o**2 / std**2 - 1
    lo, hi = np.zeros(B), np.ones(B)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        x = mid[:, None] * a
        below = 0.5 * np.sum(np.log1p(x) - x / (1 + x), axis=-1) <= eps
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    g1 = 0.5 * np.sum(np.log1p(a) - a / (1 + a), axis=-1)
    tau = np.where(g1 > eps, 0.5 * (lo + hi), 1.0)
    ref = np.where((g1 > eps)[:, None], std_o / np.sqrt(1 + tau[:, None] * a), std)
    np.testing.assert_allclose(out.scale, ref, rtol=1e-10)


def _eigs(log_lam: np.ndarray) -> KLEigs:
    return KLEigs(np.expm1(log_lam), np.exp(log_lam), None)


@pytest.mark.parametrize("spread", [0.1, 3.0, 9.0])
@pytest.mark.parametrize("eps", [1e-9, 1e-3, 1.0, 100.0])
def test_newton_converges_everywhere(spread, eps):
    """Far from the usual regime (eps up to 100, eigenvalue ratios up to e^{+-40}) every row
    still reaches g(tau) = eps to rounding, well inside the iteration cap."""
    import array_api_compat.numpy as xp

    rng = np.random.default_rng(3)
    eigs = _eigs(rng.normal(size=(5000, 6)) * spread)
    g1 = kl_cov_from_eigs(eigs, xp=xp)
    tau = solve_tau(eigs, g1, np.asarray(eps), xp=xp)
    # g at the solution, with the accurate (series) evaluation the distances use
    x = tau[:, None] * eigs.a
    g = 0.5 * np.sum(kl_h(x, (1 - tau[:, None]) + tau[:, None] * eigs.lam, xp=xp), axis=-1)
    active = g1 > eps
    assert np.all(tau[~active] == 1.0)
    assert np.all((tau[active] > 0) & (tau[active] < 1))
    np.testing.assert_allclose(g[active], eps, rtol=1e-10)


@pytest.mark.parametrize(("eps", "most"), [(1e-6, 2), (1e-3, 2), (1e-2, 2), (1e-1, 3)])
def test_iteration_count_is_small_in_practice(monkeypatch, eps, most):
    """In the regime of real bounds (eps <= 0.1) the solve stops after two or three evaluations
    of g: a Halley step from a start within about 1e-2 reaches about 1e-6, the second one
    rounding level."""
    import array_api_compat.numpy as xp

    from tr_projections.projections import kl as kl_module

    calls = []
    real = kl_module._g_and_slopes

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(kl_module, "_g_and_slopes", counting)
    rng = np.random.default_rng(0)
    eigs = _eigs(rng.normal(size=(20000, 6)))
    solve_tau(eigs, kl_cov_from_eigs(eigs, xp=xp), np.asarray(eps), xp=xp)
    # one evaluation of g per iteration
    assert 1 <= len(calls) <= most < MAX_ITER


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(
    ("spread", "eps"), [(1.0, 1e-6), (1.0, 1e-2), (1.0, 1.0), (9.0, 1e-6), (9.0, 1.0), (9.0, 100.0)]
)
def test_fast_steps_agree_with_the_safeguarded_iteration(monkeypatch, spread, eps, dtype):
    """The unguarded steps tried first (Halley's in float64, Newton's in float32), and going on
    with the unfinished rows alone, change nothing but the work: the weights equal those of the
    safeguarded iteration alone (every row, no gathering) to the accuracy g itself has (float64:
    a relative 4 eps_mach / |x|, 1e-12 for the smallest x at eps = 1e-6; float32: its
    convergence test, sqrt(eps_mach))."""
    import array_api_compat.numpy as xp

    from tr_projections.projections import kl as kl_module

    rng = np.random.default_rng(5)
    spread = min(spread, 3.0) if dtype == "float32" else spread  # float32: no e^+-40 ratios
    eigs = KLEigs(*(v.astype(dtype) for v in _eigs(rng.normal(size=(3000, 6)) * spread)[:2]), None)
    g1 = kl_cov_from_eigs(eigs, xp=xp)
    bound = np.asarray(eps, dtype=dtype)
    fast = kl_module.solve_log_tau(eigs, g1, bound, xp=xp)
    monkeypatch.setattr(kl_module, "FAST_STEPS", 0)
    monkeypatch.setattr(kl_module, "SHRINK", 0.0)
    slow = kl_module.solve_log_tau(eigs, g1, bound, xp=xp)
    assert fast.dtype == slow.dtype == np.dtype(dtype)
    assert np.any(fast < 0)
    rtol = 1e-11 if dtype == "float64" else 2e-3
    np.testing.assert_allclose(np.exp(fast), np.exp(slow), rtol=rtol, atol=0)


def test_kl_matches_textbook_closed_form(backend):
    """trp.kl against 1/2 [tr(Lo^-1 S) - d + log|So| - log|S|] + 1/2 Mahalanobis."""
    rng = np.random.default_rng(11)
    B, d = 20, 5
    L = cholesky_factors(rng, (B,), d, cond=50.0, center=0.5)
    Lo = cholesky_factors(rng, (B,), d, cond=50.0)
    mu, mu_o = rng.normal(size=(B, d)), rng.normal(size=(B, d))
    S, So = L @ np.swapaxes(L, -1, -2), Lo @ np.swapaxes(Lo, -1, -2)
    delta = mu - mu_o
    maha = np.einsum("bi,bi->b", delta, np.linalg.solve(So, delta[..., None])[..., 0])
    cov = 0.5 * (
        np.trace(np.linalg.solve(So, S), axis1=-2, axis2=-1)
        - d
        + np.linalg.slogdet(So)[1]
        - np.linalg.slogdet(S)[1]
    )
    m, c = trp.kl(*(backend.asarray(x) for x in (mu, L, mu_o, Lo)))
    np.testing.assert_allclose(backend.to_numpy(m), 0.5 * maha, rtol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(c), cov, rtol=1e-10)


def test_tiny_kl_is_accurate():
    """At eps = 1e-9, d = 32 the projected KL sits on its bound to 1e-9 relative, which the
    textbook formula (absolute error ~ d 1e-16) could not even confirm."""
    rng = np.random.default_rng(5)
    d = 32
    Lo = cholesky_factors(rng, (8,), d, cond=10.0)
    L = cholesky_factors(rng, (8,), d, cond=10.0)
    out = trp.project_kl(np.zeros(d), L, np.zeros(d), Lo, eps_mean=1.0, eps_cov=1e-9)
    _, c = trp.kl(np.zeros(d), out.scale, np.zeros(d), Lo)
    np.testing.assert_allclose(c, 1e-9, rtol=1e-9)


def _steps(rng: np.random.Generator, n: int, d: int, shrink: np.ndarray) -> tuple:
    """Old factors and new ones ``L = L_o (I + F)``, ``F`` lower triangular with diagonal
    ``-shrink`` (per row) and small entries below: new variances below the old ones, so that
    ``tr(C) <= d`` and, for ``shrink`` above 1/2, ``||F||_F > 1/2``."""
    Lo = cholesky_factors(rng, (n,), d, cond=30.0)
    F = np.tril(0.01 * rng.standard_normal((n, d, d)), -1)
    F = F - shrink[:, None, None] * np.eye(d)
    return Lo @ (np.eye(d) + F), Lo, F


def _a_from_e_form(L: np.ndarray, Lo: np.ndarray) -> np.ndarray:
    E = np.linalg.solve(L, Lo - L)
    Et = np.swapaxes(E, -1, -2)
    return np.linalg.eigvalsh(E + Et + Et @ E)


def test_kl_eigs_small_steps_take_one_solve(monkeypatch):
    """Steps inside a trust region (``||F||_F <= 1/2``) decompose ``C - I`` from ``F``, and
    agree with ``A - I`` (the second solve's form) to rounding; a few large steps solve for
    ``E`` on their own rows, with the same bits as the whole batch's ``E``."""
    from tr_projections import _rows, distances

    rng = np.random.default_rng(23)
    d, n = 6, 64
    shrink = rng.uniform(1e-6, 0.15, n)
    shrink[[3, 40]] = [0.7, 0.9]  # large steps: ||F||_F > 1/2 and tr(C) <= d
    L, Lo, F = _steps(rng, n, d, shrink)
    calls = []

    def counting(a, b, **kw):
        calls.append(b.shape[0])
        return real(a, b, **kw)

    import array_api_compat.numpy as xp

    real = distances.solve_triangular
    monkeypatch.setattr(distances, "solve_triangular", counting)
    monkeypatch.setattr(_rows, "SELECT_ROWS", True)
    small = np.ones(n, dtype=bool)
    small[[3, 40]] = False
    trace_c = 2.0 * np.trace(F, axis1=-2, axis2=-1) + np.sum(F * F, axis=(-2, -1))
    assert np.all(trace_c <= 0.0)  # every row took A - I before: tr(C) <= d
    assert np.all(np.sum(F * F, axis=(-2, -1))[small] <= 0.25)
    assert np.all(np.sum(F * F, axis=(-2, -1))[~small] > 0.25)
    eigs = distances.kl_eigs(L[small], Lo[small], full=True, vectors=True, xp=xp, F=F[small])
    assert calls == []  # no E: every row takes C - I from F
    ref = _a_from_e_form(L[small], Lo[small])
    a = np.sort(eigs.a, axis=-1)  # (ascending in c: descending in a)
    scale = np.max(np.abs(ref), axis=-1, keepdims=True)  # from 1e-6 to 0.3
    np.testing.assert_allclose(a / scale, ref / scale, rtol=0, atol=1e-13)
    np.testing.assert_allclose(np.sort(eigs.lam, axis=-1), 1.0 + ref, rtol=1e-14)

    mixed = distances.kl_eigs(L, Lo, full=True, vectors=True, xp=xp, F=F)
    assert calls == [2]  # E on the two large steps alone
    # Without row selection every row of tr(C) <= d takes E (as before small steps took C):
    # the large steps' results are the same bits, the small ones' agree to rounding.
    monkeypatch.setattr(_rows, "SELECT_ROWS", False)
    whole = distances.kl_eigs(L, Lo, full=True, vectors=True, xp=xp, F=F)
    assert calls == [2, n]
    for got, want in zip(mixed, whole, strict=True):
        np.testing.assert_array_equal(got[~small], want[~small])
    np.testing.assert_allclose(np.sort(mixed.a[small], axis=-1) / scale, whole.a[small] / scale,
                               rtol=0, atol=1e-13)  # fmt: skip
    large = _a_from_e_form(L[~small], Lo[~small])
    np.testing.assert_allclose(np.sort(mixed.a[~small], axis=-1), large, rtol=1e-13)

    # Mostly large steps: E for the whole batch in one solve, every row on A - I, as before.
    monkeypatch.setattr(_rows, "SELECT_ROWS", True)
    calls.clear()
    most = distances.kl_eigs(L[~small][[0, 1, 0, 1]], Lo[~small][[0, 1, 0, 1]], full=True,
                             vectors=False, xp=xp, F=F[~small][[0, 1, 0, 1]])  # fmt: skip
    assert calls == [4]
    np.testing.assert_allclose(most.a, np.concatenate([large, large]), rtol=1e-13)
    most = distances.kl_eigs(
        L[[3, 40, 3, 40, 0]], Lo[[3, 40, 3, 40, 0]], full=True, vectors=False, xp=xp,
        F=F[[3, 40, 3, 40, 0]],
    )  # fmt: skip
    assert calls == [4, 5]  # (4 of 5 rows need E: above the gathering limit, so all take it)
    np.testing.assert_allclose(most.a[:4], np.concatenate([large, large]), rtol=1e-13)
    np.testing.assert_allclose(most.a[4], _a_from_e_form(L[:1], Lo[:1])[0], rtol=1e-12, atol=1e-15)


def _kl_cov_decimal(L: np.ndarray, Lo: np.ndarray) -> np.ndarray:
    r"""KL covariance part of full factors in 60-digit decimal arithmetic from the float64
    inputs (exact conversions): ``M = L_o^{-1} L`` by forward substitution, then
    :math:`\tfrac12(\|M\|_F^2 - d) - \sum_i \log M_{ii}`, whose cancellations (about 18
    digits for steps of 1e-9) the 60 digits absorb."""
    import decimal

    out = []
    with decimal.localcontext(decimal.Context(prec=60)):
        for a, b in zip(L, Lo, strict=True):
            d = a.shape[0]
            A = [[decimal.Decimal(float(v)) for v in row] for row in a]
            B = [[decimal.Decimal(float(v)) for v in row] for row in b]
            M = [[decimal.Decimal(0)] * d for _ in range(d)]
            for j in range(d):
                for i in range(d):
                    s = A[i][j] - sum((B[i][k] * M[k][j] for k in range(i)), decimal.Decimal(0))
                    M[i][j] = s / B[i][i]
            sq = sum((v * v for row in M for v in row), decimal.Decimal(0))
            logs = sum((M[i][i].ln() for i in range(d)), decimal.Decimal(0))
            out.append(float((sq - d) / 2 - logs))
    return np.array(out)


def _positive_step(rng: np.random.Generator, n: int, d: int, step: float) -> np.ndarray:
    """A random lower-triangular ``P`` of entries about ``step`` with ``I + P`` a Cholesky
    factor (positive diagonal)."""
    P = np.tril(rng.standard_normal((n, d, d))) * step
    diag = np.abs(np.diagonal(P, 0, -2, -1)) * np.where(rng.random((n, d)) < 0.5, -0.5, 1.0)
    return P - np.eye(d) * np.diagonal(P, 0, -2, -1)[..., None, :] + np.eye(d) * diag[..., None, :]


@pytest.mark.parametrize("cond", [30.0, 1e4])
def test_full_kl_distance_is_accurate_from_tiny_to_far(cond):
    """``trp.kl`` of full factors (the closed form, ``distances.kl_cov_closed``) against a
    60-digit evaluation, from steps of 1e-9 (where the textbook form loses everything) to
    covariances 1e6 times narrower or wider and unrelated pairs, old factors of condition
    number up to 1e4 and of scales from 1e-100 to 1e100 (where a difference of logarithms of
    the diagonals would carry an absolute error of about 230 eps into a part of size 1e-4):
    relative error at most 1e-14 in float64."""
    rng = np.random.default_rng(int(cond))
    d, n = 6, 12
    Lo = cholesky_factors(rng, (n,), d, cond=cond)
    cases = {}
    for step in (1e-9, 1e-4, 0.011, 0.1, 0.3):
        P = _positive_step(rng, n, d, step)
        for size in (1e-100, 1e-3, 1.0, 1e3, 1e100):
            cases[f"step {step:g}, scale {size:g}"] = (size * np.tril(Lo @ (np.eye(d) + P)),
                                                      size * Lo)  # fmt: skip
    rel = cholesky_factors(rng, (n,), d, cond=10.0)
    cases["narrow"] = (np.tril(Lo @ rel) * 1e-3, Lo)
    cases["wide"] = (np.tril(Lo @ rel) * 1e3, Lo)
    cases["unrelated"] = (cholesky_factors(rng, (n,), d, cond=cond), Lo)
    zeros = np.zeros((n, d))
    for name, (L, L_o) in cases.items():
        want = _kl_cov_decimal(L, L_o)
        got = trp.kl(zeros, L, zeros, L_o).cov
        err = float(np.max(np.abs(got - want) / want))
        assert err <= 1e-14, (name, err)


@pytest.mark.parametrize("size", [1e-18, 1e-3, 1.0, 1e3, 1e18])
def test_full_kl_distance_is_accurate_in_float32(size):
    """The same in float32, against the 60-digit evaluation of the float32 inputs: relative
    error at most 2e-6 (about 17 eps) for steps from 1e-4 to 0.3 at scales from 1e-18 to
    1e18."""
    rng = np.random.default_rng(7)
    d, n = 6, 12
    Lo = cholesky_factors(rng, (n,), d, cond=30.0) * size
    zeros = np.zeros((n, d), dtype=np.float32)
    for step in (1e-4, 0.03, 0.11, 0.3):
        P = _positive_step(rng, n, d, step)
        L = np.tril(Lo @ (np.eye(d) + P)).astype(np.float32)
        L_o = Lo.astype(np.float32)
        want = _kl_cov_decimal(L.astype(np.float64), L_o.astype(np.float64))
        got = trp.kl(zeros, L, zeros, L_o).cov
        assert got.dtype == np.float32
        err = float(np.max(np.abs(got - want) / want))
        assert err <= 2e-6, (step, err)


def test_full_kl_distance_overflows_to_inf_not_nan():
    """A divergence beyond float64's range (a new std 1e300 times the old one, both within the
    value checks) is +inf, not NaN (inf - inf); the reverse ratio, 1e-300, gives its finite
    value, d/2 - 1/2 less the log of the ratio and the rest."""
    L = np.diag([1e150, 1.0])
    L_o = np.diag([1e-150, 1.0])
    zeros = np.zeros(2)
    with np.errstate(over="ignore"):  # (NumPy's overflow warning says what happened)
        assert trp.kl(zeros, L, zeros, L_o).cov == np.inf
    got = float(trp.kl(zeros, L_o, zeros, L).cov)
    np.testing.assert_allclose(got, 0.5 * (1e-300**2) - 0.5 + 300 * np.log(10.0), rtol=1e-14)
