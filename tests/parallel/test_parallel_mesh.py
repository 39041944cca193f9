"""Mesh construction from config: single-slice (jax.make_mesh) and multi-slice (config.mesh.dcn_data) layouts."""

import dataclasses
import itertools
import types

from absl.testing import absltest
from absl.testing import parameterized
import jax
from jax.sharding import AxisType
import ml_collections

from perflow_jax.parallel import mesh as mesh_lib


class MakeMeshTest(parameterized.TestCase):

  @parameterized.parameters(
      ((8, 1), (8, 1)), ((2, 4), (2, 4)), ((1, 8), (1, 8)), ((-1, 2), (4, 2)), ((2, -1), (2, 4)),
      ((1, -1), (1, 8)))
  def test_shape_and_axis_types(self, sizes, expected):
    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict({"data": sizes[0], "fsdp": sizes[1]}))
    self.assertEqual(mesh.axis_names, ("data", "fsdp"))
    self.assertEqual(tuple(mesh.shape.values()), expected)
    self.assertEqual(mesh.axis_types, (AxisType.Auto, AxisType.Auto))
    self.assertEqual(sorted(d.id for d in mesh.devices.flat), list(range(8)))

  @parameterized.parameters(
      ({"data": 3, "fsdp": -1}, r"fixed axes \(3 devices\) do not divide the 8 devices"),
      ({"data": 2, "fsdp": 2}, r"covers 4 devices but there are 8"),
      ({"data": -1, "fsdp": -1}, r"-1 on more than one axis"),
      ({"data": 0, "fsdp": 8}, r"config.mesh.data=0"),
      ({"fsdp": 8}, r"missing: \['data'\]"),
      ({"data": 1, "fsdp": 4, "tensor": 2}, r"unknown: \['tensor'\]"),
  )
  def test_bad_sizes_raise(self, sizes, message):
    with self.assertRaisesRegex(ValueError, message):
      mesh_lib.make_mesh(sizes)

  def test_explicit_devices(self):
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": -1}, devices=jax.devices()[:4])
    self.assertEqual(dict(mesh.shape), {"data": 2, "fsdp": 2})

  @parameterized.parameters(((8, 1),), ((2, 4),), ((1, 8),), ((4, 2),))
  def test_single_slice_is_jax_make_mesh(self, shape):
    """dcn_data=1 (explicit or absent, as in configs written before it existed) keeps jax.make_mesh's layout."""
    expected = jax.make_mesh(shape, ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    for mesh_config in ({"data": shape[0], "fsdp": shape[1]},
                        {"data": shape[0], "fsdp": shape[1], "dcn_data": 1}):
      self.assertEqual(mesh_lib.make_mesh(mesh_config), expected)

  def test_cpu_devices_of_one_process_are_one_slice(self):
    # On CPU each process counts as one slice (see mesh_lib._granule): one process, one slice.
    with self.assertRaisesRegex(ValueError, r"config.mesh.dcn_data=2 but the devices \(cpu\) are not a "
                                r"multi-slice TPU/GPU job \(no slice_index to go by\) and come from 1 process\(es\)"
                                r".*set --config.mesh.dcn_data=1"):
      mesh_lib.make_mesh({"data": 2, "fsdp": 4, "dcn_data": 2})


@dataclasses.dataclass(frozen=True)
class FakeDevice:
  """What mesh_utils reads of a TPU (or GPU) device."""
  id: int
  slice_index: int
  coords: tuple[int, int, int]
  core_on_chip: int = 0
  process_index: int = 0
  platform: str = "tpu"
  device_kind: str = "TPU v4"


@dataclasses.dataclass(frozen=True)
class FakeCpuDevice:
  """A CPU device of a multi-process run: slice_index 0 on every device (one host), so processes are the slices."""
  id: int
  process_index: int
  slice_index: int = 0
  platform: str = "cpu"
  device_kind: str = "cpu"


def fake_slices(num_slices, chips, kind="TPU v4", platform="tpu", chips_per_host=4):
  """num_slices slices of an x*y*z torus each, in jax.devices() order (slice by slice, x fastest)."""
  devices = []
  for s in range(num_slices):
    for z, y, x in itertools.product(range(chips[2]), range(chips[1]), range(chips[0])):
      i = len(devices)
      devices.append(FakeDevice(id=i, slice_index=s, coords=(x, y, z), process_index=i // chips_per_host,
                                platform=platform, device_kind=kind))
  return devices


class MultiSliceTest(parameterized.TestCase):

  def assert_hybrid_layout(self, grid, devices, data, fsdp, slices):
    self.assertEqual(grid.shape, (data, fsdp))
    self.assertEqual(sorted(d.id for d in grid.flat), sorted(d.id for d in devices))  # each device once
    row_slices = [{d.slice_index for d in row} for row in grid]
    for row in row_slices:
      self.assertLen(row, 1)  # an fsdp group (the devices of one data index) lies inside one slice
    # The data axis covers every slice, data // slices consecutive data indices per slice, in slice order.
    order = sorted({d.slice_index for d in devices})
    self.assertLen(order, slices)
    self.assertEqual([row.pop() for row in row_slices], [s for s in order for _ in range(data // slices)])

  @parameterized.named_parameters(
      # 2 slices x 4 chips (2x2x1 each, v4-8).
      ("2x4_data2_fsdp4", 2, (2, 2, 1), "TPU v4", 2, 4),
      ("2x4_data4_fsdp2", 2, (2, 2, 1), "TPU v4", 4, 2),
      ("2x4_data8_fsdp1", 2, (2, 2, 1), "TPU v4", 8, 1),
      ("2x4_data_rest", 2, (2, 2, 1), "TPU v4", -1, 2),
      # 4 slices x 16 chips: v4-32 (2x2x4) and v5e-16 (4x4, physical axes may be split on v5e).
      ("4x16_v4_data8_fsdp8", 4, (2, 2, 4), "TPU v4", 8, 8),
      ("4x16_v4_data4_fsdp16", 4, (2, 2, 4), "TPU v4", 4, 16),
      ("4x16_v5e_data8_fsdp8", 4, (4, 4, 1), "TPU v5 lite", 8, 8),
      ("4x16_v5e_data4_fsdp16", 4, (4, 4, 1), "TPU v5 lite", 4, 16),
      # 2 x v5p-128 (4x4x4 each): configs/sd15.py's 2xv5p-128 preset.
      ("2x64_v5p_data32_fsdp4", 2, (4, 4, 4), "TPU v5p", 32, 4),
  )
  def test_fsdp_groups_stay_in_a_slice(self, slices, chips, kind, data, fsdp):
    devices = fake_slices(slices, chips, kind)
    mesh_config = ml_collections.ConfigDict({"data": data, "fsdp": fsdp, "dcn_data": slices})
    grid = mesh_lib.device_grid(mesh_config, devices)
    self.assert_hybrid_layout(grid, devices, mesh_lib.mesh_shape(mesh_config, len(devices))[0],
                              mesh_lib.mesh_shape(mesh_config, len(devices))[1], slices)
    # Inside a slice the layout is the one-slice layout of that slice (topology-aware, as jax.make_mesh's).
    ici = grid[: grid.shape[0] // slices]
    single = mesh_lib.device_grid({"data": ici.shape[0], "fsdp": fsdp}, [d for d in devices if d.slice_index == 0])
    self.assertEqual([d.id for d in ici.flat], [d.id for d in single.flat])

  def test_make_mesh_from_fake_devices(self):
    devices = fake_slices(2, (2, 2, 1))
    mesh = mesh_lib.make_mesh({"data": 4, "fsdp": 2, "dcn_data": 2}, devices=devices)
    self.assertEqual(dict(mesh.shape), {"data": 4, "fsdp": 2})
    self.assertEqual(mesh.axis_types, (AxisType.Auto, AxisType.Auto))
    self.assert_hybrid_layout(mesh.devices, devices, 4, 2, 2)

  def test_gpu_hosts_are_slices(self):
    # JAX gives every GPU host its own slice_index: 4 nodes x 8 GPUs (configs/sd15.py:gpu-4x8).
    devices = [FakeDevice(id=i, slice_index=i // 8, coords=(0, 0, 0), process_index=i // 8, platform="gpu",
                          device_kind="NVIDIA H100 80GB HBM3") for i in range(32)]
    grid = mesh_lib.device_grid({"data": 4, "fsdp": 8, "dcn_data": 4}, devices)
    self.assertEqual([[d.id for d in row] for row in grid], [list(range(8 * n, 8 * n + 8)) for n in range(4)])
    with self.assertRaisesRegex(ValueError, r"span 4 slices \(slice_index 0..3\) but config.mesh.dcn_data=1"):
      mesh_lib.device_grid({"data": 4, "fsdp": 8}, devices)

  def test_cpu_processes_are_slices(self):
    # 2 CPU processes x 4 devices (ids as a jax.distributed CPU run numbers them): a multi-slice rehearsal.
    devices = [FakeCpuDevice(id=i % 4 + 2048 * (i // 4), process_index=i // 4) for i in range(8)]
    grid = mesh_lib.device_grid({"data": 4, "fsdp": 2, "dcn_data": 2}, devices)
    self.assertEqual([[d.id for d in row] for row in grid], [[0, 1], [2, 3], [2048, 2049], [2050, 2051]])
    self.assertEqual([{d.process_index for d in row} for row in grid], [{0}, {0}, {1}, {1}])
    # dcn_data=1 keeps jax.make_mesh's layout over both processes.
    self.assertEqual(mesh_lib.device_grid({"data": 4, "fsdp": 2}, devices).shape, (4, 2))
    with self.assertRaisesRegex(ValueError, r"come from 2 process\(es\).*set --config.mesh.dcn_data=2"):
      mesh_lib.device_grid({"data": 4, "fsdp": 2, "dcn_data": 4}, devices)
    no_slice_index = [FakeDevice(id=i, slice_index=0, coords=(0, 0, 0), process_index=i // 4, platform="gpu",
                                 device_kind="gpu") for i in range(8)]
    no_slice_index = [types.SimpleNamespace(**{k: v for k, v in dataclasses.asdict(d).items() if k != "slice_index"})
                      for d in no_slice_index]
    grid = mesh_lib.device_grid({"data": 2, "fsdp": 4, "dcn_data": 2}, no_slice_index)
    self.assertEqual([{d.process_index for d in row} for row in grid], [{0}, {1}])

  @parameterized.named_parameters(
      ("slices_not_declared", 2, {"data": 2, "fsdp": 4},
       r"the devices span 2 slices \(slice_index 0..1\) but config.mesh.dcn_data=1; set "
       r"--config.mesh.dcn_data=2"),
      ("too_many_declared", 2, {"data": 4, "fsdp": 2, "dcn_data": 4},
       r"span 2 slices \(slice_index 0..1\) but config.mesh.dcn_data=4; set --config.mesh.dcn_data=2"),
      ("one_slice", 1, {"data": 2, "fsdp": 2, "dcn_data": 2},
       r"span 1 slice \(slice_index 0\) but config.mesh.dcn_data=2; set --config.mesh.dcn_data=1"),
      ("data_not_divisible", 2, {"data": 1, "fsdp": 8, "dcn_data": 2},
       r"config.mesh.data=1 is not divisible by config.mesh.dcn_data=2"),
      ("does_not_fit", 2, {"data": 2, "fsdp": 2, "dcn_data": 2},
       r"config.mesh \{'data': 2, 'fsdp': 2\} covers 4 devices but there are 8"),
      ("rest_does_not_divide", 2, {"data": 3, "fsdp": -1, "dcn_data": 3},
       r"fixed axes \(3 devices\) do not divide the 8 devices"),
      ("bad_dcn_data", 2, {"data": 2, "fsdp": 4, "dcn_data": 0}, r"config.mesh.dcn_data=0 must be a positive"),
      ("unknown_field", 2, {"data": 2, "fsdp": 4, "dcn_fsdp": 2}, r"unknown: \['dcn_fsdp'\]"),
  )
  def test_errors(self, slices, mesh_config, message):
    devices = fake_slices(slices, (2, 2, 1)) if slices == 2 else fake_slices(1, (2, 2, 1))
    with self.assertRaisesRegex(ValueError, message):
      mesh_lib.device_grid(mesh_config, devices)

  def test_uneven_slices(self):
    devices = fake_slices(1, (2, 2, 2)) + [dataclasses.replace(d, id=d.id + 8, slice_index=1)
                                           for d in fake_slices(1, (2, 2, 1))]
    with self.assertRaisesRegex(ValueError, r"needs 6 devices in each slice, but slice_index -> devices is "
                                r"\{0: 8, 1: 4\}"):
      mesh_lib.device_grid({"data": 2, "fsdp": 6, "dcn_data": 2}, devices)

  def test_axis_that_does_not_map_onto_the_torus(self):
    # v5p-128 is a 4x4x4 torus; jax.make_mesh does not split v5p axes, so fsdp=8 has no layout.
    with self.assertRaisesRegex(ValueError, r"config.mesh \{'data': 8, 'fsdp': 8\} does not map onto the physical "
                                r"topology of its 64 devices \(4x4x4 chips; e.g. fsdp in \[4, 16, 64\]\)"):
      mesh_lib.device_grid({"data": 8, "fsdp": 8}, fake_slices(1, (4, 4, 4), "TPU v5p"))
    with self.assertRaisesRegex(ValueError, r"the per-slice mesh \{'data': 8, 'fsdp': 8\} does not map"):
      mesh_lib.device_grid({"data": 16, "fsdp": 8, "dcn_data": 2}, fake_slices(2, (4, 4, 4), "TPU v5p"))


if __name__ == "__main__":
  absltest.main()
