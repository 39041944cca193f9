"""AutoencoderKL parity against diffusers on a tiny, perturbed config (float32), plus latent sampling."""

from absl.testing import absltest
import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import torch

import models_testlib as tl
from perflow_jax.models.vae import AutoencoderKL, VAEConfig, sample_latents

HIGHEST = jax.lax.Precision.HIGHEST
TINY = dict(block_out_channels=(32, 64, 64), norm_num_groups=8, layers_per_block=1, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)


class VAEParityTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    torch.manual_seed(0)
    cls.ref = tl.perturb_(diffusers.AutoencoderKL(**TINY), seed=3)
    cls.module = AutoencoderKL(VAEConfig.from_diffusers_config(dict(cls.ref.config)), precision=HIGHEST)
    cls.params = tl.convert(cls.ref, cls.module, what="tiny VAE")
    m = cls.module
    cls.encode = staticmethod(jax.jit(lambda p, x: m.apply({"params": p}, x, method=m.encode)))
    cls.decode = staticmethod(jax.jit(lambda p, z: m.apply({"params": p}, z, method=m.decode)))

  def test_encode_moments_match(self):
    # 15 x 18: odd and even sizes through the right/bottom-padded stride-2 downsamplers.
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 15, 18)).astype(np.float32)
    post = self.ref.encode(torch.from_numpy(x)).latent_dist
    mean, logvar = self.encode(self.params, x.transpose(0, 2, 3, 1))
    self.assertEqual(mean.shape, (2, 3, 4, 4))  # 15 -> 7 -> 3 and 18 -> 9 -> 4, as PyTorch
    for name, got, want in (("mean", mean, post.mean), ("logvar", logvar, post.logvar)):
      err, rel = tl.rel_err(got, tl.nchw_to_nhwc(want))
      print(f"VAE encode {name}: max abs err {err:.3g}, relative {rel:.3g}")
      self.assertLess(rel, 1e-5)

  def test_decode_matches(self):
    z = np.random.default_rng(1).standard_normal((2, 4, 5, 6)).astype(np.float32)
    want = tl.nchw_to_nhwc(self.ref.decode(torch.from_numpy(z)).sample)
    got = self.decode(self.params, z.transpose(0, 2, 3, 1))
    self.assertEqual(got.shape, (2, 20, 24, 3))
    err, rel = tl.rel_err(got, want)
    print(f"VAE decode: max abs err {err:.3g}, relative {rel:.3g}")
    self.assertLess(rel, 1e-5)

  def test_logvar_is_clipped(self):
    x = np.zeros((1, 8, 8, 3), np.float32)
    for shift, bound in ((1e4, 20.0), (-1e4, -30.0)):
      params = jax.tree_util.tree_map(lambda a: a, self.params)
      bias = np.array(params["quant_conv"]["bias"])
      bias[4:] += shift  # the logvar half of the moments
      params["quant_conv"]["bias"] = bias
      _, logvar = self.encode(params, x)
      np.testing.assert_array_equal(np.asarray(logvar), bound)


class SampleLatentsTest(absltest.TestCase):

  def test_closed_form(self):
    key = jax.random.key(7)
    mean = jnp.full((2, 3, 3, 4), 0.5)
    logvar = jnp.full((2, 3, 3, 4), np.log(0.25))
    noise = jax.random.normal(key, mean.shape, jnp.float32)
    z = sample_latents(key, mean, logvar, 0.18215)
    np.testing.assert_allclose(z, (0.5 + 0.5 * noise) * 0.18215, rtol=1e-6)
    z_shift = sample_latents(key, mean, logvar, 0.13025, shift_factor=0.1)
    np.testing.assert_allclose(z_shift, (0.5 + 0.5 * noise - 0.1) * 0.13025, rtol=1e-6)

  def test_moments_of_many_draws(self):
    mean = jnp.full((20000,), 1.5)
    logvar = jnp.full((20000,), np.log(4.0))
    z = sample_latents(jax.random.key(0), mean, logvar, 2.0)
    self.assertAlmostEqual(float(z.mean()), 3.0, delta=0.06)  # 3 sigma of the sample mean: 4 / sqrt(2e4) * 3
    self.assertAlmostEqual(float(z.std()), 4.0, delta=0.06)


class VAEConfigTest(absltest.TestCase):

  def test_round_trip_and_defaults(self):
    cfg = VAEConfig.from_diffusers_config(TINY)
    self.assertEqual(VAEConfig.from_diffusers_config(cfg.to_diffusers_config()), cfg)
    self.assertEqual(cfg.scaling_factor, 0.18215)
    self.assertIsNone(cfg.shift_factor)
    sdxl = VAEConfig.from_diffusers_config(dict(TINY, scaling_factor=0.13025, _class_name="AutoencoderKL"))
    self.assertEqual(sdxl.scaling_factor, 0.13025)

  def test_unsupported_values_raise(self):
    for change in (dict(act_fn="gelu"), dict(latents_mean=[0.0] * 4), dict(up_block_types=["UpBlock2D"] * 3),
                   dict(unknown_key=1), dict(norm_num_groups=7)):
      with self.assertRaises(ValueError, msg=str(change)):
        VAEConfig.from_diffusers_config(dict(TINY, **change))


if __name__ == "__main__":
  absltest.main()
