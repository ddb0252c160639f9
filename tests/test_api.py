"""The public surface: kinds read from shapes, broadcasting, per-state bounds, dispatch,
entropy, dtype promotion and the first clear errors."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

import tr_projections as trp
from tr_projections.testing.strategies import cholesky_factors

RNG = np.random.default_rng(42)
D = 3


def _diag(batch=(5,)):
    return (
        RNG.normal(size=batch + (D,)),
        np.exp(RNG.normal(size=batch + (D,))),
        RNG.normal(size=batch + (D,)),
        np.exp(RNG.normal(size=batch + (D,))),
    )


def _full(batch=(5,)):
    return (
        RNG.normal(size=batch + (D,)),
        cholesky_factors(RNG, batch, D, cond=20.0),
        RNG.normal(size=batch + (D,)),
        cholesky_factors(RNG, batch, D, cond=20.0),
    )


@pytest.mark.parametrize("method", sorted(trp.METHODS))
def test_project_dispatches_to_the_named_method(backend, method):
    args = [backend.asarray(x) for x in _full()]
    direct = getattr(trp, f"project_{method}")(*args, eps_mean=0.1, eps_cov=0.01)
    via = trp.project(*args, method=method, eps_mean=0.1, eps_cov=0.01)
    for a, b in zip(direct, via, strict=True):
        np.testing.assert_array_equal(backend.to_numpy(a), backend.to_numpy(b))
    assert isinstance(via, trp.Gaussian) and via._fields == ("mean", "scale")


def test_unknown_method_is_a_clear_error():
    with pytest.raises(ValueError, match="`method` must be one of"):
        trp.project(*_diag(), method="hellinger", eps_mean=0.1, eps_cov=0.1)


@pytest.mark.parametrize("make", [_diag, _full], ids=["diag", "full"])
def test_kind_is_read_from_shapes(make):
    mean, scale, old_mean, old_scale = make()
    out = trp.project_kl(mean, scale, old_mean, old_scale, eps_mean=0.1, eps_cov=0.01)
    assert out.scale.shape == scale.shape


def test_state_independent_old_policy_full_and_diag():
    mean, scale, _, _ = _full()
    out = trp.project_wasserstein(mean, scale, np.zeros(D), np.eye(D), eps_mean=0.1, eps_cov=0.01)
    assert out.mean.shape == (5, D) and out.scale.shape == (5, D, D)
    mean, scale, _, _ = _diag()
    out = trp.project_kl(mean, scale, np.zeros(D), np.ones(D), eps_mean=0.1, eps_cov=0.01)
    assert out.scale.shape == (5, D)


def test_state_independent_new_std_broadcasts():
    """A PPO-style policy: per-state means, one std vector for all states."""
    mean = RNG.normal(size=(7, D))
    std = np.exp(RNG.normal(size=D))
    out = trp.project_kl(mean, std, np.zeros((7, D)), np.ones(D), eps_mean=0.05, eps_cov=1e-3)
    assert out.scale.shape == (7, D)
    _, c = trp.kl(out.mean, out.scale, np.zeros((7, D)), np.ones(D))
    assert np.all(c <= 1e-3 * (1 + 1e-9))


def test_square_diagonal_batch_is_read_as_diagonal():
    """mean and scale both (d, d): a batch of d diagonal Gaussians (documented rule)."""
    mean = RNG.normal(size=(D, D))
    std = np.exp(RNG.normal(size=(D, D)))
    out = trp.project_frobenius(mean, std, mean, std, eps_mean=1.0, eps_cov=1.0)
    np.testing.assert_array_equal(out.scale, std)


def test_old_scale_must_match_the_kind():
    mean, scale, old_mean, _ = _full()
    with pytest.raises(ValueError, match="`old_scale` must be a lower Cholesky factor"):
        trp.project_kl(mean, scale, old_mean, np.ones((5, D)), eps_mean=0.1, eps_cov=0.1)


@pytest.mark.parametrize("method", sorted(trp.METHODS))
def test_per_state_bounds(backend, method):
    """Each state gets its own bound; a bound array that would widen the batch is refused."""
    args = [backend.asarray(x) for x in _full((6,))]
    m0, c0 = (backend.to_numpy(v) for v in getattr(trp, method)(*args))
    eps_mean = backend.asarray(m0 * np.linspace(0.2, 1.5, 6))
    eps_cov = backend.asarray(c0 * np.linspace(1.5, 0.2, 6))
    out = trp.project(*args, method=method, eps_mean=eps_mean, eps_cov=eps_cov)
    m1, c1 = (backend.to_numpy(v) for v in getattr(trp, method)(out.mean, out.scale, *args[2:]))
    em, ec = backend.to_numpy(eps_mean), backend.to_numpy(eps_cov)
    assert np.all(m1 <= em * (1 + 1e-9)) and np.all(c1 <= ec * (1 + 1e-9))
    inside = m0 <= em
    np.testing.assert_array_equal(
        backend.to_numpy(out.mean)[inside], backend.to_numpy(args[0])[inside]
    )
    np.testing.assert_allclose(m1[~inside], em[~inside], rtol=1e-9)
    with pytest.raises(ValueError, match="`eps_cov` of shape"):
        trp.project(*args, method=method, eps_mean=0.1, eps_cov=backend.asarray(np.ones((2, 6))))


@pytest.mark.parametrize("method", ["frobenius", "wasserstein"])
def test_scale_prec_false_bounds_euclidean_mean_step(method):
    mean, scale, old_mean, old_scale = _diag()
    fn = getattr(trp, f"project_{method}")
    out = fn(mean, scale, old_mean, old_scale, eps_mean=0.01, eps_cov=0.01, scale_prec=False)
    step = np.sum((out.mean - old_mean) ** 2, axis=-1)
    assert np.all(step <= 0.01 * (1 + 1e-9))
    np.testing.assert_allclose(step, 0.01, rtol=1e-9)  # every state here moves further than that


def test_unbatched_single_gaussian():
    mean, scale, old_mean, old_scale = (x[0] for x in _full())
    out = trp.project_kl(mean, scale, old_mean, old_scale, eps_mean=1e-3, eps_cov=1e-4)
    assert out.mean.shape == (D,) and out.scale.shape == (D, D)


def test_dtypes_promote_like_the_library():
    mean, scale, old_mean, old_scale = _diag()
    out = trp.project_kl(
        mean.astype(np.float32), scale.astype(np.float32), old_mean, old_scale,
        eps_mean=0.1, eps_cov=0.1,
    )  # fmt: skip
    assert out.mean.dtype == np.float64 and out.scale.dtype == np.float64


def test_mixing_libraries_is_a_clear_error():
    torch = pytest.importorskip("torch")
    mean, scale, old_mean, old_scale = _diag()
    with pytest.raises(TypeError, match="one library"):
        trp.project_kl(torch.asarray(mean), scale, old_mean, old_scale, eps_mean=1, eps_cov=1)


@pytest.mark.parametrize("eps", [0.0, -1.0, math.inf, math.nan])
def test_python_bounds_must_be_positive_and_finite(eps):
    with pytest.raises(ValueError, match="`eps_mean` must be positive and finite"):
        trp.project_kl(*_diag(), eps_mean=eps, eps_cov=0.1)


def test_entropy_matches_dense_formula(backend):
    _, L, _, _ = _full()
    cov = L @ np.swapaxes(L, -1, -2)
    ref = 0.5 * (D * np.log(2 * np.pi * np.e) + np.linalg.slogdet(cov)[1])
    np.testing.assert_allclose(backend.to_numpy(trp.entropy(backend.asarray(L))), ref, rtol=1e-12)
    std = np.exp(RNG.normal(size=(5, D)))
    ref = 0.5 * (D * np.log(2 * np.pi * np.e) + 2 * np.sum(np.log(std), axis=-1))
    np.testing.assert_allclose(backend.to_numpy(trp.entropy(backend.asarray(std))), ref, rtol=1e-12)


@pytest.mark.parametrize("make", [_diag, _full], ids=["diag", "full"])
def test_project_entropy(backend, make):
    scale = backend.asarray(make((8,))[1])
    h = backend.to_numpy(trp.entropy(scale))
    beta = float(np.median(h))
    out = trp.project_entropy(scale, beta)
    h_out = backend.to_numpy(trp.entropy(out))
    low = h < beta
    np.testing.assert_allclose(h_out[low], beta, rtol=1e-12)
    np.testing.assert_array_equal(backend.to_numpy(out)[~low], backend.to_numpy(scale)[~low])
    eq = trp.project_entropy(scale, beta, equality=True)
    np.testing.assert_allclose(backend.to_numpy(trp.entropy(eq)), beta, rtol=1e-12)


def test_jax_jit_and_vmap_with_a_closed_over_old_policy():
    """An old policy captured from outside the traced function (concrete arrays beside
    tracers, which report no device) is accepted under jit and vmap."""
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    mean, scale, _, _ = _full()
    old_mean, old_scale = jnp.zeros(D), jnp.asarray(np.linalg.cholesky(2.0 * np.eye(D)))

    def f(m, s):
        return trp.project_kl(m, s, old_mean, old_scale, eps_mean=0.01, eps_cov=0.01)

    eager = f(jnp.asarray(mean), jnp.asarray(scale))
    jitted = jax.jit(f)(jnp.asarray(mean), jnp.asarray(scale))
    mapped = jax.vmap(f)(jnp.asarray(mean), jnp.asarray(scale))
    for out in (jitted, mapped):
        for a, b in zip(out, eager, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("number", [np.float32(0.25), np.float64(0.25), np.array(0.25)])
def test_project_entropy_takes_numpy_numbers_with_any_library(backend, number):
    """A NumPy number (scalar or 0-d array) is a number for ``min_entropy`` whatever the
    scale's library, as for the projections' bounds."""
    scale = backend.asarray(np.full((3, 2), 0.1))
    out = trp.project_entropy(scale, number)
    np.testing.assert_allclose(backend.to_numpy(trp.entropy(out)), 0.25, rtol=1e-12)


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        (None, TypeError, "`min_entropy` must be a real number or an array of `scale`'s library"),
        (True, TypeError, "`min_entropy` must be a real number or an array"),
        (1j, TypeError, "`min_entropy` must be a real number, got 1j"),
        (math.nan, ValueError, "`min_entropy` must be finite"),
        (np.zeros(4), ValueError, r"`min_entropy` \(4,\), `scale's batch` \(3,\)"),
    ],
)
def test_project_entropy_bad_min_entropy_is_named(bad, error, match):
    with pytest.raises(error, match=match):
        trp.project_entropy(np.ones((3, 2)), bad)


@pytest.mark.parametrize("method", ["kl", "frobenius", "wasserstein"])
def test_no_warning_across_libraries_in_one_process(method):
    """Diagonal projections of NumPy and array-api-strict arrays, one after the other, warn
    nothing (a cache keyed by dtype compared array-api-strict's dtypes with NumPy's, which
    array-api-strict warns about, on every diagonal KL call)."""
    xs = pytest.importorskip("array_api_strict")
    args = [np.ones((3, 2)), np.full((3, 2), 2.0), np.zeros((3, 2)), np.ones((3, 2))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for make in (np.asarray, xs.asarray, np.asarray, xs.asarray):
            trp.project(*(make(a) for a in args), method=method, eps_mean=0.1, eps_cov=0.1)
