r"""Speed benchmarks. ``--mode=data``: input-pipeline throughput (images/s) as the trainer sees it.

The data mode pulls global batches from ``make_train_iterator`` (decode, crop, flip, tokenize, batch, and the
transfer into sharded ``jax.Array``s) and reports images/s after a warm-up:
  python -m perflow_jax.benchmark --mode=data --data.source=procedural --data.resolution=256 \
      --data.batch_size=64 --data.worker_count=2 --out=/tmp/data_bench.json
  python -m perflow_jax.benchmark --mode=data --config=configs/tiny.py --config.data.worker_count=4

Without --config the data settings come from ``--data.*`` (fields of ``default_data_config()``); without
--tokenizer a tiny CLIP tokenizer is written to a temporary folder.
"""

from __future__ import annotations

import json
import tempfile
import time
from typing import Any, Sequence

from absl import app
from absl import flags
from ml_collections import config_flags

from perflow_jax.data import pipeline

_MODE = flags.DEFINE_enum("mode", "data", ["data"], "What to measure: data = input pipeline throughput.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file; its .data (and .mesh) are used.")
_DATA = config_flags.DEFINE_config_dict("data", pipeline.default_data_config(),
                                        "Data settings when no --config is given.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "CLIP tokenizer folder (default: a tiny one).")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 50, "Batches timed after the warm-up.")
_WARMUP = flags.DEFINE_integer("warmup_batches", 5, "Batches read before timing (worker start-up, caches).")
_OUT = flags.DEFINE_string("out", None, "Write the results as JSON here.")


def _mesh(config: Any):
  from perflow_jax.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top

  mesh_config = config.mesh if config is not None and "mesh" in config else {"data": -1, "fsdp": 1}
  return mesh_lib.make_mesh(mesh_config)


def run_data_benchmark(config_data: Any, mesh: Any, tokenizer: Any, *, num_batches: int,
                       warmup_batches: int) -> dict[str, Any]:
  """Times ``num_batches`` global batches after ``warmup_batches``; returns images/s and the settings."""
  import jax  # pylint: disable=g-import-not-at-top

  start = time.perf_counter()
  iterator = pipeline.make_train_iterator(config_data, mesh, tokenizer)
  jax.block_until_ready(next(iterator))
  first_batch_s = time.perf_counter() - start
  for _ in range(warmup_batches):
    jax.block_until_ready(next(iterator))
  start = time.perf_counter()
  for _ in range(num_batches):
    jax.block_until_ready(next(iterator))
  elapsed = time.perf_counter() - start
  batch_size = int(config_data.batch_size)
  return {
      "mode": "data",
      "images_per_s": num_batches * batch_size / elapsed,
      "batches_per_s": num_batches / elapsed,
      "first_batch_s": first_batch_s,
      "num_batches": num_batches,
      "batch_size": batch_size,
      "source": config_data.source,
      "name": config_data.name,
      "resolution": int(config_data.resolution),
      "worker_count": int(config_data.worker_count),
      "random_crop": bool(config_data.random_crop),
      "random_flip": bool(config_data.random_flip),
      "devices": jax.device_count(),
      "processes": jax.process_count(),
  }


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  config_data = config.data if config is not None else _DATA.value
  with tempfile.TemporaryDirectory() as tmp:
    from perflow_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top

    if config_data.source == "cache":
      tokenizer = None
    elif _TOKENIZER.value:
      tokenizer = tokenizer_lib.load_tokenizer(_TOKENIZER.value)
    else:
      tokenizer = tokenizer_lib.load_tokenizer(tokenizer_lib.write_tiny_clip_tokenizer(tmp))
    result = run_data_benchmark(config_data, _mesh(config), tokenizer, num_batches=_NUM_BATCHES.value,
                                warmup_batches=_WARMUP.value)
  print(json.dumps(result, indent=2))
  if _OUT.value:
    with open(_OUT.value, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  app.run(main)
