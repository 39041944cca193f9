"""The training input pipeline: source -> grain (per-process shard, shuffle, epochs, decode, crop, flip,
tokenize, batch, worker prefetch) -> global ``jax.Array`` batches sharded over the mesh's ('data', 'fsdp') axes.

Batch structure (one per source kind, normalised here so the train step never branches on the source):
  image sources ('tfds', 'procedural'):
    {'images': float32 [B, R, R, 3] in [-1, 1] (NHWC), 'input_ids': int32 [B, 77]
     [, 'input_ids_2': int32 [B, 77] (SDXL: the second tokenizer's ids of the same captions)]}
  latent cache ('cache'):
    {'latent_mean': float32 [B, h, w, c], 'latent_logvar': float32 [B, h, w, c], 'context': float32 [B, 77, D]}
B is the global batch; each process reads ``B / process_count`` examples that no other process reads.

Iterator state: ``get_state()`` returns JSON bytes and ``set_state(bytes)`` restores them exactly (the next
batches are the same), so the iterator is saved in orbax checkpoints with
``grain.checkpoint.CheckpointSave(iterator)`` / ``grain.checkpoint.CheckpointRestore(iterator)``.
"""

from __future__ import annotations

import queue
import threading
import weakref
from typing import Any, Iterator

from absl import flags
import grain
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding

from perflow_jax.data import sources
from perflow_jax.parallel import sharding as sharding_lib
from perflow_jax.data import transforms



def default_data_config() -> ml_collections.ConfigDict:
  """``config.data`` fields with their defaults (a tiny procedural set: runs anywhere, downloads nothing)."""
  c = ml_collections.ConfigDict()
  c.source = "procedural"  # 'tfds' (prepared or catalog dataset), 'cache' (latent cache), 'procedural'
  c.name = ""  # tfds dataset name ('name', 'name/config', 'name:1.0.0'); unused by 'procedural'
  c.data_dir = ""  # tfds data_dir; '' = tfds' default (~/tensorflow_datasets or $TFDS_DATA_DIR)
  c.split = "train"
  c.image_key = "image"  # feature names; 'a/b' for nested features
  c.text_key = "text"
  c.resolution = 64  # training image side; images: resize short side to this, then crop
  c.random_crop = False  # False: center crop (SD/PeRFlow recipe); True: uniform random crop
  c.random_flip = False  # horizontal flip with probability 1/2 (image sources only)
  c.batch_size = 8  # global batch size, over all processes
  c.shuffle = True
  c.shuffle_seed = 0  # seeds shuffling and random crop/flip; 0 <= seed < 2**32
  c.num_epochs = -1  # -1: repeat forever
  c.worker_count = 0  # grain worker processes (0: decode in the main process)
  c.worker_buffer_size = 2  # batches each worker prefetches
  c.prefetch = 2  # global batches read and sent to the devices ahead of the step (0: read when the step asks)
  c.procedural_size = 1024  # number of examples of the 'procedural' source
  c.procedural_seed = 0
  return c


def check_data_config(config_data: Any) -> None:
  """Rejects unknown ``config.data`` fields (the trainer calls it before anything starts)."""
  unknown = set(config_data.keys()) - set(default_data_config().keys())
  if unknown:
    raise ValueError(f"unknown config.data fields {sorted(unknown)}; known fields are "
                     f"{sorted(default_data_config().keys())}")
  if config_data.source == "cache" and (config_data.random_flip or config_data.random_crop):
    raise ValueError("config.data.random_flip / random_crop apply to images, but a latent cache stores fixed "
                     "center crops; set them to False for source='cache' (or train from images)")
  if config_data.resolution < 8:
    raise ValueError(f"config.data.resolution must be >= 8, got {config_data.resolution}")
  if not 0 <= config_data.shuffle_seed < 2**32:
    raise ValueError(f"config.data.shuffle_seed must be in [0, 2**32), got {config_data.shuffle_seed}")
  if config_data.prefetch < 0:
    raise ValueError(f"config.data.prefetch={config_data.prefetch} must be >= 0 (batches read ahead; 0 = none)")


def make_operations(config_data: Any, tokenizer: Any, host_batch_size: int, tokenizer_2: Any = None) -> list[Any]:
  """The grain operations: normalise one example (see module docstring), then batch (dropping the remainder).

  ``tokenizer_2`` (SDXL) adds 'input_ids_2' to image examples.
  """
  if config_data.source == "cache":
    example = transforms.CacheExample()
  else:
    if tokenizer is None:
      raise ValueError(f"source {config_data.source!r} yields captions and needs a CLIP tokenizer; pass one "
                       "(perflow_jax.data.tokenizer.load_tokenizer(path))")
    example = transforms.ImageTextExample(image_key=config_data.image_key, text_key=config_data.text_key,
                                          resolution=config_data.resolution, tokenizer=tokenizer,
                                          random_crop=config_data.random_crop,
                                          random_flip=config_data.random_flip, tokenizer_2=tokenizer_2)
  return [example, grain.transforms.Batch(batch_size=host_batch_size, drop_remainder=True)]


