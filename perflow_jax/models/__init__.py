"""Flax (Linen, NHWC) ports of the Stable Diffusion models: UNet2DCondition, AutoencoderKL, CLIP text encoder."""

from perflow_jax.models.clip import CLIPTextConfig, CLIPTextEncoder
from perflow_jax.models.common import abstract_params, param_count
from perflow_jax.models.unet import UNet2DConditionModel, UNetConfig
from perflow_jax.models.vae import AutoencoderKL, VAEConfig, sample_latents

__all__ = [
    "AutoencoderKL", "CLIPTextConfig", "CLIPTextEncoder", "UNet2DConditionModel", "UNetConfig", "VAEConfig",
    "abstract_params", "param_count", "sample_latents",
]
