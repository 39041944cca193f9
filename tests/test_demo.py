"""The offline demo: its autoencoder recipe, the pipeline-folder writer, the committed teacher (loads in JAX and
in diffusers with identical outputs; makes the pictures its prompts ask for) and the demo config end to end."""

import json
import os
import tempfile

from absl.testing import absltest
import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import torch

from configs import demo as demo_config
from perflow_jax import evaluate
from perflow_jax import run_config
from perflow_jax import sample
from perflow_jax import trainer
from perflow_jax.data import procedural
from perflow_jax.demo import autoencoder
from perflow_jax.demo import recipes
from perflow_jax.evaluation import features as features_lib
from perflow_jax.weights import pretrained as pretrained_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER = os.path.join(REPO, recipes.TEACHER_DIR)
CLASSIFIER = os.path.join(REPO, recipes.CLASSIFIER_DIR)
HIGHEST = jax.lax.Precision.HIGHEST
# Prompt faithfulness of the committed teacher (DDIM-25, w=3, 32 procedural prompts), with margin below measured.
COLOR_AT_LEAST = 0.3
SHAPE_AT_LEAST = 0.3


class AutoencoderRecipeTest(absltest.TestCase):

  def test_kl_closed_form(self):
    zeros = jnp.zeros((2, 2, 2, 4))
    np.testing.assert_allclose(autoencoder.kl_divergence(zeros, zeros), [0.0, 0.0], atol=0)
    # Per element 0.5 (mu^2 + e^lv - 1 - lv): mu = 1, lv = 0 -> 0.5; mu = 0, lv = log 2 -> 0.5 (1 - log 2).
    np.testing.assert_allclose(autoencoder.kl_divergence(jnp.ones((1, 2, 2, 4)), jnp.zeros((1, 2, 2, 4))), [8.0],
                               rtol=1e-6)
    lv = jnp.full((1, 1, 1, 2), np.log(2.0))
    np.testing.assert_allclose(autoencoder.kl_divergence(jnp.zeros_like(lv), lv), [1.0 - np.log(2.0)], rtol=1e-6)

  def test_short_training_lowers_the_reconstruction_error_and_fits_the_scale(self):
    # The demo's architecture on 16 px images (8 px for the last level): 150 steps of 16 cost ~20 s here.
    train = lambda steps: autoencoder.train_autoencoder(steps=steps, batch_size=16, seed=3, resolution=16,
                                                        learning_rate=3e-3)
    _, _, one = train(1)
    vae, params, stats = train(150)
    self.assertLess(stats["val_mse"], 0.7 * one["val_mse"])  # measured: 0.673 -> 0.366
    self.assertAlmostEqual(10 * np.log10(4.0 / stats["val_mse"]), stats["val_psnr"], places=5)
    # scaling_factor = 1 / std(latent means) on the held-out set (seed + 1), so these have a std of 1.
    images, _ = procedural.images_and_labels(4, range(256), 16)
    mean, _ = vae.apply({"params": params}, images, method=vae.encode)
    self.assertAlmostEqual(stats["scaling_factor"], vae.config.scaling_factor)
    self.assertAlmostEqual(float(np.std(np.asarray(mean) * stats["scaling_factor"])), 1.0, delta=0.1)


