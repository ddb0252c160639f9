"""Batched decompositions of torch CPU tensors and NumPy arrays split over threads
(``_compat.LAPACK_THREADS``): the same results as one call, bit for bit, and only where nothing
is differentiated through the call."""

from __future__ import annotations

import glob
import itertools
import multiprocessing
import os
import sys
import threading
import types

import array_api_compat.numpy as xpn
import numpy as np
import pytest
from _data import full_policies, spd

from tr_projections import _compat


def _namespace(name):
    if name == "numpy":
        return xpn, np.asarray, np.asarray
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as ns

    return ns, torch.asarray, lambda t: t.detach().numpy()


def _decompose(a, ns, *, lazy=False):
    ops = {
        "eigh": lambda x: _compat.eigh(x, xp=ns),
        "svd": lambda x: _compat.svd(x[..., :, :3], xp=ns),
        "qr": lambda x: (_compat.qr_r(x, xp=ns),),
    }
    return ops if lazy else {op: fn(a) for op, fn in ops.items()}


def _lanes(monkeypatch) -> list:
    """The number of tasks of every ``_compat.in_lanes`` call from now on."""
    calls: list = []
    real = _compat.in_lanes
    monkeypatch.setattr(_compat, "in_lanes", lambda tasks: calls.append(len(tasks)) or real(tasks))
    return calls


@pytest.fixture(autouse=True)
def library_routes(monkeypatch):
    """These tests pin the library routes (LAPACK's ``eigh``, SVD and QR, torch's and NumPy's
    triangular solves and products): the kernels' host build off, whatever
    ``TRP_FUSED_CPU`` says (its kernels split and round otherwise: ``test_small_kernels``)."""
    from tr_projections.projections import _kl_diag_fused

    monkeypatch.setattr(_kl_diag_fused, "FUSED_CPU", "off")


@pytest.fixture
def split_everything(monkeypatch):
    """Every batch of two or more matrices is split (the thresholds are for speed only)."""
    monkeypatch.setattr(_compat, "PARALLEL_MIN_BATCH", 2)
    monkeypatch.setattr(_compat, "PARALLEL_MIN_BATCH_QR", 2)


@pytest.mark.parametrize("name", ["numpy", "torch"])
@pytest.mark.parametrize("threads", [2, 3, 7])
@pytest.mark.parametrize(
    ("shape", "d", "dtype", "layout"),
    [
        ((5,), 4, "float64", "contiguous"),
        ((2, 13), 4, "float64", "contiguous"),
        ((2, 13), 5, "float64", "contiguous"),
        ((1001,), 5, "float64", "contiguous"),
        ((2, 13), 5, "float32", "contiguous"),
        ((30,), 5, "float64", "transposed"),
        ((3, 11), 5, "float64", "expanded"),
    ],
)
def test_split_equals_one_call(
    name, threads, shape, d, dtype, layout, split_everything, monkeypatch
):
    """``eigh``, the SVD and QR's ``R`` split over 2, 3 or 7 threads (batches not divisible by
    the count, batches of several axes, one of 1,001) equal one call bit for bit, in the batch's
    shape and dtype, and leave the argument alone. Parts are cut at whole multiples of 64 bytes
    into the batch (LAPACK rounds differently at other alignments): 4x4 float64 matrices
    (128 bytes) go in ``min(threads, n)`` parts, 5x5 ones (200 bytes) in parts of multiples of 8;
    all but the last part run on the pool's threads."""
    ns, conv, back = _namespace(name)
    rng = np.random.default_rng(len(shape) * 10 + threads)
    a = conv(spd(rng, shape, d).astype(dtype))
    if layout == "transposed":  # (a non-contiguous view: the batch axis is last in memory)
        a = conv(np.ascontiguousarray(np.moveaxis(spd(rng, shape, d), 0, -1)))
        a = ns.permute_dims(a, (2, 0, 1))
    elif layout == "expanded":  # (one matrix broadcast over the batch: zero strides)
        a = ns.broadcast_to(conv(spd(rng, (), d)), shape + (d, d))
    a0 = np.array(back(a), copy=True)
    monkeypatch.setattr(_compat, "LAPACK_THREADS", 1)
    assert _compat._lapack_threads(a, ns) == 1
    whole = _decompose(a, ns)
    monkeypatch.setattr(_compat, "LAPACK_THREADS", threads)
    assert _compat._lapack_threads(a, ns) == threads
    calls = []
    original = _compat._in_parallel

    def spy(fn, flat, parts, *, xp):
        def part(x):
            calls.append((x.shape[0], threading.current_thread().name))
            return fn(x)

        return original(part, flat, parts, xp=xp)

    monkeypatch.setattr(_compat, "_in_parallel", spy)
    n = int(np.prod(shape))
    split = {}
    for op, fn in _decompose(None, ns, lazy=True).items():
        calls.clear()
        split[op] = fn(a)
        # (e.g. the SVD's 5x3 float64 matrices are 120 bytes: whole parts of 8 matrices)
        size = np.dtype(dtype).itemsize * d * (3 if op == "svd" else d)
        unit = 64 // np.gcd(64, size)
        sizes = [k for k, _ in calls]
        assert sum(sizes) == n, op
        assert len(sizes) <= threads and (len(sizes) > 1) == (n > unit), (op, sizes)
        if unit == 1:
            assert len(sizes) == min(threads, n), (op, sizes)
        pooled = [k for k, t in calls if t.startswith("tr_projections-lapack")]
        assert len(pooled) == len(sizes) - 1, op  # (the last part runs on this thread)
        assert all(k % unit == 0 for k in pooled), (op, sizes)  # (so: 64-byte cuts)
    for op in whole:
        for g, w in zip(split[op], whole[op], strict=True):
            assert tuple(g.shape) == tuple(w.shape) and g.dtype == w.dtype, op
            np.testing.assert_array_equal(back(g), back(w), err_msg=op)
    np.testing.assert_array_equal(back(a), a0)


