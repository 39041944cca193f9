"""Every integer and time grid against the reference's own float32 PyTorch expressions, transcribed here.

The transcriptions are the reference's lines (src/pfode_solver.py, src/scheduler_perflow.py, the training scripts)
run in PyTorch on this CPU. One operation differs by device: `float32_tensor / python_number` is a true division
on CPU and a multiplication by the float32 reciprocal on CUDA (PyTorch 2.0, where the released weights were
trained); the CUDA transcriptions spell that multiplication out.
"""

import itertools

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np
import torch

from perflow_jax import flow
from perflow_jax.flow import grids
from perflow_jax.flow import schedule
from perflow_jax.flow import solvers

N = 1000


def _div_python_number(x: torch.Tensor, d: float, device: str) -> torch.Tensor:
  if device == "cpu":
    return x / d  # what the reference line does on this machine
  # PyTorch 2.0's CUDA div_true kernel for a CPU scalar divisor: inv_b = accscalar_t(1.0) / float(d); a * inv_b.
  return x * (torch.tensor(1.0, dtype=torch.float32) / torch.tensor(d, dtype=torch.float32))


def _reference_solver_times(t_start, t_end, num_steps):
  """PFODESolver.get_timesteps up to its time points."""
  t_start, t_end = t_start[:, None], t_end[:, None]
  timepoints = torch.arange(0, num_steps, 1).expand(t_start.shape[0], num_steps)
  interval = (t_end - t_start) / (torch.ones([1]) * num_steps)
  return t_start + interval * timepoints


def _reference_get_timesteps(t_start, t_end, num_steps, device):
  """PFODESolver.get_timesteps, line by line (t_initial = 1, stepsize = (0 - 1) / (0 - 1000))."""
  timepoints = _reference_solver_times(t_start, t_end, num_steps)
  timesteps = (N - 1) + _div_python_number(timepoints - 1, (0 - 1) / (0 - N), device)
  return timesteps.round().long()


def _reference_windows(num_windows):
  """Time_Windows: Python floats, stored into float32 tensors by lookup_window."""
  starts = [1. * i / num_windows for i in range(1, num_windows + 1)][::-1]
  return starts, starts[1:] + [0]


def _reference_lookup_window(timepoints, num_windows):
  starts, ends = _reference_windows(num_windows)
  t_start, t_end = torch.zeros_like(timepoints), torch.zeros_like(timepoints)
  for i, tp in enumerate(timepoints):
    idx = 0
    while (tp - 0.1 * (1. / 1000)) <= ends[idx]:
      idx += 1
    t_start[i], t_end[i] = starts[idx], ends[idx]
  return t_start, t_end


def _reference_timepoints(grid, device):
  """The training scripts' t: (u * grid).floor() / grid, then 1 - t, for every value floor(u * grid) takes."""
  floored = torch.arange(grid, dtype=torch.float32)
  return 1 - _div_python_number(floored, grid, device)


