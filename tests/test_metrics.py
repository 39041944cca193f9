"""metrics.jsonl records, TensorBoard events, progress line, image grids, non-finite loss errors."""

import glob
import io
import os
import shutil
import struct
import tempfile

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from tensorboardX.proto import event_pb2

from perflow_jax import metrics


def _tempdir(test):
  path = tempfile.mkdtemp(prefix="perflow_metrics_")
  test.addCleanup(shutil.rmtree, path, ignore_errors=True)
  return path


def _events(workdir):
  """All Event protos in workdir/tensorboard (TFRecord framing: length, crc, payload, crc)."""
  events = []
  for path in sorted(glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))):
    data = open(path, "rb").read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      events.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + length]))
      pos += 12 + length + 4
  return events


class FakeClock:

  def __init__(self, times):
    self.times = list(times)

  def __call__(self):
    return self.times.pop(0)


class WriterTest(absltest.TestCase):

  def test_jsonl_tensorboard_and_progress(self):
    workdir = _tempdir(self)
    clock = FakeClock([100.0, 110.0, 115.0])
    with metrics.MetricsWriter(workdir, total_steps=100, clock=clock, enabled=True) as writer:
      with self.assertLogs(level="INFO") as logs:
        first = writer.write_scalars(20, {"loss": np.float32(0.5), "lr": 1e-4})
        second = writer.write_scalars(40, {"loss": np.array(float("nan")), "lr": 1e-4})
      writer.write_images(40, {"samples": np.zeros((6, 8, 3), np.uint8)})
    self.assertEqual(first, {"step": 20, "loss": 0.5, "lr": 1e-4, "steps_per_s": 2.0})
    self.assertEqual(second["steps_per_s"], 4.0)
    self.assertIsNone(second["loss"])
    progress = [line for line in logs.output if "steps/s" in line]
    self.assertIn("step 20/100 (20.0%) | 2 steps/s | ETA 40s | loss 0.5 | lr 0.0001", progress[0])
    self.assertIn("step 40/100 (40.0%) | 4 steps/s | ETA 15s | loss nan", progress[1])
    records = metrics.read_metrics(workdir)
    self.assertEqual(records, [first, {"step": 40, "loss": None, "lr": 1e-4, "steps_per_s": 4.0}])
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      self.assertEqual(f.read().count("\n"), 2)
    scalars = {(v.tag, e.step): v.simple_value for e in _events(workdir) for v in e.summary.value
               if v.HasField("simple_value")}
    self.assertEqual(scalars[("loss", 20)], 0.5)
    self.assertEqual(scalars[("steps_per_s", 40)], 4.0)
    self.assertAlmostEqual(scalars[("lr", 40)], 1e-4, places=9)
    images = [(v.tag, e.step, v.image) for e in _events(workdir) for v in e.summary.value if v.HasField("image")]
    self.assertLen(images, 1)
    tag, step, image = images[0]
    self.assertEqual((tag, step, image.height, image.width), ("samples", 40, 6, 8))
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(image.encoded_image_string))), 0)

  def test_device_values_under_a_transfer_guard(self):
    with metrics.MetricsWriter(_tempdir(self), 10, enabled=True, clock=FakeClock([0, 1])) as writer:
      loss = jnp.float32(0.25) * 2
      with jax.transfer_guard("disallow"):
        record = writer.write_scalars(2, {"loss": loss})
        metrics.check_finite(2, loss, None, "/w")
    self.assertEqual(record, {"step": 2, "loss": 0.5, "steps_per_s": 2.0})

  def test_resume_drops_lines_after_start_step(self):
    workdir = _tempdir(self)
    with metrics.MetricsWriter(workdir, 100, enabled=True, clock=FakeClock([0, 1, 2, 3])) as writer:
      for step in (10, 20, 30):
        writer.write_scalars(step, {"loss": step / 10})
    with metrics.MetricsWriter(workdir, 100, start_step=20, enabled=True, clock=FakeClock([50, 60])) as writer:
      record = writer.write_scalars(25, {"loss": 9.0})
    self.assertEqual(record["steps_per_s"], 0.5)
    self.assertEqual([(r["step"], r["loss"]) for r in metrics.read_metrics(workdir)],
                     [(10, 1.0), (20, 2.0), (25, 9.0)])

  def test_other_processes_write_nothing(self):
    workdir = os.path.join(_tempdir(self), "run")
    with metrics.MetricsWriter(workdir, 10, enabled=False) as writer:
      self.assertIsNone(writer.write_scalars(1, {"loss": 1.0}))
      writer.write_images(1, {"x": np.zeros((2, 2, 3), np.uint8)})
    self.assertFalse(os.path.exists(workdir))

  def test_bad_values_raise(self):
    with metrics.MetricsWriter(_tempdir(self), 10, enabled=True) as writer:
      with self.assertRaisesRegex(ValueError, r"metric 'loss' has shape \(2,\)"):
        writer.write_scalars(1, {"loss": np.zeros(2)})
      with self.assertRaisesRegex(ValueError, r"image 'x' is float32"):
        writer.write_images(1, {"x": np.zeros((2, 2, 3), np.float32)})

  def test_format_helpers(self):
    self.assertEqual(metrics.format_duration(3725), "1h02m05s")
    self.assertEqual(metrics.format_duration(65), "1m05s")
    self.assertEqual(metrics.format_duration(5.2), "5s")
    self.assertEqual(metrics.format_progress(0, 10, None, {"loss": 1.0}), "step 0/10 (0.0%) | loss 1")


