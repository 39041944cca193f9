"""SDXL conditioning: our two Flax encoders against diffusers' StableDiffusionXLPipeline.encode_prompt, the context
entering the UNet as diffusers' added_cond_kwargs, prompt dropout of hidden + pooled, and batched CFG on the dict."""

import os
import sys

from absl.testing import absltest
import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from perflow_jax import conditioning
from perflow_jax import flow
from perflow_jax import sample
from perflow_jax import sampling
from perflow_jax import train_step
from perflow_jax import trainer
from perflow_jax.parallel import mesh as mesh_lib
from perflow_jax.weights import pretrained

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights"))
import weights_testutil as wt  # pylint: disable=g-import-not-at-top,wrong-import-position

# Words of the tiny test vocabulary (letters, "!", merges for "cat" and "dog"); "!" is tokenizer_2's padding.
PROMPTS = ["a cat", "dog dog on a big cab!", ""]
RESOLUTION = 16


def _relative_error(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))


class SdxlEncodePromptParityTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    import tempfile  # pylint: disable=g-import-not-at-top
    cls.folder = tempfile.mkdtemp(prefix="perflow_sdxl_cond_")
    configs = wt.tiny_configs("sdxl")
    cls.torch_models = wt.build_torch_models(configs, seed=3)
    wt.write_diffusers_folder(cls.folder, "sdxl", configs, cls.torch_models)
    cls.bundle = pretrained.load_pretrained(cls.folder, precision=jax.lax.Precision.HIGHEST)
    tok = lambda name: transformers.CLIPTokenizer.from_pretrained(os.path.join(cls.folder, name))
    cls.pipe = diffusers.StableDiffusionXLPipeline(
        vae=cls.torch_models["vae"], text_encoder=cls.torch_models["text_encoder"],
        text_encoder_2=cls.torch_models["text_encoder_2"], tokenizer=tok("tokenizer"),
        tokenizer_2=tok("tokenizer_2"), unet=cls.torch_models["unet"],
        scheduler=diffusers.EulerDiscreteScheduler.from_config(configs["scheduler"]))
    cls.time_ids = conditioning.micro_conditioning(RESOLUTION)
    b = cls.bundle
    with jax.default_matmul_precision("highest"):
      cls.ours = sampling.encode_prompts(b.text_encoder, b.text_params, b.tokenizer, PROMPTS,
                                         text_encoder_2=b.text_encoder_2, text_params_2=b.text_params_2,
                                         tokenizer_2=b.tokenizer_2, time_ids=cls.time_ids)
    with torch.no_grad():
      cls.want = cls.pipe.encode_prompt(PROMPTS[:2], device="cpu", num_images_per_prompt=1,
                                        do_classifier_free_guidance=True, negative_prompt="")

  def test_tokenizers_pad_as_sdxl(self):
    ids = np.asarray(self.pipe.tokenizer(["a cat"], padding="max_length", max_length=77).input_ids)
    ids_2 = np.asarray(self.pipe.tokenizer_2(["a cat"], padding="max_length", max_length=77).input_ids)
    self.assertEqual(ids[0, -1], wt.EOS)  # tokenizer pads with EOS ...
    # ... tokenizer_2 with "!" (id 0 in CLIP's vocabulary, 26 in this tiny one).
    self.assertEqual(ids_2[0, -1], self.pipe.tokenizer_2.convert_tokens_to_ids("!"))
    self.assertNotEqual(ids_2[0, -1], wt.EOS)

  def test_prompt_embeds_and_pooled_match_diffusers(self):
    prompt_embeds, negative_embeds, pooled, negative_pooled = (np.asarray(x) for x in self.want)
    self.assertEqual(self.ours["hidden"].shape, (3, 77, 64))  # 32 (CLIP-L style) + 32 (bigG style)
    self.assertEqual(self.ours["text_embeds"].shape, (3, 16))
    self.assertEqual(prompt_embeds.shape, (2, 77, 64))
    errors = {
        "prompt_embeds": _relative_error(self.ours["hidden"][:2], prompt_embeds),
        "pooled_prompt_embeds": _relative_error(self.ours["text_embeds"][:2], pooled),
        # The empty prompt is the negative of the guided teacher and the dropped prompts' replacement.
        "negative_prompt_embeds": _relative_error(self.ours["hidden"][2:], negative_embeds[:1]),
        "negative_pooled_prompt_embeds": _relative_error(self.ours["text_embeds"][2:], negative_pooled[:1]),
    }
    for name, error in errors.items():
      self.assertLess(error, 1e-5, f"{name}: {errors}")
    np.testing.assert_array_equal(self.ours["time_ids"], np.tile([16, 16, 0, 0, 16, 16], (3, 1)))

  def test_penultimate_layer_not_last(self):
    # hidden_states[-2] of bigG (3 layers here) is not its last hidden state; the context must hold the former.
    last = self.bundle.text_encoder_2.apply({"params": self.bundle.text_params_2},
                                            np.asarray(self.pipe.tokenizer_2(PROMPTS[:1], padding="max_length",
                                                                             max_length=77).input_ids))
    self.assertGreater(np.abs(np.asarray(self.ours["hidden"][:1, :, 32:]) - np.asarray(last)).max(), 1e-2)

  def test_unet_on_the_context_matches_diffusers_added_cond_kwargs(self):
    prompt_embeds, _, pooled, _ = self.want
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    t = np.array([999.0, 250.0], np.float32)
    ids = torch.tensor(np.tile(self.time_ids, (2, 1)))
    with torch.no_grad():
      want = self.torch_models["unet"](torch.from_numpy(latents.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                                       encoder_hidden_states=prompt_embeds,
                                       added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
    context = jax.tree.map(lambda x: x[:2], self.ours)
    with jax.default_matmul_precision("highest"):
      got = jax.jit(conditioning.apply_unet, static_argnums=0)(self.bundle.unet, self.bundle.unet_params, latents,
                                                                t, context)
    self.assertLess(_relative_error(np.asarray(got), want.numpy().transpose(0, 2, 3, 1)), 1e-4)

  def test_batched_cfg_on_the_dict_context(self):
    b = self.bundle
    model_fn = sampling.unet_model_fn(b.unet, b.unet_params)
    context = jax.tree.map(lambda x: x[:2], self.ours)
    empty = jax.tree.map(lambda x: x[2:], self.ours)  # leading dim 1: broadcast over the batch
    z = jnp.asarray(np.random.default_rng(1).standard_normal((2, 8, 8, 4)), jnp.float32)
    t = jnp.array([500.0, 500.0])
    def outputs(z, t, context, empty):
      full_empty = jax.tree.map(lambda x: jnp.broadcast_to(x, (2,) + x.shape[1:]), empty)
      return (flow.guided_model_output(model_fn, z, t, context, empty, 7.5), model_fn(z, t, context),
              model_fn(z, t, full_empty))
    with jax.default_matmul_precision("highest"):
      guided, cond, uncond = jax.jit(outputs)(z, t, context, empty)  # one program: faster than op by op
    np.testing.assert_allclose(np.asarray(guided), np.asarray(uncond + 7.5 * (cond - uncond)), rtol=1e-4,
                               atol=1e-4)
    self.assertGreater(float(jnp.abs(cond - uncond).max()), 1e-3)  # the prompt matters


  def test_trainer_loads_both_encoders_of_a_pretrained_sdxl_folder(self):
    from configs import tiny  # pylint: disable=g-import-not-at-top
    config = tiny.get_config()
    config.model.pretrained = self.folder
    config.model.tokenizer = ""
    m = trainer.load_models(config, self.folder, mesh_lib.make_mesh(config.mesh))
    self.assertIsNotNone(m.text_encoder_2)
    self.assertEqual(m.scaling_factor, 0.13025)
    time_ids = trainer.sdxl_time_ids(config, m)
    np.testing.assert_array_equal(time_ids, [16, 16, 0, 0, 16, 16])  # tiny.py's data.resolution
    with jax.default_matmul_precision("highest"):
      context = m.encode_prompts(PROMPTS, time_ids)
    for k in ("hidden", "text_embeds", "time_ids"):
      np.testing.assert_allclose(np.asarray(context[k]), np.asarray(self.ours[k]), rtol=1e-5, atol=1e-5)
    # The latent cache holds no pooled embedding: SDXL must train from images.
    with self.assertRaisesRegex(ValueError, "source='cache'.*SDXL"):
      train_step.make_encode_fn(m.vae, m.text_encoder, m.scaling_factor, True, text_encoder_2=m.text_encoder_2,
                                time_ids=time_ids)

  def test_sample_cli_ddim_matches_the_diffusers_sdxl_pipeline(self):
    # The whole sampling path on an SDXL folder: both encoders, the "" negative, time ids (16, 16, 0, 0, 16, 16)
    # (diffusers' default for a 16 px image without crop), batched CFG and the teacher's DDIM.
    out = os.path.join(self.folder, "samples")
    ours = sample.cli(["sample", f"--pretrained={self.folder}", "--prompt=a cat", "--prompt=dog on a cab",
                       "--sampler=ddim", "--num_steps=4", "--guidance_scale=3.0", "--resolution=16",
                       "--batch_size=2", "--precision=highest", f"--out={out}"])
    self.assertEqual(ours["images"].shape, (2, 16, 16, 3))
    scheduler = diffusers.DDIMScheduler.from_config(self.pipe.scheduler.config, set_alpha_to_one=False,
                                                    timestep_spacing="leading", clip_sample=False)
    pipe = diffusers.StableDiffusionXLPipeline(**{**self.pipe.components, "scheduler": scheduler})
    with torch.no_grad():
      want = pipe(["a cat", "dog on a cab"], negative_prompt="", num_inference_steps=4, guidance_scale=3.0,
                  height=16, width=16, latents=torch.from_numpy(ours["noise"].transpose(0, 3, 1, 2)),
                  output_type="latent").images.numpy().transpose(0, 2, 3, 1)
    self.assertLess(_relative_error(ours["latents"], want), 1e-4)


class SdxlDropoutTest(absltest.TestCase):

  def _context(self, batch, seed, time_value):
    rng = np.random.default_rng(seed)
    return {"hidden": jnp.asarray(rng.standard_normal((batch, 77, 8)), jnp.float32),
            "text_embeds": jnp.asarray(rng.standard_normal((batch, 4)), jnp.float32),
            "time_ids": jnp.full((batch, 6), time_value, jnp.float32)}

  def test_drops_hidden_and_pooled_of_the_same_examples_and_never_time_ids(self):
    batch = 64
    context = self._context(batch, 0, 1024.0)
    empty = self._context(1, 1, -1.0)  # different time ids: replacing them would show
    out = conditioning.drop_prompts(jax.random.key(3), context, empty, 0.5)
    hidden_dropped = np.all(np.asarray(out["hidden"]) == np.asarray(empty["hidden"]), axis=(1, 2))
    hidden_kept = np.all(np.asarray(out["hidden"]) == np.asarray(context["hidden"]), axis=(1, 2))
    pooled_dropped = np.all(np.asarray(out["text_embeds"]) == np.asarray(empty["text_embeds"]), axis=1)
    pooled_kept = np.all(np.asarray(out["text_embeds"]) == np.asarray(context["text_embeds"]), axis=1)
    np.testing.assert_array_equal(hidden_dropped, ~hidden_kept)  # every row is exactly one or the other
    np.testing.assert_array_equal(hidden_dropped, pooled_dropped)  # hidden and pooled dropped together
    np.testing.assert_array_equal(pooled_dropped, ~pooled_kept)
    self.assertBetween(int(hidden_dropped.sum()), 16, 48)  # ~Binomial(64, 0.5)
    np.testing.assert_array_equal(np.asarray(out["time_ids"]), np.asarray(context["time_ids"]))
    # The same key drops the same examples as the SD1/SD2 (array) path does.
    plain = conditioning.drop_prompts(jax.random.key(3), context["hidden"], empty["hidden"], 0.5)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(out["hidden"]))

  def test_probability_zero_and_one(self):
    context, empty = self._context(8, 0, 16.0), self._context(1, 1, 0.0)
    none = conditioning.drop_prompts(jax.random.key(0), context, empty, 0.0)
    every = conditioning.drop_prompts(jax.random.key(0), context, empty, 1.0)
    for k in ("hidden", "text_embeds"):
      np.testing.assert_array_equal(np.asarray(none[k]), np.asarray(context[k]))
      np.testing.assert_array_equal(np.asarray(every[k]), np.broadcast_to(np.asarray(empty[k]), context[k].shape))
    np.testing.assert_array_equal(np.asarray(every["time_ids"]), np.asarray(context["time_ids"]))

  def test_micro_conditioning(self):
    np.testing.assert_array_equal(conditioning.micro_conditioning(1024), [1024, 1024, 0, 0, 1024, 1024])
    np.testing.assert_array_equal(conditioning.micro_conditioning(1024, (896, 1152, 0, 0, 1024, 1024)),
                                  [896, 1152, 0, 0, 1024, 1024])
    with self.assertRaisesRegex(ValueError, "6 numbers"):
      conditioning.micro_conditioning(1024, (1, 2, 3))


if __name__ == "__main__":
  absltest.main()
