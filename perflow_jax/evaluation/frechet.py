"""The Fréchet distance between Gaussians fitted to two feature sets (FID when the features are Inception's).

  d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})

pytorch-fid computes (S1 S2)^{1/2} with ``scipy.linalg.sqrtm`` of the non-symmetric product, retries with
1e-6 added to the diagonals when that is not finite, and drops a small imaginary part. Only its trace is
needed, and for symmetric PSD S1 = A^2 the product S1 S2 = A (A S2) has the same eigenvalues as the symmetric
PSD matrix A S2 A. So here Tr (S1 S2)^{1/2} = sum_i sqrt(lambda_i(A S2 A)), computed with ``eigh`` only: always
real, no NaN for singular or near-singular covariances (fewer samples than dimensions, dead features), and equal
to the sqrtm route wherever that one is well defined. Everything is float64.
"""

from __future__ import annotations

import numpy as np


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean and covariance of features [N, D] (N >= 2): (mu [D], sigma [D, D]), float64, ddof=1 as pytorch-fid."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2:
    raise ValueError(f"features must be [N, D], got shape {features.shape}")
  if features.shape[0] < 2:
    raise ValueError(f"a covariance needs at least 2 feature vectors, got {features.shape[0]}")
  if not np.isfinite(features).all():
    raise ValueError("features contain NaN or infinity")
  mu = features.mean(axis=0)
  sigma = np.atleast_2d(np.cov(features, rowvar=False, ddof=1))
  return mu, sigma


def _check_stats(mu: np.ndarray, sigma: np.ndarray, which: str) -> tuple[np.ndarray, np.ndarray]:
  mu = np.atleast_1d(np.asarray(mu, np.float64))
  sigma = np.atleast_2d(np.asarray(sigma, np.float64))
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(f"statistics {which}: mean {mu.shape} and covariance {sigma.shape} do not fit ([D], [D, D])")
  if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
    raise ValueError(f"statistics {which} contain NaN or infinity")
  # Symmetrise: a covariance read from float32 or summed in another order is symmetric only up to rounding.
  return mu, (sigma + sigma.T) / 2


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
  """The symmetric square root of a symmetric matrix, negative (rounding-error) eigenvalues taken as 0."""
  w, v = np.linalg.eigh(sigma)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  """Tr (sigma1 sigma2)^{1/2} for symmetric PSD [D, D] matrices, via the eigenvalues of A sigma2 A, A^2 = sigma1."""
  a = _psd_sqrt(sigma1)
  m = a @ sigma2 @ a
  eig = np.linalg.eigvalsh((m + m.T) / 2)
  return float(np.sqrt(np.clip(eig, 0.0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
  """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2}) in float64, for [D] means and [D, D] covs.

  Clipped at 0: the exact value is never negative, and identical statistics can otherwise give -1e-12.
  """
  mu1, sigma1 = _check_stats(mu1, sigma1, "1")
  mu2, sigma2 = _check_stats(mu2, sigma2, "2")
  if mu1.shape != mu2.shape:
    raise ValueError(f"the two statistics have different feature sizes: {mu1.shape[0]} and {mu2.shape[0]}")
  diff = mu1 - mu2
  d = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)
  return float(max(d, 0.0))


def frechet_distance_features(features1: np.ndarray, features2: np.ndarray) -> float:
  """The Fréchet distance between the Gaussians fitted to features [N1, D] and [N2, D]."""
  return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))
