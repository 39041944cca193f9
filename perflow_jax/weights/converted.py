"""A converted model directory: Flax params as one orbax checkpoint, configs as JSON, tokenizer files.

Layout (written by `python -m perflow_jax.convert`, read by `load_pretrained`):

  DIR/perflow_pretrained.json   family, prediction_type, source and every component's diffusers config
  DIR/params/                   orbax checkpoint of {'unet', 'vae', 'text_encoder'[, 'text_encoder_2']: params}
  DIR/tokenizer/[, tokenizer_2/] the CLIP tokenizer files

Loading needs no renaming or transposing; orbax restores each leaf directly into its sharding.
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from perflow_jax import models
from perflow_jax import storage
from perflow_jax.weights import names, pretrained

PARAMS_DIR = "params"
FORMAT_VERSION = 1


def check_output_dir(out_dir: str) -> str:
  """Raises unless `out_dir` (a local path or a URL) is absent or empty; called before the long conversion, not
  after. Returns it absolute."""
  out_dir = storage.absolute(out_dir)
  if storage.exists(out_dir) and (not storage.isdir(out_dir) or storage.listdir(out_dir)):
    raise ValueError(f"output directory {out_dir} exists and is not empty; choose a new --out or empty it.")
  return out_dir


def save_converted(bundle: "pretrained.Pretrained", out_dir: str) -> str:
  """Writes `bundle` as a converted directory (a local path or a URL; it must not exist yet, or be empty).
  Returns its path."""
  out_dir = check_output_dir(out_dir)
  # The marker file is written last: a directory without it is an interrupted conversion, never loaded as one.
  with storage.staged_folder(out_dir, last=(pretrained.CONVERTED_MARKER,)) as local:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(local, PARAMS_DIR), bundle.params())
    checkpointer.wait_until_finished()
    checkpointer.close()
    for name in ("tokenizer", "tokenizer_2"):
      tok = getattr(bundle, name)
      if tok is not None:
        tok.save_pretrained(os.path.join(local, name))
    config = {k: v for k, v in bundle.config.items() if k not in ("tokenizer_dirs", "format")}
    config["format_version"] = FORMAT_VERSION
    config["param_dtype"] = str(jax.tree_util.tree_leaves(bundle.unet_params)[0].dtype)
    storage.write_text(os.path.join(local, pretrained.CONVERTED_MARKER), json.dumps(config, indent=2, sort_keys=True))
  return out_dir


def _target(abstract: Any, dtype: Any, shardings: Any) -> Any:
  """Plain ShapeDtypeStruct tree of `dtype` carrying each leaf's sharding (default device when None)."""
  plain = nn.meta.unbox(abstract)
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype, sharding=device), plain)
  return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, dtype, sharding=s), plain, shardings)


def load_converted(path: str, dtype: Any = jnp.float32, *, prediction_type: str | None = None,
                   shardings: pretrained.ShardingSpec = None, compute_dtype: Any = None,
                   precision: Any = None) -> "pretrained.Pretrained":
  """Reads a converted directory (see the module docstring); arguments as in `load_pretrained`."""
  path = os.path.abspath(path)
  with open(os.path.join(path, pretrained.CONVERTED_MARKER)) as f:
    config = json.load(f)
  if config.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{path} was written by an incompatible perflow_jax (format_version "
                     f"{config.get('format_version')}, expected {FORMAT_VERSION}); convert the source again.")
  compute_dtype = dtype if compute_dtype is None else compute_dtype
  comps = [c for c in ("unet", "vae", "text_encoder", "text_encoder_2") if c in config]
  modules, targets = {}, {}
  for comp in comps:
    modules[comp] = pretrained.build_module(comp, config[comp], dtype=compute_dtype, param_dtype=dtype,
                                            precision=precision)
    abstract = models.abstract_params(modules[comp])
    targets[comp] = _target(abstract, dtype, pretrained.resolve_shardings(shardings, comp, abstract))
  params_dir = os.path.join(path, PARAMS_DIR)
  if not os.path.isdir(params_dir):
    raise ValueError(f"{path} has no {PARAMS_DIR}/ checkpoint; the conversion did not finish. Convert again.")
  with ocp.StandardCheckpointer() as checkpointer:
    try:
      params = checkpointer.restore(params_dir, targets)
    except (ValueError, KeyError) as e:
      raise names.ConversionError(
          f"the checkpoint in {params_dir} does not match the configs in {pretrained.CONVERTED_MARKER}: {e}") from e
  if prediction_type is not None:
    if prediction_type not in pretrained.PREDICTION_TYPES:
      raise ValueError(f"prediction_type must be one of {pretrained.PREDICTION_TYPES}, got {prediction_type!r}.")
    config["prediction_type"] = prediction_type
    config["scheduler"] = dict(config.get("scheduler", {}), prediction_type=prediction_type)
  max_len = config["text_encoder"].get("max_position_embeddings", 77)
  fields: dict[str, Any] = {"tokenizer": pretrained.load_tokenizer(os.path.join(path, "tokenizer"), max_len)}
  if "text_encoder_2" in comps:
    fields["text_encoder_2"] = modules["text_encoder_2"]
    fields["text_params_2"] = params["text_encoder_2"]
    fields["tokenizer_2"] = pretrained.load_tokenizer(os.path.join(path, "tokenizer_2"), max_len)
  config.update(format="converted", source=path)
  return pretrained.Pretrained(unet=modules["unet"], unet_params=params["unet"], vae=modules["vae"],
                               vae_params=params["vae"], text_encoder=modules["text_encoder"],
                               text_params=params["text_encoder"], config=config, **fields)

