"""Flax port of diffusers' AutoencoderKL (the Stable Diffusion VAE), NHWC inside.

Latent convention: `encode` returns the unscaled posterior moments; training latents are
`sample_latents(key, mean, logvar, scaling_factor)` (scaled). `decode` takes UNSCALED latents, so a caller holding
scaled latents z passes `z / scaling_factor` (+ shift_factor when the config has one).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from perflow_jax.models import layers

Dtype = Any

# Every VAE norm (resnets, mid attention, conv_norm_out) uses eps 1e-6, unlike the UNet (sd_models.md pitfall 2).
VAE_NORM_EPS = 1e-6

_FIXED_OPTIONS: dict[str, tuple[Any, ...]] = {
    "act_fn": ("silu",),
    "latents_mean": (None,),
    "latents_std": (None,),
}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Architecture and latent scaling of an AutoencoderKL (defaults: the SD1.x/SD2.x/SDXL VAE)."""
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: int = 512
  scaling_factor: float = 0.18215
  shift_factor: Optional[float] = None
  force_upcast: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  def __post_init__(self):
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise ValueError(f"VAE config: block width {c} is not divisible by norm_num_groups {self.norm_num_groups}.")

  @classmethod
  def from_diffusers_config(cls, d: Mapping[str, Any]) -> "VAEConfig":
    """Builds the config from a diffusers `vae/config.json` dict; unsupported values raise ValueError."""
    d = {k: v for k, v in d.items() if not k.startswith("_")}
    n = len(d.get("block_out_channels", cls.block_out_channels))
    for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
      types = d.pop(key, [want] * n)
      if len(types) != n or any(t != want for t in types):
        raise ValueError(f"VAE config: {key}={types} is not supported; need {n} x {want!r} (one per block width).")
    for key, allowed in _FIXED_OPTIONS.items():
      if key in d and d.pop(key) not in allowed:
        raise ValueError(f"VAE config: {key} must be one of {allowed} for perflow_jax's AutoencoderKL.")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ValueError(f"VAE config: unknown field(s) {unknown}; is this an AutoencoderKL config?")
    if "block_out_channels" in d:
      d["block_out_channels"] = tuple(d["block_out_channels"])
    if isinstance(d.get("sample_size"), (list, tuple)):
      d["sample_size"] = int(d["sample_size"][0])
    return cls(**d)

  def to_diffusers_config(self) -> dict[str, Any]:
    """The diffusers config dict that builds the same network (diffusers' AutoencoderKL(**d))."""
    d = dataclasses.asdict(self)
    n = len(self.block_out_channels)
    d["block_out_channels"] = list(self.block_out_channels)
    d["down_block_types"] = ["DownEncoderBlock2D"] * n
    d["up_block_types"] = ["UpDecoderBlock2D"] * n
    d["act_fn"] = "silu"
    return d


