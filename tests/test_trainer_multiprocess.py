"""Two processes on localhost (jax.distributed, gloo CPU collectives) train the tiny config, then resume."""

import os
import socket
import subprocess
import sys
import tempfile

from absl.testing import absltest
import numpy as np

from perflow_jax import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run_two_processes(workdir: str, total_steps: int) -> None:
  port = free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  # No persistent compilation cache here: when one process loads a cached executable and the other compiles
  # afresh, their cross-process (gloo) collectives stop matching and the run hangs (seen with jax 0.10.2 on CPU).
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  procs = []
  for pid in range(2):
    cmd = [sys.executable, "-m", "perflow_jax.train", "--config=configs/tiny.py", f"--workdir={workdir}",
           f"--config.total_steps={total_steps}", "--config.log_every=1", "--config.checkpoint_every=2",
           "--config.mesh.data=2", "--config.mesh.fsdp=4",
           f"--config.distributed.coordinator_address=localhost:{port}", "--config.distributed.num_processes=2",
           f"--config.distributed.process_id={pid}"]
    log = open(os.path.join(workdir + f".p{pid}.log"), "w")
    procs.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log))
  for proc, log in procs:
    rc = proc.wait(timeout=900)
    log.close()
    if rc:
      with open(log.name) as f:
        raise AssertionError(f"process exited {rc}:\n{f.read()[-4000:]}")


class MultiProcessTrainerTest(absltest.TestCase):

  def test_two_processes_train_and_resume(self):
    workdir = os.path.join(tempfile.mkdtemp(), "run")
    run_two_processes(workdir, total_steps=4)
    first = {r["step"]: r["loss"] for r in metrics.read_metrics(workdir)}
    self.assertEqual(sorted(first), [1, 2, 3, 4])
    self.assertTrue(os.path.isdir(os.path.join(workdir, "checkpoints", "4")))

    run_two_processes(workdir, total_steps=6)  # resumes from step 4 on both processes
    resumed = {r["step"]: r["loss"] for r in metrics.read_metrics(workdir)}
    self.assertEqual(sorted(resumed), [1, 2, 3, 4, 5, 6])
    for step in range(1, 5):  # the resumed run kept the first run's log and added steps 5 and 6
      self.assertEqual(resumed[step], first[step])
    self.assertTrue(all(np.isfinite(v) for v in resumed.values()))
    with open(workdir + ".p0.log") as f:
      self.assertIn("Resumed from step 4", f.read())


if __name__ == "__main__":
  absltest.main()