def test_thread_counts(monkeypatch):
    """Automatic counts: torch's thread count for torch CPU tensors; for NumPy the usable CPUs,
    capped by ``OMP_NUM_THREADS``; one part (no split) for what is differentiated through the
    call and for other libraries."""
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as xpt

    monkeypatch.setattr(_compat, "LAPACK_THREADS", 0)
    a = torch.eye(3, dtype=torch.float64).expand(4, 3, 3)
    assert _compat._lapack_threads(a, xpt) == torch.get_num_threads()
    g = a.clone().requires_grad_()
    assert _compat._lapack_threads(g, xpt) == 1  # (an autograd graph is being recorded)
    with torch.no_grad():
        assert _compat._lapack_threads(g, xpt) == torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert _compat._lapack_threads(np.eye(3), xpn) == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert _compat._lapack_threads(np.eye(3), xpn) >= 1
    strict = pytest.importorskip("array_api_strict")
    assert _compat._lapack_threads(strict.eye(3), strict) == 1
    monkeypatch.setattr(_compat, "LAPACK_THREADS", 4)
    assert _compat._lapack_threads(np.ones((5, 3, 3)), xpn) == 4
    assert _compat._lapack_threads(g, xpt) == 1
    assert _compat._lapack_threads(np.ones((5, 65, 65)), xpn) == 1  # (LAPACK threads those)
    assert _compat._lapack_threads(np.ones((3, 3)), xpn) == 1  # (one matrix)
    monkeypatch.setattr(_compat, "LAPACK_THREADS", 1000)
    assert _compat._lapack_threads(np.ones((5, 3, 3)), xpn) == _compat.PARALLEL_MAX_PARTS
    monkeypatch.setattr(_compat, "LAPACK_THREADS", 0)
    with _compat.numpy_threads(3):
        assert _compat._lapack_threads(np.ones((5, 3, 3)), xpn) == 3


def test_torch_thread_count_holds_on_the_numpy_route(split_everything, monkeypatch):
    """Where the torch adapter runs NumPy kernels on a torch call, the decompositions split over
    torch's thread count (``torch.set_num_threads(1)``: no split), not over the CPUs."""
    torch = pytest.importorskip("torch")
    import tr_projections as trp
    from tr_projections.backends import torch as torch_backend

    monkeypatch.setattr(torch_backend, "NUMPY_MAX_ELEMENTS", 1 << 19)
    monkeypatch.setattr(_compat, "LAPACK_THREADS", 0)
    rng = np.random.default_rng(3)
    n, d = 200, 3
    args = [torch.asarray(x) for x in (
        rng.standard_normal((n, d)),
        np.linalg.cholesky(spd(rng, (n,), d)),
        rng.standard_normal((n, d)),
        np.linalg.cholesky(spd(rng, (n,), d)),
    )]  # fmt: skip
    args[1].requires_grad_()
    seen = []
    original = _compat._lapack_threads
    monkeypatch.setattr(
        _compat, "_lapack_threads", lambda a, xp: seen.append(original(a, xp)) or seen[-1]
    )
    before = torch.get_num_threads()
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            seen.clear()
            out = trp.project_kl(*args, eps_mean=1e-3, eps_cov=1e-3)
            out.scale.sum().backward()
            assert seen and set(seen) == {threads}
    finally:
        torch.set_num_threads(before)


def _splits(monkeypatch, key) -> list:
    # What `key` says of each batch that _compat._in_parallel splits from now on, in order.
    splits = []
    real = _compat._in_parallel
    monkeypatch.setattr(
        _compat,
        "_in_parallel",
        lambda fn, flat, *a, **k: splits.append(key(flat)) or real(fn, flat, *a, **k),
    )
    return splits


@pytest.mark.parametrize(
    ("d", "whole", "split"),
    [(2, 2303, 2304), (3, 1023, 1024), (5, 368, 369), (6, 255, 256), (12, 255, 256)],
)
def test_eigh_splits_small_matrices_from_larger_batches(d, whole, split, monkeypatch):
    """LAPACK's ``eigh`` is split from ``PARALLEL_MIN_BATCH`` matrices of 6x6 and larger, and
    from (6/d)^2 times as many smaller ones (cheap for LAPACK, the hand-off weighs more); the
    SVD keeps ``PARALLEL_MIN_BATCH`` whatever d; "split everything" stays that."""
    monkeypatch.setattr(_compat, "LAPACK_THREADS", 2)
    splits = _splits(monkeypatch, lambda flat: flat.shape[0])
    rng = np.random.default_rng(d)
    for n in (whole, split):
        _compat.eigh(spd(rng, (n,), d), xp=xpn)
    assert splits == [split]
    splits.clear()
    _compat.svd(spd(rng, (256,), d), xp=xpn)
    assert splits == [256]
    splits.clear()
    monkeypatch.setattr(_compat, "PARALLEL_MIN_BATCH", 2)
    _compat.eigh(spd(rng, (2,), d), xp=xpn)
    assert splits == [2]


