"""The SDXL recipe end to end on the tiny SDXL-shaped model: data with both tokenizers' ids, training through
`trainer.train` with periodic samples, the sample CLI on the run, and configs/sdxl.py's recipe constants."""

import json
import os
import tempfile

from absl.testing import absltest
import numpy as np
from PIL import Image

from configs import sdxl
from configs import tiny
from perflow_jax import metrics
from perflow_jax import run_config
from perflow_jax import sample
from perflow_jax import trainer
from perflow_jax.data import pipeline
from perflow_jax.data import tokenizer as tokenization

STEPS = 3


def tiny_sdxl_config():
  config = tiny.get_config("sdxl")
  config.total_steps = STEPS
  config.log_every = 1
  config.checkpoint_every = STEPS
  config.sample_every = STEPS
  config.sample.num_steps = (4,)
  return config


class SdxlTrainingTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.workdir = os.path.join(tempfile.mkdtemp(prefix="perflow_sdxl_train_"), "run")
    cls.last = trainer.train(tiny_sdxl_config(), cls.workdir)
    cls.losses = {r["step"]: r["loss"] for r in metrics.read_metrics(cls.workdir)}

  def test_trains_with_finite_losses_and_writes_a_checkpoint(self):
    self.assertEqual(sorted(self.losses), list(range(1, STEPS + 1)))
    self.assertTrue(all(np.isfinite(v) and v > 0 for v in self.losses.values()), self.losses)
    self.assertTrue(os.path.isdir(os.path.join(self.workdir, "checkpoints", str(STEPS))))
    with open(os.path.join(self.workdir, "config.json")) as f:
      saved = json.load(f)
    self.assertEqual(saved["model"]["text_encoder_2"]["projection_dim"], 16)
    self.assertEqual(saved["perflow"]["teacher_guidance"], "guided")
    # The procedural tokenizer_2 pads with "!" (id 0), as SDXL's.
    tok_2 = tokenization.load_tokenizer(os.path.join(self.workdir, "tokenizer_2"))
    self.assertEqual(tokenization.tokenize(tok_2, ["a red circle"])[0, -1], 0)

  def test_periodic_samples(self):
    grid = np.asarray(Image.open(os.path.join(self.workdir, "samples", f"step_{STEPS:07d}.png")))
    self.assertEqual(grid.ndim, 3)
    self.assertGreaterEqual(grid.shape[1], 2 * 16)  # one 16 px column per prompt
    self.assertGreater(grid.std(), 1.0)  # not a blank image

  def test_sample_cli_on_the_run(self):
    out = os.path.join(self.workdir, "cli")
    result = sample.cli(["sample", f"--workdir={self.workdir}", "--prompt=a red circle on a blue background",
                         "--prompt=a green square", "--num_steps=4", "--guidance_scale=2.0", "--batch_size=2",
                         f"--out={out}"])
    self.assertEqual(result["images"].shape, (2, 16, 16, 3))
    self.assertEqual(result["latents"].shape, (2, 8, 8, 4))
    self.assertTrue(np.all(np.isfinite(result["latents"])))
    self.assertGreater(np.abs(result["latents"][0] - result["latents"][1]).max(), 1e-3)
    self.assertTrue(os.path.isfile(os.path.join(out, "grid.png")))


class SdxlDataTest(absltest.TestCase):

  def test_batches_hold_both_tokenizers_ids(self):
    root = tempfile.mkdtemp()
    tok = tokenization.load_tokenizer(tokenization.write_tiny_clip_tokenizer(os.path.join(root, "t1")))
    tok_2 = tokenization.load_tokenizer(
        tokenization.write_tiny_clip_tokenizer(os.path.join(root, "t2"), pad_token="!"))
    config = tiny_sdxl_config()
    loader = pipeline.make_host_loader(config.data, tok, batch_size=4, process_index=0, process_count=1,
                                       tokenizer_2=tok_2)
    batch = next(iter(loader))
    self.assertEqual(sorted(batch), ["images", "input_ids", "input_ids_2"])
    ids, ids_2 = batch["input_ids"], batch["input_ids_2"]
    self.assertEqual(ids_2.shape, (4, 77))
    eos = tok.convert_tokens_to_ids(tokenization.EOS_TOKEN)
    # Same tokens up to the first EOS; then tokenizer 1 pads with EOS, tokenizer_2 with "!" (id 0).
    for row, row_2 in zip(ids, ids_2):
      n = int(np.argmax(row == eos)) + 1
      np.testing.assert_array_equal(row[:n], row_2[:n])
      self.assertTrue(np.all(row[n:] == eos) and np.all(row_2[n:] == 0))


class SdxlConfigTest(absltest.TestCase):

  def test_recipe_constants(self):
    config = sdxl.get_config()
    config.model.pretrained = "/path/to/sdxl"
    run_config.validate_run_config(config)
    pf = config.perflow
    self.assertEqual(config.objective, "perflow")
    self.assertEqual((pf.prediction_type, pf.teacher_guidance, pf.teacher_guidance_scale), ("ddim_eps", "guided", 7.5))
    self.assertEqual((pf.num_windows, pf.solver, pf.solver_steps, pf.t_grid, pf.prompt_dropout),
                     (4, "ddim", 10, 200, 0.1))
    self.assertEqual(config.optim.learning_rate, 1e-4)
    self.assertEqual(config.optim.warmup_steps, 0)
    self.assertEqual((config.model.dtype, config.model.teacher_dtype), ("bfloat16", "bfloat16"))
    self.assertEqual(config.data.resolution, 1024)
    self.assertEqual(tuple(config.model.time_ids), (1024, 1024, 0, 0, 1024, 1024))
    self.assertNotEqual(config.data.source, "cache")
    local = sdxl.get_config("runlocal")
    local.model.pretrained = "/path/to/sdxl"
    run_config.validate_run_config(local)
    self.assertEqual(tuple(local.model.time_ids), (512, 512, 0, 0, 512, 512))
    self.assertEqual(local.perflow.to_dict(), config.perflow.to_dict())  # the same recipe, smaller

  def test_inconsistent_sdxl_configs_are_refused(self):
    config = tiny.get_config("sdxl")
    config.model.text_encoder_2 = {}
    with self.assertRaisesRegex(ValueError, r"SDXL UNet.*config.model.text_encoder_2 is empty"):
      run_config.validate_run_config(config)
    config = tiny.get_config()
    config.model.text_encoder_2 = dict(run_config.tiny_sdxl_model().text_encoder_2)
    with self.assertRaisesRegex(ValueError, r"text_encoder_2 is set, but config.model.unet is not an SDXL UNet"):
      run_config.validate_run_config(config)
    config = tiny.get_config("sdxl")
    config.model.unet.cross_attention_dim = 32
    with self.assertRaisesRegex(ValueError, r"cross_attention_dim=32 must equal .* = 64"):
      run_config.validate_run_config(config)
    config = tiny.get_config("sdxl")
    config.model.unet.projection_class_embeddings_input_dim = 50
    with self.assertRaisesRegex(ValueError, r"projection_class_embeddings_input_dim=50 must equal .* = 64"):
      run_config.validate_run_config(config)
    config = tiny.get_config("sdxl")
    config.data.source = "cache"
    with self.assertRaisesRegex(ValueError, r"source='cache'.*SDXL"):
      run_config.validate_run_config(config)
    config = tiny.get_config("sdxl")
    config.model.time_ids = (16, 16, 0)
    with self.assertRaisesRegex(ValueError, r"config.model.time_ids=\(16, 16, 0\)"):
      run_config.validate_run_config(config)


if __name__ == "__main__":
  absltest.main()
