"""Exact attention computed one block at a time, with a flash-style backward (`chunked_attention`).

A block is `heads_per_block` (batch, head) slices times `query_chunk` query rows, against all keys. The forward
pass keeps only the output and each row's log-sum-exp; the backward pass recomputes each block's probabilities
from them (Dao et al., FlashAttention, arXiv:2205.14135, Algorithm 2; Rabe & Staats, arXiv:2112.05682). So no
[B, N, T, S] tensor is ever held, in either pass.

Why blocks of (batch, head) slices: on CPU, one block's float32 logits should stay near the cache. The benchmark
UNet's 1024-token self-attention with 8-wide heads (configs/bench.py) held [4, 8, 1024, 1024] float32 logits
(128 MiB) under `jax.nn.dot_product_attention`, and one such layer took 157 ms forward / 467 ms forward+backward
on this project's 2-core CPU; in 8 MiB blocks it takes 18 / 86 ms for the same numbers (PyTorch's fused CPU
flash kernel, `scaled_dot_product_attention`: 15 / 46 ms). On accelerators, and wherever the batch may be
sharded, the default block is one query chunk over every (batch, head) slice, which bounds memory without
serialising small matmuls or looping over a sharded axis.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

PrecisionLike = Optional[jax.lax.Precision]

DEFAULT_QUERY_CHUNK = 1024
# Float32 logits per block on CPU (heads_per_block * query_chunk * keys * 4 bytes): measured best of 4/8/16 MiB
# for the benchmark UNet's self-attention on this project's CPU machine.
CPU_BLOCK_BYTES = 8 * 2**20
# Jax's masked-logit value in its XLA attention path: finite, so a fully masked row cannot produce NaNs.
_LARGE_NEGATIVE = -0.7 * float(jnp.finfo(jnp.float32).max)


class _Blocking(NamedTuple):
  """Static block layout: X = B * N slices in `groups` of `heads` slices, T padded to `chunks` * `chunk` rows."""
  groups: int
  heads: int
  chunks: int
  chunk: int
  scale: float
  causal: bool
  precision: PrecisionLike


def heads_per_block(slices: int, query_chunk: int, keys: int, block_bytes: Optional[int] = None) -> int:
  """The largest divisor of `slices` (B * N) whose float32 logits block fits `block_bytes` (at least 1).

  `block_bytes=None`: CPU_BLOCK_BYTES in a single-device CPU program; otherwise every slice in one block. Blocks
  of fewer slices loop over the batch axis, and where that axis is sharded (several devices) the loop would make
  XLA gather the whole batch onto every device.
  """
  if block_bytes is None:
    if jax.default_backend() != "cpu" or jax.device_count() > 1:
      return slices
    block_bytes = CPU_BLOCK_BYTES
  per_slice = query_chunk * keys * 4
  fitting = [d for d in range(1, slices + 1) if slices % d == 0 and d * per_slice <= block_bytes]
  return max(fitting, default=1)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, is_causal: bool = False,
                      query_chunk: int = DEFAULT_QUERY_CHUNK, precision: PrecisionLike = None,
                      block_bytes: Optional[int] = None) -> jax.Array:
  """Softmax(q k^T * scale) v, exactly, one (slices x query chunk) block at a time.

  Logits, softmax statistics and every gradient accumulation run in float32; bfloat16/float16 inputs enter the
  matmuls as they are (float32 accumulation), as in jax's XLA attention path.

  Args:
    q: [B, T, N, H] queries; k, v: [B, S, N, H] keys and values (N heads of width H).
    scale: multiplies the logits (head_dim ** -0.5).
    is_causal: mask out keys after each query (needs T == S positions aligned at 0, as in CLIP).
    query_chunk: query rows per block; T is padded up to a multiple of it (padded rows are dropped).
    precision: matmul precision for float32 inputs (`jax.lax.Precision.HIGHEST` for parity on TPU).
    block_bytes: float32 logits per block, which sets the (batch, head) slices per block
      (`heads_per_block`); None: the backend's default.

  Returns:
    [B, T, N, H] in v's dtype.
  """
  b, t, n, h = q.shape
  s = k.shape[1]
  chunk = min(int(query_chunk), t)
  chunks = -(-t // chunk)
  heads = heads_per_block(b * n, chunk, s, block_bytes)
  blocking = _Blocking(b * n // heads, heads, chunks, chunk, float(scale), bool(is_causal), precision)
  pad = chunks * chunk - t
  if pad:  # padded query rows attend like any row and are sliced off below; they never touch real rows
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
  slices_major = lambda x: x.transpose(0, 2, 1, 3).reshape(b * n, x.shape[1], h)  # [X, T, H]
  out = _blockwise_attention(slices_major(q), slices_major(k), slices_major(v), blocking)
  return out.reshape(b, n, chunks * chunk, h).transpose(0, 2, 1, 3)[:, :t]


# ------------------------------------------------------------------------------------------------ block layout


def _query_blocks(x: jax.Array, bl: _Blocking) -> jax.Array:
  """[X, Tp, ...] -> [groups, chunks, heads, chunk, ...]."""
  x = x.reshape(bl.groups, bl.heads, bl.chunks, bl.chunk, *x.shape[2:])
  return jnp.swapaxes(x, 1, 2)


def _from_query_blocks(x: jax.Array) -> jax.Array:
  """[groups, chunks, heads, chunk, ...] -> [X, Tp, ...]."""
  g, c, heads, chunk = x.shape[:4]
  return jnp.swapaxes(x, 1, 2).reshape(g * heads, c * chunk, *x.shape[4:])


def _key_blocks(x: jax.Array, bl: _Blocking) -> jax.Array:
  """[X, S, H] -> [groups, heads, S, H]."""
  return x.reshape(bl.groups, bl.heads, *x.shape[1:])


def _causal_mask(logits: jax.Array, chunk_index: jax.Array, bl: _Blocking, keys_first: bool) -> jax.Array:
  """Masks keys after each query in a block of logits [heads, chunk, S] ([heads, S, chunk] if keys_first)."""
  rows = chunk_index * bl.chunk + jnp.arange(bl.chunk)
  keys = jnp.arange(logits.shape[1 if keys_first else 2])
  allowed = (keys[:, None] <= rows[None, :]) if keys_first else (rows[:, None] >= keys[None, :])
  return jnp.where(allowed[None], logits, jnp.float32(_LARGE_NEGATIVE))


def _scaled(q: jax.Array, bl: _Blocking) -> jax.Array:
  """q * scale in q's dtype: scaling the [chunk, H] queries instead of the [chunk, S] logits saves a pass."""
  return q * jnp.asarray(bl.scale, q.dtype)


