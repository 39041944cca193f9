"""Stable Diffusion's discrete noise schedule seen through PeRFlow's continuous time.

Time convention: t in [0, 1], t = 1 is noise, t = 0 is data. The discrete SD schedule has
``num_train_timesteps`` (1000) entries; PeRFlow maps a continuous t onto it with an off-by-one that the
released weights depend on:

  alpha_bar(t)         = alphas_cumprod[max(floor(1000 t) - 1, 0)]   (t = 0 -> index 0, 0.99915, not 1)
  student_timestep(t)  = 1000 t                  (float; the student UNet's time input, 1..1000)
  teacher_timestep(t)  = round(1000 t - 1)       (int; the teacher's DDIM evaluation timestep, 999..-1)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from perflow_jax.flow import _checks

# floor(1000 t) must not lose a grid point to float error: in float32, 1000 * t for t near 1 is off by up to
# ~6e-5 (one ulp of t is 6e-8), so e.g. t = 1 - 0.251 can land at 748.99995. A nudge of 1e-3 timestep is far
# above that error and far below the 1-timestep grid spacing, so every grid t keeps its intended index.
_FLOOR_GUARD = 1e-3


def sd_alphas_cumprod(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
) -> np.ndarray:
  """SD's 'scaled_linear' cumulative alpha products.

  betas = linspace(sqrt(beta_start), sqrt(beta_end), n)^2; alphas_cumprod = cumprod(1 - betas).

  Returns:
    float64 numpy array of shape [num_train_timesteps]; [0] = 0.999150, [999] = 0.004660 for the SD defaults.
  """
  if int(num_train_timesteps) != num_train_timesteps or num_train_timesteps < 1:
    raise ValueError(f"num_train_timesteps must be a positive integer, got {num_train_timesteps!r}.")
  if not 0.0 < beta_start < beta_end < 1.0:
    raise ValueError(
        f"Need 0 < beta_start < beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}.")
  betas = np.linspace(np.sqrt(beta_start), np.sqrt(beta_end), int(num_train_timesteps), dtype=np.float64) ** 2
  return np.cumprod(1.0 - betas)


def alpha_bar_index(t: jax.Array, num_train_timesteps: int = 1000) -> jax.Array:
  """Index into alphas_cumprod for continuous time t: max(floor(n t) - 1, 0), float-error guarded.

  Args:
    t: float array of any shape, values in [0, 1].
    num_train_timesteps: n, the length of the discrete schedule.

  Returns:
    int32 array of t's shape, in [0, n - 1].
  """
  _checks.check_unit_interval(t, "t")
  t = jnp.asarray(t, jnp.float32)
  idx = jnp.floor(t * num_train_timesteps + _FLOOR_GUARD).astype(jnp.int32) - 1
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


def teacher_timestep(t: jax.Array, num_train_timesteps: int = 1000) -> jax.Array:
  """The teacher's discrete timestep round(n t - 1) as int32 (t = 1 -> 999, t = 0 -> -1).

  Rounds half to even, as torch.round in the reference solver does (936.5 -> 936).
  """
  _checks.check_unit_interval(t, "t")
  return jnp.round(jnp.asarray(t, jnp.float32) * num_train_timesteps - 1.0).astype(jnp.int32)


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
