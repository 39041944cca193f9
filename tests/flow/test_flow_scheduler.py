"""PeRFlowScheduler: reference timesteps, the step formula, the teacher-endpoint oracle, CFG sampling."""

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from perflow_jax.flow import losses
from perflow_jax.flow import schedule
from perflow_jax.flow import scheduler as scheduler_lib
from perflow_jax.flow import solvers
from perflow_jax.flow import windows

AC = schedule.sd_alphas_cumprod()


def reference_step(eps, timestep, next_timestep, z, prediction_type, k=4):
  """The reference step's formulas in float64 numpy, for one scalar timestep."""
  t_c = timestep / 1000
  idx = int(np.ceil((t_c - 1e-4) * k))
  t_s, t_e = idx / k, (idx - 1) / k
  ab_s, ab_e = AC[int(t_s * 1000) - 1], AC[max(int(t_e * 1000) - 1, 0)]
  if prediction_type == "diff_eps":
    g = np.sqrt(ab_s / ab_e)
    lam, eta = 1 / g, -np.sqrt(1 - g ** 2) / g
  else:
    lam, eta = np.sqrt(ab_e / ab_s), np.sqrt(1 - ab_e) - np.sqrt(ab_e * (1 - ab_s) / ab_s)
  d = lam * (t_c - t_s) + (t_e - t_c)
  z_end = lam * (t_e - t_s) / d * z + eta * (t_e - t_c) / d * eps
  return z + (next_timestep - timestep) / 1000 * (z_end - z) / (t_e - t_c)


class TimestepsTest(absltest.TestCase):

  def test_reference_lists(self):
    s = scheduler_lib.PeRFlowScheduler()
    want = {
        4: [1000, 750, 500, 250],
        5: [1000, 875, 750, 500, 250],
        6: [1000, 875, 750, 625, 500, 250],
        8: [1000, 875, 750, 625, 500, 375, 250, 125],
        16: [1000, 937, 875, 812, 750, 687, 625, 562, 500, 437, 375, 312, 250, 187, 125, 62],
    }
    for n, ts in want.items():
      got = s.timesteps(n)
      self.assertEqual(got.dtype, np.int64)
      np.testing.assert_array_equal(got, ts, err_msg=f"N={n}")
    np.testing.assert_array_equal(s.next_timesteps(5), [875, 750, 500, 250, 0])

  def test_fewer_steps_than_windows_raises(self):
    with self.assertRaisesRegex(ValueError, "each window needs at least one step.*>= 4"):
      scheduler_lib.PeRFlowScheduler().timesteps(2)
    with self.assertRaisesRegex(ValueError, "Unknown prediction_type 'epsilon'"):
      scheduler_lib.PeRFlowScheduler(prediction_type="epsilon")


class StepTest(absltest.TestCase):

  def test_matches_the_reference_formulas(self):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(2, 3, 3, 1)).astype(np.float32)
    eps = rng.normal(size=(2, 3, 3, 1)).astype(np.float32)
    for pt in ("diff_eps", "ddim_eps"):
      s = scheduler_lib.PeRFlowScheduler(prediction_type=pt)
      for t, t_next in [(1000, 750), (1000, 937), (937, 875), (812, 750), (500, 437), (125, 62), (62, 0)]:
        got = s.step(jnp.asarray(eps), t, t_next, jnp.asarray(z))
        want = reference_step(eps.astype(np.float64), t, t_next, z.astype(np.float64), pt)
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5, err_msg=f"{pt} {t}->{t_next}")

  def test_velocity_is_euler(self):
    s = scheduler_lib.PeRFlowScheduler(prediction_type="velocity")
    z = jnp.ones((1, 2, 2, 1))
    np.testing.assert_allclose(np.asarray(s.step(jnp.full_like(z, 2.0), 750, 500, z)), 0.5 * np.ones((1, 2, 2, 1)))

  def test_per_example_timesteps(self):
    s = scheduler_lib.PeRFlowScheduler()
    z = jnp.asarray(np.random.default_rng(1).normal(size=(2, 2, 2, 1)), jnp.float32)
    both = s.step(z * 0.5, jnp.array([1000, 500]), jnp.array([875, 375]), z)
    for b, (t, tn) in enumerate([(1000, 875), (500, 375)]):
      np.testing.assert_allclose(np.asarray(both[b:b + 1]), np.asarray(s.step(z[b:b + 1] * 0.5, t, tn, z[b:b + 1])),
                                 rtol=1e-6)

  def test_add_noise_reads_timestep_minus_one(self):
    s = scheduler_lib.PeRFlowScheduler()
    out = s.add_noise(jnp.ones((2, 1)), jnp.zeros((2, 1)), jnp.array([1000, 250]))
    np.testing.assert_allclose(np.asarray(out[:, 0]), np.sqrt(AC[[999, 249]]), rtol=1e-6)


