"""The evaluation harness: closed-form metrics, and every sampler of a tiny run measured on the same noise."""

import json
import os
import tempfile

from absl.testing import absltest
import numpy as np

from perflow_jax import evaluate
from perflow_jax import run_config
from perflow_jax import sample
from perflow_jax.data import procedural
from perflow_jax.evaluation import features as features_lib
import sample_export_testutil as sx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSIFIER = "classifier:" + os.path.join(REPO, "assets", "demo", "classifier")


class MetricsTest(absltest.TestCase):

  def test_parse_sampler(self):
    self.assertEqual(evaluate.parse_sampler("DDIM-50"), ("ddim", 50))
    self.assertEqual(evaluate.parse_sampler("perflow-4"), ("perflow", 4))
    for bad in ("euler-4", "ddim-0", "perflow", "ddim-4x"):
      with self.assertRaisesRegex(ValueError, "ddim-N"):
        evaluate.parse_sampler(bad)

  def test_fidelity_closed_forms(self):
    black = np.zeros((2, 4, 4, 3), np.uint8)
    # Every pixel off by 51/255 = 0.2: RMSE 0.2, PSNR 20 log10(1 / 0.2) = 13.9794 dB.
    shifted = np.full((2, 4, 4, 3), 51, np.uint8)
    result = evaluate.fidelity(shifted, black)
    self.assertAlmostEqual(result["rmse"], 0.2, places=12)
    self.assertAlmostEqual(result["psnr"], 20 * np.log10(5.0), places=9)
    # Identical images: RMSE 0 and the PSNR cap; white vs black: RMSE 1, PSNR 0.
    self.assertEqual(evaluate.fidelity(black, black), {"rmse": 0.0, "psnr": 100.0})
    white = np.full_like(black, 255)
    self.assertEqual(evaluate.fidelity(white, black), {"rmse": 1.0, "psnr": 0.0})
    # Per-image averaging: one identical image (0, 100 dB) and one off by 0.2.
    mixed = np.concatenate([black[:1], shifted[:1]])
    result = evaluate.fidelity(mixed, black)
    self.assertAlmostEqual(result["rmse"], 0.1, places=12)
    self.assertAlmostEqual(result["psnr"], (100.0 + 20 * np.log10(5.0)) / 2, places=9)

  def test_faithfulness_counts_matches(self):
    labels = {"shape": np.array([0, 1, 2, 3]), "color": np.array([0, 1, 2, 3])}
    predicted = {"shape": np.array([0, 1, 0, 0]), "color": np.array([0, 0, 2, 0])}
    self.assertEqual(evaluate.faithfulness(predicted, labels), {"shape": 0.5, "color": 0.5, "shape_and_color": 0.25})

  def test_procedural_prompts_and_real_images_agree(self):
    prompts = evaluate.procedural_prompts(5, seed=3)
    for i in range(5):
      self.assertEqual(prompts.texts[i], procedural.example(3, i, 16)["text"])
    real = evaluate.procedural_real_images(prompts, 16)
    expected = procedural.example(3, 4, 16)["image"].astype(np.float32) / 127.5 - 1.0
    np.testing.assert_array_equal(real[4], expected)

  def test_real_images_from_npz_and_errors(self):
    tmp = tempfile.mkdtemp()
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    np.savez(os.path.join(tmp, "real.npz"), images=images)
    got = evaluate.read_real_images(os.path.join(tmp, "real.npz"), 8)
    np.testing.assert_allclose(got, images / 127.5 - 1.0, atol=1e-6)
    np.savez(os.path.join(tmp, "bad.npz"), pictures=images)
    with self.assertRaisesRegex(ValueError, "no 'images' array"):
      evaluate.read_real_images(os.path.join(tmp, "bad.npz"), 8)
    with self.assertRaisesRegex(ValueError, "does not exist"):
      evaluate.read_real_images(os.path.join(tmp, "missing.npz"), 8)
    with self.assertRaisesRegex(ValueError, "procedural:N"):
      evaluate.read_eval_prompts("laion:5", None)

  def test_eval_config_validation(self):
    config = run_config.perflow_config()
    config.eval.at_end = True
    config.eval.samplers = ("ddim-20", "perflow-2")
    with self.assertRaisesRegex(ValueError, "fewer steps than num_windows=4"):
      run_config.check_eval_config(config.eval, 4)
    config.eval.samplers = ("ddim-20", "perflow-4")
    config.eval.reference = "ddim-50"
    with self.assertRaisesRegex(ValueError, "must be one of config.eval.samplers"):
      run_config.check_eval_config(config.eval, 4)
    config.eval.reference = "ddim-20"
    config.eval.features = "classifier:/nonexistent/dir"
    with self.assertRaisesRegex(ValueError, "does not exist"):
      run_config.check_eval_config(config.eval, 4)


