r"""Topology presets: a recipe's mesh, batch and memory settings for a named cluster shape.

A config file keeps a table of presets and applies the one named in its argument::

  python -m perflow_jax.train --config=configs/sd15.py:v5e-256 ...           # a bare preset name
  python -m perflow_jax.train --config=configs/sd15.py:topology=v5e-256 ...  # the same, spelt out

A preset sets ``config.mesh.data``, ``.fsdp``, ``.dcn_data`` (total axis sizes; see ``perflow_jax.parallel.mesh``),
``config.data.batch_size`` (the global batch), ``config.optim.grad_accum_steps`` and ``config.sharding.teacher``;
each device then computes ``per_device_batch = global_batch / (devices * grad_accum_steps)`` examples per
microbatch. Flags given after the preset (``--config.mesh.fsdp=...``) still override it.

``NxNAME`` (e.g. ``2xv5e-256``) is N copies of preset NAME joined over the data-center network: N times the
devices, ``data`` and ``dcn_data``, the same ``fsdp`` (inside a slice), the same global batch and accumulation (so
N times fewer examples per device, and at most NAME's memory).

``measured_gib`` is the per-device memory of the compiled step from ``python -m perflow_jax.benchmark
--mode=memory`` on simulated CPU devices (XLA:CPU buffer assignment; the TPU/GPU compilers' numbers differ, check
on the device). Per-device memory depends on ``fsdp`` and the per-device microbatch, not on ``data`` (data
replicas hold the same sharded state and the same activations), so it is measured on ``fsdp`` simulated devices
with ``data=1``: see the config files for each command.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import ml_collections

from perflow_jax import config_lib


@dataclasses.dataclass(frozen=True)
class Topology:
  """One cluster shape for one recipe.

  Attributes:
    devices: JAX devices in the whole job (TPU chips in all slices; GPUs).
    device_memory_gib: memory of one device (v5p 95, v5e 16, H100 80).
    data, fsdp, dcn_data: ``config.mesh`` (data * fsdp == devices; dcn_data slices divide data).
    global_batch: ``config.data.batch_size``.
    grad_accum_steps: ``config.optim.grad_accum_steps``.
    teacher_sharding: ``config.sharding.teacher`` (``perflow_jax.parallel.sharding.TEACHER_SHARDINGS``).
    measured_gib: per-device GiB from ``benchmark --mode=memory`` (None: not measured; see the config file).
  """
  devices: int
  device_memory_gib: float
  data: int
  fsdp: int
  global_batch: int
  dcn_data: int = 1
  grad_accum_steps: int = 1
  teacher_sharding: str = "gather_once"
  measured_gib: float | None = None

  def __post_init__(self):
    if self.data * self.fsdp != self.devices:
      raise ValueError(f"{self}: data * fsdp = {self.data * self.fsdp} must equal devices = {self.devices}.")
    if self.data % self.dcn_data:
      raise ValueError(f"{self}: data={self.data} must be a multiple of dcn_data={self.dcn_data}.")
    if self.global_batch % (self.devices * self.grad_accum_steps):
      raise ValueError(f"{self}: global_batch={self.global_batch} must be a multiple of devices * "
                       f"grad_accum_steps = {self.devices * self.grad_accum_steps}.")

  @property
  def per_device_batch(self) -> int:
    """Examples per device per microbatch."""
    return self.global_batch // (self.devices * self.grad_accum_steps)


def find_topology(presets: Mapping[str, Topology], name: str) -> Topology | None:
  """``presets[name]``, or for ``NxNAME`` N slices of preset NAME (module docstring); None if neither."""
  if name in presets:
    return presets[name]
  match = re.fullmatch(r"([1-9][0-9]*)x(.+)", name)
  if not match or match.group(2) not in presets:
    return None
  n, one = int(match.group(1)), presets[match.group(2)]
  return dataclasses.replace(one, devices=n * one.devices, data=n * one.data, dcn_data=n * one.dcn_data,
                             measured_gib=None)


def parse_arg_with_topology(arg: str | None, presets: Mapping[str, Topology],
                            **spec: Any) -> ml_collections.ConfigDict:
  """``config_lib.parse_arg`` with an extra ``topology`` key (default '') that a bare preset name also sets.

  ``"runlocal"`` -> runlocal=True; ``"v5e-256"`` or ``"topology=v5e-256"`` -> topology='v5e-256'.
  """
  items = [f"topology={item.strip()}" if item.strip() and find_topology(presets, item.strip()) else item
           for item in (arg or "").split(",")]
  parsed = config_lib.parse_arg(",".join(items), topology="", **spec)
  if parsed.topology:
    _lookup(presets, parsed.topology)
  return parsed


def _lookup(presets: Mapping[str, Topology], name: str) -> Topology:
  topology = find_topology(presets, name)
  if topology is None:
    raise ValueError(f"unknown topology {name!r}; this config's presets: {sorted(presets)}, or N slices of one "
                     f"of them as 'NxNAME' (e.g. '2x{sorted(presets)[0]}').")
  return topology


def apply_topology(config: ml_collections.ConfigDict, presets: Mapping[str, Topology], name: str) -> None:
  """Sets the mesh, global batch and gradient accumulation of preset ``name`` ('' = leave the config as is)."""
  if not name:
    return
  t = _lookup(presets, name)
  config.mesh.data, config.mesh.fsdp, config.mesh.dcn_data = t.data, t.fsdp, t.dcn_data
  config.data.batch_size = t.global_batch
  config.optim.grad_accum_steps = t.grad_accum_steps
  config.sharding.teacher = t.teacher_sharding
