"""What a training run's logs say about its speed: model FLOPs per step, per-device TFLOP/s, MFU against the
chip's bf16 peak, and where the loop's wall time went.

Model FLOPs (`model_flops_per_step`) count the work the method needs, not what the compiled program happens to
do: (solver_steps * g + 3) UNet forwards at the global batch, g = 2 for the 'guided' teacher (cond + uncond) and 1
for cfg_sync, 3 = the student's forward and backward; rematerialisation's extra forward is not model work, and the
VAE and text encoders (absent with a latent cache) are left out. One forward's FLOPs come from XLA's cost analysis
of the lowered UNet (`unet_forward_flops`): XLA counts a while loop's body once, so the whole step's own count would
miss the teacher's `fori_loop`.

MFU = achieved model FLOP/s per device / the device's dense bf16 peak (`peak_flops_per_device`). Chips outside the
table (CPUs among them) get TFLOP/s only.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp

# Dense bf16 peak FLOP/s of one JAX device (one chip), from the vendors' spec sheets, keyed by `device_kind`
# lower-cased. TPU kinds are matched exactly ("TPU v5" is v5p, "TPU v5 lite" is v5e).
TPU_PEAK_BF16_FLOPS = {
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12, "tpu v5e": 197e12,
    "tpu v5": 459e12, "tpu v5p": 459e12,
    "tpu v6 lite": 918e12, "tpu v6e": 918e12,
}
# GPU kinds carry the board in the name ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"): the first substring
# that matches wins, so the PCIe H100 comes before the SXM one.
GPU_PEAK_BF16_FLOPS = (
    ("h200", 989e12),
    ("h100 pcie", 756e12),
    ("h100", 989e12),
    ("a100", 312e12),
)


def peak_flops_per_device(device_kind: str) -> float | None:
  """Dense bf16 peak FLOP/s of one device of `device_kind` (jax.Device.device_kind); None for unknown chips."""
  kind = device_kind.strip().lower()
  if kind in TPU_PEAK_BF16_FLOPS:
    return TPU_PEAK_BF16_FLOPS[kind]
  for name, peak in GPU_PEAK_BF16_FLOPS:
    if name in kind:
      return peak
  return None


def unet_forward_flops(unet: Any, params: Any, latents: Any, context: Any) -> float:
  """XLA's FLOP count of one UNet forward, from the lowered (not compiled) program: only shapes are needed.

  Args:
    unet: the UNet module (its compute dtype is the one counted).
    params: its parameters, arrays or ShapeDtypeStructs.
    latents: [B, h, w, c] array or ShapeDtypeStruct.
    context: what `conditioning.apply_unet` takes at batch B: [B, 77, D], or SDXL's dict.
  Returns:
    FLOPs, or 0.0 where the backend offers no cost analysis.
  """
  from perflow_jax import conditioning  # pylint: disable=g-import-not-at-top  (conditioning imports models)

  abstract = lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))
  timesteps = jax.ShapeDtypeStruct((jnp.shape(latents)[0],), jnp.float32)
  lowered = jax.jit(lambda p, z, t, c: conditioning.apply_unet(unet, p, z, t, c)).lower(
      jax.tree.map(abstract, params), abstract(latents), timesteps, jax.tree.map(abstract, context))
  cost = lowered.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
    cost = cost[0] if cost else None
  return float(cost.get("flops", 0.0)) if cost else 0.0


def model_flops_per_step(config: Any, forward_flops: float) -> float:
  """(solver_steps * g + 3) UNet forwards for PeRFlow (module docstring); 3 for the diffusion objective."""
  pf = config.perflow
  if config.objective != "perflow":
    return 3.0 * forward_flops
  guidance_factor = 2 if pf.teacher_guidance == "guided" else 1
  return (int(pf.solver_steps) * guidance_factor + 3) * forward_flops


def step_scalars(flops_per_step: float, seconds_per_step: float, num_devices: int,
                 peak_per_device: float | None) -> dict[str, float]:
  """The logged speed of one step: perf/step_s, perf/tflops_per_device and, for a known chip, perf/mfu."""
  out = {"perf/step_s": seconds_per_step}
  if seconds_per_step <= 0 or flops_per_step <= 0:
    return out
  per_device = flops_per_step / seconds_per_step / num_devices
  out["perf/tflops_per_device"] = per_device / 1e12
  if peak_per_device:
    out["perf/mfu"] = per_device / peak_per_device
  return out


class LoopTimer:
  """Splits the training loop's wall time by activity.

  data_wait: blocked in the input pipeline; checkpoint: the blocking part of a save (orbax writes in the
  background); sample: periodic samples. Everything else is the step: dispatching it and waiting for it, which with
  asynchronous dispatch happens wherever the loop first needs a result (the logged metrics), so the loop blocks on
  the step before it times a checkpoint or a sample (`wait_for`).
  """

  ACTIVITIES = ("data_wait", "checkpoint", "sample")

  def __init__(self, compile_s: float, clock: Callable[[], float] = time.perf_counter):
    self._clock = clock
    self._compile_s = compile_s
    self._lap_start = clock()
    self._lap = dict.fromkeys(self.ACTIVITIES, 0.0)
    self._totals = dict.fromkeys(("step",) + self.ACTIVITIES, 0.0)

  @contextlib.contextmanager
  def timing(self, activity: str, wait_for: Any = None) -> Iterator[None]:
    """Times the body as `activity`; `wait_for` (arrays of the running step) is waited on first, as step time."""
    if wait_for is not None:
      jax.block_until_ready(wait_for)
    start = self._clock()
    try:
      yield
    finally:
      self._lap[activity] += self._clock() - start

  def lap(self) -> dict[str, float]:
    """Seconds of each activity since the previous lap, 'step' the rest of the wall time; adds them to the totals."""
    now = self._clock()
    lap = dict(self._lap)
    lap["step"] = max(0.0, now - self._lap_start - sum(lap.values()))
    for name, seconds in lap.items():
      self._totals[name] += seconds
    self._lap_start, self._lap = now, dict.fromkeys(self.ACTIVITIES, 0.0)
    return lap

  def total_scalars(self) -> dict[str, float]:
    """Cumulative seconds since this start, as logged: time/compile_s, time/step_s, time/data_wait_s, ..."""
    return {"time/compile_s": self._compile_s, **{f"time/{k}_s": v for k, v in self._totals.items()}}
