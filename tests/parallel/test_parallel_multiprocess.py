"""Two real JAX processes on CPU: distributed start-up, a mesh across processes, a preemption that all processes
agree on, and a checkpoint with per-process data iterator state that a second two-process run restores."""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

from absl.testing import absltest

REPO = pathlib.Path(__file__).resolve().parents[2]

_WORKER = textwrap.dedent("""
    import json, pathlib, sys, time
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # Cross-process CPU computations.
    import grain, ml_collections, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from perflow_jax import checkpoint, preemption
    from perflow_jax.parallel import distributed
    from perflow_jax.parallel import mesh as mesh_lib

    mode, workdir = sys.argv[1], pathlib.Path(sys.argv[2])
    config = ml_collections.ConfigDict({
        "checkpoint_every": 1000, "keep_checkpoints": 2,
        "distributed": {"coordinator_address": "", "num_processes": 0, "process_id": -1, "auto_detect": False}})
    assert distributed.maybe_initialize_distributed(config)  # From the JAX_* environment.
    pid = jax.process_index()
    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": -1})
    sharding = NamedSharding(mesh, P("fsdp"))
    it = iter(grain.MapDataset.range(100).to_iter_dataset())
    manager = checkpoint.make_checkpoint_manager(workdir, config)
    out = {"pid": pid, "mesh": dict(mesh.shape), "process_count": jax.process_count()}
    if mode == "train":
      w = jax.make_array_from_callback((8,), sharding, lambda idx: np.arange(8, dtype=np.float32)[idx])
      for _ in range(3 + pid):  # Each process has read a different amount of its shard.
        next(it)
      preempted = preemption.install_handlers()
      checkpoint.save_checkpoint(manager, 1, {"w": w * 0, "step": 1}, {"w": w * 0}, config, it, force=True)
      for step in range(2, 6000):
        if step == 5:
          (workdir / f"ready{pid}").write_text("ok")
        if preempted(step):
          checkpoint.save_checkpoint(manager, step, {"w": w, "step": step}, {"w": w}, config, it, force=True)
          break
        time.sleep(0.01)
      out["stopped_at"] = step
    else:
      abstract = {"w": jax.ShapeDtypeStruct((8,), np.float32, sharding=sharding), "step": 0}
      restored = checkpoint.restore_checkpoint(manager, abstract, {"w": abstract["w"]}, it)
      out["step"] = restored.step
      out["state_step"] = int(restored.state["step"])
      out["next_item"] = int(next(it))
      out["local_w"] = [np.asarray(s.data).tolist() for s in restored.state["w"].addressable_shards]
      out["spec"] = str(restored.state["w"].sharding.spec)
      out["steps_after"] = manager.all_steps()
    checkpoint.close(manager)
    (workdir / f"{mode}{pid}.json").write_text(json.dumps(out))
""")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class TwoProcessTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.workdir = pathlib.Path(tempfile.mkdtemp(prefix="perflow_mp_"))
    self.addCleanup(shutil.rmtree, self.workdir, ignore_errors=True)
    self.script = self.workdir / "worker.py"
    self.script.write_text(_WORKER)

  def _launch(self, mode):
    port = _free_port()
    procs = []
    for pid in range(2):
      env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
                 XLA_FLAGS="--xla_force_host_platform_device_count=2",
                 JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
      # No persistent compilation cache (conftest sets one): JAX writes entries from process 0 only, so in a later
      # launch process 0 would load a program that process 1 compiles afresh, and their collectives hang.
      env.pop("JAX_COMPILATION_CACHE_DIR", None)
      # Output goes to a file: a pipe nobody reads until the end could fill up and block the worker.
      log = open(self.workdir / f"{mode}{pid}.log", "wb")
      self.addCleanup(log.close)
      procs.append(subprocess.Popen([sys.executable, str(self.script), mode, str(self.workdir)], env=env,
                                    stdout=log, stderr=subprocess.STDOUT))
      procs[-1].log_path = self.workdir / f"{mode}{pid}.log"
      self.addCleanup(lambda p=procs[-1]: p.poll() is None and p.kill())
    return procs

  def _finish(self, procs):
    for proc in procs:
      proc.wait(timeout=180)
      self.assertEqual(proc.returncode, 0, proc.log_path.read_text()[-4000:])

  def _result(self, name):
    return json.loads((self.workdir / name).read_text())

  def test_preempt_one_process_then_resume_on_two(self):
    procs = self._launch("train")
    deadline = time.time() + 180
    while not all((self.workdir / f"ready{pid}").exists() for pid in range(2)):
      for proc in procs:
        if proc.poll() is not None:
          self.fail(f"a worker exited early: {proc.log_path.read_text()[-4000:]}")
      self.assertLess(time.time(), deadline, "the workers did not start within 180 s")
      time.sleep(0.1)
    procs[1].send_signal(signal.SIGTERM)  # Only one process is told; both must stop at one step.
    self._finish(procs)
    train = [self._result(f"train{pid}.json") for pid in range(2)]
    self.assertEqual([t["mesh"] for t in train], [{"data": 1, "fsdp": 4}] * 2)
    self.assertEqual([t["process_count"] for t in train], [2, 2])
    stopped_at = train[0]["stopped_at"]
    self.assertEqual(train[1]["stopped_at"], stopped_at)
    data_dir = self.workdir / "checkpoints" / str(stopped_at) / "data"
    self.assertEqual(json.loads((data_dir / "process_0-of-2.json").read_text()), {"next_index": 3})
    self.assertEqual(json.loads((data_dir / "process_1-of-2.json").read_text()), {"next_index": 4})

    self._finish(self._launch("restore"))
    for pid in range(2):
      got = self._result(f"restore{pid}.json")
      self.assertEqual((got["step"], got["state_step"]), (stopped_at, stopped_at))
      self.assertEqual(got["next_item"], 3 + pid)  # Each process resumes its own iterator.
      self.assertEqual(got["spec"], "P('fsdp',)")
      self.assertEqual(got["local_w"], [[4.0 * pid + 2 * i, 4.0 * pid + 2 * i + 1] for i in range(2)])

    # Process 1 alone cannot read its part of the newest step (its data iterator state, which no other process
    # reads): both processes restore the step before, and the newest is moved aside (not deleted), so no process
    # restores a step another could not.
    (self.workdir / "checkpoints" / str(stopped_at) / "data" / "process_1-of-2.json").write_text("{truncated")
    self._finish(self._launch("restore"))
    for pid in range(2):
      got = self._result(f"restore{pid}.json")
      self.assertEqual((got["step"], got["state_step"]), (1, 1))
      self.assertEqual(got["local_w"], [[0.0, 0.0], [0.0, 0.0]])
      self.assertEqual(got["steps_after"], [1])
    self.assertTrue((self.workdir / "checkpoints_damaged" / str(stopped_at) / "state").is_dir())


if __name__ == "__main__":
  absltest.main()
