"""Fréchet Inception Distance, with the attribute classifier's features in place of Inception's.

FID (Heusel et al. 2017, eq. 6) is the Fréchet distance between Gaussians fitted to the
features of real and generated images:

    d² = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^½)

Σ₁Σ₂ is not symmetric, so instead of a general matrix square root (scipy's ``sqrtm``, used by
the reference implementation and by our test as the oracle) we use that Σ₁Σ₂ is similar to the
symmetric positive semi-definite M = Σ₁^½ Σ₂ Σ₁^½, so Tr((Σ₁Σ₂)^½) = Σᵢ √λᵢ(M): two symmetric
eigendecompositions in float64, numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GaussianStats:
    """Mean (d,) and covariance (d, d) of n feature vectors, in float64."""

    mean: np.ndarray
    cov: np.ndarray
    n: int


def gaussian_stats(features: np.ndarray) -> GaussianStats:
    """Fits a Gaussian to (n, d) features: the sample mean and the unbiased covariance."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need (n, d) features with n ≥ 2, got shape {x.shape}")
    return GaussianStats(x.mean(0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1]), len(x))


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    """The square root of a symmetric PSD matrix; eigenvalues that rounding made negative are 0."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
    """‖μ₁ − μ₂‖² + Tr(Σ₁) + Tr(Σ₂) − 2 Tr((Σ₁Σ₂)^½), the last term as Σ √λ(Σ₁^½ Σ₂ Σ₁^½)."""
    if a.mean.shape != b.mean.shape:
        raise ValueError(f"feature sizes differ: {a.mean.shape} and {b.mean.shape}")
    root = _psd_sqrt(a.cov)
    m = root @ b.cov @ root
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = a.mean - b.mean
    d = float(diff @ diff + np.trace(a.cov) + np.trace(b.cov) - 2 * trace_sqrt)
    # A true distance is never negative; what rounding leaves below 0 is 0.
    return max(d, 0.0)


def fid(real_features: np.ndarray, generated_features: np.ndarray) -> float:
    return frechet_distance(gaussian_stats(real_features), gaussian_stats(generated_features))
