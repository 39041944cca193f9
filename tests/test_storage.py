"""perflow_jax.storage, the one path layer: local paths and gs:// URLs (a Cloud Storage emulator on 127.0.0.1)."""

import json
import os
import subprocess
import sys
import tempfile
from unittest import mock

from absl.testing import absltest
import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import jax.numpy as jnp
import ml_collections
import numpy as np

from perflow_jax import checkpoint
from perflow_jax import config_lib
from perflow_jax import evaluate
from perflow_jax import metrics
from perflow_jax import storage
from perflow_jax.data import sources
from perflow_jax.evaluation import features
import gcs_testutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSIFIER = os.path.join(REPO, "assets", "demo", "classifier")


class PathsTest(absltest.TestCase):

  def test_urls_are_never_made_local(self):
    self.assertEqual(storage.absolute("gs://b/run/"), "gs://b/run")
    self.assertEqual(storage.absolute("gs://b/"), "gs://b/")
    self.assertEqual(storage.join("gs://b/run/", "samples", "x.png"), "gs://b/run/samples/x.png")
    self.assertEqual(storage.dirname("gs://b/run/x.png"), "gs://b/run")
    self.assertEqual(storage.absolute("~/run"), os.path.join(os.path.expanduser("~"), "run"))
    self.assertEqual(storage.join("/a", "b"), "/a/b")
    self.assertTrue(storage.is_remote("gs://b/x"))
    self.assertFalse(storage.is_remote("/gs:/b/x"))

  def test_atomic_write_keeps_the_old_file_when_the_block_fails(self):
    folder = tempfile.mkdtemp()
    path = os.path.join(folder, "config.json")
    storage.write_text(path, "old\n")
    with self.assertRaisesRegex(RuntimeError, "interrupted"):
      with storage.atomic_write(path) as f:
        f.write("new, half written")
        raise RuntimeError("interrupted")
    self.assertEqual(storage.read_text(path), "old\n")
    self.assertEqual(os.listdir(folder), ["config.json"])  # no temp file left behind

  def test_gs_without_the_gcp_extra_stops_with_the_pip_command_and_writes_nothing(self):
    cwd = tempfile.mkdtemp()
    with mock.patch.object(storage, "_find_spec", return_value=None), mock.patch.object(os, "getcwd", return_value=cwd):
      with self.assertRaisesRegex(storage.MissingCloudStorageSupport,
                                  r"gs://b/run is on Cloud Storage.*gcsfs and google-cloud-storage.*"
                                  r"pip install 'perflow_jax\[gcp\]'"):
        config_lib.write_config_json(ml_collections.ConfigDict({"a": 1}), "gs://b/run", is_primary=True)
    self.assertEqual(os.listdir(cwd), [])


