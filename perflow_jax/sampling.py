"""Few-step and many-step sampling as pure functions over the modules: prompts -> latents -> images.

Used by the trainer's periodic samples, `python -m perflow_jax.sample` and the evaluation harness. Every sampler
takes the same initial noise, so samplers compare image for image.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax

from perflow_jax import flow
from perflow_jax.data import tokenizer as tokenization


def encode_prompts(text_encoder: Any, text_params: Any, tokenizer: Any, prompts: Sequence[str]) -> jax.Array:
  """Prompts -> text context [N, 77, D] (the UNet's encoder_hidden_states).

  Jitted with the ids as a host array, so with sharded params (and on several processes, where every process
  passes the same prompts) the result is one global, replicated array.
  """
  ids = tokenization.tokenize(tokenizer, list(prompts))
  return jax.jit(text_encoder.apply)({"params": text_params}, ids)


def unet_model_fn(unet: Any, params: Any) -> Callable[[jax.Array, jax.Array, Any], jax.Array]:
  """(z [B,h,w,c], timesteps float [B], context [B,L,D]) -> UNet output, for the schedulers."""
  return lambda z, t, c: unet.apply({"params": params}, z, t, c)


def perflow_sample(unet: Any, params: Any, noise: jax.Array, context: jax.Array, uncond_context: jax.Array,
                   num_steps: int, guidance_scale: float, num_windows: int = 4,
                   prediction_type: str = "diff_eps") -> jax.Array:
  """PeRFlow few-step sampling from `noise` [B,h,w,c] (t=1) to latents at t=0, CFG batched in one call."""
  scheduler = flow.PeRFlowScheduler(num_windows=num_windows, prediction_type=prediction_type)
  return scheduler.sample(unet_model_fn(unet, params), noise, num_steps, guidance_scale=guidance_scale,
                          context=context, uncond_context=uncond_context)


def decode_latents(vae: Any, vae_params: Any, latents: jax.Array, scaling_factor: float) -> jax.Array:
  """Scaled latents [B,h,w,c] -> images [B,H,W,3] in [-1, 1] (unclipped)."""
  return vae.apply({"params": vae_params}, latents / scaling_factor, method=vae.decode)
