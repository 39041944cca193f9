"""Building blocks shared by the Stable Diffusion Flax ports (NHWC, logical-axis-annotated parameters).

Every module here takes `dtype` (compute), `param_dtype` (storage) and `precision` (passed to every matmul and
convolution; use `jax.lax.Precision.HIGHEST` for float32 parity tests). Normalisation statistics, attention logits
and the softmax always run in float32, whatever the compute dtype.

Logical axis names (mapped onto the mesh by `perflow_jax.parallel`):
  Dense kernel (in, out) ('embed', 'mlp'), bias ('mlp',); conv kernel (kh, kw, in, out)
  ('conv_h', 'conv_w', 'conv_in', 'conv_out'), bias ('conv_out',); norm scale/bias ('norm',).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from perflow_jax.models import attention

Dtype = Any
PrecisionLike = Optional[jax.lax.Precision]

DENSE_KERNEL_AXES = ("embed", "mlp")
DENSE_BIAS_AXES = ("mlp",)
CONV_KERNEL_AXES = ("conv_h", "conv_w", "conv_in", "conv_out")
CONV_BIAS_AXES = ("conv_out",)
NORM_AXES = ("norm",)


def dense(features: int, name: str, dtype: Dtype, param_dtype: Dtype, precision: PrecisionLike,
          use_bias: bool = True) -> nn.Dense:
  """A Dense layer whose kernel (in, out) and bias carry the logical axis names; call it inside a compact method."""
  return nn.Dense(
      features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, precision=precision,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), DENSE_KERNEL_AXES),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), DENSE_BIAS_AXES),
      name=name)


class Conv(nn.Module):
  """2-D convolution on NHWC input with an HWIO kernel and explicit padding.

  Attributes:
    features: output channels.
    kernel_size: square kernel side.
    strides: square stride.
    padding: ((top, bottom), (left, right)); None means symmetric `kernel_size // 2` (PyTorch `padding=k//2`).
  """
  features: int
  kernel_size: int = 3
  strides: int = 1
  padding: Optional[tuple[tuple[int, int], tuple[int, int]]] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: PrecisionLike = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, Cin] -> [B, H', W', features]."""
    k = self.kernel_size
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(nn.initializers.lecun_normal(), CONV_KERNEL_AXES),
        (k, k, x.shape[-1], self.features), self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), CONV_BIAS_AXES),
                      (self.features,), self.param_dtype)
    x = x.astype(self.dtype)
    kernel = kernel.astype(self.dtype)
    if k == 1 and self.strides == 1:
      # A 1x1 convolution is a matmul over the channel axis; skip the convolution machinery.
      y = jax.lax.dot_general(x, kernel[0, 0], (((x.ndim - 1,), (0,)), ((), ())), precision=self.precision)
    else:
      pad = self.padding if self.padding is not None else ((k // 2, k // 2), (k // 2, k // 2))
      y = jax.lax.conv_general_dilated(
          x, kernel, window_strides=(self.strides, self.strides), padding=pad,
          dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=self.precision)
    return y + bias.astype(self.dtype)


def _norm_params(module: nn.Module, channels: int, param_dtype: Dtype) -> tuple[jax.Array, jax.Array]:
  scale = module.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), NORM_AXES),
                       (channels,), param_dtype)
  bias = module.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), NORM_AXES),
                      (channels,), param_dtype)
  return scale, bias


