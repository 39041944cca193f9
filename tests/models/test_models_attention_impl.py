"""attention_impl='chunked' (query-chunked, memory-efficient) against 'xla' (jax.nn.dot_product_attention)."""

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from perflow_jax import train_step as ts
from perflow_jax.models import attention
from perflow_jax.models import layers
from perflow_jax.models.unet import UNet2DConditionModel
from perflow_jax.models.unet import UNetConfig
from perflow_jax.run_config import perflow_config
from perflow_jax.run_config import validate_run_config
from perflow_jax.run_config import tiny_model

HIGHEST = jax.lax.Precision.HIGHEST


def _rel(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _qkv(seed: int, b: int, t: int, s: int, c: int, dtype=jnp.float32):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kq, (b, t, c), dtype), jax.random.normal(kk, (b, s, c), dtype),
          jax.random.normal(kv, (b, s, c), dtype))


class ChunkedAttentionTest(parameterized.TestCase):

  @parameterized.named_parameters(
      # (T queries, S keys, causal, chunk): divisible, non-divisible (padded last chunk), cross-attention with
      # CLIP's 77 keys, causal over several chunks, and a chunk longer than the sequence (no split).
      ("self_divisible", 64, 64, False, 16),
      ("self_not_divisible", 37, 37, False, 8),
      ("cross_77_keys", 100, 77, False, 32),
      ("causal_not_divisible", 77, 77, True, 10),
      ("chunk_longer_than_sequence", 20, 20, True, 1024),
  )
  def test_forward_and_gradients_equal_xla_in_float32(self, t, s, causal, chunk):
    q, k, v = _qkv(0, 2, t, s, 24)
    probe = jax.random.normal(jax.random.key(1), (2, t, 24))

    def run(impl):
      def f(q, k, v):
        return layers.multi_head_attention(q, k, v, 3, causal, precision=HIGHEST, impl=impl, query_chunk=chunk)
      # A non-uniform cotangent, so every output element's gradient path is exercised.
      loss = lambda q, k, v: jnp.sum(f(q, k, v) * probe)
      return f(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    (out_x, grads_x), (out_c, grads_c) = run("xla"), run("chunked")
    self.assertEqual(out_c.shape, (2, t, 24))
    self.assertLess(_rel(out_c, out_x), 1e-5)
    for name, gc, gx in zip("qkv", grads_c, grads_x):
      self.assertLess(_rel(gc, gx), 1e-5, msg=f"d{name}")

  def test_causal_mask_is_applied(self):
    # Changing the last key/value must not change any earlier query's output under the causal mask.
    q, k, v = _qkv(2, 1, 33, 33, 16)
    k2, v2 = k.at[:, -1].add(5.0), v.at[:, -1].add(5.0)
    attend = lambda k, v: layers.multi_head_attention(q, k, v, 2, True, precision=HIGHEST, impl="chunked",
                                                      query_chunk=8)
    a, b = attend(k, v), attend(k2, v2)
    np.testing.assert_array_equal(a[:, :-1], b[:, :-1])
    self.assertGreater(float(jnp.max(jnp.abs(a[:, -1] - b[:, -1]))), 1e-3)

  def test_bfloat16_forward_matches_xla(self):
    # The same float32 logits/softmax and bf16 casts as jax's XLA path: the outputs agree to bf16 rounding.
    q, k, v = _qkv(3, 2, 50, 50, 32, jnp.bfloat16)
    out_x = layers.multi_head_attention(q, k, v, 4, impl="xla")
    out_c = layers.multi_head_attention(q, k, v, 4, impl="chunked", query_chunk=16)
    self.assertEqual(out_c.dtype, jnp.bfloat16)
    self.assertLess(_rel(out_c, out_x), 1e-2)

  def test_backward_does_not_keep_every_chunks_logits(self):
    # Compiled (not run) gradient of a 2048-token self-attention: 'xla' holds float32 logits [B, N, T, T]
    # (64 MiB here) for the backward, 'chunked' one query chunk's worth (8 MiB) at a time.
    q, k, v = (jax.ShapeDtypeStruct((2, 2048, 32), jnp.float32),) * 3

    def temp_bytes(impl):
      loss = lambda q, k, v: jnp.sum(layers.multi_head_attention(q, k, v, 2, impl=impl, query_chunk=256))
      compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
      return compiled.memory_analysis().temp_size_in_bytes

    logits_bytes = 2 * 2 * 2048 * 2048 * 4
    xla, chunked = temp_bytes("xla"), temp_bytes("chunked")
    self.assertGreater(xla, logits_bytes)
    self.assertLess(chunked, logits_bytes / 2)

  def test_unknown_impl_and_bad_chunk_raise(self):
    q, k, v = _qkv(4, 1, 4, 4, 8)
    with self.assertRaisesRegex(ValueError, "'flash' is not one of"):
      layers.multi_head_attention(q, k, v, 2, impl="flash")
    with self.assertRaisesRegex(ValueError, "chunk 0 must be >= 1"):
      layers.multi_head_attention(q, k, v, 2, impl="chunked", query_chunk=0)


def _reference_attention(q, k, v, causal):
  """Plain float64 softmax attention on [B, T, N, H] numpy arrays: the closed form the blocks must equal."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  if causal:
    t, s = logits.shape[-2:]
    logits = np.where(np.arange(t)[:, None] >= np.arange(s)[None, :], logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", probs, v)


class BlockwiseAttentionTest(parameterized.TestCase):

  def test_heads_per_block_is_the_largest_fitting_divisor(self):
    # 24 slices, 64 x 100 float32 logits = 25,600 bytes per slice.
    self.assertEqual(attention.heads_per_block(24, 64, 100, block_bytes=6 * 25_600), 6)
    self.assertEqual(attention.heads_per_block(24, 64, 100, block_bytes=5 * 25_600), 4)  # 5 does not divide 24
    self.assertEqual(attention.heads_per_block(24, 64, 100, block_bytes=100), 1)  # never fewer than one
    self.assertEqual(attention.heads_per_block(24, 64, 100, block_bytes=1 << 30), 24)
    # The benchmark UNet's self-attention (4 x 8 slices of 1024 x 1024) in the single-device CPU default of 8 MiB.
    self.assertEqual(attention.heads_per_block(32, 1024, 1024, block_bytes=attention.CPU_BLOCK_BYTES), 2)
    # With several devices (8 simulated here) the batch may be sharded: one block over every slice.
    self.assertGreater(jax.device_count(), 1)
    self.assertEqual(attention.heads_per_block(32, 1024, 1024), 32)

  @parameterized.named_parameters(
      # (T, S, causal, query_chunk, block_bytes): several groups and chunks, padded rows, causal across both.
      ("groups_and_chunks", 40, 40, False, 16, 16 * 40 * 4 * 2),
      ("causal_groups_and_padded_chunks", 37, 37, True, 8, 8 * 37 * 4 * 3),
      ("cross_one_slice_per_block", 24, 77, False, 24, 1),
  )
  def test_blocks_equal_the_closed_form_and_xla_gradients(self, t, s, causal, chunk, block_bytes):
    b, n, h = 2, 3, 8
    keys = jax.random.split(jax.random.key(5), 4)
    q = jax.random.normal(keys[0], (b, t, n, h))
    k = jax.random.normal(keys[1], (b, s, n, h))
    v = jax.random.normal(keys[2], (b, s, n, h))
    probe = jax.random.normal(keys[3], (b, t, n, h))
    blocked = lambda q, k, v: attention.chunked_attention(q, k, v, h ** -0.5, causal, chunk, HIGHEST, block_bytes)
    xla = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=h ** -0.5, is_causal=causal)
    self.assertLess(_rel(blocked(q, k, v), _reference_attention(q, k, v, causal)), 2e-6)
    grads = lambda f: jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * probe), argnums=(0, 1, 2))(q, k, v)
    with jax.default_matmul_precision("highest"):
      want = grads(xla)
    for name, got, ref in zip("qkv", grads(blocked), want):
      self.assertLess(_rel(got, ref), 1e-5, msg=f"d{name}")

  def test_bfloat16_gradients_accumulate_in_float32(self):
    # dk and dv sum over 8 query chunks: accumulated in float32 they stay within bf16 rounding of the float32
    # gradients (the old per-chunk checkpoint summed bfloat16 partials).
    b, t, n, h = 1, 256, 2, 16
    keys = jax.random.split(jax.random.key(6), 4)
    q32, k32, v32, probe = (jax.random.normal(kk, (b, t, n, h)) for kk in keys)
    loss = lambda q, k, v: jnp.sum(attention.chunked_attention(q, k, v, h ** -0.5, query_chunk=32).astype(
        jnp.float32) * probe)
    want = jax.grad(loss, argnums=(0, 1, 2))(q32, k32, v32)
    got = jax.grad(loss, argnums=(0, 1, 2))(*(a.astype(jnp.bfloat16) for a in (q32, k32, v32)))
    for name, g, w in zip("qkv", got, want):
      self.assertEqual(g.dtype, jnp.bfloat16)
      self.assertLess(_rel(g, w), 2e-2, msg=f"d{name}")


class UNetAttentionImplTest(absltest.TestCase):

  def test_tiny_unet_forward_and_params_equal_under_both_impls(self):
    cfg = UNetConfig.from_diffusers_config(dict(tiny_model().unet))
    xla = UNet2DConditionModel(cfg, precision=HIGHEST)
    # 16x16 latents = 256 tokens at the first level: 64-row chunks split it into 4.
    chunked = xla.clone(attention_impl="chunked", attention_query_chunk=64)
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 4))
    t = jnp.asarray([10.0, 900.5])
    ctx = jax.random.normal(jax.random.key(1), (2, 77, cfg.cross_attention_dim))
    params = xla.init(jax.random.key(2), x, t, ctx)["params"]
    shapes = lambda m: jax.tree.map(lambda a: (a.shape, a.dtype),
                                    nn.meta.unbox(jax.eval_shape(m.init, jax.random.key(2), x, t, ctx)["params"]))
    self.assertEqual(shapes(chunked), shapes(xla))  # the parameter tree does not depend on the option
    out_x = xla.apply({"params": params}, x, t, ctx)
    out_c = chunked.apply({"params": params}, x, t, ctx)
    self.assertLess(_rel(out_c, out_x), 1e-5)

  def test_config_option_reaches_the_step_unet_and_is_validated(self):
    config = perflow_config()
    config.model = tiny_model()
    config.model.remat = True
    config.model.attention = "chunked"
    config.model.attention_query_chunk = 256
    validate_run_config(config)
    unet = UNet2DConditionModel(UNetConfig.from_diffusers_config(dict(config.model.unet)))
    step_unet = ts.training_unet(unet, config.model)
    self.assertEqual((step_unet.remat, step_unet.attention_impl, step_unet.attention_query_chunk),
                     (True, "chunked", 256))
    config.model.attention = "flash"
    with self.assertRaisesRegex(ValueError, "config.model.attention='flash'"):
      validate_run_config(config)
    config.model.attention = "xla"
    config.model.attention_query_chunk = 0
    with self.assertRaisesRegex(ValueError, "attention_query_chunk=0"):
      validate_run_config(config)


if __name__ == "__main__":
  absltest.main()
