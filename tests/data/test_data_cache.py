"""Latent cache: encoded over the mesh, written as tfds, read back as cache batches (toy and tiny Flax models)."""

import os
import tempfile
import types

from absl.testing import absltest
from flax import linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
from jax.sharding import AxisType, PartitionSpec
import numpy as np
import tensorflow_datasets as tfds

from perflow_jax.data import cache
from perflow_jax.data import pipeline
from perflow_jax.data import procedural
from perflow_jax.data import tokenizer as tokenizer_lib
from perflow_jax.data import transforms
from perflow_jax.models.clip import CLIPTextConfig, CLIPTextEncoder
from perflow_jax.models.vae import AutoencoderKL, VAEConfig, sample_latents

_RES = 16
_EXAMPLES = 20  # not a multiple of the batch: the last batch is padded, and the padding is not written


@jax.jit
def _toy_encode(images, input_ids):
  """A stand-in VAE + text encoder with known outputs: 4x4 average pool (h = R/4), its negation, and ids x 1..3."""
  b = images.shape[0]
  mean = images.reshape(b, _RES // 4, 4, _RES // 4, 4, 3).mean(axis=(2, 4))
  context = input_ids[:, :, None].astype(jnp.float32) * jnp.arange(1, 4, dtype=jnp.float32)
  return mean, -mean, context


class LatentCacheTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.TemporaryDirectory()
    cls.tok = tokenizer_lib.load_tokenizer(
        tokenizer_lib.write_tiny_clip_tokenizer(os.path.join(cls.tmp.name, "tok")))
    cls.mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    cls.source = procedural.ProceduralSource(_EXAMPLES, 32, seed=1)  # 32 px, cached at 16: a real resize
    cls.data_dir = os.path.join(cls.tmp.name, "tfds")
    cls.path, cls.written = cache.build_latent_cache(
        cls.source, _toy_encode, cls.mesh, cls.tok, data_dir=cls.data_dir, name="toy_latents", resolution=_RES,
        batch_size=8, examples_per_shard=7)

  @classmethod
  def tearDownClass(cls):
    cls.tmp.cleanup()
    super().tearDownClass()

  def _expected(self, index):
    """What the cache must hold for example ``index``: the toy encoder applied to the pipeline's image/ids."""
    ex = transforms.ImageTextExample(image_key="image", text_key="text", resolution=_RES,
                                     tokenizer=self.tok).random_map(self.source[index], None)
    mean, logvar, context = _toy_encode(ex["images"][None], ex["input_ids"][None])
    return np.asarray(mean[0]), np.asarray(logvar[0]), np.asarray(context[0])

  def test_cache_holds_encoder_outputs_in_source_order(self):
    self.assertEqual(self.written, _EXAMPLES)
    src = tfds.data_source("toy_latents", split="train", data_dir=self.data_dir)
    self.assertLen(src, _EXAMPLES)
    for index in (0, 9, _EXAMPLES - 1):
      mean, logvar, context = self._expected(index)
      record = src[index]
      np.testing.assert_allclose(record["latent_mean"], mean, rtol=0, atol=1e-6)
      np.testing.assert_allclose(record["latent_logvar"], logvar, rtol=0, atol=1e-6)
      np.testing.assert_array_equal(record["context"], context)
      self.assertEqual(record["text"].decode(), procedural.example(1, index, 8)["text"])
    self.assertEqual(src[0]["latent_mean"].shape, (_RES // 4, _RES // 4, 3))
    self.assertEqual(src[0]["context"].shape, (77, 3))

  def test_pipeline_reads_cache_batches(self):
    config = pipeline.default_data_config()
    config.update(source="cache", name="toy_latents", data_dir=self.data_dir, batch_size=8, shuffle=False)
    batch = next(pipeline.make_train_iterator(config, self.mesh, None))
    self.assertEqual(set(batch), {"latent_mean", "latent_logvar", "context"})
    self.assertEqual(batch["latent_mean"].shape, (8, _RES // 4, _RES // 4, 3))
    self.assertEqual(batch["context"].shape, (8, 77, 3))
    for key in batch:
      self.assertEqual(batch[key].dtype, np.float32)
      self.assertEqual(batch[key].sharding.spec, PartitionSpec(("data", "fsdp")))
    mean, _, context = self._expected(5)
    np.testing.assert_allclose(np.asarray(batch["latent_mean"])[5], mean, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(batch["context"])[5], context)

  def test_float16_storage_and_overwrite_guard(self):
    with self.assertRaisesRegex(ValueError, "--overwrite"):
      cache.build_latent_cache(self.source, _toy_encode, self.mesh, self.tok, data_dir=self.data_dir,
                               name="toy_latents", resolution=_RES, batch_size=8)
    _, written = cache.build_latent_cache(self.source, _toy_encode, self.mesh, self.tok, data_dir=self.data_dir,
                                          name="toy_latents_f16", resolution=_RES, batch_size=16,
                                          dtype=np.float16)
    self.assertEqual(written, _EXAMPLES)
    record = tfds.data_source("toy_latents_f16", split="train", data_dir=self.data_dir)[3]
    self.assertEqual(record["latent_mean"].dtype, np.float16)
    np.testing.assert_allclose(record["latent_mean"], self._expected(3)[0], atol=1e-3)
    with self.assertRaisesRegex(ValueError, "multiple of the 8 devices"):
      cache.build_latent_cache(self.source, _toy_encode, self.mesh, self.tok, data_dir=self.data_dir,
                               name="bad_batch", resolution=_RES, batch_size=6)

  def test_process_rows_cover_the_batch_once_in_one_process(self):
    sharding = pipeline.batch_sharding(self.mesh)
    np.testing.assert_array_equal(cache.process_rows(sharding, 16), np.arange(16))
    replicated_fsdp = jax.sharding.NamedSharding(self.mesh, PartitionSpec("data"))
    np.testing.assert_array_equal(cache.process_rows(replicated_fsdp, 8), np.arange(8))


def _random_params(abstract_variables, seed):
  """Random float32 params of an eval_shape'd init (norm scales near 1), much faster than the modules' init."""
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(nn.meta.unbox(abstract_variables["params"]))
  params = {path: (1.0 if path[-1] == "scale" else 0.0) + rng.normal(0.0, 0.2, leaf.shape).astype(np.float32)
            for path, leaf in flat.items()}
  return traverse_util.unflatten_dict(params)


class TinyModelsCacheTest(absltest.TestCase):
  """The cache around our Flax VAE and CLIP text encoder (tiny, random init) via encode_fn_from_bundle."""

  def test_cache_matches_direct_model_outputs(self):
    with tempfile.TemporaryDirectory() as tmp:
      tok = tokenizer_lib.load_tokenizer(tokenizer_lib.write_tiny_clip_tokenizer(os.path.join(tmp, "tok")))
      vae = AutoencoderKL(VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4),
                          precision=jax.lax.Precision.HIGHEST)
      text = CLIPTextEncoder(CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                            num_hidden_layers=2, num_attention_heads=2),
                             precision=jax.lax.Precision.HIGHEST)
      key = jax.random.key(0)
      vae_shapes = jax.eval_shape(lambda k, x: vae.init(k, x, method=vae.encode), key, *vae.dummy_inputs())
      text_shapes = jax.eval_shape(text.init, key, *text.dummy_inputs())
      bundle = types.SimpleNamespace(vae=vae, vae_params=_random_params(vae_shapes, 0), text_encoder=text,
                                     text_params=_random_params(text_shapes, 1), text_encoder_2=None)
      mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
      source = procedural.ProceduralSource(10, 16, seed=2)
      data_dir = os.path.join(tmp, "tfds")
      _, written = cache.build_latent_cache(source, cache.encode_fn_from_bundle(bundle), mesh, tok,
                                            data_dir=data_dir, name="tiny_latents", resolution=16, batch_size=8)
      self.assertEqual(written, 10)
      config = pipeline.default_data_config()
      config.update(source="cache", name="tiny_latents", data_dir=data_dir, batch_size=8, shuffle=False)
      batch = next(pipeline.make_train_iterator(config, mesh, None))
      self.assertEqual(batch["latent_mean"].shape, (8, 8, 8, 4))  # 16 px / 2 with two VAE levels
      self.assertEqual(batch["context"].shape, (8, 77, 16))
      # The same examples through the modules directly, unsharded.
      records = [source[i] for i in range(8)]
      images = np.stack([r["image"] for r in records]).astype(np.float32) / 127.5 - 1.0
      ids = tokenizer_lib.tokenize(tok, [r["text"].decode() for r in records])
      mean, logvar = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode))(bundle.vae_params, images)
      context = jax.jit(text.apply)({"params": bundle.text_params}, ids)
      # Sharded (batch over 8 devices) vs unsharded float32: XLA:CPU partitions and vectorises the reductions
      # differently; on an AVX-512 host one of 2048 latent means differs by 1.2e-5 (values ~0.15). A wiring mistake
      # (wrong example, wrong order, a missing scale) is off by O(0.1).
      for key, want in (("latent_mean", mean), ("latent_logvar", logvar), ("context", context)):
        np.testing.assert_allclose(np.asarray(batch[key]), np.asarray(want), rtol=1e-4, atol=5e-5, err_msg=key)
      latents = sample_latents(jax.random.key(1), batch["latent_mean"], batch["latent_logvar"], 0.18215)
      self.assertEqual(latents.shape, (8, 8, 8, 4))
      with self.assertRaisesRegex(ValueError, "SDXL"):
        cache.encode_fn_from_bundle(types.SimpleNamespace(text_encoder_2=text))


if __name__ == "__main__":
  absltest.main()
