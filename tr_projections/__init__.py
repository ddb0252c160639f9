"""tr_projections: exact, batched, differentiable trust-region projections for Gaussian policies.

Written once against the Python array API standard: pass NumPy, PyTorch, CuPy, JAX or
array-api-strict arrays and get arrays of the same library, dtype and device back. Importing this
package imports no array framework.

>>> import numpy as np, tr_projections as trp
>>> out = trp.project_kl(np.ones(3), np.full(3, 2.0), np.zeros(3), np.ones(3),
...                      eps_mean=0.05, eps_cov=0.01)
>>> type(out.mean).__name__, out.scale.shape
('ndarray', (3,))
"""

from __future__ import annotations

from ._config import checks, checks_enabled, set_checks
from .backends import vjp
from .distances import DistanceParts, frobenius, kl, wasserstein
from .gaussian import Gaussian, entropy
from .losses import trust_region_loss
from .projections import (
    METHODS,
    project,
    project_entropy,
    project_frobenius,
    project_kl,
    project_wasserstein,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "METHODS",
    "DistanceParts",
    "Gaussian",
    "__version__",
    "checks",
    "checks_enabled",
    "entropy",
    "frobenius",
    "kl",
    "project",
    "project_entropy",
    "project_frobenius",
    "project_kl",
    "project_wasserstein",
    "set_checks",
    "trust_region_loss",
    "vjp",
    "wasserstein",
]
