"""Input checks and broadcasting shared by the flow modules (private).

Checks on values run only where the value is concrete (a Python number, numpy array or a committed jax Array);
under jit the inputs are tracers and only static properties (shapes, names) can be checked.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def concrete(x: Any) -> np.ndarray | None:
  """x as a numpy array when its value is known now, else None (inside jit/vmap/grad)."""
  if isinstance(x, jax.core.Tracer):
    return None
  return np.asarray(x)


def check_unit_interval(t: Any, name: str) -> None:
  """Raise ValueError when a concrete t has values outside [0, 1]."""
  v = concrete(t)
  if v is None or v.size == 0:
    return
  if not np.all(np.isfinite(v)) or v.min() < 0.0 or v.max() > 1.0:
    raise ValueError(
        f"{name} must lie in [0, 1] (t = 1 is noise, t = 0 is data); got values in [{v.min()}, {v.max()}]. "
        "Pass continuous time, not a 0..1000 timestep.")


def check_windows(t_start: Any, t_end: Any) -> None:
  """Raise ValueError when concrete window bounds are outside [0, 1] or not ordered t_start > t_end."""
  check_unit_interval(t_start, "t_start")
  check_unit_interval(t_end, "t_end")
  s, e = concrete(t_start), concrete(t_end)
  if s is not None and e is not None and np.any(s <= e):
    raise ValueError(
        "Every window must run from noise to data, t_start > t_end; got t_start="
        f"{s.tolist()} and t_end={e.tolist()}.")


def check_same_shape(a: jax.Array, b: jax.Array, name_a: str, name_b: str) -> None:
  if tuple(a.shape) != tuple(b.shape):
    raise ValueError(f"{name_a} and {name_b} must have the same shape; got {tuple(a.shape)} and {tuple(b.shape)}.")


def check_choice(value: str, allowed: Sequence[str], name: str) -> None:
  if value not in allowed:
    raise ValueError(f"Unknown {name} {value!r}; choose one of {', '.join(repr(a) for a in allowed)}.")


def per_example(coef: Any, x: jax.Array, name: str = "coefficient") -> jax.Array:
  """A scalar or [B] coefficient shaped to broadcast against x of shape [B, ...] (float32)."""
  coef = jnp.asarray(coef, jnp.float32)
  if coef.ndim == 0:
    return coef
  if coef.ndim != 1 or coef.shape[0] != x.shape[0]:
    raise ValueError(
        f"{name} must be a scalar or have shape [B] = [{x.shape[0]}] to match the batch of shape "
        f"{tuple(x.shape)}; got shape {tuple(coef.shape)}.")
  return coef.reshape(coef.shape + (1,) * (x.ndim - 1))


def batch_vector(v: Any, batch_size: int, name: str, dtype=jnp.float32) -> jax.Array:
  """A scalar or [B] value as a [B] array of dtype; ValueError for any other shape."""
  v = jnp.asarray(v, dtype)
  if v.ndim == 0:
    return jnp.broadcast_to(v, (batch_size,))
  if v.shape != (batch_size,):
    raise ValueError(f"{name} must be a scalar or have shape [B] = [{batch_size}]; got shape {tuple(v.shape)}.")
  return v


def broadcast_batch(tree: Any, batch_size: int, name: str) -> Any:
  """Every leaf of tree with leading dim 1 or batch_size, broadcast to leading dim batch_size."""

  def one(x):
    x = jnp.asarray(x)
    if x.ndim == 0 or x.shape[0] not in (1, batch_size):
      raise ValueError(
          f"Every array in {name} needs a leading batch dimension of 1 or {batch_size}; got shape {tuple(x.shape)}.")
    return jnp.broadcast_to(x, (batch_size,) + x.shape[1:])

  return jax.tree.map(one, tree)
