"""The multi-process start-up decision per platform (TPU VM, GKE, SLURM, plain CPU), with the environment, the
platform and JAX's metadata look-ups faked: nothing here contacts any address."""

import os
import subprocess
import sys
import tempfile
from unittest import mock

from absl.testing import absltest
import jax
from jax._src import clusters  # JAX's cluster detection, exercised with faked metadata answers
from jax._src.clusters import cloud_tpu_cluster
import ml_collections

from perflow_jax.parallel import distributed


def _dist(**kw):
  base = {"coordinator_address": "", "num_processes": 0, "process_id": -1, "auto_detect": True}
  base.update(kw)
  return base


class DetectPlatformTest(absltest.TestCase):

  def test_jax_platforms_decides_when_set(self):
    self.assertEqual(distributed.detect_platform({"JAX_PLATFORMS": "cpu"}, lambda: {"0x1ae0"}), "cpu")
    self.assertEqual(distributed.detect_platform({"JAX_PLATFORMS": "tpu,cpu"}, set), "tpu")
    self.assertEqual(distributed.detect_platform({"JAX_PLATFORMS": "cuda"}, set), "gpu")

  def test_pci_vendor_ids(self):
    self.assertEqual(distributed.detect_platform({}, lambda: {"0x8086", "0x1ae0"}), "tpu")  # Google: TPU chips
    self.assertEqual(distributed.detect_platform({}, lambda: {"0x10de"}), "gpu")  # NVIDIA
    self.assertEqual(distributed.detect_platform({}, lambda: {"0x8086"}), "cpu")

  def test_reads_a_pci_tree(self):
    root = tempfile.mkdtemp()
    for i, vendor in enumerate(("0x8086\n", "0x1ae0\n")):
      os.makedirs(os.path.join(root, f"0000:00:0{i}.0"))
      with open(os.path.join(root, f"0000:00:0{i}.0", "vendor"), "w") as f:
        f.write(vendor)
    self.assertEqual(distributed._pci_vendors(root), {"0x8086", "0x1ae0"})