def make_host_loader(config_data: Any, tokenizer: Any, *, batch_size: int, process_index: int,
                     process_count: int, seed: int | None = None, source: Any = None,
                     tokenizer_2: Any = None) -> grain.DataLoader:
  """A grain DataLoader yielding this process's numpy batches of ``batch_size / process_count`` examples.

  Process ``process_index`` of ``process_count`` reads a disjoint, equally sized slice of the dataset (the
  remainder that does not divide is dropped so every process runs the same number of steps). ``seed``
  overrides ``config_data.shuffle_seed``; ``source`` overrides the one ``config_data`` names; ``tokenizer_2``
  (SDXL) adds 'input_ids_2'.
  """
  check_data_config(config_data)
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(f"global batch size {batch_size} must be a positive multiple of the process count "
                     f"{process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} must be in [0, {process_count})")
  source = sources.open_source(config_data) if source is None else source
  host_batch = batch_size // process_count
  per_process = len(source) // process_count
  if per_process < host_batch:
    raise ValueError(f"dataset of {len(source)} examples gives each of {process_count} processes {per_process}, "
                     f"fewer than one batch of {host_batch}; use a smaller batch or a larger dataset")
  seed = config_data.shuffle_seed if seed is None else int(seed)
  shard = grain.sharding.ShardOptions(shard_index=process_index, shard_count=process_count,
                                      drop_remainder=True)
  num_epochs = None if config_data.num_epochs < 0 else int(config_data.num_epochs)
  sampler = grain.samplers.IndexSampler(num_records=len(source), shard_options=shard,
                                        shuffle=config_data.shuffle, num_epochs=num_epochs, seed=seed)
  if config_data.worker_count > 0 and not flags.FLAGS.is_parsed():
    # grain's worker processes read its absl flags; outside an absl app (tests, notebooks) nobody parsed them,
    # so accept their defaults instead of failing in the first worker.
    flags.FLAGS.mark_as_parsed()
  return grain.DataLoader(data_source=source, sampler=sampler,
                          operations=make_operations(config_data, tokenizer, host_batch, tokenizer_2),
                          worker_count=config_data.worker_count,
                          worker_buffer_size=config_data.worker_buffer_size)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The default batch sharding: the leading dimension over the mesh's ('data', 'fsdp') axes."""
  return sharding_lib.batch_sharding(mesh)


def to_global_batch(host_batch: dict[str, np.ndarray], sharding: NamedSharding,
                    process_count: int) -> dict[str, jax.Array]:
  """This process's numpy batch -> global jax.Arrays of ``process_count`` times the leading dimension."""
  out = {}
  for key, value in host_batch.items():
    global_shape = (value.shape[0] * process_count,) + value.shape[1:]
    out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
  return out


class GlobalBatchIterator:
  """Iterates global batches (dicts of jax.Array); its state is the grain iterator's (bytes, JSON).

  With ``prefetch`` > 0 a background thread keeps that many batches read and already transferred to the devices,
  so the next batch is on its way while the step runs. ``get_state()`` is always the position after the last batch
  *handed out* (each prefetched batch carries the state after it), so a checkpoint never skips the batches read
  ahead, and ``set_state`` followed by ``next`` reproduces the batches that followed the saved state. An error in
  the pipeline (a corrupt file, an exhausted dataset) surfaces from ``next`` as the pipeline raised it.
  """

  def __init__(self, loader: grain.DataLoader, sharding: NamedSharding, process_count: int, prefetch: int = 0):
    if prefetch < 0:
      raise ValueError(f"prefetch={prefetch}: the number of batches read ahead is >= 0.")
    self._loader = loader
    self._iterator = iter(loader)
    self._sharding = sharding
    self._process_count = process_count
    self._prefetch = int(prefetch)
    self._reader: _BatchReader | None = None
    self._state: bytes | None = None  # after the last batch handed out, while a reader runs

  def __iter__(self) -> Iterator[dict[str, jax.Array]]:
    return self

  def _reader_function(self):
    iterator, sharding, process_count = self._iterator, self._sharding, self._process_count  # not self: see below
    return lambda: to_global_batch(next(iterator), sharding, process_count)

  def __next__(self) -> dict[str, jax.Array]:
    if not self._prefetch:
      return self._reader_function()()
    if self._reader is None:
      self._state = self._iterator.get_state()
      self._reader = _BatchReader(self._reader_function(), self._iterator.get_state, self._prefetch)
      # The thread holds no reference to this object, so dropping the iterator stops its thread.
      weakref.finalize(self, self._reader.stop_soon)
    batch, self._state = self._reader.next()
    return batch

  def get_state(self) -> bytes:
    return self._iterator.get_state() if self._reader is None else self._state

  def set_state(self, state: bytes) -> None:
    self.close()
    self._iterator.set_state(state)

  def close(self) -> None:
    """Stops the read-ahead thread and drops what it read; the next ``next`` starts from ``get_state()``."""
    if self._reader is not None:
      self._reader.stop()
      self._reader = None
      self._iterator.set_state(self._state)

  def start_prefetch(self) -> None:
    """Called by grain's orbax handler after a restore; starts the worker processes early."""
    self._iterator.start_prefetch()


