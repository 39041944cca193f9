"""Issue 17, data builds: nothing lost, nothing trusted blindly.

What a user found with `prepare_data --source=folder:PATH`, each reproduced here: rows and symlinks reading outside
the folder (2), `--overwrite` deleting the old dataset before the new one was built (3), a failed build's stub
blocking the rerun (4), non-UTF-8 metadata aborting the build and non-UTF-8 captions stored with U+FFFD (5), a
12000x12000 PNG decoded in full and 4x4 images accepted (9). Pure data builds: no JAX model.
"""

import builtins
import contextlib
import json
import os
import struct
import subprocess
import sys
import tempfile
from unittest import mock
import warnings
import zlib

from absl.testing import absltest
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from perflow_jax.data import folder
from perflow_jax.data import procedural
from perflow_jax.data import writer

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _image(path, side=64, value=100):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.full((side, side, 3), value, np.uint8)).save(path)


def _write(path, data):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb" if isinstance(data, bytes) else "w") as f:
    f.write(data)


def _captioned(root, stem, caption, side=64):
  _image(os.path.join(root, stem + ".png"), side)
  _write(os.path.join(root, stem + ".txt"), caption)


def _png_chunk(kind, data):
  return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width, height, idat=None, bit_depth=8, color_type=2):
  """A PNG whose header declares width x height; its pixel data is `idat` (default: a few bytes, so the file is
  tiny and could never decode to that size)."""
  ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat or zlib.compress(b"\0"))
          + _png_chunk(b"IEND", b""))