class DistributedArgsTest(absltest.TestCase):

  def test_plain_cpu_or_gpu_process_needs_nothing(self):
    for platform in ("cpu", "gpu"):
      self.assertIsNone(distributed.distributed_args(_dist(), env={}, platform=platform))
      self.assertIsNone(distributed.distributed_args(None, env={}, platform=platform))
      self.assertIsNone(distributed.distributed_args(_dist(), env={"SLURM_NTASKS": "1", "OMPI_COMM_WORLD_SIZE": "1"},
                                                     platform=platform))
    self.assertIsNone(distributed.distributed_args(_dist(num_processes=1), env={"SLURM_NTASKS": "4"}, platform="gpu"))

  def test_tpu_vm_always_initialises(self):
    # One host or a pod slice: the worker list comes from the VM's metadata, which only JAX reads; no variable is set.
    self.assertEqual(distributed.distributed_args(_dist(), env={}, platform="tpu"), {})
    self.assertEqual(distributed.distributed_args(_dist(), env={"TPU_WORKER_HOSTNAMES": "w0,w1"}, platform="tpu"), {})
    self.assertEqual(distributed.distributed_args(_dist(coordinator_address="w0:8476"), env={}, platform="tpu"),
                     {"coordinator_address": "w0:8476"})
    self.assertIsNone(distributed.distributed_args(_dist(auto_detect=False), env={}, platform="tpu"))
    self.assertIsNone(distributed.distributed_args(_dist(num_processes=1), env={}, platform="tpu"))

  def test_cluster_launchers_on_gpu_and_cpu(self):
    for env in ({"SLURM_NTASKS": "32"}, {"SLURM_NTASKS": "4(x2)"}, {"OMPI_COMM_WORLD_SIZE": "2"},
                {"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, {"MEGASCALE_NUM_SLICES": "2"}):
      self.assertEqual(distributed.distributed_args(_dist(), env=env, platform="gpu"), {}, env)
      self.assertIsNone(distributed.distributed_args(_dist(auto_detect=False), env=env, platform="gpu"), env)

  def test_explicit_config_and_environment(self):
    got = distributed.distributed_args(_dist(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=2),
                                       env={"SLURM_NTASKS": "8"}, platform="gpu")
    self.assertEqual(got, {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2})
    env = {"JAX_COORDINATOR_ADDRESS": "h:9", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    self.assertEqual(distributed.distributed_args(_dist(), env=env),
                     {"coordinator_address": "h:9", "num_processes": 2, "process_id": 1})
    self.assertEqual(distributed.distributed_args(_dist(process_id=0), env=env, platform="tpu"),
                     {"coordinator_address": "h:9", "num_processes": 2, "process_id": 0})

  def test_incomplete_or_wrong_settings_raise(self):
    with self.assertRaisesRegex(ValueError, r"2 processes are configured but coordinator_address=None"):
      distributed.distributed_args(_dist(num_processes=2, process_id=0), env={})
    with self.assertRaisesRegex(ValueError, r"process_id=3 is out of range for num_processes=2"):
      distributed.distributed_args(_dist(coordinator_address="h:1", num_processes=2, process_id=3), env={})
    with self.assertRaisesRegex(ValueError, r"JAX_NUM_PROCESSES='two' is not an integer"):
      distributed.distributed_args(_dist(), env={"JAX_NUM_PROCESSES": "two"})
    with self.assertRaisesRegex(ValueError, r"unknown fields \['coordinator'\]"):
      distributed.distributed_args({"coordinator": "h:1"}, env={})


class MaybeInitializeTest(absltest.TestCase):

  def _patched(self, initialized=False, side_effect=None):
    init = mock.patch.object(jax.distributed, "initialize", side_effect=side_effect)
    done = mock.patch.object(jax.distributed, "is_initialized", return_value=initialized)
    # After a (mocked) initialize the trainer logs the process layout; keep that local and cheap.
    count = mock.patch.object(jax, "process_count", return_value=1)
    return init, done, count

  def test_calls_jax_only_when_configured(self):
    single = ml_collections.ConfigDict({"distributed": _dist()})
    multi = ml_collections.ConfigDict({"distributed": _dist(coordinator_address="h:7", num_processes=2,
                                                            process_id=1)})
    init_p, done_p, count_p = self._patched()
    with init_p as init, done_p, count_p:
      self.assertFalse(distributed.maybe_initialize_distributed(single, env={"SLURM_NTASKS": "1"}, platform="cpu"))
      init.assert_not_called()
      self.assertTrue(distributed.maybe_initialize_distributed(multi, env={}, platform="cpu"))
      init.assert_called_once_with(coordinator_address="h:7", num_processes=2, process_id=1)
    init_p, done_p, count_p = self._patched(initialized=True)
    with init_p as init, done_p, count_p:
      self.assertFalse(distributed.maybe_initialize_distributed(multi, env={}, platform="cpu"))
      init.assert_not_called()

  def test_tpu_vm_single_and_multi_host_initialise_without_arguments(self):
    config = ml_collections.ConfigDict({"distributed": _dist()})
    for env in ({}, {"TPU_WORKER_HOSTNAMES": "t1k-w-0,t1k-w-1"}):  # TPU VM (metadata) and GKE (webhook variables)
      init_p, done_p, count_p = self._patched()
      with init_p as init, done_p, count_p:
        self.assertTrue(distributed.maybe_initialize_distributed(config, env=env, platform="tpu"))
        init.assert_called_once_with()

  def test_announced_processes_without_a_runtime_is_a_clear_error(self):
    config = ml_collections.ConfigDict({"distributed": _dist(auto_detect=False)})
    init_p, done_p, count_p = self._patched()
    with init_p as init, done_p, count_p:
      with self.assertRaisesRegex(RuntimeError, r"SLURM_NTASKS=8 says this is one of 8 processes.*"
                                  r"--config.distributed.auto_detect=true"):
        distributed.maybe_initialize_distributed(config, env={"SLURM_NTASKS": "8"}, platform="gpu")
      init.assert_not_called()
      # num_processes=1 is an explicit "run alone": no error.
      alone = ml_collections.ConfigDict({"distributed": _dist(auto_detect=False, num_processes=1)})
      self.assertFalse(distributed.maybe_initialize_distributed(alone, env={"SLURM_NTASKS": "8"}, platform="gpu"))

  def test_failed_initialize_names_the_settings(self):
    config = ml_collections.ConfigDict({"distributed": _dist()})
    init_p, done_p, count_p = self._patched(side_effect=ValueError("coordinator_address should be defined."))
    with init_p, done_p, count_p:
      with self.assertRaisesRegex(RuntimeError, r"failed on platform 'gpu'.*coordinator_address should be defined.*"
                                  r"--config.distributed.coordinator_address=HOST:PORT"):
        distributed.maybe_initialize_distributed(config, env={"SLURM_NTASKS": "2"}, platform="gpu")

  def test_without_a_client_several_processes_fail_clearly(self):
    with mock.patch.object(jax, "process_count", return_value=4), \
        mock.patch.object(distributed, "_client", return_value=None):
      with self.assertRaisesRegex(RuntimeError, r"one of 4 processes but jax.distributed has no client.*"
                                  r"maybe_initialize_distributed"):
        distributed.barrier("x")
      with self.assertRaisesRegex(RuntimeError, r"has no client"):
        distributed.all_gather_strings("y", "1")
    self.assertEqual(distributed.all_gather_strings("z", "7"), ["7"])  # one process: no runtime needed
    distributed.barrier("one process")

  def test_import_starts_nothing(self):
    code = ("import jax; from jax._src import xla_bridge; import perflow_jax.parallel.mesh, "
            "perflow_jax.parallel.distributed, perflow_jax.parallel.sharding, perflow_jax.checkpoint, "
            "perflow_jax.metrics; print(jax.distributed.is_initialized(), xla_bridge.backends_are_initialized())")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=repo, JAX_COORDINATOR_ADDRESS="127.0.0.1:1", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         check=True)
    self.assertEqual(out.stdout.split(), ["False", "False"])


class TpuClusterDetectionTest(absltest.TestCase):
  """What ``jax.distributed.initialize()`` (no arguments) resolves on TPU, from faked metadata / GKE variables.

  This is the path ``distributed_args`` hands to JAX on a TPU; the metadata server is replaced by a dict.
  """

  def _resolve(self, metadata, env):
    def get_metadata(key):
      return (metadata[key], 200) if key in metadata else ("", 404)
    with mock.patch.object(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True), \
        mock.patch.object(cloud_tpu_cluster, "get_metadata", side_effect=get_metadata), \
        mock.patch.object(cloud_tpu_cluster.BaseTpuCluster, "wait_for_coordinator"), \
        mock.patch.dict(os.environ, env, clear=True):
      return clusters.ClusterEnv.auto_detect_unset_distributed_params(None, None, None, None, None, 10)

  def test_tpu_vm_pod_slice_from_metadata(self):
    metadata = {"agent-worker-number": "2", "worker-network-endpoints": "a:b:10.0.0.5,a:b:10.0.0.6,a:b:10.0.0.7,"
                "a:b:10.0.0.8", "tpu-env": "ACCELERATOR_TYPE: 'v5litepod-16'\n"}
    address, count, pid, _ = self._resolve(metadata, {})
    self.assertEqual((address, count, pid), ("10.0.0.5:8482", 4, 2))

  def test_tpu_vm_single_host(self):
    metadata = {"agent-worker-number": "0", "worker-network-endpoints": "a:b:10.0.0.5", "tpu-env": ""}
    address, count, pid, _ = self._resolve(metadata, {})
    self.assertEqual((address, count, pid), ("10.0.0.5:8482", 1, 0))

  def test_multislice_queued_resource(self):
    metadata = {"agent-worker-number": "1", "worker-network-endpoints": "a:b:10.0.1.1,a:b:10.0.1.2",
                "tpu-env": "MEGASCALE_NUM_SLICES: '2'\nMEGASCALE_SLICE_ID: '1'\n"
                           "MEGASCALE_COORDINATOR_ADDRESS: '10.0.0.1:8080'\n"}
    address, count, pid, _ = self._resolve(metadata, {})
    self.assertEqual((address, count, pid), ("10.0.0.1:8482", 4, 3))  # slice 1, worker 1 of 2 per slice

  def test_gke_from_webhook_variables(self):
    env = {"TPU_WORKER_HOSTNAMES": "job-0-0.svc,job-0-1.svc", "TPU_WORKER_ID": "1", "TPU_SKIP_MDS_QUERY": "1"}
    address, count, pid, _ = self._resolve({}, env)
    self.assertEqual((address, count, pid), ("job-0-0.svc:8482", 2, 1))


if __name__ == "__main__":
  absltest.main()
