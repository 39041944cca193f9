"""Topology presets of the configs (configs/sd15.py:v5e-256, ...): they load, validate, fill their devices, and
their mesh lays out on the preset's physical topology (fake TPU/GPU devices)."""

import dataclasses
import itertools

from absl.testing import absltest
from absl.testing import parameterized

from configs import sd15
from configs import sdxl
from perflow_jax import run_config
from perflow_jax import topologies
from perflow_jax.parallel import mesh as mesh_lib

CONFIGS = {"sd15": sd15, "sdxl": sdxl}


@dataclasses.dataclass(frozen=True)
class FakeDevice:
  id: int
  slice_index: int
  coords: tuple[int, int, int]
  process_index: int
  platform: str
  device_kind: str
  core_on_chip: int = 0


def tpu(slices, chips, kind):
  devices = []
  for s in range(slices):
    for z, y, x in itertools.product(range(chips[2]), range(chips[1]), range(chips[0])):
      i = len(devices)
      devices.append(FakeDevice(i, s, (x, y, z), i // 4, "tpu", kind))
  return devices


def gpu(nodes, per_node):
  # JAX numbers GPU hosts as slices (one slice_index per host).
  return [FakeDevice(i, i // per_node, (0, 0, 0), i // per_node, "gpu", "NVIDIA H100 80GB HBM3")
          for i in range(nodes * per_node)]


# The physical devices of each preset (and of some multi-slice 'NxNAME' ones): v5p-128 is a 4x4x4 torus of 64
# chips, v5p-256 4x4x8 (128 chips), v5e-256 16x16 (256 chips).
DEVICES = {
    ("sd15", "v5p-128"): lambda: tpu(1, (4, 4, 4), "TPU v5p"),
    ("sd15", "v5e-256"): lambda: tpu(1, (16, 16, 1), "TPU v5 lite"),
    ("sd15", "gpu-4x8"): lambda: gpu(4, 8),
    ("sdxl", "v5p-256"): lambda: tpu(1, (4, 4, 8), "TPU v5p"),
    ("sd15", "2xv5p-128"): lambda: tpu(2, (4, 4, 4), "TPU v5p"),
    ("sd15", "4xv5e-256"): lambda: tpu(4, (16, 16, 1), "TPU v5 lite"),
    ("sd15", "2xgpu-4x8"): lambda: gpu(8, 8),
    ("sdxl", "2xv5p-256"): lambda: tpu(2, (4, 4, 8), "TPU v5p"),
}


class TopologyPresetTest(parameterized.TestCase):

  def test_every_preset_is_listed_here(self):
    for c, module in CONFIGS.items():
      for n in module.TOPOLOGIES:
        self.assertIn((c, n), DEVICES)

  @parameterized.named_parameters(*[(f"{c}_{n}", c, n) for c, n in DEVICES])
  def test_preset(self, config_name, name):
    module = CONFIGS[config_name]
    preset = topologies.find_topology(module.TOPOLOGIES, name)
    config = module.get_config(name)
    self.assertEqual(config.to_dict(), module.get_config(f"topology={name}").to_dict())
    recipe = module.get_config()  # a preset changes the mesh, batch, accumulation and teacher, nothing else
    topologies.apply_topology(recipe, module.TOPOLOGIES, name)
    self.assertEqual(config.to_dict(), recipe.to_dict())
    config.model.pretrained = "/path/to/teacher"  # validation needs a teacher source; nothing is read
    run_config.validate_run_config(config)

    mesh, batch, accum = config.mesh, config.data.batch_size, config.optim.grad_accum_steps
    self.assertEqual((mesh.data, mesh.fsdp, mesh.dcn_data), (preset.data, preset.fsdp, preset.dcn_data))
    self.assertEqual(mesh.data * mesh.fsdp, preset.devices)
    self.assertEqual((batch, accum), (preset.global_batch, preset.grad_accum_steps))
    self.assertEqual(config.sharding.teacher, preset.teacher_sharding)
    self.assertEqual(batch % (preset.devices * accum), 0)
    self.assertEqual(preset.per_device_batch * preset.devices * accum, batch)
    if preset.measured_gib is not None:  # the measured step leaves at least 10% of the device's memory free
      self.assertLess(preset.measured_gib, 0.9 * preset.device_memory_gib)

    devices = DEVICES[(config_name, name)]()
    self.assertLen(devices, preset.devices)
    grid = mesh_lib.device_grid(mesh, devices)
    self.assertEqual(grid.shape, (preset.data, preset.fsdp))
    self.assertEqual(sorted(d.id for d in grid.flat), list(range(preset.devices)))
    for row in grid:  # every FSDP group inside one slice
      self.assertLen({d.slice_index for d in row}, 1)
    self.assertLen({d.slice_index for d in grid[:, 0]}, preset.dcn_data)

  def test_sd15_recipe_batch(self):
    for name, preset in sd15.TOPOLOGIES.items():
      self.assertEqual(preset.global_batch, 1024, name)  # the reference's global batch

  def test_slices_of_a_preset(self):
    one, two = sd15.TOPOLOGIES["v5e-256"], topologies.find_topology(sd15.TOPOLOGIES, "2xv5e-256")
    self.assertEqual((two.devices, two.data, two.fsdp, two.dcn_data), (512, 32, 16, 2))
    self.assertEqual((two.global_batch, two.grad_accum_steps, two.per_device_batch), (1024, 1, 2))
    self.assertEqual(one.per_device_batch, 4)
    self.assertIsNone(two.measured_gib)
    self.assertIsNone(topologies.find_topology(sd15.TOPOLOGIES, "0xv5e-256"))

  def test_argument_errors(self):
    with self.assertRaisesRegex(ValueError, r"unknown topology 'v5p-512'; this config's presets: \['gpu-4x8', "
                                r"'v5e-256', 'v5p-128'\], or N slices of one of them as 'NxNAME'"):
      sd15.get_config("topology=v5p-512")
    with self.assertRaisesRegex(ValueError, r"unknown topology '2xv5p-512'"):
      sd15.get_config("topology=2xv5p-512")
    with self.assertRaisesRegex(ValueError, r"global_batch=1024 must be a multiple of devices \* grad_accum_steps "
                                r"= 2048"):
      sd15.get_config("8xv5e-256")
    with self.assertRaisesRegex(ValueError, r"unknown config argument 'v5p-512'"):
      sd15.get_config("v5p-512")
    with self.assertRaisesRegex(ValueError, r"runlocal and topology='v5e-256' exclude each other"):
      sd15.get_config("runlocal,v5e-256")
    self.assertEqual(sd15.get_config("runlocal").data.batch_size, 8)  # no preset: the config as before
    self.assertEqual(sd15.get_config().mesh.to_dict(), {"data": 1, "fsdp": -1, "dcn_data": 1})

  def test_inconsistent_preset_is_rejected(self):
    with self.assertRaisesRegex(ValueError, r"data \* fsdp = 32 must equal devices = 64"):
      topologies.Topology(devices=64, device_memory_gib=95, data=8, fsdp=4, global_batch=1024)
    with self.assertRaisesRegex(ValueError, r"data=4 must be a multiple of dcn_data=3"):
      topologies.Topology(devices=16, device_memory_gib=95, data=4, fsdp=4, dcn_data=3, global_batch=64)
    with self.assertRaisesRegex(ValueError, r"global_batch=100 must be a multiple of devices \* grad_accum_steps "
                                r"= 64"):
      topologies.Topology(devices=32, device_memory_gib=80, data=4, fsdp=8, global_batch=100, grad_accum_steps=2)


if __name__ == "__main__":
  absltest.main()
