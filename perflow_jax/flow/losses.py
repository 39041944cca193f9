"""PeRFlow's training targets and losses, and the standard diffusion loss for teacher training.

Every eps parameterisation is an affine map of the window start onto the window end,
z_end = lam z_start + eta eps, with per-window constants from ab_s = alpha_bar(t_start) (noisier) and
ab_e = alpha_bar(t_end); gamma = sqrt(ab_s / ab_e) < 1:

  'diff_eps' (SD1.5):  lam = 1 / gamma,          eta = -sqrt(1 - gamma^2) / gamma
  'ddim_eps' (SDXL):   lam = sqrt(ab_e / ab_s),   eta = sqrt(1 - ab_e) - sqrt(ab_e (1 - ab_s) / ab_s)
  'velocity' (SD2.1):  the student predicts dz/dt = (z_end - z_start) / (t_end - t_start) directly.

The target is the same for every t inside the window: one eps (or v) describes the whole straight segment.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from perflow_jax.flow import _checks
from perflow_jax.flow.schedule import alpha_bar

PREDICTION_TYPES = ("diff_eps", "ddim_eps", "velocity")
EPS_PREDICTION_TYPES = ("diff_eps", "ddim_eps")
WEIGHTINGS = ("none", "reciprocal", "rcp_win")
DISTANCES = ("l2", "pseudo_huber")
DIFFUSION_PREDICTION_TYPES = ("epsilon", "v_prediction")


def window_coefficients(alpha_bar_start: jax.Array, alpha_bar_end: jax.Array,
                        prediction_type: str) -> tuple[jax.Array, jax.Array]:
  """(lam, eta) with z_end = lam z_start + eta eps for an eps prediction type.

  Args:
    alpha_bar_start: alpha_bar(t_start), any shape.
    alpha_bar_end: alpha_bar(t_end), broadcastable with alpha_bar_start.
    prediction_type: 'diff_eps' or 'ddim_eps'.

  Returns:
    (lam, eta) float32 of the broadcast shape. K = 4 window [1, 0.75]: diff_eps (3.4858, -3.3393),
    ddim_eps (3.4858, -2.5064).
  """
  if prediction_type == "velocity":
    raise ValueError("prediction_type 'velocity' has no (lam, eta): its target is (z_end - z_start) / "
                     "(t_end - t_start); use perflow_target.")
  _checks.check_choice(prediction_type, EPS_PREDICTION_TYPES, "prediction_type")
  ab_s = jnp.asarray(alpha_bar_start, jnp.float32)
  ab_e = jnp.asarray(alpha_bar_end, jnp.float32)
  if prediction_type == "diff_eps":
    gamma = jnp.sqrt(ab_s / ab_e)
    return 1.0 / gamma, -jnp.sqrt(1.0 - gamma ** 2) / gamma
  return jnp.sqrt(ab_e / ab_s), jnp.sqrt(1.0 - ab_e) - jnp.sqrt(ab_e * (1.0 - ab_s) / ab_s)


def perflow_target(z_start: jax.Array, z_end: jax.Array, t_start: jax.Array, t_end: jax.Array,
                   alphas_cumprod: np.ndarray | jax.Array, prediction_type: str) -> jax.Array:
  """The student's regression target for a window: eps* = (z_end - lam z_start) / eta, or v* for 'velocity'.

  Args:
    z_start: [B, ...] latents at t_start (real data forward-noised).
    z_end: [B, ...] the teacher's solve to t_end.
    t_start, t_end: [B] (or scalar) window bounds, t_start > t_end.
    alphas_cumprod: [n] schedule.
    prediction_type: 'diff_eps', 'ddim_eps' or 'velocity'.

  Returns:
    [B, ...] float32 target.
  """
  _checks.check_choice(prediction_type, PREDICTION_TYPES, "prediction_type")
  _checks.check_same_shape(z_start, z_end, "z_start", "z_end")
  _checks.check_windows(t_start, t_end)
  z_s = z_start.astype(jnp.float32)
  z_e = z_end.astype(jnp.float32)
  if prediction_type == "velocity":
    ts = _checks.per_example(t_start, z_s, "t_start")
    te = _checks.per_example(t_end, z_s, "t_end")
    return (z_e - z_s) / (te - ts)
  lam, eta = window_coefficients(alpha_bar(t_start, alphas_cumprod), alpha_bar(t_end, alphas_cumprod),
                                 prediction_type)
  lam = _checks.per_example(lam, z_s, "t_start")
  eta = _checks.per_example(eta, z_s, "t_start")
  return (z_e - lam * z_s) / eta


def interpolate(z_start: jax.Array, z_end: jax.Array, t: jax.Array, t_start: jax.Array,
                t_end: jax.Array) -> jax.Array:
  """The point at time t on the straight segment: z_start + (z_end - z_start) (t - t_start) / (t_end - t_start).

  Args:
    z_start, z_end: [B, ...] window endpoints.
    t: [B] (or scalar) times inside the windows.
    t_start, t_end: [B] (or scalar) window bounds.

  Returns:
    [B, ...] float32.
  """
  _checks.check_same_shape(z_start, z_end, "z_start", "z_end")
  _checks.check_windows(t_start, t_end)
  _checks.check_unit_interval(t, "t")
  z_s = z_start.astype(jnp.float32)
  z_e = z_end.astype(jnp.float32)
  t = _checks.per_example(t, z_s, "t")
  ts = _checks.per_example(t_start, z_s, "t_start")
  te = _checks.per_example(t_end, z_s, "t_end")
  # The reference's order: ((z_end - z_start) / (t_end - t_start)) * (t - t_start), rounded as it rounds.
  return z_s + (z_e - z_s) / (te - ts) * (t - ts)


def loss_weights(t: jax.Array | None, t_start: jax.Array | None, num_windows: int,
                 weighting: str) -> jax.Array:
  """Per-example loss weights [B] (float32).

  'none': 1; 'reciprocal': 1 / max(1 - t, 0.1) / 2.3 (2.3 ~ the integral of 1 / (1 - t) over [0, 0.9]);
  'rcp_win': t_start / ((1 + K) / (2 K)), i.e. the window start over the mean window start.

  Args:
    t: [B] training times ('none' and 'reciprocal'; may be None for 'rcp_win').
    t_start: [B] window starts ('rcp_win'; may be None otherwise).
    num_windows: K.
    weighting: 'none', 'reciprocal' or 'rcp_win'.
  """
  _checks.check_choice(weighting, WEIGHTINGS, "weighting")
  needed, name = (t_start, "t_start") if weighting == "rcp_win" else (t, "t")
  if needed is None:
    raise ValueError(f"weighting={weighting!r} needs {name}, an array of shape [B].")
  v = jnp.asarray(needed, jnp.float32)
  if weighting == "none":
    return jnp.ones_like(v)
  if weighting == "reciprocal":
    return 1.0 / jnp.maximum(1.0 - v, 0.1) / 2.3
  if isinstance(num_windows, bool) or int(num_windows) != num_windows or num_windows < 1:
    raise ValueError(f"weighting='rcp_win' needs num_windows, a positive integer; got {num_windows!r}.")
  return v / ((1.0 + num_windows) / (2.0 * num_windows))


def perflow_loss(prediction: jax.Array, target: jax.Array, t: jax.Array | None = None,
                 t_start: jax.Array | None = None, num_windows: int = 4, weighting: str = "none",
                 distance: str = "l2", huber_c: float = 0.001) -> jax.Array:
  """The student's loss, a float32 scalar.

  Default ('none', 'l2'): plain MSE, the mean over all elements, as the reference's F.mse_loss. Otherwise the
  per-example mean over pixels of the distance, times the per-example weight, averaged over the batch.

  Args:
    prediction: [B, ...] student output.
    target: [B, ...] perflow_target.
    t: [B] training times (needed for 'reciprocal').
    t_start: [B] window starts (needed for 'rcp_win').
    num_windows: K (for 'rcp_win').
    weighting: 'none', 'reciprocal' or 'rcp_win'.
    distance: 'l2' (squared error) or 'pseudo_huber' (sqrt(d^2 + c^2) - c).
    huber_c: c of the pseudo-Huber distance.
  """
  _checks.check_choice(weighting, WEIGHTINGS, "weighting")
  _checks.check_choice(distance, DISTANCES, "distance")
  _checks.check_same_shape(prediction, target, "prediction", "target")
  d = prediction.astype(jnp.float32) - target.astype(jnp.float32)
  if distance == "l2":
    per_element = d * d
  else:
    per_element = jnp.sqrt(d * d + huber_c * huber_c) - huber_c
  if weighting == "none":
    return jnp.mean(per_element)
  batch = prediction.shape[0]
  if t is not None:
    t = _checks.batch_vector(t, batch, "t")
  if t_start is not None:
    t_start = _checks.batch_vector(t_start, batch, "t_start")
  w = loss_weights(t, t_start, num_windows, weighting)
  per_example = jnp.mean(per_element.reshape(prediction.shape[0], -1), axis=1)
  return jnp.mean(w * per_example)


def drop_prompts(key: jax.Array, context: Any, empty_context: Any, drop_prob: float = 0.1) -> Any:
  """Replace each example's context by the empty-prompt context with probability drop_prob.

  One Bernoulli draw per example is shared by every leaf, so pass a pytree (e.g. {'context': [B, L, D],
  'pooled': [B, P]}) to drop SDXL's text embedding and pooled embedding together.

  Args:
    key: PRNG key.
    context: pytree of arrays with leading dim B.
    empty_context: the same structure, leading dim 1 or B (the "" embedding).
    drop_prob: probability in [0, 1].

  Returns:
    context with the dropped examples replaced, same structure, shapes and dtypes.
  """
  if not 0.0 <= drop_prob <= 1.0:
    raise ValueError(f"drop_prob must be a probability in [0, 1], got {drop_prob}.")
  leaves = jax.tree.leaves(context)
  if not leaves:
    raise ValueError("context has no arrays to drop.")
  batch = leaves[0].shape[0]
  empty = _checks.broadcast_batch(empty_context, batch, "empty_context")
  if jax.tree.structure(empty) != jax.tree.structure(context):
    raise ValueError("empty_context must have the same structure as context; got "
                     f"{jax.tree.structure(empty)} vs {jax.tree.structure(context)}.")
  drop = jax.random.uniform(key, (batch,)) < drop_prob

  def one(c, e):
    if c.shape[0] != batch or e.shape != c.shape:
      raise ValueError(f"context leaf of shape {tuple(c.shape)} does not match the empty-prompt leaf "
                       f"{tuple(e.shape)} for batch {batch}.")
    return jnp.where(drop.reshape((batch,) + (1,) * (c.ndim - 1)), e.astype(c.dtype), c)

  return jax.tree.map(one, context, empty)


def diffusion_loss(model_fn: Any, key: jax.Array, x0: jax.Array, context: Any,
                   alphas_cumprod: np.ndarray | jax.Array, prediction_type: str = "epsilon") -> jax.Array:
  """The standard SD training loss (for training or fine-tuning a teacher), a float32 scalar.

  Integer timesteps n ~ uniform{0, ..., N-1} per example (diffusers' train_text_to_image convention, SD's own
  discrete time, not PeRFlow's 1000 t); z = sqrt(ab_n) x0 + sqrt(1 - ab_n) eps; the model gets n as float32;
  target eps ('epsilon') or v = sqrt(ab_n) eps - sqrt(1 - ab_n) x0 ('v_prediction'); MSE over all elements.

  Args:
    model_fn: (z [B, ...], timestep float32 [B], context) -> output [B, ...].
    key: PRNG key (split into timestep and noise keys).
    x0: [B, ...] clean latents.
    context: conditioning passed to model_fn unchanged.
    alphas_cumprod: [N] schedule.
    prediction_type: 'epsilon' or 'v_prediction'.
  """
  _checks.check_choice(prediction_type, DIFFUSION_PREDICTION_TYPES, "diffusion prediction_type")
  ac = jnp.asarray(alphas_cumprod, jnp.float32)
  t_key, n_key = jax.random.split(key)
  batch = x0.shape[0]
  timesteps = jax.random.randint(t_key, (batch,), 0, ac.shape[0])
  x0 = x0.astype(jnp.float32)
  eps = jax.random.normal(n_key, x0.shape, jnp.float32)
  ab = _checks.per_example(ac[timesteps], x0)
  z = jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * eps
  out = model_fn(z, timesteps.astype(jnp.float32), context)
  _checks.check_same_shape(out, x0, "model output", "x0")
  target = eps if prediction_type == "epsilon" else jnp.sqrt(ab) * eps - jnp.sqrt(1.0 - ab) * x0
  return jnp.mean(jnp.square(out.astype(jnp.float32) - target))
