"""Mesh construction from config and the multi-process start-up decision."""

import os
import subprocess
import sys
from unittest import mock

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


def _dist(**kw):
  base = {"coordinator_address": "", "num_processes": 0, "process_id": -1, "auto_detect": True}
  base.update(kw)
  return base


class DistributedArgsTest(absltest.TestCase):

  def test_single_process_needs_nothing(self):
    self.assertIsNone(mesh_lib.distributed_args(_dist(), env={}))
    self.assertIsNone(mesh_lib.distributed_args(None, env={}))
    self.assertIsNone(mesh_lib.distributed_args(_dist(num_processes=1), env={"SLURM_NTASKS": "4"}))
    self.assertIsNone(mesh_lib.distributed_args(_dist(), env={"TPU_WORKER_HOSTNAMES": "host0"}))
    self.assertIsNone(mesh_lib.distributed_args(_dist(), env={"SLURM_NTASKS": "1", "OMPI_COMM_WORLD_SIZE": "1"}))

  def test_explicit_config(self):
    got = mesh_lib.distributed_args(_dist(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=2),
                                    env={})
    self.assertEqual(got, {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2})

  def test_environment_and_config_precedence(self):
    env = {"JAX_COORDINATOR_ADDRESS": "h:9", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    self.assertEqual(mesh_lib.distributed_args(_dist(), env=env),
                     {"coordinator_address": "h:9", "num_processes": 2, "process_id": 1})
    self.assertEqual(mesh_lib.distributed_args(_dist(process_id=0), env=env),
                     {"coordinator_address": "h:9", "num_processes": 2, "process_id": 0})

  def test_cluster_auto_detection(self):
    for env in ({"SLURM_NTASKS": "4"}, {"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, {"OMPI_COMM_WORLD_SIZE": "2"},
                {"MEGASCALE_NUM_SLICES": "2"}):
      self.assertEqual(mesh_lib.distributed_args(_dist(), env=env), {}, env)
      self.assertIsNone(mesh_lib.distributed_args(_dist(auto_detect=False), env=env), env)

  def test_incomplete_or_wrong_settings_raise(self):
    with self.assertRaisesRegex(ValueError, r"2 processes are configured but coordinator_address=None"):
      mesh_lib.distributed_args(_dist(num_processes=2, process_id=0), env={})
    with self.assertRaisesRegex(ValueError, r"process_id=3 is out of range for num_processes=2"):
      mesh_lib.distributed_args(_dist(coordinator_address="h:1", num_processes=2, process_id=3), env={})
    with self.assertRaisesRegex(ValueError, r"JAX_NUM_PROCESSES='two' is not an integer"):
      mesh_lib.distributed_args(_dist(), env={"JAX_NUM_PROCESSES": "two"})
    with self.assertRaisesRegex(ValueError, r"unknown fields \['coordinator'\]"):
      mesh_lib.distributed_args({"coordinator": "h:1"}, env={})

  def test_maybe_initialize_calls_jax_only_when_configured(self):
    single = ml_collections.ConfigDict({"distributed": _dist()})
    multi = ml_collections.ConfigDict({"distributed": _dist(coordinator_address="h:7", num_processes=2,
                                                            process_id=1)})
    with mock.patch.object(jax.distributed, "initialize") as init, \
        mock.patch.object(jax.distributed, "is_initialized", return_value=False), \
        mock.patch.dict(os.environ, {"SLURM_NTASKS": "1"}):
      self.assertFalse(mesh_lib.maybe_initialize_distributed(single))
      init.assert_not_called()
      self.assertTrue(mesh_lib.maybe_initialize_distributed(multi))
      init.assert_called_once_with(coordinator_address="h:7", num_processes=2, process_id=1)
    with mock.patch.object(jax.distributed, "initialize") as init, \
        mock.patch.object(jax.distributed, "is_initialized", return_value=True):
      self.assertFalse(mesh_lib.maybe_initialize_distributed(multi))
      init.assert_not_called()

  def test_import_starts_nothing(self):
    code = ("import jax; from jax._src import xla_bridge; import perflow_jax.parallel.mesh, "
            "perflow_jax.parallel.sharding, perflow_jax.checkpoint, perflow_jax.metrics; "
            "print(jax.distributed.is_initialized(), xla_bridge.backends_are_initialized())")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=repo, JAX_COORDINATOR_ADDRESS="127.0.0.1:1", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         check=True)
    self.assertEqual(out.stdout.split(), ["False", "False"])


if __name__ == "__main__":
  absltest.main()