def _blas(monkeypatch, controlled: bool) -> None:
    # Lanes with NumPy's OpenBLAS on one thread (where this process can set its count), or
    # OpenBLAS left alone, whatever the default.
    if controlled and not _compat._openblas_controls():
        pytest.skip("no OpenBLAS whose thread count can be set is loaded")
    monkeypatch.setattr(_compat, "ONE_BLAS_THREAD_IN_LANES", controlled)


@pytest.mark.parametrize("controlled", [True, False], ids=["one-blas-thread", "blas-alone"])
@pytest.mark.parametrize("name", ["numpy", "torch"])
def test_numpy_splits_eigh_and_svd_up_to_their_sizes(name, controlled, monkeypatch):
    """With NumPy's OpenBLAS on one thread in lanes, NumPy's ``eigh`` and SVD are split up to
    ``PARALLEL_MAX_D`` (64), as torch's are. With OpenBLAS left alone (not found, or
    ``ONE_BLAS_THREAD_IN_LANES`` off), NumPy's ``eigh`` is split up to
    ``NUMPY_EIGH_PARALLEL_MAX_D`` (24) and its SVD up to ``NUMPY_SVD_PARALLEL_MAX_D`` (40):
    larger, two parts at once took longer than one call. QR factors: up to ``PARALLEL_MAX_D``
    throughout."""
    ns, conv, _ = _namespace(name)
    _blas(monkeypatch, controlled)
    monkeypatch.setattr(_compat, "LAPACK_THREADS", 2)
    splits = _splits(monkeypatch, lambda flat: flat.shape[-1])
    rng = np.random.default_rng(3)
    sizes = (24, 25, 40, 41, 64, 65)
    limited = name == "numpy" and not controlled
    for d in sizes:
        _compat.eigh(conv(spd(rng, (300,), d)), xp=ns)
    eigh_max = _compat.NUMPY_EIGH_PARALLEL_MAX_D if limited else _compat.PARALLEL_MAX_D
    assert splits == [d for d in sizes if d <= eigh_max]
    splits.clear()
    for d in sizes:
        _compat.svd(conv(spd(rng, (300,), d)), xp=ns)
    svd_max = _compat.NUMPY_SVD_PARALLEL_MAX_D if limited else _compat.PARALLEL_MAX_D
    assert splits == [d for d in sizes if d <= svd_max]
    splits.clear()
    monkeypatch.setattr(_compat, "PARALLEL_MIN_BATCH_QR", 2)
    for d in sizes:
        _compat.qr_r(conv(spd(rng, (300,), d)), xp=ns)
    assert splits == [d for d in sizes if d <= _compat.PARALLEL_MAX_D]


def _overlaps(op: str, calls: list, monkeypatch, *, expect_overlap: bool) -> list:
    # Run calls[0], which makes two calls of NumPy's `op` (at once, or in turn), with `op`
    # spied on: whether each call found the other inside `op` at the same time. (A call that
    # should overlap waits up to 30 s for the other; one that should not, 0.5 s.)
    real = getattr(xpn.linalg, op)
    both_in = threading.Barrier(2, timeout=30.0 if expect_overlap else 0.5)
    overlaps = []

    def spy(a, *args, **kwargs):
        try:
            both_in.wait()  # (two at once: both get here; one at a time: the first times out)
            overlaps.append(True)
        except threading.BrokenBarrierError:
            overlaps.append(False)
        return real(a, *args, **kwargs)

    monkeypatch.setattr(xpn.linalg, op, spy)
    monkeypatch.setattr(_compat, "LAPACK_THREADS", 1)  # (no split inside a call)
    calls[0]()
    return overlaps


@pytest.mark.parametrize("controlled", [True, False], ids=["one-blas-thread", "blas-alone"])
@pytest.mark.parametrize(("op", "d"), [("eigh", 24), ("eigh", 25), ("svd", 40), ("svd", 41)])
def test_large_numpy_decompositions_in_lanes_take_turns(op, d, controlled, monkeypatch):
    """In lanes (the chunks of a large call on every thread) with OpenBLAS left alone, NumPy's
    ``eigh`` of matrices larger than ``NUMPY_EIGH_PARALLEL_MAX_D`` and its SVD of ones larger
    than ``NUMPY_SVD_PARALLEL_MAX_D`` run one at a time (two at once took longer than one
    after the other); smaller ones overlap. With OpenBLAS on one thread in lanes, every size
    overlaps."""
    _blas(monkeypatch, controlled)
    limit = {"eigh": _compat.NUMPY_EIGH_PARALLEL_MAX_D, "svd": _compat.NUMPY_SVD_PARALLEL_MAX_D}
    a = spd(np.random.default_rng(d), (4,), d)
    fn = _compat.eigh if op == "eigh" else _compat.svd
    lanes = [lambda: _compat.in_lanes([lambda: fn(a, xp=xpn), lambda: fn(a, xp=xpn)])]
    overlap = controlled or d <= limit[op]
    assert _overlaps(op, lanes, monkeypatch, expect_overlap=overlap) == [overlap, overlap]
    assert not _compat._numpy_lapack_lock.locked()


