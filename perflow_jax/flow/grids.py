"""The reference's time and timestep grids, value for value, computed on the host in float32.

Every number the reference derives from a continuous time t is a float32 PyTorch expression, and a few of them
land on the other side of a rounding boundary than exact arithmetic would (t = 0.1875 gives the teacher timestep
187, not 186). So these grids are not written as formulas in the jitted step: they are tables, computed here in
numpy float32 with the reference's operations in the reference's order, and the step only gathers from them.
Tables also keep the result the same on every accelerator: XLA rewrites `x / constant` as `x * (1 / constant)`,
and TPUs do not divide in IEEE arithmetic.

One operation depends on where the reference ran. A float32 tensor divided by a Python number is a true IEEE
division on CPU, but on CUDA PyTorch multiplies by the reciprocal, itself computed in float32
(`inv = 1.0f / float(d)`; PyTorch 2.0, the reference's pinned version). The released weights were trained on
GPUs, so `device="cuda"` is the default; `device="cpu"` reproduces the reference run on a CPU. The two differ in
38 of the 11,550 teacher timesteps of K = 1..10, S = 1..20, e.g. the SD1.5 recipe's (K = 4, S = 8) window
[0.5, 0.25] evaluates its third teacher call at 437 on CUDA and 436 on CPU.
"""

from __future__ import annotations

import functools

import numpy as np

DEVICES = ("cuda", "cpu")
# The device the released PeRFlow weights were trained on.
REFERENCE_DEVICE = "cuda"

_F32 = np.float32


def divide_by_python_number(x: np.ndarray, divisor: float, device: str = REFERENCE_DEVICE) -> np.ndarray:
  """`float32_tensor / python_number` as PyTorch computes it on `device`.

  Args:
    x: float32 array.
    divisor: the Python int or float.
    device: 'cuda' (x * (1.0f / float32(divisor)), PyTorch 2.0's CUDA kernel) or 'cpu' (x / float32(divisor)).

  Returns:
    float32 array of x's shape.
  """
  if device not in DEVICES:
    raise ValueError(f"device must be one of {DEVICES} (where the reference ran), got {device!r}.")
  x = np.asarray(x, _F32)
  d = _F32(divisor)
  if device == "cuda":
    return x * (_F32(1.0) / d)
  return x / d


def _check_count(value, name: str) -> int:
  if isinstance(value, bool) or int(value) != value or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}.")
  return int(value)


@functools.lru_cache(maxsize=None)
def window_bounds(num_windows: int) -> tuple[np.ndarray, np.ndarray]:
  """(starts, ends): [K] float32 each, noisiest first; start k/K and end (k-1)/K as float32(float64(k / K)).

  The reference builds them as Python floats `1. * i / K` and stores them into float32 tensors.
  """
  k = _check_count(num_windows, "num_windows")
  starts = np.array([1.0 * i / k for i in range(k, 0, -1)], np.float64).astype(_F32)
  ends = np.array([1.0 * i / k for i in range(k - 1, -1, -1)], np.float64).astype(_F32)
  starts.setflags(write=False)
  ends.setflags(write=False)
  return starts, ends


@functools.lru_cache(maxsize=None)
def training_times(grid: int, device: str = REFERENCE_DEVICE) -> np.ndarray:
  """[grid] float32 training times, indexed by j = floor(u grid): t_j = 1 - j / grid as the reference has it.

  The reference: `t = 1 - (u * grid).floor() / grid` in float32, so t_0 = 1 and t_{grid-1} = 1 / grid (to
  float32 rounding, which is the point).
  """
  g = _check_count(grid, "grid")
  j = np.arange(g, dtype=_F32)
  times = _F32(1.0) - divide_by_python_number(j, g, device)
  times.setflags(write=False)
  return times


def teacher_timesteps(t_start: np.ndarray, t_end: np.ndarray, num_steps: int, num_train_timesteps: int = 1000,
                      device: str = REFERENCE_DEVICE) -> np.ndarray:
  """The reference solver's S evaluation timesteps per window (PFODESolver.get_timesteps), int32 [B, S].

  In float32: interval = (t_end - t_start) / S; t_i = t_start + interval * i;
  timestep_i = round(n - 1 + (t_i - 1) / (1 / n)) with rounding half to even.

  Args:
    t_start, t_end: [B] window bounds (converted to float32, as the reference's tensors are).
    num_steps: S.
    num_train_timesteps: n.
    device: where the reference ran, see the module docstring.
  """
  s = _check_count(num_steps, "num_steps")
  n = _check_count(num_train_timesteps, "num_train_timesteps")
  t_start = np.asarray(t_start, _F32).reshape(-1, 1)
  t_end = np.asarray(t_end, _F32).reshape(-1, 1)
  interval = (t_end - t_start) / (np.ones([1], _F32) * _F32(s))  # tensor / tensor: a true division everywhere
  times = t_start + interval * np.arange(s, dtype=_F32)[None, :]
  return timestep_of_time(times, n, device)


def timestep_of_time(t: np.ndarray, num_train_timesteps: int = 1000, device: str = REFERENCE_DEVICE) -> np.ndarray:
  """The reference's integer timestep of time t: round(n - 1 + (t - 1) / (1 / n)) in float32, half to even.

  t = 1 -> 999, t = 0 -> -1; t = 0.1875 -> 187 (186.50006 in float32), where exact arithmetic gives 186.

  Args:
    t: float array of any shape (converted to float32).
    num_train_timesteps: n.
    device: where the reference ran, see the module docstring.

  Returns:
    int32 array of t's shape.
  """
  n = _check_count(num_train_timesteps, "num_train_timesteps")
  t = np.asarray(t, _F32)
  # The reference's step size is the Python float (t_terminal - t_initial) / (0 - n) = 1 / n.
  timesteps = _F32(n - 1) + divide_by_python_number(t - _F32(1.0), (0 - 1) / (0 - n), device)
  return np.rint(timesteps).astype(np.int32)  # np.rint rounds half to even, as torch.round does


@functools.lru_cache(maxsize=None)
def teacher_timestep_table(num_windows: int, num_steps: int, num_train_timesteps: int = 1000,
                           device: str = REFERENCE_DEVICE) -> np.ndarray:
  """[K, S] int32: row r holds the evaluation timesteps of window r of `window_bounds(K)` (noisiest first).

  E.g. K = 4, S = 8, last row (window [0.25, 0]): 249 218 187 155 124 93 62 30.
  """
  starts, ends = window_bounds(num_windows)
  table = teacher_timesteps(starts, ends, num_steps, num_train_timesteps, device)
  table.setflags(write=False)
  return table
