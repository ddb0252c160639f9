"""The one switch of the package: whether input *values* are checked.

Checks on shapes, dtypes, devices, libraries and Python-number bounds are free and always run.
Checks on values (non-finite entries, non-positive standard deviations or Cholesky diagonals,
non-triangular Cholesky factors, bound arrays that are not positive) read the arrays: a few
reductions and one device-to-host synchronisation per call. They run by default on eager arrays;
turn them off for speed, process-wide or for a block of code:

>>> import tr_projections as trp
>>> trp.checks_enabled()
True
>>> with trp.checks(False):
...     trp.checks_enabled()
False
>>> previous = trp.set_checks(False)   # process-wide; returns the previous setting
>>> _ = trp.set_checks(previous)

The process-wide default can also be set before import with the environment variable
``TRP_CHECKS=0`` (``1`` to enable; any other value is an error). :func:`checks` overrides the
process-wide setting in the current thread or asyncio task only (it is a
:class:`contextvars.ContextVar`), so it is safe with threads and nests.

Under tracing (``jax.jit``, ``torch.compile``) values cannot be read, and value checks are
skipped whatever the switch says; the values of an eager ``jax.grad``'s or ``jax.vmap``'s tracers
and of ``torch.func`` transforms' tensors are read and checked; see ``docs/robustness.md``.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
from collections.abc import Iterator

__all__ = ["checks", "checks_enabled", "set_checks"]

_ENV = "TRP_CHECKS"


def flag(value: object) -> bool | None:
    """A switch's value as a bool: ``True``/``False``, or text ``1``/``0``, ``true``/``false``,
    ``yes``/``no``, ``on``/``off`` (any case, spaces around); ``None`` for anything else (the
    caller's error names its switch)."""
    if isinstance(value, bool):
        return value
    raw = str(value).strip().lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    return None


def _from_env() -> bool:
    raw = os.environ.get(_ENV, "1").strip().lower()
    enabled = True if raw == "" else flag(raw)
    if enabled is None:
        raise ValueError(f"environment variable {_ENV} must be 0 or 1, got {raw!r}")
    return enabled


_GLOBAL = [_from_env()]
#: Per-thread/task override set by :func:`checks`; ``None`` means "use the process-wide value".
_OVERRIDE: contextvars.ContextVar[bool | None] = contextvars.ContextVar(
    "tr_projections_checks", default=None
)


def checks_enabled() -> bool:
    """Whether value checks run for eager arrays in the current context."""
    override = _OVERRIDE.get()
    return _GLOBAL[0] if override is None else override


def torch_compiling() -> bool:
    """Whether ``torch.compile`` (dynamo) is tracing the caller now (``False`` where torch has
    not been imported: this does not import it). Under tracing, the package reads no
    :class:`~contextvars.ContextVar`: dynamo cannot trace one, and would break the graph.

    ``torch.compiler.is_dynamo_compiling``, not ``is_compiling``: the latter is one flag for the
    whole process while a compilation runs (torch 2.13), so another thread's eager calls would
    read ``True`` and skip their value checks; the former is ``False`` eagerly and ``True`` in
    dynamo's trace only."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    compiler = torch.compiler
    return bool(getattr(compiler, "is_dynamo_compiling", compiler.is_compiling)())


def checks_to_run() -> bool:
    """:func:`checks_enabled`, but ``False`` while ``torch.compile`` traces, where no value can
    be read. For the package's own checks."""
    if torch_compiling():
        return False
    return checks_enabled()


def set_checks(enabled: bool) -> bool:
    """Turn value checks on or off process-wide; returns the previous process-wide setting.

    A :func:`checks` block that is active in the current context still takes precedence.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"`enabled` must be True or False, got {enabled!r}")
    previous = _GLOBAL[0]
    _GLOBAL[0] = enabled
    return previous


@contextlib.contextmanager
def checks(enabled: bool = True) -> Iterator[None]:
    """Turn value checks on or off inside a ``with`` block (current thread or task only).

    Examples
    --------
    >>> import numpy as np, tr_projections as trp
    >>> with trp.checks(False):   # hot loop: trust the inputs
    ...     out = trp.project_kl(np.zeros(2), np.ones(2), np.zeros(2), np.ones(2),
    ...                          eps_mean=0.1, eps_cov=0.1)
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"`enabled` must be True or False, got {enabled!r}")
    token = _OVERRIDE.set(enabled)
    try:
        yield
    finally:
        _OVERRIDE.reset(token)
