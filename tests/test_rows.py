"""Row selection (``tr_projections/_rows.py``): with eager arrays the costly stages run on the
states outside their bound only. The outputs and every cotangent must be those of the
whole-batch computation (what tracing runs), on every backend, for batches where some, none or
all states are outside their bounds, with broadcast old policies and batch shapes of any rank."""

from __future__ import annotations

import numpy as np
import pytest

import tr_projections as trp
import tr_projections._rows as rows_mod
from tr_projections import gaussian
from tr_projections.projections import _core, frobenius, kl, wasserstein
from tr_projections.testing.strategies import cholesky_factors

PROJECTIONS = {
    "kl": trp.project_kl,
    "frobenius": trp.project_frobenius,
    "wasserstein": trp.project_wasserstein,
}
#: The modules that select rows (each imported ``choose``, and KL ``choose_slots``, by name).
USERS = (gaussian, _core, frobenius, kl, wasserstein)

#: Concrete JAX arrays gather rows by value only op by op (conftest.py).
pytestmark = pytest.mark.usefixtures("jax_op_by_op")


@pytest.fixture(autouse=True)
def _select_rows_in_small_batches(monkeypatch):
    """The batches here are small: let elementwise stages select rows too, so that their
    row-selected path is what is compared with the whole batch."""
    monkeypatch.setattr(rows_mod, "MIN_ROWS_ELEMENTWISE", 0)


def test_elementwise_stages_select_rows_only_in_large_batches(monkeypatch):
    import array_api_compat.numpy as xp

    monkeypatch.setattr(rows_mod, "MIN_ROWS_ELEMENTWISE", 100)
    small = np.arange(99) % 3 == 0
    large = np.arange(100) % 3 == 0
    assert rows_mod.choose(small, xp=xp, elementwise=True) is None
    assert rows_mod.choose(small, xp=xp) is not None
    rows = rows_mod.choose(large, xp=xp, elementwise=True)
    assert rows is not None and rows.index.tolist() == np.flatnonzero(large).tolist()


DISTANCES = {"kl": trp.kl, "frobenius": trp.frobenius, "wasserstein": trp.wasserstein}


def _policies(full: bool, batch: tuple[int, ...], d: int, seed: int, old_batch=None):
    rng = np.random.default_rng(seed)
    old_batch = batch if old_batch is None else old_batch
    old_mean = rng.normal(size=old_batch + (d,))
    mean = rng.normal(size=batch + (d,)) * 0.3 + old_mean
    if full:
        old_scale = cholesky_factors(rng, old_batch, d, cond=30.0)
        scale = cholesky_factors(rng, batch, d, cond=30.0)
    else:
        old_scale = np.exp(rng.normal(size=old_batch + (d,)) * 0.5)
        scale = old_scale * np.exp(rng.normal(size=batch + (d,)) * 0.3)
    return [mean, scale, old_mean, old_scale]


def _bounds(method, args, quantile):
    m, c = (np.asarray(x) for x in DISTANCES[method](*args))
    if quantile == "edge":  # per-state bounds: far inside, just inside, just outside, far outside
        f = np.resize([0.5, 1.0 - 1e-7, 1.0 + 1e-7, 2.0, 1.0 + 1e-3], m.size).reshape(m.shape)
        return m / f[::-1], c / f
    if quantile is None:  # every state outside both bounds
        return 0.5 * float(np.min(m)), 0.5 * float(np.min(c))
    if quantile == 1.0:  # none outside
        return 2.0 * float(np.max(m)), 2.0 * float(np.max(c))

    def between(x):  # halfway between two order statistics: no state exactly at its bound
        x = np.sort(x.ravel())
        k = int(quantile * (x.size - 1))
        return 0.5 * float(x[k] + x[k + 1])

    return between(m), between(c)


def _run(backend, method, args, eps, g):
    x = [backend.asarray(a) for a in args]
    eps = [e if isinstance(e, float) else backend.asarray(e) for e in eps]
    fn = PROJECTIONS[method]
    out, vjp_fn = trp.vjp(fn, *x, eps_mean=eps[0], eps_cov=eps[1])
    cots = vjp_fn(trp.Gaussian(*(backend.asarray(a) for a in g)))
    return [backend.to_numpy(a) for a in (*out, *cots)]


@pytest.mark.parametrize(
    "quantile", [0.5, 0.9, None, 1.0, "edge"], ids=["half", "few", "all", "none", "edge"]
)
@pytest.mark.parametrize("kind", ["diag", "full"])
@pytest.mark.parametrize("method", sorted(PROJECTIONS))
def test_selected_rows_match_the_whole_batch(backend, method, kind, quantile, monkeypatch):
    full = kind == "full"
    args = _policies(full, (3, 7), 4, seed=len(method) + 10 * full)
    args[2:] = [a[:1] for a in args[2:]]  # one old policy per column group: broadcasting
    eps = _bounds(method, args, quantile)
    rng = np.random.default_rng(5)
    g = [rng.normal(size=args[0].shape), rng.normal(size=args[1].shape)]
    if full:
        g[1] = np.tril(g[1])
    selected = _run(backend, method, args, eps, g)
    for mod in USERS:  # every row, as under tracing without slots
        monkeypatch.setattr(mod, "choose", lambda mask, *, xp, elementwise=False: None)
        if hasattr(mod, "choose_slots"):
            monkeypatch.setattr(mod, "choose_slots", lambda mask, *, xp: None)
    whole = _run(backend, method, args, eps, g)
    for name, a, b in zip(("mean", "scale", "g_mean", "g_scale", "g_old_mean", "g_old_scale"),
                          selected, whole, strict=True):  # fmt: skip
        assert a.shape == b.shape, name
        scale = max(1.0, float(np.max(np.abs(b), initial=0.0)))
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12 * scale, err_msg=name)


