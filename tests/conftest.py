"""Shared fixtures: one ``xp`` fixture over the installed backends.

Select backends with ``TRP_BACKENDS=numpy,torch`` (default: every usable one). Hypothesis
profiles: ``ci`` (default, fast) and ``long`` (``HYPOTHESIS_PROFILE=long``).
"""

from __future__ import annotations

import functools
import os

import pytest
from hypothesis import HealthCheck, settings

from tr_projections.testing import available_backends, get_backend

settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("TRP_EXAMPLES", "15")),
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "long",
    max_examples=int(os.environ.get("TRP_EXAMPLES", "500")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

BACKENDS = available_backends()


@pytest.fixture(autouse=True)
def _torch_kernels(request, monkeypatch):
    """Torch tensors run torch's own kernels in the tests: the NumPy route that small CPU
    batches take by default is compared with them in ``test_torch_route.py`` (marked
    ``numpy_route``), and the NumPy kernels themselves are the ``numpy`` backend's."""
    if request.node.get_closest_marker("numpy_route") is not None:
        return
    try:
        from tr_projections.backends import torch as adapter
    except ImportError:  # no torch installed
        return
    monkeypatch.setattr(adapter, "NUMPY_MAX_ELEMENTS", 0)


@pytest.fixture
def jax_op_by_op(monkeypatch):
    """Concrete JAX arrays run op by op (``tr_projections.backends.jax.EAGER_JIT`` off), for
    tests that watch the eager computation itself (rows gathered by value, spies on its
    stages): the compiled route traces each program once per shape and then reuses it, so
    neither would be seen there. The compiled route is ``test_jax_eager.py``'s."""
    try:
        from tr_projections.backends import jax as adapter
    except ImportError:  # no JAX installed
        return
    monkeypatch.setattr(adapter, "EAGER_JIT", False)


@pytest.fixture
def jax_traced_afresh(monkeypatch):
    """Concrete JAX arrays take the compiled route (the default) through new ``jax.jit``
    functions of the adapter's program bodies, which trace every program the test calls: spies
    on the computation's stages see it (a program is traced once per shapes and settings, and
    would run without them where an earlier test in the process met the same shapes). The
    adapter's own programs, and their caches, are put back after the test."""
    try:
        import jax

        from tr_projections.backends import jax as adapter
    except ImportError:  # no JAX installed
        return
    programs = [name for name in vars(adapter) if name.endswith("_jit")]  # (`_forward_jit`, ...)
    for name in programs:  # each `jax.jit(body, static_argnums=0)` of the body `name[:-4]`
        fresh = jax.jit(functools.partial(getattr(adapter, name[:-4])), static_argnums=0)
        monkeypatch.setattr(adapter, name, fresh)


@pytest.fixture(params=BACKENDS, scope="session")
def backend(request):
    """A :class:`tr_projections.testing.Backend` (namespace, converters) per usable library."""
    return get_backend(request.param)


@pytest.fixture(scope="session")
def xp(backend):
    """The array namespace of the backend under test."""
    return backend.xp


def pytest_sessionfinish(session):
    """Under pytest-xdist, each worker hands its worst values and counts to the controller."""
    output = getattr(session.config, "workeroutput", None)
    if output is not None:
        from _report import COUNTS, WORST

        output["trp_worst"] = [[check, dtype, value] for (check, dtype), value in WORST.items()]
        output["trp_counts"] = dict(COUNTS)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """pytest-xdist's controller: merge a finished worker's worst values and counts."""
    from _report import count, record

    output = getattr(node, "workeroutput", {})
    for check, dtype, value in output.get("trp_worst", []):
        record(check, dtype, value)
    for check, n in output.get("trp_counts", {}).items():
        count(check, n)


def pytest_terminal_summary(terminalreporter):
    """Print the worst measured values and example counts of the property tests."""
    from _report import COUNTS, WORST

    if not WORST and not COUNTS:
        return
    tr = terminalreporter
    tr.section("tr_projections: worst measured values")
    for (check, dtype), value in sorted(WORST.items()):
        tr.write_line(f"{check:<40} {dtype:<8} {value: .3e}")
    for name, n in sorted(COUNTS.items()):
        tr.write_line(f"{name:<49} {n}")