def _blas_threads() -> list[int]:
    return [get() for get, _ in _compat._openblas_controls()]


def test_lanes_run_openblas_on_one_thread(monkeypatch):
    """While lanes run (two tasks or more), every OpenBLAS loaded has one thread; its own count
    is given back when the lanes end, also when a task fails; a single task changes nothing,
    and neither do lanes with ``ONE_BLAS_THREAD_IN_LANES`` off."""
    _blas(monkeypatch, True)
    controls = _compat._openblas_controls()
    saved = _blas_threads()
    try:
        for _, put in controls:
            put(2)  # (a count other than one, whatever this machine's default)
        own = _blas_threads()
        if 1 in own:
            pytest.skip("an OpenBLAS here cannot run on two threads")
        seen = _compat.in_lanes([_blas_threads, _blas_threads, _blas_threads])
        assert seen == [[1] * len(controls)] * 3
        assert _blas_threads() == own

        def fail():
            raise ValueError("a lane's error")

        with pytest.raises(ValueError, match="a lane's error"):
            _compat.in_lanes([_blas_threads, fail])
        assert _blas_threads() == own
        assert _compat.in_lanes([_blas_threads]) == [own]
        monkeypatch.setattr(_compat, "ONE_BLAS_THREAD_IN_LANES", False)
        assert _compat.in_lanes([_blas_threads, _blas_threads]) == [own] * 2
    finally:
        for (_, put), n in zip(controls, saved, strict=True):
            put(n)
    assert _compat._blas_lanes == 0


def test_lanes_at_once_share_the_one_thread(monkeypatch):
    """Lanes started on several threads at once keep OpenBLAS on one thread until the last of
    them ends (the first to end does not give the count back under the others)."""
    _blas(monkeypatch, True)
    controls = _compat._openblas_controls()
    saved = _blas_threads()
    first_in, others_done = threading.Event(), threading.Event()
    seen = {}

    def first():
        first_in.set()
        assert others_done.wait(30)
        return _blas_threads()  # (after the other lanes have ended)

    try:
        for _, put in controls:
            put(2)
        t = threading.Thread(target=lambda: seen.update(a=_compat.in_lanes([first, lambda: None])))
        t.start()
        assert first_in.wait(30)
        seen["b"] = _compat.in_lanes([_blas_threads, lambda: None])  # (within the first's)
        others_done.set()
        t.join(30)
        assert seen["b"][0] == [1] * len(controls)
        assert seen["a"][0] == [1] * len(controls)
        assert _blas_threads() == [2] * len(controls)
    finally:
        for (_, put), n in zip(controls, saved, strict=True):
            put(n)


def test_one_blas_thread_setting_is_checked(monkeypatch):
    """The setting takes bools and the environment's 1/0 (true/false, on/off, yes/no); anything
    else is an error that names it, raised by the first call that splits."""
    for value, on in ((True, True), (False, False), ("1", True), (" Off ", False), ("yes", True)):
        monkeypatch.setattr(_compat, "ONE_BLAS_THREAD_IN_LANES", value)
        assert _compat._one_blas_thread_in_lanes() is on
    monkeypatch.setattr(_compat, "ONE_BLAS_THREAD_IN_LANES", "sometimes")
    with pytest.raises(ValueError, match=r"TRP_ONE_BLAS_THREAD_IN_LANES.*'sometimes'"):
        _compat.in_lanes([lambda: None, lambda: None])


@pytest.mark.parametrize("missing", ["openblas", "numpy-on-openblas"])
def test_without_openblas_lanes_leave_blas_alone(missing, monkeypatch):
    """Where no OpenBLAS whose count can be set is loaded (MKL, Accelerate, an OpenMP build of
    OpenBLAS), or NumPy's own BLAS is not OpenBLAS (another library's OpenBLAS does not count),
    lanes change nothing, and NumPy's split limits and turns stay."""
    if missing == "openblas":
        monkeypatch.setattr(_compat, "_openblas_controls", lambda: ())
    else:
        monkeypatch.setattr(_compat, "_numpy_blas_is_openblas", lambda: False)
    controls = _compat._openblas_controls()
    assert not _compat._blas_controlled()
    before = [get() for get, _ in controls]
    inside = _compat.in_lanes([lambda: [get() for get, _ in controls]] * 2)
    assert inside == [before, before]
    assert _compat._blas_lanes == 0
    monkeypatch.setattr(_compat, "LAPACK_THREADS", 2)
    splits = _splits(monkeypatch, lambda flat: flat.shape[-1])
    _compat.eigh(spd(np.random.default_rng(0), (300,), 25), xp=xpn)
    assert splits == []


def test_openblas_is_looked_up_again_after_imports(monkeypatch):
    """The loaded OpenBLAS libraries are looked up again once modules were imported since the
    last look (a library loaded later, e.g. SciPy's, is then set too), not on every call."""
    looks = []
    monkeypatch.setattr(_compat, "_openblas_libraries", lambda: looks.append(1) or [])
    _compat._openblas_controls_for.cache_clear()
    try:
        _compat._openblas_controls()
        _compat._openblas_controls()
        assert len(looks) == 1
        monkeypatch.setitem(sys.modules, "tr_projections_test_new_module", types.ModuleType("m"))
        _compat._openblas_controls()
        assert len(looks) == 2
    finally:
        _compat._openblas_controls_for.cache_clear()