class TeacherGridTest(absltest.TestCase):

  def test_complete_grid_k1_to_10_s1_to_20_on_both_devices(self):
    differing = {}
    for device in grids.DEVICES:
      total = 0
      for k, s in itertools.product(range(1, 11), range(1, 21)):
        starts, ends = _reference_windows(k)
        want = _reference_get_timesteps(torch.tensor(starts), torch.tensor(ends), s, device).numpy()
        got = grids.teacher_timestep_table(k, s, N, device)
        np.testing.assert_array_equal(got, want, err_msg=f"{device} K={k} S={s}")
        total += want.size
      self.assertEqual(total, 11550)
    for k, s in itertools.product(range(1, 11), range(1, 21)):
      cuda, cpu = grids.teacher_timestep_table(k, s, N, "cuda"), grids.teacher_timestep_table(k, s, N, "cpu")
      starts, ends = _reference_windows(k)
      times = _reference_solver_times(torch.tensor(starts), torch.tensor(ends), s)
      before = (times * N - 1).round().long().numpy()  # this project before: round(1000 t - 1)
      differing["cuda/cpu"] = differing.get("cuda/cpu", 0) + int(np.sum(cuda != cpu))
      differing["cpu/before"] = differing.get("cpu/before", 0) + int(np.sum(cpu != before))
    # The count (the reference on CPU vs round(1000 t - 1)), and how much the device matters.
    self.assertEqual(differing, {"cuda/cpu": 38, "cpu/before": 56})

  def test_sd15_recipe_grid(self):
    table = grids.teacher_timestep_table(4, 8)
    np.testing.assert_array_equal(table[3], [249, 218, 187, 155, 124, 93, 62, 30])   # exact arithmetic: 186
    np.testing.assert_array_equal(table[2], [499, 468, 437, 405, 374, 343, 312, 280])  # on CPU: 436
    self.assertEqual(grids.teacher_timestep_table(4, 8, device="cpu")[2, 2], 436)

  def test_solver_timesteps_concrete_and_traced(self):
    tw = flow.TimeWindows(4)
    t = jnp.asarray(grids.training_times(1000))[::37]
    t_start, t_end = tw.bounds(t)
    want = grids.teacher_timesteps(np.asarray(t_start), np.asarray(t_end), 8)
    concrete, prev = solvers.ddim_timesteps(t_start, t_end, 8)
    np.testing.assert_array_equal(np.asarray(concrete), want)
    np.testing.assert_array_equal(np.asarray(prev), want - 31)
    traced = jax.jit(lambda s, e: solvers.ddim_timesteps(s, e, 8, num_windows=4)[0])(t_start, t_end)
    np.testing.assert_array_equal(np.asarray(traced), want)

  def test_traced_windows_need_num_windows(self):
    with self.assertRaisesRegex(ValueError, "num_windows=K"):
      jax.jit(lambda s, e: solvers.ddim_timesteps(s, e, 8)[0])(jnp.ones(2), jnp.full(2, 0.75))
    with self.assertRaisesRegex(ValueError, r"TimeWindows\(4\)'s windows"):
      solvers.ddim_timesteps(jnp.array([0.6]), jnp.array([0.35]), 8, num_windows=4)

  def test_teacher_timestep_of_time(self):
    t = np.array([1.0, 0.9375, 0.8125, 0.75, 0.1875, 0.0], np.float32)
    for device in grids.DEVICES:
      want = ((N - 1) + _div_python_number(torch.tensor(t) - 1, 0.001, device)).round().long().numpy()
      np.testing.assert_array_equal(schedule.teacher_timestep(t, device=device), want, err_msg=device)
    self.assertEqual(int(schedule.teacher_timestep(np.float32(0.1875))), 187)


class TimeAndWindowGridTest(absltest.TestCase):

  def test_training_times_on_the_1000_and_200_point_grids(self):
    for grid, device in itertools.product((1000, 200), grids.DEVICES):
      np.testing.assert_array_equal(grids.training_times(grid, device), _reference_timepoints(grid, device).numpy(),
                                    err_msg=f"grid={grid} {device}")
    # The devices disagree in the last bit of some t (the student's time input 1000 t follows).
    self.assertGreater(np.sum(grids.training_times(1000, "cuda") != grids.training_times(1000, "cpu")), 0)

  def test_windows_and_alpha_indices_for_every_training_time(self):
    for grid, k in itertools.product((1000, 200), range(1, 11)):
      t = _reference_timepoints(grid, "cuda")
      ref_start, ref_end = _reference_lookup_window(t, k)
      t_start, t_end = flow.TimeWindows(k).bounds(jnp.asarray(t.numpy()))
      msg = f"grid={grid} K={k}"
      np.testing.assert_array_equal(np.asarray(t_start), ref_start.numpy(), err_msg=msg)
      np.testing.assert_array_equal(np.asarray(t_end), ref_end.numpy(), err_msg=msg)
      # add_noise: clamp((t_start * 1000).long() - 1, min=0); get_window_alpha: (t * 1000 - 1).long(), clamped
      # at the end.
      np.testing.assert_array_equal(np.asarray(schedule.alpha_bar_index(t_start)),
                                    torch.clamp((ref_start * N).long() - 1, min=0).numpy(), err_msg=msg)
      np.testing.assert_array_equal(np.asarray(schedule.alpha_bar_index(t_start)),
                                    (ref_start * N - 1).long().numpy(), err_msg=msg)
      np.testing.assert_array_equal(np.asarray(schedule.alpha_bar_index(t_end)),
                                    torch.clamp((ref_end * N - 1).long(), min=0).numpy(), err_msg=msg)

  def test_sampled_times_are_grid_values(self):
    t = np.asarray(flow.TimeWindows(4).sample_t(jax.random.PRNGKey(0), 4096, grid=200))
    self.assertTrue(np.isin(t, grids.training_times(200)).all())
    self.assertEqual(len(np.unique(t)), 200)


