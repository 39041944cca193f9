"""The grain pipeline: per-process shards, state save/restore, batch structure, global arrays on 8 devices."""

import os
import tempfile

from absl.testing import absltest
from etils import epath
import grain
import jax
from jax.sharding import AxisType, PartitionSpec
import numpy as np
from PIL import Image

from perflow_jax.data import pipeline
from perflow_jax.data import procedural
from perflow_jax.data import tokenizer as tokenizer_lib
from perflow_jax.data import transforms
from perflow_jax.data import writer

_NUM_INDEXED = 48


def _indexed_examples():
  """Image i is a solid 16x24 (H x W) PNG of grey level 5 i, so a batch row tells which example it came from."""
  for i in range(_NUM_INDEXED):
    yield {"image": writer.encode_png(np.full((16, 24, 3), 5 * i, np.uint8)), "text": f"example {i}"}


def _indices(images):
  """Batch images in [-1, 1] -> example indices (inverse of the grey level 5 i)."""
  return [int(round((float(img[0, 0, 0]) + 1.0) * 127.5 / 5.0)) for img in np.asarray(images)]


def _config(**overrides):
  c = pipeline.default_data_config()
  c.update(overrides)
  return c


class PipelineTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.TemporaryDirectory()
    cls.tok = tokenizer_lib.load_tokenizer(
        tokenizer_lib.write_tiny_clip_tokenizer(os.path.join(cls.tmp.name, "tok")))
    cls.data_dir = os.path.join(cls.tmp.name, "tfds")
    writer.write_dataset(cls.data_dir, "indexed", writer.image_features(), _indexed_examples(),
                         examples_per_shard=20)
    cls.mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)

  @classmethod
  def tearDownClass(cls):
    cls.tmp.cleanup()
    super().tearDownClass()

  def _indexed_config(self, **overrides):
    return _config(source="tfds", name="indexed", data_dir=self.data_dir, resolution=16, **overrides)

  def test_two_processes_read_disjoint_examples_covering_the_dataset(self):
    config = self._indexed_config(num_epochs=1, shuffle=True, shuffle_seed=9)
    seen = []
    for process_index in range(2):
      loader = pipeline.make_host_loader(config, self.tok, batch_size=8, process_index=process_index,
                                         process_count=2)
      batches = list(loader)
      self.assertLen(batches, _NUM_INDEXED // 8)  # 24 examples per process, host batch 4
      self.assertEqual(batches[0]["images"].shape, (4, 16, 16, 3))
      seen.append([i for b in batches for i in _indices(b["images"])])
    self.assertEmpty(set(seen[0]) & set(seen[1]))
    self.assertEqual(sorted(seen[0] + seen[1]), list(range(_NUM_INDEXED)))
    # Shuffled: not the file order.
    self.assertNotEqual(seen[0], sorted(seen[0]))
    # Captions travel with their images.
    first = next(iter(pipeline.make_host_loader(config, self.tok, batch_size=8, process_index=1,
                                                process_count=2)))
    for row, index in zip(first["input_ids"], _indices(first["images"])):
      np.testing.assert_array_equal(row, tokenizer_lib.tokenize(self.tok, [f"example {index}"])[0])

  def test_epochs_repeat_with_a_new_order(self):
    config = self._indexed_config(num_epochs=2, shuffle=True)
    order = [i for b in pipeline.make_host_loader(config, self.tok, batch_size=16, process_index=0,
                                                  process_count=1) for i in _indices(b["images"])]
    self.assertLen(order, 2 * _NUM_INDEXED)
    self.assertEqual(sorted(order[:_NUM_INDEXED]), list(range(_NUM_INDEXED)))
    self.assertEqual(sorted(order[_NUM_INDEXED:]), list(range(_NUM_INDEXED)))
    self.assertNotEqual(order[:_NUM_INDEXED], order[_NUM_INDEXED:])

  def test_restoring_state_reproduces_following_batches(self):
    config = _config(random_crop=True, random_flip=True, resolution=16, procedural_size=64)
    it = pipeline.make_train_iterator(config, self.mesh, self.tok, seed=5)
    for _ in range(3):
      next(it)
    state = it.get_state()
    self.assertIsInstance(state, bytes)
    expected = [next(it) for _ in range(4)]  # crosses the 64-example epoch boundary
    # Through grain's orbax handler, which writes the state as JSON per process.
    ckpt = os.path.join(self.tmp.name, "iter_ckpt")
    os.makedirs(ckpt, exist_ok=True)
    restored_from = pipeline.make_train_iterator(config, self.mesh, self.tok, seed=5)
    restored_from.set_state(state)
    grain.checkpoint.CheckpointHandler().save(epath.Path(ckpt), restored_from)
    fresh = pipeline.make_train_iterator(config, self.mesh, self.tok, seed=5)
    grain.checkpoint.CheckpointHandler().restore(epath.Path(ckpt), fresh)
    for want in expected:
      got = next(fresh)
      for key in want:
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]))

  def test_restore_with_worker_processes(self):
    config = _config(random_flip=True, resolution=16, procedural_size=64, worker_count=2)
    it = pipeline.make_train_iterator(config, self.mesh, self.tok)
    for _ in range(3):
      next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    again = pipeline.make_train_iterator(config, self.mesh, self.tok)
    again.set_state(state)
    for want in expected:
      got = next(again)
      for key in want:
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]))

  def test_prefetch_hands_out_the_same_batches_and_saves_the_handed_out_position(self):
    config = self._indexed_config(num_epochs=1, shuffle=True, shuffle_seed=4)
    plain = pipeline.make_train_iterator(_config(**{**config, "prefetch": 0}), self.mesh, self.tok)
    ahead = pipeline.make_train_iterator(_config(**{**config, "prefetch": 3}), self.mesh, self.tok)
    order = [_indices(next(plain)["images"]) for _ in range(2)]
    self.assertEqual([_indices(next(ahead)["images"]) for _ in range(2)], order)
    # Three more batches are read ahead by now; the state is still the position after the second.
    self.assertEqual(ahead.get_state(), plain.get_state())
    rest = [_indices(b["images"]) for b in plain]  # 48 examples / batch 8 = 6 batches in the one epoch
    self.assertLen(rest, 4)
    state = ahead.get_state()
    self.assertEqual(_indices(next(ahead)["images"]), rest[0])
    ahead.set_state(state)  # stops the reader, drops what it read
    self.assertEqual([_indices(b["images"]) for b in ahead], rest)  # ... then StopIteration at the epoch's end
    with self.assertRaises(StopIteration):
      next(ahead)
    # close() rewinds to the handed-out position: nothing read ahead is lost.
    again = pipeline.make_train_iterator(_config(**{**config, "prefetch": 2}), self.mesh, self.tok)
    next(again)
    again.close()
    self.assertEqual([_indices(b["images"]) for b in again], [order[1]] + rest)
    with self.assertRaisesRegex(ValueError, "config.data.prefetch=-1"):
      pipeline.make_train_iterator(_config(prefetch=-1), self.mesh, self.tok)

  def test_prefetch_raises_the_pipelines_error_at_the_batch_it_belongs_to(self):

    class Damaged:
      """Six good examples, then one whose decoding fails."""

      def __len__(self):
        return 16

      def __getitem__(self, index):
        if index == 6:
          raise ValueError("record 6 is damaged")
        return {"image": writer.encode_png(np.full((16, 16, 3), 5 * index, np.uint8)), "text": "x"}

    config = _config(source="tfds", resolution=16, shuffle=False)
    loader = pipeline.make_host_loader(config, self.tok, batch_size=4, process_index=0, process_count=1,
                                       source=Damaged())
    it = pipeline.GlobalBatchIterator(loader, jax.sharding.NamedSharding(self.mesh, PartitionSpec("data")), 1,
                                      prefetch=2)
    self.assertEqual(_indices(next(it)["images"]), [0, 1, 2, 3])  # the good batch comes first ...
    for _ in range(2):  # ... then the error, every time it is asked again
      with self.assertRaisesRegex(ValueError, "record 6 is damaged"):
        next(it)

  def test_global_batch_structure_and_sharding(self):
    config = _config(resolution=32, batch_size=16, shuffle=False, procedural_size=40, procedural_seed=3)
    batch = next(pipeline.make_train_iterator(config, self.mesh, self.tok))
    self.assertEqual(set(batch), {"images", "input_ids"})
    images, ids = batch["images"], batch["input_ids"]
    self.assertIsInstance(images, jax.Array)
    self.assertEqual(images.shape, (16, 32, 32, 3))
    self.assertEqual(images.dtype, np.float32)
    self.assertEqual(ids.shape, (16, 77))
    self.assertEqual(ids.dtype, np.int32)
    for x in (images, ids):
      self.assertEqual(x.sharding.spec, PartitionSpec(("data", "fsdp")))
      self.assertLen(x.sharding.device_set, 8)
      self.assertEqual({s.data.shape[0] for s in x.addressable_shards}, {2})
    host = np.asarray(images)
    self.assertGreaterEqual(host.min(), -1.0)
    self.assertLessEqual(host.max(), 1.0)
    # Unshuffled, one process: row j is example j, drawn at the training resolution (no resize, no crop).
    for j in (0, 5, 15):
      ex = procedural.example(3, j, 32)
      np.testing.assert_array_equal(host[j], ex["image"].astype(np.float32) / 127.5 - 1.0)
      want_ids = self.tok(ex["text"], padding="max_length", max_length=77, truncation=True).input_ids
      np.testing.assert_array_equal(np.asarray(ids)[j], want_ids)
    # Each device holds its own rows: device k of the batch axes has rows 2k, 2k+1.
    for shard in images.addressable_shards:
      start = shard.index[0].start
      np.testing.assert_array_equal(shard.data, host[start:start + 2])

  def test_batch_sharding_from_the_caller(self):
    sharding = jax.sharding.NamedSharding(self.mesh, PartitionSpec("data"))  # replicated over 'fsdp'
    config = _config(resolution=16, batch_size=8, shuffle=False, procedural_size=16)
    batch = next(pipeline.make_train_iterator(config, self.mesh, self.tok, sharding=sharding))
    self.assertEqual(batch["images"].sharding, sharding)
    self.assertEqual({s.data.shape[0] for s in batch["images"].addressable_shards}, {2})
    with self.assertRaisesRegex(ValueError, "multiple of the 4 devices"):
      pipeline.make_train_iterator(_config(batch_size=6), self.mesh, self.tok, sharding=sharding)

  def test_config_errors(self):
    with self.assertRaisesRegex(ValueError, "multiple of the 8 devices"):
      pipeline.make_train_iterator(_config(batch_size=12), self.mesh, self.tok)
    bad = _config()
    bad.unknown_field = 1
    with self.assertRaisesRegex(ValueError, "unknown config.data fields.*unknown_field"):
      pipeline.make_train_iterator(bad, self.mesh, self.tok)
    with self.assertRaisesRegex(ValueError, "random_flip"):
      pipeline.make_train_iterator(_config(source="cache", name="indexed", random_flip=True), self.mesh, None)
    with self.assertRaisesRegex(ValueError, "needs a CLIP tokenizer"):
      pipeline.make_train_iterator(_config(), self.mesh, None)
    with self.assertRaisesRegex(ValueError, "fewer than one batch"):
      pipeline.make_train_iterator(_config(procedural_size=4), self.mesh, self.tok)
    with self.assertRaisesRegex(ValueError, "config.data.image_key"):
      transforms.get_path({"img": 1}, "image")
    with self.assertRaisesRegex(ValueError, "unknown config.data.source"):
      pipeline.make_train_iterator(_config(source="laion", name="x"), self.mesh, self.tok)


