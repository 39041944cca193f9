"""PeRFlow's K equal time windows and the per-example training time sampler.

Window k (k = 1..K) is (t_end, t_start] = ((k-1)/K, k/K]: a t exactly on a boundary belongs to the window that
starts there, so t = 0.75 is in [0.75, 0.5] for K = 4. The reference loops over the batch in Python with a
tolerance of 0.1 / 1000; the closed form k = clip(ceil((t - 1e-4) K), 1, K) gives the same answer.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from perflow_jax.flow import _checks
from perflow_jax.flow import grids

# 0.1 * (1 / num_train_timesteps): the reference's tolerance, so a t within float error above a boundary still
# belongs to the window that starts at that boundary.
_BOUNDARY_TOL = 1e-4


@dataclasses.dataclass(frozen=True)
class TimeWindows:
  """K equal windows of [0, 1]; starts [1, (K-1)/K, ..., 1/K], ends [(K-1)/K, ..., 0]."""

  num_windows: int = 4

  def __post_init__(self):
    if isinstance(self.num_windows, bool) or int(self.num_windows) != self.num_windows or self.num_windows < 1:
      raise ValueError(f"num_windows must be a positive integer, got {self.num_windows!r}.")
    object.__setattr__(self, "num_windows", int(self.num_windows))  # 4.0 -> 4: K is a count

  @property
  def starts(self) -> np.ndarray:
    """[K] float64 window starts, noisiest first: the reference's Python floats (its scheduler's timesteps)."""
    k = self.num_windows
    return np.arange(k, 0, -1, dtype=np.float64) / k

  @property
  def ends(self) -> np.ndarray:
    """[K] float64 window ends, noisiest first."""
    k = self.num_windows
    return np.arange(k - 1, -1, -1, dtype=np.float64) / k

  def index(self, t: jax.Array) -> jax.Array:
    """k in 1..K of the window holding t (1 = the window ending at data, K = the one starting at noise).

    Args:
      t: float array of any shape, values in [0, 1].

    Returns:
      int32 array of t's shape.
    """
    _checks.check_unit_interval(t, "t")
    k = self.num_windows
    t = jnp.asarray(t, jnp.float32)
    return jnp.clip(jnp.ceil((t - _BOUNDARY_TOL) * k), 1, k).astype(jnp.int32)

  def bounds(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(t_start, t_end) of the window holding each t, vectorised.

    Args:
      t: float array of any shape, values in [0, 1].

    Returns:
      (t_start, t_end): float32 arrays of t's shape with t_start = k/K > t_end = (k-1)/K, the reference's
      float32 values (gathered from a table: in-graph k / K would be k * float32(1/K) after XLA's rewrite).
    """
    starts, ends = grids.window_bounds(self.num_windows)  # noisiest first
    row = self.num_windows - self.index(t)
    return jnp.asarray(starts)[row], jnp.asarray(ends)[row]

  def sample_t(self, key: jax.Array, batch_size: int, grid: int = 1000) -> jax.Array:
    """Per-example training times t = 1 - floor(grid u) / grid, u ~ U[0, 1).

    t takes the values {1, 1 - 1/grid, ..., 1/grid}: window starts are included, t = 0 never occurs. SD1.5's
    recipe uses grid = 1000, SDXL's grid = 200. The values are the reference's float32 ones
    (grids.training_times).

    Returns:
      float32 [batch_size].
    """
    if int(grid) != grid or grid < 1:
      raise ValueError(f"grid must be a positive integer number of time points, got {grid!r}.")
    if int(batch_size) != batch_size or batch_size < 1:
      raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    u = jax.random.uniform(key, (int(batch_size),), jnp.float32)
    # min(., grid - 1) guards u rounding up to 1.0 in float32, which would give t = 0.
    steps = jnp.minimum(jnp.floor(u * grid), grid - 1).astype(jnp.int32)
    return jnp.asarray(grids.training_times(int(grid)))[steps]
