"""A pod rehearsal on this machine: 4 JAX processes x 2 CPU devices train the tiny config as a 4-host slice would.

One process is preempted (SIGTERM) mid-run: every process saves the same step and exits with the preemption
status; the same 4 commands started again resume, and the losses equal an uninterrupted 4-process run. The
periodic sampler runs on every process and its grid is written once, by process 0.

Compilation: JAX writes its persistent cache from process 0 only, and with jax 0.10.2 on CPU the processes' cache
keys differ, so a shared cache would let process 0 load while the others compile, and a loaded and a fresh
executable can disagree on their collectives and hang (see WORKSPACE.md). So each process runs through
`pod_process.py`, which gives it a cache of its own that it writes too: the first launch compiles everywhere (with
the tests' cheap compile settings), the two later launches load everywhere, each process its own executables. The
periodic sampler runs in the resumed launch only. The teacher is a diffusers folder, as on a pod (no init programs to
compile in the 12 process starts), and the teacher takes one solver step per window: the rehearsal is about processes.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

from absl.testing import absltest
import numpy as np

from conftest import CHEAP_COMPILE_XLA_FLAGS
from perflow_jax import metrics
from perflow_jax import preemption
from trainer_testutil import write_tiny_teacher

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_PROCESSES = 4
TOTAL_STEPS = 5
TIMEOUT_S = 900
XLA_FLAGS = "--xla_force_host_platform_device_count=2 " + CHEAP_COMPILE_XLA_FLAGS


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class PodRehearsalTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp(prefix="perflow_pod_")
    # The teacher as a pod has it, a diffusers folder: the 12 process starts read weights instead of each compiling
    # the three init programs of the random initialisation.
    cls.teacher = write_tiny_teacher(cls.root)

  def _launch(self, workdir: str, tag: str, sample: bool = False) -> list[tuple[subprocess.Popen, str]]:
    """The same command on 4 'hosts'; only the process id differs, as on a pod (there JAX finds it itself)."""
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS=XLA_FLAGS, JAX_PLATFORMS="cpu",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(NUM_PROCESSES))
    procs = []
    for pid in range(NUM_PROCESSES):
      cmd = [sys.executable, os.path.join(REPO, "tests", "pod_process.py"), "--config=configs/tiny.py",
             f"--workdir={workdir}",
             f"--config.total_steps={TOTAL_STEPS}", "--config.log_every=1", "--config.checkpoint_every=100",
             "--config.mesh.data=2", "--config.mesh.fsdp=4", f"--config.sample_every={TOTAL_STEPS if sample else 0}",
             "--config.sample.num_steps=(4,)", f"--config.model.pretrained={self.teacher}",
             "--config.perflow.solver_steps=1"]  # processes, not numerics: a quarter of the teacher's work per step
      log_path = os.path.join(self.root, f"{tag}.p{pid}.log")
      with open(log_path, "wb") as log:  # a file, not a pipe nobody reads, which could fill up and block
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=dict(
            env, JAX_PROCESS_ID=str(pid), JAX_COMPILATION_CACHE_DIR=os.path.join(self.root, f"jit_cache.p{pid}")))
      self.addCleanup(lambda p=proc: p.poll() is None and p.kill())
      procs.append((proc, log_path))
    return procs

  def _wait(self, procs, expected_rc: int) -> list[str]:
    logs = []
    for proc, log_path in procs:
      rc = proc.wait(timeout=TIMEOUT_S)
      with open(log_path, errors="replace") as f:
        logs.append(f.read())
      self.assertEqual(rc, expected_rc, f"{log_path} exited {rc}:\n{logs[-1][-4000:]}")
    return logs

  def _losses(self, workdir: str) -> dict[int, float]:
    records = metrics.read_metrics(workdir)
    steps = [r["step"] for r in records]
    self.assertEqual(len(steps), len(set(steps)), f"a step was logged twice: {steps}")
    return {r["step"]: r["loss"] for r in records}

  def test_preempt_one_host_then_resume_matches_uninterrupted(self):
    # Uninterrupted reference.
    straight = os.path.join(self.root, "straight")
    self._wait(self._launch(straight, "straight"), 0)
    reference = self._losses(straight)
    self.assertEqual(sorted(reference), list(range(1, TOTAL_STEPS + 1)))

    # The same run, one host preempted once step 1 was logged.
    run = os.path.join(self.root, "run")
    procs = self._launch(run, "first")
    deadline = time.time() + TIMEOUT_S
    while not (os.path.exists(os.path.join(run, "metrics.jsonl")) and
               any(r["step"] >= 1 for r in metrics.read_metrics(run))):
      for proc, log_path in procs:
        if proc.poll() is not None:
          with open(log_path, errors="replace") as f:
            self.fail(f"{log_path} exited {proc.returncode} before step 1:\n{f.read()[-4000:]}")
      self.assertLess(time.time(), deadline, "the run did not reach step 1")
      time.sleep(0.2)
    procs[2][0].send_signal(signal.SIGTERM)  # one host only, as a maintenance event would
    logs = self._wait(procs, preemption.PREEMPTED_EXIT_CODE)
    saved = [re.findall(r"Preempted: checkpoint saved at step (\d+)", log) for log in logs]
    self.assertTrue(all(len(s) == 1 for s in saved), saved)
    stopped_at = int(saved[0][0])
    self.assertEqual({int(s[0]) for s in saved}, {stopped_at})  # every process saved the same step
    self.assertGreaterEqual(stopped_at, 1)
    self.assertLess(stopped_at, TOTAL_STEPS)
    self.assertEqual(sorted(os.listdir(os.path.join(run, "checkpoints"))), [str(stopped_at)])

    # Start all 4 again: they resume and finish.
    logs = self._wait(self._launch(run, "resumed", sample=True), 0)
    for log in logs:
      self.assertIn(f"Resumed from step {stopped_at}.", log)
    resumed = self._losses(run)
    self.assertEqual(sorted(resumed), list(range(1, TOTAL_STEPS + 1)))
    for step in range(1, TOTAL_STEPS + 1):
      np.testing.assert_allclose(resumed[step], reference[step], rtol=1e-6, err_msg=f"step {step}")

    # The periodic sampler ran on every process; process 0 alone wrote the grid.
    self.assertEqual(os.listdir(os.path.join(run, "samples")), [f"step_{TOTAL_STEPS:07d}.png"])
    self.assertEqual(["Samples of step" in log for log in logs], [True, False, False, False])
    with open(os.path.join(run, "config.json")) as f:
      self.assertEqual(json.load(f)["mesh"]["fsdp"], 4)


if __name__ == "__main__":
  absltest.main()
