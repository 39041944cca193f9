"""Per-layer parity where a numerics pitfall hides (sd_models.md section 4), against torch/diffusers layers."""

from absl.testing import absltest
from diffusers.models import attention_processor, embeddings, resnet
from diffusers.models import activations, downsampling
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

import models_testlib as tl
from perflow_jax.models import layers
from perflow_jax.models.unet import _Attention
from perflow_jax.weights import names

HIGHEST = jax.lax.Precision.HIGHEST


def _params_for(module, ref, *inputs):
  target = nn.meta.unbox(jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs))["params"])
  return names.torch_to_flax(tl.state_dict_numpy(ref), target, what=type(module).__name__)


def _rel(got, want):
  return tl.rel_err(got, want.detach().numpy() if isinstance(want, torch.Tensor) else want)[1]


class NormTest(absltest.TestCase):

  def test_group_norm_eps_on_small_variance_input(self):
    rng = np.random.default_rng(0)
    # std 3e-3 (variance 1e-5): the eps term is as large as the variance, so 1e-5 vs 1e-6 is a 40% effect.
    x = (3e-3 * rng.standard_normal((2, 4, 5, 16))).astype(np.float32)
    for eps in (1e-5, 1e-6):
      ref = tl.perturb_(torch.nn.GroupNorm(4, 16, eps=eps), seed=1, scale=0.3)
      want = tl.nchw_to_nhwc(ref(tl.nhwc_to_nchw(x)))
      ours = layers.GroupNorm(4, eps)
      params = _params_for(ours, ref, x)
      self.assertLess(_rel(ours.apply({"params": params}, x), want), 1e-5)
      other = layers.GroupNorm(4, 1e-6 if eps == 1e-5 else 1e-5)
      self.assertGreater(_rel(other.apply({"params": params}, x), want), 1e-2)  # a wrong eps is visible here

  def test_group_norm_two_pass_variance_on_large_mean(self):
    # At mean 30 and std 3e-2, E[x^2] - E[x]^2 in float32 loses most digits (ulp(900) ~ 6e-5 against a variance
    # of 9e-4); the two-pass form only sees the float32 rounding of x itself (ulp(30) / 3e-2 ~ 6e-5).
    x = (30.0 + 3e-2 * np.random.default_rng(1).standard_normal((1, 8, 8, 8))).astype(np.float32)
    ref = tl.perturb_(torch.nn.GroupNorm(2, 8, eps=1e-6), seed=2, scale=0.3)
    want = tl.nchw_to_nhwc(ref(tl.nhwc_to_nchw(x)))
    ours = layers.GroupNorm(2, 1e-6)
    params = _params_for(ours, ref, x)
    self.assertLess(_rel(ours.apply({"params": params}, x), want), 5e-4)
    xg = x.reshape(1, -1, 2, 4)
    fast_var = np.mean(xg * xg, axis=(1, 3), keepdims=True) - np.square(np.mean(xg, axis=(1, 3), keepdims=True))
    true_var = np.var(xg.astype(np.float64), axis=(1, 3), keepdims=True)
    self.assertGreater(float(np.max(np.abs(fast_var / true_var - 1))), 1e-2)  # what fast variance would cost
  def test_group_norm_gradients_match_torch(self):
    # The statistics sum over positions first and then over each group's channels; the input, scale and bias
    # gradients must still be torch's (several channels per group, an odd number of positions).
    x = np.random.default_rng(3).standard_normal((2, 3, 5, 12)).astype(np.float32)
    probe = np.random.default_rng(4).standard_normal(x.shape).astype(np.float32)
    ref = tl.perturb_(torch.nn.GroupNorm(3, 12, eps=1e-5), seed=3, scale=0.3)
    x_torch = tl.nhwc_to_nchw(x).requires_grad_()
    with torch.enable_grad():
      (ref(x_torch) * tl.nhwc_to_nchw(probe)).sum().backward()
    ours = layers.GroupNorm(3, 1e-5)
    params = _params_for(ours, ref, x)
    loss = lambda p, x: jnp.sum(ours.apply({"params": p}, x) * probe)
    d_params, d_x = jax.grad(loss, argnums=(0, 1))(params, jnp.asarray(x))
    self.assertLess(_rel(d_x, tl.nchw_to_nhwc(x_torch.grad)), 1e-5)
    self.assertLess(_rel(d_params["scale"], ref.weight.grad), 1e-5)
    self.assertLess(_rel(d_params["bias"], ref.bias.grad), 1e-5)


  def test_layer_norm_small_variance(self):
    x = (3e-3 * np.random.default_rng(2).standard_normal((3, 7, 24))).astype(np.float32)
    ref = tl.perturb_(torch.nn.LayerNorm(24, eps=1e-5), seed=3, scale=0.3)
    ours = layers.LayerNorm(1e-5)
    got = ours.apply({"params": _params_for(ours, ref, x)}, x)
    self.assertLess(_rel(got, ref(torch.from_numpy(x))), 1e-5)


