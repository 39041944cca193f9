"""Shared by test_sample.py, test_export.py and test_torch_scheduler.py: ONE tiny trained run per test process,
and PyTorch twins (diffusers/transformers) of its components built from the exported weights."""

import functools
import os
import tempfile

import numpy as np
import torch

from perflow_jax import export
from perflow_jax import trainer
from perflow_jax.weights import export as wexport
import trainer_testutil

TRAIN_STEPS = 4
# The scheduler_config.json of runwayml/stable-diffusion-v1-5 (a PNDM config, as a pipeline would hand over).
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "trained_betas": None, "prediction_type": "epsilon"}


@functools.lru_cache(maxsize=None)
def trained_workdir() -> str:
  """A tiny PeRFlow run trained TRAIN_STEPS steps (a checkpoint at the end), kept for the whole test session."""
  workdir = os.path.join(tempfile.mkdtemp(prefix="perflow_sample_export_"), "run")
  config = trainer_testutil.tiny_config(TRAIN_STEPS)
  trainer.train(config, workdir)
  return workdir


@functools.lru_cache(maxsize=None)
def loaded_run(weights: str = "ema") -> export.Run:
  return export.load_run(trained_workdir(), weights)


def torch_unet(params, unet_module):
  """diffusers UNet2DConditionModel (float32, eval) holding `params` via the exported folder layout."""
  import diffusers  # pylint: disable=g-import-not-at-top
  folder = tempfile.mkdtemp(prefix="perflow_unet_")
  wexport.write_unet_folder(folder, unet_module, params, np.float32)
  return diffusers.UNet2DConditionModel.from_pretrained(folder).eval()


def torch_vae_and_text(run: export.Run):
  """(AutoencoderKL, CLIPTextModel, CLIPTokenizer) of the run, from its config dicts and exported weights."""
  import diffusers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  mc = run.config.model
  vae = diffusers.AutoencoderKL(**mc.vae.to_dict())
  vae.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in
                       wexport.export_vae_state_dict(run.models.vae_params, np.float32).items()}, strict=True)
  text_config = transformers.CLIPTextConfig(**{k: v for k, v in mc.text_encoder.to_dict().items()
                                               if k != "projection_dim"})
  text = transformers.CLIPTextModel(text_config)
  sd = {k: torch.from_numpy(np.array(v)) for k, v in
        wexport.export_text_state_dict(run.models.text_params, np.float32).items()}
  missing, unexpected = text.load_state_dict(sd, strict=False)
  assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
  tokenizer = transformers.CLIPTokenizer.from_pretrained(os.path.join(trained_workdir(), "tokenizer"))
  return vae.eval(), text.eval(), tokenizer
