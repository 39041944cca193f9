"""Fréchet distance: closed forms, symmetry, agreement with scipy's sqrtm, and (near-)singular covariances."""

from absl.testing import absltest
import numpy as np
import scipy.linalg

from perflow_jax.evaluation import frechet


def _random_cov(rng, d, rank=None):
  """A random PSD [d, d] covariance of the given rank (full by default)."""
  x = rng.normal(size=(d, rank or d))
  return x @ x.T / (rank or d)


def _scipy_frechet(mu1, s1, mu2, s2):
  """The direct computation: the principal sqrtm of the (non-symmetric) product, as pytorch-fid does."""
  covmean = scipy.linalg.sqrtm(s1 @ s2)
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


class FrechetTest(absltest.TestCase):

  def test_diagonal_closed_form(self):
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.1, 3.0, 16), rng.uniform(0.1, 3.0, 16)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    want = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2) + np.sum((mu1 - mu2) ** 2)
    got = frechet.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    np.testing.assert_allclose(got, want, rtol=1e-12)

  def test_identical_statistics_give_zero(self):
    rng = np.random.default_rng(1)
    mu, sigma = rng.normal(size=32), _random_cov(rng, 32)
    self.assertAlmostEqual(frechet.frechet_distance(mu, sigma, mu, sigma), 0.0, places=9)

  def test_symmetric_and_matches_scipy(self):
    rng = np.random.default_rng(2)
    for d in (1, 5, 64):
      mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
      s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
      d12 = frechet.frechet_distance(mu1, s1, mu2, s2)
      d21 = frechet.frechet_distance(mu2, s2, mu1, s1)
      self.assertIsInstance(d12, float)
      np.testing.assert_allclose(d12, d21, rtol=1e-10)
      np.testing.assert_allclose(d12, _scipy_frechet(mu1, s1, mu2, s2), rtol=1e-8)

  def test_statistics_match_numpy(self):
    rng = np.random.default_rng(3)
    feats = rng.normal(size=(50, 7)).astype(np.float32)
    mu, sigma = frechet.feature_statistics(feats)
    self.assertEqual((mu.dtype, sigma.dtype, sigma.shape), (np.float64, np.float64, (7, 7)))
    np.testing.assert_allclose(mu, feats.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(feats.astype(np.float64).T, ddof=1), rtol=1e-12)
    # The feature-level helper is the same distance.
    other = rng.normal(0.5, 1.0, size=(40, 7))
    np.testing.assert_allclose(frechet.frechet_distance_features(feats, other),
                               frechet.frechet_distance(mu, sigma, *frechet.feature_statistics(other)))

  def test_singular_covariances_are_finite(self):
    rng = np.random.default_rng(4)
    d = 64
    # Fewer samples than dimensions (rank 10 and 20), one exactly zero feature, and a tiny jitter: the
    # product's sqrtm is ill-conditioned, but the distance must stay a finite real number.
    f1, f2 = rng.normal(size=(11, d)), rng.normal(size=(21, d))
    f1[:, 0] = 0.0
    f2[:, 0] = 0.0
    mu1, s1 = frechet.feature_statistics(f1)
    mu2, s2 = frechet.feature_statistics(f2)
    dist = frechet.frechet_distance(mu1, s1, mu2, s2)
    self.assertTrue(np.isfinite(dist))
    self.assertGreater(dist, 0.0)
    # Agrees with pytorch-fid's fallback (1e-6 on the diagonal) to that offset's order.
    eps = 1e-6 * np.eye(d)
    np.testing.assert_allclose(dist, _scipy_frechet(mu1, s1 + eps, mu2, s2 + eps), rtol=1e-3)
    # Rank-deficient identical stats: still ~0, not NaN.
    self.assertAlmostEqual(frechet.frechet_distance(mu1, s1, mu1, s1), 0.0, places=6)
    # A zero covariance against a full one: closed form ||mu diff||^2 + Tr(S2).
    s3 = _random_cov(rng, d)
    np.testing.assert_allclose(frechet.frechet_distance(mu1, np.zeros((d, d)), mu2, s3),
                               np.sum((mu1 - mu2) ** 2) + np.trace(s3), rtol=1e-10)

  def test_bad_inputs(self):
    with self.assertRaisesRegex(ValueError, "at least 2"):
      frechet.feature_statistics(np.zeros((1, 4)))
    with self.assertRaisesRegex(ValueError, r"\[N, D\]"):
      frechet.feature_statistics(np.zeros(4))
    with self.assertRaisesRegex(ValueError, "different feature sizes"):
      frechet.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with self.assertRaisesRegex(ValueError, "do not fit"):
      frechet.frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3))


if __name__ == "__main__":
  absltest.main()
