"""Writing tensorflow-datasets datasets (array_record) without TensorFlow: image-caption sets and latent caches.

Datasets are written with ``tfds.core.SequentialWriter`` into ``<data_dir>/<name>/<version>/`` in shards of
``examples_per_shard`` examples, so large inputs never sit in memory and every finished shard is a complete file.
Images are stored encoded (JPEG/PNG bytes), which is also what keeps TensorFlow out: tfds only needs TF to
encode numpy images. The result reads back with ``tfds.data_source(name, data_dir=data_dir)`` or
``tfds.builder_from_directory(version_dir)``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from typing import Any, Iterable, Iterator

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


def write_dataset(data_dir: str, name: str, features: tfds.features.FeaturesDict, examples: Iterable[dict],
                  *, split: str = "train", version: str = DEFAULT_VERSION, description: str = "",
                  examples_per_shard: int = 1000, overwrite: bool = False) -> tuple[str, int]:
  """Writes ``examples`` (dicts matching ``features``) as one split; returns (version dir, number written).

  Raises ValueError when the dataset already exists and ``overwrite`` is False, or when a name is not a valid
  tfds dataset name (lower-case letters, digits and underscores).
  """
  if not name or not all(c.islower() or c.isdigit() or c == "_" for c in name) or not name[0].isalpha():
    raise ValueError(f"dataset name {name!r} must start with a letter and use only a-z, 0-9 and '_' "
                     "(tfds naming), e.g. --name=my_images")
  if examples_per_shard <= 0:
    raise ValueError(f"examples_per_shard must be positive, got {examples_per_shard}")
  out_dir = dataset_dir(data_dir, name, version)
  if os.path.exists(out_dir):
    if not overwrite:
      raise ValueError(f"dataset {name!r} version {version} already exists at {out_dir}; "
                       "pass --overwrite (overwrite=True) to replace it or choose another --name")
    # Stale shards of a larger earlier build would otherwise stay on disk next to the new ones.
    shutil.rmtree(out_dir)
  os.makedirs(out_dir)
  identity = tfds.core.dataset_info.DatasetIdentity(
      name=name, version=tfds.core.Version(version), data_dir=out_dir, module_name="perflow_jax.data")
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
  path, written = write_dataset(data_dir, name, image_features(with_labels=True),
                                procedural_examples(num_examples, resolution, seed), split=split,
                                description=description, examples_per_shard=examples_per_shard,
                                overwrite=overwrite)
  report = {"dataset": path, "layout": "procedural", "written": written, "skipped": 0, "skipped_by_reason": {},
            "skipped_files": []}
  with open(os.path.join(path, REPORT_FILENAME), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2)
  return report