class _Attention(nn.Module):
  """The VAE mid-block attention: GroupNorm (eps 1e-6), one head over all channels, biased q/k/v/out, residual."""
  num_groups: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: layers.PrecisionLike = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C] -> [B, H, W, C]."""
    b, h, w, c = x.shape
    dense = lambda n: layers.dense(c, n, self.dtype, self.param_dtype, self.precision)
    t = layers.GroupNorm(self.num_groups, VAE_NORM_EPS, self.dtype, self.param_dtype, name="group_norm")(x)
    t = t.reshape(b, h * w, c)
    out = layers.multi_head_attention(dense("to_q")(t), dense("to_k")(t), dense("to_v")(t), 1,
                                      precision=self.precision)
    return dense("to_out_0")(out).reshape(b, h, w, c) + x.astype(self.dtype)


class _MidBlock(nn.Module):
  """resnet, attention (optional), resnet; no time embedding."""
  features: int
  num_groups: int
  add_attention: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: layers.PrecisionLike = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
    x = layers.ResnetBlock(self.features, self.num_groups, VAE_NORM_EPS, name="resnets_0", **kw)(x)
    if self.add_attention:
      x = _Attention(self.num_groups, name="attentions_0", **kw)(x)
    return layers.ResnetBlock(self.features, self.num_groups, VAE_NORM_EPS, name="resnets_1", **kw)(x)


class _Block(nn.Module):
  """DownEncoderBlock2D (resample 'down') or UpDecoderBlock2D (resample 'up'); resample None on the last level."""
  features: int
  num_layers: int
  num_groups: int
  resample: Optional[str]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: layers.PrecisionLike = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
    for j in range(self.num_layers):
      x = layers.ResnetBlock(self.features, self.num_groups, VAE_NORM_EPS, name=f"resnets_{j}", **kw)(x)
    if self.resample == "down":
      # diffusers' VAE downsampler (padding=0) pads right/bottom by one, then a VALID stride-2 conv.
      x = layers.Downsample(self.features, pad=0, name="downsamplers_0", **kw)(x)
    elif self.resample == "up":
      x = layers.Upsample(self.features, name="upsamplers_0", **kw)(x)
    return x


class Encoder(nn.Module):
  """Images [B, H, W, in] -> 2 * latent_channels moments at H/2^(n-1) (before quant_conv)."""
  config: VAEConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: layers.PrecisionLike = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
    x = layers.Conv(cfg.block_out_channels[0], 3, name="conv_in", **kw)(x)
    n = len(cfg.block_out_channels)
    for i, ch in enumerate(cfg.block_out_channels):
      x = _Block(ch, cfg.layers_per_block, cfg.norm_num_groups, "down" if i < n - 1 else None,
                 name=f"down_blocks_{i}", **kw)(x)
    x = _MidBlock(cfg.block_out_channels[-1], cfg.norm_num_groups, cfg.mid_block_add_attention, name="mid_block",
                  **kw)(x)
    x = nn.silu(layers.GroupNorm(cfg.norm_num_groups, VAE_NORM_EPS, self.dtype, self.param_dtype,
                                 name="conv_norm_out")(x))
    return layers.Conv(2 * cfg.latent_channels, 3, name="conv_out", **kw)(x)


class Decoder(nn.Module):
  """Unscaled latents [B, h, w, latent] (after post_quant_conv) -> images [B, h*2^(n-1), ..., out]."""
  config: VAEConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: layers.PrecisionLike = None

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
    x = layers.Conv(cfg.block_out_channels[-1], 3, name="conv_in", **kw)(z)
    x = _MidBlock(cfg.block_out_channels[-1], cfg.norm_num_groups, cfg.mid_block_add_attention, name="mid_block",
                  **kw)(x)
    widths = cfg.block_out_channels[::-1]
    for i, ch in enumerate(widths):
      x = _Block(ch, cfg.layers_per_block + 1, cfg.norm_num_groups, "up" if i < len(widths) - 1 else None,
                 name=f"up_blocks_{i}", **kw)(x)
    x = nn.silu(layers.GroupNorm(cfg.norm_num_groups, VAE_NORM_EPS, self.dtype, self.param_dtype,
                                 name="conv_norm_out")(x))
    return layers.Conv(cfg.out_channels, 3, name="conv_out", **kw)(x)


class AutoencoderKL(nn.Module):
  """The KL autoencoder. Use `apply(..., method=vae.encode)` / `method=vae.decode`.

  `__call__` runs encode then decode (of the mean) so that `init` creates every parameter.
  """
  config: VAEConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: layers.PrecisionLike = None

  def setup(self):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
    self.encoder = Encoder(cfg, **kw)
    self.decoder = Decoder(cfg, **kw)
    if cfg.use_quant_conv:
      self.quant_conv = layers.Conv(2 * cfg.latent_channels, 1, **kw)
    if cfg.use_post_quant_conv:
      self.post_quant_conv = layers.Conv(cfg.latent_channels, 1, **kw)

  def dummy_inputs(self, batch_size: int = 1) -> tuple[jax.Array]:
    """(images [B, s, s, in_channels],) with s = 2^(levels-1), the smallest size giving a 1x1 latent."""
    s = 2 ** (len(self.config.block_out_channels) - 1)
    return (jnp.zeros((batch_size, s, s, self.config.in_channels), jnp.float32),)

  def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """images: [B, H, W, 3] in [-1, 1] -> (mean, logvar), each [B, H/f, W/f, latent] float32, UNSCALED.

    logvar is clipped to [-30, 20] as diffusers' DiagonalGaussianDistribution does.
    """
    moments = self.encoder(images)
    if self.config.use_quant_conv:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, latents: jax.Array) -> jax.Array:
    """latents: [B, h, w, latent] UNSCALED (divide scaled latents by scaling_factor first) -> [B, 8h, 8w, 3]."""
    z = latents.astype(self.dtype)
    if self.config.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(self, images: jax.Array) -> jax.Array:
    """Reconstruction of `images` from the posterior mean: [B, H, W, 3] -> [B, H, W, 3]."""
    mean, _ = self.encode(images)
    return self.decode(mean)


def sample_latents(key: jax.Array, mean: jax.Array, logvar: jax.Array, scaling_factor: float,
                   shift_factor: Optional[float] = None) -> jax.Array:
  """Draws scaled training latents from the VAE posterior.

  Args:
    key: PRNG key.
    mean, logvar: [B, h, w, C] posterior moments from `AutoencoderKL.encode`.
    scaling_factor: the VAE config's scaling factor (0.18215 SD1/2, 0.13025 SDXL).
    shift_factor: subtracted before scaling when the VAE defines one (None for SD VAEs).

  Returns:
    [B, h, w, C] float32 latents (mean + exp(logvar / 2) * noise - shift) * scaling_factor.
  """
  mean = mean.astype(jnp.float32)
  std = jnp.exp(0.5 * logvar.astype(jnp.float32))
  z = mean + std * jax.random.normal(key, mean.shape, jnp.float32)
  if shift_factor is not None:
    z = z - shift_factor
  return z * scaling_factor