def _matmul(spec: str, a: jax.Array, b: jax.Array, bl: _Blocking) -> jax.Array:
  return jnp.einsum(spec, a, b, precision=bl.precision, preferred_element_type=jnp.float32)


# ------------------------------------------------------------------------------------------------ custom VJP


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, bl: _Blocking) -> jax.Array:
  return _forward(q, k, v, bl)[0]


def _forward(q, k, v, bl: _Blocking):
  """Output [X, Tp, H] and the rows' log-sum-exp [groups, chunks, heads, chunk] (float32)."""

  def group(args):
    q_group, k_group, v_group = args  # [chunks, heads, chunk, H], [heads, S, H], [heads, S, H]
    # One matmul against [v | 1] gives the weighted values and the softmax denominators together: a separate
    # reduction would be another full pass over the block.
    v_ones = jnp.concatenate([v_group, jnp.ones(v_group.shape[:-1] + (1,), v_group.dtype)], axis=-1)

    def block(args):
      q_block, index = args
      logits = _matmul("xth,xsh->xts", _scaled(q_block, bl), k_group, bl)
      if bl.causal:
        logits = _causal_mask(logits, index, bl, keys_first=False)
      row_max = jnp.max(logits, axis=-1, keepdims=True)
      unnormalised = jnp.exp(logits - row_max)
      out_and_total = _matmul("xts,xsh->xth", unnormalised.astype(v.dtype), v_ones, bl)
      out, total = out_and_total[..., :-1], out_and_total[..., -1:]
      return (out / total).astype(v.dtype), (row_max + jnp.log(total))[..., 0]

    return jax.lax.map(block, (q_group, jnp.arange(bl.chunks)))

  out, lse = jax.lax.map(group, (_query_blocks(q, bl), _key_blocks(k, bl), _key_blocks(v, bl)))
  return _from_query_blocks(out), lse


def _forward_rule(q, k, v, bl: _Blocking):
  out, lse = _forward(q, k, v, bl)
  return out, (q, k, v, out, lse)


def _backward_rule(bl: _Blocking, residuals, d_out):
  q, k, v, out, lse = residuals
  # delta_i = sum_j p_ij dp_ij = d_out_i . out_i: the softmax backward's row term, without the probabilities.
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [X, Tp]

  def group(args):
    q_group, k_group, v_group, d_group, lse_group, delta_group = args

    def block(carry, args):
      # Key-major tiles [heads, S, chunk]: dk and dv contract over the tile's last axis like any matmul; only
      # dq reads it transposed (query-major tiles would need two transposed products, measured slower on CPU).
      dk, dv = carry
      q_block, d_block, lse_block, delta_block, index = args
      q_scaled = _scaled(q_block, bl)
      logits_t = _matmul("xsh,xth->xst", k_group, q_scaled, bl)
      if bl.causal:
        logits_t = _causal_mask(logits_t, index, bl, keys_first=True)
      probs_t = jnp.exp(logits_t - lse_block[:, None, :])
      dv = dv + _matmul("xst,xth->xsh", probs_t.astype(d_block.dtype), d_block, bl)
      d_probs_t = _matmul("xsh,xth->xst", v_group, d_block, bl)
      d_logits_t = probs_t * (d_probs_t - delta_block[:, None, :])
      dk = dk + _matmul("xst,xth->xsh", d_logits_t.astype(q_block.dtype), q_scaled, bl)
      dq = _matmul("xst,xsh->xth", d_logits_t.astype(k_group.dtype), k_group, bl) * jnp.float32(bl.scale)
      return (dk, dv), dq.astype(q.dtype)

    zeros = jnp.zeros(k_group.shape, jnp.float32)
    (dk, dv), dq = jax.lax.scan(block, (zeros, zeros),
                                (q_group, d_group, lse_group, delta_group, jnp.arange(bl.chunks)))
    return dq, dk.astype(k.dtype), dv.astype(v.dtype)

  dq, dk, dv = jax.lax.map(group, (_query_blocks(q, bl), _key_blocks(k, bl), _key_blocks(v, bl),
                                   _query_blocks(d_out, bl), lse, _query_blocks(delta, bl)))
  return _from_query_blocks(dq), dk.reshape(k.shape), dv.reshape(v.shape)


_blockwise_attention.defvjp(_forward_rule, _backward_rule)
