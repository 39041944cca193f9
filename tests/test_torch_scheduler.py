"""PeRFlowTorchScheduler: reference constants, parity with the JAX scheduler, and the exported UNet in diffusers."""

import importlib
import sys
import tempfile
from unittest import mock

from absl.testing import absltest
import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import torch

from perflow_jax import flow
from perflow_jax import sampling
from perflow_jax import torch_scheduler
from perflow_jax.torch_scheduler import PeRFlowTorchScheduler
import sample_export_testutil as sx

SD15_SCHEDULER_CONFIG = sx.SD15_SCHEDULER_CONFIG

class SchedulerTest(absltest.TestCase):

  def test_timesteps_reference_values(self):
    s = PeRFlowTorchScheduler.from_config(SD15_SCHEDULER_CONFIG, prediction_type="diff_eps", num_time_windows=4)
    expected = {4: [1000, 750, 500, 250], 5: [1000, 875, 750, 500, 250], 6: [1000, 875, 750, 625, 500, 250],
                8: [1000, 875, 750, 625, 500, 375, 250, 125]}
    for n, ts in expected.items():
      s.set_timesteps(n)
      self.assertEqual(s.timesteps.tolist(), ts)
      self.assertEqual(s.timesteps.dtype, torch.int64)
    s.set_timesteps(16)
    self.assertEqual(s.timesteps[:4].tolist(), [1000, 937, 875, 812])
    self.assertEqual(s.timesteps[-1].item(), 62)
    self.assertEqual(s.init_noise_sigma, 1.0)
    self.assertEqual(s.config.prediction_type, "diff_eps")
    self.assertEqual(s.config.num_time_windows, 4)

  def test_fewer_steps_than_windows_refused(self):
    s = PeRFlowTorchScheduler(num_time_windows=4)
    with self.assertRaisesRegex(ValueError, r"num_inference_steps=3 is fewer than num_time_windows=4"):
      s.set_timesteps(3)

  def test_bad_prediction_type_names_the_choices(self):
    with self.assertRaisesRegex(ValueError, r"'epsilon' is not a PeRFlow prediction type.*diff_eps"):
      PeRFlowTorchScheduler.from_config(SD15_SCHEDULER_CONFIG)

  def test_step_matches_jax_scheduler(self):
    rng = np.random.default_rng(0)
    z = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
    out = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
    for pred in ("diff_eps", "ddim_eps", "velocity"):
      for k, n in ((4, 4), (4, 8), (4, 6), (2, 5)):
        s = PeRFlowTorchScheduler(prediction_type=pred, num_time_windows=k)
        s.set_timesteps(n)
        ref = flow.PeRFlowScheduler(num_windows=k, prediction_type=pred)
        ts, nxt = ref.timesteps(n), ref.next_timesteps(n)
        np.testing.assert_array_equal(s.timesteps.numpy(), ts)
        for t, t_next in zip(ts, nxt):
          got = s.step(torch.from_numpy(out), torch.tensor(t), torch.from_numpy(z)).prev_sample.numpy()
          want = np.asarray(ref.step(jnp.asarray(out), int(t), int(t_next), jnp.asarray(z)))
          np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"{pred} K={k} N={n} t={t}")
    # One step per window lands on the window end z_end = lam z + eta eps: the first window of diff_eps K=4.
    s = PeRFlowTorchScheduler(prediction_type="diff_eps")
    s.set_timesteps(4)
    prev = s.step(torch.from_numpy(out), 1000, torch.from_numpy(z), return_dict=False)[0].numpy()
    np.testing.assert_allclose(prev, 3.4858 * z - 3.3393 * out, rtol=1e-3, atol=1e-3)

  def test_add_noise_and_identity_input_scaling(self):
    s = PeRFlowTorchScheduler()
    x = torch.ones(2, 1, 1, 1)
    noise = torch.zeros(2, 1, 1, 1)
    ab = flow.schedule.sd_alphas_cumprod()
    got = s.add_noise(x, noise, torch.tensor([1000, 1])).flatten().numpy()
    np.testing.assert_allclose(got, np.sqrt([ab[999], ab[0]]), rtol=1e-6)
    self.assertIs(s.scale_model_input(x, 1000), x)

  def test_missing_torch_gives_install_hint(self):
    with mock.patch.dict(sys.modules, {"torch": None}):
      sys.modules.pop("perflow_jax.torch_scheduler", None)
      with self.assertRaisesRegex(ImportError, r"pip install perflow_jax\[torch\]"):
        importlib.import_module("perflow_jax.torch_scheduler")
    sys.modules["perflow_jax.torch_scheduler"] = torch_scheduler