class ActivationAndEmbeddingTest(absltest.TestCase):

  def test_geglu_uses_exact_gelu(self):
    x = (3.0 * np.random.default_rng(3).standard_normal((2, 9, 16))).astype(np.float32)
    ref = tl.perturb_(activations.GEGLU(16, 40), seed=4)
    ours = layers.GEGLU(40, precision=HIGHEST)
    params = _params_for(ours, ref, x)
    want = ref(torch.from_numpy(x))
    self.assertLess(_rel(ours.apply({"params": params}, x), want), 1e-6)
    # The tanh approximation is measurably different on ~3 sigma inputs.
    h = x @ np.asarray(params["proj"]["kernel"]) + np.asarray(params["proj"]["bias"])
    value, gate = np.split(h, 2, axis=-1)
    self.assertGreater(_rel(value * nn.gelu(gate, approximate=True), want), 1e-5)

  def test_quick_gelu_and_gelu_formulas(self):
    x = np.linspace(-6, 6, 101, dtype=np.float32)
    np.testing.assert_allclose(layers.quick_gelu(x), x / (1 + np.exp(-1.702 * x)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layers.gelu_exact(x), F.gelu(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-6)
    # tanh-approximate GELU is a different function (pitfall 1).
    self.assertGreater(float(np.max(np.abs(nn.gelu(x, approximate=True) - layers.gelu_exact(x)))), 1e-4)

  def test_timestep_embedding_at_fractional_t(self):
    t = np.array([0.0, 0.5, 1.25, 500.25, 999.9, 1000.0], np.float32)
    for dim, flip, shift in ((320, True, 0), (256, True, 0), (7, False, 1)):
      want = embeddings.get_timestep_embedding(torch.from_numpy(t), dim, flip, shift).numpy()
      got = np.asarray(layers.timestep_embedding(jnp.asarray(t), dim, flip, shift))
      # Small t: float32-exact agreement. Large t: t * freq amplifies one ulp of a frequency (PyTorch's float32
      # exp is off by one ulp on 2 of 160) to ~t * 6e-8.
      np.testing.assert_allclose(got[:3], want[:3], rtol=0, atol=2e-6)
      np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
      # Against the float64 formula the error is the float32 rounding of t * freq only.
      half = dim // 2
      args = t.astype(np.float64)[:, None] * np.exp(-np.log(1e4) * np.arange(half) / (half - shift))[None]
      exact = np.concatenate([np.cos(args), np.sin(args)] if flip else [np.sin(args), np.cos(args)], axis=-1)
      np.testing.assert_allclose(got[:, : 2 * half], exact, rtol=0, atol=1e-4)
    # Fractions are kept: 500.25 and 500 differ.
    self.assertGreater(float(np.max(np.abs(got[3] - np.asarray(layers.timestep_embedding(
        jnp.array([500.0]), 7, False, 1))[0]))), 1e-2)


class ResampleTest(absltest.TestCase):

  def test_downsample_paddings_on_odd_and_even_sizes(self):
    rng = np.random.default_rng(4)
    for pad in (1, 0):  # UNet symmetric pad 1; VAE right/bottom pad (diffusers padding=0)
      ref = tl.perturb_(downsampling.Downsample2D(6, use_conv=True, out_channels=6, padding=pad, name="op"), 5)
      ours = layers.Downsample(6, pad=pad, precision=HIGHEST)
      for hw in ((7, 8), (8, 9), (6, 6)):
        x = rng.standard_normal((1,) + hw + (6,)).astype(np.float32)
        want = tl.nchw_to_nhwc(ref(tl.nhwc_to_nchw(x)))
        got = ours.apply({"params": _params_for(ours, ref, x)}, x)
        self.assertEqual(got.shape, want.shape, (pad, hw))
        self.assertLess(_rel(got, want), 1e-6, (pad, hw))

  def test_upsample_nearest_to_given_size(self):
    x = np.random.default_rng(5).standard_normal((1, 3, 5, 2)).astype(np.float32)
    for size in ((6, 10), (5, 9), (7, 11)):
      want = tl.nchw_to_nhwc(F.interpolate(tl.nhwc_to_nchw(x), size=size, mode="nearest"))
      np.testing.assert_array_equal(layers.upsample_nearest(jnp.asarray(x), size), want)


class BlockTest(absltest.TestCase):

  def test_resnet_with_concat_input_and_shortcut(self):
    rng = np.random.default_rng(6)
    hidden, skip = rng.standard_normal((2, 5, 6, 32)), rng.standard_normal((2, 5, 6, 16))
    x = np.concatenate([hidden, skip], axis=-1).astype(np.float32)  # unequal widths, hidden first
    temb = rng.standard_normal((2, 20)).astype(np.float32)
    ref = tl.perturb_(resnet.ResnetBlock2D(in_channels=48, out_channels=24, temb_channels=20, groups=4, eps=1e-5), 7)
    want = tl.nchw_to_nhwc(ref(tl.nhwc_to_nchw(x), torch.from_numpy(temb)))
    ours = layers.ResnetBlock(24, 4, 1e-5, precision=HIGHEST)
    params = _params_for(ours, ref, x, temb)
    self.assertIn("conv_shortcut", params)
    got = ours.apply({"params": params}, x, nn.silu(temb))  # the UNet passes SiLU(temb) once for all resnets
    self.assertLess(_rel(got, want), 1e-5)

  def test_attention_with_heads_not_equal_head_dim(self):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 10, 24)).astype(np.float32)
    ctx = rng.standard_normal((2, 5, 12)).astype(np.float32)
    ref = tl.perturb_(attention_processor.Attention(24, cross_attention_dim=12, heads=2, dim_head=12), 8)
    want = ref(torch.from_numpy(x), torch.from_numpy(ctx))
    ours = _Attention(2, precision=HIGHEST)
    got = ours.apply({"params": _params_for(ours, ref, x, ctx)}, x, ctx)
    self.assertLess(_rel(got, want), 1e-5)


if __name__ == "__main__":
  absltest.main()