def _table_eps(c, d):
  """A teacher whose epsilon depends on its timestep: eps = c[t] z + d[t] (one multiply, one add: the same
  float32 result in both frameworks)."""
  def eps_jax(z, timestep):
    idx = jnp.clip(timestep, 0, N - 1)
    return z * jnp.asarray(c)[idx][:, None, None, None] + jnp.asarray(d)[idx][:, None, None, None]

  def eps_torch(z, timestep):
    return z * torch.from_numpy(c)[timestep][:, None, None, None] + torch.from_numpy(d)[timestep][:, None, None, None]

  return eps_jax, eps_torch


def _reference_solve_and_target(eps, latents, t_start, t_end, num_steps, num_windows, alphas_cumprod, device):
  """PFODESolver.solve (epsilon teacher, no guidance) and the ddim_eps target, in float32 PyTorch."""
  timesteps = _reference_get_timesteps(t_start, t_end, num_steps, device)
  interval = N // (num_windows * num_steps)
  final_alpha_cumprod = alphas_cumprod[0]
  start = latents
  for i in range(num_steps):
    noise_pred = eps(latents, timesteps[:, i])
    batch_timesteps = timesteps[:, i]
    prev_timestep = batch_timesteps - interval
    alpha_prod_t = alphas_cumprod[batch_timesteps]
    alpha_prod_t_prev = torch.zeros_like(alpha_prod_t)
    for ib in range(prev_timestep.shape[0]):
      alpha_prod_t_prev[ib] = alphas_cumprod[prev_timestep[ib]] if prev_timestep[ib] >= 0 else final_alpha_cumprod
    beta_prod_t = 1 - alpha_prod_t
    pred_original_sample = (latents - beta_prod_t[:, None, None, None] ** (0.5) * noise_pred) / (
        alpha_prod_t[:, None, None, None] ** (0.5))
    pred_sample_direction = (1 - alpha_prod_t_prev[:, None, None, None]) ** (0.5) * noise_pred
    latents = alpha_prod_t_prev[:, None, None, None] ** (0.5) * pred_original_sample + pred_sample_direction
  ac_start = alphas_cumprod[(t_start * N - 1).long()][:, None, None, None]
  ac_end = alphas_cumprod[torch.clamp((t_end * N - 1).long(), min=0)][:, None, None, None]
  lambda_s = (ac_end / ac_start) ** 0.5
  eta_s = (1 - ac_end) ** 0.5 - (ac_end / ac_start * (1 - ac_start)) ** 0.5
  return latents, (latents - lambda_s * start) / eta_s


class WindowEndTargetTest(absltest.TestCase):
  """K = 4, S = 8 (the SD1.5 recipe): our traced training-path solve against the reference solver."""

  def test_targets_match_the_reference_solver(self):
    rng = np.random.default_rng(0)
    c = rng.uniform(0.2, 0.6, N).astype(np.float32)
    d = rng.normal(size=N).astype(np.float32)
    eps_jax, eps_torch = _table_eps(c, d)
    z = rng.normal(size=(8, 4, 3, 3)).astype(np.float32)
    starts, ends = _reference_windows(4)
    t_start = torch.tensor(starts * 2, dtype=torch.float32)
    t_end = torch.tensor(ends * 2, dtype=torch.float32)
    ac = schedule.sd_alphas_cumprod()

    @jax.jit
    def ours(z, t_start, t_end):
      z_end = flow.window_solve(eps_jax, z, t_start, t_end, 8, ac, num_windows=4)
      return z_end, flow.perflow_target(z, z_end, t_start, t_end, ac, "ddim_eps")

    z_end, target = ours(jnp.asarray(z), jnp.asarray(t_start.numpy()), jnp.asarray(t_end.numpy()))
    want_end, want_target = _reference_solve_and_target(eps_torch, torch.from_numpy(z), t_start, t_end, 8, 4,
                                                        torch.from_numpy(ac), "cuda")
    np.testing.assert_allclose(np.asarray(z_end), want_end.numpy(), rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(np.asarray(target), want_target.numpy(), rtol=2e-6, atol=2e-6)
    # The test can tell the grids apart: the CPU grid (436 in window [0.5, 0.25]) moves that window's target.
    _, cpu_target = _reference_solve_and_target(eps_torch, torch.from_numpy(z), t_start, t_end, 8, 4,
                                                torch.from_numpy(ac), "cpu")
    moved = np.abs(cpu_target.numpy() - want_target.numpy()).max(axis=(1, 2, 3))
    self.assertGreater(moved[2], 1e-5)
    np.testing.assert_array_equal(moved[[0, 1, 3]], 0.0)


if __name__ == "__main__":
  absltest.main()
