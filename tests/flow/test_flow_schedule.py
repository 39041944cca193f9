"""SD schedule constants and the continuous-time <-> discrete-index maps."""

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from perflow_jax.flow import schedule


class AlphasCumprodTest(absltest.TestCase):

  def test_reference_constants(self):
    ac = schedule.sd_alphas_cumprod()
    self.assertEqual(ac.dtype, np.float64)
    self.assertEqual(ac.shape, (1000,))
    for idx, want in [(0, 0.999150), (249, 0.675432), (499, 0.277670), (749, 0.056623), (999, 0.004660)]:
      self.assertAlmostEqual(ac[idx], want, places=6, msg=f"alphas_cumprod[{idx}]")

  def test_equals_diffusers_ddim_scheduler(self):
    from diffusers import DDIMScheduler  # pylint: disable=g-import-not-at-top
    ref = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        set_alpha_to_one=False).alphas_cumprod.numpy()
    # diffusers computes in float32; ours is float64, so agreement is to float32 rounding.
    np.testing.assert_allclose(schedule.sd_alphas_cumprod(), ref, rtol=2e-6, atol=0)

  def test_bad_schedule_raises(self):
    with self.assertRaisesRegex(ValueError, "beta_start < beta_end"):
      schedule.sd_alphas_cumprod(beta_start=0.012, beta_end=0.00085)
    with self.assertRaisesRegex(ValueError, "num_train_timesteps"):
      schedule.sd_alphas_cumprod(num_train_timesteps=0)


class AlphaBarTest(absltest.TestCase):

  def test_index_on_the_full_grid_in_float32(self):
    k = np.arange(0, 1001)
    want = np.maximum(k - 1, 0)
    # Three float32 spellings of t = k / 1000; '1 - (1000 - k) / 1000' loses 202 grid points to a plain floor.
    spellings = {
        "k / 1000": (k / 1000).astype(np.float32),
        "1 - (1000 - k) / 1000": np.float32(1) - ((1000 - k) / 1000).astype(np.float32),
        "k * 0.001": k.astype(np.float32) * np.float32(0.001),
    }
    for name, t in spellings.items():
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
    np.testing.assert_allclose(np.asarray(got), ac[[998, 250]], rtol=1e-6)

  def test_timesteps(self):
    t = jnp.array([1.0, 0.9375, 0.8125, 0.75, 0.0], jnp.float32)
    np.testing.assert_array_equal(np.asarray(schedule.student_timestep(t)), [1000.0, 937.5, 812.5, 750.0, 0.0])
    teacher = schedule.teacher_timestep(t)
    self.assertEqual(teacher.dtype, jnp.int32)
    # 936.5 -> 936 and 811.5 -> 812: round half to even, like torch.round in the reference solver.
    np.testing.assert_array_equal(np.asarray(teacher), [999, 936, 812, 749, -1])

  def test_add_noise(self):
    ac = schedule.sd_alphas_cumprod()
    x0 = jnp.ones((2, 3, 3, 1))
    noise = jnp.full((2, 3, 3, 1), 2.0)
    z = schedule.add_noise(x0, noise, jnp.array([1.0, 0.25]), ac)
    want = np.sqrt(ac[[999, 249]]) + 2.0 * np.sqrt(1.0 - ac[[999, 249]])
    np.testing.assert_allclose(np.asarray(z[:, 0, 0, 0]), want, rtol=1e-6)

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
