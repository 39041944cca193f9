r"""Converts a PyTorch Stable Diffusion checkpoint into a perflow_jax directory that loads without conversion.

  python -m perflow_jax.convert --src=PATH --out=DIR [--prediction_type=v_prediction] [--allow_pickle] \
      [--tokenizer=PATH] [--config_path=DIFFUSERS_DIR] [--extract_ema] [--dtype=float32|bfloat16]

--src is a diffusers-layout folder or a single-file checkpoint (.safetensors; .ckpt with --allow_pickle). DIR gets
an orbax checkpoint of every component's Flax params, each component's config as JSON and the tokenizer files;
`perflow_jax.weights.load_pretrained(DIR)` reads it back straight into the requested shardings.

Exit status: 0 when written; 2 for a user error (a bad flag, a missing or unreadable --src, a pickle without
--allow_pickle, a non-empty --out, a full disk), reported in one message without a traceback (--verbosity=1 or
PERFLOW_JAX_TRACEBACK=1 adds it; see perflow_jax.cli); anything else is a bug, with its traceback.
"""

from __future__ import annotations

import time
from typing import Sequence

from absl import app
from absl import flags
from absl import logging
import jax.numpy as jnp

from perflow_jax import cli as cli_lib
from perflow_jax.weights import converted, pretrained

_SRC = flags.DEFINE_string("src", None, "Diffusers folder or single-file checkpoint to convert.", required=True)
_OUT = flags.DEFINE_string("out", None, "Output directory (must not exist or be empty).", required=True)
_PREDICTION_TYPE = flags.DEFINE_enum(
    "prediction_type", None, list(pretrained.PREDICTION_TYPES),
    "What the UNet predicts. Required for SD2 single files (they do not record it); overrides the scheduler config.")
_ALLOW_PICKLE = flags.DEFINE_bool("allow_pickle", False,
                                  "Allow pickle-based .ckpt/.bin files (they can run code; safetensors is preferred).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None,
                                 "Single files: tokenizer folder, or a diffusers folder with tokenizer/[tokenizer_2/].")
_CONFIG_PATH = flags.DEFINE_string(
    "config_path", None, "Single files: diffusers folder whose component configs describe the model (default: the "
    "published SD1.5/SD2.1/SDXL configs of the detected family).")
_EXTRACT_EMA = flags.DEFINE_bool("extract_ema", False, "Single files: take the UNet from its EMA copy (model_ema.).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Dtype of the stored parameters.")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  converted.check_output_dir(_OUT.value)
  start = time.perf_counter()
  bundle = pretrained.load_pretrained(
      _SRC.value, dtype=jnp.dtype(_DTYPE.value), prediction_type=_PREDICTION_TYPE.value,
      allow_pickle=_ALLOW_PICKLE.value, tokenizer_path=_TOKENIZER.value, config_path=_CONFIG_PATH.value,
      extract_ema=_EXTRACT_EMA.value)
  loaded = time.perf_counter()
  out = converted.save_converted(bundle, _OUT.value)
  logging.info("Converted %s (%s, %s, %s) in %.1f s (load %.1f s, save %.1f s) -> %s", _SRC.value,
               bundle.config["family"], bundle.config["format"], bundle.config["prediction_type"],
               time.perf_counter() - start, loaded - start, time.perf_counter() - loaded, out)
  print(f"wrote {out}")


if __name__ == "__main__":
  cli_lib.run(main, output_flags=("out",))
