"""Shared helpers of the trainer tests: the tiny config at a given mesh and length, and the logged losses."""

import os

from configs import tiny
from perflow_jax import metrics
from perflow_jax import trainer
from perflow_jax.demo import build_teacher
from perflow_jax.parallel import mesh as mesh_lib
from perflow_jax.weights import export as wexport


def tiny_config(total_steps: int, data: int = 8, fsdp: int = 1, checkpoint_every: int | None = None):
  """configs/tiny.py logging every step, on a (data, fsdp) mesh, checkpointing at the end (or as given)."""
  config = tiny.get_config()
  config.total_steps = total_steps
  config.log_every = 1
  config.checkpoint_every = checkpoint_every or total_steps
  config.mesh.data, config.mesh.fsdp = data, fsdp
  return config


def losses(workdir: str) -> dict[int, float]:
  """{step: loss} from the run's metrics.jsonl."""
  return {r["step"]: r["loss"] for r in metrics.read_metrics(workdir)}


def write_tiny_teacher(root: str) -> str:
  """The tiny config's random initialisation written as a diffusers folder, ``root/teacher``: a teacher as a pod has
  it (`config.model.pretrained`), which trains exactly as the random initialisation does. Returns the folder."""
  config = tiny.get_config()
  scratch = os.path.join(root, "scratch")
  m = trainer.load_models(config, scratch, mesh_lib.make_mesh({"data": -1, "fsdp": 1}))
  folder = os.path.join(root, "teacher")
  wexport.write_pipeline_folder(
      folder, {"unet": m.unet, "vae": m.vae, "text_encoder": m.text_encoder},
      {"unet": m.unet_params, "vae": m.vae_params, "text_encoder": m.text_params},
      tokenizer_dirs={"tokenizer": os.path.join(scratch, "tokenizer")}, scheduler_config=build_teacher.SCHEDULER_CONFIG)
  return folder
