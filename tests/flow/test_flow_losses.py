"""Window coefficients, PeRFlow targets, loss weighting, prompt dropout and the diffusion loss."""

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from perflow_jax.flow import losses
from perflow_jax.flow import schedule

AC = schedule.sd_alphas_cumprod()

# The reference's K = 4 table: window start, (diff_eps lam, eta), (ddim_eps lam, eta).
TABLE = [
    (1.0, (3.4858, -3.3393), (3.4858, -2.5064)),
    (0.75, (2.2145, -1.9758), (2.2145, -1.3009)),
    (0.5, (1.5596, -1.1969), (1.5596, -0.7558)),
    (0.25, (1.2163, -0.6923), (1.2163, -0.6638)),
]


class CoefficientsTest(absltest.TestCase):

  def test_k4_table_to_4_decimals(self):
    for t_s, diff, ddim in TABLE:
      ab_s = schedule.alpha_bar(jnp.float32(t_s), AC)
      ab_e = schedule.alpha_bar(jnp.float32(t_s - 0.25), AC)
      for pt, want in (("diff_eps", diff), ("ddim_eps", ddim)):
        got = np.array([float(v) for v in losses.window_coefficients(ab_s, ab_e, pt)])
        # 4 decimals: half a unit of the last place, plus float32 rounding (2.2144500 prints as 2.2145).
        np.testing.assert_allclose(got, want, rtol=0, atol=5e-5 + 1e-6, err_msg=f"{pt} window at {t_s}")

  def test_lambda_eta_are_the_diffusion_and_ddim_maps(self):
    ab_s, ab_e = jnp.float32(AC[999]), jnp.float32(AC[749])
    # ddim_eps: z_end is one DDIM step with the same eps.
    z, eps = 0.7, -0.3
    x0 = (z - np.sqrt(1 - AC[999]) * eps) / np.sqrt(AC[999])
    lam, eta = losses.window_coefficients(ab_s, ab_e, "ddim_eps")
    self.assertAlmostEqual(float(lam * z + eta * eps), np.sqrt(AC[749]) * x0 + np.sqrt(1 - AC[749]) * eps, places=5)
    # diff_eps: z_start = gamma z_end + sqrt(1 - gamma^2) eps.
    lam, eta = losses.window_coefficients(ab_s, ab_e, "diff_eps")
    z_end = float(lam * z + eta * eps)
    gamma = np.sqrt(AC[999] / AC[749])
    self.assertAlmostEqual(gamma * z_end + np.sqrt(1 - gamma ** 2) * eps, z, places=5)

  def test_velocity_and_unknown_type_raise(self):
    with self.assertRaisesRegex(ValueError, "use perflow_target"):
      losses.window_coefficients(0.1, 0.2, "velocity")
    with self.assertRaisesRegex(ValueError, "Unknown prediction_type 'epsilon'"):
      losses.window_coefficients(0.1, 0.2, "epsilon")


class TargetTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    rng = np.random.default_rng(0)
    cls.z_s = jnp.asarray(rng.normal(size=(4, 3, 3, 2)), jnp.float32)
    cls.z_e = jnp.asarray(rng.normal(size=(4, 3, 3, 2)), jnp.float32)
    cls.t_s = jnp.array([1.0, 0.75, 0.5, 0.25])
    cls.t_e = cls.t_s - 0.25

  def test_eps_targets_reproduce_the_window_end(self):
    for pt in ("diff_eps", "ddim_eps"):
      target = losses.perflow_target(self.z_s, self.z_e, self.t_s, self.t_e, AC, pt)
      lam, eta = losses.window_coefficients(schedule.alpha_bar(self.t_s, AC), schedule.alpha_bar(self.t_e, AC), pt)
      back = lam[:, None, None, None] * self.z_s + eta[:, None, None, None] * target
      np.testing.assert_allclose(np.asarray(back), np.asarray(self.z_e), rtol=1e-5, atol=1e-5, err_msg=pt)
    # diff_eps also equals (z_s - gamma z_e) / sqrt(1 - gamma^2).
    target = losses.perflow_target(self.z_s, self.z_e, self.t_s, self.t_e, AC, "diff_eps")
    idx = [999, 749, 499, 249, 0]
    gamma = np.sqrt(AC[idx[:4]] / AC[idx[1:]])[:, None, None, None]
    want = (np.asarray(self.z_s) - gamma * np.asarray(self.z_e)) / np.sqrt(1 - gamma ** 2)
    np.testing.assert_allclose(np.asarray(target), want, rtol=1e-4, atol=1e-5)

  def test_velocity_target_and_interpolation(self):
    v = losses.perflow_target(self.z_s, self.z_e, self.t_s, self.t_e, AC, "velocity")
    np.testing.assert_allclose(np.asarray(v), -4.0 * np.asarray(self.z_e - self.z_s), rtol=1e-6)
    mid = losses.interpolate(self.z_s, self.z_e, self.t_s - 0.125, self.t_s, self.t_e)
    np.testing.assert_allclose(np.asarray(mid), np.asarray(0.5 * (self.z_s + self.z_e)), rtol=1e-6, atol=1e-6)
    start = losses.interpolate(self.z_s, self.z_e, self.t_s, self.t_s, self.t_e)
    np.testing.assert_array_equal(np.asarray(start), np.asarray(self.z_s))
    # Moving along the segment by dt with velocity v stays on it.
    t = self.t_s - 0.05
    z_t = losses.interpolate(self.z_s, self.z_e, t, self.t_s, self.t_e)
    np.testing.assert_allclose(np.asarray(z_t + (self.t_e - t)[:, None, None, None] * v), np.asarray(self.z_e),
                               rtol=1e-5, atol=1e-5)

  def test_bad_input_raises(self):
    with self.assertRaisesRegex(ValueError, "same shape"):
      losses.perflow_target(self.z_s, self.z_e[:, :2], self.t_s, self.t_e, AC, "diff_eps")
    with self.assertRaisesRegex(ValueError, "t_start > t_end"):
      losses.perflow_target(self.z_s, self.z_e, self.t_e, self.t_s, AC, "diff_eps")
    with self.assertRaisesRegex(ValueError, r"shape \[B\] = \[4\]"):
      losses.perflow_target(self.z_s, self.z_e, jnp.ones(3), jnp.zeros(3), AC, "velocity")
    with self.assertRaisesRegex(ValueError, r"t must lie in \[0, 1\]"):
      losses.interpolate(self.z_s, self.z_e, self.t_s * 1000, self.t_s, self.t_e)


class LossTest(absltest.TestCase):

  def test_default_is_plain_mse(self):
    pred = jnp.arange(24, dtype=jnp.float32).reshape(2, 3, 2, 2) / 10
    target = jnp.ones_like(pred)
    want = np.mean((np.asarray(pred) - 1) ** 2)
    self.assertAlmostEqual(float(losses.perflow_loss(pred, target)), want, places=6)

  def test_weightings(self):
    pred = jnp.stack([jnp.full((2, 2, 1), v) for v in (1.0, 2.0, 3.0)])
    target = jnp.zeros_like(pred)
    per_example = np.array([1.0, 4.0, 9.0])
    t = jnp.array([1.0, 0.95, 0.5])
    w = np.array([1 / 0.1, 1 / 0.1, 1 / 0.5]) / 2.3
    got = losses.perflow_loss(pred, target, t, weighting="reciprocal")
    self.assertAlmostEqual(float(got), np.mean(w * per_example), places=5)
    t_start = jnp.array([1.0, 0.75, 0.25])
    got = losses.perflow_loss(pred, target, t_start=t_start, num_windows=4, weighting="rcp_win")
    self.assertAlmostEqual(float(got), np.mean(np.array([1.6, 1.2, 0.4]) * per_example), places=5)

  def test_pseudo_huber(self):
    pred = jnp.full((2, 4), 0.003)
    got = losses.perflow_loss(pred, jnp.zeros_like(pred), distance="pseudo_huber", huber_c=0.001)
    self.assertAlmostEqual(float(got), np.sqrt(0.003 ** 2 + 0.001 ** 2) - 0.001, places=8)

  def test_bad_input_raises(self):
    x = jnp.ones((2, 3))
    with self.assertRaisesRegex(ValueError, "needs t, an array"):
      losses.perflow_loss(x, x, weighting="reciprocal")
    with self.assertRaisesRegex(ValueError, "Unknown distance 'l1'"):
      losses.perflow_loss(x, x, distance="l1")
    with self.assertRaisesRegex(ValueError, "Unknown weighting"):
      losses.perflow_loss(x, x, weighting="snr")
    with self.assertRaisesRegex(ValueError, "same shape"):
      losses.perflow_loss(x, jnp.ones((2, 4)))


