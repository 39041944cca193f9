"""Teacher window solvers: reference timesteps, DDIM parity with diffusers, Gaussian convergence, batching."""

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np
import torch

from perflow_jax.flow import schedule
from perflow_jax.flow import solver_study
from perflow_jax.flow import solvers

AC = schedule.sd_alphas_cumprod()


def _table_eps_jax(table):
  """A state-dependent teacher: eps = 0.5 tanh(z) + table[timestep] (per-timestep offsets)."""
  table = jnp.asarray(table, jnp.float32)
  return lambda z, t: 0.5 * jnp.tanh(z) + table[jnp.clip(t, 0, 999)].reshape((-1,) + (1,) * (z.ndim - 1))


def _diffusers_ddim(z0: np.ndarray, timesteps, num_inference_steps: int, table: np.ndarray) -> np.ndarray:
  """diffusers' DDIMScheduler (eta = 0, set_alpha_to_one=False) stepped at the given timesteps."""
  from diffusers import DDIMScheduler  # pylint: disable=g-import-not-at-top
  sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                        set_alpha_to_one=False, timestep_spacing="trailing")
  sched.set_timesteps(num_inference_steps)
  z = torch.from_numpy(z0)
  for t in timesteps:
    eps = 0.5 * torch.tanh(z) + float(table[t])
    z = sched.step(eps, int(t), z, eta=0.0).prev_sample
  return z.numpy(), sched


class TimestepsTest(absltest.TestCase):

  def test_reference_grid_and_stride(self):
    cur, prev = solvers.ddim_timesteps(jnp.array([1.0, 0.25]), jnp.array([0.75, 0.0]), 8)
    # 187, not round(1000 * 0.1875 - 1) = 186: the reference's float32 arithmetic (test_flow_reference_grids).
    np.testing.assert_array_equal(np.asarray(cur), [[999, 968, 936, 905, 874, 843, 812, 780],
                                                    [249, 218, 187, 155, 124, 93, 62, 30]])
    np.testing.assert_array_equal(np.asarray(cur - prev), np.full((2, 8), 31))  # 1000 // (4 * 8)
    self.assertEqual(int(prev[0, -1]), 749)
    self.assertEqual(int(prev[1, -1]), -1)
    # SDXL's S = 10: stride 25 and a clean grid.
    cur, prev = solvers.ddim_timesteps(jnp.array([0.75]), jnp.array([0.5]), 10)
    np.testing.assert_array_equal(np.asarray(cur[0]), 749 - 25 * np.arange(10))
    np.testing.assert_array_equal(np.asarray(prev[0]), 724 - 25 * np.arange(10))
    # The reference's quirk at S = 64: stride 3 on a 3.9 grid lands at 750, not 749.
    _, prev = solvers.ddim_timesteps(jnp.array([1.0]), jnp.array([0.75]), 64)
    self.assertEqual(int(prev[0, -1]), 750)

  def test_grid_and_logsnr_nodes(self):
    nodes = solvers.grid_timesteps(jnp.array([1.0, 0.25]), jnp.array([0.75, 0.0]), 4)
    np.testing.assert_array_equal(np.asarray(nodes), [[999, 936, 874, 812, 749], [249, 186, 124, 62, -1]])
    nodes = np.asarray(solvers.logsnr_timesteps(jnp.array([1.0, 0.25]), jnp.array([0.75, 0.0]), 8, AC))
    np.testing.assert_array_equal(nodes[:, 0], [999, 249])
    np.testing.assert_array_equal(nodes[:, -1], [749, 0])
    self.assertTrue(np.all(np.diff(nodes, axis=1) < 0))
    lam = 0.5 * np.log(AC / (1 - AC))
    steps = np.diff(lam[nodes], axis=1)
    # Integer rounding aside, every log-SNR step has the same size.
    np.testing.assert_allclose(steps, np.broadcast_to(steps.mean(axis=1, keepdims=True), steps.shape), rtol=0.25)


class DiffusersParityTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    rng = np.random.default_rng(0)
    cls.table = rng.normal(size=1000).astype(np.float32)
    cls.z = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
    cls.eps_fn = staticmethod(_table_eps_jax(cls.table))

  def test_one_window_matches_trailing_ddim(self):
    # K = 1, S = 6: the reference grid round(999 - 166.7 i) and stride 166 are diffusers' 'trailing' DDIM.
    _, sched = _diffusers_ddim(self.z, [], 6, self.table)
    want, _ = _diffusers_ddim(self.z, sched.timesteps.numpy(), 6, self.table)
    cur, _ = solvers.ddim_timesteps(jnp.array([1.0]), jnp.array([0.0]), 6)
    np.testing.assert_array_equal(np.asarray(cur[0]), sched.timesteps.numpy())
    got = solvers.ddim_window_solve(self.eps_fn, jnp.asarray(self.z), 1.0, 0.0, 6, AC)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)

  def test_four_windows_match_diffusers_steps_with_stride_31(self):
    # K = 4, S = 8: diffusers with 32 inference steps steps by 1000 // 32 = 31, the reference's stride.
    t_start = jnp.array([1.0, 0.25])
    t_end = jnp.array([0.75, 0.0])
    got = jax.jit(lambda z: solvers.ddim_window_solve(self.eps_fn, z, t_start, t_end, 8, AC))(jnp.asarray(self.z))
    for b, grid in enumerate([[999, 968, 936, 905, 874, 843, 812, 780], [249, 218, 187, 155, 124, 93, 62, 30]]):
      want, _ = _diffusers_ddim(self.z[b:b + 1], grid, 32, self.table)
      np.testing.assert_allclose(np.asarray(got[b:b + 1]), want, rtol=1e-5, atol=1e-5)


class GaussianConvergenceTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(1), 4)
    shape = (4, 4, 2)
    cls.mu = 0.5 * jax.random.normal(k1, shape)
    cls.std = jax.random.uniform(k2, shape, minval=0.3, maxval=1.5)
    cls.t_start, cls.t_end, cls.ids = solver_study._window_batch(4, 2)
    x0 = cls.mu + cls.std * jax.random.normal(k3, (8,) + shape)
    cls.z = schedule.add_noise(x0, jax.random.normal(k4, x0.shape), cls.t_start, AC)
    cls.exact = solver_study.gaussian_window_end(cls.z, schedule.alpha_bar(cls.t_start, AC),
                                                 schedule.alpha_bar(cls.t_end, AC), cls.mu, cls.std)
    cls.eps_fn = staticmethod(solver_study.gaussian_eps_fn(cls.mu, cls.std, AC))

  def errors(self, solver, steps_list):
    out = []
    for s in steps_list:
      z_end = solvers.window_solve(self.eps_fn, self.z, self.t_start, self.t_end, s, AC, solver=solver)
      out.append(solver_study.per_window_rms(z_end, self.exact, self.ids, 4))
    return np.array(out)  # [len(steps_list), K]

  def test_exact_flow_is_the_standardised_affine_map(self):
    # The closed form keeps (z - sqrt(ab) mu) / sqrt(ab s^2 + 1 - ab) and so maps N(., .) marginals onto each other.
    a_s = np.asarray(schedule.alpha_bar(self.t_start, AC))[:, None, None, None]
    a_e = np.asarray(schedule.alpha_bar(self.t_end, AC))[:, None, None, None]
    mu, std = np.asarray(self.mu), np.asarray(self.std)
    u_s = (np.asarray(self.z) - np.sqrt(a_s) * mu) / np.sqrt(a_s * std ** 2 + 1 - a_s)
    u_e = (np.asarray(self.exact) - np.sqrt(a_e) * mu) / np.sqrt(a_e * std ** 2 + 1 - a_e)
    np.testing.assert_allclose(u_e, u_s, rtol=1e-4, atol=1e-5)

  def test_reference_ddim_converges_where_its_stride_is_exact(self):
    err = self.errors("ddim", [1, 2, 5, 10, 25, 50])  # 250 / S integer: stride == grid spacing
    self.assertTrue(np.all(np.diff(err, axis=0) < 0), err)
    np.testing.assert_array_less(err[-1], 5e-3)
    np.testing.assert_array_less(err[0], 0.2)
    # First order: halving the step (25 -> 50) halves the error.
    np.testing.assert_allclose(err[-2] / err[-1], 2.0, rtol=0.05)

  def test_grid_ddim_converges_to_64_steps_and_reference_stride_does_not(self):
    err = self.errors("ddim_grid", [1, 2, 4, 8, 16, 32, 64])
    self.assertTrue(np.all(np.diff(err, axis=0) < 0), err)
    np.testing.assert_array_less(err[-1], 4e-3)
    # The reference's stride 1000 // (4 * 64) = 3 on a 3.9-timestep grid skips ~57 timesteps of flow.
    faithful_64 = self.errors("ddim", [64])[0]
    np.testing.assert_array_less(5 * err[-1], faithful_64)

  def test_dpmpp_2m_is_second_order_and_one_step_is_ddim(self):
    err = self.errors("dpmpp_2m", [1, 8, 16])
    np.testing.assert_allclose(err[0], self.errors("ddim", [1])[0], rtol=1e-5)
    # Second order in the three noisier windows: 8 -> 16 steps divides the error by ~4.
    ratio = err[1] / err[2]
    np.testing.assert_array_less(3.5, ratio[:3])
    np.testing.assert_array_less(err[2], 1e-3)

  def test_dpmpp_2m_with_4_steps_beats_reference_ddim_8(self):
    errors = solver_study.gaussian_study(max_steps=4)
    self.assertEqual(solver_study.steps_to_match(errors), {"per_window": [4, 3, 3, 4], "all_windows": 4})
    np.testing.assert_array_less(errors[("dpmpp_2m", 4)], errors[("ddim", 8)])
    np.testing.assert_array_less(errors[("dpmpp_2m", 200)], errors[("ddim", 8)] / 50)


