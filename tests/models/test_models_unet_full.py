"""One full-size SD1.5 UNet forward against diffusers (random perturbed weights, float32, 8x8 latents)."""

import gc

from absl.testing import absltest
import diffusers
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import models_testlib as tl
from perflow_jax.models import UNet2DConditionModel, UNetConfig, abstract_params
from perflow_jax.weights import names

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, cross_attention_dim=768, attention_head_dim=8,
    norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0, downsample_padding=1)


def _random_init_(model, seed):
  """Every parameter random: weights N(0, 1/fan_in), norm scales N(1, 0.05^2), biases N(0, 0.05^2)."""
  gen = torch.Generator().manual_seed(seed)
  for name, p in model.named_parameters():
    if p.ndim >= 2:
      p.normal_(0.0, p[0].numel() ** -0.5, generator=gen)
    elif name.endswith("weight"):
      p.normal_(1.0, 0.05, generator=gen)
    else:
      p.normal_(0.0, 0.05, generator=gen)
  return model.eval()


def _reference_and_params(module, x, t, ctx):
  """Builds the perturbed diffusers UNet, runs it, then converts its weights one tensor at a time, releasing each
  torch tensor as its JAX copy is made, so peak memory stays near one model (~3.5 GB) instead of two."""
  with torch.device("meta"):
    model = diffusers.UNet2DConditionModel(**SD15_UNET)
  # One random pass over every parameter instead of diffusers' init followed by a perturbation (2x faster).
  model = _random_init_(model.to_empty(device="cpu"), seed=0)
  want = tl.nchw_to_nhwc(model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample)
  state = {k: v.numpy() for k, v in model.state_dict().items()}  # views: no copy yet
  del model
  target = nn.meta.unbox(abstract_params(module))
  flat = names.flatten(names.torch_to_flax(state, target, what="SD1.5 UNet"))
  del state
  for path in list(flat):
    flat[path] = jnp.array(flat[path])  # the copy; the numpy view (and its torch storage) is dropped here
  gc.collect()
  return want, names.unflatten(flat)


@pytest.mark.slow
class FullSizeUNetTest(absltest.TestCase):

  def test_sd15_unet_matches_diffusers(self):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    ctx = rng.standard_normal((1, 77, 768)).astype(np.float32)
    t = np.array([500.25], np.float32)
    module = UNet2DConditionModel(UNetConfig.from_diffusers_config(SD15_UNET), precision=jax.lax.Precision.HIGHEST)
    # Compile first, from shapes only, so the compiler's memory is released before any weights exist.
    apply = jax.jit(lambda p: module.apply({"params": p}, x.transpose(0, 2, 3, 1), t, ctx))
    compiled = apply.lower(nn.meta.unbox(abstract_params(module))).compile()
    want, params = _reference_and_params(module, x, t, ctx)
    got = compiled(params)
    err, rel = tl.rel_err(got, want)
    print(f"full SD1.5 UNet: max abs err {err:.3g}, relative to max |out| {rel:.3g}, out std {want.std():.3f}")
    self.assertLess(rel, 1e-4)


if __name__ == "__main__":
  absltest.main()
