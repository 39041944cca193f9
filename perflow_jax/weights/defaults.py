"""The published diffusers/transformers configs of SD1.5, SD2.1 and SDXL base 1.0 (sd_models.md section 2).

A single-file checkpoint carries weights but no configs; these are the configs it is loaded with unless the caller
points `config_path` at a diffusers folder. They are also what the full-size structural tests build on the meta
device. Values are the ones in the hub repos' config.json files that affect the model; cosmetic fields are left out.
"""

from __future__ import annotations

import copy
from typing import Any

_SD15_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

_SD21_UNET = dict(_SD15_UNET, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, sample_size=96,
                  use_linear_projection=True, upcast_attention=True)

_SDXL_UNET = dict(
    _SD15_UNET,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280],
    cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    projection_class_embeddings_input_dim=2816,
    sample_size=128,
    transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    use_linear_projection=True,
)

_VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

_CLIP_L = {
    "architectures": ["CLIPTextModel"],
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "vocab_size": 49408,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

_OPENCLIP_H = dict(_CLIP_L, hidden_act="gelu", hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                   num_hidden_layers=23, projection_dim=512)

_OPENCLIP_BIGG = dict(_CLIP_L, architectures=["CLIPTextModelWithProjection"], hidden_act="gelu", hidden_size=1280,
                      intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32, projection_dim=1280)

_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
             "steps_offset": 1}

_FAMILIES: dict[str, dict[str, Any]] = {
    "sd1": {
        "unet": _SD15_UNET,
        "vae": _VAE,
        "text_encoder": _CLIP_L,
        "scheduler": dict(_SCHEDULE, _class_name="PNDMScheduler", prediction_type="epsilon",
                          set_alpha_to_one=False, skip_prk_steps=True),
    },
    "sd2": {
        "unet": _SD21_UNET,
        "vae": dict(_VAE, sample_size=768),
        "text_encoder": _OPENCLIP_H,
        # prediction_type is filled in from the caller: an SD2 single file does not record it.
        "scheduler": dict(_SCHEDULE, _class_name="DDIMScheduler", clip_sample=False, set_alpha_to_one=False),
    },
    "sdxl": {
        "unet": _SDXL_UNET,
        "vae": dict(_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
        "text_encoder": _CLIP_L,
        "text_encoder_2": _OPENCLIP_BIGG,
        "scheduler": dict(_SCHEDULE, _class_name="EulerDiscreteScheduler", prediction_type="epsilon"),
    },
}


def family_configs(family: str) -> dict[str, dict[str, Any]]:
  """{'unet', 'vae', 'text_encoder'[, 'text_encoder_2'], 'scheduler': config dict} of a family (a fresh copy)."""
  if family not in _FAMILIES:
    raise ValueError(f"unknown model family {family!r}; expected one of {sorted(_FAMILIES)}.")
  return copy.deepcopy(_FAMILIES[family])


def family_of_configs(configs: dict[str, dict[str, Any]]) -> str:
  """'sd1' | 'sd2' | 'sdxl' from component configs: text_time conditioning or a second text encoder means SDXL;
  an OpenCLIP text tower (exact-erf gelu) or 1024-wide cross attention means SD2; anything else SD1."""
  unet = configs.get("unet", {})
  if unet.get("addition_embed_type") == "text_time" or "text_encoder_2" in configs:
    return "sdxl"
  if configs.get("text_encoder", {}).get("hidden_act") == "gelu" or unet.get("cross_attention_dim") == 1024:
    return "sd2"
  return "sd1"