class DiffusersConventionsTest(absltest.TestCase):
  """What diffusers expects of every scheduler, checked here for ours."""

  def test_schedule_attributes_equal_ddim_schedulers_for_every_beta_schedule(self):
    for schedule_name in ("linear", "scaled_linear", "squaredcos_cap_v2"):
      for set_alpha_to_one in (False, True):
        kwargs = dict(beta_schedule=schedule_name, set_alpha_to_one=set_alpha_to_one, beta_start=0.00085,
                      beta_end=0.012)
        ours, ddim = PeRFlowTorchScheduler(**kwargs), diffusers.DDIMScheduler(**kwargs)
        for name in ("betas", "alphas", "alphas_cumprod", "final_alpha_cumprod"):
          torch.testing.assert_close(getattr(ours, name), getattr(ddim, name), rtol=0, atol=0,
                                     msg=f"{schedule_name} {name}")
    # Stable Diffusion's schedule is the one the JAX side trains on, bit for bit.
    np.testing.assert_array_equal(PeRFlowTorchScheduler().alphas_cumprod.numpy(), flow.sd_alphas_cumprod())

  def test_trained_betas(self):
    betas = np.linspace(1e-4, 2e-2, 1000)
    s = PeRFlowTorchScheduler(trained_betas=betas.tolist())
    torch.testing.assert_close(s.alphas_cumprod, torch.cumprod(1 - torch.tensor(betas, dtype=torch.float32), 0),
                               rtol=0, atol=0)
    with self.assertRaisesRegex(ValueError, r"trained_betas has shape \(999,\).*num_train_timesteps=1000"):
      PeRFlowTorchScheduler(trained_betas=betas[:999].tolist())
    with self.assertRaisesRegex(ValueError, "not one of"):
      PeRFlowTorchScheduler(beta_schedule="cosine")

  def test_config_round_trip_and_from_config_across_compatibles(self):
    s = PeRFlowTorchScheduler(prediction_type="ddim_eps", num_time_windows=3, beta_schedule="linear",
                              beta_start=1e-4, beta_end=2e-2)
    folder = tempfile.mkdtemp(prefix="perflow_scheduler_")
    s.save_config(folder)
    loaded = PeRFlowTorchScheduler.from_pretrained(folder)
    strip = lambda c: {k: v for k, v in c.items() if k != "_use_default_values"}  # diffusers' bookkeeping
    self.assertEqual(strip(loaded.config), strip(s.config))
    torch.testing.assert_close(loaded.alphas_cumprod, s.alphas_cumprod, rtol=0, atol=0)
    # Into every compatible scheduler and back: the schedule survives, our own fields come back.
    self.assertIn("EulerDiscreteScheduler", s.compatibles.__repr__())
    tested = []
    for cls in s.compatibles:
      try:
        other = cls.from_config(s.config)
      except ImportError:  # DPMSolverSDEScheduler needs torchsde, not installed here
        continue
      tested.append(cls.__name__)
      back = PeRFlowTorchScheduler.from_config(other.config)
      for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule"):
        self.assertEqual(back.config[key], s.config[key], f"{cls.__name__} {key}")
      self.assertEqual((back.config.prediction_type, back.config.num_time_windows), ("ddim_eps", 3))
    self.assertGreaterEqual(len(tested), 13, tested)

  def test_step_shapes_determinism_and_identity_input(self):
    s = PeRFlowTorchScheduler()
    s.set_timesteps(6)
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=gen)
    out = torch.randn(2, 4, 8, 8, generator=gen)
    self.assertIs(s.scale_model_input(sample, s.timesteps[0]), sample)
    runs = []
    for _ in range(2):
      z = sample
      for t in s.timesteps:
        step = s.step(out, t, z)
        self.assertEqual(step.prev_sample.shape, sample.shape)
        self.assertEqual(step.prev_sample.dtype, sample.dtype)
        z = step.prev_sample
      runs.append(z)
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)  # no hidden state, no randomness
    half = s.step(out.half(), s.timesteps[0], sample.half(), return_dict=False)[0]
    self.assertEqual(half.dtype, torch.float16)

  def test_add_noise_shapes(self):
    s = PeRFlowTorchScheduler()
    for shape in ((3, 4, 8, 8), (3, 4, 2, 8, 8)):
      x, noise = torch.ones(shape), torch.zeros(shape)
      noisy = s.add_noise(x, noise, torch.tensor([1000, 500, 1]))
      self.assertEqual(noisy.shape, x.shape)
      ab = s.alphas_cumprod[[999, 499, 0]].sqrt()
      torch.testing.assert_close(noisy.flatten(1)[:, 0], ab, rtol=0, atol=0)