class ImageGridTest(absltest.TestCase):

  def test_layout_and_value_mapping(self):
    images = np.stack([np.full((4, 5, 3), v, np.float32) for v in (-1.0, 0.0, 1.0)])
    grid = metrics.image_grid(images, ncols=2, pad=1)
    self.assertEqual(grid.shape, (2 * (4 + 1) + 1, 2 * (5 + 1) + 1, 3))
    self.assertEqual(grid.dtype, np.uint8)
    np.testing.assert_array_equal(grid[1:5, 1:6], 0)       # -1 -> 0
    np.testing.assert_array_equal(grid[1:5, 7:12], 128)    # 0 -> round(127.5) = 128
    np.testing.assert_array_equal(grid[6:10, 1:6], 255)    # 1 -> 255
    np.testing.assert_array_equal(grid[6:10, 7:12], 255)   # empty cell: background
    np.testing.assert_array_equal(grid[0], 255)
    gray = metrics.image_grid(np.arange(4, dtype=np.uint8).reshape(1, 2, 2, 1), pad=0)
    np.testing.assert_array_equal(gray[..., 0], [[0, 1], [2, 3]])
    np.testing.assert_array_equal(gray[..., 2], gray[..., 0])

  def test_labels_are_drawn_in_their_band(self):
    images = np.full((2, 16, 40, 3), 200, np.uint8)
    grid = metrics.image_grid(images, ncols=2, labels=["cat", ""], pad=2)
    band = grid.shape[0] - 2 * 2 - 16
    self.assertGreater(band, 4)
    np.testing.assert_array_equal(grid[2:18, 2:42], 200)  # the label does not touch the image
    first_band = grid[18:18 + band, 2:42]
    second_band = grid[18:18 + band, 44:84]
    self.assertGreater(int((first_band < 128).sum()), 5)  # dark glyph pixels for "cat"
    np.testing.assert_array_equal(second_band, 255)       # an empty label draws nothing
    with self.assertRaisesRegex(ValueError, "2 labels for 3 images"):
      metrics.image_grid(np.zeros((3, 2, 2, 3), np.uint8), labels=["a", "b"])
    with self.assertRaisesRegex(ValueError, r"images have shape \(2, 2, 3\)"):
      metrics.image_grid(np.zeros((2, 2, 3), np.uint8))

  def test_png_round_trip(self):
    grid = metrics.image_grid(np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8))
    path = os.path.join(_tempdir(self), "samples", "step_10.png")
    metrics.save_png(grid, path)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), grid)
    with self.assertRaisesRegex(ValueError, "needs uint8"):
      metrics.save_png(grid.astype(np.float32), path)


class NonFiniteTest(absltest.TestCase):

  def test_finite_passes_and_nan_names_step_and_checkpoint(self):
    metrics.check_finite(7, np.float32(1.5), 5, "/w/checkpoints")
    with self.assertRaisesRegex(metrics.NonFiniteLossError,
                                r"loss is nan at step 1234.*step 1000 in /w/checkpoints, is intact"):
      metrics.check_finite(1234, np.array(np.nan, np.float32), 1000, "/w/checkpoints")
    with self.assertRaisesRegex(ValueError, r"loss is inf at step 3.*No checkpoint was written yet"):
      metrics.check_finite(3, float("inf"), None, "/w/checkpoints")


if __name__ == "__main__":
  absltest.main()
