"""Flax port of the CLIP text transformer (transformers' CLIPTextModel / CLIPTextModelWithProjection).

Covers OpenAI CLIP-L (SD1.x, SDXL text_encoder; quick_gelu), OpenCLIP ViT-H (SD2.x; gelu, 23 layers) and
OpenCLIP bigG with projection (SDXL text_encoder_2). The parameter tree is rooted at the transformer
(`embeddings`, `encoder/layers_i`, `final_layer_norm`) plus `text_projection` when `with_projection`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from perflow_jax.models import layers

Dtype = Any

_ACTIVATIONS = {"quick_gelu": layers.quick_gelu, "gelu": layers.gelu_exact}
# transformers' CLIPTextConfig default, used when a config dict does not say.
_TRANSFORMERS_DEFAULT_EOS = 49407


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """Text tower architecture (defaults: OpenAI CLIP ViT-L/14 as in SD1.5).

  `eos_token_id` decides the pooling position as transformers does: 2 (the legacy value in every SD text
  encoder config) pools at argmax(input_ids), any other value at the first occurrence of that id.
  """
  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  projection_dim: Optional[int] = None
  eos_token_id: int = 2

  def __post_init__(self):
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(f"CLIP text config: hidden_act {self.hidden_act!r} is not supported; use one of "
                       f"{sorted(_ACTIVATIONS)}.")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"CLIP text config: hidden_size {self.hidden_size} is not divisible by "
                       f"num_attention_heads {self.num_attention_heads}.")

  @classmethod
  def from_transformers_config(cls, d: Mapping[str, Any]) -> "CLIPTextConfig":
    """From a transformers CLIPTextConfig dict (`text_encoder/config.json`); a full CLIPConfig's `text_config`
    is used if given. Generic PretrainedConfig keys (dropout, token ids other than eos, ...) are ignored."""
    if "text_config" in d and isinstance(d["text_config"], Mapping):
      d = d["text_config"]
    eos = d.get("eos_token_id", _TRANSFORMERS_DEFAULT_EOS)
    if isinstance(eos, (list, tuple)):
      if len(eos) != 1:
        raise ValueError(f"CLIP text config: eos_token_id {eos} lists several ids; give exactly one.")
      eos = eos[0]
    kwargs = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d and f.name != "eos_token_id"}
    return cls(eos_token_id=int(eos), **kwargs)

  def to_transformers_config(self) -> dict[str, Any]:
    """Keyword arguments for transformers.CLIPTextConfig that build the same tower."""
    d = dataclasses.asdict(self)
    if d["projection_dim"] is None:
      del d["projection_dim"]
    return d


class _Embeddings(nn.Module):
  """Token embedding plus learned absolute positions 0..L-1."""
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> jax.Array:
    """input_ids: [B, L] int -> [B, L, D]."""
    cfg = self.config
    embed = lambda n, rows, axes: nn.Embed(
        rows, cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes), name=n)
    tokens = embed("token_embedding", cfg.vocab_size, ("vocab", "embed"))(input_ids)
    positions = embed("position_embedding", cfg.max_position_embeddings, ("positions", "embed"))(
        jnp.arange(input_ids.shape[1])[None])
    return tokens + positions


class _SelfAttention(nn.Module):
  """Causal multi-head self-attention with biased q/k/v/out projections."""
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: layers.PrecisionLike = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, L, D] -> [B, L, D]."""
    dense = lambda n: layers.dense(x.shape[-1], n, self.dtype, self.param_dtype, self.precision)
    out = layers.multi_head_attention(dense("q_proj")(x), dense("k_proj")(x), dense("v_proj")(x), self.num_heads,
                                      is_causal=True, precision=self.precision)
    return dense("out_proj")(out)


class _MLP(nn.Module):
  """fc1, activation, fc2."""
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: layers.PrecisionLike = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    h = layers.dense(cfg.intermediate_size, "fc1", self.dtype, self.param_dtype, self.precision)(x)
    h = _ACTIVATIONS[cfg.hidden_act](h)
    return layers.dense(cfg.hidden_size, "fc2", self.dtype, self.param_dtype, self.precision)(h)