class ExportedUNetTest(absltest.TestCase):
  """The trained tiny student sampled in JAX and, exported, in PyTorch with PeRFlowTorchScheduler."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.trained = sx.loaded_run("student")
    m = cls.trained.models
    cls.torch_unet = sx.torch_unet(cls.trained.params, m.unet)
    cls.context = sampling.encode_prompts(m.text_encoder, m.text_params, m.tokenizer,
                                          ["a red circle on a blue background", "a green square"])
    cls.uncond = sampling.encode_prompts(m.text_encoder, m.text_params, m.tokenizer, [""])
    cls.noise = np.asarray(jax.random.normal(jax.random.key(3), (2, 8, 8, 4)))

  def _torch_sample(self, scheduler, num_steps, guidance):
    scheduler.set_timesteps(num_steps)
    z = torch.from_numpy(self.noise.transpose(0, 3, 1, 2).copy())
    ctx = torch.from_numpy(np.array(self.context))
    unc = torch.from_numpy(np.repeat(np.asarray(self.uncond), 2, axis=0))
    with torch.no_grad():
      for t in scheduler.timesteps:
        out = self.torch_unet(torch.cat([z, z]), t, encoder_hidden_states=torch.cat([unc, ctx])).sample
        eps = out[:2] + guidance * (out[2:] - out[:2])
        z = scheduler.step(eps, t, z).prev_sample
    return z.numpy().transpose(0, 2, 3, 1)

  def test_perflow_jax_and_torch_agree(self):
    pf = self.trained.config.perflow
    scheduler = PeRFlowTorchScheduler.from_config(SD15_SCHEDULER_CONFIG, prediction_type=pf.prediction_type,
                                                  num_time_windows=pf.num_windows)
    unet = self.trained.models.unet
    for n in (4, 8):
      with jax.default_matmul_precision("highest"):
        want = np.asarray(sampling.perflow_sample(unet, self.trained.params, self.noise, self.context, self.uncond,
                                                  n, 2.0, pf.num_windows, pf.prediction_type))
      got = self._torch_sample(scheduler, n, 2.0)
      diff = np.abs(got - want).max()
      self.assertLessEqual(diff, 1e-3, f"N={n}: max |torch - jax| = {diff}")
      self.assertGreater(np.abs(want - self.noise).max(), 0.1)  # the loop moved the latents

  def test_ddim_matches_diffusers_ddim(self):
    ddim = diffusers.DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    np.testing.assert_array_equal(sampling.ddim_leading_timesteps(4), [751, 501, 251, 1])
    for n in (3, 10):
      with jax.default_matmul_precision("highest"):
        want = np.asarray(sampling.ddim_sample(self.trained.models.unet, self.trained.params, self.noise, self.context,
                                               self.uncond, n, 2.0, "epsilon"))
      got = self._torch_sample(ddim, n, 2.0)
      np.testing.assert_array_equal(ddim.timesteps.numpy(), sampling.ddim_leading_timesteps(n))
      diff = np.abs(got - want).max()
      self.assertLessEqual(diff, 1e-3, f"DDIM N={n}: max |torch - jax| = {diff}")

  def test_stable_diffusion_pipeline_runs_exported_unet(self):
    vae, text, tokenizer = sx.torch_vae_and_text(self.trained)
    pf = self.trained.config.perflow
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer, unet=self.torch_unet,
        scheduler=diffusers.PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.scheduler = PeRFlowTorchScheduler.from_config(pipe.scheduler.config, prediction_type=pf.prediction_type,
                                                       num_time_windows=pf.num_windows)
    pipe.set_progress_bar_config(disable=True)
    prompt = "a red circle on a blue background"
    out = pipe([prompt], num_inference_steps=4, guidance_scale=4.5, height=16, width=16, output_type="np",
               generator=torch.Generator().manual_seed(0))
    self.assertEqual(out.images.shape, (1, 16, 16, 3))
    self.assertTrue(np.all(np.isfinite(out.images)))
    self.assertEqual(pipe.scheduler.timesteps.tolist(), [1000, 750, 500, 250])
    # The whole pipeline (torch text encoder, CFG against the "" prompt, scheduler) against JAX on the same noise.
    latents = pipe([prompt], num_inference_steps=4, guidance_scale=4.5, height=16, width=16, output_type="latent",
                   latents=torch.from_numpy(self.noise[:1].transpose(0, 3, 1, 2).copy())).images
    with jax.default_matmul_precision("highest"):
      want = np.asarray(sampling.perflow_sample(self.trained.models.unet, self.trained.params, self.noise[:1],
                                                self.context[:1], self.uncond, 4, 4.5))
    diff = np.abs(latents.numpy().transpose(0, 2, 3, 1) - want).max()
    self.assertLessEqual(diff, 1e-3, f"pipeline vs JAX: max |diff| = {diff}")

if __name__ == "__main__":
  absltest.main()
