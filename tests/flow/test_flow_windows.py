"""TimeWindows against a direct port of the reference's loop rule, and the training t sampler."""

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from perflow_jax.flow import windows


def reference_window(tp: np.float32, num_windows: int) -> tuple[float, float]:
  """The reference's Time_Windows.get_window, ported line by line (precision = 1/1000)."""
  starts = [1.0 * i / num_windows for i in range(1, num_windows + 1)][::-1]
  ends = starts[1:] + [0]
  idx = 0
  while (tp - np.float32(0.1 * (1.0 / 1000))) <= ends[idx]:
    idx += 1
  return starts[idx], ends[idx]


class BoundsTest(absltest.TestCase):

  def _check_grid(self, num_windows: int, grid: int):
    k = np.arange(1, grid + 1)
    # The sampler's own float32 spelling and a naive one: both must follow the reference rule.
    for t in [((grid - (grid - k)) / grid).astype(np.float32),
              np.float32(1) - ((grid - k) / grid).astype(np.float32)]:
      want = np.array([reference_window(v, num_windows) for v in t], np.float32)
      t_start, t_end = windows.TimeWindows(num_windows).bounds(jnp.asarray(t))
      np.testing.assert_array_equal(np.asarray(t_start), want[:, 0])
      np.testing.assert_array_equal(np.asarray(t_end), want[:, 1])

  def test_matches_reference_on_1000_grid(self):
    for k in (1, 2, 4, 8):
      self._check_grid(k, 1000)

  def test_matches_reference_on_200_grid(self):
    for k in (3, 4):
      self._check_grid(k, 200)

  def test_boundaries_belong_to_the_window_that_starts_there(self):
    tw = windows.TimeWindows(4)
    t_start, t_end = tw.bounds(jnp.array([1.0, 0.75, 0.7500001, 0.7499, 0.5, 0.25, 0.001], jnp.float32))
    np.testing.assert_array_equal(np.asarray(t_start), [1.0, 0.75, 0.75, 0.75, 0.5, 0.25, 0.25])
    np.testing.assert_array_equal(np.asarray(t_end), [0.75, 0.5, 0.5, 0.5, 0.25, 0.0, 0.0])
    np.testing.assert_array_equal(np.asarray(tw.index(jnp.array([1.0, 0.75, 0.74]))), [4, 3, 3])
    np.testing.assert_array_equal(tw.starts, [1.0, 0.75, 0.5, 0.25])
    np.testing.assert_array_equal(tw.ends, [0.75, 0.5, 0.25, 0.0])

  def test_bad_input_raises(self):
    with self.assertRaisesRegex(ValueError, "num_windows"):
      windows.TimeWindows(0)
    with self.assertRaisesRegex(ValueError, r"\[0, 1\]"):
      windows.TimeWindows(4).bounds(jnp.array([1.5]))


class SampleTTest(absltest.TestCase):

  def test_grid_values_and_coverage(self):
    tw = windows.TimeWindows(4)
    for grid in (1000, 200):
      t = np.asarray(tw.sample_t(jax.random.PRNGKey(0), 20000, grid=grid), np.float64)
      steps = np.round((1.0 - t) * grid)
      np.testing.assert_allclose(t, 1.0 - steps / grid, atol=1e-7)  # on the grid
      self.assertEqual(steps.min(), 0)                               # t = 1 occurs
      self.assertEqual(steps.max(), grid - 1)                        # t = 1/grid occurs, t = 0 never
      # Uniform over the grid: each window gets a quarter of the samples (4 sigma of a binomial).
      counts = np.bincount(np.asarray(tw.index(jnp.asarray(t, jnp.float32))) - 1, minlength=4)
      self.assertLess(np.abs(counts - 5000).max(), 4 * np.sqrt(20000 * 0.25 * 0.75))

  def test_deterministic_per_key_and_bad_grid(self):
    tw = windows.TimeWindows(4)
    a = tw.sample_t(jax.random.PRNGKey(3), 8)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(tw.sample_t(jax.random.PRNGKey(3), 8)))
    self.assertEqual(a.shape, (8,))
    self.assertEqual(a.dtype, jnp.float32)
    with self.assertRaisesRegex(ValueError, "grid"):
      tw.sample_t(jax.random.PRNGKey(0), 4, grid=0)


if __name__ == "__main__":
  absltest.main()