class TransformsTest(absltest.TestCase):

  def test_center_crop_offsets_follow_torchvision(self):
    # H=32, W=50 at resolution 32: no resize, columns round((50 - 32) / 2) = 9 .. 41 kept.
    image = np.tile(np.arange(50, dtype=np.uint8)[None, :, None], (32, 1, 3))
    out = transforms.resize_and_crop(Image.fromarray(image), 32, False, None)
    self.assertEqual(out.shape, (32, 32, 3))
    np.testing.assert_array_equal(out[0, :, 0], np.arange(9, 41))

  def test_resize_short_side_then_crop(self):
    # 64 x 128 solid halves: resized to 32 x 64, center crop keeps columns 16..48, the middle of both halves.
    image = np.zeros((64, 128, 3), np.uint8)
    image[:, 64:] = 200
    out = transforms.resize_and_crop(Image.fromarray(image), 32, False, None)
    self.assertEqual(out.shape, (32, 32, 3))
    np.testing.assert_array_equal(out[:, :14], 0)
    np.testing.assert_array_equal(out[:, 18:], 200)

  def test_random_crop_and_flip_use_the_record_rng(self):
    image = np.tile(np.arange(48, dtype=np.uint8)[None, :, None], (32, 1, 3))
    out = transforms.resize_and_crop(Image.fromarray(image), 32, True, np.random.default_rng(0))
    rng = np.random.default_rng(0)
    rng.integers(0, 1)  # the row offset: the height fits exactly
    want_left = int(rng.integers(0, 17))
    np.testing.assert_array_equal(out[0, :, 0], np.arange(want_left, want_left + 32))
    example = transforms.ImageTextExample(image_key="image", text_key="text", resolution=32,
                                          tokenizer=_TinyTokenizer(), random_flip=True)
    record = {"image": image, "text": b"x"}
    flips = []
    for seed in range(8):
      out = example.random_map(record, np.random.default_rng(seed))["images"]
      flips.append(bool(out[0, 0, 0] > out[0, -1, 0]))
      # Pixels are (x / 127.5 - 1); a flipped row runs 31..0 of the center crop 8..40.
      np.testing.assert_allclose(out[0, :, 0], (np.arange(8, 40)[::-1 if flips[-1] else 1]) / 127.5 - 1)
    self.assertEqual(set(flips), {True, False})

  def test_caption_text(self):
    self.assertEqual(transforms.caption_text(b"a cat"), "a cat")
    self.assertEqual(transforms.caption_text(np.array([b"first", b"second"], dtype=object)), "first")
    self.assertEqual(transforms.caption_text(np.array(b"scalar", dtype=object)), "scalar")


class _TinyTokenizer:
  """Stands in for CLIPTokenizer where the ids do not matter: BOS, one id per character, EOS padding."""

  def __call__(self, texts, **kwargs):
    del kwargs
    return {"input_ids": [([1] + [2] * len(t) + [3] * 77)[:77] for t in texts]}


if __name__ == "__main__":
  absltest.main()
