"""Tiny PyTorch Stable Diffusion models (every parameter perturbed) written as diffusers folders and single files.

Nothing is downloaded: the models come from tiny diffusers/transformers configs, the tokenizer from a vocab.json
and merges.txt written here.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

from absl.testing import absltest
import numpy as np
import torch

from perflow_jax.weights import io
from perflow_jax.weights import single_file

# A 61-token byte-pair vocabulary: letters, "!", their word-final forms, a few merges, then BOS/EOS (the largest
# ids, as in CLIP, so the pooled output's argmax(input_ids) finds the first EOS).
_CHARS = list("abcdefghijklmnopqrstuvwxyz!")
_MERGES = ["a b", "c a", "ca t</w>", "d o", "do g</w>"]
BOS, EOS = 59, 60
VOCAB_SIZE = 61


def tmpdir(test: absltest.TestCase) -> str:
  """A temp folder removed after the test (absltest's create_tempdir needs parsed flags, pytest has none)."""
  path = tempfile.mkdtemp()
  test.addCleanup(shutil.rmtree, path, ignore_errors=True)
  return path


def _clip(hidden_act: str, **kw) -> dict[str, Any]:
  cfg = dict(architectures=["CLIPTextModel"], hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=77, vocab_size=VOCAB_SIZE, hidden_act=hidden_act,
             layer_norm_eps=1e-5, projection_dim=16, bos_token_id=0, eos_token_id=2, pad_token_id=1)
  cfg.update(kw)
  return cfg


def tiny_configs(family: str) -> dict[str, dict[str, Any]]:
  """Tiny diffusers/transformers configs with the structural traits of each family.

  sd1: conv proj_in/out, 2 layers per block, quick_gelu CLIP. sd2: linear projections, 2 transformer layers,
  1 layer per block, OpenCLIP-style (gelu) text tower, v-prediction. sdxl: text_time conditioning, no attention at
  the top level, two text encoders (the second with projection), context = 32 + 32.
  """
  vae = dict(_class_name="AutoencoderKL", block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
             up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=4, latent_channels=4, layers_per_block=1,
             in_channels=3, out_channels=3, sample_size=16, scaling_factor=0.18215)
  sched = dict(_class_name="DDIMScheduler", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
               num_train_timesteps=1000, steps_offset=1, prediction_type="epsilon")
  unet = dict(_class_name="UNet2DConditionModel", block_out_channels=[32, 64], norm_num_groups=8, sample_size=8,
              in_channels=4, out_channels=4, cross_attention_dim=32)
  if family == "sd1":
    unet.update(down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D",
                "CrossAttnUpBlock2D"], attention_head_dim=2, layers_per_block=2)
    return dict(unet=unet, vae=vae, text_encoder=_clip("quick_gelu"), scheduler=sched)
  if family == "sd2":
    unet.update(down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], attention_head_dim=[2, 4],
                layers_per_block=1, use_linear_projection=True, upcast_attention=True,
                transformer_layers_per_block=2)
    return dict(unet=unet, vae=vae, text_encoder=_clip("gelu"), scheduler=dict(sched, prediction_type="v_prediction"))
  if family == "sdxl":
    unet.update(down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D",
                "UpBlock2D"], attention_head_dim=[2, 4], layers_per_block=2, use_linear_projection=True,
                transformer_layers_per_block=[1, 2], cross_attention_dim=64, addition_embed_type="text_time",
                addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16)
    return dict(unet=unet, vae=dict(vae, scaling_factor=0.13025), text_encoder=_clip("quick_gelu"),
                text_encoder_2=_clip("gelu", architectures=["CLIPTextModelWithProjection"], num_hidden_layers=3),
                scheduler=dict(sched, _class_name="EulerDiscreteScheduler"))
  raise ValueError(family)