class CommittedTeacherTest(absltest.TestCase):
  """assets/demo/teacher: a diffusers folder that diffusers and perflow_jax read to the same network."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.bundle = pretrained_lib.load_pretrained(TEACHER, precision=HIGHEST)

  def test_small_enough_to_commit_and_documented(self):
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(TEACHER) for f in files)
    self.assertLess(total, 10 * 2**20)
    with open(os.path.join(TEACHER, "build_info.json")) as f:
      info = json.load(f)
    self.assertIn("perflow_jax.demo.build_teacher", info["command"])
    self.assertEqual(self.bundle.config["family"], "sd1")
    self.assertEqual(self.bundle.config["prediction_type"], "epsilon")

  def test_unet_vae_and_text_encoder_match_diffusers(self):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(TEACHER, safety_checker=None,
                                                             requires_safety_checker=False, dtype=torch.float32)
    rng = np.random.default_rng(0)
    ids = np.asarray(self.bundle.tokenizer([recipes.SAMPLE_PROMPTS[0]], padding="max_length", max_length=77,
                                           truncation=True).input_ids, np.int32)
    with torch.no_grad():
      hidden_torch = pipe.text_encoder(torch.from_numpy(ids).long())[0].numpy()
    hidden = np.asarray(self.bundle.text_encoder.apply({"params": self.bundle.text_params}, ids))
    np.testing.assert_allclose(hidden, hidden_torch, atol=1e-4 * np.abs(hidden_torch).max())

    z = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    t = np.array([999.0, 250.0], np.float32)
    ctx = np.repeat(hidden, 2, axis=0)
    with torch.no_grad():
      eps_torch = pipe.unet(torch.from_numpy(z).permute(0, 3, 1, 2), torch.from_numpy(t),
                            torch.from_numpy(ctx)).sample.permute(0, 2, 3, 1).numpy()
    eps = np.asarray(self.bundle.unet.apply({"params": self.bundle.unet_params}, z, t, ctx))
    np.testing.assert_allclose(eps, eps_torch, atol=1e-4 * np.abs(eps_torch).max())

    with torch.no_grad():
      image_torch = pipe.vae.decode(torch.from_numpy(z).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1).numpy()
    vae = self.bundle.vae
    image = np.asarray(vae.apply({"params": self.bundle.vae_params}, z, method=vae.decode))
    np.testing.assert_allclose(image, image_torch, atol=1e-4 * np.abs(image_torch).max())

  def test_teacher_draws_what_the_prompts_ask_for(self):
    models = sample.load_models(pretrained=TEACHER, weights="teacher")
    models = sample.Models(**{**models.__dict__, "params": models.teacher_params})
    prompts = evaluate.procedural_prompts(32, seed=777)
    result = sample.generate(models, prompts.texts, num_steps=25, guidance_scale=3.0, sampler="ddim", seed=1,
                             batch_size=32)
    self.assertEqual(result["images"].shape, (32, recipes.RESOLUTION, recipes.RESOLUTION, 3))
    net = features_lib.load_feature_net("classifier:" + CLASSIFIER)
    predicted = net.predict(result["images"].astype(np.float32) / 127.5 - 1.0)
    faithful = evaluate.faithfulness(predicted, prompts.labels)
    # Chance is 1/8 for colour and 1/4 for shape; the autoencoder alone caps shape near 0.63 (it blurs small shapes).
    self.assertGreaterEqual(faithful["color"], COLOR_AT_LEAST, faithful)
    self.assertGreaterEqual(faithful["shape"], SHAPE_AT_LEAST, faithful)


class DemoConfigTest(absltest.TestCase):

  def test_demo_config_validates_and_points_at_the_assets(self):
    config = demo_config.get_config()
    run_config.validate_run_config(config)
    self.assertEqual(config.model.pretrained, TEACHER)
    self.assertEqual(config.eval.features, "classifier:" + CLASSIFIER)
    self.assertEqual(tuple(config.eval.samplers), ("ddim-50", "ddim-4", "perflow-4", "perflow-8"))
    self.assertEqual((config.perflow.num_windows, config.perflow.teacher_guidance, config.perflow.prediction_type),
                     (4, "cfg_sync", "diff_eps"))

  def test_demo_runs_end_to_end_and_writes_the_evaluation(self):
    """The README's main job, shortened: 2 steps, 8 evaluation prompts, two samplers (each one more compile)."""
    config = demo_config.get_config()
    config.eval.samplers, config.eval.reference = ("ddim-8", "perflow-4"), "ddim-8"
    config.total_steps = 2
    config.log_every = 1
    config.checkpoint_every = 2
    config.data.batch_size = 8
    config.eval.prompts = "procedural:8"
    config.eval.batch_size = 8
    workdir = os.path.join(tempfile.mkdtemp(prefix="perflow_demo_"), "run")
    trainer.train(config, workdir)
    with open(os.path.join(workdir, "eval", "eval.json")) as f:
      report = json.load(f)
    self.assertEqual(list(report["samplers"]), ["ddim-8", "perflow-4"])
    self.assertEqual(report["samplers"]["ddim-8"]["rmse"], 0.0)
    for row in report["samplers"].values():
      self.assertTrue(np.isfinite(row["frechet_distance"]))
      self.assertBetween(row["faithfulness"]["color"], 0.0, 1.0)
    self.assertTrue(os.path.isfile(os.path.join(workdir, "eval", "grid.png")))


if __name__ == "__main__":
  absltest.main()
