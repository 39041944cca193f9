"""The device mesh.

The mesh has two axes, ``('data', 'fsdp')``: the batch is split over both, parameters, EMA and optimizer state
over ``'fsdp'`` only. Sizes come from the config (``config.mesh.data``, ``config.mesh.fsdp``); one of them may be
-1, meaning "all remaining devices". Both axes are ``AxisType.Auto`` so that jit's sharding propagation decides
intermediate layouts (in this JAX the default is Explicit, which would make every op's sharding part of its type).

Several slices (multi-slice TPU, multi-node GPU): ``config.mesh.dcn_data = S`` (default 1) is the number of slices
the ``data`` axis spans over the data-center network (DCN). ``data`` and ``fsdp`` stay the *total* axis sizes; each
slice holds a ``(data // S, fsdp)`` block of the mesh, laid out for its interconnect (ICI / NVLink), so every FSDP
group lies inside one slice and only the gradients' all-reduce over ``data`` crosses slices. A slice is what the
devices' ``slice_index`` says: one per TPU slice, and one per host on multi-node GPU (JAX numbers GPU hosts as
slices), so a 4-node GPU job needs ``dcn_data=4``. On CPU (no slice_index in one process, slice 0 everywhere in
several) each process counts as one slice (JAX's ``process_is_granule`` fallback): a multi-process CPU run
rehearses a multi-slice mesh with ``dcn_data`` = the number of processes; one process has one slice.

``device_grid`` is the pure part (config + devices -> the [data, fsdp] array of devices), testable with fake
devices; ``make_mesh`` wraps it in a ``Mesh``. Multi-process start-up is ``perflow_jax.parallel.distributed``.
"""

from __future__ import annotations

import collections
import itertools
import math
from typing import Any, Mapping, Sequence

import jax
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh
import numpy as np

MESH_AXES = ("data", "fsdp")
# config.mesh fields that are not axes: the number of slices (DCN granules) the 'data' axis spans.
MESH_OPTIONS = ("dcn_data",)

