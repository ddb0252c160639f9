"""Chunks of large eager CPU projections on several threads at once (``_common.lanes``,
``_compat.in_lanes``): the same outputs and cotangents, bit for bit, as the same chunks one
after another, on the NumPy route and on torch's kernels; the caller's settings and torch's grad
mode in every lane; the first error in order; no second split inside a lane."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from test_gradients import METHODS, make_case

import tr_projections as trp
from tr_projections import _compat
from tr_projections.backends import _common


@pytest.fixture
def two_lanes(monkeypatch):
    """Two threads for the package's splitting whatever this machine has, and no size limit:
    every chunked call of the tests below runs its chunks in two lanes."""
    monkeypatch.setattr(_compat, "LAPACK_THREADS", 2)
    monkeypatch.setattr(_common, "PARALLEL_MIN_NUMBERS", 1)


def _spy_forward(monkeypatch, op: str) -> list:
    """``(thread, rows)`` of every forward call of operation ``op`` from now on."""
    calls = []
    real = _common.OPERATIONS[op].forward

    def forward(a, b, o):
        calls.append((threading.get_ident(), a[0].shape[0]))
        time.sleep(0.01)  # (so that the other lane starts while this one works)
        return real(a, b, o)

    monkeypatch.setitem(_common.OPERATIONS, op, _common.OPERATIONS[op]._replace(forward=forward))
    return calls


def _outputs_and_cotangents(fn, args, kwargs, g):
    out, vjp_fn = trp.vjp(fn, *args, **kwargs)
    return [np.asarray(x) for x in (*out, *vjp_fn(trp.Gaussian(*g)))]


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("kind", ["diag", "full"])
def test_lanes_equal_chunks_in_turn(two_lanes, monkeypatch, method, kind):
    """50 NumPy states in 4 chunks (13, 13, 13, 11 rows), two lanes of two chunks on two
    threads, against the same chunks one after another: outputs and all four cotangents bit
    for bit, with per-state bounds sliced along."""
    case = make_case(60, method, kind == "full", d=3, batch=(50,))
    fn, op = case.fn, method.split("_")[0]
    rng = np.random.default_rng(2)
    g = [rng.standard_normal(np.shape(x)) for x in fn(*case.args, **case.kwargs)]
    monkeypatch.setattr(_common, "CHUNK_ROWS", 16)
    calls = _spy_forward(monkeypatch, op)
    got = _outputs_and_cotangents(fn, case.args, case.kwargs, g)
    assert sorted(n for _, n in calls) == [11, 13, 13, 13]
    assert len({t for t, _ in calls}) == 2  # (two lanes, on two threads)
    calls.clear()
    monkeypatch.setattr(_common, "PARALLEL_MIN_NUMBERS", 0)
    want = _outputs_and_cotangents(fn, case.args, case.kwargs, g)
    assert [n for _, n in calls] == [13, 13, 13, 11]
    assert {t for t, _ in calls} == {threading.get_ident()}
    for x, y in zip(got, want, strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(
    ("route", "method"),
    [(r, m) for r in ("numpy", "torch") for m in ("kl", "frobenius", "wasserstein")
     if (r, m) != ("torch", "frobenius")],  # (torch's kernels run Frobenius whole)
)  # fmt: skip
def test_torch_lanes_equal_chunks_in_turn(two_lanes, monkeypatch, route, method):
    """torch tensors through ``backward()``, on the NumPy route and on torch's kernels (whose
    chunks are ``CHUNK_ROWS // lanes`` rows: 32 -> 16), lanes against the same chunks in turn:
    outputs and gradients bit for bit. The lanes record no autograd graph (grad mode is the
    caller's: off inside the adapter's forward and backward)."""
    torch = pytest.importorskip("torch")
    from tr_projections.backends import torch as adapter

    case = make_case(61, method, True, d=3, batch=(50,))
    kw = {k: torch.tensor(v) if isinstance(v, np.ndarray) else v for k, v in case.kwargs.items()}
    rng = np.random.default_rng(4)
    g = [torch.tensor(rng.standard_normal(np.shape(x))) for x in case.fn(*case.args, **case.kwargs)]
    monkeypatch.setattr(adapter, "NUMPY_MAX_ELEMENTS", 1 << 20 if route == "numpy" else 0)
    monkeypatch.setattr(_common, "CHUNK_ROWS", 16)
    graphs = []
    real = _common.OPERATIONS[method].forward

    def forward(a, b, o):
        out = real(a, b, o)
        graphs.append(any(getattr(x, "grad_fn", None) is not None for x in out[0]))
        return out

    monkeypatch.setitem(
        _common.OPERATIONS, method, _common.OPERATIONS[method]._replace(forward=forward)
    )

    def run(lanes_on: bool):
        monkeypatch.setattr(_common, "PARALLEL_MIN_NUMBERS", 1 if lanes_on else 0)
        monkeypatch.setattr(adapter, "CHUNK_ROWS", 32 if lanes_on else 16)
        leaves = [torch.tensor(a, requires_grad=True) for a in case.args]
        out = case.fn(*leaves, **kw)
        torch.autograd.backward(list(out), g)
        return [o.detach().numpy() for o in out] + [a.grad.numpy() for a in leaves]

    got = run(True)
    assert len(graphs) == 4 and not any(graphs)
    want = run(False)
    for x, y in zip(got, want, strict=True):
        np.testing.assert_array_equal(x, y)


def test_plan(monkeypatch):
    """How a call is cut: in turn, chunks of CHUNK_ROWS; with lanes, an even share of the rows
    per lane, at most CHUNK_ROWS rows and at least the rows holding PARALLEL_MIN_NUMBERS
    numbers of the scale (whichever is more), so a batch shorter than CHUNK_ROWS is split too;
    lanes never outnumber the chunks; below PARALLEL_MIN_NUMBERS, no lanes."""
    monkeypatch.setattr(_compat, "LAPACK_THREADS", 3)
    monkeypatch.setattr(_common, "CHUNK_ROWS", 16)
    full = make_case(62, "kl", True, d=3, batch=(50,)).args  # (9 numbers of scale per row)
    diag = make_case(62, "kl", False, d=3, batch=(50,)).args  # (3 per row)
    plan = _common._plan
    monkeypatch.setattr(_common, "PARALLEL_MIN_NUMBERS", 0)
    assert plan("kl", full, (0.1, 0.1)) == (_common._spans(50, rows=16), 1)
    monkeypatch.setattr(_common, "PARALLEL_MIN_NUMBERS", 9 * 20)  # (20 full rows, 60 diagonal)
    spans, lanes = plan("kl", full, (0.1, 0.1))
    assert lanes == 3 and [b - a for a, b in spans] == [17, 17, 16]  # (rows: min(20, 17))
    assert plan("kl", diag, (0.1, 0.1)) == (_common._spans(50, rows=16), 1)  # (150 < 180)
    monkeypatch.setattr(_common, "PARALLEL_MIN_NUMBERS", 9 * 10)
    spans, lanes = plan("kl", full, (0.1, 0.1))  # (rows: max(16, 10) = 16)
    assert lanes == 3 and [b - a for a, b in spans] == [13, 13, 13, 11]
    spans, lanes = plan("kl", tuple(x[:20] for x in full), (0.1, 0.1))  # (20 <= CHUNK_ROWS)
    assert lanes == 2 and spans == [(0, 10), (10, 20)]  # (not 7, 7, 6: at least 10 rows)
    monkeypatch.setattr(_common, "PARALLEL_MIN_NUMBERS", 1)
    spans, lanes = plan("kl", tuple(x[:2] for x in full), (0.1, 0.1))
    assert lanes == 2 and spans == [(0, 1), (1, 2)]
    assert plan("kl", tuple(x[:1] for x in full), (0.1, 0.1)) is None
    assert plan("kl", full, (0.1, 0.1), 0) is None  # (rows=0: never)
    monkeypatch.setattr(_compat, "LAPACK_THREADS", 1)
    assert plan("kl", full, (0.1, 0.1)) == (_common._spans(50, rows=16), 1)
    assert _common.lanes("entropy", full) == 1


def test_in_lanes_order_context_and_threads():
    """Results in the tasks' order; each task sees the caller's settings, runs with splitting
    off (``split_threads`` is 1 there, not here), the last on the calling thread."""
    here = threading.get_ident()
    assert _compat.split_threads(np) >= 1

    def task(i):
        def run():
            time.sleep(0.02 * (3 - i))  # (the first to start finishes last)
            return i, trp.checks_enabled(), _compat.split_threads(np), threading.get_ident()

        return run

    with trp.checks(False):
        out = _compat.in_lanes([task(i) for i in range(3)])
    assert [i for i, *_ in out] == [0, 1, 2]
    assert all(not checked and split == 1 for _, checked, split, _ in out)
    assert out[-1][3] == here and len({t for *_, t in out}) == 3
    assert trp.checks_enabled()  # (the caller's own context is left as it was)


def test_in_lanes_torch_grad_mode():
    """A lane runs with the caller's grad mode (a pool thread's own default is on)."""
    torch = pytest.importorskip("torch")
    tasks = [torch.is_grad_enabled] * 3
    with torch.no_grad():
        assert _compat.in_lanes(tasks) == [False] * 3
    assert _compat.in_lanes(tasks) == [True] * 3


def test_in_lanes_first_error_after_every_task():
    """When tasks fail, every task has finished before the caller hears of it, and the caller
    gets the error of the first failing task in order (on the pool or on this thread)."""
    for bad in ((1, 3), (3,), (0, 2)):
        finished = []

        def task(i, bad=bad, finished=finished):
            def run():
                time.sleep(0.03 if i == 0 else 0.0)
                if i in bad:
                    raise ValueError(f"task {i}")
                finished.append(i)
                return i

            return run

        with pytest.raises(ValueError, match=f"task {bad[0]}"):
            _compat.in_lanes([task(i) for i in range(4)])
        assert sorted(finished) == sorted(set(range(4)) - set(bad))


def test_a_failing_chunk_raises_its_own_error(two_lanes, monkeypatch):
    """An error inside a chunk (value checks ran on the whole call before) reaches the caller
    as the error of the first chunk that failed."""
    monkeypatch.setattr(_common, "CHUNK_ROWS", 16)
    case = make_case(63, "kl", False, d=3, batch=(50,))
    real = _common.OPERATIONS["kl"].forward

    def forward(a, b, o):
        if a[0].shape[0] == 11 or a[0][0, 0] == case.args[0][13, 0]:
            raise FloatingPointError(f"chunk of {a[0].shape[0]} rows")
        return real(a, b, o)

    monkeypatch.setitem(
        _common.OPERATIONS, "kl", _common.OPERATIONS["kl"]._replace(forward=forward)
    )
    with pytest.raises(FloatingPointError, match="chunk of 13 rows"):
        trp.project_kl(*case.args, **case.kwargs)


def test_no_second_split_inside_a_lane(two_lanes, monkeypatch):
    """The decompositions of a chunk in a lane run whole (the call's threads are taken by its
    lanes); with the lanes off, the same chunks split them."""
    case = make_case(64, "wasserstein", True, d=3, batch=(50,))
    monkeypatch.setattr(_compat, "PARALLEL_MIN_BATCH", 2)
    monkeypatch.setattr(_common, "CHUNK_ROWS", 16)
    splits = []
    real = _compat._in_parallel
    monkeypatch.setattr(_compat, "_in_parallel", lambda *a, **k: splits.append(1) or real(*a, **k))
    trp.project_wasserstein(*case.args, **case.kwargs)
    assert not splits
    monkeypatch.setattr(_common, "PARALLEL_MIN_NUMBERS", 0)
    trp.project_wasserstein(*case.args, **case.kwargs)
    assert splits
