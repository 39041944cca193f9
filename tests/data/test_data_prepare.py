"""prepare_data: folders of captioned images (three layouts, bad files reported), procedural sets, the CLI."""

import csv
import json
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from perflow_jax.data import folder
from perflow_jax.data import procedural
from perflow_jax.data import sources
from perflow_jax.data import tokenizer as tokenizer_lib
from perflow_jax.data import writer

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _save(path, value, size=(40, 48), fmt=None):
  """A solid image of grey level ``value``, height x width = size."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.full(size + (3,), value, np.uint8)).save(path, format=fmt)


def _good_images(root, n):
  names = []
  for i in range(n):
    name = f"img_{i:02d}.{'png' if i % 2 else 'jpg'}"
    _save(os.path.join(root, name), 10 * i)
    names.append(name)
  return names


class FolderTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    self.tmp = tmp.name
    self.root = os.path.join(self.tmp, "images")
    self.data_dir = os.path.join(self.tmp, "tfds")

  def _read(self, name):
    src = tfds.data_source(name, split="train", data_dir=self.data_dir)
    return [src[i] for i in range(len(src))]

  def test_txt_layout_with_three_bad_files(self):
    names = _good_images(self.root, 6)
    for i, name in enumerate(names):
      with open(os.path.join(self.root, os.path.splitext(name)[0] + ".txt"), "w") as f:
        f.write(f"  caption {i}\n")
    _save(os.path.join(self.root, "nested", "deep.png"), 200)
    with open(os.path.join(self.root, "nested", "deep.txt"), "w") as f:
      f.write("deep caption")
    # The three bad files: a corrupt image, an image without caption, a too-small image.
    with open(os.path.join(self.root, "corrupt.jpg"), "wb") as f:
      f.write(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with open(os.path.join(self.root, "corrupt.txt"), "w") as f:
      f.write("never read")
    _save(os.path.join(self.root, "no_caption.png"), 30)
    _save(os.path.join(self.root, "tiny.png"), 30, size=(20, 64))
    with open(os.path.join(self.root, "tiny.txt"), "w") as f:
      f.write("too small")

    report = folder.build_folder_dataset(self.root, self.data_dir, "folder_txt", min_size=32,
                                         examples_per_shard=3)
    self.assertEqual(report["written"], 7)
    self.assertEqual(report["skipped"], 3)
    self.assertEqual(report["layout"], "txt")
    skipped = {(s["file"], s["reason"]) for s in report["skipped_files"]}
    self.assertEqual(skipped, {("corrupt.jpg", "unreadable_image"), ("no_caption.png", "missing_caption"),
                               ("tiny.png", "too_small")})
    self.assertEqual(report["skipped_by_reason"], {**{r: 0 for r in folder.SKIP_REASONS}, "unreadable_image": 1,
                                                   "missing_caption": 1, "too_small": 1})
    # The report is also saved next to the dataset.
    with open(os.path.join(report["dataset"], writer.REPORT_FILENAME)) as f:
      self.assertEqual(json.load(f), report)
    # Written in shards of 3: 7 examples -> 3 shards.
    shards = sorted(f for f in os.listdir(report["dataset"]) if ".array_record-" in f)
    self.assertLen(shards, 3)
    records = self._read("folder_txt")
    self.assertEqual([r["text"].decode() for r in records],
                     ["caption 0", "caption 1", "caption 2", "caption 3", "caption 4", "caption 5",
                      "deep caption"])
    # PNG is lossless; the stored bytes decode to the original pixels.
    np.testing.assert_array_equal(records[1]["image"], np.full((40, 48, 3), 10, np.uint8))
    self.assertEqual(records[6]["image"].shape, (40, 48, 3))

  def test_metadata_jsonl_layout(self):
    names = _good_images(self.root, 4)
    _save(os.path.join(self.root, "unlisted.png"), 0)
    with open(os.path.join(self.root, "metadata.jsonl"), "w") as f:
      for i, name in enumerate(names):
        f.write(json.dumps({"file_name": name, "text": f"json {i}"}) + "\n")
      f.write(json.dumps({"file_name": "gone.png", "text": "missing"}) + "\n")
      f.write("{not json\n")
    report = folder.build_folder_dataset(self.root, self.data_dir, "folder_jsonl", min_size=0)
    self.assertEqual(report["layout"], "jsonl")
    self.assertEqual(report["written"], 4)
    self.assertEqual({(s["file"], s["reason"]) for s in report["skipped_files"]},
                     {("gone.png", "missing_file"), ("metadata.jsonl:6", "bad_metadata"),
                      ("unlisted.png", "missing_caption")})
    self.assertEqual([r["text"].decode() for r in self._read("folder_jsonl")], [f"json {i}" for i in range(4)])

  def test_metadata_csv_layout_resize_and_grayscale(self):
    names = _good_images(self.root, 3)
    Image.fromarray(np.full((64, 96), 77, np.uint8)).save(os.path.join(self.root, "gray.png"))
    with open(os.path.join(self.root, "metadata.csv"), "w", newline="") as f:
      w = csv.writer(f)
      w.writerow(["file_name", "text"])
      for i, name in enumerate(names + ["gray.png"]):
        w.writerow([name, f"csv, {i}"])
    report = folder.build_folder_dataset(self.root, self.data_dir, "folder_csv", max_size=32, min_size=0)
    self.assertEqual(report["layout"], "csv")
    self.assertEqual(report["written"], 4)
    records = self._read("folder_csv")
    self.assertEqual(records[0]["text"].decode(), "csv, 3")  # sorted by path: gray.png first
    # Grayscale became RGB; the short side 64 was scaled to max_size 32 (aspect kept).
    np.testing.assert_array_equal(records[0]["image"], np.full((32, 48, 3), 77, np.uint8))
    self.assertEqual(records[1]["image"].shape, (32, 38, 3))

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, "does not exist"):
      folder.build_folder_dataset(os.path.join(self.tmp, "missing"), self.data_dir, "x")
    os.makedirs(self.root)
    _save(os.path.join(self.root, "a.png"), 1)
    with self.assertRaisesRegex(ValueError, "no usable image"):
      folder.build_folder_dataset(self.root, self.data_dir, "empty_set")
    with self.assertRaisesRegex(ValueError, "tfds naming"):
      folder.build_folder_dataset(self.root, self.data_dir, "Bad-Name")
    with open(os.path.join(self.root, "a.txt"), "w") as f:
      f.write("a")
    folder.build_folder_dataset(self.root, self.data_dir, "twice", min_size=0)
    with self.assertRaisesRegex(ValueError, "--overwrite"):
      folder.build_folder_dataset(self.root, self.data_dir, "twice", min_size=0)
    report = folder.build_folder_dataset(self.root, self.data_dir, "twice", overwrite=True, min_size=0)
    self.assertEqual(report["written"], 1)


class SourcesTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.TemporaryDirectory()
    cls.data_dir = cls.tmp.name
    cls.report = writer.build_procedural_dataset(cls.data_dir, "shapes", num_examples=12, resolution=32, seed=4,
                                                 examples_per_shard=5)

  @classmethod
  def tearDownClass(cls):
    cls.tmp.cleanup()
    super().tearDownClass()

  def test_procedural_dataset_reads_back_with_labels(self):
    self.assertEqual(self.report["written"], 12)
    src = sources.open_tfds_source("shapes", self.data_dir)
    self.assertLen(src, 12)
    record = src[7]
    ex = procedural.example(4, 7, 32)
    self.assertIsInstance(record["image"], bytes)  # decoded later, by the pipeline
    self.assertEqual(record["text"].decode(), ex["text"])
    for field in procedural.LABEL_FIELDS:
      self.assertEqual(int(record[field]), ex["label"][field])
    decoded = tfds.data_source("shapes", split="train", data_dir=self.data_dir)[7]["image"]
    np.testing.assert_array_equal(decoded, ex["image"])

  def test_source_errors_name_the_fix(self):
    with self.assertRaisesRegex(ValueError, "no feature 'caption'.*text_key"):
      sources.open_tfds_source("shapes", self.data_dir, text_key="caption")
    with self.assertRaisesRegex(ValueError, "no split 'test'"):
      sources.open_tfds_source("shapes", self.data_dir, split="test")
    with self.assertRaisesRegex(ValueError, "not found"):
      sources.open_tfds_source("no_such_dataset_here", self.data_dir)
    with self.assertRaisesRegex(ValueError, "not a latent cache"):
      sources.open_cache_source("shapes", self.data_dir)

  def test_tfrecord_dataset_without_tensorflow_says_how_to_install(self):
    path = writer.build_procedural_dataset(self.data_dir, "shapes_tfrecord", num_examples=2, resolution=8)[
        "dataset"]
    info_path = os.path.join(path, "dataset_info.json")
    with open(info_path) as f:
      info = json.load(f)
    info["fileFormat"] = "tfrecord"  # what a catalog dataset built by `tfds build` declares
    with open(info_path, "w") as f:
      json.dump(info, f)
    with self.assertRaisesRegex(ImportError, r"pip install 'perflow_jax\[tf\]'"):
      sources.open_tfds_source("shapes_tfrecord", self.data_dir)
    # Once converted (array_record listed as an alternative format), it reads without TensorFlow.
    info["alternativeFileFormats"] = ["array_record"]
    with open(info_path, "w") as f:
      json.dump(info, f)
    src = sources.open_tfds_source("shapes_tfrecord", self.data_dir)
    self.assertEqual(src[1]["text"].decode(), procedural.example(0, 1, 8)["text"])


class CliTest(absltest.TestCase):

  def test_prepare_data_cli_procedural(self):
    tmp_dir = tempfile.TemporaryDirectory()
    self.addCleanup(tmp_dir.cleanup)
    tmp = tmp_dir.name
    out = subprocess.run(
        [sys.executable, "-m", "perflow_jax.prepare_data", "--source=procedural", f"--data_dir={tmp}",
         "--name=cli_shapes", "--num_examples=6", "--resolution=16"],
        cwd=_REPO, capture_output=True, text=True, timeout=120, check=False)
    self.assertEqual(out.returncode, 0, out.stderr[-2000:])
    self.assertIn("wrote 6 examples", out.stdout)
    src = tfds.data_source("cli_shapes", split="train", data_dir=tmp)
    self.assertLen(src, 6)
    self.assertEqual(src[5]["text"].decode(), procedural.example(0, 5, 16)["text"])
    bad = subprocess.run([sys.executable, "-m", "perflow_jax.prepare_data", "--source=nonsense",
                          f"--data_dir={tmp}", "--name=x"], cwd=_REPO, capture_output=True, text=True,
                         timeout=120, check=False)
    self.assertNotEqual(bad.returncode, 0)
    self.assertIn("folder:PATH, procedural or tfds:NAME", bad.stderr)

  def test_cache_latents_cli_matches_torch_models(self):
    """--cache_latents end to end: a tiny SD1-layout folder, encoded by our Flax ports, checked against torch."""
    import diffusers  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top

    tmp_dir = tempfile.TemporaryDirectory()
    self.addCleanup(tmp_dir.cleanup)
    model_dir, data_dir = os.path.join(tmp_dir.name, "sd"), os.path.join(tmp_dir.name, "tfds")
    torch.manual_seed(0)
    tok = tokenizer_lib.load_tokenizer(tokenizer_lib.write_tiny_clip_tokenizer(os.path.join(model_dir, "tokenizer")))
    vae = diffusers.AutoencoderKL(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
                                  up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=4, layers_per_block=1)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=[32, 64], norm_num_groups=8, sample_size=8, cross_attention_dim=32, layers_per_block=1,
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        attention_head_dim=2)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=len(tok),
        bos_token_id=tok.bos_token_id, eos_token_id=2, pad_token_id=tok.pad_token_id))
    for name, model in (("vae", vae), ("unet", unet), ("text_encoder", text)):
      model.save_pretrained(os.path.join(model_dir, name))
    os.makedirs(os.path.join(model_dir, "scheduler"))
    with open(os.path.join(model_dir, "scheduler", "scheduler_config.json"), "w") as f:
      json.dump({"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                 "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "epsilon"}, f)
    with open(os.path.join(model_dir, "model_index.json"), "w") as f:
      json.dump({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                 "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
                 "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"]}, f)
    run = subprocess.run(
        [sys.executable, "-m", "perflow_jax.prepare_data", "--cache_latents", f"--pretrained={model_dir}",
         "--source=procedural", "--num_examples=10", "--resolution=16", f"--data_dir={data_dir}", "--name=latents",
         "--batch_size=8"],
        cwd=_REPO, capture_output=True, text=True, timeout=300, check=False,
        env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"))
    self.assertEqual(run.returncode, 0, run.stderr[-3000:])
    self.assertIn("wrote 10 examples", run.stdout)
    record = tfds.data_source("latents", split="train", data_dir=data_dir)[9]
    ex = procedural.example(0, 9, 16)
    self.assertEqual(record["text"].decode(), ex["text"])
    image = torch.from_numpy(ex["image"].astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    ids = torch.from_numpy(tokenizer_lib.tokenize(tok, [ex["text"]]).astype(np.int64))
    with torch.no_grad():
      posterior = vae.encode(image).latent_dist
      context = text(ids).last_hidden_state
    np.testing.assert_allclose(record["latent_mean"], posterior.mean[0].permute(1, 2, 0).numpy(), atol=1e-4)
    np.testing.assert_allclose(record["latent_logvar"], posterior.logvar[0].permute(1, 2, 0).numpy(), atol=1e-4)
    np.testing.assert_allclose(record["context"], context[0].numpy(), atol=1e-4)


if __name__ == "__main__":
  absltest.main()
