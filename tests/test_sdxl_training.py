"""The SDXL recipe end to end on the tiny SDXL-shaped model: data with both tokenizers' ids, training through
`trainer.train` with periodic samples, the sample CLI's models of the run, the guided teacher under prompt dropout,
and configs/sdxl.py's recipe constants."""

import json
import os
import tempfile

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from configs import sdxl
from configs import tiny
from perflow_jax import flow
from perflow_jax import metrics
from perflow_jax import run_config
from perflow_jax import sample
from perflow_jax import train_step
from perflow_jax import trainer
from perflow_jax.data import pipeline
from perflow_jax.parallel import mesh as mesh_lib
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

  def test_sample_models_of_the_run(self):
    # What the sample CLI builds from the workdir (its SDXL sampling itself is checked against diffusers in
    # test_sdxl_conditioning): both encoders, and time ids from the sampled side.
    models = sample.load_models(workdir=self.workdir)
    self.assertIsNotNone(models.text_encoder_2)
    self.assertEqual((models.prediction_type, models.resolution), ("ddim_eps", 16))
    context = models.encode_prompts(["a red circle", "a green square"], 32)
    self.assertEqual(context["hidden"].shape, (2, 77, 64))
    self.assertEqual(context["text_embeds"].shape, (2, 16))
    np.testing.assert_array_equal(context["time_ids"], np.tile([32, 32, 0, 0, 32, 32], (2, 1)))


class SdxlObjectiveTest(absltest.TestCase):

  def test_guided_teacher_sees_the_full_prompt_and_the_student_the_dropped_one(self):
    config = tiny.get_config("sdxl")
    config.perflow.solver_steps = 1  # one teacher call per window is enough to see which prompt it follows
    m = trainer.load_models(config, tempfile.mkdtemp(), mesh_lib.make_mesh(config.mesh))
    time_ids = trainer.sdxl_time_ids(config, m)
    context = m.encode_prompts(["a red circle", "a green square", "a blue triangle", "a circle"], time_ids)
    empty = m.encode_prompts([""], time_ids)
    frozen = {"empty_context": empty, "teacher": m.unet_params}
    x0 = jax.random.normal(jax.random.key(1), (4, 8, 8, 4))

    def prepare(dropout, guidance):
      config.perflow.prompt_dropout, config.perflow.teacher_guidance = dropout, guidance
      # Each dropout is a constant of its own compiled program.
      objective = train_step.make_perflow_objective(config, m.unet, "epsilon")
      return jax.device_get(jax.jit(objective.prepare)(frozen, x0, context, jax.random.key(0)))

    kept, dropped = prepare(0.0, "guided"), prepare(1.0, "guided")
    # The student's context: the full prompt, or the "" prompt's hidden states AND pooled embedding.
    for k in ("hidden", "text_embeds"):
      np.testing.assert_array_equal(kept["context"][k], np.asarray(context[k]))
      np.testing.assert_array_equal(dropped["context"][k], np.broadcast_to(empty[k], context[k].shape))
    for out in (kept, dropped):  # time ids are never dropped
      np.testing.assert_array_equal(out["context"]["time_ids"], np.tile([16, 16, 0, 0, 16, 16], (4, 1)))
    # The guided teacher (SDXL recipe) solves with the full prompt against "" whatever the student sees (the
    # cfg_sync teacher of the SD1.5 recipe would follow the dropped prompt instead).
    np.testing.assert_allclose(kept["target"], dropped["target"], rtol=1e-5, atol=1e-5)
    self.assertGreater(np.abs(kept["target"]).max(), 1e-2)

    # --zero_snr on a grid of window starts only (t_grid = K), where z_t is the window start itself: the examples
    # at t = 1 start from the noise exactly, the others from add_noise as without the option.
    config.perflow.t_grid = config.perflow.num_windows
    config.perflow.zero_snr = True
    snr0 = prepare(0.0, "guided")
    config.perflow.zero_snr = False
    noise = jax.random.normal(jax.random.split(jax.random.key(0), 3)[1], x0.shape, jnp.float32)
    plain = np.asarray(flow.add_noise(x0, noise, snr0["t_start"], flow.sd_alphas_cumprod()))
    noise = np.asarray(noise)
    at_noise = snr0["t"] == 1.0
    self.assertTrue(0 < at_noise.sum() < 4, snr0["t"])
    np.testing.assert_array_equal(snr0["z_t"][at_noise], noise[at_noise])
    np.testing.assert_allclose(snr0["z_t"][~at_noise], plain[~at_noise], rtol=1e-6, atol=1e-6)
    self.assertGreater(np.abs(plain[at_noise] - noise[at_noise]).max(), 1e-2)  # 0.068 x0 apart


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