class _EncoderLayer(nn.Module):
  """Pre-LN block: x += attn(LN1(x)); x += MLP(LN2(x))."""
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: layers.PrecisionLike = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.LayerNorm(cfg.layer_norm_eps, name="layer_norm1", **kw)(x)
    x = x + _SelfAttention(cfg.num_attention_heads, precision=self.precision, name="self_attn", **kw)(h)
    h = layers.LayerNorm(cfg.layer_norm_eps, name="layer_norm2", **kw)(x)
    return x + _MLP(cfg, precision=self.precision, name="mlp", **kw)(h)


class _Encoder(nn.Module):
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: layers.PrecisionLike = None

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    """x: [B, L, D] embeddings -> [embeddings, output of layer 1, ..., output of layer N] (transformers'
    `hidden_states`)."""
    hidden = [x]
    for i in range(self.config.num_hidden_layers):
      x = _EncoderLayer(self.config, self.dtype, self.param_dtype, self.precision, name=f"layers_{i}")(x)
      hidden.append(x)
    return hidden


class CLIPTextEncoder(nn.Module):
  """CLIP text transformer; `__call__` gives last_hidden_state (after the final LayerNorm), as SD1.x/SD2.x use.

  Attributes:
    config: the architecture.
    dtype, param_dtype, precision: compute dtype, storage dtype, matmul precision.
    with_projection: add the bias-free `text_projection` (CLIPTextModelWithProjection; SDXL's text_encoder_2).
  """
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: layers.PrecisionLike = None
  with_projection: bool = False

  def dummy_inputs(self, batch_size: int = 1) -> tuple[jax.Array]:
    """(input_ids [B, max_position_embeddings] int32,)."""
    return (jnp.zeros((batch_size, self.config.max_position_embeddings), jnp.int32),)

  @nn.compact
  def encode(self, input_ids: jax.Array, hidden_layer: Optional[int] = None) -> dict[str, jax.Array]:
    """Runs the tower and returns every output SD pipelines use.

    Args:
      input_ids: [B, L] token ids, L <= max_position_embeddings (causal mask only; no padding mask, as SD).
      hidden_layer: index into transformers' `hidden_states` tuple (0 = embeddings, i = output of layer i; -1 =
        last layer, -2 = penultimate, SDXL's choice), taken BEFORE the final LayerNorm. None: not returned.

    Returns:
      dict with 'last_hidden_state' [B, L, D] (after final LN), 'pooled' [B, D] (final LN at the EOS position),
      'hidden' [B, L, D] when hidden_layer is given, 'text_embeds' [B, P] when with_projection.
    """
    cfg = self.config
    if input_ids.ndim != 2 or input_ids.shape[1] > cfg.max_position_embeddings:
      raise ValueError(f"CLIP text encoder: input_ids must be [B, L] with L <= {cfg.max_position_embeddings}, "
                       f"got shape {input_ids.shape}; tokenize with max_length={cfg.max_position_embeddings}.")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = _Embeddings(cfg, name="embeddings", **kw)(input_ids)
    hidden = _Encoder(cfg, precision=self.precision, name="encoder", **kw)(x)
    last = layers.LayerNorm(cfg.layer_norm_eps, name="final_layer_norm", **kw)(hidden[-1])
    if cfg.eos_token_id == 2:
      eos_pos = jnp.argmax(input_ids, axis=-1)
    else:
      eos_pos = jnp.argmax(input_ids == cfg.eos_token_id, axis=-1)
    pooled = jnp.take_along_axis(last, eos_pos[:, None, None], axis=1)[:, 0]
    out = {"last_hidden_state": last, "pooled": pooled}
    if hidden_layer is not None:
      if not -len(hidden) <= hidden_layer < len(hidden):
        raise ValueError(f"CLIP text encoder: hidden_layer {hidden_layer} is out of range for "
                         f"{cfg.num_hidden_layers} layers (valid: {-len(hidden)}..{len(hidden) - 1}).")
      out["hidden"] = hidden[hidden_layer]
    if self.with_projection:
      if cfg.projection_dim is None:
        raise ValueError("CLIP text encoder: with_projection=True needs config.projection_dim.")
      out["text_embeds"] = layers.dense(cfg.projection_dim, "text_projection", self.dtype, self.param_dtype,
                                        self.precision, use_bias=False)(pooled)
    return out

  def __call__(self, input_ids: jax.Array) -> jax.Array:
    """input_ids: [B, L] -> last_hidden_state [B, L, D] (after the final LayerNorm)."""
    return self.encode(input_ids)["last_hidden_state"]
