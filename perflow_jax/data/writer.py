"""Writing tensorflow-datasets datasets (array_record) without TensorFlow: image-caption sets and latent caches.

Datasets are written with ``tfds.core.SequentialWriter`` into ``<data_dir>/<name>/<version>/`` in shards of
``examples_per_shard`` examples, so large inputs never sit in memory and every finished shard is a complete file.
Images are stored encoded (JPEG/PNG bytes), which is also what keeps TensorFlow out: tfds only needs TF to
encode numpy images. The result reads back with ``tfds.data_source(name, data_dir=data_dir)`` or
``tfds.builder_from_directory(version_dir)``.

Builds are transactional: ``write_dataset`` writes into a hidden folder in ``data_dir``
(``.<name>-<version>.building-*``) and renames it to ``<data_dir>/<name>/<version>`` only when every example is
written (and the caller's ``finalize`` check passed). A failed build leaves nothing behind, so the rerun works; a
failed ``overwrite`` rebuild leaves the old dataset as it was.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from perflow_jax.data import procedural

DEFAULT_VERSION = "1.0.0"
REPORT_FILENAME = "prepare_report.json"


def image_features(with_labels: bool = False) -> tfds.features.FeaturesDict:
  """{'image': encoded RGB image, 'text': caption} (+ the procedural labels as ClassLabels)."""
  spec: dict[str, Any] = {
      "image": tfds.features.Image(shape=(None, None, 3)),
      "text": tfds.features.Text(),
  }
  if with_labels:
    for field in procedural.LABEL_FIELDS:
      spec[field] = tfds.features.ClassLabel(names=list(procedural.LABEL_NAMES[field]))
  return tfds.features.FeaturesDict(spec)


def latent_features(latent_shape: tuple[int, int, int], context_shape: tuple[int, int],
                    dtype: np.dtype = np.float32) -> tfds.features.FeaturesDict:
  """{'latent_mean', 'latent_logvar': [h,w,c], 'context': [77,D], 'text': caption} of a latent cache."""
  return tfds.features.FeaturesDict({
      "latent_mean": tfds.features.Tensor(shape=tuple(latent_shape), dtype=dtype),
      "latent_logvar": tfds.features.Tensor(shape=tuple(latent_shape), dtype=dtype),
      "context": tfds.features.Tensor(shape=tuple(context_shape), dtype=dtype),
      "text": tfds.features.Text(),
  })


def encode_png(image: np.ndarray) -> bytes:
  """uint8 [H,W,3] -> PNG bytes (lossless, so a procedural image reads back bit-exact)."""
  buf = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def dataset_dir(data_dir: str, name: str, version: str = DEFAULT_VERSION) -> str:
  """Where a dataset version lives: ``<data_dir>/<name>/<version>``."""
  return os.path.join(data_dir, name, version)


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
  chunk: list[Any] = []
  for item in items:
    chunk.append(item)
    if len(chunk) == size:
      yield chunk
      chunk = []
  if chunk:
    yield chunk


def _sibling(data_dir: str, name: str, version: str, kind: str) -> str:
  """A new empty hidden folder ``.<name>-<version>.<kind>-<random>`` in ``data_dir``: on the dataset's filesystem,
  so moving it into place is one rename. Made with the default permissions (not ``mkdtemp``'s 0700), since it
  becomes the dataset folder that trainers, maybe run by other users, read."""
  while True:
    path = os.path.join(data_dir, f".{name}-{version}.{kind}-{secrets.token_hex(4)}")
    try:
      os.mkdir(path)
      return path
    except FileExistsError:
      continue


def _commit(staging: str, out_dir: str, data_dir: str, name: str, version: str, overwrite: bool) -> None:
  """Moves the finished ``staging`` folder to ``out_dir``. An existing ``out_dir`` (``overwrite`` only) is renamed
  aside first and deleted once the new one is in place, or renamed back if the new one could not be moved."""
  os.makedirs(os.path.dirname(out_dir), exist_ok=True)
  if not os.path.exists(out_dir):
    os.rename(staging, out_dir)
    return
  if not overwrite:  # it appeared while this build ran
    raise ValueError(f"dataset {name!r} version {version} appeared at {out_dir} during this build; "
                     "pass --overwrite (overwrite=True) to replace it or choose another --name")
  old = _sibling(data_dir, name, version, "old")
  os.replace(out_dir, old)  # onto the empty folder just made: one rename
  try:
    os.rename(staging, out_dir)
  except BaseException:
    os.replace(old, out_dir)
    raise
  shutil.rmtree(old, ignore_errors=True)


def write_dataset(data_dir: str, name: str, features: tfds.features.FeaturesDict, examples: Iterable[dict],
                  *, split: str = "train", version: str = DEFAULT_VERSION, description: str = "",
                  examples_per_shard: int = 1000, overwrite: bool = False,
                  finalize: Callable[[str, int], None] | None = None) -> tuple[str, int]:
  """Writes ``examples`` (dicts matching ``features``) as one split; returns (version dir, number written).

  Transactional (see the module docstring): the shards go to a hidden folder in ``data_dir``; then
  ``finalize(that folder, number written)`` runs if given (to add files such as the report, or to raise and so
  reject the build); only then is the folder renamed to ``<data_dir>/<name>/<version>``, replacing an existing one
  when ``overwrite``. On any exception (from ``examples``, the writer or ``finalize``) the hidden folder is deleted
  and an existing dataset stays as it was. A killed process may leave a ``.<name>-<version>.building-*`` folder in
  ``data_dir``; it is safe to delete.

  Raises ValueError when the dataset already exists and ``overwrite`` is False (before anything is read or
  written), or when a name is not a valid tfds dataset name (lower-case letters, digits and underscores).
  """
  if not name or not all(c.islower() or c.isdigit() or c == "_" for c in name) or not name[0].isalpha():
    raise ValueError(f"dataset name {name!r} must start with a letter and use only a-z, 0-9 and '_' "
                     "(tfds naming), e.g. --name=my_images")
  if examples_per_shard <= 0:
    raise ValueError(f"examples_per_shard must be positive, got {examples_per_shard}")
  out_dir = dataset_dir(data_dir, name, version)
  if os.path.exists(out_dir) and not overwrite:
    raise ValueError(f"dataset {name!r} version {version} already exists at {out_dir}; "
                     "pass --overwrite (overwrite=True) to replace it or choose another --name")
  os.makedirs(data_dir, exist_ok=True)
  staging = _sibling(data_dir, name, version, "building")
  try:
    identity = tfds.core.dataset_info.DatasetIdentity(
        name=name, version=tfds.core.Version(version), data_dir=staging, module_name="perflow_jax.data")
    info = tfds.core.DatasetInfo(builder=identity, features=features, description=description)
    writer = tfds.core.SequentialWriter(info, max_examples_per_shard=examples_per_shard,
                                        file_format="array_record")
    writer.initialize_splits([split])
    count = 0
    # Small chunks: SequentialWriter serialises a whole list before writing, so this bounds memory.
    for chunk in _chunks(examples, 64):
      writer.add_examples({split: chunk})
      count += len(chunk)
    writer.close_all()
    if finalize is not None:
      finalize(staging, count)
    _commit(staging, out_dir, data_dir, name, version, overwrite)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return out_dir, count


def procedural_examples(num_examples: int, resolution: int, seed: int) -> Iterator[dict[str, Any]]:
  """Procedural examples in the ``image_features(with_labels=True)`` layout (PNG-encoded images)."""
  for index in range(num_examples):
    ex = procedural.example(seed, index, resolution)
    record = {"image": encode_png(ex["image"]), "text": ex["text"]}
    record.update(ex["label"])
    yield record


def build_procedural_dataset(data_dir: str, name: str, *, num_examples: int, resolution: int, seed: int = 0,
                             split: str = "train", examples_per_shard: int = 1000,
                             overwrite: bool = False) -> dict[str, Any]:
  """Writes ``num_examples`` procedural examples (with labels) as tfds dataset ``name``; returns a report."""
  if num_examples <= 0:
    raise ValueError(f"--num_examples must be positive, got {num_examples}")
  description = (f"Procedural shapes (perflow_jax.data.procedural), seed {seed}, {resolution}x{resolution}; "
                 f"labels: {', '.join(procedural.LABEL_FIELDS)}.")
  report: dict[str, Any] = {"dataset": dataset_dir(data_dir, name), "layout": "procedural"}

  def finalize(staging: str, written: int) -> None:  # the report is in place before the dataset is
    report.update(written=written, skipped=0, skipped_by_reason={}, skipped_files=[])
    with open(os.path.join(staging, REPORT_FILENAME), "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2)

  write_dataset(data_dir, name, image_features(with_labels=True), procedural_examples(num_examples, resolution, seed),
                split=split, description=description, examples_per_shard=examples_per_shard, overwrite=overwrite,
                finalize=finalize)
  return report
