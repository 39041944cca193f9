"""PeRFlow's few-step sampler: Euler along each window's predicted straight segment.

Timesteps are SD-style integers 1000 t (the first is 1000, one past SD's trained range, as released). N >= K
steps are spread over the K windows: each gets N // K, the first (noisiest) N mod K windows one more, placed at
linspace(t_start, t_end, n_k, endpoint=False) and truncated to integers.

A step at t_c in window [t_start, t_end] reads the model's eps as the constant epsilon of the segment
z_end = lam z_start + eta eps and recovers the window end from the current point:

  D = lam (t_c - t_s) + (t_e - t_c);  lam_t = lam (t_e - t_s) / D;  eta_t = eta (t_e - t_c) / D
  z_end = lam_t z + eta_t eps;  v = (z_end - z) / (t_e - t_c);  z_next = z + (t_next - t_c) v

With one step per window the step lands exactly on z_end. 'velocity' models output v directly.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from perflow_jax.flow import _checks
from perflow_jax.flow.losses import PREDICTION_TYPES, window_coefficients
from perflow_jax.flow.schedule import alpha_bar, sd_alphas_cumprod
from perflow_jax.flow.solvers import guided_model_output
from perflow_jax.flow.windows import TimeWindows

StudentFn = Callable[[jax.Array, jax.Array, Any], jax.Array]


class PeRFlowScheduler:
  """The PeRFlow inference scheduler (reference: src/scheduler_perflow.py) as pure JAX functions.

  Attributes:
    windows: the TimeWindows (K).
    prediction_type: 'diff_eps', 'ddim_eps' or 'velocity' (must match the one the student was trained with).
    alphas_cumprod: [n] float64 numpy schedule (SD's scaled_linear by default).
    num_train_timesteps: n.
  """

  def __init__(self, num_windows: int = 4, prediction_type: str = "diff_eps",
               alphas_cumprod: np.ndarray | None = None):
    _checks.check_choice(prediction_type, PREDICTION_TYPES, "prediction_type")
    self.windows = TimeWindows(num_windows)
    self.prediction_type = prediction_type
    ac = sd_alphas_cumprod() if alphas_cumprod is None else np.asarray(alphas_cumprod, np.float64)
    if ac.ndim != 1 or ac.size < 2 or not np.all((ac > 0) & (ac < 1)):
      raise ValueError(f"alphas_cumprod must be a 1-D schedule with values in (0, 1); got shape {ac.shape}.")
    self.alphas_cumprod = ac
    self.num_train_timesteps = int(ac.size)

  @property
  def num_windows(self) -> int:
    return self.windows.num_windows

  def timesteps(self, num_inference_steps: int) -> np.ndarray:
    """The N integer timesteps, noisiest first. K = 4: N = 4 -> [1000, 750, 500, 250]; N = 5 -> [1000, 875, 750,
    500, 250].

    Raises:
      ValueError: N < K (each window needs at least one step; the reference silently ran K steps instead).
    """
    n, k = num_inference_steps, self.num_windows
    if isinstance(n, bool) or int(n) != n:
      raise ValueError(f"num_inference_steps must be an integer, got {n!r}.")
    if n < k:
      raise ValueError(
          f"num_inference_steps={n} is fewer than num_windows={k}: each window needs at least one step, so "
          f"ask for num_inference_steps >= {k}.")
    n = int(n)
    starts, ends = self.windows.starts, self.windows.ends
    pieces = [np.linspace(starts[i], ends[i], n // k + (1 if i < n % k else 0), endpoint=False) for i in range(k)]
    return (np.concatenate(pieces) * self.num_train_timesteps).astype(np.int64)

  def next_timesteps(self, num_inference_steps: int) -> np.ndarray:
    """The timestep each step moves to: the next entry of timesteps(N), and 0 after the last."""
    return np.append(self.timesteps(num_inference_steps)[1:], 0).astype(np.int64)

  def step(self, model_output: jax.Array, timestep: Any, next_timestep: Any, sample: jax.Array) -> jax.Array:
    """One PeRFlow step from timestep to next_timestep.

    Args:
      model_output: [B, ...] the student's (already guided) eps, or v for 'velocity'.
      timestep: current integer timestep (Python int, scalar or [B] array), e.g. 1000.
      next_timestep: the timestep to move to (the next of timesteps(N), 0 after the last).
      sample: [B, ...] current latents.

    Returns:
      [B, ...] latents at next_timestep, float32 (or wider).
    """
    _checks.check_same_shape(model_output, sample, "model_output", "sample")
    n = self.num_train_timesteps
    dtype = jnp.result_type(sample.dtype, jnp.float32)
    z = sample.astype(dtype)
    out = model_output.astype(dtype)
    t_c = jnp.asarray(timestep, jnp.float32) / n
    dt = _checks.per_example((jnp.asarray(next_timestep, jnp.float32) - jnp.asarray(timestep, jnp.float32)) / n,
                             z, "timestep")
    if self.prediction_type == "velocity":
      return z + dt * out
    t_s, t_e = self.windows.bounds(t_c)
    lam, eta = window_coefficients(alpha_bar(t_s, self.alphas_cumprod), alpha_bar(t_e, self.alphas_cumprod),
                                   self.prediction_type)
    denom = lam * (t_c - t_s) + (t_e - t_c)
    lam_t = _checks.per_example(lam * (t_e - t_s) / denom, z, "timestep")
    eta_t = _checks.per_example(eta * (t_e - t_c) / denom, z, "timestep")
    z_end = lam_t * z + eta_t * out
    velocity = (z_end - z) / _checks.per_example(t_e - t_c, z, "timestep")
    return z + dt * velocity

  def sample(self, model_fn: StudentFn, noise: jax.Array, num_steps: int, guidance_scale: Any = 1.0,
             context: Any = None, uncond_context: Any = None) -> jax.Array:
    """Run all N steps from pure noise in one lax.fori_loop over the precomputed timesteps.

    Classifier-free guidance acts on the raw model output, uncond + w (cond - uncond), with cond and uncond in
    one model call of batch 2B; it is skipped (one call of batch B) when guidance_scale is the Python number 1.
    Jit-able: wrap it in jax.jit with the parameters as arguments of model_fn's closure for repeated use.

    Args:
      model_fn: (z [B', ...], timestep float32 [B'] (= 1000 t), context) -> eps or v [B', ...].
      noise: [B, ...] N(0, I) latents (no input scaling: init_noise_sigma = 1).
      num_steps: N >= K.
      guidance_scale: w (Python number or traced scalar).
      context: conditioning pytree with leading dim B (or None for an unconditional model).
      uncond_context: the empty-prompt context (leading dim 1 or B); needed when guiding.

    Returns:
      [B, ...] float32 latents at t = 0 (alpha_bar = alphas_cumprod[0]), ready for the VAE decoder.
    """
    plain = isinstance(guidance_scale, (int, float)) and guidance_scale == 1.0
    if not plain and uncond_context is None:
      raise ValueError(f"guidance_scale={guidance_scale} needs uncond_context, the empty-prompt embedding "
                       "(or pass guidance_scale=1.0 to sample without guidance).")
    timesteps = jnp.asarray(self.timesteps(num_steps), jnp.float32)
    next_timesteps = jnp.asarray(self.next_timesteps(num_steps), jnp.float32)
    batch = noise.shape[0]

    def body(i, z):
      t = timesteps[i]
      t_model = jnp.full((batch,), t, jnp.float32)
      if plain:
        out = model_fn(z, t_model, context)
      else:
        out = guided_model_output(model_fn, z, t_model, context, uncond_context, guidance_scale)
      return self.step(out, t, next_timesteps[i], z)

    z0 = noise.astype(jnp.result_type(noise.dtype, jnp.float32))
    return jax.lax.fori_loop(0, timesteps.shape[0], body, z0)

  def add_noise(self, sample: jax.Array, noise: jax.Array, timestep: Any) -> jax.Array:
    """Forward-noise to an integer scheduler timestep (img2img): index timestep - 1, so 1000 -> index 999.

    Args:
      sample: [B, ...] clean latents.
      noise: [B, ...] standard normal noise.
      timestep: scalar or [B] integer timesteps in 1..n (0 reads index 0).
    """
    _checks.check_same_shape(sample, noise, "sample", "noise")
    ac = jnp.asarray(self.alphas_cumprod, jnp.float32)
    idx = jnp.clip(jnp.asarray(timestep, jnp.int32) - 1, 0, self.num_train_timesteps - 1)
    ab = _checks.per_example(ac[idx], sample, "timestep")
    dtype = jnp.result_type(sample.dtype, jnp.float32)
    return jnp.sqrt(ab) * sample.astype(dtype) + jnp.sqrt(1.0 - ab) * noise.astype(dtype)