def _black_1bit_png(side):
  """A real, valid side x side 1-bit PNG of a few tens of KB (decoding it takes side * side bytes in PIL)."""
  comp = zlib.compressobj(9)
  row = b"\0" * (1 + (side + 7) // 8)  # filter byte + packed bits
  rows_per_part = 500
  parts = [comp.compress(row * min(rows_per_part, side - start)) for start in range(0, side, rows_per_part)]
  return _png(side, side, b"".join(parts) + comp.flush(), bit_depth=1, color_type=0)


@contextlib.contextmanager
def _opened_files():
  """Records the resolved path of every file opened with open() meanwhile (in any thread)."""
  opened = []
  real_open = builtins.open

  def spy(file, *args, **kwargs):
    if isinstance(file, (str, bytes, os.PathLike)):
      opened.append(os.path.realpath(os.fsdecode(file)))
    return real_open(file, *args, **kwargs)

  with mock.patch.object(builtins, "open", spy):
    yield opened


class _DataTestCase(absltest.TestCase):

  def setUp(self):
    super().setUp()
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    self.tmp = os.path.realpath(tmp.name)
    self.root = os.path.join(self.tmp, "a", "images")  # so that '../../x.png' is tmp/x.png
    self.data_dir = os.path.join(self.tmp, "tfds")

  def texts(self, name):
    src = tfds.data_source(name, split="train", data_dir=self.data_dir)
    return [src[i]["text"].decode() for i in range(len(src))]

  @staticmethod
  def skips(report):
    return {(s["file"], s["reason"]): s["detail"] for s in report["skipped_files"]}


class OutsideFolderTest(_DataTestCase):
  """Item 2: every file a build reads resolves inside the folder; the others are reported and never opened."""

  def test_metadata_rows_and_symlinks_pointing_outside_are_never_opened(self):
    outside = os.path.join(self.tmp, "x.png")
    _image(outside, value=7)
    _image(os.path.join(self.root, "in_0.png"), value=1)
    _image(os.path.join(self.root, "in_1.png"), value=2)
    os.symlink(os.path.join(self.root, "in_0.png"), os.path.join(self.root, "alias.png"))  # inside: fine
    os.symlink(outside, os.path.join(self.root, "link.png"))
    rows = [("in_0.png", "inside 0"), ("in_1.png", "inside 1"), ("alias.png", "alias"),
            ("../../x.png", "outside relative"), (outside, "outside absolute"), ("/etc/shadow", "outside shadow"),
            ("link.png", "outside symlink")]
    _write(os.path.join(self.root, "metadata.jsonl"),
           "".join(json.dumps({"file_name": f, "text": t}) + "\n" for f, t in rows))
    with _opened_files() as opened:
      report = folder.build_folder_dataset(self.root, self.data_dir, "outside_jsonl")
    skips = self.skips(report)
    self.assertEqual(set(skips), {("../../x.png", "outside_folder"), (outside, "outside_folder"),
                                  ("/etc/shadow", "outside_folder"), ("link.png", "outside_folder")})
    self.assertIn(f"resolves to {outside}, outside the folder {self.root}", skips[("link.png", "outside_folder")])
    self.assertEqual(report["skipped_by_reason"]["outside_folder"], 4)
    self.assertNotIn(outside, opened)
    self.assertNotIn("/etc/shadow", opened)
    self.assertEqual(report["written"], 3)
    self.assertEqual(self.texts("outside_jsonl"), ["alias", "inside 0", "inside 1"])
    self.assertIn("skipped ../../x.png: outside_folder", folder.format_report(report))

  def test_txt_layout_symlinked_image_or_caption_pointing_outside_is_never_opened(self):
    outside_image, secret = os.path.join(self.tmp, "x.png"), os.path.join(self.tmp, "secret.txt")
    _image(outside_image)
    _write(secret, "SECRET")
    _captioned(self.root, "good", "a good caption")
    os.symlink(outside_image, os.path.join(self.root, "escape.png"))
    _write(os.path.join(self.root, "escape.txt"), "an innocent caption")
    _image(os.path.join(self.root, "leak.png"))
    os.symlink(secret, os.path.join(self.root, "leak.txt"))
    with _opened_files() as opened:
      report = folder.build_folder_dataset(self.root, self.data_dir, "outside_txt")
    skips = self.skips(report)
    self.assertEqual(set(skips), {("escape.png", "outside_folder"), ("leak.png", "outside_folder")})
    self.assertIn("caption file leak.txt resolves to", skips[("leak.png", "outside_folder")])
    self.assertNotIn(outside_image, opened)
    self.assertNotIn(secret, opened)
    self.assertEqual(self.texts("outside_txt"), ["a good caption"])


class TransactionalBuildTest(_DataTestCase):
  """Items 3 and 4: a build replaces or creates a dataset only when it succeeded."""

  def _old_dataset(self):
    old = os.path.join(self.tmp, "old_images")
    for i in range(3):
      _captioned(old, f"img_{i}", f"old {i}")
    folder.build_folder_dataset(old, self.data_dir, "keep", examples_per_shard=2)
    self.assertEqual(self.texts("keep"), ["old 0", "old 1", "old 2"])

  def test_failed_overwrite_keeps_the_old_dataset(self):
    self._old_dataset()
    _captioned(self.root, "icon", "too small to train on", side=4)  # nothing usable
    with self.assertRaisesRegex(ValueError, r"no usable image .*1 too_small.*icon.png.*nothing was written"):
      folder.build_folder_dataset(self.root, self.data_dir, "keep", overwrite=True)
    self.assertEqual(self.texts("keep"), ["old 0", "old 1", "old 2"])
    with open(os.path.join(writer.dataset_dir(self.data_dir, "keep"), writer.REPORT_FILENAME)) as f:
      self.assertEqual(json.load(f)["written"], 3)
    self.assertEqual(os.listdir(self.data_dir), ["keep"])  # no hidden build folder left behind
    # A successful overwrite replaces it, old shards included (3 examples in 2 shards before, 1 in 1 now).
    _captioned(self.root, "big", "new")
    folder.build_folder_dataset(self.root, self.data_dir, "keep", overwrite=True)
    self.assertEqual(self.texts("keep"), ["new"])
    self.assertLen([f for f in os.listdir(writer.dataset_dir(self.data_dir, "keep")) if ".array_record-" in f], 1)
    self.assertEqual(os.listdir(self.data_dir), ["keep"])

  def test_failed_first_build_leaves_no_stub_and_the_rerun_works(self):
    _captioned(self.root, "icon", "too small", side=4)
    with self.assertRaisesRegex(ValueError, "no usable image"):
      folder.build_folder_dataset(self.root, self.data_dir, "fresh")
    self.assertEqual(os.listdir(self.data_dir), [])
    _captioned(self.root, "big", "usable")
    report = folder.build_folder_dataset(self.root, self.data_dir, "fresh")  # no --overwrite needed
    self.assertEqual((report["written"], self.texts("fresh")), (1, ["usable"]))

  def test_an_error_midway_keeps_the_old_dataset(self):
    """write_dataset itself is transactional, so procedural and latent-cache builds are too."""
    writer.build_procedural_dataset(self.data_dir, "shapes", num_examples=4, resolution=8)

    def examples():
      yield from writer.procedural_examples(70, 8, seed=1)  # 70 > one 64-example chunk: shards get written
      raise RuntimeError("disk full")

    with self.assertRaisesRegex(RuntimeError, "disk full"):
      writer.write_dataset(self.data_dir, "shapes", writer.image_features(with_labels=True), examples(),
                           examples_per_shard=16, overwrite=True)
    self.assertEqual(self.texts("shapes"), [procedural.example(0, i, 8)["text"] for i in range(4)])
    self.assertEqual(os.listdir(self.data_dir), ["shapes"])

  def test_cli_failed_overwrite_exits_nonzero_and_keeps_the_old_dataset(self):
    writer.build_procedural_dataset(self.data_dir, "shapes", num_examples=5, resolution=16)
    _captioned(self.root, "icon", "too small", side=4)
    out = subprocess.run(
        [sys.executable, "-m", "perflow_jax.prepare_data", f"--source=folder:{self.root}",
         f"--data_dir={self.data_dir}", "--name=shapes", "--overwrite"],
        cwd=_REPO, capture_output=True, text=True, timeout=120, check=False)
    self.assertNotEqual(out.returncode, 0)
    self.assertIn("no usable image", out.stderr + out.stdout)
    self.assertIn("too_small", out.stderr + out.stdout)
    self.assertLen(self.texts("shapes"), 5)
    self.assertEqual(os.listdir(self.data_dir), ["shapes"])


class EncodingTest(_DataTestCase):
  """Item 5: non-UTF-8 captions are skipped per file and line, with the byte offset; the good lines are used."""

  def test_jsonl_with_a_latin1_line(self):
    for i in range(4):
      _image(os.path.join(self.root, f"img_{i}.png"))
    lines = [json.dumps({"file_name": f"img_{i}.png", "text": t}, ensure_ascii=False).encode(enc) + b"\n"
             for i, (t, enc) in enumerate([("plain", "utf-8"), ("naïve", "utf-8"), ("café", "latin-1"),
                                           ("déjà vu", "utf-8")])]
    data = b"\xef\xbb\xbf" + b"".join(lines)  # a byte-order mark is accepted
    _write(os.path.join(self.root, "metadata.jsonl"), data)
    report = folder.build_folder_dataset(self.root, self.data_dir, "latin1_jsonl")
    skips = self.skips(report)
    self.assertEqual(set(skips), {("metadata.jsonl:3", "bad_encoding"), ("img_2.png", "missing_caption")})
    bad_at = data.index(b"\xe9")
    column = bad_at - (data.rindex(b"\n", 0, bad_at) + 1)
    self.assertEqual(skips[("metadata.jsonl:3", "bad_encoding")],
                     f"metadata.jsonl line 3: byte 0xe9 at offset {column} of the line (offset {bad_at} of the "
                     "file) is not UTF-8 (invalid continuation byte); save the file as UTF-8")
    self.assertEqual(self.texts("latin1_jsonl"), ["plain", "naïve", "déjà vu"])

  def test_csv_with_a_latin1_line(self):
    for i in range(4):
      _image(os.path.join(self.root, f"img_{i}.png"))
    data = ("file_name,text\r\n"
            "img_0.png,plain\r\n"
            'img_1.png,"two\nlines"\r\n'  # one record on lines 3-4
            ).encode() + "img_2.png,café\r\n".encode("latin-1") + "img_3.png,après\r\n".encode()
    _write(os.path.join(self.root, "metadata.csv"), data)
    report = folder.build_folder_dataset(self.root, self.data_dir, "latin1_csv")
    skips = self.skips(report)
    self.assertEqual(set(skips), {("metadata.csv:5", "bad_encoding"), ("img_2.png", "missing_caption")})
    self.assertIn("metadata.csv line 5: byte 0xe9 at offset 13 of the line",
                  skips[("metadata.csv:5", "bad_encoding")])
    self.assertEqual(self.texts("latin1_csv"), ["plain", "two\nlines", "après"])

  def test_latin1_txt_caption_is_skipped_not_stored_with_replacement_characters(self):
    _captioned(self.root, "good", "ok")
    _image(os.path.join(self.root, "bad.png"))
    _write(os.path.join(self.root, "bad.txt"), "line one\nnaïve".encode("latin-1"))
    report = folder.build_folder_dataset(self.root, self.data_dir, "latin1_txt")
    self.assertEqual(self.skips(report), {
        ("bad.png", "bad_encoding"): "caption file bad.txt line 2: byte 0xef at offset 2 of the line (offset 11 "
                                     "of the file) is not UTF-8 (invalid continuation byte); save the file as UTF-8"})
    self.assertEqual(self.texts("latin1_txt"), ["ok"])


class ImageLimitsTest(_DataTestCase):
  """Item 9: sizes come from the header; too many pixels or too small is skipped before decoding."""

  def test_too_many_pixels_and_too_small_are_judged_from_the_header(self):
    _captioned(self.root, "good", "good")
    _captioned(self.root, "icon", "4x4", side=4)
    for stem, (w, h) in {"huge_a": (9000, 8000), "huge_b": (12000, 12000), "huge_c": (20000, 20000)}.items():
      # 72, 144 and 400 megapixels: over --max_pixels; over PIL's warning limit; over PIL's error limit.
      _write(os.path.join(self.root, stem + ".png"), _png(w, h))
      _write(os.path.join(self.root, stem + ".txt"), f"{w}x{h}")
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      report = folder.build_folder_dataset(self.root, self.data_dir, "limits")
    self.assertEqual([w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)], [])
    skips = self.skips(report)
    self.assertEqual(set(skips), {("icon.png", "too_small"), ("huge_a.png", "too_many_pixels"),
                                  ("huge_b.png", "too_many_pixels"), ("huge_c.png", "too_many_pixels")})
    self.assertEqual(skips[("icon.png", "too_small")], "4x4: short side under --min_size=64")
    self.assertEqual(skips[("huge_a.png", "too_many_pixels")],
                     "9000x8000 = 72.0 megapixels, over --max_pixels=64000000: not decoded")
    self.assertIn("--max_pixels=64000000", skips[("huge_b.png", "too_many_pixels")])
    self.assertIn("144000000 pixels", skips[("huge_b.png", "too_many_pixels")])
    self.assertIn("400000000 pixels", skips[("huge_c.png", "too_many_pixels")])
    self.assertEqual(self.texts("limits"), ["good"])
    # The limits are flags: a lower --min_size keeps the icon, a lower --max_pixels drops the 64x64 image.
    report = folder.build_folder_dataset(self.root, self.data_dir, "limits_4", min_size=4)
    self.assertEqual(report["written"], 2)
    with self.assertRaisesRegex(ValueError, "no usable image"):
      folder.build_folder_dataset(self.root, self.data_dir, "limits_none", max_pixels=64 * 64 - 1)
    with self.assertRaisesRegex(ValueError, "above PIL's decompression-bomb limit"):
      folder.build_folder_dataset(self.root, self.data_dir, "x", max_pixels=Image.MAX_IMAGE_PIXELS + 1)

  def test_a_real_12000px_png_is_not_decoded(self):
    """The user's case: a small 12000x12000 PNG, --max_size=64. Peak RSS of the build, measured in a subprocess
    after a warm-up build, stays far below the 144 MB that decoding even its 1-bit pixels would take."""
    bomb = _black_1bit_png(12000)
    self.assertLess(len(bomb), 500_000)
    _write(os.path.join(self.root, "bomb.png"), bomb)
    _write(os.path.join(self.root, "bomb.txt"), "a bomb")
    _captioned(self.root, "good", "good")
    warm = os.path.join(self.tmp, "warm")
    _captioned(warm, "good", "good")
    script = (
        "import json, resource, sys\n"
        "from perflow_jax.data import folder\n"
        "root, warm, data_dir = sys.argv[1:]\n"
        "folder.build_folder_dataset(warm, data_dir, 'warm', max_size=64)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "report = folder.build_folder_dataset(root, data_dir, 'bomb', max_size=64)\n"
        "grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before\n"
        "print(json.dumps({'grew_kb': grew, 'report': report}))\n")
    out = subprocess.run([sys.executable, "-c", script, self.root, warm, self.data_dir], cwd=_REPO,
                         capture_output=True, text=True, timeout=120, check=False)
    self.assertEqual(out.returncode, 0, out.stderr[-2000:])
    result = json.loads(out.stdout.strip().splitlines()[-1])
    self.assertEqual(result["report"]["written"], 1)
    self.assertEqual([(s["file"], s["reason"]) for s in result["report"]["skipped_files"]],
                     [("bomb.png", "too_many_pixels")])
    self.assertLess(result["grew_kb"], 48 * 1024)
    self.assertNotIn("DecompressionBombWarning", out.stderr)


if __name__ == "__main__":
  absltest.main()