class DropPromptsTest(absltest.TestCase):

  def test_drops_all_leaves_together_at_the_rate(self):
    batch = 4000
    ctx = {"text": jnp.ones((batch, 3, 2)), "pooled": jnp.ones((batch, 5))}
    empty = {"text": jnp.zeros((1, 3, 2)), "pooled": jnp.full((1, 5), -1.0)}
    out = losses.drop_prompts(jax.random.PRNGKey(0), ctx, empty, drop_prob=0.1)
    dropped_text = np.asarray(out["text"][:, 0, 0] == 0)
    dropped_pooled = np.asarray(out["pooled"][:, 0] == -1)
    np.testing.assert_array_equal(dropped_text, dropped_pooled)
    self.assertTrue(np.all(np.asarray(out["text"])[dropped_text] == 0))
    self.assertTrue(np.all(np.asarray(out["text"])[~dropped_text] == 1))
    self.assertLess(abs(dropped_text.sum() - 400), 4 * np.sqrt(batch * 0.1 * 0.9))
    none = losses.drop_prompts(jax.random.PRNGKey(0), ctx, empty, drop_prob=0.0)
    np.testing.assert_array_equal(np.asarray(none["text"]), np.asarray(ctx["text"]))
    every = losses.drop_prompts(jax.random.PRNGKey(0), ctx["pooled"], empty["pooled"], drop_prob=1.0)
    np.testing.assert_array_equal(np.asarray(every), -np.ones((batch, 5)))

  def test_bad_input_raises(self):
    with self.assertRaisesRegex(ValueError, "drop_prob"):
      losses.drop_prompts(jax.random.PRNGKey(0), jnp.ones((2, 3)), jnp.zeros((1, 3)), drop_prob=1.5)
    with self.assertRaisesRegex(ValueError, "leading batch dimension of 1 or 2"):
      losses.drop_prompts(jax.random.PRNGKey(0), jnp.ones((2, 3)), jnp.zeros((3, 3)))


class DiffusionLossTest(absltest.TestCase):

  def _oracle(self, x0, prediction_type, offset=0.0, seen=None):
    ac = jnp.asarray(AC, jnp.float32)

    def model_fn(z, timestep, context):
      del context
      if seen is not None:
        seen.append(np.asarray(timestep))
      ab = ac[timestep.astype(jnp.int32)][:, None, None, None]
      eps = (z - jnp.sqrt(ab) * x0) / jnp.sqrt(1 - ab)
      out = eps if prediction_type == "epsilon" else jnp.sqrt(ab) * eps - jnp.sqrt(1 - ab) * x0
      return out + offset

    return model_fn

  def test_exact_model_has_zero_loss_and_offset_gives_its_square(self):
    x0 = jax.random.normal(jax.random.PRNGKey(1), (64, 4, 4, 2)) * 0.5
    for pt in ("epsilon", "v_prediction"):
      exact = losses.diffusion_loss(self._oracle(x0, pt), jax.random.PRNGKey(2), x0, None, AC, pt)
      self.assertLess(float(exact), 1e-6, pt)
      shifted = losses.diffusion_loss(self._oracle(x0, pt, 0.1), jax.random.PRNGKey(2), x0, None, AC, pt)
      self.assertAlmostEqual(float(shifted), 0.01, delta=2e-4, msg=pt)

  def test_timesteps_are_uniform_integers_0_to_999(self):
    x0 = jnp.zeros((20000, 1, 1, 1))
    seen = []
    losses.diffusion_loss(self._oracle(x0, "epsilon", seen=seen), jax.random.PRNGKey(3), x0, None, AC)
    t = seen[0]
    np.testing.assert_array_equal(t, np.round(t))
    self.assertEqual((t.min(), t.max()), (0.0, 999.0))
    self.assertAlmostEqual(t.mean(), 499.5, delta=4 * 288.7 / np.sqrt(20000))

  def test_unknown_type_raises(self):
    with self.assertRaisesRegex(ValueError, "Unknown diffusion prediction_type 'diff_eps'"):
      losses.diffusion_loss(lambda z, t, c: z, jax.random.PRNGKey(0), jnp.ones((1, 2)), None, AC, "diff_eps")


if __name__ == "__main__":
  absltest.main()
