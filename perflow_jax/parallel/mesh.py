"""The device mesh and multi-process start-up.

The mesh has two axes, ``('data', 'fsdp')``: the batch is split over both, parameters, EMA and optimizer state
over ``'fsdp'`` only. Sizes come from the config (``config.mesh.data``, ``config.mesh.fsdp``); one of them may be
-1, meaning "all remaining devices". Both axes are ``AxisType.Auto`` so that jit's sharding propagation decides
intermediate layouts (in this JAX the default is Explicit, which would make every op's sharding part of its type).

Importing this module never starts distributed JAX and never touches a backend: ``maybe_initialize_distributed``
must run before the first JAX computation, and does so only when more than one process is configured.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Mapping, Sequence

import jax
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp")

# Environment variables that tell us this process is one of several (the launcher set them).
_COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
_NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
_PROCESS_ID_ENV = "JAX_PROCESS_ID"


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves the axis sizes in ``MESH_AXES`` order, replacing a single -1 by the remaining devices.

  Args:
    mesh_config: mapping axis name -> size (ConfigDict or dict) with exactly the keys ``MESH_AXES``.
    num_devices: devices the mesh must cover (all of them, across processes).

  Returns:
    (data, fsdp) sizes whose product is ``num_devices``.
  """
  keys = set(mesh_config.keys())
  if keys != set(MESH_AXES):
    unknown = sorted(keys - set(MESH_AXES))
    missing = sorted(set(MESH_AXES) - keys)
    raise ValueError(
        f"config.mesh must have exactly the axes {MESH_AXES}; unknown: {unknown}, missing: {missing}. "
        "Set e.g. config.mesh.data=1, config.mesh.fsdp=-1.")
  sizes = [int(mesh_config[a]) for a in MESH_AXES]
  for axis, size in zip(MESH_AXES, sizes):
    if size == 0 or size < -1:
      raise ValueError(f"config.mesh.{axis}={size}: an axis size is a positive integer or -1 (the rest).")
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh has -1 on more than one axis ({dict(zip(MESH_AXES, sizes))}); "
                     "at most one axis can take 'the rest' of the devices.")
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if num_devices % known:
      raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes ({known} devices) do not "
                       f"divide the {num_devices} devices; choose sizes that divide {num_devices}.")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))} covers {math.prod(sizes)} devices but there "
                     f"are {num_devices}; make the sizes multiply to {num_devices} or set one of them to -1.")
  return tuple(sizes)


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
  """Builds the ``('data', 'fsdp')`` mesh over all devices of all processes, with Auto axis types.

  ``jax.make_mesh`` orders the devices for the physical topology (TPU torus, GPU NVLink islands), so neighbours
  on the 'fsdp' axis are neighbours on the interconnect.

  Args:
    mesh_config: ``config.mesh``; see ``mesh_shape``.
    devices: devices to use (default: ``jax.devices()``).

  Returns:
    A ``jax.sharding.Mesh`` with axis names ``MESH_AXES``.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def _env_int(env: Mapping[str, str], name: str, unset: int) -> int:
  value = env.get(name, "").strip()
  if not value:
    return unset
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"environment variable {name}={value!r} is not an integer; unset it or fix it.") from None


def _cluster_says_multiprocess(env: Mapping[str, str]) -> bool:
  """True when a known cluster launcher (Cloud TPU, SLURM, Open MPI) started more than one process."""
  def count(name: str) -> int:
    try:
      return int(env.get(name, "1").split("(")[0] or 1)  # SLURM writes e.g. "4(x2)" in some fields.
    except ValueError:
      return 1
  tpu_hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  return (len(tpu_hosts) > 1 or count("MEGASCALE_NUM_SLICES") > 1 or count("SLURM_NTASKS") > 1
          or count("OMPI_COMM_WORLD_SIZE") > 1)


def distributed_args(distributed_config: Mapping[str, Any] | None,
                     env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
  """Decides how (and whether) to call ``jax.distributed.initialize``; pure, so it is testable.

  Precedence: explicit config fields, then the ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
  ``JAX_PROCESS_ID`` environment, then (with ``auto_detect``) JAX's own cluster detection when a TPU pod,
  SLURM or Open MPI environment reports more than one process.

  Args:
    distributed_config: ``config.distributed`` with ``coordinator_address`` (str, '' = unset),
      ``num_processes`` (int, 0 = unset), ``process_id`` (int, -1 = unset) and ``auto_detect`` (bool); or None.
    env: environment (default ``os.environ``).

  Returns:
    Keyword arguments for ``jax.distributed.initialize`` ({} = auto-detect), or None for a single process.
  """
  env = os.environ if env is None else env
  cfg = dict(distributed_config or {})
  unknown = set(cfg) - {"coordinator_address", "num_processes", "process_id", "auto_detect"}
  if unknown:
    raise ValueError(f"config.distributed has unknown fields {sorted(unknown)}; known: coordinator_address, "
                     "num_processes, process_id, auto_detect.")
  address = cfg.get("coordinator_address") or env.get(_COORDINATOR_ENV, "").strip() or None
  num = cfg.get("num_processes") or _env_int(env, _NUM_PROCESSES_ENV, 0)
  pid = cfg.get("process_id", -1)
  if pid is None or pid < 0:
    pid = _env_int(env, _PROCESS_ID_ENV, -1)
  if num > 1:
    if not address or pid < 0:
      raise ValueError(f"{num} processes are configured but coordinator_address={address!r} and "
                       f"process_id={pid}: set config.distributed.coordinator_address ('host:port' of process 0) "
                       f"and config.distributed.process_id (0..{num - 1}), or the {_COORDINATOR_ENV} and "
                       f"{_PROCESS_ID_ENV} environment variables.")
    if pid >= num:
      raise ValueError(f"process_id={pid} is out of range for num_processes={num}; use 0..{num - 1}.")
    return {"coordinator_address": address, "num_processes": num, "process_id": pid}
  if num == 1:
    return None
  if cfg.get("auto_detect", True) and _cluster_says_multiprocess(env):
    return {}
  return None


def maybe_initialize_distributed(config: Any) -> bool:
  """Starts multi-process JAX when more than one process is configured; a no-op otherwise.

  Call it first in ``main``, before anything creates arrays or queries devices. Reads ``config.distributed``
  if the config has it (see ``distributed_args``).

  Returns:
    True when this call initialized ``jax.distributed``.
  """
  if jax.distributed.is_initialized():
    return False
  distributed_config = config.get("distributed") if hasattr(config, "get") else None
  kwargs = distributed_args(distributed_config)
  if kwargs is None:
    return False
  if os.environ.get("JAX_PLATFORMS", "").strip() == "cpu":
    # CPU processes exchange data over gloo; without it cross-process computations fail.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  logging.info("Initializing jax.distributed with %s", kwargs or "cluster auto-detection")
  jax.distributed.initialize(**kwargs)
  _use_coordination_barriers_in_orbax()
  logging.info("jax.distributed ready: process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def _use_coordination_barriers_in_orbax() -> None:
  """Makes orbax synchronise processes through the coordination service rather than a collective.

  orbax's default barrier is a collective whose first use must rendezvous within gloo's 30 s on CPU; processes
  that reach it far apart (different load, compile or read times) then fail. Only possible where absl flags are
  parsed (the CLIs); elsewhere orbax keeps its default.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  name = "experimental_orbax_use_distributed_barrier"
  if name in flags.FLAGS and flags.FLAGS.is_parsed():
    flags.FLAGS[name].value = True


def barrier(name: str, timeout_s: float = 1800.0) -> None:
  """Waits until every process reaches `name`; a no-op with one process.

  It uses the distributed runtime's coordination service, not a collective: a collective's first use sets up its
  communicator with a short rendezvous deadline (30 s for gloo on CPU), which processes that arrive far apart
  (one still compiling, or reading a large checkpoint) would miss. Calling this before the first collective of a
  phase lines the processes up, so that rendezvous happens within moments.
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # pylint: disable=g-import-not-at-top  (no public barrier in this JAX)
  distributed.global_state.client.wait_at_barrier(f"perflow_jax:{name}", int(timeout_s * 1000))