class BatchAndGuidanceTest(absltest.TestCase):

  def test_mixed_windows_in_one_jit_batch_equal_single_solves(self):
    rng = np.random.default_rng(2)
    eps_fn = _table_eps_jax(rng.normal(size=1000))
    z = jnp.asarray(rng.normal(size=(4, 3, 3, 2)), jnp.float32)
    t_start = jnp.array([1.0, 0.25, 0.75, 0.5])
    t_end = jnp.array([0.75, 0.0, 0.5, 0.25])
    for solver in solvers.SOLVERS:
      batched = jax.jit(lambda z, s, e, solver=solver: solvers.window_solve(eps_fn, z, s, e, 5, AC, solver=solver,
                                                                            num_windows=4))
      got = batched(z, t_start, t_end)
      for b in range(4):
        one = solvers.window_solve(eps_fn, z[b:b + 1], t_start[b:b + 1], t_end[b:b + 1], 5, AC, solver=solver)
        np.testing.assert_allclose(np.asarray(got[b:b + 1]), np.asarray(one), rtol=1e-6, atol=1e-6,
                                   err_msg=solver)

  def test_to_epsilon(self):
    rng = np.random.default_rng(3)
    x0, eps = (jnp.asarray(rng.normal(size=(2, 3, 3, 1)), jnp.float32) for _ in range(2))
    ab = jnp.array([0.3, 0.9])
    a = ab[:, None, None, None]
    z = jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * eps
    v = jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0
    np.testing.assert_allclose(np.asarray(solvers.to_epsilon(v, z, ab, "v_prediction")), np.asarray(eps),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(solvers.to_epsilon(eps, z, ab, "epsilon")), np.asarray(eps))

  def test_guided_and_cfg_sync_eps_fns(self):
    batches = []

    def model_fn(z, t, ctx):
      batches.append(z.shape[0])
      self.assertEqual(t.dtype, jnp.float32)
      scale = (ctx["text"].mean(axis=(1, 2)) + ctx["pooled"].mean(axis=1))[:, None, None, None]
      return z * scale + t[:, None, None, None] / 1000.0

    rng = np.random.default_rng(4)
    z = jnp.asarray(rng.normal(size=(2, 3, 3, 1)), jnp.float32)
    ctx = {"text": jnp.asarray(rng.normal(size=(2, 5, 4)), jnp.float32), "pooled": jnp.ones((2, 3))}
    empty = {"text": jnp.zeros((1, 5, 4)), "pooled": jnp.zeros((1, 3))}
    t = jnp.array([999, 499], jnp.int32)
    cond = model_fn(z, t.astype(jnp.float32), ctx)
    uncond = model_fn(z, t.astype(jnp.float32), jax.tree.map(lambda e: jnp.broadcast_to(e, (2,) + e.shape[1:]),
                                                             empty))
    batches.clear()

    guided = solvers.guided_eps_fn(model_fn, ctx, AC, mode="guided", guidance_scale=7.5, uncond_context=empty)
    np.testing.assert_allclose(np.asarray(guided(z, t)), np.asarray(uncond + 7.5 * (cond - uncond)), rtol=1e-6)
    self.assertEqual(batches, [4])  # one call of batch 2B

    batches.clear()
    sync = solvers.guided_eps_fn(model_fn, ctx, AC, mode="cfg_sync")
    np.testing.assert_allclose(np.asarray(sync(z, t)), np.asarray(cond), rtol=1e-6)
    self.assertEqual(batches, [2])

    # v-prediction teachers: guidance on v, then eps = sqrt(ab) v + sqrt(1 - ab) z.
    v_guided = solvers.guided_eps_fn(model_fn, ctx, AC, mode="guided", uncond_context=empty,
                                     prediction_type="v_prediction")
    ab = AC[[999, 499]].astype(np.float32)[:, None, None, None]
    want = np.sqrt(ab) * np.asarray(uncond + 7.5 * (cond - uncond)) + np.sqrt(1 - ab) * np.asarray(z)
    np.testing.assert_allclose(np.asarray(v_guided(z, t)), want, rtol=1e-5, atol=1e-6)