def test_numpys_openblas_is_recognised():
    """This NumPy (its wheels bundle OpenBLAS, on pthreads) is recognised as built with
    OpenBLAS, and its library is among those whose count is set."""
    config = np.show_config(mode="dicts")
    if "openblas" not in str(config["Build Dependencies"]["blas"]["name"]).lower():
        pytest.skip("this NumPy is not built with OpenBLAS")
    libraries = _compat._openblas_libraries()
    if not libraries:
        pytest.skip("NumPy's OpenBLAS here does not keep a process-wide count (OpenMP)")
    assert _compat._numpy_blas_is_openblas()
    root = os.path.dirname(os.path.abspath(np.__file__))
    bundled = glob.glob(os.path.join(root + ".libs", "*openblas*"))
    bundled += glob.glob(os.path.join(root, ".dylibs", "*openblas*"))
    if bundled:  # (a wheel's own library is marked as NumPy's)
        assert any(own for _, _, own in libraries)


def test_large_decompositions_outside_lanes_or_of_torch_overlap(monkeypatch):
    """The turns are for NumPy's calls within lanes only: two threads of the caller's own
    decompose 25x25 NumPy matrices at once, and lanes of torch tensors (torch's LAPACK) too."""
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as xpt

    a = spd(np.random.default_rng(25), (4,), 25)

    def two_threads():
        t = threading.Thread(target=lambda: _compat.eigh(a, xp=xpn))
        t.start()
        _compat.eigh(a, xp=xpn)
        t.join()

    assert _overlaps("eigh", [two_threads], monkeypatch, expect_overlap=True) == [True, True]
    seen = []
    real = xpt.linalg.eigh

    def spy(x, *args, **kwargs):
        seen.append(_compat._numpy_lapack_lock.locked())
        return real(x, *args, **kwargs)

    monkeypatch.setattr(xpt.linalg, "eigh", spy)
    t = torch.asarray(a)
    _compat.in_lanes([lambda: _compat.eigh(t, xp=xpt), lambda: _compat.eigh(t, xp=xpt)])
    assert seen == [False, False]


def test_torch_autograd_is_not_split(split_everything, monkeypatch):
    """A torch tensor whose decomposition autograd records stays one call (the thread pool's
    threads would record nothing), and its gradient is torch's own; under ``no_grad`` the parts
    record no graph either."""
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as xpt

    monkeypatch.setattr(_compat, "LAPACK_THREADS", 2)
    a = torch.asarray(spd(np.random.default_rng(1), (6,), 3), requires_grad=True)
    calls = []
    monkeypatch.setattr(_compat, "_in_parallel", lambda *a, **k: calls.append(1))
    w, _ = _compat.eigh(a, xp=xpt)
    assert not calls and w.requires_grad
    w.sum().backward()  # d(tr A)/dA = I
    np.testing.assert_allclose(a.grad.numpy(), np.broadcast_to(np.eye(3), (6, 3, 3)), atol=1e-12)
    monkeypatch.undo()
    monkeypatch.setattr(_compat, "LAPACK_THREADS", 2)
    monkeypatch.setattr(_compat, "PARALLEL_MIN_BATCH", 2)
    with torch.no_grad():
        w, U = _compat.eigh(a, xp=xpt)
    assert not (w.requires_grad or U.requires_grad)


def test_errors_are_those_of_one_call(split_everything, monkeypatch):
    """When a part fails (on the pool or on this thread), every part has finished before the
    caller hears of it, and the caller gets the error of one call on the whole batch."""
    import time

    monkeypatch.setattr(_compat, "LAPACK_THREADS", 3)
    flat = np.zeros((9, 4, 4))  # (128 bytes a matrix: parts of exactly 3)
    finished, calls = [], []

    def fn(x):
        calls.append(x.shape[0])
        if x.shape[0] == 9:
            raise ValueError(f"one call on {x.shape[0]} matrices")
        if (x == 1.0).any():
            raise ValueError("part failed")
        time.sleep(0.05)  # (the other parts are still running when the bad one fails)
        finished.append(x.shape[0])
        return (x,)

    for bad in (0, 8):  # a part on the pool, the part on this thread
        finished.clear()
        calls.clear()
        flat[:] = 0.0
        flat[bad] = 1.0
        with pytest.raises(ValueError, match="one call on 9 matrices"):
            _compat._in_parallel(fn, flat, 3, xp=xpn)
        assert sorted(finished) == [3, 3] and sorted(calls) == [3, 3, 3, 9]


def test_torch_errors_name_the_callers_batch_index(split_everything, monkeypatch):
    """torch's error for a bad matrix names its index in the caller's batch, as one call does
    (a part's own index would be wrong)."""
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as xpt

    a = torch.asarray(spd(np.random.default_rng(2), (400,), 3))
    a[300] = float("nan")
    messages = []
    for threads in (1, 2):
        monkeypatch.setattr(_compat, "LAPACK_THREADS", threads)
        with pytest.raises(RuntimeError) as err:
            _compat.svd(a, xp=xpt)
        messages.append(str(err.value))
    assert messages[0] == messages[1] and "300" in messages[0]


