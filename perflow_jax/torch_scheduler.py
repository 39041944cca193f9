"""A PeRFlow scheduler for diffusers pipelines (PyTorch), so exported PeRFlow UNets run in StableDiffusionPipeline.

Needs the torch extra (`pip install perflow_jax[torch]`); nothing else in perflow_jax imports this module.

  pipe.unet = UNet2DConditionModel.from_pretrained(exported_unet_dir)      # python -m perflow_jax.export
  pipe.scheduler = PeRFlowTorchScheduler.from_config(pipe.scheduler.config, prediction_type="diff_eps",
                                                     num_time_windows=4)
  image = pipe(prompt, num_inference_steps=4, guidance_scale=4.5).images[0]

The mathematics is that of `perflow_jax.flow.scheduler.PeRFlowScheduler` (reference sections 4.1 and 4.2): the
schedule in float32 exactly as diffusers builds it (betas, alphas, alphas_cumprod, final_alpha_cumprod; linear,
scaled_linear, squaredcos_cap_v2 or trained_betas), the window coefficients in float64 from it, the update in
torch float32, so the two agree on the same noise. Timesteps are the integers 1000 t; K windows of [0, 1];
N >= K steps. It follows diffusers' scheduler conventions (config save/load, `from_config` from any Karras
scheduler's config, `scale_model_input`, `add_noise`, `step` with return_dict).

Where it deliberately differs from the reference's PeRFlowScheduler:
- N < K raises; the reference prints a note and silently runs K steps.
- `add_noise` at timestep 0 reads alphas_cumprod[0]; the reference's index 0 - 1 = -1 wraps to the noisiest
  entry.
- `step` computes in float32 and casts the result back to the sample's dtype; the reference computes in the
  sample's dtype (float16 pipelines step in float16 there).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

import numpy as np

try:
  import torch
  from diffusers.configuration_utils import ConfigMixin, register_to_config
  from diffusers.schedulers.scheduling_ddim import betas_for_alpha_bar
  from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
  from diffusers.utils import BaseOutput
except ImportError as e:  # the optional extra is missing
  raise ImportError(f"perflow_jax.torch_scheduler needs PyTorch and diffusers ({e}); install them with "
                    "`pip install perflow_jax[torch]`.") from e

PREDICTION_TYPES = ("diff_eps", "ddim_eps", "velocity")
# A timestep within 0.1 / 1000 above a window boundary belongs to the window starting there (as the reference).
_BOUNDARY_TOL = 1e-4


@dataclasses.dataclass
class PeRFlowSchedulerOutput(BaseOutput):
  """`prev_sample`: [B, C, H, W] latents at the next timestep; `pred_original_sample` is None (no x0 preview)."""
  prev_sample: torch.Tensor
  pred_original_sample: Optional[torch.Tensor] = None


BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def _betas(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str,
           trained_betas: Any) -> torch.Tensor:
  """[n] float32 betas, computed as diffusers' schedulers (and the reference's PeRFlowScheduler) compute them."""
  if trained_betas is not None:
    betas = torch.tensor(np.asarray(trained_betas, np.float64), dtype=torch.float32)
    if betas.ndim != 1 or betas.shape[0] != num_train_timesteps:
      raise ValueError(f"trained_betas has shape {tuple(betas.shape)}; it must hold num_train_timesteps="
                       f"{num_train_timesteps} values (one beta per training timestep).")
    if not bool(torch.all((betas > 0) & (betas < 1))):
      raise ValueError("trained_betas must lie in (0, 1): each is the noise variance added at one timestep.")
    return betas
  if beta_schedule == "linear":
    return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
  if beta_schedule == "scaled_linear":  # Stable Diffusion's
    return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float32) ** 2
  if beta_schedule == "squaredcos_cap_v2":  # the cosine (Glide) schedule
    return betas_for_alpha_bar(num_train_timesteps)
  raise ValueError(f"beta_schedule={beta_schedule!r} is not one of {BETA_SCHEDULES}; or pass trained_betas.")


def window_coefficients(ab_start: float, ab_end: float, prediction_type: str) -> tuple[float, float]:
  """(lam, eta) with z_end = lam z_start + eta eps for an eps type (reference 3.1); float64."""
  if prediction_type == "diff_eps":
    gamma = np.sqrt(ab_start / ab_end)
    return 1.0 / gamma, -np.sqrt(1.0 - gamma ** 2) / gamma
  return np.sqrt(ab_end / ab_start), np.sqrt(1.0 - ab_end) - np.sqrt(ab_end * (1.0 - ab_start) / ab_start)


class PeRFlowTorchScheduler(SchedulerMixin, ConfigMixin):
  """PeRFlow's few-step sampler as a diffusers scheduler (set_timesteps / step / scale_model_input / add_noise).

  Config: the SD schedule (num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas), the
  student's prediction_type ('diff_eps' | 'ddim_eps' | 'velocity') and num_time_windows (K). Keys of other
  schedulers' configs (steps_offset, skip_prk_steps, ...) are ignored by `from_config`.
  """
  _compatibles = [e.name for e in KarrasDiffusionSchedulers]  # as diffusers' own schedulers and the reference
  order = 1

  @register_to_config
  def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
               beta_schedule: str = "scaled_linear", trained_betas: Any = None, set_alpha_to_one: bool = False,
               prediction_type: str = "diff_eps", t_noise: float = 1.0, t_clean: float = 0.0,
               num_time_windows: int = 4):
    if prediction_type not in PREDICTION_TYPES:
      raise ValueError(f"prediction_type={prediction_type!r} is not a PeRFlow prediction type; pass one of "
                       f"{PREDICTION_TYPES} (from_config(..., prediction_type='diff_eps') for SD1.5 PeRFlow; "
                       "the old name 'epsilon' is 'diff_eps').")
    if (t_noise, t_clean) != (1.0, 0.0):
      raise ValueError(f"t_noise={t_noise}, t_clean={t_clean}: only the full interval t_noise=1, t_clean=0 is "
                       "supported (that is what every released PeRFlow model uses).")
    if isinstance(num_time_windows, bool) or int(num_time_windows) != num_time_windows or num_time_windows < 1:
      raise ValueError(f"num_time_windows must be a positive integer, got {num_time_windows!r}.")
    # The schedule bit for bit as diffusers holds it (float32); the step's coefficients in float64 from it.
    self.betas = _betas(int(num_train_timesteps), beta_start, beta_end, beta_schedule, trained_betas)
    self.alphas = 1.0 - self.betas
    self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
    self.alphas_cumprod_np = self.alphas_cumprod.numpy().astype(np.float64)
    # As in the reference (and DDIMScheduler); the step never reads it: a window ending at t = 0 lands on
    # alphas_cumprod[0], the reference's get_window_alpha, whatever set_alpha_to_one says.
    self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
    self.init_noise_sigma = 1.0
    self.num_inference_steps: Optional[int] = None
    self.timesteps = torch.from_numpy(np.arange(int(num_train_timesteps), 0, -1).astype(np.int64))

  # ------------------------------------------------------------------------------------------------ timesteps

  def _windows(self) -> tuple[np.ndarray, np.ndarray]:
    k = int(self.config.num_time_windows)
    return np.arange(k, 0, -1, dtype=np.float64) / k, np.arange(k - 1, -1, -1, dtype=np.float64) / k

  def set_timesteps(self, num_inference_steps: int, device: Union[str, torch.device, None] = None) -> None:
    """N integer timesteps noisiest first; K = 4, N = 4 -> [1000, 750, 500, 250] (reference 4.1).

    Raises:
      ValueError: N < K (each window needs a step; the reference silently ran K steps).
    """
    n, k = num_inference_steps, int(self.config.num_time_windows)
    if isinstance(n, bool) or int(n) != n:
      raise ValueError(f"num_inference_steps must be an integer, got {n!r}.")
    n = int(n)
    if n < k:
      raise ValueError(f"num_inference_steps={n} is fewer than num_time_windows={k}: each window needs at least "
                       f"one step, so ask for num_inference_steps >= {k}.")
    starts, ends = self._windows()
    pieces = [np.linspace(starts[i], ends[i], n // k + (1 if i < n % k else 0), endpoint=False) for i in range(k)]
    steps = (np.concatenate(pieces) * int(self.config.num_train_timesteps)).astype(np.int64)
    self.num_inference_steps = n
    self.timesteps = torch.from_numpy(steps).to(device)

  def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
    """Identity: PeRFlow's model input is the latent itself."""
    del timestep
    return sample

  # ------------------------------------------------------------------------------------------------ the step

  def _alpha_bar(self, t: float) -> float:
    """alphas_cumprod[max(floor(n t) - 1, 0)] (reference 1.3)."""
    n = int(self.config.num_train_timesteps)
    return float(self.alphas_cumprod_np[min(max(int(np.floor(t * n + 1e-6)) - 1, 0), n - 1)])

  def _next_timestep(self, timestep: int) -> int:
    steps = [int(s) for s in self.timesteps.cpu().tolist()]
    if timestep not in steps:
      raise ValueError(f"timestep {timestep} is not one of this scheduler's timesteps {steps}; call "
                       "set_timesteps(N) and step through scheduler.timesteps.")
    i = steps.index(timestep)
    return steps[i + 1] if i + 1 < len(steps) else 0

  def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor,
           return_dict: bool = True, **unused: Any) -> Union[PeRFlowSchedulerOutput, tuple[torch.Tensor]]:
    """One PeRFlow Euler step from `timestep` to the next of `self.timesteps` (0 after the last; reference 4.2).

    Args:
      model_output: [B, C, H, W] the (guided) student output: eps for the eps types, v for 'velocity'.
      timestep: the current integer timestep (int or 0-d tensor), an entry of `self.timesteps`.
      sample: [B, C, H, W] the current latents.
      return_dict: return a PeRFlowSchedulerOutput (else a tuple).
      **unused: eta / generator that pipelines may pass; PeRFlow is deterministic.

    Returns:
      prev_sample [B, C, H, W] in sample's dtype (computed in float32).
    """
    del unused
    if self.num_inference_steps is None:
      raise ValueError("call set_timesteps(num_inference_steps) before step().")
    t_int = int(timestep.item() if torch.is_tensor(timestep) else timestep)
    n = int(self.config.num_train_timesteps)
    k = int(self.config.num_time_windows)
    t_c = t_int / n
    dt = (self._next_timestep(t_int) - t_int) / n
    z = sample.to(torch.float32)
    out = model_output.to(torch.float32)
    if self.config.prediction_type == "velocity":
      velocity = out
    else:
      w = min(max(int(np.ceil((t_c - _BOUNDARY_TOL) * k)), 1), k)
      t_s, t_e = w / k, (w - 1) / k
      lam, eta = window_coefficients(self._alpha_bar(t_s), self._alpha_bar(t_e), self.config.prediction_type)
      denom = lam * (t_c - t_s) + (t_e - t_c)
      lam_t, eta_t = lam * (t_e - t_s) / denom, eta * (t_e - t_c) / denom
      z_end = float(lam_t) * z + float(eta_t) * out
      velocity = (z_end - z) / (t_e - t_c)
    prev = (z + dt * velocity).to(sample.dtype)
    if not return_dict:
      return (prev,)
    return PeRFlowSchedulerOutput(prev_sample=prev, pred_original_sample=None)

  def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor,
                timesteps: torch.Tensor) -> torch.Tensor:
    """sqrt(ab) x + sqrt(1 - ab) noise with ab = alphas_cumprod[timestep - 1] (1000 -> index 999; reference 4.2)."""
    ac = self.alphas_cumprod.to(original_samples.device)
    idx = (torch.as_tensor(timesteps, device=original_samples.device).long() - 1).clamp(0, ac.shape[0] - 1)
    ab = ac[idx].to(torch.float32).reshape(-1, *([1] * (original_samples.ndim - 1)))
    out = ab.sqrt() * original_samples.to(torch.float32) + (1.0 - ab).sqrt() * noise.to(torch.float32)
    return out.to(original_samples.dtype)

  def __len__(self) -> int:
    return int(self.config.num_train_timesteps)
