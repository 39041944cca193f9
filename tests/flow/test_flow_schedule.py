"""SD schedule constants and the continuous-time <-> discrete-index maps."""

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from perflow_jax.flow import schedule


class AlphasCumprodTest(absltest.TestCase):

  def test_reference_constants(self):
    ac = schedule.sd_alphas_cumprod()
    self.assertEqual(ac.dtype, np.float32)
    self.assertEqual(ac.shape, (1000,))
    for idx, want in [(0, 0.999150), (249, 0.675432), (499, 0.277669), (749, 0.056623), (999, 0.004660)]:
      self.assertAlmostEqual(ac[idx], want, places=6, msg=f"alphas_cumprod[{idx}]")

  def test_equals_diffusers_ddim_scheduler(self):
    from diffusers import DDIMScheduler  # pylint: disable=g-import-not-at-top
    # Bit for bit, at the SD length and at lengths where torch.linspace has one point or an odd middle.
    for n in (1, 2, 7, 1000):
      ref = DDIMScheduler(num_train_timesteps=n, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          set_alpha_to_one=False).alphas_cumprod.numpy()
      np.testing.assert_array_equal(schedule.sd_alphas_cumprod(n), ref, err_msg=f"n={n}")

  def test_bad_schedule_raises(self):
    with self.assertRaisesRegex(ValueError, "beta_start < beta_end"):
      schedule.sd_alphas_cumprod(beta_start=0.012, beta_end=0.00085)
    with self.assertRaisesRegex(ValueError, "num_train_timesteps"):
      schedule.sd_alphas_cumprod(num_train_timesteps=0)


class AlphaBarTest(absltest.TestCase):

  def test_index_truncates_the_float32_product_as_the_reference(self):
    k = np.arange(0, 1001)
    # Three float32 spellings of t = k / 1000. The reference's `(t * 1000).long() - 1` truncates: where a spelling
    # lands a hair under k / 1000 it takes the lower index, and so do we (no tolerance).
    spellings = {
        "k / 1000": (k / 1000).astype(np.float32),
        "1 - (1000 - k) / 1000": np.float32(1) - ((1000 - k) / 1000).astype(np.float32),
        "k * 0.001": k.astype(np.float32) * np.float32(0.001),
    }
    for name, t in spellings.items():
      want = np.maximum(np.trunc(t * np.float32(1000)).astype(np.int64) - 1, 0)
      np.testing.assert_array_equal(np.asarray(schedule.alpha_bar_index(jnp.asarray(t))), want, err_msg=name)

  def test_values(self):
    ac = schedule.sd_alphas_cumprod()
    t = jnp.array([1.0, 0.75, 0.5, 0.25, 0.0, 0.001], jnp.float32)
    np.testing.assert_allclose(np.asarray(schedule.alpha_bar(t, ac)), ac[[999, 749, 499, 249, 0, 0]], rtol=1e-6)
    self.assertEqual(int(schedule.alpha_bar_index(jnp.float32(0.75))), 749)

  def test_under_jit(self):
    ac = schedule.sd_alphas_cumprod()
    t = jnp.array([0.999, 0.251], jnp.float32)
    got = jax.jit(lambda t: schedule.alpha_bar(t, ac))(t)
    # float32(0.251) * 1000 = 250.99998 truncates to 250, index 249, in the reference's arithmetic too.
    np.testing.assert_array_equal(np.asarray(got), ac[[998, 249]])

  def test_timesteps(self):
    t = jnp.array([1.0, 0.9375, 0.8125, 0.75, 0.0], jnp.float32)
    np.testing.assert_array_equal(np.asarray(schedule.student_timestep(t)), [1000.0, 937.5, 812.5, 750.0, 0.0])
    teacher = schedule.teacher_timestep(np.asarray(t))
    self.assertEqual(teacher.dtype, np.int32)
    # 936.5 -> 936 and 811.5 -> 812: round half to even, like torch.round in the reference solver (its float32
    # arithmetic lands exactly on these halves; 0.1875 -> 187 is where it does not, tested with the grids).
    np.testing.assert_array_equal(teacher, [999, 936, 812, 749, -1])

  def test_add_noise(self):
    ac = schedule.sd_alphas_cumprod()
    x0 = jnp.ones((2, 3, 3, 1))
    noise = jnp.full((2, 3, 3, 1), 2.0)
    z = schedule.add_noise(x0, noise, jnp.array([1.0, 0.25]), ac)
    want = np.sqrt(ac[[999, 249]]) + 2.0 * np.sqrt(1.0 - ac[[999, 249]])
    np.testing.assert_allclose(np.asarray(z[:, 0, 0, 0]), want, rtol=1e-6)

  def test_zero_snr_start(self):
    ac = schedule.sd_alphas_cumprod()
    x0 = jnp.ones((3, 2, 2, 1))
    noise = jnp.full((3, 2, 2, 1), 2.0)
    t_start = jnp.array([1.0, 0.75, 0.25])
    z = schedule.zero_snr_start(schedule.add_noise(x0, noise, t_start, ac), noise, t_start)
    # t_start = 1: the noise itself (signal 0, not sqrt(ab[999]) = 0.068); the other windows as add_noise.
    np.testing.assert_array_equal(np.asarray(z[:, 0, 0, 0]),
                                  np.float32([2.0, np.sqrt(ac[749]) + 2 * np.sqrt(1 - ac[749]),
                                              np.sqrt(ac[249]) + 2 * np.sqrt(1 - ac[249])]))

  def test_out_of_range_t_raises(self):
    ac = schedule.sd_alphas_cumprod()
    with self.assertRaisesRegex(ValueError, r"t must lie in \[0, 1\]"):
      schedule.alpha_bar(jnp.array([0.5, 750.0]), ac)
    with self.assertRaisesRegex(ValueError, r"\[0, 1\]"):
      schedule.teacher_timestep(-0.1)
    with self.assertRaisesRegex(ValueError, "same shape"):
      schedule.add_noise(jnp.ones((2, 4)), jnp.ones((2, 5)), jnp.ones((2,)), ac)


if __name__ == "__main__":
  absltest.main()