def test_take_and_put_round_trip():
    """put(take(x)) restores the selected rows into a default, for batch shapes of any rank,
    event ranks 0-2, no rows, every row and a scalar batch; nothing is written in place."""
    import array_api_compat.numpy as xp

    rng = np.random.default_rng(0)
    for batch in [(), (5,), (2, 3), (0, 4)]:
        for event in [(), (3,), (2, 2)]:
            x = rng.normal(size=batch + event)
            default = np.zeros_like(x)
            default.flags.writeable = False
            x.flags.writeable = False
            for mask in [rng.random(batch) < 0.5, np.zeros(batch, bool), np.ones(batch, bool)]:
                rows = rows_mod.choose(xp.asarray(mask), xp=xp)
                sub = rows_mod.take(x, rows, event_ndim=len(event), xp=xp)
                out = rows_mod.put(sub, rows, default, event_ndim=len(event), xp=xp)
                want = np.where(mask.reshape(batch + (1,) * len(event)), x, default)
                if rows is None:  # every row: put returns the computed batch itself
                    want = x
                np.testing.assert_array_equal(out, want)
                assert out is not default


@pytest.mark.parametrize("cond", [1.0, 1e2, 1e5])
@pytest.mark.parametrize("step", [1e-7, 1e-3, 0.3, 3.0])
def test_wasserstein_row_test_keeps_every_row_outside(cond, step):
    """The W2 row test (an upper bound from one triangular solve) never drops a state whose
    exact precision-scaled part exceeds its bound, down to bounds a hair below the part; it is
    exact when the new root is a multiple of the old one."""
    import array_api_compat.numpy as xp

    from tr_projections.distances import kl_f, wasserstein_may_exceed

    rng = np.random.default_rng(int(np.log10(cond) * 10 + np.log10(step) + 100))
    n, d = 400, 5
    old_scale = cholesky_factors(rng, (n,), d, cond=cond)
    cov = old_scale @ np.swapaxes(old_scale, -1, -2)
    noise = rng.normal(size=(n, d, d)) * step
    # A new covariance near the old one: Sigma_o^1/2 expm(sym noise) Sigma_o^1/2.
    w, u = np.linalg.eigh(0.5 * (noise + np.swapaxes(noise, -1, -2)))
    half = np.linalg.cholesky(cov)
    new = half @ (u * np.exp(w)[..., None, :]) @ np.swapaxes(u, -1, -2) @ np.swapaxes(half, -1, -2)
    scale = np.linalg.cholesky(0.5 * (new + np.swapaxes(new, -1, -2)))
    _, c = trp.wasserstein(np.zeros((n, d)), scale, np.zeros((n, d)), old_scale)
    F = kl_f(scale, old_scale, xp=xp)
    for below in (1e-6, 1e-3, 0.5):
        assert np.all(wasserstein_may_exceed(F, c * (1.0 - below), xp=xp))
    # S = a S_o: the bound is the part itself (up to the margin).
    a = np.exp(rng.normal(size=(n, 1, 1)) * step)
    F = kl_f(old_scale * a, old_scale, xp=xp)
    _, c = trp.wasserstein(np.zeros((n, d)), old_scale * a, np.zeros((n, d)), old_scale)
    assert not np.any(wasserstein_may_exceed(F, c * 1.01 + 1e-300, xp=xp))


@pytest.mark.parametrize("kind", ["diag", "full"])
@pytest.mark.parametrize("method", sorted(PROJECTIONS))
def test_row_selection_switched_off(backend, method, kind, monkeypatch):
    """With ``SELECT_ROWS`` off (``TRP_ROW_SELECTION=0``) eager arrays gather no rows at all (no
    stage selects rows, the KL solver keeps its whole batch), and the outputs and cotangents are
    those with row selection."""
    from tr_projections import _compat
    from tr_projections.projections import _kl_diag_fused

    monkeypatch.setattr(_kl_diag_fused, "FUSED_CPU", "off")  # (the array-API form's rows)
    full = kind == "full"
    args = _policies(full, (40,), 4, seed=3 + full)
    eps = _bounds(method, args, 0.5)
    rng = np.random.default_rng(8)
    g = [rng.normal(size=args[0].shape), rng.normal(size=args[1].shape)]
    if full:
        g[1] = np.tril(g[1])
    gathers = []
    take_rows = _compat.take_rows
    monkeypatch.setattr(
        _compat, "take_rows", lambda *a, **k: gathers.append(1) or take_rows(*a, **k)
    )
    selected = _run(backend, method, args, eps, g)
    assert gathers  # (with selection: half the rows are outside their bounds)
    gathers.clear()
    monkeypatch.setattr(rows_mod, "SELECT_ROWS", False)
    whole = _run(backend, method, args, eps, g)
    assert not gathers
    assert rows_mod.choose(np.arange(10) > 4, xp=np) is None
    for a, b in zip(selected, whole, strict=True):
        scale = max(1.0, float(np.max(np.abs(b), initial=0.0)))
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12 * scale)