class BadInputTest(absltest.TestCase):

  def test_errors(self):
    eps_fn = lambda z, t: z
    z = jnp.ones((2, 3, 3, 1))
    with self.assertRaisesRegex(ValueError, "Unknown solver 'euler'"):
      solvers.window_solve(eps_fn, z, 1.0, 0.75, 4, AC, solver="euler")
    with self.assertRaisesRegex(ValueError, "num_steps must be a positive integer"):
      solvers.ddim_window_solve(eps_fn, z, 1.0, 0.75, 0, AC)
    with self.assertRaisesRegex(ValueError, "t_start > t_end"):
      solvers.ddim_window_solve(eps_fn, z, jnp.array([0.75, 0.5]), jnp.array([1.0, 0.25]), 4, AC)
    with self.assertRaisesRegex(ValueError, r"t_start must lie in \[0, 1\]"):
      solvers.ddim_window_solve(eps_fn, z, 1000.0, 750.0, 4, AC)
    with self.assertRaisesRegex(ValueError, r"shape \[B\] = \[2\]"):
      solvers.ddim_window_solve(eps_fn, z, jnp.ones((3,)), jnp.zeros((3,)), 4, AC)
    with self.assertRaisesRegex(ValueError, "length 1/K"):
      solvers.ddim_window_solve(eps_fn, z, 1.0, 0.7, 4, AC)
    with self.assertRaisesRegex(ValueError, "eps_fn returned shape"):
      solvers.ddim_window_solve(lambda z, t: z[..., :0], z, 1.0, 0.75, 2, AC)
    with self.assertRaisesRegex(ValueError, "needs uncond_context"):
      solvers.guided_eps_fn(eps_fn, z, AC, mode="guided")
    with self.assertRaisesRegex(ValueError, "runs the teacher unguided"):
      solvers.guided_eps_fn(eps_fn, z, AC, mode="cfg_sync", guidance_scale=7.5)
    with self.assertRaisesRegex(ValueError, "Unknown teacher prediction_type 'sample'"):
      solvers.to_epsilon(z, z, 0.5, "sample")
    with self.assertRaisesRegex(ValueError, "Unknown guidance mode"):
      solvers.guided_eps_fn(eps_fn, z, AC, mode="cfg")


if __name__ == "__main__":
  absltest.main()
