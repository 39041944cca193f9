"""Shared helpers of the trainer tests: the tiny config at a given mesh and length, and the logged losses."""

from configs import tiny
from perflow_jax import metrics


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
