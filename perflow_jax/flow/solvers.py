"""The teacher's window solve: from z at t_start to t_end along the teacher's probability-flow ODE.

Three solvers, one contract (`window_solve(eps_fn, z, t_start, t_end, num_steps, alphas_cumprod, solver=...)`):

- 'ddim' (default; the reference PFODESolver, needed to reproduce the released weights): deterministic DDIM
  (eta = 0) evaluated at the S timesteps round(999 + (t - 1) / 0.001) for t on linspace(t_start, t_end, S,
  endpoint=False), in the reference's float32 arithmetic (flow/grids.py; 0.1875 -> 187, not 186);
  each step goes to prev = cur - 1000 // (K S) with K = 1 / (t_start - t_end), and prev < 0 uses
  alphas_cumprod[0]. Where 1000 / (K S) is not an integer the step lands short of the next evaluation
  timestep (S = 8, K = 4: 968 -> 937, next evaluation at 936): the teacher then sees its input at a slightly
  wrong noise level. That mismatch is kept on purpose.
- 'ddim_grid': the same DDIM on a self-consistent grid: S + 1 nodes round(1000 t - 1) on
  linspace(t_start, t_end, S + 1), every step lands on the next node, the last on alpha_bar(t_end).
- 'dpmpp_2m': DPM-Solver++(2M) (Lu et al. 2022), the data-prediction multistep solver, between the same
  endpoints alpha_bar(t_start) -> alpha_bar(t_end) on S + 1 integer nodes uniform in log-SNR: step 1 is DDIM,
  later steps extrapolate the x0 prediction linearly in log-SNR from the previous one. Uniform-in-t nodes
  would leave one log-SNR gap of ~1.8 (timestep 30 -> 0) in the last step of the data window, next to gaps of
  ~0.4, where the extrapolation overshoots (Gaussian study: error 0.07 at 4 steps vs DDIM-8's 0.027);
  log-SNR nodes keep every step the same size and 4 steps beat DDIM-8 in every window.

All run as one `lax.fori_loop`, so compile time does not grow with the number of steps, and take per-example
windows (t_start, t_end of shape [B]), so one batch can mix windows. eps_fn(z [B, ...], timestep int32 [B])
returns the teacher's epsilon [B, ...]; classifier-free guidance lives inside eps_fn (see guided_eps_fn).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from perflow_jax.flow import _checks
from perflow_jax.flow import grids
from perflow_jax.flow.schedule import alpha_bar_index

EpsFn = Callable[[jax.Array, jax.Array], jax.Array]
ModelFn = Callable[[jax.Array, jax.Array, Any], jax.Array]

SOLVERS = ("ddim", "ddim_grid", "dpmpp_2m")
TEACHER_PREDICTION_TYPES = ("epsilon", "v_prediction")
GUIDANCE_MODES = ("cfg_sync", "guided")
# The SDXL recipe's teacher guidance, hard-coded in the reference script.
DEFAULT_TEACHER_GUIDANCE = 7.5


# ------------------------------------------------------------------------------------------------ eps_fn helpers


def to_epsilon(model_output: jax.Array, z: jax.Array, alpha_bar: jax.Array, prediction_type: str) -> jax.Array:
  """The teacher's epsilon from its raw output.

  Args:
    model_output: [B, ...] raw teacher output.
    z: [B, ...] the teacher's input latents.
    alpha_bar: scalar or [B] alphas_cumprod at the evaluated timestep.
    prediction_type: 'epsilon' (output is epsilon) or 'v_prediction' (v = sqrt(ab) eps - sqrt(1 - ab) x0,
      so eps = sqrt(ab) v + sqrt(1 - ab) z).

  Returns:
    [B, ...] epsilon in float32 (or wider).
  """
  _checks.check_choice(prediction_type, TEACHER_PREDICTION_TYPES, "teacher prediction_type")
  _checks.check_same_shape(model_output, z, "model_output", "z")
  dtype = jnp.result_type(model_output.dtype, z.dtype, jnp.float32)
  out = model_output.astype(dtype)
  if prediction_type == "epsilon":
    return out
  ab = _checks.per_example(alpha_bar, z, "alpha_bar")
  return jnp.sqrt(ab) * out + jnp.sqrt(1.0 - ab) * z.astype(dtype)


def _concat_batch(a: Any, b: Any) -> Any:
  return jax.tree.map(lambda x, y: jnp.concatenate([x, y], axis=0), a, b)


def guided_model_output(model_fn: ModelFn, z: jax.Array, timestep: jax.Array, context: Any,
                        uncond_context: Any, guidance_scale: Any) -> jax.Array:
  """Classifier-free guidance on the raw output, conditional and unconditional in ONE call of batch 2B.

  out = uncond + w (cond - uncond), uncond first in the batch as in the reference.

  Args:
    model_fn: (z [2B, ...], timestep [2B], context pytree of leading dim 2B) -> output [2B, ...].
    z: [B, ...] latents.
    timestep: [B] timesteps, passed through to model_fn.
    context: pytree of arrays with leading dim B (e.g. text embeddings [B, L, D], or a dict that also holds
      SDXL's pooled embedding and time ids).
    uncond_context: the same structure with leading dim 1 or B (the empty-prompt embedding).
    guidance_scale: w, a scalar (Python or traced).

  Returns:
    [B, ...] guided output in float32 (or wider).
  """
  batch = z.shape[0]
  context = _checks.broadcast_batch(context, batch, "context")
  uncond_context = _checks.broadcast_batch(uncond_context, batch, "uncond_context")
  if jax.tree.structure(context) != jax.tree.structure(uncond_context):
    raise ValueError(
        "uncond_context must have the same structure as context (the empty-prompt embedding of each field); got "
        f"{jax.tree.structure(uncond_context)} vs {jax.tree.structure(context)}.")
  out = model_fn(jnp.concatenate([z, z], axis=0), jnp.concatenate([timestep, timestep], axis=0),
                 _concat_batch(uncond_context, context))
  if out.shape[0] != 2 * batch:
    raise ValueError(f"model_fn returned batch {out.shape[0]} for a guided call of batch {2 * batch}.")
  out = out.astype(jnp.result_type(out.dtype, jnp.float32))
  uncond, cond = out[:batch], out[batch:]
  return uncond + jnp.asarray(guidance_scale, out.dtype) * (cond - uncond)


def guided_eps_fn(model_fn: ModelFn, context: Any, alphas_cumprod: np.ndarray | jax.Array, *,
                  mode: str = "cfg_sync", guidance_scale: float | None = None, uncond_context: Any = None,
                  prediction_type: str = "epsilon") -> EpsFn:
  """The teacher's eps_fn for the window solve, with the recipes' classifier-free guidance.

  Modes:
    'cfg_sync' (SD1.5 recipe): no guidance; the teacher sees `context`, which the caller sets to the student's
      prompt-dropped context. One model call of batch B per step.
    'guided' (SDXL recipe): w = guidance_scale (7.5 if None); positive = `context` (the full, not dropped,
      prompt), negative = `uncond_context` (the "" embedding). One model call of batch 2B per step.

  Args:
    model_fn: (z, timestep float32 [B] holding the integer timestep, context) -> raw teacher output.
    context: pytree with leading dim B.
    alphas_cumprod: [n] schedule (for v_prediction teachers' eps conversion).
    mode: 'cfg_sync' or 'guided'.
    guidance_scale: only for 'guided'.
    uncond_context: only for 'guided'; leading dim 1 or B.
    prediction_type: the teacher's, 'epsilon' or 'v_prediction'.

  Returns:
    eps_fn(z [B, ...], timestep int32 [B]) -> eps [B, ...].
  """
  _checks.check_choice(mode, GUIDANCE_MODES, "guidance mode")
  _checks.check_choice(prediction_type, TEACHER_PREDICTION_TYPES, "teacher prediction_type")
  if mode == "cfg_sync":
    if guidance_scale not in (None, 1.0):
      raise ValueError(f"mode='cfg_sync' runs the teacher unguided; got guidance_scale={guidance_scale}. "
                       "Use mode='guided' for a guided teacher.")
    if uncond_context is not None:
      raise ValueError("mode='cfg_sync' takes no uncond_context: pass the prompt-dropped context as `context`.")
  elif uncond_context is None:
    raise ValueError("mode='guided' needs uncond_context, the empty-prompt (\"\") embedding.")
  scale = DEFAULT_TEACHER_GUIDANCE if guidance_scale is None else guidance_scale
  ac = jnp.asarray(alphas_cumprod, jnp.float32)

  def eps_fn(z: jax.Array, timestep: jax.Array) -> jax.Array:
    t_model = timestep.astype(jnp.float32)
    if mode == "guided":
      out = guided_model_output(model_fn, z, t_model, context, uncond_context, scale)
    else:
      out = model_fn(z, t_model, context)
    ab = ac[jnp.clip(timestep, 0, ac.shape[0] - 1)]
    return to_epsilon(out, z, ab, prediction_type)

  return eps_fn


# ------------------------------------------------------------------------------------------------ timestep grids


def _check_steps(num_steps: Any) -> int:
  if isinstance(num_steps, bool) or int(num_steps) != num_steps or num_steps < 1:
    raise ValueError(f"num_steps must be a positive integer (teacher calls per window), got {num_steps!r}.")
  return int(num_steps)


def _time_grid(t_start: jax.Array, t_end: jax.Array, num_points: int, num_intervals: int,
               num_train_timesteps: int) -> jax.Array:
  """[B, num_points] int32 timesteps round(n t - 1) at t = t_start + (t_end - t_start) i / num_intervals."""
  i = jnp.arange(num_points, dtype=jnp.float32)
  t = t_start[:, None] + ((t_end - t_start) / num_intervals)[:, None] * i
  # Half-way values round to even, as torch.round does in the reference (936.5 -> 936, 811.5 -> 812).
  return jnp.round(t * num_train_timesteps - 1.0).astype(jnp.int32)


def ddim_timesteps(t_start: jax.Array, t_end: jax.Array, num_steps: int, num_train_timesteps: int = 1000,
                   num_windows: int | None = None) -> tuple[jax.Array, jax.Array]:
  """The reference solver's evaluation timesteps and its fixed stride, value for value.

  The timesteps are the reference's float32 arithmetic (flow/grids.py), computed on the host: from the
  concrete windows themselves, or, for traced windows, from the table of TimeWindows(num_windows)'s windows,
  gathered by each example's window.

  Args:
    t_start, t_end: [B] window bounds, t_start > t_end, t_start - t_end = 1/K. Traced bounds must be
      TimeWindows(num_windows)'s.
    num_steps: S.
    num_train_timesteps: n.
    num_windows: K (static); required when the bounds are traced.

  Returns:
    (timesteps int32 [B, S], prev int32 [B, S]); prev = timesteps - n // (K S). E.g. window [1, 0.75], S = 8:
    timesteps 999, 968, 936, 905, 874, 843, 812, 780 and prev = timesteps - 31.
  """
  s = _check_steps(num_steps)
  starts, ends = _checks.concrete(t_start), _checks.concrete(t_end)
  if num_windows is None:
    if starts is None or ends is None:
      raise ValueError(
          "solver='ddim' on traced windows needs num_windows=K: the reference's timesteps are float32 arithmetic "
          "computed on the host, tabulated for the K windows.")
    lengths = np.asarray(starts, np.float64).reshape(-1) - np.asarray(ends, np.float64).reshape(-1)
    counts = np.unique(np.round(1.0 / lengths).astype(np.int64))
    if counts.size != 1:
      raise ValueError(f"solver='ddim' needs one window length 1/K per call, got lengths {lengths.tolist()}.")
    k = int(counts[0])
    timesteps = jnp.asarray(grids.teacher_timesteps(starts, ends, s, num_train_timesteps))
  else:
    k = int(num_windows)
    table = grids.teacher_timestep_table(k, s, num_train_timesteps)
    table_starts, table_ends = grids.window_bounds(k)
    if starts is not None and ends is not None and not (
        np.isin(np.asarray(starts, np.float32), table_starts).all()
        and np.isin(np.asarray(ends, np.float32), table_ends).all()):
      raise ValueError(f"solver='ddim' with num_windows={k} takes TimeWindows({k})'s windows; got t_start "
                       f"{np.asarray(starts).tolist()}, t_end {np.asarray(ends).tolist()}.")
    row = jnp.clip(k - jnp.round(jnp.asarray(t_start, jnp.float32) * k).astype(jnp.int32), 0, k - 1)
    timesteps = jnp.asarray(table)[row]
  stride = num_train_timesteps // (k * s)
  return timesteps, timesteps - stride


def grid_timesteps(t_start: jax.Array, t_end: jax.Array, num_steps: int,
                   num_train_timesteps: int = 1000) -> jax.Array:
  """[B, S + 1] int32 nodes round(n t - 1) on linspace(t_start, t_end, S + 1) ('ddim_grid').

  The first node is the reference's first evaluation timestep, the last n t_end - 1 (-1 at t_end = 0, which
  reads alphas_cumprod[0]).
  """
  s = _check_steps(num_steps)
  return _time_grid(jnp.asarray(t_start, jnp.float32), jnp.asarray(t_end, jnp.float32), s + 1, s,
                    num_train_timesteps)


def logsnr_timesteps(t_start: jax.Array, t_end: jax.Array, num_steps: int,
                     alphas_cumprod: np.ndarray | jax.Array) -> jax.Array:
  """[B, S + 1] int32 nodes from alpha_bar(t_start) to alpha_bar(t_end), uniform in log-SNR ('dpmpp_2m').

  log-SNR lambda = log(sqrt(ab / (1 - ab))) is decreasing in the timestep index; the nodes are the indices
  whose lambda is nearest (by linear interpolation, then rounding) to linspace(lambda_start, lambda_end, S + 1).
  The endpoints are exact: node 0 = alpha_bar_index(t_start), node S = alpha_bar_index(t_end).
  Where S approaches the number of timesteps in the window, neighbouring nodes may coincide; the solver then
  makes a zero-length step, which changes nothing.
  """
  s = _check_steps(num_steps)
  ac = jnp.asarray(alphas_cumprod, jnp.float32)
  n = ac.shape[0]
  lam_table = 0.5 * (jnp.log(ac) - jnp.log1p(-ac))
  i_start = alpha_bar_index(jnp.asarray(t_start, jnp.float32), n)
  i_end = alpha_bar_index(jnp.asarray(t_end, jnp.float32), n)
  l_start, l_end = lam_table[i_start], lam_table[i_end]
  frac = jnp.arange(s + 1, dtype=jnp.float32) / s
  lam = l_start[:, None] + (l_end - l_start)[:, None] * frac
  # jnp.interp needs increasing abscissae: lambda increases as the index goes down.
  idx = jnp.interp(lam, lam_table[::-1], jnp.arange(n - 1, -1, -1, dtype=jnp.float32))
  nodes = jnp.round(idx).astype(jnp.int32)
  return nodes.at[:, 0].set(i_start).at[:, -1].set(i_end)


# ------------------------------------------------------------------------------------------------ solvers


def _prepare(z: jax.Array, t_start: Any, t_end: Any, num_steps: Any, solver: str
             ) -> tuple[jax.Array, jax.Array, int]:
  _checks.check_choice(solver, SOLVERS, "solver")
  s = _check_steps(num_steps)
  if z.ndim < 1:
    raise ValueError(f"z must have a leading batch dimension, got shape {tuple(z.shape)}.")
  t_start = _checks.batch_vector(t_start, z.shape[0], "t_start")
  t_end = _checks.batch_vector(t_end, z.shape[0], "t_end")
  _checks.check_windows(t_start, t_end)
  if solver == "ddim":
    length = _checks.concrete(t_start - t_end)
    if length is not None:
      inv = 1.0 / length
      if np.any(np.abs(inv - np.round(inv)) > 1e-3):
        raise ValueError(
            "solver='ddim' reproduces the reference's stride 1000 // (K S), which needs windows of length 1/K "
            f"for an integer K; got lengths {length.tolist()}. Use solver='ddim_grid' for other windows.")
  return t_start, t_end, s


def _call_eps(eps_fn: EpsFn, z: jax.Array, timestep: jax.Array) -> jax.Array:
  eps = eps_fn(z, timestep)
  if tuple(eps.shape) != tuple(z.shape):
    raise ValueError(f"eps_fn returned shape {tuple(eps.shape)} for latents of shape {tuple(z.shape)}; "
                     "it must return the teacher's epsilon, shaped like z.")
  return eps.astype(z.dtype)


def _alpha(ac: jax.Array, timestep: jax.Array) -> jax.Array:
  # timestep -1 (the data end of the last window) reads alphas_cumprod[0]: the reference's
  # final_alpha_cumprod with set_alpha_to_one=False.
  return ac[jnp.clip(timestep, 0, ac.shape[0] - 1)]


def _ddim_step(z: jax.Array, eps: jax.Array, ab_cur: jax.Array, ab_prev: jax.Array) -> jax.Array:
  """One eta = 0 DDIM step: x0 = (z - sqrt(1 - ab) eps) / sqrt(ab); z' = sqrt(ab') x0 + sqrt(1 - ab') eps."""
  ab_cur = _checks.per_example(ab_cur, z)
  ab_prev = _checks.per_example(ab_prev, z)
  x0 = (z - jnp.sqrt(1.0 - ab_cur) * eps) / jnp.sqrt(ab_cur)
  return jnp.sqrt(ab_prev) * x0 + jnp.sqrt(1.0 - ab_prev) * eps


def _ddim_loop(eps_fn: EpsFn, z: jax.Array, cur: jax.Array, prev: jax.Array, ac: jax.Array) -> jax.Array:
  """DDIM from cur[:, i] to prev[:, i] for i = 0..S-1; cur, prev int32 [B, S]."""

  def body(i, z):
    c = jax.lax.dynamic_index_in_dim(cur, i, axis=1, keepdims=False)
    p = jax.lax.dynamic_index_in_dim(prev, i, axis=1, keepdims=False)
    eps = _call_eps(eps_fn, z, c)
    return _ddim_step(z, eps, _alpha(ac, c), _alpha(ac, p))

  return jax.lax.fori_loop(0, cur.shape[1], body, z)


def ddim_window_solve(eps_fn: EpsFn, z: jax.Array, t_start: jax.Array, t_end: jax.Array, num_steps: int,
                      alphas_cumprod: np.ndarray | jax.Array, num_windows: int | None = None) -> jax.Array:
  """The reference teacher solve: S deterministic DDIM steps from t_start to t_end (see module doc, 'ddim').

  Args:
    eps_fn: (z [B, ...], timestep int32 [B]) -> eps [B, ...].
    z: [B, ...] latents at t_start (forward-noised to alpha_bar(t_start)).
    t_start, t_end: [B] (or scalar) window bounds, t_start > t_end, window length 1/K.
    num_steps: S teacher calls (static).
    alphas_cumprod: [n] schedule.
    num_windows: K (static), required for traced windows (see ddim_timesteps).

  Returns:
    [B, ...] latents at the window end, float32 (or z's dtype if wider).
  """
  return window_solve(eps_fn, z, t_start, t_end, num_steps, alphas_cumprod, solver="ddim", num_windows=num_windows)


def _dpmpp_2m_loop(eps_fn: EpsFn, z: jax.Array, nodes: jax.Array, ac: jax.Array) -> jax.Array:
  """DPM-Solver++(2M) over nodes int32 [B, S + 1], in the data-prediction (x0) form.

  With alpha = sqrt(ab), sigma = sqrt(1 - ab), lambda = log(alpha / sigma) and h_i = lambda_{i+1} - lambda_i:
    D_i = (z_i - sigma_i eps_i) / alpha_i
    D'  = D_i + (h_i / (2 h_{i-1})) (D_i - D_{i-1})       (D' = D_i on the first step)
    z_{i+1} = (sigma_{i+1} / sigma_i) z_i + alpha_{i+1} (1 - exp(-h_i)) D'
  With D' = D_i this is exactly the DDIM step.
  """
  ab = _alpha(ac, nodes)
  alpha, sigma = jnp.sqrt(ab), jnp.sqrt(1.0 - ab)
  lam = jnp.log(alpha) - jnp.log(sigma)
  h = lam[:, 1:] - lam[:, :-1]                                     # [B, S]
  h_prev = jnp.concatenate([jnp.zeros_like(h[:, :1]), h[:, :-1]], axis=1)
  # Two nodes can share a timestep only where rounding collides (S close to the window's timestep count);
  # a zero previous interval then drops the correction instead of dividing by zero.
  corr = jnp.where(h_prev > 0, h / (2.0 * jnp.where(h_prev > 0, h_prev, 1.0)), 0.0)

  def col(a, i):
    return _checks.per_example(jax.lax.dynamic_index_in_dim(a, i, axis=1, keepdims=False), z)

  def body(i, carry):
    z, d_prev = carry
    eps = _call_eps(eps_fn, z, jax.lax.dynamic_index_in_dim(nodes, i, axis=1, keepdims=False))
    d = (z - col(sigma, i) * eps) / col(alpha, i)
    d_eff = d + col(corr, i) * (d - d_prev)
    z = (col(sigma, i + 1) / col(sigma, i)) * z + col(alpha, i + 1) * (-jnp.expm1(-col(h, i))) * d_eff
    return z, d

  z, _ = jax.lax.fori_loop(0, nodes.shape[1] - 1, body, (z, jnp.zeros_like(z)))
  return z


def window_solve(eps_fn: EpsFn, z: jax.Array, t_start: jax.Array, t_end: jax.Array, num_steps: int,
                 alphas_cumprod: np.ndarray | jax.Array, solver: str = "ddim",
                 num_windows: int | None = None) -> jax.Array:
  """Solve the teacher's PF-ODE over per-example windows with S = num_steps teacher calls.

  Args:
    eps_fn: (z [B, ...], timestep int32 [B]) -> eps [B, ...].
    z: [B, ...] latents at t_start.
    t_start, t_end: [B] (or scalar) window bounds with t_start > t_end.
    num_steps: S teacher calls per window (static).
    alphas_cumprod: [n] schedule.
    solver: 'ddim' (reference), 'ddim_grid' or 'dpmpp_2m'; see the module docstring.
    num_windows: K (static); 'ddim' needs it for traced windows, which must then be TimeWindows(K)'s.

  Returns:
    [B, ...] latents at t_end, float32 (or z's dtype if wider).
  """
  t_start, t_end, s = _prepare(z, t_start, t_end, num_steps, solver)
  ac = jnp.asarray(alphas_cumprod, jnp.float32)
  n = ac.shape[0]
  z = z.astype(jnp.result_type(z.dtype, jnp.float32))
  if solver == "ddim":
    cur, prev = ddim_timesteps(t_start, t_end, s, n, num_windows)
    return _ddim_loop(eps_fn, z, cur, prev, ac)
  if solver == "ddim_grid":
    nodes = grid_timesteps(t_start, t_end, s, n)
    return _ddim_loop(eps_fn, z, nodes[:, :-1], nodes[:, 1:], ac)
  return _dpmpp_2m_loop(eps_fn, z, logsnr_timesteps(t_start, t_end, s, ac), ac)