class EvaluateRunTest(absltest.TestCase):
  """The CLI on a tiny trained run: the reference scores perfectly against itself, images match `sample`."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.workdir = sx.trained_workdir()
    cls.out = tempfile.mkdtemp(prefix="perflow_eval_")
    cls.report = evaluate.cli(["evaluate", f"--workdir={cls.workdir}", f"--out={cls.out}",
                               "--samplers=ddim-8,ddim-2,perflow-4", "--reference=ddim-8", "--prompts=procedural:6",
                               f"--features={CLASSIFIER}", "--guidance_scale=2.0", "--seed=5", "--batch_size=4"])

  def test_reference_against_itself(self):
    rows = self.report["samplers"]
    self.assertEqual(list(rows), ["ddim-8", "ddim-2", "perflow-4"])
    self.assertEqual(rows["ddim-8"]["rmse"], 0.0)
    self.assertEqual(rows["ddim-8"]["psnr"], 100.0)
    for spec in ("ddim-2", "perflow-4"):
      self.assertGreater(rows[spec]["rmse"], 0.0)
      self.assertTrue(np.isfinite(rows[spec]["frechet_distance"]))
    self.assertEqual(rows["perflow-4"]["unet_calls_per_image"], 8)
    self.assertEqual(self.report["frechet_against"], "real")

  def test_images_are_the_sample_cli_images_from_the_same_noise(self):
    models = sample.load_models(self.workdir, weights="teacher")
    prompts = evaluate.procedural_prompts(6).texts
    direct = sample.generate(models, prompts, num_steps=2, guidance_scale=2.0, sampler="ddim", seed=5,
                             batch_size=4)
    np.testing.assert_array_equal(self.report["images"]["ddim-2"], direct["images"])

  def test_metrics_recomputed_from_the_images(self):
    images = self.report["images"]
    expected = evaluate.fidelity(images["perflow-4"], images["ddim-8"])
    self.assertAlmostEqual(self.report["samplers"]["perflow-4"]["rmse"], expected["rmse"], places=12)
    net = features_lib.load_feature_net(CLASSIFIER)
    prompts = evaluate.procedural_prompts(6)
    predicted = net.predict(images["ddim-2"].astype(np.float32) / 127.5 - 1.0)
    self.assertEqual(self.report["samplers"]["ddim-2"]["faithfulness"],
                     evaluate.faithfulness(predicted, prompts.labels))

  def test_writes_json_markdown_and_grids(self):
    with open(os.path.join(self.out, "eval.json")) as f:
      saved = json.load(f)
    self.assertEqual(saved["reference"], "ddim-8")
    self.assertEqual(saved["num_images"], 6)
    self.assertAlmostEqual(saved["samplers"]["ddim-2"]["rmse"], self.report["samplers"]["ddim-2"]["rmse"])
    with open(os.path.join(self.out, "eval.md")) as f:
      table = f.read().splitlines()
    self.assertEqual(len(table), 2 + 3)
    self.assertIn("RMSE vs DDIM-8", table[0])
    self.assertTrue(table[2].startswith("| DDIM-8 | 0.0000 | 100.00 |"))
    for name in ("grid.png", "grid_ddim-8.png", "grid_ddim-2.png", "grid_perflow-4.png"):
      self.assertTrue(os.path.isfile(os.path.join(self.out, name)), name)

  def test_reference_must_be_a_sampler(self):
    with self.assertRaisesRegex(ValueError, "must be one of --samplers"):
      evaluate.evaluate(sample.load_models(self.workdir), ["ddim-2"], evaluate.procedural_prompts(2),
                        reference="ddim-50")


if __name__ == "__main__":
  absltest.main()
