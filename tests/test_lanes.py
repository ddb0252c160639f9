"""Chunks of large eager CPU projections on several threads at once (``_common.lanes``,
``_compat.in_lanes``): the same outputs and cotangents, bit for bit, as the same chunks one
after another, on the NumPy route and on torch's kernels; the caller's settings and torch's grad
mode in every lane; the first error in order; no second split inside a lane."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from test_gradients import METHODS, make_case, median_bounds

import tr_projections as trp
from tr_projections import _compat
from tr_projections.backends import _common


@pytest.fixture
def two_lanes(monkeypatch):
    """Two threads for the package's splitting whatever this machine has, and no size limit:
    every chunked call of the tests below runs its chunks in two lanes."""
    monkeypatch.setattr(_compat, "LAPACK_THREADS", 2)
    monkeypatch.setattr(_common, "PARALLEL_MIN_NUMBERS", 1)


class _Spy(list):
    """``(thread, rows)`` of every call of a stage. While ``meet`` is on, each thread's first
    call waits until a second thread has made its first one (a barrier, not a sleep): the test
    sees two lanes at work however slowly the pool's thread starts, and fails (after its
    timeout) where there is only one."""

    def __init__(self):
        super().__init__()
        self.meet = True
        self._barrier = threading.Barrier(2, timeout=60)

    def record(self, rows: int) -> None:
        me = threading.get_ident()
        first = all(t != me for t, _ in self)
        self.append((me, rows))
        if self.meet and first:
            self._barrier.wait()


def _spy(monkeypatch, op: str, stage: str = "forward", *, meet: bool = True) -> _Spy:
    """The calls of operation ``op``'s ``stage`` (``forward`` or ``backward``) from now on
    (:class:`_Spy`)."""
    calls = _Spy()
    calls.meet = meet
    real = getattr(_common.OPERATIONS[op], stage)

    def spied(arrays, *rest):
        calls.record(arrays[0].shape[0])
        return real(arrays, *rest)

    monkeypatch.setitem(_common.OPERATIONS, op, _common.OPERATIONS[op]._replace(**{stage: spied}))
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
    calls = _spy(monkeypatch, op)
    back = _spy(monkeypatch, op, "backward")
    got = _outputs_and_cotangents(fn, case.args, case.kwargs, g)
    for seen in (calls, back):  # (forward and backward, in two lanes on two threads)
        assert sorted(n for _, n in seen) == [11, 13, 13, 13]
        assert len({t for t, _ in seen}) == 2
    calls.clear()
    calls.meet = back.meet = False
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
    calls = _Spy()
    real = _common.OPERATIONS[method].forward

    def forward(a, b, o):
        calls.record(a[0].shape[0])
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
    assert len({t for t, _ in calls}) == 2  # (both lanes worked, the pool's one included)
    calls.meet = False
    want = run(False)
    for x, y in zip(got, want, strict=True):
        np.testing.assert_array_equal(x, y)


def test_plan(monkeypatch):
    """How a call is cut: in turn, chunks of CHUNK_ROWS; with lanes, an even share of the rows
    per lane, at least the rows holding PARALLEL_MIN_NUMBERS numbers of the scale, at most
    CHUNK_ROWS rows or that least length (whichever is more), or at most the caller's bound
    (the torch adapter's), so a batch shorter than CHUNK_ROWS is split too; lanes never
    outnumber the chunks; below PARALLEL_MIN_NUMBERS, no lanes."""
    monkeypatch.setattr(_compat, "LAPACK_THREADS", 3)
    monkeypatch.setattr(_common, "CHUNK_ROWS", 16)
    full = make_case(62, "kl", True, d=3, batch=(50,)).args  # (9 numbers of scale per row)
    diag = make_case(62, "kl", False, d=3, batch=(50,)).args  # (3 per row)
    plan = _common._plan
    monkeypatch.setattr(_common, "PARALLEL_MIN_NUMBERS", 0)
    assert plan("kl", full, (0.1, 0.1)) == (_common._spans(50, rows=16), 1)
    monkeypatch.setattr(_common, "PARALLEL_MIN_NUMBERS", 9 * 20)  # (20 full rows, 60 diagonal)
    spans, lanes = plan("kl", full, (0.1, 0.1))
    assert lanes == 3 and [b - a for a, b in spans] == [17, 17, 16]  # (rows: max(17, 20) = 20)
    spans, lanes = plan("kl", full, (0.1, 0.1), 16)  # (a caller's bound: at most 16 rows)
    assert lanes == 3 and [b - a for a, b in spans] == [13, 13, 13, 11]
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
    together = threading.Barrier(3, timeout=60)  # (all three at once, on three threads)

    def task(i):
        def run():
            together.wait()
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
    from tr_projections.projections import _kl_diag_fused

    monkeypatch.setattr(_kl_diag_fused, "FUSED_CPU", "off")  # (LAPACK's eigh: its threshold)
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


def test_torch_func_grad_in_lanes(two_lanes, monkeypatch):
    """``torch.func.grad`` runs the adapter's forward eagerly, so its chunks take lanes too:
    two threads, and the gradients of the same chunks in turn, bit for bit."""
    torch = pytest.importorskip("torch")
    from tr_projections.backends import torch as adapter

    case = make_case(65, "kl", True, d=3, batch=(50,))
    monkeypatch.setattr(adapter, "NUMPY_MAX_ELEMENTS", 0)
    mean, scale, old_mean, old_scale = (torch.tensor(a) for a in case.args)
    kw = {k: torch.tensor(v) if isinstance(v, np.ndarray) else v for k, v in case.kwargs.items()}
    rng = np.random.default_rng(5)
    g_mean, g_scale = (torch.tensor(rng.standard_normal(tuple(x.shape))) for x in (mean, scale))

    def loss(m, s):
        out = case.fn(m, s, old_mean, old_scale, **kw)
        return (out.mean * g_mean).sum() + (out.scale * g_scale).sum()

    calls = _spy(monkeypatch, "kl")
    monkeypatch.setattr(adapter, "CHUNK_ROWS", 32)  # (16 rows a chunk in two lanes)
    got = torch.func.grad(loss, argnums=(0, 1))(mean, scale)
    assert sorted(n for _, n in calls) == [11, 13, 13, 13] and len({t for t, _ in calls}) == 2
    calls.meet = False
    monkeypatch.setattr(_common, "PARALLEL_MIN_NUMBERS", 0)
    monkeypatch.setattr(adapter, "CHUNK_ROWS", 16)
    want = torch.func.grad(loss, argnums=(0, 1))(mean, scale)
    for x, y in zip(got, want, strict=True):
        np.testing.assert_array_equal(x.numpy(), y.numpy())


def test_torch_thread_states_keep_one_thread(two_lanes, monkeypatch):
    """Autocast, inference mode, ``__torch_function__`` and dispatch modes (a default device, a
    FLOP counter) and the profiler are per thread in torch, so a call under one of them runs
    its chunks in turn, all on the calling thread (a lane would run without them): here
    float32 KL under CPU autocast, the same bits as with the lanes off, and ``split_threads``
    is 1 under each state."""
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as xpt
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    from tr_projections.backends import torch as adapter

    a = torch.ones(3, 2, 2)
    assert _compat.split_threads(xpt, a) == 2

    class FunctionMode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    class DispatchMode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    states = [
        torch.autocast("cpu", dtype=torch.bfloat16),
        torch.inference_mode(),
        FunctionMode(),
        DispatchMode(),
        torch.device("cpu"),
        torch.profiler.profile(),
    ]
    with torch.no_grad():  # (as inside the adapter: a Parameter is a plain tensor there)
        assert _compat.split_threads(xpt, torch.nn.Parameter(a)) == 2
    for state in states:
        with state:
            assert _compat.split_threads(xpt, a) == 1, state
    case = make_case(66, "kl", True, d=3, batch=(50,))
    args = [torch.tensor(x, dtype=torch.float32) for x in case.args]
    kw = median_bounds(case.kwargs)
    monkeypatch.setattr(adapter, "NUMPY_MAX_ELEMENTS", 0)
    monkeypatch.setattr(adapter, "CHUNK_ROWS", 16)
    calls = _spy(monkeypatch, "kl", meet=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = case.fn(*args, **kw)
        assert {t for t, _ in calls} == {threading.get_ident()} and len(calls) == 4
        monkeypatch.setattr(_common, "PARALLEL_MIN_NUMBERS", 0)
        want = case.fn(*args, **kw)
    for x, y in zip(got, want, strict=True):
        np.testing.assert_array_equal(x.numpy(), y.numpy())


def test_lanes_take_the_next_chunk(monkeypatch):
    """Each lane takes the next chunk not yet taken: while one lane is held on the first
    chunk, the other takes all the rest; the results come back in the chunks' order."""
    spans = [(0, 1), (1, 2), (2, 3), (3, 4)]
    seen = []
    rest_done = threading.Event()

    def fn(i, a, b):
        if i == 0:  # (held until the other lane has done every other chunk)
            assert rest_done.wait(60)
        seen.append((i, threading.get_ident()))
        if len(seen) == 3:
            rest_done.set()
        return i

    assert _common._on_spans(fn, spans, 2) == [0, 1, 2, 3]
    lane_of = dict(seen)
    assert {lane_of[i] for i in (1, 2, 3)} == {t for i, t in seen if i != 0}
    assert lane_of[0] not in {lane_of[i] for i in (1, 2, 3)}


def test_lanes_raise_the_first_failing_chunk():
    """When chunks fail in two lanes, the caller gets the error of the first in order, once
    both lanes have stopped."""
    spans = [(i, i + 1) for i in range(6)]

    def fn(i, a, b):
        time.sleep(0.05 if i == 2 else 0.0)
        if i in (2, 3):
            raise ValueError(f"chunk {i}")
        return i

    with pytest.raises(ValueError, match="chunk 2"):
        _common._on_spans(fn, spans, 2)


def test_in_lanes_numpy_error_state():
    """A lane handles NumPy's floating-point errors as the caller does (NumPy 1.x keeps the
    setting per thread)."""
    with np.errstate(divide="raise", invalid="ignore"):
        states = _compat.in_lanes([np.geterr] * 3)
    assert all(s["divide"] == "raise" and s["invalid"] == "ignore" for s in states)


@pytest.mark.parametrize("where", ["task", "wait"])
def test_in_lanes_waits_on_an_interrupt(monkeypatch, where):
    """An interrupt on the calling thread, in its own task or while it waits for the pool's
    tasks (its own done first), cancels what has not started and propagates once what runs
    has finished (no lane is left working on the caller's arrays)."""
    import concurrent.futures

    real_wait = concurrent.futures.wait
    interrupted = []

    def wait(futures, *args, **kwargs):
        if where == "wait" and not interrupted and not all(f.done() for f in futures):
            interrupted.append(1)
            raise KeyboardInterrupt
        return real_wait(futures, *args, **kwargs)

    monkeypatch.setattr(concurrent.futures, "wait", wait)
    finished = []
    started = threading.Event()

    def slow():
        started.set()
        time.sleep(0.1)
        finished.append(1)

    def here():
        assert started.wait(60)
        if where == "task":
            interrupted.append(1)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _compat.in_lanes([slow, here])
    assert interrupted and finished == [1]
    assert _compat.in_lanes([]) == []