def test_many_callers_at_once(split_everything, monkeypatch):
    """Threads of the caller's own decomposing at once, with batch sizes and thread counts that
    ask for different numbers of parts, all get one call's results (the shared pool is never
    replaced under a caller)."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(4)
    batches = [spd(rng, (n,), 4) for n in (2, 3, 5, 9, 17, 40)]
    want = [np.linalg.eigh(b) for b in batches]
    errors = []

    def work(k):
        for r in range(40):
            monkeypatch.setattr(_compat, "LAPACK_THREADS", 2 + (k + r) % 7)
            i = (k + r) % len(batches)
            w, U = _compat.eigh(batches[i], xp=xpn)
            if not (np.array_equal(w, want[i][0]) and np.array_equal(U, want[i][1])):
                errors.append(i)

    with ThreadPoolExecutor(6) as callers:
        list(callers.map(work, range(6)))
    assert not errors


def test_thread_count_setting_is_checked(monkeypatch):
    """A bad ``LAPACK_THREADS`` (``TRP_LAPACK_THREADS``) is an error that names it."""
    a = np.broadcast_to(np.eye(3), (1100, 3, 3))  # (3x3: split from 1,024)
    for bad in ("auto", "-1", 2.5):
        monkeypatch.setattr(_compat, "LAPACK_THREADS", bad)
        with pytest.raises(ValueError, match=r"TRP_LAPACK_THREADS.*non-negative integer"):
            _compat.eigh(a, xp=xpn)
    monkeypatch.setattr(_compat, "LAPACK_THREADS", "0")
    assert _compat._lapack_threads(a, xpn) >= 1


def test_decomposing_at_interpreter_exit():
    """At exit, when concurrent.futures' pools no longer take work, a decomposition still runs
    (its parts on the calling thread)."""
    import subprocess
    import sys

    code = (
        "import atexit, numpy as np, array_api_compat.numpy as xp\n"
        "from tr_projections import _compat\n"
        "_compat.LAPACK_THREADS = 2\n"
        "a = np.broadcast_to(np.eye(4) * 2.0, (512, 4, 4))\n"
        "_compat.eigh(a, xp=xp)\n"
        "atexit.register(lambda: print(float(_compat.eigh(a, xp=xp)[0].sum())))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) == 512 * 4 * 2.0


def _child(q):
    a = np.broadcast_to(np.eye(4) * 2.0, (64, 4, 4))
    w, _ = _compat.eigh(a, xp=xpn)
    q.put(float(w.sum()))


@pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="no fork on this platform"
)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # (JAX's warning)
def test_a_forked_child_gets_its_own_pool(split_everything, monkeypatch):
    """A child forked after the parent used the pool (whose threads the child does not have)
    makes a pool of its own instead of waiting forever on the parent's."""
    monkeypatch.setattr(_compat, "LAPACK_THREADS", 2)
    _compat.eigh(np.broadcast_to(np.eye(4), (64, 4, 4)), xp=xpn)  # the parent's pool
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q,))
    p.start()
    p.join(60)
    if p.is_alive():
        p.kill()
        pytest.fail("the forked child hung on the parent's thread pool")
    assert p.exitcode == 0
    assert q.get(timeout=5) == 64 * 4 * 2.0


@pytest.mark.parametrize(("method", "d"), [("kl", 4), ("wasserstein", 4), ("frobenius", 17)])
def test_projections_with_split_decompositions(method, d, monkeypatch):
    """Full-Gaussian projections and their gradients (torch and NumPy) are the same, bit for
    bit, with the decompositions, products and triangular solves split over threads as
    without (every product and solve split, at d = 17 too)."""
    torch = pytest.importorskip("torch")
    import tr_projections as trp

    monkeypatch.setattr(_compat, "MATMUL_PARALLEL_MIN_WORK", 1)
    monkeypatch.setattr(_compat, "TRSM_PARALLEL_MIN_BATCH", 1)
    monkeypatch.setattr(_compat, "PARALLEL_MIN_BATCH", 2)  # (d = 4: from 576 otherwise)
    # torch tensors on torch's kernels (conftest's _torch_kernels), their products on NumPy;
    # NumPy arrays through trp.vjp
    monkeypatch.setattr(_compat, "NUMPY_MATMUL_MIN_BATCH", 1)
    rng = np.random.default_rng(12)
    n = 300
    mean, scale, old_mean, old_scale = full_policies(rng, n, d)
    g = rng.standard_normal((n, d, d))

    def run():
        args = [torch.tensor(v, requires_grad=True) for v in (mean, scale, old_mean, old_scale)]
        out = trp.project(*args, method=method, eps_mean=0.05, eps_cov=0.05)
        (out.mean.sum() + (out.scale * torch.asarray(g)).sum()).backward()
        np_out, vjp = trp.vjp(
            trp.project, mean, scale, old_mean, old_scale,
            method=method, eps_mean=0.05, eps_cov=0.05,
        )  # fmt: skip
        return [t.detach().numpy() for t in [out.mean, out.scale] + [x.grad for x in args]] + [
            np_out.mean,
            np_out.scale,
            *vjp((np.ones((n, d)), g)),
        ]

    monkeypatch.setattr(_compat, "LAPACK_THREADS", 1)
    whole = run()
    monkeypatch.setattr(_compat, "LAPACK_THREADS", 3)
    parts = []
    original = _compat._in_parallel

    def spy(fn, flat, k, *, xp):
        parts.append(k)
        return original(fn, flat, k, xp=xp)

    monkeypatch.setattr(_compat, "_in_parallel", spy)
    lanes = _lanes(monkeypatch)
    for got, want in zip(run(), whole, strict=True):
        np.testing.assert_array_equal(got, want)
    assert (set(parts) == {3}) if method != "frobenius" else not parts  # (no decomposition)
    assert len(lanes) > len(parts)  # (products and solves split too)


