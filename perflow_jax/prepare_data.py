r"""Prepare training data as tensorflow-datasets datasets (array_record).

Images with captions from a local folder (same-stem .txt files, or metadata.jsonl / metadata.csv with
file_name and text); bad files are skipped and listed in a report, never fatal:
  python -m perflow_jax.prepare_data --source=folder:/data/my_images --data_dir=/data/tfds --name=my_images \
      --min_size=256
Skip reasons (perflow_jax.data.folder): unreadable_image, missing_caption, too_small (short side under
--min_size, default 64), too_many_pixels (over --max_pixels, default 64 megapixels, or PIL's decompression-bomb
limit; read from the header, never decoded), missing_file, bad_metadata, outside_folder (a file, metadata row or
symlink resolving outside the folder: never opened), bad_encoding (a caption .txt, or a metadata.jsonl /
metadata.csv line, that is not UTF-8: the report names the file, line and byte offset; the other lines are used).

The procedural shapes dataset (no network; used by the demo and the tiny config):
  python -m perflow_jax.prepare_data --source=procedural --data_dir=/data/tfds --name=shapes \
      --num_examples=4096 --resolution=64

A latent cache (VAE moments + text context) of a prepared dataset, for source='cache' training:
  python -m perflow_jax.prepare_data --cache_latents --pretrained=/models/sd15 --source=tfds:my_images \
      --data_dir=/data/tfds --name=my_images_latents --resolution=512 --batch_size=64

The report is printed and saved as prepare_report.json in the dataset's folder (<data_dir>/<name>/1.0.0/).
A build is written into a hidden folder in --data_dir (.<name>-1.0.0.building-*) and renamed into place only when
it succeeded: a failed build leaves nothing (the rerun works), a failed --overwrite keeps the old dataset.
--data_dir (and folder:PATH) may be gs:// URLs: the dataset is built in a local temp folder and then uploaded, its
report last; an existing dataset there is replaced only with --overwrite, after the new one is built.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging

from perflow_jax import storage

_SOURCE = flags.DEFINE_string(
    "source", None, "folder:PATH (images with captions), procedural, or tfds:NAME (with --cache_latents only: "
    "a prepared dataset in --source_data_dir or --data_dir).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tfds data_dir the dataset is written to (a folder or gs:// URL).")
_NAME = flags.DEFINE_string("name", None, "Dataset name (a-z, 0-9, _).")
_SPLIT = flags.DEFINE_string("split", "train", "Split name to write (and to read with tfds:NAME).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing dataset of the same name and version.")
_SHARD = flags.DEFINE_integer("examples_per_shard", 1000, "Examples per array_record shard.")
_THREADS = flags.DEFINE_integer("num_threads", 4, "Threads decoding images.")
# folder
_MIN_SIZE = flags.DEFINE_integer("min_size", 64, "Skip images whose short side is below this many pixels "
                                 "(too_small; 0 keeps all).")
_MAX_SIZE = flags.DEFINE_integer("max_size", 0, "Downscale images whose short side is above this (0: keep).")
_MAX_PIXELS = flags.DEFINE_integer(
    "max_pixels", 64_000_000, "Skip images with more pixels (width x height, read from the file header, so they "
    "are never decoded) than this (too_many_pixels); at most PIL's decompression-bomb limit, 89478485.")
_CAPTION_KEY = flags.DEFINE_string("caption_key", "text", "Caption column of metadata.jsonl / metadata.csv.")
# procedural
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", 1024, "Procedural: number of examples.")
_RESOLUTION = flags.DEFINE_integer("resolution", 64, "Procedural: image side; cache: side fed to the VAE.")
_SEED = flags.DEFINE_integer("seed", 0, "Procedural: dataset seed.")
# latent cache
_CACHE = flags.DEFINE_bool("cache_latents", False, "Write a latent cache of --source instead of images.")
_PRETRAINED = flags.DEFINE_string("pretrained", None, "Cache: diffusers folder or single-file checkpoint.")
_SOURCE_DATA_DIR = flags.DEFINE_string("source_data_dir", None, "Cache: data_dir of tfds:NAME (default --data_dir).")
_IMAGE_KEY = flags.DEFINE_string("image_key", "image", "Cache: image feature of tfds:NAME.")
_TEXT_KEY = flags.DEFINE_string("text_key", "text", "Cache: caption feature of tfds:NAME.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Cache: global batch per encoder call.")
_CACHE_DTYPE = flags.DEFINE_enum("cache_dtype", "float32", ["float32", "float16"], "Cache: storage dtype.")


def _parse_source(source: str | None) -> tuple[str, str]:
  """'folder:PATH' -> ('folder', PATH); 'procedural' -> ('procedural', ''); 'tfds:NAME' -> ('tfds', NAME)."""
  if not source:
    raise app.UsageError("--source is required: folder:PATH, procedural or tfds:NAME")
  kind, _, arg = source.partition(":")
  if kind == "procedural" and not arg:
    return kind, ""
  if kind in ("folder", "tfds") and arg:
    return kind, os.path.expanduser(arg)
  raise app.UsageError(f"--source={source!r}: expected folder:PATH, procedural or tfds:NAME")


def _cache(kind: str, arg: str, data_dir: str) -> dict[str, Any]:
  """Encodes the source with the pretrained VAE and text encoder and writes the cache; returns a report."""
  # Imported here: only the cache needs the models and a device mesh.
  import numpy as np  # pylint: disable=g-import-not-at-top

  from perflow_jax.weights import pretrained  # pylint: disable=g-import-not-at-top
  from perflow_jax.data import cache  # pylint: disable=g-import-not-at-top
  from perflow_jax.data import procedural  # pylint: disable=g-import-not-at-top
  from perflow_jax.data import sources  # pylint: disable=g-import-not-at-top
  from perflow_jax.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top

  if not _PRETRAINED.value:
    raise app.UsageError("--cache_latents needs --pretrained=PATH (the model whose VAE and text encoder to use)")
  if kind == "folder":
    raise app.UsageError("--cache_latents reads a prepared dataset: first run prepare_data with "
                         "--source=folder:PATH --name=NAME, then cache it with --source=tfds:NAME")
  if kind == "procedural":
    source = procedural.ProceduralSource(_NUM_EXAMPLES.value, _RESOLUTION.value, _SEED.value)
    image_key, text_key = "image", "text"
  else:
    source = sources.open_tfds_source(arg, _SOURCE_DATA_DIR.value or _DATA_DIR.value, _SPLIT.value,
                                      _IMAGE_KEY.value, _TEXT_KEY.value)
    image_key, text_key = _IMAGE_KEY.value, _TEXT_KEY.value
  mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 1})
  bundle = pretrained.load_pretrained(_PRETRAINED.value)
  path, written = cache.build_latent_cache(
      source, cache.encode_fn_from_bundle(bundle), mesh, bundle.tokenizer, data_dir=data_dir,
      name=_NAME.value, resolution=_RESOLUTION.value, batch_size=_BATCH.value, image_key=image_key,
      text_key=text_key, dtype=np.dtype(_CACHE_DTYPE.value), examples_per_shard=_SHARD.value,
      overwrite=_OVERWRITE.value, num_threads=_THREADS.value)
  return {"dataset": path, "layout": f"latent cache of {_SOURCE.value}", "written": written, "skipped": 0,
          "skipped_by_reason": {}, "skipped_files": [], "pretrained": _PRETRAINED.value,
          "resolution": _RESOLUTION.value}


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _DATA_DIR.value or not _NAME.value:
    raise app.UsageError("--data_dir and --name are required")
  # Imported after flag parsing so that --help stays fast.
  from perflow_jax.data import folder  # pylint: disable=g-import-not-at-top
  from perflow_jax.data import writer  # pylint: disable=g-import-not-at-top

  kind, arg = _parse_source(_SOURCE.value)
  if kind == "tfds" and not _CACHE.value:
    raise app.UsageError("--source=tfds:NAME is only for --cache_latents (a tfds dataset is already prepared)")
  if kind == "folder":
    arg = storage.local_copy(arg)  # images in a bucket: read from a local copy
  # A gs:// --data_dir: the dataset is built in a local folder and then uploaded, its report last (the array_record
  # writer writes local files only); see perflow_jax.storage.staged_folder.
  target = storage.absolute(_DATA_DIR.value)
  remote_dataset = writer.dataset_dir(target, _NAME.value) if storage.is_remote(target) else None
  replace = remote_dataset is not None and _check_remote_target(remote_dataset)
  with storage.staged_folder(target, last=(writer.REPORT_FILENAME,)) as build_dir:
    if _CACHE.value:
      report = _cache(kind, arg, build_dir)
      if report["dataset"] is None:  # not process 0: it helped encode, process 0 wrote
        return
    elif kind == "folder":
      report = folder.build_folder_dataset(
          arg, build_dir, _NAME.value, min_size=_MIN_SIZE.value, max_size=_MAX_SIZE.value,
          max_pixels=_MAX_PIXELS.value, caption_key=_CAPTION_KEY.value, split=_SPLIT.value,
          examples_per_shard=_SHARD.value, num_threads=_THREADS.value, overwrite=_OVERWRITE.value)
    else:
      report = writer.build_procedural_dataset(
          build_dir, _NAME.value, num_examples=_NUM_EXAMPLES.value, resolution=_RESOLUTION.value,
          seed=_SEED.value, split=_SPLIT.value, examples_per_shard=_SHARD.value, overwrite=_OVERWRITE.value)
    local_dataset = report["dataset"]
    report["dataset"] = storage.join(target, *os.path.relpath(local_dataset, build_dir).split(os.sep))
    storage.write_json(os.path.join(local_dataset, writer.REPORT_FILENAME), report)
    if replace:  # only now that the new build is complete; the upload follows
      storage.remove_tree(remote_dataset)
  print(folder.format_report(report))
  logging.info("report written to %s", storage.join(report["dataset"], writer.REPORT_FILENAME))


def _check_remote_target(dataset_dir: str) -> bool:
  """Whether a bucket's dataset folder exists and --overwrite replaces it; without --overwrite an existing one
  stops the run before the build."""
  if not storage.exists(dataset_dir):
    return False
  if not _OVERWRITE.value:
    raise app.UsageError(f"dataset {_NAME.value!r} already exists at {dataset_dir}; pass --overwrite to replace it "
                         "or choose another --name")
  return True


if __name__ == "__main__":
  from perflow_jax import cli as cli_lib  # pylint: disable=g-import-not-at-top
  cli_lib.run(main, output_flags=("data_dir",))
