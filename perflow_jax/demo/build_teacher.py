r"""Builds the demo teacher from nothing, on a CPU: autoencoder -> diffusion-trained UNet -> a diffusers folder.

  python -m perflow_jax.demo.build_teacher --workdir=/tmp/demo_teacher_build --out=assets/demo/teacher

This is the command that produced the committed `assets/demo/teacher`. Stages, each skipped when its output
exists, so an interrupted build continues where it stopped (the UNet training resumes from its checkpoint):
  1. `workdir/init`: the autoencoder (`autoencoder.train_autoencoder`), a random UNet and text encoder, the tiny
     procedural tokenizer and SD's DDPM schedule, as a diffusers folder;
  2. `workdir/teacher_run`: the UNet trained with the standard diffusion objective through the framework's own
     trainer (`recipes.teacher_config`, i.e. configs/demo_teacher.py);
  3. `out`: the same folder with the run's EMA UNet, plus `build_info.json` (what was measured on the way).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from perflow_jax import export as export_lib
from perflow_jax import metrics
from perflow_jax import trainer
from perflow_jax.data import tokenizer as tokenization
from perflow_jax.demo import autoencoder
from perflow_jax.demo import recipes
from perflow_jax.weights import defaults
from perflow_jax.weights import export as wexport
from perflow_jax.weights import pretrained as pretrained_lib

# SD's DDPM schedule (scaled_linear 0.00085..0.012, 1000 steps) read by DDIM with SD's settings.
SCHEDULER_CONFIG: dict[str, Any] = dict(defaults.family_configs("sd2")["scheduler"], prediction_type="epsilon")
BUILD_INFO = "build_info.json"


def write_init_folder(folder: str, *, ae_steps: int, seed: int) -> dict[str, Any]:
  """Stage 1: trains the autoencoder and writes it with a random UNet and text encoder as a diffusers folder."""
  vae, vae_params, stats = autoencoder.train_autoencoder(steps=ae_steps, seed=seed, resolution=recipes.RESOLUTION)
  logging.info("Autoencoder: %s", stats)
  modules = {"unet": pretrained_lib.build_module("unet", recipes.DEMO_UNET_CONFIG),
             "vae": vae,
             "text_encoder": pretrained_lib.build_module("text_encoder", recipes.DEMO_TEXT_CONFIG)}
  key = jax.random.key(seed)
  params = {"vae": vae_params}
  for i, name in enumerate(("unet", "text_encoder")):
    module = modules[name]
    params[name] = module.init(jax.random.fold_in(key, i), *module.dummy_inputs(1))["params"]
  tmp = folder + ".partial"
  tokenizer_dir = tokenization.write_tiny_clip_tokenizer(tempfile.mkdtemp(prefix="demo_tokenizer_"))
  wexport.write_pipeline_folder(tmp, modules, params, tokenizer_dirs={"tokenizer": tokenizer_dir},
                                scheduler_config=SCHEDULER_CONFIG)
  with open(os.path.join(tmp, "autoencoder_stats.json"), "w", encoding="utf-8") as f:
    json.dump(stats, f, indent=2)
  os.replace(tmp, folder)  # the stage is done only when the whole folder is there
  return stats


def write_teacher_folder(run_dir: str, init_folder: str, out: str, dtype: Any) -> None:
  """Stage 3: the run's EMA UNet with the init folder's autoencoder, text encoder, tokenizer and scheduler."""
  run = export_lib.load_run(run_dir, "ema")
  m = run.models
  wexport.write_pipeline_folder(
      out, {"unet": m.unet, "vae": m.vae, "text_encoder": m.text_encoder},
      {"unet": run.params, "vae": m.vae_params, "text_encoder": m.text_params},
      tokenizer_dirs={"tokenizer": os.path.join(init_folder, "tokenizer")}, scheduler_config=SCHEDULER_CONFIG,
      dtype=dtype)


def build(workdir: str, out: str, *, ae_steps: int = 1000, teacher_steps: int | None = None, seed: int = 0,
          dtype: Any = np.float32) -> dict[str, Any]:
  """Runs the stages that are not done yet; returns the build info written to `out/build_info.json`."""
  t0 = time.perf_counter()
  init_folder = os.path.join(workdir, "init")
  if not os.path.isdir(init_folder):
    write_init_folder(init_folder, ae_steps=ae_steps, seed=seed)
  with open(os.path.join(init_folder, "autoencoder_stats.json"), encoding="utf-8") as f:
    ae_stats = json.load(f)

  config = recipes.teacher_config(init_folder)
  if teacher_steps is not None:
    config.total_steps = int(teacher_steps)
    config.log_every = min(int(config.log_every), config.total_steps)
    config.checkpoint_every = min(int(config.checkpoint_every), config.total_steps)
  run_dir = os.path.join(workdir, "teacher_run")
  last = trainer.train(config, run_dir)
  write_teacher_folder(run_dir, init_folder, out, dtype)
  losses = [r["loss"] for r in metrics.read_metrics(run_dir) if "loss" in r]
  info = {
      "command": "python -m perflow_jax.demo.build_teacher --workdir=WORKDIR --out=" + out,
      "autoencoder": ae_stats,
      "teacher": {"steps": int(config.total_steps), "batch_size": int(config.data.batch_size),
                  "first_losses": losses[:3], "last_losses": losses[-3:], "compile_s": last.get("compile_s")},
      "build_s_this_invocation": time.perf_counter() - t0,
      "storage_dtype": np.dtype(dtype).name,
  }
  with open(os.path.join(out, BUILD_INFO), "w", encoding="utf-8") as f:
    json.dump(info, f, indent=2)
  return info


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("workdir", None, "Scratch folder for the stages (resumable).", flag_values=fv)
  flags.DEFINE_string("out", recipes.TEACHER_DIR, "Where the finished teacher folder goes.", flag_values=fv)
  flags.DEFINE_integer("ae_steps", 1000, "Autoencoder training steps.", flag_values=fv)
  flags.DEFINE_integer("teacher_steps", None, "UNet training steps (default: the recipe's).", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Seed of the autoencoder data and the random inits.", flag_values=fv)
  flags.DEFINE_enum("dtype", "float32", ["float32", "float16"], "Storage dtype of the written weights.",
                    flag_values=fv)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  fv = flags.FLAGS
  if not fv.workdir:
    raise app.UsageError("--workdir is required (a scratch folder; rerun with the same one to resume).")
  info = build(fv.workdir, fv.out, ae_steps=fv.ae_steps, teacher_steps=fv.teacher_steps, seed=fv.seed,
               dtype=np.dtype(fv.dtype))
  print(json.dumps(info, indent=2))


if __name__ == "__main__":
  define_flags(flags.FLAGS)
  app.run(main)
