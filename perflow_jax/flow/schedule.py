"""Stable Diffusion's discrete noise schedule seen through PeRFlow's continuous time.

Time convention: t in [0, 1], t = 1 is noise, t = 0 is data. The discrete SD schedule has
``num_train_timesteps`` (1000) entries; PeRFlow maps a continuous t onto it with an off-by-one that the
released weights depend on:

  alpha_bar(t)         = alphas_cumprod[max(trunc(1000 t) - 1, 0)]  (t = 0 -> index 0, 0.99915, not 1)
  student_timestep(t)  = 1000 t                  (float; the student UNet's time input, 1..1000)
  teacher_timestep(t)  = round(999 + (t - 1) / 0.001)   (int; the teacher's DDIM evaluation timestep, 999..-1)

all in float32 as the reference computes them (1000 t - 1 would round 0.1875 to 186; the reference's float32
expression gives 186.50006 -> 187; see flow/grids.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from perflow_jax.flow import _checks
from perflow_jax.flow import grids

_F32 = np.float32


def _torch_linspace_float32(start: float, end: float, steps: int) -> np.ndarray:
  """torch.linspace(start, end, steps, dtype=torch.float32), value for value.

  PyTorch steps from both ends towards the middle with step = (end - start) / (steps - 1) in float32, each
  value one fused multiply-add: start + step i for the first half, end - step (steps - 1 - i) for the second.
  A float32 product of a 24-bit step and an index < 2^24 is exact in float64, so one float64 multiply-add
  rounded to float32 is that fused operation.
  """
  start32, end32 = _F32(start), _F32(end)
  if steps == 1:
    return np.array([start32], _F32)
  step = np.float64((end32 - start32) / _F32(steps - 1))
  i = np.arange(steps, dtype=np.float64)
  values = np.where(i < steps // 2, np.float64(start32) + step * i, np.float64(end32) - step * (steps - 1 - i))
  return values.astype(_F32)


def sd_alphas_cumprod(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
) -> np.ndarray:
  """SD's 'scaled_linear' cumulative alpha products, bit for bit as diffusers' schedulers hold them.

  betas = linspace(sqrt(beta_start), sqrt(beta_end), n)^2 and alphas = 1 - betas in float32 (as diffusers builds
  them), then cumprod(alphas) accumulated in float64 and stored in float32 (PyTorch's CPU cumprod). Computing it
  all in float64 instead moves 986 of the 1000 entries by up to 1e-6 relative.

  Returns:
    float32 numpy array of shape [num_train_timesteps]; [0] = 0.99915, [999] = 0.0046602 for the SD defaults.
  """
  if isinstance(num_train_timesteps, bool) or int(num_train_timesteps) != num_train_timesteps or (
      num_train_timesteps < 1):
    raise ValueError(f"num_train_timesteps must be a positive integer, got {num_train_timesteps!r}.")
  if not 0.0 < beta_start < beta_end < 1.0:
    raise ValueError(
        f"Need 0 < beta_start < beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}.")
  root_betas = _torch_linspace_float32(beta_start ** 0.5, beta_end ** 0.5, int(num_train_timesteps))
  alphas = _F32(1.0) - root_betas * root_betas
  return np.cumprod(alphas.astype(np.float64)).astype(_F32)


def alpha_bar_index(t: jax.Array, num_train_timesteps: int = 1000) -> jax.Array:
  """Index into alphas_cumprod for continuous time t: max(trunc(n t) - 1, 0), in float32 as the reference.

  The reference's `(t * n).long() - 1` (add_noise) and `(t * n - 1).long()` (get_window_alpha) agree for every
  t >= 1 / n and clamp to 0 below; no tolerance is added: a t whose float32 product lands a hair under an
  integer takes the lower index, as it does in the reference.

  Args:
    t: float array of any shape, values in [0, 1].
    num_train_timesteps: n, the length of the discrete schedule.

  Returns:
    int32 array of t's shape, in [0, n - 1].
  """
  _checks.check_unit_interval(t, "t")
  t = jnp.asarray(t, jnp.float32)
  idx = jnp.trunc(t * jnp.float32(num_train_timesteps)).astype(jnp.int32) - 1
  return jnp.clip(idx, 0, num_train_timesteps - 1)


def alpha_bar(t: jax.Array, alphas_cumprod: np.ndarray | jax.Array) -> jax.Array:
  """alpha_bar(t) = alphas_cumprod[max(floor(n t) - 1, 0)] with n = len(alphas_cumprod).

  Args:
    t: float array of any shape, values in [0, 1].
    alphas_cumprod: [n] schedule (e.g. sd_alphas_cumprod()).

  Returns:
    float32 array of t's shape.
  """
  ac = jnp.asarray(alphas_cumprod, jnp.float32)
  return ac[alpha_bar_index(t, ac.shape[0])]


def student_timestep(t: jax.Array, num_train_timesteps: int = 1000) -> jax.Array:
  """The student UNet's time input, n t as float32 (t = 1 -> 1000: one past SD's trained range, as released)."""
  _checks.check_unit_interval(t, "t")
  return jnp.asarray(t, jnp.float32) * num_train_timesteps


def teacher_timestep(t: np.ndarray, num_train_timesteps: int = 1000,
                     device: str = grids.REFERENCE_DEVICE) -> np.ndarray:
  """The teacher's discrete timestep of time t, int32 (t = 1 -> 999, t = 0 -> -1), on the host.

  The reference's float32 round(n - 1 + (t - 1) / (1 / n)), half to even: 0.1875 -> 187 (see flow/grids.py).

  Args:
    t: concrete float array of any shape, values in [0, 1].
    num_train_timesteps: n.
    device: 'cuda' (the released weights) or 'cpu', where the reference's arithmetic ran.
  """
  _checks.check_unit_interval(t, "t")
  return grids.timestep_of_time(np.asarray(t), num_train_timesteps, device)


def add_noise(x0: jax.Array, noise: jax.Array, t: jax.Array, alphas_cumprod: np.ndarray | jax.Array) -> jax.Array:
  """Forward marginal at continuous time t: sqrt(ab) x0 + sqrt(1 - ab) noise with ab = alpha_bar(t).

  Args:
    x0: [B, ...] clean latents.
    noise: [B, ...] standard normal noise, same shape as x0.
    t: [B] (or scalar) continuous times.
    alphas_cumprod: [n] schedule.

  Returns:
    [B, ...] noisy latents in float32 (or x0's dtype if wider).
  """
  _checks.check_same_shape(x0, noise, "x0", "noise")
  ab = _checks.per_example(alpha_bar(t, alphas_cumprod), x0)
  dtype = jnp.result_type(x0.dtype, jnp.float32)
  return jnp.sqrt(ab) * x0.astype(dtype) + jnp.sqrt(1.0 - ab) * noise.astype(dtype)


def zero_snr_start(z_start: jax.Array, noise: jax.Array, t_start: jax.Array) -> jax.Array:
  """The SDXL script's --zero_snr: where a window starts at t = 1 its start is the pure noise itself.

  SD's schedule never reaches zero signal (alpha_bar(1) = 0.0047, signal coefficient 0.068), while sampling starts
  from pure N(0, I); this trains the first window from where sampling starts. Other windows are unchanged.

  Args:
    z_start: [B, ...] add_noise(x0, noise, t_start).
    noise: [B, ...] the noise that made z_start.
    t_start: [B] (or scalar) window starts.

  Returns:
    [B, ...] in z_start's dtype.
  """
  _checks.check_same_shape(z_start, noise, "z_start", "noise")
  at_noise = _checks.per_example(t_start, z_start, "t_start") == 1.0
  return jnp.where(at_noise, noise.astype(z_start.dtype), z_start)