class _BatchReader:
  """A daemon thread that calls ``read`` ahead into a bounded queue of (batch, state after it) pairs.

  It references only the callables it was given (not the iterator that owns it), and stops when told or when
  ``read`` raises; the exception is queued and re-raised by ``next``.
  """

  _POLL_S = 0.1

  def __init__(self, read, get_state, size: int):
    self._queue: queue.Queue = queue.Queue(maxsize=size)
    self._stopped = threading.Event()
    self._thread = threading.Thread(target=self._run, args=(read, get_state), name="perflow-batch-reader",
                                    daemon=True)
    self._thread.start()

  def _put(self, item) -> bool:
    while not self._stopped.is_set():
      try:
        self._queue.put(item, timeout=self._POLL_S)
        return True
      except queue.Full:
        continue
    return False

  def _run(self, read, get_state) -> None:
    while True:
      try:
        item = (read(), get_state(), None)
      except BaseException as e:  # pylint: disable=broad-except  (StopIteration included: handed to the consumer)
        self._put((None, None, e))
        return
      if not self._put(item):
        return

  def next(self) -> tuple[dict[str, jax.Array], bytes]:
    batch, state, error = self._queue.get()
    if error is not None:
      self._queue.put((None, None, error))  # every later call raises it too, as a plain iterator would
      raise error
    return batch, state

  def stop_soon(self) -> None:
    """Tells the thread to stop without waiting for it (its last read finishes first)."""
    self._stopped.set()

  def stop(self) -> None:
    self._stopped.set()
    while self._thread.is_alive():
      try:
        self._queue.get(timeout=self._POLL_S)
      except queue.Empty:
        pass
    self._thread.join()


def check_batch_divides(batch_size: int, sharding: NamedSharding) -> None:
  """ValueError unless the global batch splits evenly over the devices of the batch axes."""
  spec = (sharding.spec[0] if len(sharding.spec) else None) or ()
  spec = (spec,) if isinstance(spec, str) else tuple(spec)
  shards = int(np.prod([sharding.mesh.shape[a] for a in spec])) if spec else 1
  if batch_size % shards:
    raise ValueError(f"global batch size {batch_size} must be a multiple of the {shards} devices over the mesh "
                     f"axes {spec} (config.data.batch_size)")


def make_train_iterator(config_data: Any, mesh: Mesh, tokenizer: Any, seed: int | None = None, *,
                        batch_size: int | None = None,
                        sharding: NamedSharding | None = None,
                        tokenizer_2: Any = None) -> GlobalBatchIterator:
  """The trainer's iterator of global batches (see the module docstring for their structure).

  Args:
    config_data: ``config.data`` (fields of ``default_data_config()``).
    mesh: the device mesh; the batch is sharded over its 'data' and 'fsdp' axes.
    tokenizer: a CLIPTokenizer (None is fine for source='cache').
    seed: shuffling/augmentation seed; None uses ``config_data.shuffle_seed``.
    batch_size: the global batch size; None uses ``config_data.batch_size``.
    sharding: the batch sharding (e.g. from the config's sharding rules); None shards the leading dimension
      over the mesh's ('data', 'fsdp') axes.
    tokenizer_2: SDXL's second tokenizer (batches then hold 'input_ids_2'); None for SD1.x / SD2.x.
  """
  batch_size = int(config_data.batch_size if batch_size is None else batch_size)
  sharding = batch_sharding(mesh) if sharding is None else sharding
  check_batch_divides(batch_size, sharding)
  loader = make_host_loader(config_data, tokenizer, batch_size=batch_size, process_index=jax.process_index(),
                            process_count=jax.process_count(), seed=seed, tokenizer_2=tokenizer_2)
  return GlobalBatchIterator(loader, sharding, jax.process_count(), prefetch=int(config_data.prefetch))