class GroupNorm(nn.Module):
  """GroupNorm over the last (channel) axis, matching torch.nn.GroupNorm.

  Statistics are two-pass (mean, then mean of squared deviations) in float32, i.e. Flax's
  `use_fast_variance=False`; the normalisation and affine are folded into one per-(batch, channel) multiply-add
  so the full-size activation is read once and written once.

  Attributes:
    num_groups: number of channel groups.
    epsilon: added to the variance (UNet resnets 1e-5, spatial transformer and VAE 1e-6; see sd_models.md).
  """
  num_groups: int
  epsilon: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, ..., C] (any spatial/token axes) -> same shape, in `dtype`."""
    c = x.shape[-1]
    if c % self.num_groups:
      raise ValueError(f"GroupNorm: {c} channels do not divide into {self.num_groups} groups; "
                       "fix norm_num_groups in the model config.")
    scale, bias = _norm_params(self, c, self.param_dtype)
    b, g = x.shape[0], self.num_groups
    x32 = x.astype(jnp.float32).reshape(b, -1, c)  # [B, positions, C]
    count = x32.shape[1] * (c // g)
    # Sum over positions into [B, C] first, then over each group's channels: the big reduction keeps the channel
    # axis whole and contiguous, so it vectorises (reducing straight to [B, G] over a minor axis of C/G channels
    # measured 2.5-5x slower on CPU and did not use the second core).
    def group_mean(y):  # [B, positions, C] -> each channel's group mean, [B, 1, C]
      sums = jnp.sum(jnp.sum(y, axis=1).reshape(b, g, c // g), axis=-1) / count  # [B, G]
      return jnp.repeat(sums, c // g, axis=1)[:, None, :]
    mean = group_mean(x32)
    var = group_mean(jnp.square(x32 - mean))
    mul = jax.lax.rsqrt(var + self.epsilon) * scale.astype(jnp.float32)
    add = bias.astype(jnp.float32) - mean * mul
    return (x32 * mul + add).reshape(x.shape).astype(self.dtype)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis with two-pass float32 statistics (torch.nn.LayerNorm semantics)."""
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., C] -> [..., C] in `dtype`."""
    scale, bias = _norm_params(self, x.shape[-1], self.param_dtype)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


def _precision_scope(precision: PrecisionLike):
  # jax.nn.dot_product_attention takes no precision argument; for float32 inputs it uses the default matmul
  # precision, so scope that instead (bf16/fp16 inputs get an explicit f32-accumulating algorithm inside JAX).
  if precision is None:
    return contextlib.nullcontext()
  name = precision.name.lower() if isinstance(precision, jax.lax.Precision) else str(precision)
  return jax.default_matmul_precision(name)


# A fused 'flash' kernel (cuDNN via jax.nn.dot_product_attention(implementation='cudnn'), or Pallas on TPU) is
# not offered: it could not be checked against these two on an accelerator here.
ATTENTION_IMPLS = ("xla", "chunked")
# The blockwise implementation lives in models/attention.py; these names stay importable from here.
DEFAULT_QUERY_CHUNK = attention.DEFAULT_QUERY_CHUNK
chunked_attention = attention.chunked_attention


def check_attention_impl(impl: str, query_chunk: int = DEFAULT_QUERY_CHUNK) -> None:
  """Raises a ValueError naming the option when `impl` / `query_chunk` are not usable."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention implementation {impl!r} is not one of {ATTENTION_IMPLS} ('xla': "
                     "jax.nn.dot_product_attention; 'chunked': blockwise, memory-efficient).")
  if int(query_chunk) < 1:
    raise ValueError(f"attention query chunk {query_chunk} must be >= 1.")


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
  """How `multi_head_attention` computes attention (execution only: parameters and outputs do not change).

  Attributes:
    impl: 'xla' (jax.nn.dot_product_attention) or 'chunked' (`attention.chunked_attention`).
    query_chunk: query rows per block for 'chunked'.
  """
  impl: str = "xla"
  query_chunk: int = DEFAULT_QUERY_CHUNK

  def __post_init__(self):
    check_attention_impl(self.impl, self.query_chunk)


