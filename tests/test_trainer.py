"""The trainer end to end on the tiny config: meshes agree, loss falls, a SIGKILLed run resumes exactly."""

import os
import signal
import subprocess
import sys
import tempfile
import time

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from perflow_jax import metrics
from perflow_jax import throughput
from perflow_jax import trainer
from perflow_jax.weights import pretrained
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

  def test_logs_model_flops_and_the_split_of_wall_time(self):
    records = metrics.read_metrics(self.base_dir)
    config = tiny_config(STEPS, 8, 1)
    unet = pretrained.build_module("unet", dict(config.model.unet), dtype=jnp.float32)
    params = jax.eval_shape(lambda k: unet.init(k, *unet.dummy_inputs(1))["params"], jax.random.key(0))
    # Batch 8 of 16 px images -> 8x8x4 latents (the tiny VAE halves the side); cfg_sync teacher with 4 solver
    # steps + the student's forward and backward: 7 forwards per step.
    forward = throughput.unet_forward_flops(unet, params, jax.ShapeDtypeStruct((8, 8, 8, 4), jnp.float32),
                                            jax.ShapeDtypeStruct((8, 77, unet.config.cross_attention_dim),
                                                                 jnp.float32))
    for r in records:
      np.testing.assert_allclose(r["perf/tflops_per_device"] * 1e12 * r["perf/step_s"] * 8, 7 * forward,
                                 rtol=1e-6)
      self.assertNotIn("perf/mfu", r)  # no bf16 peak for a CPU
      self.assertEqual(r["time/compile_s"], self.base["compile_s"])
    totals = [[r[f"time/{k}_s"] for r in records] for k in ("step", "data_wait", "checkpoint", "sample")]
    for series in totals:
      self.assertEqual(series, sorted(series))  # cumulative
    self.assertGreater(totals[0][-1], 0.0)
    self.assertGreater(totals[2][-1], 0.0)  # the saves at steps 4 and 8
    self.assertEqual(totals[3][-1], 0.0)  # no periodic samples

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
