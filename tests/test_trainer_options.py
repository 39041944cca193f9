"""Trainer options on the tiny config: bfloat16 + remat + gradient accumulation + periodic samples; NaN stops."""

import os
import tempfile

from absl.testing import absltest
import numpy as np
from PIL import Image

from configs import tiny
from perflow_jax import checkpoint
from perflow_jax import metrics
from perflow_jax import trainer


class TrainerOptionsTest(absltest.TestCase):

  def test_bfloat16_remat_accumulation_and_periodic_samples(self):
    config = tiny.get_config()
    config.total_steps, config.log_every, config.checkpoint_every = 2, 1, 2
    config.model.dtype = config.model.teacher_dtype = "bfloat16"
    config.model.remat = True
    config.optim.grad_accum_steps = 2
    config.sample_every = 2
    config.sample.num_steps = (4,)  # one sampler compile: the periodic grid in bfloat16 is what is tested
    workdir = tempfile.mkdtemp()
    trainer.train(config, workdir)
    records = metrics.read_metrics(workdir)
    self.assertEqual([r["step"] for r in records], [1, 2])
    self.assertTrue(all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in records))
    grid = np.asarray(Image.open(os.path.join(workdir, "samples", "step_0000002.png")))
    # 1 row (PeRFlow-4) x 2 prompts of 16 px images with label bands.
    self.assertEqual(grid.shape[2], 3)
    self.assertGreater(grid.shape[0], 16)
    self.assertGreater(grid.shape[1], 2 * 16)
    self.assertNotEmpty(os.listdir(os.path.join(workdir, "tensorboard")))

  def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(self):
    config = tiny.get_config()
    config.total_steps, config.log_every, config.checkpoint_every = 8, 1, 1
    config.optim.learning_rate = 1e30  # parameters blow up to inf within a step or two
    workdir = tempfile.mkdtemp()
    with self.assertRaisesRegex(metrics.NonFiniteLossError, r"loss is (nan|inf) at step (\d+).*intact"):
      trainer.train(config, workdir)
    logged = [r["step"] for r in metrics.read_metrics(workdir)]
    saved = checkpoint.saved_config(workdir)
    self.assertIsNotNone(saved)
    manager = checkpoint.make_checkpoint_manager(workdir, config)
    last_good = manager.latest_step()
    manager.close()
    self.assertEqual(last_good, logged[-1])  # every logged (finite) step was saved, the non-finite one was not


if __name__ == "__main__":
  absltest.main()
