"""Few-step and many-step sampling as pure functions over the modules: prompts -> latents -> images.

Used by the trainer's periodic samples, `python -m perflow_jax.sample` and the evaluation harness. Every sampler
takes the same initial noise, so samplers compare image for image.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from perflow_jax import conditioning
from perflow_jax import flow
from perflow_jax.data import tokenizer as tokenization
from perflow_jax.flow import schedule, solvers


def encode_prompts(text_encoder: Any, text_params: Any, tokenizer: Any, prompts: Sequence[str], *,
                   text_encoder_2: Any = None, text_params_2: Any = None, tokenizer_2: Any = None,
                   time_ids: Any = None) -> conditioning.Context:
  """Prompts -> the UNet's context: SD1/SD2 text context [N, 77, D]; SDXL (with text_encoder_2) the dict
  {'hidden' [N, 77, D1+D2], 'text_embeds' [N, P], 'time_ids' [N, 6]} of `conditioning.encode_ids`.

  Jitted with the ids as a host array, so with sharded params (and on several processes, where every process
  passes the same prompts) the result is one global, replicated array (tree).

  Args:
    text_encoder, text_params, tokenizer: the (first) text encoder, its params and tokenizer.
    prompts: N strings.
    text_encoder_2, text_params_2, tokenizer_2: SDXL's second encoder (OpenCLIP bigG with projection).
    time_ids: SDXL's micro-conditioning [6] (`conditioning.micro_conditioning`).
  """
  ids = tokenization.tokenize(tokenizer, list(prompts))
  if text_encoder_2 is None:
    return jax.jit(text_encoder.apply)({"params": text_params}, ids)
  if tokenizer_2 is None or time_ids is None:
    raise ValueError("SDXL prompts need tokenizer_2 and time_ids besides text_encoder_2.")
  ids_2 = tokenization.tokenize(tokenizer_2, list(prompts))

  def encode(p1, p2, ids, ids_2, time_ids):
    return conditioning.encode_ids(text_encoder, p1, ids, text_encoder_2=text_encoder_2, text_params_2=p2,
                                   input_ids_2=ids_2, time_ids=time_ids)
  return jax.jit(encode)(text_params, text_params_2, ids, ids_2, np.asarray(time_ids, np.float32))


def unet_model_fn(unet: Any, params: Any) -> Callable[[jax.Array, jax.Array, Any], jax.Array]:
  """(z [B,h,w,c], timesteps float [B], context [B,L,D] or SDXL dict) -> UNet output, for the schedulers."""
  return lambda z, t, c: conditioning.apply_unet(unet, params, z, t, c)


def perflow_sample(unet: Any, params: Any, noise: jax.Array, context: Any, uncond_context: Any,
                   num_steps: int, guidance_scale: float, num_windows: int = 4,
                   prediction_type: str = "diff_eps") -> jax.Array:
  """PeRFlow few-step sampling from `noise` [B,h,w,c] (t=1) to latents at t=0, CFG batched in one call.

  `context` is [B,L,D] (SDXL: the dict of `conditioning`), `uncond_context` the same structure with leading
  dim 1 or B.
  """
  scheduler = flow.PeRFlowScheduler(num_windows=num_windows, prediction_type=prediction_type)
  return scheduler.sample(unet_model_fn(unet, params), noise, num_steps, guidance_scale=guidance_scale,
                          context=context, uncond_context=uncond_context)


def decode_latents(vae: Any, vae_params: Any, latents: jax.Array, scaling_factor: float) -> jax.Array:
  """Scaled latents [B,h,w,c] -> images [B,H,W,3] in [-1, 1] (unclipped)."""
  return vae.apply({"params": vae_params}, latents / scaling_factor, method=vae.decode)


def ddim_leading_timesteps(num_steps: int, num_train_timesteps: int = 1000, steps_offset: int = 1) -> np.ndarray:
  """diffusers DDIMScheduler's 'leading' timesteps, noisiest first: N = 4 -> [751, 501, 251, 1] (SD's config)."""
  if isinstance(num_steps, bool) or int(num_steps) != num_steps or not 1 <= num_steps <= num_train_timesteps:
    raise ValueError(f"DDIM num_steps must be an integer in [1, {num_train_timesteps}], got {num_steps!r}.")
  ratio = num_train_timesteps // int(num_steps)
  return (np.arange(int(num_steps))[::-1] * ratio + steps_offset).astype(np.int64)


def ddim_sample(unet: Any, params: Any, noise: jax.Array, context: Any, uncond_context: Any,
                num_steps: int, guidance_scale: float, prediction_type: str = "epsilon",
                alphas_cumprod: np.ndarray | None = None, steps_offset: int = 1) -> jax.Array:
  """The teacher's deterministic DDIM (eta = 0) from `noise` [B,h,w,c] to latents, CFG batched in one call.

  Matches diffusers' DDIMScheduler with SD's scheduler config: 'leading' spacing with `steps_offset`,
  set_alpha_to_one=False (the last step lands on alphas_cumprod[0]), no sample clipping. The guided output
  uncond + w (cond - uncond) is turned into eps (v_prediction teachers: eps = sqrt(ab) v + sqrt(1-ab) z).

  Args:
    unet, params: the teacher (or any diffusion-trained) UNet and its params.
    noise: [B,h,w,c] standard normal latents (DDIM's init_noise_sigma is 1).
    context: [B,L,D] prompt embeddings (SDXL: the conditioning dict); uncond_context: the negative/empty-prompt
      embedding, the same structure with leading dim 1 or B.
    num_steps: any N in [1, 1000].
    guidance_scale: w; the Python number 1.0 skips the unconditional half.
    prediction_type: the UNet's, 'epsilon' or 'v_prediction'.
    alphas_cumprod: [n] schedule (SD's scaled_linear by default).
    steps_offset: added to every timestep (1 in SD's scheduler config).

  Returns:
    [B,h,w,c] float32 latents at alpha_bar = alphas_cumprod[0].
  """
  ac_np = schedule.sd_alphas_cumprod() if alphas_cumprod is None else np.asarray(alphas_cumprod)
  timesteps = ddim_leading_timesteps(num_steps, ac_np.size, steps_offset)
  prev = timesteps - ac_np.size // int(num_steps)
  ac = np.asarray(ac_np, np.float32)
  ab_cur = jnp.asarray(ac[timesteps])
  ab_prev = jnp.asarray(np.where(prev >= 0, ac[np.clip(prev, 0, None)], ac[0]))
  t_model = jnp.asarray(timesteps, jnp.float32)
  model_fn = unet_model_fn(unet, params)
  plain = isinstance(guidance_scale, (int, float)) and guidance_scale == 1.0
  batch = noise.shape[0]

  def body(i, z):
    t = jnp.full((batch,), t_model[i], jnp.float32)
    if plain:
      out = model_fn(z, t, context).astype(jnp.float32)
    else:
      out = solvers.guided_model_output(model_fn, z, t, context, uncond_context, guidance_scale)
    eps = solvers.to_epsilon(out, z, ab_cur[i], prediction_type)
    x0 = (z - jnp.sqrt(1.0 - ab_cur[i]) * eps) / jnp.sqrt(ab_cur[i])
    return jnp.sqrt(ab_prev[i]) * x0 + jnp.sqrt(1.0 - ab_prev[i]) * eps

  return jax.lax.fori_loop(0, len(timesteps), body, noise.astype(jnp.float32))