class BucketTest(absltest.TestCase):
  """Against one emulator; every test ends by checking no client went anywhere but 127.0.0.1."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.gcs = gcs_testutil.GcsEmulator.for_test_class(cls)
    cls.cache = tempfile.mkdtemp()
    cls.enterClassContext(mock.patch.dict(os.environ, {"PERFLOW_JAX_CACHE": cls.cache}))

  def tearDown(self):
    self.assertEqual(self.gcs.foreign_contacts(), [])
    super().tearDown()

  def test_files_and_listing(self):
    storage.write_json("gs://bucket/files/a/config.json", {"x": 1})
    storage.write_bytes("gs://bucket/files/b.bin", b"\x00\x01")
    self.assertEqual(json.loads(storage.read_text("gs://bucket/files/a/config.json")), {"x": 1})
    self.assertEqual(storage.read_bytes("gs://bucket/files/b.bin"), b"\x00\x01")
    self.assertTrue(storage.isdir("gs://bucket/files/a"))
    self.assertTrue(storage.isfile("gs://bucket/files/b.bin"))
    self.assertFalse(storage.exists("gs://bucket/files/c"))
    self.assertEqual(storage.listdir("gs://bucket/files"), ["a", "b.bin"])
    storage.remove_tree("gs://bucket/files/a")
    self.assertEqual(self.gcs.list_objects("gs://bucket/files/"), ["files/b.bin"])

  def test_a_failed_atomic_write_uploads_nothing(self):
    with self.assertRaises(RuntimeError):
      with storage.atomic_write("gs://bucket/atomic/x.json") as f:
        f.write("{")
        raise RuntimeError("interrupted")
    self.assertEqual(self.gcs.list_objects("gs://bucket/atomic/"), [])

  def test_staged_folder_uploads_the_completion_marker_last(self):
    order = []
    real = storage.upload_file
    with mock.patch.object(storage, "upload_file", side_effect=lambda src, url: (order.append(url), real(src, url))):
      with storage.staged_folder("gs://bucket/staged", last=("model_index.json",)) as local:
        for rel in ("model_index.json", "unet/config.json", "vae/weights.bin", "z.txt"):
          storage.write_text(os.path.join(local, rel), rel)
    self.assertEqual(order[-1], "gs://bucket/staged/model_index.json")
    self.assertLen(order, 4)
    self.assertEqual(storage.read_text("gs://bucket/staged/unet/config.json"), "unet/config.json")

  def test_local_copy_downloads_once_and_again_after_a_change(self):
    storage.write_text("gs://bucket/model/unet/config.json", "1")
    storage.write_text("gs://bucket/model/model_index.json", "{}")
    first = storage.local_copy("gs://bucket/model")
    self.assertTrue(first.startswith(self.cache))
    self.assertEqual(open(os.path.join(first, "unet", "config.json")).read(), "1")
    with mock.patch.object(storage, "_fs", wraps=storage._fs) as fs:  # pylint: disable=protected-access
      self.assertEqual(storage.local_copy("gs://bucket/model"), first)
      self.assertEqual(fs.call_count, 1)  # the listing only, no download
    storage.write_text("gs://bucket/model/unet/config.json", "22")
    self.assertEqual(open(os.path.join(storage.local_copy("gs://bucket/model"), "unet", "config.json")).read(), "22")
    single = storage.local_copy("gs://bucket/model/model_index.json")
    self.assertEqual(os.path.basename(single), "model_index.json")
    with self.assertRaisesRegex(FileNotFoundError, "gs://bucket/nothing does not exist"):
      storage.local_copy("gs://bucket/nothing")

  def test_metrics_in_a_bucket_resume_after_the_checkpoint_step(self):
    # In a child: tensorboardX's gs:// writer uploads once more when it is garbage collected, which in this process
    # would happen at exit, after the emulator has stopped (and then retry for two minutes).
    run = "gs://bucket/metrics_run"
    child = f"""
from perflow_jax import metrics
writer = metrics.MetricsWriter("{run}", total_steps=6, enabled=True)
for step in range(1, 6):
  writer.write_scalars(step, {{"loss": 1.0 / step}})