def multi_head_attention(q: jax.Array, k: jax.Array, v: jax.Array, num_heads: int, is_causal: bool = False,
                         precision: PrecisionLike = None, impl: str = "xla",
                         query_chunk: int = DEFAULT_QUERY_CHUNK) -> jax.Array:
  """Scaled dot-product attention on projected tokens.

  Args:
    q: [B, T, C] queries; k, v: [B, S, C] keys and values (C = num_heads * head_dim).
    num_heads: heads; the scale is head_dim ** -0.5.
    is_causal: mask out keys after each query (CLIP text).
    precision: matmul precision for float32 inputs.
    impl: 'xla' = `jax.nn.dot_product_attention` (materialises float32 logits [B, heads, T, S]); 'chunked' =
      `attention.chunked_attention`, the same numbers one block of logits at a time, forward and backward (use
      it at 64x64 latents, where the full logits are 0.5 GiB per example per layer, and on CPU, where it is
      several times faster).
    query_chunk: query rows per block for impl='chunked'.

  Returns:
    [B, T, C]; logits and softmax are computed in float32.
  """
  b, t, c = q.shape
  if c % num_heads:
    raise ValueError(f"attention width {c} is not divisible by {num_heads} heads; fix the head count in the config.")
  check_attention_impl(impl, query_chunk)
  head_dim = c // num_heads
  split = lambda x: x.reshape(x.shape[0], x.shape[1], num_heads, head_dim)
  scale = 1.0 / math.sqrt(head_dim)
  if impl == "chunked":
    out = chunked_attention(split(q), split(k), split(v), scale, is_causal=is_causal, query_chunk=query_chunk,
                            precision=precision)
  else:
    with _precision_scope(precision):
      out = jax.nn.dot_product_attention(split(q), split(k), split(v), scale=scale, is_causal=is_causal)
  return out.reshape(b, t, c)


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool = True,
                       freq_shift: float = 0.0, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of float timesteps, as diffusers' `get_timestep_embedding`.

  Args:
    timesteps: [N] float timesteps (fractions are kept; never rounded).
    dim: embedding width.
    flip_sin_to_cos: put the cosine half first (every SD model).
    freq_shift: `downscale_freq_shift`; freq_i = exp(-ln(max_period) * i / (dim/2 - freq_shift)).

  Returns:
    [N, dim] float32.
  """
  half = dim // 2
  # The frequencies are constants, computed here in numpy: the float32 exponent in PyTorch's op order (XLA would
  # rewrite the division into a reciprocal multiply), then exp in float64 rounded once. This reproduces
  # PyTorch's float32 frequencies (158 of 160 bit-identical for SD1.5); one ulp off would move
  # t * freq by ~6e-5 at t = 1000.
  exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half - freq_shift)
  freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
  args = jnp.asarray(timesteps, jnp.float32)[:, None] * freqs[None, :]
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def gelu_exact(x: jax.Array) -> jax.Array:
  """GELU with the exact erf (PyTorch's default); Flax's default is the tanh approximation."""
  return nn.gelu(x, approximate=False)


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's activation, x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


class GEGLU(nn.Module):
  """`proj` to 2 * features, split as (value, gate), value * GELU_exact(gate) (diffusers GEGLU)."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: PrecisionLike = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., C] -> [..., features]."""
    h = dense(2 * self.features, "proj", self.dtype, self.param_dtype, self.precision)(x)
    value, gate = jnp.split(h, 2, axis=-1)
    return value * gelu_exact(gate)


class ResnetBlock(nn.Module):
  """diffusers ResnetBlock2D: GN, SiLU, conv3x3, (+ time projection), GN, SiLU, conv3x3, plus a shortcut.

  The 1x1 `conv_shortcut` exists exactly when the input width differs from `features`.
  """
  features: int
  num_groups: int
  epsilon: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: PrecisionLike = None

  @nn.compact
  def __call__(self, x: jax.Array, temb_act: Optional[jax.Array] = None) -> jax.Array:
    """x: [B, H, W, Cin]; temb_act: [B, T] time embedding already passed through SiLU, or None (VAE).

    Returns:
      [B, H, W, features].
    """
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    conv = lambda n, k: Conv(self.features, k, precision=self.precision, name=n, **kw)
    h = nn.silu(GroupNorm(self.num_groups, self.epsilon, name="norm1", **kw)(x))
    h = conv("conv1", 3)(h)
    if temb_act is not None:
      t = dense(self.features, "time_emb_proj", self.dtype, self.param_dtype, self.precision)(temb_act)
      h = h + t[:, None, None, :]
    h = nn.silu(GroupNorm(self.num_groups, self.epsilon, name="norm2", **kw)(h))
    h = conv("conv2", 3)(h)
    if x.shape[-1] != self.features:
      x = conv("conv_shortcut", 1)(x)
    return x.astype(self.dtype) + h


class Downsample(nn.Module):
  """Stride-2 conv3x3 named `conv`. pad=1: symmetric (UNet); pad=0: right/bottom by one (VAE, diffusers padding=0)."""
  features: int
  pad: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: PrecisionLike = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C] -> [B, ceil(H/2) or floor((H-1)/2)+1, ..., features] as PyTorch computes it."""
    padding = ((1, 1), (1, 1)) if self.pad == 1 else ((0, 1), (0, 1))
    return Conv(self.features, 3, strides=2, padding=padding, dtype=self.dtype, param_dtype=self.param_dtype,
                precision=self.precision, name="conv")(x)


def upsample_nearest(x: jax.Array, out_hw: Optional[tuple[int, int]] = None) -> jax.Array:
  """Nearest-neighbour upsampling of [B, H, W, C]: x2 by default, or to `out_hw` as torch's interpolate(size=...)."""
  b, h, w, c = x.shape
  if out_hw is None or tuple(out_hw) == (2 * h, 2 * w):
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
    return x.reshape(b, 2 * h, 2 * w, c)
  oh, ow = out_hw
  # PyTorch 'nearest': src = min(floor(dst * in / out), in - 1).
  rows = np.minimum(np.floor(np.arange(oh) * (h / oh)).astype(np.int32), h - 1)
  cols = np.minimum(np.floor(np.arange(ow) * (w / ow)).astype(np.int32), w - 1)
  return x[:, rows][:, :, cols]


class Upsample(nn.Module):
  """Nearest upsampling then conv3x3 (pad 1) named `conv`."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: PrecisionLike = None

  @nn.compact
  def __call__(self, x: jax.Array, out_hw: Optional[tuple[int, int]] = None) -> jax.Array:
    """x: [B, H, W, C] -> [B, 2H, 2W, features] (or `out_hw`)."""
    return Conv(self.features, 3, dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
                name="conv")(upsample_nearest(x, out_hw))
