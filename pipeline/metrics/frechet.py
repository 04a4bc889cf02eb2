"""Fréchet distance between Gaussians fitted to two feature sets, in float64 (FID, FVD).

    d² = |mu1 - mu2|² + tr(S1) + tr(S2) - 2 tr((S1 S2)^½)

The trace of the matrix square root is computed as tr((R S2 R)^½) with R = S1^½ (the symmetric
PSD root): R S2 R is similar to S1 S2, symmetric and PSD, so its square root comes from a
symmetric eigendecomposition. Unlike scipy's `sqrtm(S1 @ S2)` (pytorch-fid), this never produces
complex parts or needs an eps offset for the rank-deficient covariances of small sample sets,
and it agrees with it whenever that is well defined (the TF-GAN / FVD reference uses this form).
"""

from __future__ import annotations

import numpy as np


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean float64 [D] and unbiased covariance float64 [D, D] of features [N, D] (N >= 2), as pytorch-fid."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be [N, D] with N >= 2 samples, got shape {features.shape}")
    if not np.isfinite(features).all():
        raise ValueError("features contain NaN or inf")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _psd_eigh(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues and vectors of a symmetric PSD matrix; eigenvalues below the rounding level
    (dim * eps * largest) are set to 0, since their square roots would be pure noise of ~sqrt(eps)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    floor = len(values) * np.finfo(np.float64).eps * max(float(values.max(initial=0.0)), 0.0)
    return np.where(values > floor, values, 0.0), vectors


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2), float64."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    dim = mu1.shape[0]
    if mu1.shape != (dim,) or mu2.shape != (dim,) or sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(f"shapes do not match: mu {mu1.shape}, {mu2.shape}; sigma {sigma1.shape}, {sigma2.shape}")
    values, vectors = _psd_eigh(sigma1)
    root = (vectors * np.sqrt(values)) @ vectors.T  # sigma1^(1/2)
    trace_sqrt = np.sqrt(_psd_eigh(root @ sigma2 @ root)[0]).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def feature_distance(features1: np.ndarray, features2: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to features [N1, D] and [N2, D] (FID / FVD from features)."""
    return frechet_distance(*gaussian_stats(features1), *gaussian_stats(features2))
