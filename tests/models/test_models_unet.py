"""UNet2DConditionModel parity against diffusers on tiny, perturbed SD1-, SD2- and SDXL-style configs (float32)."""

import dataclasses

from absl.testing import absltest
from absl.testing import parameterized
import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import torch

import models_testlib as tl
from perflow_jax.models import UNet2DConditionModel, UNetConfig
from perflow_jax.models.unet import Transformer2D

HIGHEST = jax.lax.Precision.HIGHEST
_BASE = dict(block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32, layers_per_block=2,
             in_channels=4, out_channels=4, sample_size=16)
TINY = {
    # SD1.x style: conv projections, one head count for every block.
    "sd1": dict(_BASE, attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    # SD2.x style: linear projections, upcast attention, per-block head counts, 2 transformer layers.
    "sd2": dict(_BASE, attention_head_dim=[2, 4], use_linear_projection=True, upcast_attention=True,
                transformer_layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",) * 2,
                up_block_types=("CrossAttnUpBlock2D",) * 2),
    # SDXL style: no attention at the top level, per-level transformer depth, text_time added conditioning.
    "sdxl": dict(_BASE, block_out_channels=(32, 64, 64), attention_head_dim=[2, 2, 4], use_linear_projection=True,
                 transformer_layers_per_block=[1, 2, 3],
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=16 + 6 * 8),
}
TIMESTEPS = (999.0, 500.25, 1000.0, 0.75)
BATCH = 2


def _inputs(name, rng, hw=(16, 16)):
  x = rng.standard_normal((BATCH, 4) + hw).astype(np.float32)
  ctx = rng.standard_normal((BATCH, 7, 32)).astype(np.float32)
  added = None
  if name == "sdxl":
    added = {"text_embeds": rng.standard_normal((BATCH, 16)).astype(np.float32),
             "time_ids": np.array([[1024, 1024, 0, 0, 1024, 1024], [512, 768, 3, 5, 896, 1152]], np.float32)}
  return x, ctx, added


def _torch_out(model, x, t, ctx, added):
  kwargs = None if added is None else {k: torch.from_numpy(v) for k, v in added.items()}
  out = model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx), added_cond_kwargs=kwargs).sample
  return tl.nchw_to_nhwc(out)


class UNetParityTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.models = {}
    for i, (name, d) in enumerate(TINY.items()):
      torch.manual_seed(i)
      ref = tl.perturb_(diffusers.UNet2DConditionModel(**d), seed=10 + i)
      module = UNet2DConditionModel(UNetConfig.from_diffusers_config(dict(ref.config)), precision=HIGHEST)
      params = tl.convert(ref, module, what=f"tiny {name} UNet")
      fn = jax.jit(lambda p, x, t, c, a, m=module: m.apply({"params": p}, x, t, c, a))
      cls.models[name] = (ref, module, params, fn)

  @parameterized.parameters("sd1", "sd2", "sdxl")
  def test_full_output_matches_diffusers(self, name):
    ref, _, params, fn = self.models[name]
    x, ctx, added = _inputs(name, np.random.default_rng(0))
    for t in TIMESTEPS:
      tt = np.array([t, t - 0.5], np.float32)  # two different fractional timesteps in one batch
      want = _torch_out(ref, x, tt, ctx, added)
      got = fn(params, x.transpose(0, 2, 3, 1), tt, ctx, added)
      err, rel = tl.rel_err(got, want)
      print(f"UNet {name} t={t}: max abs err {err:.3g}, relative to max |out| {rel:.3g}, out std {want.std():.3f}")
      self.assertEqual(got.shape, want.shape)
      self.assertLess(rel, 1e-5)

  def test_heads_follow_head_count_convention(self):
    # attention_head_dim holds head counts: sd2's level 1 has 4 heads of 64 / 4 = 16.
    ref, _, _, _ = self.models["sd2"]
    self.assertEqual(ref.down_blocks[1].attentions[0].transformer_blocks[0].attn1.heads, 4)
    cfg = UNetConfig.from_diffusers_config(TINY["sd2"])
    self.assertEqual(cfg.attention_head_dim, (2, 4))
    self.assertEqual(cfg.transformer_layers_per_block, (2, 2))

  def test_odd_latent_size_upsamples_to_skip_size(self):
    ref, _, params, fn = self.models["sd1"]
    x, ctx, _ = _inputs("sd1", np.random.default_rng(1), hw=(9, 11))
    tt = np.array([321.5, 17.0], np.float32)
    want = _torch_out(ref, x, tt, ctx, None)
    got = fn(params, x.transpose(0, 2, 3, 1), tt, ctx, None)
    self.assertEqual(got.shape, (BATCH, 9, 11, 4))
    self.assertLess(tl.rel_err(got, want)[1], 1e-5)

  def test_python_scalar_timestep_broadcasts_and_is_not_truncated(self):
    _, module, params, fn = self.models["sd1"]
    x, ctx, _ = _inputs("sd1", np.random.default_rng(2))
    x = x.transpose(0, 2, 3, 1)
    scalar = jax.jit(lambda p: module.apply({"params": p}, x, 500.25, ctx))(params)
    vector = fn(params, x, np.full((BATCH,), 500.25, np.float32), ctx, None)
    integer = fn(params, x, np.full((BATCH,), 500.0, np.float32), ctx, None)
    np.testing.assert_allclose(scalar, vector, rtol=0, atol=1e-6)
    self.assertGreater(float(jnp.max(jnp.abs(scalar - integer))), 1e-4)

  def test_remat_checkpoints_every_block_and_keeps_values(self):
    _, module, params, fn = self.models["sd1"]
    remat_module = dataclasses.replace(module, remat=True)
    x, ctx, _ = _inputs("sd1", np.random.default_rng(3))
    x = x.transpose(0, 2, 3, 1)
    t = np.array([250.5, 750.0], np.float32)
    got = jax.jit(lambda p: remat_module.apply({"params": p}, x, t, ctx))(params)
    np.testing.assert_allclose(got, fn(params, x, t, ctx, None), rtol=0, atol=1e-6)

    # The backward pass of the remat UNet recomputes one checkpointed region per resnet and transformer block:
    # tiny sd1 has 2 + 2 down, 2 mid and 3 + 3 up resnets, and 2 + 1 + 3 transformer blocks.
    def count_remat(m):
      loss = lambda p: jnp.mean(jnp.square(m.apply({"params": p}, x, t, ctx)))
      return str(jax.make_jaxpr(jax.grad(loss))(params)).count("remat")

    self.assertEqual(count_remat(remat_module), 12 + 6)
    self.assertEqual(count_remat(module), 0)

  def test_remat_gradients_match_on_a_transformer_block(self):
    block = Transformer2D(2, 2, 8, True, precision=HIGHEST)
    x = np.random.default_rng(4).standard_normal((1, 4, 4, 16)).astype(np.float32)
    ctx = np.random.default_rng(5).standard_normal((1, 3, 8)).astype(np.float32)
    params = block.init(jax.random.key(0), x, ctx)["params"]

    def grads(m):
      return jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(m.apply({"params": p}, x, ctx)))))(params)

    for a, b in zip(jax.tree_util.tree_leaves(grads(block)),
                    jax.tree_util.tree_leaves(grads(dataclasses.replace(block, remat=True)))):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(b))))

  def test_bfloat16_compute_stays_close(self):
    ref, module, params, _ = self.models["sd2"]
    bf16 = dataclasses.replace(module, dtype=jnp.bfloat16, precision=None)
    x, ctx, _ = _inputs("sd2", np.random.default_rng(4))
    t = np.array([999.0, 10.5], np.float32)
    want = _torch_out(ref, x, t, ctx, None)
    got = jax.jit(lambda p: bf16.apply({"params": p}, x.transpose(0, 2, 3, 1), t, ctx))(params)
    self.assertEqual(got.dtype, jnp.bfloat16)
    self.assertLess(tl.rel_err(got.astype(jnp.float32), want)[1], 5e-2)

  def test_sdxl_requires_added_conditioning(self):
    _, module, params, _ = self.models["sdxl"]
    x, ctx, _ = _inputs("sdxl", np.random.default_rng(5))
    with self.assertRaisesRegex(ValueError, "added_cond_kwargs"):
      module.apply({"params": params}, x.transpose(0, 2, 3, 1), 1.0, ctx)


class UNetConfigTest(absltest.TestCase):

  def test_round_trip_builds_identical_diffusers_model(self):
    for name, d in TINY.items():
      cfg = UNetConfig.from_diffusers_config(d)
      again = UNetConfig.from_diffusers_config(cfg.to_diffusers_config())
      self.assertEqual(cfg, again, name)
      with torch.device("meta"):
        a = diffusers.UNet2DConditionModel(**d)
        b = diffusers.UNet2DConditionModel(**cfg.to_diffusers_config())
      self.assertEqual({k: v.shape for k, v in a.state_dict().items()},
                       {k: v.shape for k, v in b.state_dict().items()}, name)

  def test_unsupported_values_raise(self):
    bad = [
        dict(class_embed_type="timestep"),
        dict(time_cond_proj_dim=256),
        dict(addition_embed_type="text"),
        dict(down_block_types=("SimpleCrossAttnDownBlock2D", "DownBlock2D")),
        dict(attention_head_dim=3),  # 32 channels do not split into 3 heads
        dict(not_a_field=1),
        dict(transformer_layers_per_block=[1, 2, 3]),  # wrong length
        dict(addition_embed_type="text_time"),  # without its dimensions
    ]
    for change in bad:
      with self.assertRaises(ValueError, msg=str(change)):
        UNetConfig.from_diffusers_config(dict(TINY["sd1"], **change))

  def test_private_keys_are_ignored(self):
    d = dict(TINY["sd1"], _class_name="UNet2DConditionModel", _diffusers_version="0.42.1")
    self.assertEqual(UNetConfig.from_diffusers_config(d), UNetConfig.from_diffusers_config(TINY["sd1"]))


if __name__ == "__main__":
  absltest.main()
