"""Random-access sources for grain: prepared tfds datasets, any tfds dataset, latent caches, procedural data.

Every tfds dataset is read through ``tfds`` data sources, which need the array_record file format. Catalog
datasets that were built in the (older, default) tfrecord format are converted to array_record once, next to
the original files; that step reads tfrecords and so needs TensorFlow, installed with ``pip install
perflow_jax[tf]``. Images are *not* decoded by tfds (``SkipDecoding``): the pipeline decodes them with PIL in
its workers, where it can also shrink JPEGs while decoding.
"""

from __future__ import annotations

import os
from typing import Any

from etils import epath
import tensorflow_datasets as tfds

from perflow_jax.data import procedural


def _nested(key: str, value: Any) -> dict[str, Any]:
  """'a/b' -> {'a': {'b': value}} (the shape tfds expects for decoders of nested features)."""
  out: Any = value
  for part in reversed(key.split("/")):
    out = {part: out}
  return out


def _has_feature(features: Any, key: str) -> bool:
  node = features
  for part in key.split("/"):
    try:
      node = node[part]
    except (KeyError, TypeError):
      return False
  return True


def _feature_keys(features: Any, prefix: str = "") -> list[str]:
  keys = []
  for k in features.keys():
    sub = features[k]
    if isinstance(sub, tfds.features.FeaturesDict):
      keys += _feature_keys(sub, f"{prefix}{k}/")
    else:
      keys.append(f"{prefix}{k}")
  return keys


def convert_to_array_record(builder: Any) -> None:
  """Adds array_record copies of a prepared tfrecord-format tfds dataset's shards, in place (needs TensorFlow).

  Each ``*.tfrecord-XXXXX-of-YYYYY`` shard is copied record for record (the serialized examples are the same
  bytes in both formats) to ``*.array_record-XXXXX-of-YYYYY``, written to a temporary name and renamed when
  complete; then array_record is listed in dataset_info.json as an alternative format, which
  ``builder.as_data_source`` picks. tfds' own converter needs Apache Beam; this needs only TensorFlow.
  """
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f"tfds dataset {builder.name!r} at {builder.data_dir} is stored as tfrecord, which grain cannot read "
        "directly; converting it to array_record needs TensorFlow: pip install 'perflow_jax[tf]' "
        "(or convert it elsewhere with `tfds convert_format --out_file_format=array_record`)") from e
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

  data_dir = epath.Path(builder.data_dir)
  shards = sorted(p for p in data_dir.iterdir() if ".tfrecord-" in p.name)
  if not shards:
    raise ValueError(f"tfds dataset {builder.name!r} at {data_dir} lists no array_record files and has no "
                     "tfrecord shards to convert; rebuild it.")
  for shard in shards:
    out = data_dir / shard.name.replace(".tfrecord-", ".array_record-")
    if out.exists():
      continue
    tmp = out.parent / (out.name + ".incomplete")
    writer = array_record_module.ArrayRecordWriter(os.fspath(tmp), "group_size:1")
    for record in tf.data.TFRecordDataset(os.fspath(shard)).as_numpy_iterator():
      writer.write(record)
    writer.close()
    tmp.rename(out)
  builder.info.add_alternative_file_format("array_record")
  builder.info.write_to_directory(data_dir)


def tfds_builder(name: str, data_dir: str | None):
  """The tfds builder of a *prepared* dataset; ValueError with the fix when it is missing or not prepared."""
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"tfds dataset {name!r} not found in data_dir {data_dir!r}: prepare it with "
                     "`python -m perflow_jax.prepare_data --data_dir=... --name=...` or `tfds build`, and set "
                     "config.data.name / config.data.data_dir to match") from e
  if not builder.info.splits:
    raise ValueError(f"tfds dataset {name!r} is not prepared in {builder.data_dir}; build it first "
                     "(`tfds build`, or `python -m perflow_jax.prepare_data`), nothing is downloaded here")
  return builder


def open_tfds_source(name: str, data_dir: str | None, split: str = "train",
                     image_key: str | None = "image", text_key: str | None = "text"):
  """A random-access source over a prepared tfds dataset; images stay encoded bytes.

  Checks that ``image_key`` / ``text_key`` (slash-separated for nested features; None to skip) exist, and that
  ``split`` does, before any data is read.
  """
  builder = tfds_builder(name, data_dir)
  if split.split("[")[0] not in builder.info.splits:
    raise ValueError(f"tfds dataset {name!r} has no split {split!r}; available: {list(builder.info.splits)} "
                     "(config.data.split)")
  features = builder.info.features
  for key, what in ((image_key, "image_key"), (text_key, "text_key")):
    if key is not None and not _has_feature(features, key):
      raise ValueError(f"tfds dataset {name!r} has no feature {key!r} (config.data.{what}); its features are "
                       f"{_feature_keys(features)}")
  random_access = tfds.core.file_adapters.FileFormat.with_random_access()
  if not builder.info.available_file_formats() & set(random_access):
    # Only tfrecord on disk (a catalog dataset built by `tfds build`): convert once; the converted files are
    # then listed as an alternative format in dataset_info.json and chosen by as_data_source.
    convert_to_array_record(builder)
    builder = tfds_builder(name, data_dir)
  decoders = _nested(image_key, tfds.decode.SkipDecoding()) if image_key else None
  return builder.as_data_source(split=split, decoders=decoders)


def open_cache_source(name: str, data_dir: str | None, split: str = "train"):
  """A random-access source over a latent cache written by ``perflow_jax.data.cache``."""
  builder = tfds_builder(name, data_dir)
  missing = [k for k in ("latent_mean", "latent_logvar", "context") if not _has_feature(builder.info.features, k)]
  if missing:
    raise ValueError(f"tfds dataset {name!r} is not a latent cache (missing {missing}); write one with "
                     "`python -m perflow_jax.prepare_data --cache_latents ...` or set config.data.source='tfds'")
  return builder.as_data_source(split=split)


def open_source(config_data: Any):
  """The source named by ``config.data``: 'tfds', 'cache' or 'procedural'."""
  source = config_data.source
  if source == "procedural":
    return procedural.ProceduralSource(config_data.procedural_size, config_data.resolution,
                                       config_data.procedural_seed)
  data_dir = os.path.expanduser(config_data.data_dir) if config_data.data_dir else None
  if not config_data.name:
    raise ValueError(f"config.data.name is empty; source {source!r} reads a tfds dataset by name")
  if source == "tfds":
    return open_tfds_source(config_data.name, data_dir, config_data.split, config_data.image_key,
                            config_data.text_key)
  if source == "cache":
    return open_cache_source(config_data.name, data_dir, config_data.split)
  raise ValueError(f"unknown config.data.source {source!r}; expected 'tfds', 'cache' or 'procedural'")
