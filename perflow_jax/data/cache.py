"""The latent cache: VAE moments and text embeddings computed once, so training skips both encoders.

``build_latent_cache`` runs an encode function over every example of an image source (center crop at the
training resolution, no flip), batch by batch as global arrays sharded over the mesh, and writes a tfds
dataset (array_record) with, per example:
  'latent_mean', 'latent_logvar': [h, w, c]  the VAE posterior (logvar as the VAE returns it, clipped)
  'context': [77, D]                          the text encoder's last hidden state
  'text': the caption
Training reads it with ``config.data.source = 'cache'`` and draws a fresh latent every step from the stored
moments with ``perflow_jax.models.vae.sample_latents`` (PeRFlow samples the posterior, not its mean).

The encoders are a small interface: any ``encode_fn(images [B,H,W,3] f32 in [-1,1], input_ids [B,77] int32)
-> (mean, logvar, context)``; ``encode_fn_from_bundle`` makes one from ``perflow_jax.weights.load_pretrained``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
from typing import Any, Callable, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from perflow_jax.data import pipeline
from perflow_jax.data import transforms
from perflow_jax.data import writer

EncodeFn = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array, jax.Array]]


def encode_fn_from_bundle(bundle: Any) -> EncodeFn:
  """A jitted ``encode_fn`` from a pretrained bundle (``vae``, ``vae_params``, ``text_encoder``, ``text_params``).

  Parameters are passed as jit arguments (not closed over), so they stay where the bundle placed them and are
  never baked into the program as constants.
  """
  if getattr(bundle, "text_encoder_2", None) is not None:
    raise ValueError("the latent cache stores one text encoder's context (SD1.x / SD2.x); this bundle has two "
                     "(SDXL), whose pooled embeddings and time ids it cannot hold: train SDXL from images")
  vae, text_encoder = bundle.vae, bundle.text_encoder

  @jax.jit
  def encode(vae_params, text_params, images, input_ids):
    mean, logvar = vae.apply({"params": vae_params}, images, method=vae.encode)
    context = text_encoder.apply({"params": text_params}, input_ids)
    if isinstance(context, (tuple, list)):
      context = context[0]  # (last_hidden_state, ...) when the encoder also returns pooled outputs
    return mean, logvar, context

  return lambda images, input_ids: encode(bundle.vae_params, bundle.text_params, images, input_ids)


def process_rows(sharding: NamedSharding, global_batch: int) -> np.ndarray:
  """Global batch rows that this process's devices hold, in the order its local data must list them.

  ``make_array_from_process_local_data`` fills those rows from the process's local rows in increasing order;
  they are one contiguous block per process on usual meshes, but nothing here relies on that.
  """
  index_map = sharding.addressable_devices_indices_map((global_batch,))
  rows: set[int] = set()
  for index in index_map.values():
    rows.update(range(*index[0].indices(global_batch)))
  return np.array(sorted(rows), np.int64)


def _encoded_batches(source: Any, encode_fn: EncodeFn, mesh: Mesh, example_fn: Any, text_key: str,
                     global_batch: int, num_threads: int) -> Iterator[tuple[np.ndarray, ...]]:
  """(mean, logvar, context, texts) numpy batches over the whole source, in order, padding rows removed."""
  sharding = pipeline.batch_sharding(mesh)
  process_index, process_count = jax.process_index(), jax.process_count()
  num_examples = len(source)
  num_batches = -(-num_examples // global_batch)
  my_rows = process_rows(sharding, global_batch)

  def load(index: int) -> tuple[dict[str, np.ndarray], str]:
    record = source[int(index)]
    return example_fn.random_map(record, None), transforms.caption_text(transforms.get_path(record, text_key))

  with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
    for b in range(num_batches):
      # The last batch is padded by repeating the final example; its extra rows are dropped below.
      indices = np.minimum(b * global_batch + my_rows, num_examples - 1)
      rows = list(pool.map(load, indices))
      host = {"images": np.stack([r[0]["images"] for r in rows]),
              "input_ids": np.stack([r[0]["input_ids"] for r in rows])}
      batch = pipeline.to_global_batch(host, sharding, process_count)
      outputs = encode_fn(batch["images"], batch["input_ids"])
      # Process 0 writes, so it needs whole batches: gather the global arrays (row r = example b * B + r).
      outputs = [np.asarray(multihost_utils.process_allgather(o, tiled=True)) for o in outputs]
      keep = min(global_batch, num_examples - b * global_batch)
      if process_count == 1:
        captions = [text for _, text in rows]
      elif process_index == 0:
        # Other processes' captions: process 0 re-reads them from the source (cheaper than gathering strings).
        captions = [transforms.caption_text(transforms.get_path(source[b * global_batch + r], text_key))
                    for r in range(keep)]
      else:
        captions = [""] * keep  # not written on this process
      yield tuple(o[:keep] for o in outputs) + (captions[:keep],)


def build_latent_cache(source: Any, encode_fn: EncodeFn, mesh: Mesh, tokenizer: Any, *, data_dir: str,
                       name: str, resolution: int, batch_size: int, image_key: str = "image",
                       text_key: str = "text", dtype: Any = np.float32, examples_per_shard: int = 1000,
                       overwrite: bool = False, num_threads: int = 4) -> tuple[str | None, int]:
  """Encodes every example of ``source`` and writes the cache dataset ``name`` into ``data_dir``.

  Args:
    source: random-access image source (``sources.open_tfds_source`` or ``procedural.ProceduralSource``).
    encode_fn: ``(images, input_ids) -> (mean, logvar, context)`` on global arrays (jit it; see
      ``encode_fn_from_bundle``).
    mesh: the batch of each call is sharded over its ('data', 'fsdp') axes.
    tokenizer: the CLIP tokenizer of the text encoder.
    resolution: image side fed to the VAE (short-side resize, center crop).
    batch_size: global batch per encode call; a multiple of the batch-axis devices and of the process count.
    dtype: storage dtype of the moments and context (float32, or float16 to halve the size).

  Returns:
    (dataset directory, examples written); the directory is None on processes other than 0, which only help
    to encode.
  """
  sharding = pipeline.batch_sharding(mesh)
  pipeline.check_batch_divides(batch_size, sharding)
  if batch_size % jax.process_count():
    raise ValueError(f"cache batch_size {batch_size} must be a multiple of the process count {jax.process_count()}")
  if len(source) == 0:
    raise ValueError("the source to cache is empty")
  example_fn = transforms.ImageTextExample(image_key=image_key, text_key=text_key, resolution=resolution,
                                           tokenizer=tokenizer)
  batches = _encoded_batches(source, encode_fn, mesh, example_fn, text_key, batch_size, num_threads)
  first = next(batches)
  mean, _, context, _ = first
  dtype = np.dtype(dtype)

  def examples() -> Iterator[dict[str, Any]]:
    for m, lv, ctx, caps in itertools.chain([first], batches):
      for i in range(len(caps)):
        yield {"latent_mean": m[i].astype(dtype), "latent_logvar": lv[i].astype(dtype),
               "context": ctx[i].astype(dtype), "text": caps[i]}

  if jax.process_index() != 0:
    collections.deque(examples(), maxlen=0)  # drain: keep taking part in the collectives of every batch
    return None, len(source)
  features = writer.latent_features(mean.shape[1:], context.shape[1:], dtype)
  description = (f"Latent cache at resolution {resolution}: VAE posterior mean/logvar and text-encoder "
                 "context per example (perflow_jax.data.cache).")
  return writer.write_dataset(data_dir, name, features, examples(), description=description,
                              examples_per_shard=examples_per_shard, overwrite=overwrite)
