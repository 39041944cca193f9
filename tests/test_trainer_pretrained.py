"""The trainer with a pretrained teacher (a converted directory) and a student started from another run."""

import os
import tempfile

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from perflow_jax import checkpoint
from perflow_jax import trainer
from perflow_jax.parallel import mesh as mesh_lib
from perflow_jax.weights import converted
from perflow_jax.weights import pretrained
from trainer_testutil import losses
from trainer_testutil import tiny_config


class PretrainedTrainerTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp()
    # The reference: the tiny config's own random initialisation.
    cls.random_dir = os.path.join(cls.root, "random")
    trainer.train(tiny_config(3), cls.random_dir)
    # The same initial weights written as a converted pretrained directory.
    config = tiny_config(3)
    m = trainer.load_models(config, os.path.join(cls.root, "scratch"), mesh_lib.make_mesh(config.mesh))
    bundle = pretrained.Pretrained(
        unet=m.unet, unet_params=m.unet_params, vae=m.vae, vae_params=m.vae_params, text_encoder=m.text_encoder,
        text_params=m.text_params, tokenizer=m.tokenizer,
        config={"family": "sd1", "prediction_type": "epsilon", "scheduler": {"prediction_type": "epsilon"},
                "unet": dict(config.model.unet), "vae": dict(config.model.vae),
                "text_encoder": dict(config.model.text_encoder)})
    cls.pretrained_dir = converted.save_converted(bundle, os.path.join(cls.root, "converted"))

  def test_pretrained_teacher_reproduces_the_random_init_run(self):
    config = tiny_config(3)
    config.model.pretrained = self.pretrained_dir
    config.model.tokenizer = ""  # the converted directory's own tokenizer
    workdir = os.path.join(self.root, "pretrained")
    trainer.train(config, workdir)
    self.assertEqual(losses(workdir), losses(self.random_dir))

  def test_student_from_another_runs_ema(self):
    config = tiny_config(1)
    config.model.init_from = self.random_dir
    workdir = os.path.join(self.root, "init_from")
    trainer.train(config, workdir)
    (loss,) = losses(workdir).values()
    # The same teacher, first batch and key as the reference's step 1; only the student differs (3 steps of
    # training at lr 1e-3 moved it), so the loss must differ while staying finite.
    self.assertTrue(np.isfinite(loss))
    self.assertGreater(abs(loss - losses(self.random_dir)[1]), 1e-3)

  def test_restore_ema_params_reads_the_saved_ema(self):
    config = tiny_config(3)
    mesh = mesh_lib.make_mesh(config.mesh)
    m = trainer.load_models(config, os.path.join(self.root, "scratch2"), mesh)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=x.sharding),
                            m.unet_params)
    ema = checkpoint.restore_ema_params(self.random_dir, abstract)
    manager = checkpoint.make_checkpoint_manager(self.random_dir, config)
    saved = manager.restore(3, args=ocp.args.Composite(ema=ocp.args.StandardRestore(abstract)))["ema"]
    manager.close()
    for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(saved)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # ... and differs from the initial (teacher) weights after 3 steps.
    self.assertFalse(all(np.array_equal(np.asarray(a), np.asarray(b))
                         for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(m.unet_params))))

  def test_init_from_a_run_without_checkpoints_is_a_clear_error(self):
    config = tiny_config(1)
    config.model.init_from = os.path.join(self.root, "nowhere")
    with self.assertRaisesRegex(ValueError, "init_from.*no checkpoints"):
      trainer.train(config, os.path.join(self.root, "bad_init_from"))


if __name__ == "__main__":
  absltest.main()
