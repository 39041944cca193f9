"""The UNet's conditioning ("context"): one array for SD1.x / SD2.x, a dict for SDXL.

  SD1.x / SD2.x:  context = encoder_hidden_states [B, 77, D], the text encoder's last hidden state (after the
                  final LayerNorm).
  SDXL:           context = {'hidden':      [B, 77, D1 + D2]  concat(CLIP-L hidden_states[-2],
                                                               OpenCLIP-bigG hidden_states[-2]), no final LN,
                             'text_embeds': [B, P]            bigG's projected pooled output (text_embeds),
                             'time_ids':    [B, 6]            micro-conditioning (orig_h, orig_w, crop_top,
                                                               crop_left, target_h, target_w)}
                  (full size: D1 + D2 = 768 + 1280 = 2048, P = 1280), as diffusers'
                  StableDiffusionXLPipeline.encode_prompt and the reference's SDXL training script build it.

The plain array stays the SD1/SD2 form, so their caches, tests and call sites are unchanged; everything that
combines contexts (prompt dropout, batched CFG's concatenation, broadcasting the empty prompt) already works leaf
by leaf on pytrees (`jax.tree.map`). `apply_unet` is the one place that knows how each form enters the UNet.

The reference fixes the SDXL time ids at (R, R, 0, 0, R, R) with R the training resolution (not the images' true
sizes and crops), for the teacher and the student alike. Prompt dropout replaces the hidden states AND the pooled
embedding by the empty prompt's; the time ids are never dropped.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from perflow_jax import flow

# The text fields of an SDXL context (dropped together) and the field that is never dropped.
TEXT_KEYS = ("hidden", "text_embeds")
TIME_IDS = "time_ids"
# SDXL reads both encoders' penultimate layer (transformers' hidden_states[-2]), before the final LayerNorm.
SDXL_HIDDEN_LAYER = -2

Context = Any  # jax.Array [B, L, D] | {'hidden': [B, L, D], 'text_embeds': [B, P], 'time_ids': [B, 6]}


def is_sdxl_unet(unet: Any) -> bool:
  """Whether the UNet takes SDXL's added conditioning (addition_embed_type 'text_time')."""
  return getattr(unet.config, "addition_embed_type", None) == "text_time"


def micro_conditioning(resolution: int, time_ids: Sequence[float] = ()) -> np.ndarray:
  """SDXL's time ids, float32 [6]: `time_ids` if given, else the reference's (R, R, 0, 0, R, R), R = resolution."""
  if time_ids:
    if len(time_ids) != 6:
      raise ValueError(f"time_ids must hold 6 numbers (orig_h, orig_w, crop_top, crop_left, target_h, target_w), "
                       f"got {tuple(time_ids)}.")
    return np.asarray(time_ids, np.float32)
  r = float(resolution)
  return np.asarray([r, r, 0.0, 0.0, r, r], np.float32)


def apply_unet(unet: Any, params: Any, z: jax.Array, timesteps: jax.Array, context: Context) -> jax.Array:
  """unet(z [B,h,w,c], timesteps [B], context) -> [B,h,w,c]; an SDXL dict context feeds added_cond_kwargs."""
  if isinstance(context, Mapping):
    added = {"text_embeds": context["text_embeds"], "time_ids": context[TIME_IDS]}
    return unet.apply({"params": params}, z, timesteps, context["hidden"], added_cond_kwargs=added)
  return unet.apply({"params": params}, z, timesteps, context)


def encode_ids(text_encoder: Any, text_params: Any, input_ids: jax.Array, *, text_encoder_2: Any = None,
               text_params_2: Any = None, input_ids_2: jax.Array | None = None,
               time_ids: Any = None) -> Context:
  """Token ids -> the UNet's context (traceable; call it inside jit).

  Args:
    text_encoder, text_params: the (first) CLIP text encoder and its params.
    input_ids: [B, 77] int32 ids of the first tokenizer.
    text_encoder_2, text_params_2: SDXL's second encoder (OpenCLIP bigG with projection); None for SD1/SD2.
    input_ids_2: [B, 77] ids of the second tokenizer (SDXL; it pads with "!", id 0, where the first pads with EOS).
    time_ids: SDXL: [6] (or [B, 6]) micro-conditioning, broadcast to [B, 6].

  Returns:
    SD1/SD2: last_hidden_state [B, 77, D]. SDXL: {'hidden' [B, 77, D1+D2], 'text_embeds' [B, P],
    'time_ids' [B, 6] float32}.
  """
  if text_encoder_2 is None:
    return text_encoder.apply({"params": text_params}, input_ids)
  if input_ids_2 is None or time_ids is None:
    raise ValueError("an SDXL context needs input_ids_2 (the second tokenizer's ids) and time_ids.")
  one = text_encoder.apply({"params": text_params}, input_ids, SDXL_HIDDEN_LAYER, method=text_encoder.encode)
  two = text_encoder_2.apply({"params": text_params_2}, input_ids_2, SDXL_HIDDEN_LAYER,
                             method=text_encoder_2.encode)
  if "text_embeds" not in two:
    raise ValueError("SDXL's text_encoder_2 must have a text projection (CLIPTextModelWithProjection): its "
                     "projected pooled output is the UNet's text_embeds.")
  hidden = jnp.concatenate([one["hidden"], two["hidden"].astype(one["hidden"].dtype)], axis=-1)
  batch = hidden.shape[0]
  ids = jnp.broadcast_to(jnp.asarray(time_ids, jnp.float32), (batch, 6))
  return {"hidden": hidden, "text_embeds": two["text_embeds"], TIME_IDS: ids}


def drop_prompts(key: jax.Array, context: Context, empty_context: Context, drop_prob: float) -> Context:
  """Prompt dropout: each example's text conditioning becomes the empty prompt's with probability drop_prob.

  SD1/SD2: the hidden states. SDXL: hidden states AND pooled text_embeds of the same examples (one draw per
  example), as the reference's SDXL script; the time ids are kept.

  Args:
    key: PRNG key.
    context: a context with leading dim B.
    empty_context: the "" context, leading dim 1 or B, same structure.
    drop_prob: probability in [0, 1].
  """
  if not isinstance(context, Mapping):
    return flow.drop_prompts(key, context, empty_context, drop_prob)
  text = {k: context[k] for k in TEXT_KEYS}
  empty = {k: empty_context[k] for k in TEXT_KEYS}
  return {**flow.drop_prompts(key, text, empty, drop_prob), TIME_IDS: context[TIME_IDS]}