def perturb_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
  """Adds noise to every parameter (norm scales 1 and zero biases would hide swapped or dropped tensors)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=g))
  return model.eval()


def build_torch_models(configs: dict[str, dict[str, Any]], seed: int = 0) -> dict[str, torch.nn.Module]:
  """The PyTorch models of `configs`, every parameter perturbed."""
  from diffusers import AutoencoderKL, UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # pylint: disable=g-import-not-at-top
  out = {"unet": UNet2DConditionModel.from_config(configs["unet"]),
         "vae": AutoencoderKL.from_config(configs["vae"])}
  for comp in ("text_encoder", "text_encoder_2"):
    if comp in configs:
      cls = CLIPTextModelWithProjection if "WithProjection" in configs[comp]["architectures"][0] else CLIPTextModel
      cfg = {k: v for k, v in configs[comp].items() if k != "architectures"}
      out[comp] = cls(CLIPTextConfig(**cfg))
  return {k: perturb_(m, seed + i) for i, (k, m) in enumerate(sorted(out.items()))}


def state_dicts(models: dict[str, torch.nn.Module]) -> dict[str, dict[str, np.ndarray]]:
  return {c: {k: v.detach().numpy().copy() for k, v in m.state_dict().items()} for c, m in models.items()}


def write_tokenizer(folder: str, pad_token: str) -> None:
  """A tiny CLIPTokenizer (vocab.json + merges.txt) saved with save_pretrained into `folder`."""
  from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top
  vocab = {c: i for i, c in enumerate(_CHARS)}
  vocab.update({c + "</w>": len(_CHARS) + i for i, c in enumerate(_CHARS)})
  for m in _MERGES:
    vocab["".join(m.split())] = len(vocab)
  vocab["<|startoftext|>"], vocab["<|endoftext|>"] = BOS, EOS
  assert len(vocab) == VOCAB_SIZE and max(vocab.values()) == EOS
  src = tempfile.mkdtemp()
  try:
    with open(os.path.join(src, "vocab.json"), "w") as f:
      json.dump(vocab, f)
    with open(os.path.join(src, "merges.txt"), "w") as f:
      f.write("#version: 0.2\n" + "\n".join(_MERGES) + "\n")
    tok = CLIPTokenizer(os.path.join(src, "vocab.json"), os.path.join(src, "merges.txt"), model_max_length=77,
                        pad_token=pad_token)
    tok.save_pretrained(folder)
  finally:
    shutil.rmtree(src, ignore_errors=True)


def write_diffusers_folder(folder: str, family: str, configs: dict[str, Any], models: dict[str, torch.nn.Module],
                           *, skip: tuple[str, ...] = ()) -> str:
  """A diffusers-layout folder: model_index.json, component folders (safetensors), tokenizer(s), scheduler."""
  pipe = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}
  index = {"_class_name": pipe[family], "_diffusers_version": "0.42.1"}
  for comp, model in models.items():
    index[comp] = ["diffusers" if comp in ("unet", "vae") else "transformers", type(model).__name__]
    if comp not in skip:
      model.save_pretrained(os.path.join(folder, comp))
  os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
  with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
    json.dump(configs["scheduler"], f)
  write_tokenizer(os.path.join(folder, "tokenizer"), "<|endoftext|>" if family == "sd1" or family == "sdxl" else "!")
  if family == "sdxl":
    write_tokenizer(os.path.join(folder, "tokenizer_2"), "!")
  with open(os.path.join(folder, "model_index.json"), "w") as f:
    json.dump(index, f)
  return folder


def ldm_state_dict(family: str, models: dict[str, torch.nn.Module], seed: int = 1) -> dict[str, np.ndarray]:
  """The models as an original single-file checkpoint, with what real files add: SD2's unused 24th OpenCLIP block
  and text_projection, OpenCLIP logit_scale, and the DDPM schedule buffers."""
  ldm = single_file.diffusers_to_ldm(state_dicts(models), family)
  rng = np.random.default_rng(seed)
  tower = single_file.OPENCLIP_PREFIX.get(family)
  if family == "sd2":
    n = 1 + max(int(k.split(".")[4]) for k in ldm if ".resblocks." in k)
    for k in [k for k in ldm if f".resblocks.{n - 1}." in k]:
      ldm[k.replace(f".resblocks.{n - 1}.", f".resblocks.{n}.")] = rng.standard_normal(ldm[k].shape, np.float32)
    width = ldm[tower + "ln_final.weight"].shape[0]
    ldm[tower + "text_projection"] = rng.standard_normal((width, 16), np.float32)
  if tower:
    ldm[tower + "logit_scale"] = np.float32(4.6).reshape(())
  betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
  ldm["betas"] = betas.astype(np.float32)
  ldm["alphas_cumprod"] = np.cumprod(1 - betas).astype(np.float32)
  return ldm


def write_ldm_file(path: str, family: str, models: dict[str, torch.nn.Module]) -> str:
  io.write_safetensors(path, ldm_state_dict(family, models))
  return path