class OracleTest(absltest.TestCase):
  """Fed the exact window targets of a teacher, the scheduler reproduces the teacher's window endpoints."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    rng = np.random.default_rng(2)
    table = jnp.asarray(rng.normal(size=1000), jnp.float32)
    teacher = lambda z, t: 0.5 * jnp.tanh(z) + table[jnp.clip(t, 0, 999)][:, None, None, None]
    tw = windows.TimeWindows(4)
    cls.noise = jnp.asarray(rng.normal(size=(2, 4, 4, 2)), jnp.float32)
    ends = [cls.noise]  # the teacher's chain: window starts at index k, window ends at k + 1
    for t_s, t_e in zip(tw.starts, tw.ends):
      ends.append(solvers.ddim_window_solve(teacher, ends[-1], jnp.full((2,), t_s), jnp.full((2,), t_e), 8, AC))
    cls.chain = ends
    cls.windows = tw

  def _targets(self, pt):
    """[K, B, ...] the exact target of each window, noisiest first."""
    out = []
    for k, (t_s, t_e) in enumerate(zip(self.windows.starts, self.windows.ends)):
      out.append(losses.perflow_target(self.chain[k], self.chain[k + 1], t_s, t_e, AC, pt))
    return jnp.stack(out)

  def _model_fn(self, targets):
    def model_fn(z, timestep, context):
      del z, context
      k = self.windows.index(timestep / 1000.0)  # K at t = 1
      return jnp.take(targets, 4 - k[0], axis=0)
    return model_fn

  def test_lands_on_teacher_window_ends(self):
    for pt in losses.PREDICTION_TYPES:
      s = scheduler_lib.PeRFlowScheduler(prediction_type=pt)
      model_fn = self._model_fn(self._targets(pt))
      for n in (4, 8):
        z = self.noise
        for t, t_next in zip(s.timesteps(n), s.next_timesteps(n)):
          z = s.step(model_fn(z, jnp.full((2,), float(t)), None), int(t), int(t_next), z)
          if t_next % 250 == 0:  # a window end: compare with the teacher there
            k = 4 - int(t_next) // 250
            np.testing.assert_allclose(np.asarray(z), np.asarray(self.chain[k]), rtol=1e-5, atol=1e-5,
                                       err_msg=f"{pt} N={n} at {t_next}")
        sampled = s.sample(model_fn, self.noise, n)
        np.testing.assert_allclose(np.asarray(sampled), np.asarray(self.chain[-1]), rtol=1e-5, atol=1e-5,
                                   err_msg=f"{pt} N={n} sample")

  def test_untrained_ddim_eps_student_is_4_step_ddim(self):
    # student = teacher and ddim_eps: the 4-step PeRFlow sampler is DDIM with one step per window.
    eps = lambda z: 0.5 * jnp.tanh(z)
    s = scheduler_lib.PeRFlowScheduler(prediction_type="ddim_eps")
    got = s.sample(lambda z, t, c: eps(z), self.noise, 4)
    z = self.noise
    for t_s, t_e in zip(self.windows.starts, self.windows.ends):
      z = solvers.ddim_window_solve(lambda z, t: eps(z), z, t_s, t_e, 1, AC)
    np.testing.assert_allclose(np.asarray(got), np.asarray(z), rtol=1e-5, atol=1e-5)


class SampleGuidanceTest(absltest.TestCase):

  def test_cfg_in_one_batched_call_under_jit(self):
    calls = []

    def model_fn(z, t, ctx):
      calls.append(z.shape[0])
      return 0.3 * z * ctx.mean(axis=(1, 2))[:, None, None, None] + 0.001 * t[:, None, None, None]

    rng = np.random.default_rng(3)
    noise = jnp.asarray(rng.normal(size=(2, 3, 3, 1)), jnp.float32)
    ctx = jnp.asarray(rng.normal(size=(2, 4, 3)), jnp.float32)
    empty = jnp.zeros((1, 4, 3))
    s = scheduler_lib.PeRFlowScheduler()
    got = jax.jit(lambda n, c, w: s.sample(model_fn, n, 6, w, c, empty))(noise, ctx, 4.5)
    self.assertEqual(calls, [4])  # traced once, batch 2B
    z = noise
    for t, tn in zip(s.timesteps(6), s.next_timesteps(6)):
      tb = jnp.full((2,), float(t))
      cond, uncond = model_fn(z, tb, ctx), model_fn(z, tb, jnp.zeros_like(ctx))
      z = s.step(uncond + 4.5 * (cond - uncond), int(t), int(tn), z)
    np.testing.assert_allclose(np.asarray(got), np.asarray(z), rtol=1e-5, atol=1e-5)
    calls.clear()
    plain = s.sample(model_fn, noise, 4, 1.0, ctx, empty)
    self.assertEqual(calls, [2])  # guidance 1: one call of batch B
    self.assertEqual(plain.shape, noise.shape)

  def test_guidance_without_uncond_raises(self):
    with self.assertRaisesRegex(ValueError, "needs uncond_context"):
      scheduler_lib.PeRFlowScheduler().sample(lambda z, t, c: z, jnp.ones((1, 2)), 4, 7.5, jnp.ones((1, 3)))


if __name__ == "__main__":
  absltest.main()
