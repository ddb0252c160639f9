"""The array libraries a test suite can run on, found without importing any that is missing."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["BACKEND_NAMES", "Backend", "available_backends", "get_backend"]

#: Every backend the suite knows, in the order tests are parametrised.
BACKEND_NAMES = ("numpy", "array_api_strict", "torch", "jax", "cupy", "torch_cuda")


@dataclass(frozen=True)
class Backend:
    """One array library (and device) under test.

    ``asarray(np_array)`` converts float64 NumPy data (keeping its dtype) onto the backend;
    ``to_numpy(x)`` brings a result back for comparison with a NumPy reference.
    """

    name: str
    xp: Any
    asarray: Callable[[np.ndarray], Any]
    to_numpy: Callable[[Any], np.ndarray]

    def __repr__(self) -> str:  # shows up in pytest ids
        return self.name


def _numpy() -> Backend:
    import array_api_compat.numpy as xp

    return Backend("numpy", xp, lambda a: np.array(a, copy=True), np.asarray)


def _strict() -> Backend:
    import array_api_strict as xp

    return Backend("array_api_strict", xp, lambda a: xp.asarray(np.array(a, copy=True)), np.asarray)


def _torch(device: str = "cpu") -> Backend:
    import array_api_compat.torch as xp
    import torch

    def to_numpy(x: Any) -> np.ndarray:
        return x.detach().cpu().numpy()

    name = "torch" if device == "cpu" else "torch_cuda"
    return Backend(name, xp, lambda a: torch.asarray(np.array(a), device=device), to_numpy)


def _jax() -> Backend:
    import jax

    jax.config.update("jax_enable_x64", True)  # float64 would silently become float32 otherwise
    import jax.numpy as jnp

    return Backend("jax", jnp, lambda a: jnp.asarray(a), np.asarray)


def _cupy() -> Backend:
    import array_api_compat.cupy as xp
    import cupy

    return Backend("cupy", xp, lambda a: cupy.asarray(a), cupy.asnumpy)


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _usable(name: str) -> bool:
    if name == "numpy":
        return True
    if name == "array_api_strict":
        return _installed("array_api_strict")
    if name == "torch":
        return _installed("torch")
    if name == "jax":
        return _installed("jax")
    if name == "cupy":
        if not _installed("cupy"):
            return False
        import cupy

        return bool(cupy.is_available())
    if name == "torch_cuda":
        if not _installed("torch"):
            return False
        import torch

        return bool(torch.cuda.is_available())
    raise ValueError(f"unknown backend {name!r}; known: {BACKEND_NAMES}")


_FACTORIES: dict[str, Callable[[], Backend]] = {
    "numpy": _numpy,
    "array_api_strict": _strict,
    "torch": _torch,
    "jax": _jax,
    "cupy": _cupy,
    "torch_cuda": lambda: _torch("cuda"),
}


def get_backend(name: str) -> Backend:
    """The backend called ``name`` (imports its library).

    ``"jax"`` turns on JAX's ``jax_enable_x64`` for the whole process, since the backends carry
    float64 data (without it JAX silently makes float64 arrays float32): from then on JAX's
    default float dtype is float64 in that process, for code outside the tests too.
    """
    if name not in _FACTORIES:
        raise ValueError(f"unknown backend {name!r}; known: {BACKEND_NAMES}")
    return _FACTORIES[name]()


def available_backends(names: str | None = None) -> list[str]:
    """Names of the usable backends, optionally restricted.

    ``names`` is a comma-separated list (default: the environment variable ``TRP_BACKENDS``, else
    every known backend); names that are not usable here are dropped. CuPy counts only when
    ``cupy.is_available()``, torch_cuda only when ``torch.cuda.is_available()``.
    """
    if names is None:
        names = os.environ.get("TRP_BACKENDS", "")
    wanted = [n.strip() for n in names.split(",") if n.strip()] or list(BACKEND_NAMES)
    return [n for n in wanted if _usable(n)]
