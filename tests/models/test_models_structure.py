"""Full-size structure: leaf and parameter counts (sd_models.md section 1), exact torch key sets, logical axes."""

from absl.testing import absltest
from absl.testing import parameterized
import diffusers
import flax.linen as nn
import jax
import numpy as np
import torch
import transformers

from perflow_jax import models
from perflow_jax.weights import names

_SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, cross_attention_dim=768, attention_head_dim=8,
    norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, act_fn="silu",
    center_input_sample=False, mid_block_scale_factor=1, _class_name="UNet2DConditionModel")
_SD21_UNET = dict(_SD15_UNET, sample_size=96, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                  use_linear_projection=True, upcast_attention=True)
_SDXL_UNET = dict(
    _SD15_UNET, sample_size=128, block_out_channels=[320, 640, 1280],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], transformer_layers_per_block=[1, 2, 10],
    attention_head_dim=[5, 10, 20], use_linear_projection=True, cross_attention_dim=2048,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
            layers_per_block=2, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
            norm_num_groups=32, act_fn="silu", sample_size=512, scaling_factor=0.18215)
_CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               hidden_act="quick_gelu", eos_token_id=2)
_OPENCLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                   hidden_act="gelu", eos_token_id=2)
_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
             hidden_act="gelu", projection_dim=1280, eos_token_id=2)

# (leaves, parameters) from sd_models.md section 1.
CASES = {
    "sd15_unet": (686, 859_520_964), "sd21_unet": (686, 865_910_724), "sdxl_unet": (1680, 2_567_463_684),
    "vae": (248, 83_653_863), "clip_l": (196, 123_060_480), "openclip_h": (372, 340_387_840),
    "bigg_projection": (517, 694_659_840),
}


def _build(name):
  """(our module, the torch model on the meta device)."""
  with torch.device("meta"):
    if name.endswith("_unet"):
      d = {"sd15_unet": _SD15_UNET, "sd21_unet": _SD21_UNET, "sdxl_unet": _SDXL_UNET}[name]
      ref = diffusers.UNet2DConditionModel(**{k: v for k, v in d.items() if not k.startswith("_")})
      return models.UNet2DConditionModel(models.UNetConfig.from_diffusers_config(d)), ref
    if name == "vae":
      return models.AutoencoderKL(models.VAEConfig.from_diffusers_config(_VAE)), diffusers.AutoencoderKL(**_VAE)
    d = {"clip_l": _CLIP_L, "openclip_h": _OPENCLIP_H, "bigg_projection": _BIGG}[name]
    tc = transformers.CLIPTextConfig(**d)
    with_projection = name == "bigg_projection"
    cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    module = models.CLIPTextEncoder(models.CLIPTextConfig.from_transformers_config(tc.to_dict()),
                                    with_projection=with_projection)
    return module, cls(tc)


def _expected_axes(path, ndim):
  leaf = path[-1]
  if leaf == "scale" or (leaf == "bias" and ndim == 1 and "norm" in path[-2]):
    return ("norm",)
  if leaf == "embedding":
    return ("positions", "embed") if path[-2] == "position_embedding" else ("vocab", "embed")
  if leaf == "kernel":
    return ("conv_h", "conv_w", "conv_in", "conv_out") if ndim == 4 else ("embed", "mlp")
  return None  # a bias: ('mlp',) or ('conv_out',), checked against its kernel below


class StructureTest(parameterized.TestCase):

  @parameterized.parameters(*CASES)
  def test_counts_paths_and_axes(self, name):
    want_leaves, want_params = CASES[name]
    module, ref = _build(name)
    boxed = models.abstract_params(module)
    plain = nn.meta.unbox(boxed)
    self.assertLen(jax.tree_util.tree_leaves(plain), want_leaves)
    self.assertEqual(models.param_count(boxed), want_params)
    self.assertEqual(sum(p.numel() for p in ref.parameters()), want_params)

    # The converted torch key set must be exactly our tree: torch_to_flax raises on any missing, unexpected or
    # mis-shaped key. Zero-stride arrays stand in for the meta tensors.
    state = {k.removeprefix("text_model."): np.broadcast_to(np.float32(0), tuple(v.shape))
             for k, v in ref.state_dict().items()}
    self.assertLen(state, want_leaves)
    converted = names.torch_to_flax(state, plain, what=name)
    self.assertEqual(set(names.flatten(converted)), set(names.flatten(plain)))

    flat_boxed = names.flatten(jax.tree_util.tree_map(
        lambda b: b, boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)))
    for path, box in flat_boxed.items():
      self.assertIsInstance(box, nn.LogicallyPartitioned, "/".join(path))
      ndim = len(box.value.shape)
      want = _expected_axes(path, ndim)
      if want is None:
        kernel = flat_boxed.get(path[:-1] + ("kernel",))
        want = ("conv_out",) if kernel is not None and len(kernel.value.shape) == 4 else ("mlp",)
      self.assertEqual(tuple(box.names), want, "/".join(path))

  def test_head_counts_of_the_real_configs(self):
    # attention_head_dim is a head count (sd_models.md pitfall 7): check against the torch modules.
    for d, block, heads, dim in ((_SD15_UNET, 0, 8, 40), (_SD21_UNET, 0, 5, 64), (_SDXL_UNET, 1, 10, 64)):
      with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(**{k: v for k, v in d.items() if not k.startswith("_")})
      attn = ref.down_blocks[block].attentions[0].transformer_blocks[0].attn1
      self.assertEqual((attn.heads, attn.inner_dim // attn.heads), (heads, dim))
      cfg = models.UNetConfig.from_diffusers_config(d)
      self.assertEqual(cfg.attention_head_dim[block], heads)
      self.assertEqual(cfg.block_out_channels[block] // cfg.attention_head_dim[block], dim)

  def test_sdxl_breakdown(self):
    module, _ = _build("sdxl_unet")
    tree = models.abstract_params(module)
    self.assertEqual(models.param_count(tree["add_embedding"]), 5_245_440)
    self.assertEqual(models.param_count(tree["mid_block"]), 413_117_440)
    self.assertEqual(sum(models.param_count(tree[f"down_blocks_{i}"]) for i in range(3)), 822_941_760)
    self.assertEqual(sum(models.param_count(tree[f"up_blocks_{i}"]) for i in range(3)), 1_324_084_480)


if __name__ == "__main__":
  absltest.main()