def _layouts(rng, shape, m, k, dtype):
    a = rng.standard_normal((*shape, m, k)).astype(dtype)
    yield "contiguous", a
    yield "transposed", np.swapaxes(rng.standard_normal((*shape, k, m)).astype(dtype), -1, -2)
    yield "every other", rng.standard_normal((2 * shape[0], *shape[1:], m, k)).astype(dtype)[::2]


@pytest.mark.parametrize("name", ["numpy", "torch"])
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize(
    ("shape", "m", "k", "n", "dtype"),
    [((5,), 4, 4, 4, "float64"), ((1001,), 6, 6, 6, "float64"), ((4, 8), 5, 6, 4, "float32")],
)
def test_products_in_parts_equal_one_call(name, threads, shape, m, k, n, dtype, monkeypatch):
    """Batched products in parts of the first batch axis (``_compat.MATMUL_PARALLEL_MIN_WORK``)
    on several threads at once: the same output as one call, bit for bit, for contiguous,
    transposed (copied in blocks of rows) and strided factors; the parts run where the work is
    large enough."""
    ns, to, back = _namespace(name)
    rng = np.random.default_rng(3)
    b = rng.standard_normal((*shape, k, n)).astype(dtype)
    monkeypatch.setattr(_compat, "LAPACK_THREADS", threads)
    monkeypatch.setattr(_compat, "NUMPY_MATMUL_MIN_BATCH", 1)
    lanes = _lanes(monkeypatch)
    for (layout, a), copy_bytes in itertools.product(
        _layouts(rng, shape, m, k, dtype), (1, 1 << 20)
    ):
        want = np.matmul(a, b)
        # (the copies of a transposed factor: one row, or every row of a part, at a time)
        monkeypatch.setattr(_compat, "MATMUL_COPY_BYTES", copy_bytes)
        for least, split in ((0, False), (1, True)):
            monkeypatch.setattr(_compat, "MATMUL_PARALLEL_MIN_WORK", least)
            lanes.clear()
            got = back(_compat.matmul(to(a), to(b), xp=ns))
            np.testing.assert_array_equal(got, want, err_msg=layout)
            assert got.dtype == want.dtype
            assert (len(lanes) == 1 and lanes[0] >= 2) if split else not lanes, layout
    # Not split: complex factors, NumPy subclasses, and transposed factors of matrices larger
    # than _compat.MATMUL_COPY_MAX_D (copied, they would take a BLAS kernel that rounds
    # differently); contiguous ones up to NUMPY_MATMUL_MAX_D are.
    monkeypatch.setattr(_compat, "MATMUL_PARALLEL_MIN_WORK", 1)
    c = rng.standard_normal((8, 4, 4)) + 1j
    L12 = np.tril(rng.standard_normal((8, 12, 12)))
    for x, y, split in [
        (c, np.swapaxes(c, -1, -2), False),
        (np.ma.asarray(L12), L12, False),
        (L12, np.swapaxes(L12, -1, -2), False),
        (L12, L12, True),
    ]:
        lanes.clear()
        got = _compat.matmul(x, y, xp=xpn)
        np.testing.assert_array_equal(got, np.matmul(x, y))
        assert type(got) is type(np.matmul(x, y)) and bool(lanes) == split
    # (a shape mismatch: NumPy's own error, not one from a part)
    with pytest.raises(ValueError, match="matmul"):
        _compat.matmul(np.ones((4, 3, 2)), np.ones((4, 3, 2)), xp=xpn)


def test_products_of_numpy_arrays_in_a_lane_are_not_split_again(monkeypatch):
    monkeypatch.setattr(_compat, "LAPACK_THREADS", 2)
    monkeypatch.setattr(_compat, "MATMUL_PARALLEL_MIN_WORK", 1)
    a = np.random.default_rng(4).standard_normal((64, 3, 3))
    lanes = _lanes(monkeypatch)
    (got,) = _compat.in_lanes([lambda: _compat.matmul(a, a, xp=xpn)])
    np.testing.assert_array_equal(got, a @ a)
    assert lanes == [1]  # (the outer call only)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("lower", [True, False])