# TPU kinds whose physical axes jax.make_mesh may split over several logical axes (the same rule is used inside
# each slice of a multi-slice mesh, so a layout that works on one slice works on each of several).
_SPLIT_PHYSICAL_AXES_KINDS = ("TPU v5 lite", "TPU v5e")


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves the axis sizes in ``MESH_AXES`` order, replacing a single -1 by the remaining devices.

  Args:
    mesh_config: mapping axis name -> size (ConfigDict or dict) with the keys ``MESH_AXES``, and optionally
      ``dcn_data`` (see ``num_slices``; it does not change the sizes).
    num_devices: devices the mesh must cover (all of them, across processes).

  Returns:
    (data, fsdp) sizes whose product is ``num_devices``.
  """
  keys = set(mesh_config.keys())
  unknown = sorted(keys - set(MESH_AXES) - set(MESH_OPTIONS))
  missing = sorted(set(MESH_AXES) - keys)
  if unknown or missing:
    raise ValueError(
        f"config.mesh has the axes {MESH_AXES} and the option {MESH_OPTIONS[0]!r}; unknown: {unknown}, missing: "
        f"{missing}. Set e.g. config.mesh.data=1, config.mesh.fsdp=-1.")
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


def num_slices(mesh_config: Mapping[str, Any]) -> int:
  """``config.mesh.dcn_data``: the slices the 'data' axis spans (1 when the field is absent, as in old runs)."""
  value = mesh_config.get("dcn_data", 1)
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"config.mesh.dcn_data={value!r} must be a positive integer: the number of slices the "
                     "'data' axis spans (1 = one slice).")
  return int(value)


def _granule(devices: Sequence[Any]) -> str:
  """The device attribute that names a device's slice.

  ``slice_index`` on TPU (one per slice) and GPU (one per host). CPU devices carry none in one process and
  slice 0 on every device in several (all on one host), so there each process counts as one slice
  (``process_index``: JAX's ``process_is_granule`` fallback), as on any device without ``slice_index``.
  """
  if devices[0].platform == "cpu" or not all(hasattr(d, "slice_index") for d in devices):
    return "process_index"
  return "slice_index"


def _layout(build, shape: tuple[int, int], devices: Sequence[Any], what: str) -> np.ndarray:
  """Runs a mesh_utils builder, turning its "cannot map onto the torus" error into one that says what to change."""
  try:
    return build()
  except NotImplementedError as e:
    hint = ""
    if devices and all(hasattr(d, "coords") for d in devices):
      coords = np.array([tuple(d.coords) for d in devices])
      dims = [int(n) for n in coords.max(0) - coords.min(0) + 1 if n > 1]
      fits = sorted({math.prod(c) for r in range(1, len(dims) + 1) for c in itertools.combinations(dims, r)})
      hint = f" ({'x'.join(map(str, dims))} chips; e.g. fsdp in {fits})"
    raise ValueError(
        f"{what} {dict(zip(MESH_AXES, shape))} does not map onto the physical topology of its {len(devices)} "
        f"devices{hint}: on this TPU kind each axis size must be a product of whole torus dimensions; choose "
        "config.mesh.fsdp (and data) accordingly.") from e


def device_grid(mesh_config: Mapping[str, Any], devices: Sequence[Any]) -> np.ndarray:
  """The devices arranged as the ``[data, fsdp]`` mesh of ``config.mesh`` (pure: no Mesh, no backend query).

  With ``dcn_data == 1`` this is ``jax.make_mesh``'s layout. With ``dcn_data = S > 1`` the devices are grouped by
  ``slice_index`` (by ``process_index`` on CPU, see ``_granule``), each slice is laid out as a ``(data // S, fsdp)``
  mesh for its interconnect, and the slices are stacked along ``data``
  (``mesh_utils.create_hybrid_device_mesh``): data index ``i`` lies in the ``i // (data // S)``-th slice.

  Args:
    mesh_config: ``config.mesh`` (``data``, ``fsdp``, optional ``dcn_data``).
    devices: all devices of all processes (real ones, or objects with the same attributes in tests).

  Returns:
    An object array of shape (data, fsdp) holding every device once.

  Raises:
    ValueError: sizes that do not fit the devices, ``data`` not divisible by ``dcn_data``, devices spanning a
      different number of slices than ``dcn_data``, uneven slices, or an axis that does not map onto the torus.
  """
  devices = list(devices)
  data, fsdp = mesh_shape(mesh_config, len(devices))
  slices = num_slices(mesh_config)
  granule = _granule(devices)
  found = sorted({int(getattr(d, granule)) for d in devices})
  if granule == "slice_index" and len(found) != slices:
    span = f"{len(found)} slices (slice_index {found[0]}..{found[-1]})" if len(found) > 1 else (
        f"1 slice (slice_index {found[0]})")
    raise ValueError(f"the devices span {span} but config.mesh.dcn_data={slices}; set "
                     f"--config.mesh.dcn_data={len(found)} (and config.mesh.data to a multiple of it).")
  if slices == 1:
    return _layout(lambda: jax.make_mesh((data, fsdp), MESH_AXES, devices=devices).devices, (data, fsdp),
                   devices, "config.mesh")

  if data % slices:
    raise ValueError(f"config.mesh.data={data} is not divisible by config.mesh.dcn_data={slices}: the data axis "
                     f"is split evenly over the {slices} slices; make data a multiple of {slices}.")
  if granule == "process_index" and len(found) != slices:
    raise ValueError(
        f"config.mesh.dcn_data={slices} but the devices ({devices[0].platform}) are not a multi-slice TPU/GPU job "
        f"(no slice_index to go by) and come from {len(found)} process(es); there each process counts as one "
        f"slice: set --config.mesh.dcn_data={len(found)} (or 1 for a single-slice mesh).")
  ici_shape, dcn_shape = (data // slices, fsdp), (slices, 1)
  per_slice = math.prod(ici_shape)
  counts = collections.Counter(int(getattr(d, granule)) for d in devices)
  uneven = {k: n for k, n in sorted(counts.items()) if n != per_slice}
  if uneven:
    raise ValueError(f"the per-slice mesh {dict(zip(MESH_AXES, ici_shape))} of config.mesh "
                     f"{dict(zip(MESH_AXES, (data, fsdp)))} with dcn_data={slices} needs {per_slice} devices in "
                     f"each slice, but {granule} -> devices is {dict(sorted(counts.items()))}; choose fsdp and "
                     f"data // dcn_data to fill one slice.")
  allow_split = devices[0].device_kind in _SPLIT_PHYSICAL_AXES_KINDS
  first = [d for d in devices if int(getattr(d, granule)) == min(counts)]
  return _layout(lambda: mesh_utils.create_hybrid_device_mesh(
      ici_shape, dcn_shape, devices, process_is_granule=granule == "process_index",
      allow_split_physical_axes=allow_split),
                 ici_shape, first, "the per-slice mesh")


def make_mesh(mesh_config: Mapping[str, Any], devices: Sequence[Any] | None = None) -> Mesh:
  """Builds the ``('data', 'fsdp')`` mesh over all devices of all processes, with Auto axis types.

  The layout is ``device_grid``'s: ``jax.make_mesh``'s for one slice (it orders the devices for the physical
  topology, TPU torus or GPU NVLink islands, so neighbours on 'fsdp' are neighbours on the interconnect), and
  ``create_hybrid_device_mesh``'s with ``config.mesh.dcn_data > 1``.

  Args:
    mesh_config: ``config.mesh``; see ``mesh_shape`` and ``device_grid``.
    devices: devices to use (default: ``jax.devices()``).

  Returns:
    A ``jax.sharding.Mesh`` with axis names ``MESH_AXES``.
  """
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(device_grid(mesh_config, devices), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
