"""Float64 NumPy references for the robustness and fuzz tests, accurate at the extremes.

``tr_projections.testing.invariants.reference_distances`` is the general reference; these differ
where the extremes need it: no Cholesky of a covariance (which fails for nearly singular ones),
and a KL covariance part that stays accurate when the new covariance is much smaller than the
old one (there the eigenvalues y of M M^T - I are close to -1 and log1p(y) loses about 1e-4).
"""

from __future__ import annotations

import numpy as np


def _f64(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu()
    return np.array(np.asarray(x), dtype=np.float64, copy=True)


def kl_cov_reference(scale, old_scale, full: bool) -> np.ndarray:
    """KL covariance part, accurate at both ends: the trace/log-determinant form (log-determinant
    from the diagonals) where the divergence exceeds 1, the eigenvalues of M M^T - I
    (M = L_o^{-1} L) where it is small."""
    scale, old_scale = _f64(scale), _f64(old_scale)
    if not full:
        log_r = np.log(scale) - np.log(old_scale)
        mu = np.exp(2 * log_r)
        y = np.expm1(2 * log_r)
        return 0.5 * np.sum(np.where(mu < 0.5, mu - 1 - 2 * log_r, y - np.log1p(y)), -1)
    d = scale.shape[-1]
    scale, old_scale = np.broadcast_arrays(np.tril(scale), np.tril(old_scale))
    M = np.linalg.solve(old_scale, scale)
    log_r = np.log(np.diagonal(scale, 0, -2, -1)) - np.log(np.diagonal(old_scale, 0, -2, -1))
    with np.errstate(over="ignore", invalid="ignore"):
        big = 0.5 * (np.sum(M * M, axis=(-2, -1)) - d - 2 * np.sum(log_r, -1))
        y = np.linalg.eigvalsh(M @ np.swapaxes(M, -1, -2) - np.eye(d))
        small = 0.5 * np.sum(y - np.log1p(np.maximum(y, -1 + 1e-300)), -1)
    return np.where(big > 1.0, big, small)


def root_of_factor(scale: np.ndarray) -> np.ndarray:
    """Symmetric root of L L^T from the singular values of L: relative error about
    sqrt(kappa) eps in its small directions, where the eigenvalues of L L^T would carry kappa eps
    (which alone shows up as a 3e-9 bound excess at condition number 1e6)."""
    u, s, _ = np.linalg.svd(np.tril(scale))
    return (u * s[..., None, :]) @ np.swapaxes(u, -1, -2)


def reference_parts(
    method: str, new, old, *, full: bool, scale_prec: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """``(mean_part, cov_part)`` of ``d(new, old)`` in float64, without any Cholesky."""
    m, s = _f64(new[0]), _f64(new[1])
    mo, so = _f64(old[0]), _f64(old[1])
    d = m.shape[-1]
    delta = m - mo
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if method == "kl" or scale_prec:
            if full:
                lo = np.tril(so)
                batch = np.broadcast_shapes(delta.shape[:-1], lo.shape[:-2])
                z = np.linalg.solve(
                    np.broadcast_to(lo, batch + (d, d)),
                    np.broadcast_to(delta, batch + (d,))[..., None],
                )[..., 0]
            else:
                z = delta / so
            mean_part = np.sum(z * z, axis=-1)
        else:
            mean_part = np.sum(delta * delta, axis=-1)
        if method == "kl":
            return 0.5 * mean_part, kl_cov_reference(s, so, full)
        if full:
            cov, cov_o = (np.tril(x) @ np.swapaxes(np.tril(x), -1, -2) for x in (s, so))
        else:
            cov, cov_o = s * s, so * so
        if method == "frobenius":
            diff = cov - cov_o
            return mean_part, np.sum(diff * diff, axis=(-2, -1) if full else -1)
        if method == "wasserstein":
            if not full:
                diff = (s - so) / so if scale_prec else s - so
                return mean_part, np.sum(diff * diff, axis=-1)
            S, So = root_of_factor(s), root_of_factor(so)
            diff = S - So
            if scale_prec:
                batch = np.broadcast_shapes(So.shape[:-2], diff.shape[:-2])
                diff = np.linalg.solve(
                    np.broadcast_to(So, batch + (d, d)), np.broadcast_to(diff, batch + (d, d))
                )
            return mean_part, np.sum(diff * diff, axis=(-2, -1))
    raise ValueError(f"unknown method {method!r}")


def _inv_norm(lo: np.ndarray, full: bool) -> np.ndarray:
    """||L_o^{-1}||_2 per state (1 / smallest std for diagonals)."""
    if not full:
        return 1.0 / np.min(lo, axis=-1)
    return 1.0 / np.linalg.svd(np.tril(lo), compute_uv=False)[..., -1]


def rounding_margins(
    method: str, out, old, eps_mean, eps_cov, *, full: bool, scale_prec: bool, dtype: str
) -> tuple[np.ndarray, np.ndarray]:
    """Relative excess of ``(mean_part, cov_part)`` that rounding in ``dtype`` alone can cause:
    how close to its bound a distance can be guaranteed (and measured) at all.

    A bound eps on a squared distance is a radius sqrt(eps) in the part's chart. The chart point
    of the output is only known to about delta = 4 u size (u the unit roundoff, size that of the
    chart, after whitening where the distance is whitened: kappa(L_o) for means, kappa(Sigma_o)
    for charts computed from a covariance), so the distance is only known to
    (sqrt(eps) + delta)^2 - eps, i.e. 2 r + r^2 relative with r = delta / sqrt(eps). Where this
    exceeds the dtype's tolerance, neither the projection nor the reference can resolve the
    bound any better.
    """
    u = float(np.finfo(dtype).eps)
    m, s = _f64(out[0]), _f64(out[1])
    mo, so = _f64(old[0]), _f64(old[1])
    with np.errstate(all="ignore"):
        size_m = np.maximum(np.max(np.abs(m), axis=-1), np.max(np.abs(mo), axis=-1))
        whiten = _inv_norm(so, full) if (method == "kl" or scale_prec) else 1.0
        radius_m = np.sqrt(2.0 * eps_mean if method == "kl" else eps_mean)
        r_m = 4.0 * u * size_m * whiten / radius_m
        axes = (-2, -1) if full else -1
        size = np.maximum(np.max(np.abs(s), axis=axes), np.max(np.abs(so), axis=axes))
        inv = _inv_norm(so, full)
        d = s.shape[-1]
        if method == "frobenius":
            r_c = 4.0 * u * d * size * size / np.sqrt(eps_cov)
        elif method == "wasserstein":
            if not full:
                r_c = 4.0 * u * size * (inv if scale_prec else 1.0) / np.sqrt(eps_cov)
            else:  # roots from an eigh of L L^T: errors of u ||Sigma|| / s_min in S
                r_c = 4.0 * u * d * size * size * inv * (inv if scale_prec else 1.0)
                r_c = r_c / np.sqrt(eps_cov)
        else:  # the whitened precision chart L_o^{-1} Sigma L_o^{-T}
            r_c = 4.0 * u * d * (size * inv) ** 2 / np.sqrt(2.0 * eps_cov)
    return 2.0 * r_m + r_m * r_m, 2.0 * r_c + r_c * r_c
