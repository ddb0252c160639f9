"""Public tools to validate trust-region projections in your own pipeline.

* :mod:`~tr_projections.testing.strategies`: hypothesis strategies for Gaussians with controlled
  condition numbers (needs ``hypothesis``);
* :mod:`~tr_projections.testing.invariants`: checks that raise ``AssertionError`` when a
  projection breaks one of its guarantees, with tolerances by dtype in :data:`TOLERANCES`;
* :func:`available_backends` / :func:`get_backend`: the array libraries usable here.

Nothing here is imported by ``import tr_projections``.
"""

from __future__ import annotations

from ._backends import BACKEND_NAMES, Backend, available_backends, get_backend

__all__ = ["BACKEND_NAMES", "Backend", "available_backends", "get_backend"]
