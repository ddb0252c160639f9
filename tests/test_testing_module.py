"""The public validation helpers of ``tr_projections.testing``: their checks pass on correct
projections and fail on wrong ones, whatever the libraries, dtypes and data users give them."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tr_projections as trp
from tr_projections.testing import invariants as inv
from tr_projections.testing.strategies import policy_pairs

METHODS = ["kl", "frobenius", "wasserstein"]


@pytest.mark.parametrize("method", METHODS)
def test_interpolation_check_passes_at_zero_means(method):
    """Zero new and old means (a zero-initialised mean head) come back zero: the mean part's
    residual is 0, not 0/0 (which failed every check); a nonzero output there still fails."""
    mean = old_mean = np.zeros((2, 3))
    scale, old_scale = np.full((2, 3), 2.0), np.ones((2, 3))
    kw = dict(full=False, eps_mean=0.1, eps_cov=0.01, dtype="float64")
    out = trp.project(mean, scale, old_mean, old_scale, method=method, eps_mean=0.1, eps_cov=0.01)
    rep = inv.check_interpolation(method, (mean, scale), (old_mean, old_scale), out, **kw)
    assert rep.worst_residual == 0.0 or rep.worst_residual < 1e-12
    moved = trp.Gaussian(out.mean + 1e-3, out.scale)
    with pytest.raises(AssertionError, match="mean part is not a one-weight interpolation"):
        inv.check_interpolation(method, (mean, scale), (old_mean, old_scale), moved, **kw)


def test_tolerance_takes_every_librarys_dtypes():
    want64, want32 = inv.TOLERANCES["float64"], inv.TOLERANCES["float32"]
    dtypes = [np.float64, np.dtype("float64"), "float64"]
    for name in ("torch", "jax.numpy", "array_api_strict"):
        lib = pytest.importorskip(name)
        dtypes.append(lib.float64)
    assert all(inv.tolerance(t) is want64 for t in dtypes)
    assert inv.tolerance(np.float32) is want32
    with pytest.raises(ValueError, match="no tolerance stated for dtype"):
        inv.tolerance(np.float16)


@settings(max_examples=25)
@given(st.data(), st.sampled_from([1.0, 1e4]))
def test_diagonal_pairs_have_the_condition_number_asked_for(data, max_cond):
    """Diagonal old covariances' condition numbers lie in [1, max_cond] (exactly 1 for
    ``max_cond = 1``, where the strategy drew up to e**2 whatever ``max_cond`` was)."""
    pair = data.draw(policy_pairs(kind="diag", dims=(2, 5), max_cond=max_cond))
    var = pair.old.scale**2
    cond = var.max(axis=-1) / var.min(axis=-1)
    assert np.all(cond <= max_cond * (1 + 1e-9))


def test_diagonal_pairs_span_wide_conditioning():
    seen = []

    @settings(max_examples=40, derandomize=True)
    @given(policy_pairs(kind="diag", dims=(3, 3), max_cond=1e6, shared_old=True))
    def run(pair):
        var = pair.old.scale**2
        seen.append(var.max() / var.min())

    run()
    assert max(seen) > 1e3


def test_metadata_check_accepts_a_parameter_and_refuses_another_library():
    torch = pytest.importorskip("torch")
    m = torch.nn.Parameter(torch.zeros(3, 2, dtype=torch.float64))
    s = torch.ones(3, 2, dtype=torch.float64)
    out = trp.project_kl(m, s, m.detach() + 1, s, eps_mean=0.1, eps_cov=0.1)
    inv.check_metadata(out, m, shapes=[(3, 2), (3, 2)])
    with pytest.raises(AssertionError, match="expected an array of torch"):
        inv.check_metadata([x.detach().numpy() for x in out], m, shapes=[(3, 2), (3, 2)])


@pytest.mark.parametrize(
    ("kind", "damage"), [("diag", "negated"), ("full", "negated"), ("full", "upper")]
)
def test_checks_refuse_outputs_that_are_not_scales(kind, damage):
    """A negated factor or garbage above the diagonal gives a valid-looking covariance; the
    checks refuse such outputs instead of passing them."""
    full = kind == "full"
    old_mean, mean = np.zeros(2), np.full(2, 0.9)
    old_scale = np.eye(2) if full else np.ones(2)
    scale = 2.0 * old_scale
    kw = dict(eps_mean=0.1, eps_cov=0.1)
    out = trp.project_kl(mean, scale, old_mean, old_scale, **kw)
    bad = -out.scale if damage == "negated" else out.scale + 7.0 * np.triu(np.ones((2, 2)), 1)
    bad = trp.Gaussian(out.mean, bad)
    inv.check_bounds("kl", out, (old_mean, old_scale), full=full, dtype="float64", **kw)
    match = "not lower triangular" if damage == "upper" else "not positive"
    with pytest.raises(AssertionError, match=match):
        inv.check_bounds("kl", bad, (old_mean, old_scale), full=full, dtype="float64", **kw)
    with pytest.raises(AssertionError, match=match):
        inv.check_interpolation(
            "kl", (mean, scale), (old_mean, old_scale), bad, full=full, dtype="float64", **kw
        )
