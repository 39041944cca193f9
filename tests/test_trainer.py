"""The trainer end to end on the tiny config: meshes agree, loss falls, a SIGKILLed run resumes exactly."""

import os
import signal
import subprocess
import sys
import tempfile
import time

from absl.testing import absltest
import numpy as np

from perflow_jax import trainer
from trainer_testutil import losses
from trainer_testutil import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12


def committed_steps(workdir: str) -> list[int]:
  ckpt = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt):
    return []
  return sorted(int(d) for d in os.listdir(ckpt) if d.isdigit() and os.path.isdir(os.path.join(ckpt, d)))


class TrainerTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp()
    cls.base_dir = os.path.join(cls.root, "data8")
    cls.base = trainer.train(tiny_config(STEPS, 8, 1, checkpoint_every=4), cls.base_dir)
    cls.base_losses = losses(cls.base_dir)

  def test_writes_the_workdir_layout(self):
    for name in ("config.json", "metrics.jsonl", "tensorboard", "checkpoints"):
      self.assertTrue(os.path.exists(os.path.join(self.base_dir, name)), name)
    self.assertEqual(sorted(self.base_losses), list(range(1, STEPS + 1)))
    self.assertEqual(committed_steps(self.base_dir), [8, 12])  # keep_checkpoints=2

  def test_loss_goes_down(self):
    first = np.mean([self.base_losses[s] for s in (1, 2, 3)])
    last = np.mean([self.base_losses[s] for s in (STEPS - 2, STEPS - 1, STEPS)])
    self.assertLess(last, 0.8 * first, (first, last))

  def test_meshes_agree(self):
    workdir = os.path.join(self.root, "data2_fsdp4")
    trainer.train(tiny_config(4, 2, 4), workdir)
    other = losses(workdir)
    for step in range(1, 5):
      np.testing.assert_allclose(other[step], self.base_losses[step], rtol=1e-4, err_msg=f"step {step}")

  def test_sigkill_then_resume_matches_uninterrupted(self):
    workdir = os.path.join(self.root, "killed")
    cmd = [sys.executable, "-m", "perflow_jax.train", "--config=configs/tiny.py", f"--workdir={workdir}",
           f"--config.total_steps={STEPS}", "--config.log_every=1", "--config.checkpoint_every=4",
           "--config.mesh.data=8", "--config.mesh.fsdp=1"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not committed_steps(workdir) and proc.poll() is None and time.time() < deadline:
      time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = committed_steps(workdir)
    self.assertNotEmpty(killed_at, "the run never committed a checkpoint before it was killed")
    self.assertLess(killed_at[-1], STEPS)
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    resumed = losses(workdir)
    self.assertEqual(sorted(resumed), list(range(1, STEPS + 1)))
    for step in range(1, STEPS + 1):
      self.assertEqual(resumed[step], self.base_losses[step], f"step {step} (killed after {killed_at})")


if __name__ == "__main__":
  absltest.main()
