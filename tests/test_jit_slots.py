"""Slots under ``jax.jit`` (``tr_projections/_rows.py``: ``choose_slots``, ``on_rows``): a full
KL projection runs its covariance stages on the rows that may be outside their bound, gathered
into slots of static size, each slot after the first only when the rows reach it.

The outputs and all four cotangents must be those of eager NumPy and of the same program
without slots, for batches where no row, a few rows (the first slot only), most rows (every
slot) or every row is selected, with two or three slots, a broadcast old policy, a shared
covariance, a batch of rank two, float32, a bound per state and ``vmap``; the decompositions
must still run one at a time (``test_jax_serial.py``), inside the ``cond`` and under ``vmap``
too; and only the first slot's rows may reach the decompositions outside a ``cond``.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
from _data import full_policies  # noqa: E402
from test_jax_serial import _assert_in_turn, _decompositions, _inner_jaxprs  # noqa: E402

import tr_projections as trp  # noqa: E402
import tr_projections._rows as rows_mod  # noqa: E402
from tr_projections.backends import jax as adapter  # noqa: E402
from tr_projections.distances import kl_f, kl_may_exceed  # noqa: E402
from tr_projections.testing.invariants import tolerance  # noqa: E402


@pytest.fixture(autouse=True)
def _slots_in_small_batches(monkeypatch):
    """The batches here are small: let them take slots, as batches of thousands do."""
    monkeypatch.setattr(rows_mod, "MIN_ROWS_SLOTS", 0)


def _problem(batch, d, seed, *, share_old=False):
    rng = np.random.default_rng(seed)
    n = math.prod(batch)
    m, L, mo, Lo = (np.reshape(a, batch + a.shape[1:]) for a in full_policies(rng, n, d))
    if share_old:  # one old policy per column: broadcast along the first batch axis
        mo, Lo = mo[:1], Lo[:1]
    g = (rng.standard_normal(m.shape), np.tril(rng.standard_normal(L.shape)))
    return (m, L, mo, Lo), g


def _bound(args, fraction):
    """A covariance bound with about ``fraction`` of the states outside it (halfway between two
    order statistics; 0 and 1: every state inside, every state outside)."""
    c = np.sort(np.asarray(trp.kl(*args)[1]).ravel())
    if fraction == 0.0:
        return 2.0 * float(c[-1])
    if fraction == 1.0:
        return 0.5 * float(c[0])
    k = int((1.0 - fraction) * (c.size - 1))
    return 0.5 * float(c[k] + c[k + 1])


@functools.cache
def _program(settings: tuple):
    """``jit(value_and_grad)`` of a weighted sum of the projection's outputs, one per package
    settings (``backends.jax._settings()``: the slots and every other setting read when it is
    traced): cases of the same settings, shapes and dtype share its compilations."""
    del settings  # (the cache's key)

    def loss(m, L, mo, Lo, eps, g_mean, g_scale):
        out = trp.project_kl(m, L, mo, Lo, eps_mean=0.05, eps_cov=eps)
        return jnp.sum(out.mean * g_mean) + jnp.sum(out.scale * g_scale), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))


def _value_and_grads(args, g, eps_cov, dtype=jnp.float64):
    fn = _program(adapter._settings())
    x = [jnp.asarray(a, dtype=dtype) for a in (*args, *g)]
    eps = eps_cov if isinstance(eps_cov, float) else jnp.asarray(eps_cov, dtype=dtype)
    (_, out), grads = fn(*x[:4], eps, *x[4:])
    return [np.asarray(a) for a in (*out, *grads)]


NAMES = ("mean", "scale", "g_mean", "g_scale", "g_old_mean", "g_old_scale")


def _assert_close(got, want, dtype):
    tol = tolerance(np.dtype(dtype)).batch
    for name, a, b in zip(NAMES, got, want, strict=True):
        assert a.shape == b.shape, name
        assert np.all(np.isfinite(a)), name
        scale = max(1.0, float(np.max(np.abs(b))))
        np.testing.assert_allclose(a, b, rtol=0, atol=tol * scale, err_msg=name)


def _eager(args, g, eps_cov):
    """Outputs and cotangents of eager NumPy (rows gathered by value): the reference."""
    out, vjp_fn = trp.vjp(trp.project_kl, *args, eps_mean=0.05, eps_cov=eps_cov)
    return [np.asarray(a) for a in (*out, *vjp_fn(trp.Gaussian(*g)))]


def _check_slots(args, g, eps_cov, monkeypatch, *, whole=False, dtype=jnp.float64):
    """Slotted ``jit`` against eager NumPy (float64) and, with ``whole`` (and in float32),
    against the same program without slots. (The premise: the program has slots, a ``cond``
    with an ``eigh`` inside.)"""
    assert _eigh_batches(_forward_jaxpr([jnp.asarray(a, dtype=dtype) for a in args]))[1]
    slotted = _value_and_grads(args, g, eps_cov, dtype)
    if dtype == jnp.float64:
        _assert_close(slotted, _eager(args, g, eps_cov), np.float64)
    if whole or dtype != jnp.float64:
        with monkeypatch.context() as m:
            m.setattr(rows_mod, "SLOT_FRACTIONS", ())
            _assert_close(slotted, _value_and_grads(args, g, eps_cov, dtype), dtype)


CASES = [  # (fraction of states outside, old policy shared, slots' ends, against no slots)
    *((f, False, (0.5,), f in (0.2, 0.8)) for f in (0.0, 0.2, 0.45, 0.8, 1.0)),
    *((f, True, (0.5,), False) for f in (0.2, 0.8)),
    *((f, False, (0.25, 0.5), False) for f in (0.2, 0.8)),
]


@pytest.mark.parametrize(
    ("fraction", "share_old", "fractions", "whole"),
    CASES,
    ids=[f"{f:.0%}-{'shared' if s else 'own'}-{len(e) + 1}slots" for f, s, e, _ in CASES],
)
def test_slots_match_the_whole_batch(fraction, share_old, fractions, whole, monkeypatch):
    monkeypatch.setattr(rows_mod, "SLOT_FRACTIONS", fractions)
    args, g = _problem((4, 10), 3, seed=int(fraction * 10) + 7 * share_old, share_old=share_old)
    eps_cov = _bound(args, fraction)
    # the premise: the rows the slots get reach the second half only in "most" and "all"
    L, Lo = np.broadcast_arrays(args[1], args[3])
    may = kl_may_exceed(kl_f(L, Lo, xp=np), L, Lo, np.asarray(eps_cov), xp=np)
    assert (int(np.sum(may)) > may.size // 2) == (fraction > 0.5)
    _check_slots(args, g, eps_cov, monkeypatch, whole=whole)


def test_slots_of_a_shared_covariance(monkeypatch):
    """Scales and bound shared along the first batch axis: the covariance part is computed once
    per distinct covariance (``cov_problem``), in slots of that smaller batch."""
    args, g = _problem((2, 20), 3, seed=11)
    args = [args[0], args[1][:1], args[2], args[3][:1]]
    eps_cov = _bound([a[:1] for a in args], 0.3)
    _check_slots(args, g, eps_cov, monkeypatch)


def test_slots_in_float32_and_with_a_bound_per_state(monkeypatch):
    args, g = _problem((40,), 3, seed=12)
    c = np.asarray(trp.kl(*args)[1])
    eps = c * np.resize([0.5, 2.0, 1.5, 3.0], c.shape)  # a quarter of the states outside
    _check_slots(args, g, eps, monkeypatch)
    _check_slots(args, g, float(np.median(c)), monkeypatch, dtype=jnp.float32)


def test_slots_from_the_default_minimum(monkeypatch):
    """A batch of exactly :data:`MIN_ROWS_SLOTS` states takes slots with the shipped settings."""
    monkeypatch.undo()  # (the autouse fixture's smaller minimum)
    n = rows_mod.MIN_ROWS_SLOTS
    args, g = _problem((n,), 2, seed=13)
    x = list(map(jnp.asarray, args))
    assert _eigh_batches(_forward_jaxpr(x))[0] == [math.ceil(n / 2)]
    _check_slots(args, g, _bound(args, 0.3), monkeypatch)


def _eigh_batches(jaxpr) -> tuple[list[int], list[int]]:
    """Batch sizes of the ``eigh`` calls of ``jaxpr``: outside any ``cond``, and inside one."""
    outside, inside = [], []

    def walk(jp, in_cond):
        for e in jp.eqns:
            if e.primitive.name == "eigh":
                (inside if in_cond else outside).append(math.prod(e.invars[0].aval.shape[:-2]))
            for inner in _inner_jaxprs(e):
                walk(inner, in_cond or e.primitive.name == "cond")

    walk(jaxpr, False)
    return outside, inside


@pytest.mark.parametrize("fractions", [(0.5,), (0.25, 0.5)])
def test_only_the_first_slot_runs_unconditionally(fractions, monkeypatch):
    """The forward's ``eigh`` sees the first slot's rows outside a ``cond`` and the others
    inside one (per later slot); without slots it sees the whole batch."""
    monkeypatch.setattr(rows_mod, "SLOT_FRACTIONS", fractions)
    args, _ = _problem((40,), 4, seed=3)
    x = list(map(jnp.asarray, args))
    outside, inside = _eigh_batches(_forward_jaxpr(x))
    bounds = [0, *(math.ceil(f * 40) for f in fractions), 40]
    assert outside == [bounds[1]]
    assert sorted(inside) == sorted(b - a for a, b in itertools.pairwise(bounds[1:]))
    monkeypatch.setattr(rows_mod, "SLOT_FRACTIONS", ())
    assert _eigh_batches(_forward_jaxpr(x)) == ([40], [])


def _forward_jaxpr(x):
    def fwd(*a):  # (a new function each time: make_jaxpr caches by function)
        return tuple(trp.project_kl(*a, eps_mean=0.05, eps_cov=0.1))

    return jax.make_jaxpr(fwd)(*x).jaxpr


def test_batches_below_the_minimum_take_no_slots(monkeypatch):
    monkeypatch.setattr(rows_mod, "MIN_ROWS_SLOTS", 41)
    args, _ = _problem((40,), 4, seed=4)
    assert _eigh_batches(_forward_jaxpr(list(map(jnp.asarray, args)))) == ([40], [])


def test_slots_keep_the_decompositions_in_turn(monkeypatch):
    """Forward and backward in one program: the decompositions outside the ``cond``s and each
    ``cond`` holding some run one after another, and so do those inside each branch."""
    args, _ = _problem((40,), 12, seed=5)  # d = 12: LAPACK's triangular solves too

    def loss(m, L, mo, Lo):
        out = trp.project_kl(m, L, mo, Lo, eps_mean=1e-3, eps_cov=1e-3)
        return jnp.sum(out.mean) + jnp.sum(out.scale)

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3)))(*map(jnp.asarray, args)).jaxpr
    conds = [e for e in jaxpr.eqns if e.primitive.name == "cond"]
    holding = [e for e in conds if _decompositions(e.params["branches"][1].jaxpr)]
    assert len(holding) == 2  # the forward's second slot and the backward's
    _assert_in_turn(jaxpr)  # (counts the conds that hold decompositions)
    for e in holding:
        branch = e.params["branches"][1].jaxpr  # (branches: false, true)
        assert len(_decompositions(branch)) >= 2
        _assert_in_turn(branch)


@pytest.mark.parametrize("fractions", [(0.5,), (0.25, 0.5)], ids=["halves", "three"])
def test_slots_keep_the_decompositions_in_turn_under_vmap(fractions, monkeypatch):
    """Under ``vmap`` of states whose rows differ, each ``cond`` becomes a ``select`` that runs
    its branch inline: the decompositions after it must still wait for the branch's last one,
    not only for its first output."""
    monkeypatch.setattr(rows_mod, "SLOT_FRACTIONS", fractions)
    args, _ = _problem((2, 40), 12, seed=14)

    def loss(m, L, mo, Lo):
        out = trp.project_kl(m, L, mo, Lo, eps_mean=1e-3, eps_cov=1e-3)
        return jnp.sum(out.mean) + jnp.sum(out.scale)

    grad = jax.vmap(jax.grad(loss, argnums=(0, 1, 2, 3)))
    jaxpr = jax.make_jaxpr(grad)(*map(jnp.asarray, args)).jaxpr
    assert not any(e.primitive.name == "cond" for e in jaxpr.eqns)  # (all selects now)
    _assert_in_turn(jaxpr)


def test_vmap_runs_every_slot_with_the_same_results(monkeypatch):
    """Under ``vmap`` each ``cond`` becomes a ``select``: every slot runs (the second on the
    first slot's first row where no row reaches it), and the outputs and gradients are those of
    the whole batch."""
    args, g = _problem((3, 16), 4, seed=6)
    eps = _bound(args, 0.3)

    def loss(m, L, mo, Lo, gm, gL):
        out = trp.project_kl(m, L, mo, Lo, eps_mean=0.05, eps_cov=eps)
        return jnp.sum(out.mean * gm) + jnp.sum(out.scale * gL), out

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
    x = [*map(jnp.asarray, args), *map(jnp.asarray, g)]
    (_, out), grads = jax.jit(jax.vmap(grad))(*x)
    mapped = [*out, *grads]
    monkeypatch.setattr(rows_mod, "SLOT_FRACTIONS", ())
    (_, out), grads = jax.jit(grad)(*x)
    whole = [np.asarray(a) for a in (*out, *grads)]
    _assert_close([np.asarray(a) for a in mapped], whole, np.float64)


def test_from_fields_finds_the_slots_again():
    mask = jnp.asarray(np.arange(10) % 3 == 0)
    rows = jax.jit(lambda m: rows_mod.choose_slots(m, xp=jnp).index)(mask)
    assert rows.shape == (10,)
    np.testing.assert_array_equal(np.asarray(rows), [0, 3, 6, 9] + [10] * 6)
    again = rows_mod.from_fields(rows, mask)
    assert again.slots == (0, 5, 10)
    # eager rows (fewer than the batch) have no slots
    eager = rows_mod.choose(np.arange(10) % 3 == 0, xp=np)
    assert rows_mod.from_fields(*rows_mod.fields(eager)).slots is None


def test_slot_fractions_from_the_environment():
    assert rows_mod.slot_fractions("") == (0.5,)
    assert rows_mod.slot_fractions(" 0.5,0.25 ") == (0.25, 0.5)
    for off in ("0", "off", "No", "false"):
        assert rows_mod.slot_fractions(off) == ()
    for bad in ("1", "0.5,1.5", "-0.1", "half", "0.5,,0.7"):
        with pytest.raises(ValueError, match="TRP_JIT_SLOTS"):
            rows_mod.slot_fractions(bad)
