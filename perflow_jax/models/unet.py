"""Flax port of diffusers' UNet2DConditionModel for SD1.x, SD2.x and SDXL (NHWC inside).

The parameter tree mirrors diffusers' state-dict names under `perflow_jax.weights.names` (e.g.
`down_blocks_0/attentions_1/transformer_blocks_0/attn2/to_k/kernel`), so converted checkpoints drop straight in.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from perflow_jax.models import layers

Dtype = Any

_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
_MID_TYPE = "UNetMidBlock2DCrossAttn"

# diffusers UNet2DConditionModel options this port does not implement: each is accepted only at the listed
# values (the ones every SD1.x/SD2.x/SDXL checkpoint uses).
_FIXED_OPTIONS: dict[str, tuple[Any, ...]] = {
    "mid_block_type": (_MID_TYPE,),
    "act_fn": ("silu",),
    "only_cross_attention": (False, None),
    "mid_block_only_cross_attention": (False, None),
    "mid_block_scale_factor": (1, 1.0),
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "class_embeddings_concat": (False,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1, 1.0),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "num_attention_heads": (None,),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
    "reverse_transformer_layers_per_block": (None,),
    "dropout": (0, 0.0),
    "addition_embed_type_num_heads": (64,),
}


def _per_level(value: Any, n: int, name: str) -> tuple[int, ...]:
  if isinstance(value, (list, tuple)):
    if len(value) != n:
      raise ValueError(f"UNet config: {name} has {len(value)} entries but the UNet has {n} levels; "
                       f"give one value per down block or a single int.")
    if any(isinstance(v, (list, tuple)) for v in value):
      raise ValueError(f"UNet config: nested per-layer {name} (asymmetric UNets) is not supported.")
    return tuple(int(v) for v in value)
  return (int(value),) * n


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """Architecture of a UNet2DConditionModel. Per-level fields are tuples with one entry per down block.

  `attention_head_dim` follows the diffusers convention for these models: the values are head COUNTS
  (head_dim = channels / value), the fallback `num_attention_heads = attention_head_dim` in diffusers.
  `transformer_layers_per_block` is per down level; the mid block uses the last entry and the up blocks the
  reversed list.
  """
  sample_size: Union[int, tuple[int, int]] = 64
  in_channels: int = 4
  out_channels: int = 4
  center_input_sample: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: float = 0
  down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
  up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
  downsample_padding: int = 1
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  cross_attention_dim: int = 768
  transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
  attention_head_dim: tuple[int, ...] = (8, 8, 8, 8)
  use_linear_projection: bool = False
  upcast_attention: bool = False
  addition_embed_type: Optional[str] = None
  addition_time_embed_dim: Optional[int] = None
  projection_class_embeddings_input_dim: Optional[int] = None
  conv_in_kernel: int = 3
  conv_out_kernel: int = 3

  def __post_init__(self):
    n = len(self.block_out_channels)
    if len(self.down_block_types) != n or len(self.up_block_types) != n:
      raise ValueError(f"UNet config: {len(self.down_block_types)} down_block_types, {len(self.up_block_types)} "
                       f"up_block_types and {n} block_out_channels must all be equal.")
    for name in ("layers_per_block", "transformer_layers_per_block", "attention_head_dim"):
      if len(getattr(self, name)) != n:
        raise ValueError(f"UNet config: {name} must have one entry per level ({n}); use from_diffusers_config "
                         "to expand a single int.")
    for t in self.down_block_types:
      if t not in _DOWN_TYPES:
        raise ValueError(f"UNet config: down block type {t!r} is not supported; use one of {_DOWN_TYPES}.")
    for t in self.up_block_types:
      if t not in _UP_TYPES:
        raise ValueError(f"UNet config: up block type {t!r} is not supported; use one of {_UP_TYPES}.")
    for c, heads in zip(self.block_out_channels, self.attention_head_dim):
      if c % self.norm_num_groups:
        raise ValueError(f"UNet config: block width {c} is not divisible by norm_num_groups "
                         f"{self.norm_num_groups}.")
      if c % heads:
        raise ValueError(f"UNet config: block width {c} is not divisible by {heads} attention heads "
                         "(attention_head_dim holds head counts).")
    if self.downsample_padding not in (0, 1):
      raise ValueError(f"UNet config: downsample_padding must be 0 or 1, got {self.downsample_padding}.")
    if self.conv_in_kernel % 2 == 0 or self.conv_out_kernel % 2 == 0:
      raise ValueError("UNet config: conv_in_kernel and conv_out_kernel must be odd.")
    if self.addition_embed_type not in (None, "text_time"):
      raise ValueError(f"UNet config: addition_embed_type {self.addition_embed_type!r} is not supported; "
                       "use None or 'text_time' (SDXL).")
    if self.addition_embed_type == "text_time" and (
        self.addition_time_embed_dim is None or self.projection_class_embeddings_input_dim is None):
      raise ValueError("UNet config: addition_embed_type 'text_time' needs addition_time_embed_dim and "
                       "projection_class_embeddings_input_dim.")

  @property
  def time_embed_dim(self) -> int:
    return 4 * self.block_out_channels[0]

  @classmethod
  def from_diffusers_config(cls, d: Mapping[str, Any]) -> "UNetConfig":
    """Builds the config from a diffusers `unet/config.json` dict; unsupported values raise ValueError."""
    d = {k: v for k, v in d.items() if not k.startswith("_")}
    for key, allowed in _FIXED_OPTIONS.items():
      if key in d:
        value = d.pop(key)
        if isinstance(value, (list, tuple)) and value and all(v == value[0] for v in value):
          value = value[0]
        if value not in allowed:
          raise ValueError(f"UNet config: {key}={value!r} is not supported by perflow_jax's UNet "
                           f"(supported: {allowed}).")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ValueError(f"UNet config: unknown field(s) {unknown}; is this a UNet2DConditionModel config?")
    down = tuple(d.get("down_block_types", cls.down_block_types))
    n = len(down)
    kwargs = dict(d)
    kwargs["down_block_types"] = down
    for key in ("up_block_types", "block_out_channels"):
      if key in kwargs:
        kwargs[key] = tuple(kwargs[key])
    if isinstance(kwargs.get("sample_size"), list):
      kwargs["sample_size"] = tuple(kwargs["sample_size"])
    if isinstance(kwargs.get("cross_attention_dim"), (list, tuple)):
      values = set(kwargs["cross_attention_dim"])
      if len(values) != 1:
        raise ValueError("UNet config: per-block cross_attention_dim values differ; only one context width "
                         "is supported.")
      kwargs["cross_attention_dim"] = values.pop()
    defaults = {"layers_per_block": 2, "transformer_layers_per_block": 1, "attention_head_dim": 8}
    for key, default in defaults.items():
      kwargs[key] = _per_level(kwargs.get(key, default), n, key)
    return cls(**kwargs)

  def to_diffusers_config(self) -> dict[str, Any]:
    """The diffusers config dict that builds the same network (diffusers' UNet2DConditionModel(**d))."""
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    for k, v in d.items():
      if isinstance(v, tuple):
        d[k] = list(v)
    d["mid_block_type"] = _MID_TYPE
    d["act_fn"] = "silu"
    return d


class BasicTransformerBlock(nn.Module):
  """Self-attention, cross-attention and GEGLU feed-forward, each pre-LayerNorm (eps 1e-5) with a residual."""
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: layers.PrecisionLike = None
  attention: layers.AttentionOptions = layers.AttentionOptions()

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    """x: [B, T, C] tokens; context: [B, L, D] -> [B, T, C]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn = lambda n: _Attention(self.num_heads, precision=self.precision, attention=self.attention, name=n, **kw)
    c = x.shape[-1]
    h = layers.LayerNorm(1e-5, name="norm1", **kw)(x)
    x = x + attn("attn1")(h, h)
    h = layers.LayerNorm(1e-5, name="norm2", **kw)(x)
    x = x + attn("attn2")(h, context)
    h = layers.LayerNorm(1e-5, name="norm3", **kw)(x)
    x = x + _FeedForward(c, precision=self.precision, name="ff", **kw)(h)
    return x


class _Attention(nn.Module):
  """diffusers Attention in a spatial transformer: bias-free to_q/to_k/to_v, to_out_0 with bias."""
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: layers.PrecisionLike = None
  attention: layers.AttentionOptions = layers.AttentionOptions()

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    """x: [B, T, C]; context: [B, S, D] (x itself for self-attention) -> [B, T, C]."""
    c = x.shape[-1]
    proj = lambda n, bias=False: layers.dense(c, n, self.dtype, self.param_dtype, self.precision, use_bias=bias)
    q, k, v = proj("to_q")(x), proj("to_k")(context), proj("to_v")(context)
    out = layers.multi_head_attention(q, k, v, self.num_heads, precision=self.precision,
                                      impl=self.attention.impl, query_chunk=self.attention.query_chunk)
    return proj("to_out_0", bias=True)(out)


class _FeedForward(nn.Module):
  """`net_0` GEGLU to 4C, then `net_2` back to C."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: layers.PrecisionLike = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, T, C] -> [B, T, C]."""
    h = layers.GEGLU(4 * self.features, self.dtype, self.param_dtype, self.precision, name="net_0")(x)
    return layers.dense(self.features, "net_2", self.dtype, self.param_dtype, self.precision)(h)


class Transformer2D(nn.Module):
  """diffusers Transformer2DModel (continuous input): GroupNorm (eps 1e-6), proj_in, blocks, proj_out, residual.

  proj_in/proj_out are 1x1 convs (SD1.x) or Dense layers (use_linear_projection); on NHWC both act on the channel
  axis, only the stored kernel rank differs.
  """
  num_heads: int
  num_layers: int
  num_groups: int
  use_linear_projection: bool
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: layers.PrecisionLike = None
  attention: layers.AttentionOptions = layers.AttentionOptions()

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    """x: [B, H, W, C]; context: [B, L, D] -> [B, H, W, C]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, hgt, wid, c = x.shape

    def proj(name):
      if self.use_linear_projection:
        return layers.dense(c, name, self.dtype, self.param_dtype, self.precision)
      return layers.Conv(c, 1, precision=self.precision, name=name, **kw)

    h = layers.GroupNorm(self.num_groups, 1e-6, name="norm", **kw)(x)
    h = proj("proj_in")(h).reshape(b, hgt * wid, c)
    block = nn.remat(BasicTransformerBlock) if self.remat else BasicTransformerBlock
    context = context.astype(self.dtype)
    for i in range(self.num_layers):
      h = block(self.num_heads, precision=self.precision, attention=self.attention, name=f"transformer_blocks_{i}",
                **kw)(h, context)
    h = proj("proj_out")(h.reshape(b, hgt, wid, c))
    return h + x.astype(self.dtype)


class _TimestepEmbedding(nn.Module):
  """linear_1, SiLU, linear_2."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: layers.PrecisionLike = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, Din] -> [B, features]."""
    dense = lambda n: layers.dense(self.features, n, self.dtype, self.param_dtype, self.precision)
    return dense("linear_2")(nn.silu(dense("linear_1")(x)))


def _resnet(module: nn.Module, features: int, name: str) -> nn.Module:
  cls = nn.remat(layers.ResnetBlock) if module.remat else layers.ResnetBlock
  return cls(features, module.num_groups, module.eps, dtype=module.dtype, param_dtype=module.param_dtype,
             precision=module.precision, name=name)


def _transformer(module: nn.Module, features: int, name: str) -> nn.Module:
  del features
  return Transformer2D(module.num_heads, module.transformer_layers, module.num_groups, module.use_linear_projection,
                       remat=module.remat, dtype=module.dtype, param_dtype=module.param_dtype,
                       precision=module.precision, attention=module.attention, name=name)


class DownBlock(nn.Module):
  """CrossAttnDownBlock2D (num_heads set) or DownBlock2D (num_heads None): resnets [+ attentions] [+ downsampler]."""
  features: int
  num_layers: int
  num_groups: int
  eps: float
  num_heads: Optional[int]
  transformer_layers: int
  use_linear_projection: bool
  add_downsample: bool
  downsample_padding: int = 1
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: layers.PrecisionLike = None
  attention: layers.AttentionOptions = layers.AttentionOptions()

  @nn.compact
  def __call__(self, x: jax.Array, emb_act: jax.Array, context: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
    """x: [B, H, W, Cin] -> (output, the skip activations this block contributes, in order)."""
    skips = []
    for j in range(self.num_layers):
      x = _resnet(self, self.features, f"resnets_{j}")(x, emb_act)
      if self.num_heads is not None:
        x = _transformer(self, self.features, f"attentions_{j}")(x, context)
      skips.append(x)
    if self.add_downsample:
      x = layers.Downsample(self.features, self.downsample_padding, self.dtype, self.param_dtype, self.precision,
                            name="downsamplers_0")(x)
      skips.append(x)
    return x, skips


class MidBlock(nn.Module):
  """UNetMidBlock2DCrossAttn: resnet, spatial transformer, resnet."""
  features: int
  num_groups: int
  eps: float
  num_heads: int
  transformer_layers: int
  use_linear_projection: bool
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: layers.PrecisionLike = None
  attention: layers.AttentionOptions = layers.AttentionOptions()

  @nn.compact
  def __call__(self, x: jax.Array, emb_act: jax.Array, context: jax.Array) -> jax.Array:
    """x: [B, H, W, C] -> [B, H, W, C]."""
    x = _resnet(self, self.features, "resnets_0")(x, emb_act)
    x = _transformer(self, self.features, "attentions_0")(x, context)
    return _resnet(self, self.features, "resnets_1")(x, emb_act)


class UpBlock(nn.Module):
  """CrossAttnUpBlock2D / UpBlock2D: each resnet takes concat([hidden, skip]) (hidden first) on channels."""
  features: int
  num_layers: int
  num_groups: int
  eps: float
  num_heads: Optional[int]
  transformer_layers: int
  use_linear_projection: bool
  add_upsample: bool
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: layers.PrecisionLike = None
  attention: layers.AttentionOptions = layers.AttentionOptions()

  @nn.compact
  def __call__(self, x: jax.Array, skips: list[jax.Array], emb_act: jax.Array, context: jax.Array,
               out_hw: Optional[tuple[int, int]] = None) -> jax.Array:
    """x: [B, H, W, C]; skips: num_layers skip activations, consumed last first; out_hw: upsampled size."""
    for j in range(self.num_layers):
      skip = skips[-1 - j]
      x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
      x = _resnet(self, self.features, f"resnets_{j}")(x, emb_act)
      if self.num_heads is not None:
        x = _transformer(self, self.features, f"attentions_{j}")(x, context)
    if self.add_upsample:
      x = layers.Upsample(self.features, self.dtype, self.param_dtype, self.precision, name="upsamplers_0")(x, out_hw)
    return x


class UNet2DConditionModel(nn.Module):
  """The conditional UNet of Stable Diffusion 1.x / 2.x / XL.

  Attributes:
    config: the architecture.
    dtype: compute dtype (bfloat16 for training on accelerators, float32 for parity tests).
    param_dtype: parameter storage dtype (float32 master weights).
    precision: matmul/conv precision; `jax.lax.Precision.HIGHEST` for float32 parity.
    remat: rematerialise every resnet and transformer block in the backward pass (saves activation memory).
    attention_impl: 'xla' (jax.nn.dot_product_attention; holds float32 logits [B, heads, T, S], 0.5 GiB per
      example per self-attention layer at 64x64 latents) or 'chunked' (`attention.chunked_attention`: the
      same result with one block of logits live at a time, recomputed in the backward pass; faster on CPU).
      Execution only: the parameter tree is the same for both.
    attention_query_chunk: query rows per chunk for 'chunked' (sequences no longer than this are not split).
  """
  config: UNetConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: layers.PrecisionLike = None
  remat: bool = False
  attention_impl: str = "xla"
  attention_query_chunk: int = layers.DEFAULT_QUERY_CHUNK

  def dummy_inputs(self, batch_size: int = 1) -> tuple[Any, ...]:
    """Small inputs for `init`: (sample [B,s,s,Cin], timesteps [B], context [B,77,D][, added_cond_kwargs])."""
    cfg = self.config
    s = 2 ** (len(cfg.block_out_channels) - 1)
    inputs = (jnp.zeros((batch_size, s, s, cfg.in_channels), jnp.float32),
              jnp.ones((batch_size,), jnp.float32),
              jnp.zeros((batch_size, 77, cfg.cross_attention_dim), jnp.float32))
    if cfg.addition_embed_type == "text_time":
      n_text = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
      inputs += ({"text_embeds": jnp.zeros((batch_size, n_text), jnp.float32),
                  "time_ids": jnp.zeros((batch_size, 6), jnp.float32)},)
    return inputs

  def _embed_time(self, timesteps: Union[jax.Array, float], batch: int,
                  added_cond_kwargs: Optional[Mapping[str, jax.Array]]) -> jax.Array:
    cfg = self.config
    t = jnp.asarray(timesteps, jnp.float32)
    if t.ndim > 1:
      raise ValueError(f"UNet: timesteps must be a scalar or shape [B], got shape {t.shape}.")
    t = jnp.broadcast_to(t, (batch,))
    temb = layers.timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
    embedding = lambda n: _TimestepEmbedding(cfg.time_embed_dim, self.dtype, self.param_dtype, self.precision,
                                             name=n)
    emb = embedding("time_embedding")(temb)
    if cfg.addition_embed_type == "text_time":
      if not added_cond_kwargs or "text_embeds" not in added_cond_kwargs or "time_ids" not in added_cond_kwargs:
        raise ValueError("UNet: this SDXL-style UNet (addition_embed_type='text_time') needs "
                         "added_cond_kwargs={'text_embeds': [B, D], 'time_ids': [B, 6]}.")
      time_ids = jnp.asarray(added_cond_kwargs["time_ids"], jnp.float32)
      time_embeds = layers.timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim,
                                              cfg.flip_sin_to_cos, cfg.freq_shift).reshape(batch, -1)
      text_embeds = jnp.asarray(added_cond_kwargs["text_embeds"], jnp.float32)
      add = jnp.concatenate([text_embeds, time_embeds], axis=-1)
      if add.shape[-1] != cfg.projection_class_embeddings_input_dim:
        raise ValueError(f"UNet: text_embeds + time_ids embeddings have width {add.shape[-1]} but the config "
                         f"expects projection_class_embeddings_input_dim={cfg.projection_class_embeddings_input_dim}.")
      emb = emb + embedding("add_embedding")(add)
    return emb

  @nn.compact
  def __call__(self, sample: jax.Array, timesteps: Union[jax.Array, float], encoder_hidden_states: jax.Array,
               added_cond_kwargs: Optional[Mapping[str, jax.Array]] = None) -> jax.Array:
    """Predicts the model output (epsilon or v, per the checkpoint).

    Args:
      sample: [B, H, W, Cin] latents (NHWC).
      timesteps: [B] float timesteps in [0, 1000] (fractions kept, never cast to int), or a scalar.
      encoder_hidden_states: [B, L, cross_attention_dim] text context.
      added_cond_kwargs: SDXL only: {'text_embeds': [B, 1280], 'time_ids': [B, 6]}.

    Returns:
      [B, H, W, out_channels] in `dtype`.
    """
    cfg = self.config
    if encoder_hidden_states.shape[-1] != cfg.cross_attention_dim:
      raise ValueError(f"UNet: encoder_hidden_states width {encoder_hidden_states.shape[-1]} does not match "
                       f"cross_attention_dim={cfg.cross_attention_dim}.")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
    attention = layers.AttentionOptions(self.attention_impl, int(self.attention_query_chunk))
    common = dict(num_groups=cfg.norm_num_groups, eps=cfg.norm_eps, use_linear_projection=cfg.use_linear_projection,
                  remat=self.remat, attention=attention, **kw)
    emb_act = nn.silu(self._embed_time(timesteps, sample.shape[0], added_cond_kwargs))
    context = encoder_hidden_states.astype(self.dtype)

    x = sample.astype(self.dtype)
    if cfg.center_input_sample:
      x = 2 * x - 1.0
    x = layers.Conv(cfg.block_out_channels[0], cfg.conv_in_kernel, name="conv_in", **kw)(x)
    skips = [x]
    n = len(cfg.block_out_channels)
    for i, block_type in enumerate(cfg.down_block_types):
      x, block_skips = DownBlock(
          cfg.block_out_channels[i], cfg.layers_per_block[i],
          num_heads=cfg.attention_head_dim[i] if block_type == "CrossAttnDownBlock2D" else None,
          transformer_layers=cfg.transformer_layers_per_block[i], add_downsample=i < n - 1,
          downsample_padding=cfg.downsample_padding, name=f"down_blocks_{i}", **common)(x, emb_act, context)
      skips.extend(block_skips)

    x = MidBlock(cfg.block_out_channels[-1], num_heads=cfg.attention_head_dim[-1],
                 transformer_layers=cfg.transformer_layers_per_block[-1], name="mid_block",
                 **common)(x, emb_act, context)

    for i, block_type in enumerate(cfg.up_block_types):
      level = n - 1 - i
      num_layers = cfg.layers_per_block[level] + 1
      block_skips, skips = skips[-num_layers:], skips[:-num_layers]
      # Upsample to the next skip's size, which also handles sizes that are not multiples of 2**(n-1).
      out_hw = tuple(skips[-1].shape[1:3]) if i < n - 1 else None
      x = UpBlock(
          cfg.block_out_channels[level], num_layers,
          num_heads=cfg.attention_head_dim[level] if block_type == "CrossAttnUpBlock2D" else None,
          transformer_layers=cfg.transformer_layers_per_block[level], add_upsample=i < n - 1,
          name=f"up_blocks_{i}", **common)(x, block_skips, emb_act, context, out_hw)

    x = nn.silu(layers.GroupNorm(cfg.norm_num_groups, cfg.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                                 name="conv_norm_out")(x))
    return layers.Conv(cfg.out_channels, cfg.conv_out_kernel, name="conv_out", **kw)(x)