@pytest.mark.parametrize(
    ("shape", "d", "k"), [((8,), 6, 6), ((1001,), 6, 1), ((4, 4), 4, 2), ((64,), 17, 6)]
)
def test_torch_triangular_solves_in_parts_equal_one_call(threads, lower, shape, d, k, monkeypatch):
    """torch CPU triangular solves in parts (``_compat.TRSM_PARALLEL_MIN_BATCH``) on several
    threads at once: torch's result on the whole batch, bit for bit and in its layout (factors
    given as transposed views too; d = 17 with 6 right-hand sides, where torch's ``out=``
    variant would round differently); batches whose result torch differentiates, and dtypes
    that differ, take torch's one call."""
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as xpt

    rng = np.random.default_rng(5)
    L = torch.linalg.cholesky(torch.asarray(spd(rng, shape, d)))
    b = torch.asarray(rng.standard_normal((*shape, d, k)))
    monkeypatch.setattr(_compat, "LAPACK_THREADS", threads)
    monkeypatch.setattr(_compat, "TRSM_PARALLEL_MIN_BATCH", 1)
    lanes = _lanes(monkeypatch)
    for a in (L, L.mT.contiguous().mT):
        a = a if lower else a.mT
        want = torch.linalg.solve_triangular(a, b, upper=not lower)
        lanes.clear()
        got = _compat.solve_triangular(a, b, lower=lower, xp=xpt)
        assert torch.equal(got, want)
        layout = [  # (torch's layout: the strides of axes longer than 1)
            [st for st, m in zip(x.stride(), x.shape, strict=True) if m > 1] for x in (got, want)
        ]
        assert layout[0] == layout[1]
        assert len(lanes) == 1 and lanes[0] >= 2  # (parts start 64 bytes apart: maybe fewer)
    lanes.clear()
    a = L.clone().requires_grad_(True)
    x = _compat.solve_triangular(a, b, lower=True, xp=xpt)
    assert lanes == [] and x.requires_grad
    x.sum().backward()
    assert torch.isfinite(a.grad).all()
    lanes.clear()
    got = _compat.solve_triangular(L, b.float(), lower=True, xp=xpt)  # (torch promotes)
    assert torch.equal(got, torch.linalg.solve_triangular(L, b.float(), upper=False))
    assert lanes == []


def test_torch_triangular_solves_in_parts_for_every_size(monkeypatch):
    """Bit for bit with torch's whole call for d up to 32, 1 to d right-hand sides, both
    triangles and both float dtypes (the parts write into torch's own column-major layout)."""
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as xpt

    monkeypatch.setattr(_compat, "LAPACK_THREADS", 2)
    monkeypatch.setattr(_compat, "TRSM_PARALLEL_MIN_BATCH", 1)
    lanes = _lanes(monkeypatch)
    g = torch.Generator().manual_seed(6)
    for d, dtype in itertools.product((1, 5, 8, 16, 17, 32), (torch.float32, torch.float64)):
        A = torch.randn(203, d, d, dtype=dtype, generator=g).tril() + 3 * torch.eye(d, dtype=dtype)
        for k, lower in itertools.product(sorted({1, 2, 6, d}), (True, False)):
            a = A if lower else A.mT
            b = torch.randn(203, d, k, dtype=dtype, generator=g)
            lanes.clear()
            got = _compat.solve_triangular(a, b, lower=lower, xp=xpt)
            assert torch.equal(got, torch.linalg.solve_triangular(a, b, upper=not lower)), (d, k)
            assert lanes == [2], (d, k)  # (the solve split in two)


def test_torch_triangular_solves_of_broadcast_or_stepped_factors_run_whole(monkeypatch):
    """Factors that are neither row- nor column-major (a broadcast or stepped batch) are not
    split: torch copies them whole, but not a part that happens to be contiguous (a one-row
    part of a broadcast factor), whose bits would differ."""
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as xpt

    monkeypatch.setattr(_compat, "LAPACK_THREADS", 2)
    monkeypatch.setattr(_compat, "TRSM_PARALLEL_MIN_BATCH", 1)
    lanes = _lanes(monkeypatch)
    g = torch.Generator().manual_seed(7)
    A = torch.randn(18, 6, 6, dtype=torch.float64, generator=g).tril() + 3 * torch.eye(6)
    b = torch.randn(9, 6, 1, dtype=torch.float64, generator=g)
    for a in (A[0].expand(9, 6, 6), A[::2]):
        got = _compat.solve_triangular(a, b, lower=True, xp=xpt)
        assert torch.equal(got, torch.linalg.solve_triangular(a, b, upper=False))
    assert not lanes


def test_joined_keeps_parts_unlike_the_first():
    """A part unlike the first one written (another dtype, an array where it had None, one
    that cannot be written into) is joined as concatenation would join it, in row order."""
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as xpt

    x = np.arange(12.0).reshape(6, 2)
    joined = _compat.Joined(6, xp=xpn)
    joined.put(2, 4, (x[2:4], None))
    joined.put(4, 6, (x[4:6].astype(np.float32), None))
    joined.put(0, 2, (x[0:2], None))
    got, none = joined.result()
    assert none is None and got.dtype == np.float64
    np.testing.assert_array_equal(got, x)
    later = np.ma.masked_array(x[2:4], mask=[[True, False], [False, False]])
    masked = _compat.Joined(4, xp=xpn)
    masked.put(0, 2, (x[0:2],))
    masked.put(2, 4, (later,))
    (m,) = masked.result()
    want = np.concatenate([x[0:2], later])
    assert type(m) is type(want)
    np.testing.assert_array_equal(np.ma.getmaskarray(m), np.ma.getmaskarray(want))
    t = torch.arange(8.0).reshape(4, 2)
    grad = _compat.Joined(4, xp=xpt)
    grad.put(0, 2, (t[0:2],))
    grad.put(2, 4, (t[2:4].clone().requires_grad_(True),))
    (r,) = grad.result()
    assert r.requires_grad and torch.equal(r.detach(), t)
    mixed = _compat.Joined(4, xp=xpn)
    mixed.put(0, 2, (None,))
    mixed.put(2, 4, (x[2:4],))
    with pytest.raises((TypeError, ValueError)):
        mixed.result()