writer.close()
# A restart from the checkpoint of step 3 drops the lines of steps 4-5 and continues from there.
writer = metrics.MetricsWriter("{run}", total_steps=6, start_step=3, enabled=True)
assert [r["step"] for r in metrics.read_metrics("{run}")] == [1, 2, 3]
writer.write_scalars(4, {{"loss": 0.5}})
writer.close()
"""
    subprocess.run([sys.executable, "-c", child], cwd=REPO, env={**os.environ, **self.gcs.env()}, check=True,
                   capture_output=True)
    self.assertEqual([(r["step"], r["loss"]) for r in metrics.read_metrics(run)],
                     [(1, 1.0), (2, 0.5), (3, 1.0 / 3), (4, 0.5)])
    self.assertNotEmpty([n for n in self.gcs.list_objects(f"{run}/tensorboard/") if "tfevents" in n])

  def test_a_damaged_checkpoint_in_a_bucket_is_moved_aside(self):
    workdir = "gs://bucket/ckpt_run"
    config = ml_collections.ConfigDict({"checkpoint_every": 2, "keep_checkpoints": 2, "seed": 0})
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)

    def state(scale):
      w = jax.device_put(scale * jnp.arange(32.0).reshape(4, 8), NamedSharding(mesh, P(None, "fsdp")))
      return {"params": {"w": w}, "step": int(scale)}

    manager = checkpoint.make_checkpoint_manager(workdir, config)
    for step in (2, 4):
      checkpoint.save_checkpoint(manager, step, state(step), state(step)["params"], config)
    checkpoint.close(manager)
    storage.as_path(f"{workdir}/checkpoints/4/ema/_METADATA").unlink()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype,
                                                           sharding=getattr(x, "sharding", None)), state(1))
    manager = checkpoint.make_checkpoint_manager(workdir, config)
    with self.assertLogs(level="WARNING") as logs:
      restored = checkpoint.restore_checkpoint(manager, abstract, abstract["params"])
    self.assertEqual(sorted(manager.all_steps()), [2])
    checkpoint.close(manager)
    self.assertEqual(restored.step, 2)
    np.testing.assert_array_equal(np.asarray(restored.state["params"]["w"]), 2.0 * np.arange(32.0).reshape(4, 8))
    self.assertIn("Moved unreadable checkpoint step 4 to gs://bucket/ckpt_run/checkpoints_damaged/4",
                  "\n".join(logs.output))
    # config.model.init_from=gs://...: another run's EMA weights, read from the bucket.
    ema = checkpoint.restore_ema_params(workdir, abstract["params"])
    np.testing.assert_array_equal(np.asarray(ema["w"]), 2.0 * np.arange(32.0).reshape(4, 8))
    moved = self.gcs.list_objects(f"{workdir}/checkpoints_damaged/4/")
    self.assertIn("ckpt_run/checkpoints_damaged/4/state/_METADATA", moved)  # moved, not deleted
    self.assertEqual(self.gcs.list_objects(f"{workdir}/checkpoints/4/"), [])

  def test_prepared_data_is_written_to_and_read_from_a_bucket(self):
    cmd = [sys.executable, "-m", "perflow_jax.prepare_data", "--source=procedural", "--data_dir=gs://bucket/tfds",
           "--name=shapes", "--num_examples=12", "--resolution=16", "--examples_per_shard=5"]
    env = {**os.environ, **self.gcs.env()}
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
    names = self.gcs.list_objects("gs://bucket/tfds/shapes/1.0.0/")
    self.assertLen([n for n in names if ".array_record-" in n], 3)
    report = json.loads(self.gcs.read_bytes("gs://bucket/tfds/shapes/1.0.0/prepare_report.json"))
    self.assertEqual((report["dataset"], report["written"]), ("gs://bucket/tfds/shapes/1.0.0", 12))
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    self.assertNotEqual(again.returncode, 0)
    self.assertIn("already exists at gs://bucket/tfds/shapes/1.0.0; pass --overwrite", again.stderr)
    # Training reads it straight from the bucket (grain's ArrayRecord reader opens gs:// itself).
    data = ml_collections.ConfigDict({"source": "tfds", "name": "shapes", "data_dir": "gs://bucket/tfds",
                                      "split": "train", "image_key": "image", "text_key": "text"})
    source = sources.open_source(data)
    self.assertLen(source, 12)
    self.assertNotEmpty(source[7]["text"])
    self.assertEqual(_png_side(source[7]["image"]), 16)

  def test_real_images_for_the_frechet_distance_come_from_a_bucket(self):
    images = np.random.default_rng(0).integers(0, 256, (3, 20, 20, 3), np.uint8)
    with storage.atomic_write("gs://bucket/real/images.npz", "wb") as f:
      np.savez(f, images=images)
    got = evaluate.read_real_images("gs://bucket/real/images.npz", 20)
    np.testing.assert_allclose(got, images.astype(np.float32) / 127.5 - 1.0, atol=1e-6)
    with self.assertRaisesRegex(ValueError, "--real=gs://bucket/real/missing.npz does not exist"):
      evaluate.read_real_images("gs://bucket/real/missing.npz", 20)

  def test_a_feature_net_in_a_bucket_loads_as_the_local_one(self):
    storage.copy_folder(CLASSIFIER, "gs://bucket/classifier")
    remote = features.load_feature_net("classifier:gs://bucket/classifier")
    local = features.load_feature_net(f"classifier:{CLASSIFIER}")
    images = np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(remote.features(images, 2), local.features(images, 2))
    with self.assertRaisesRegex(features.FeatureNetError, "gs://bucket/none does not exist"):
      features.load_feature_net("classifier:gs://bucket/none")


def _png_side(encoded: bytes) -> int:
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(io.BytesIO(encoded)) as image:
    return image.size[0]


if __name__ == "__main__":
  absltest.main()
