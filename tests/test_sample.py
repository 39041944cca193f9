"""Sample CLI: from a run's workdir (perflow and ddim on the same seeds) and from a pretrained base plus a delta."""

import os
import tempfile

from absl.testing import absltest
import diffusers
import jax
import numpy as np
from PIL import Image

from perflow_jax import export
from perflow_jax import sample
from perflow_jax.weights import export as wexport
import sample_export_testutil as sx

PROMPTS = ("a red circle on a blue background", "a green square on a white background")


class SampleCliTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.workdir = sx.trained_workdir()
    cls.tmp = tempfile.mkdtemp(prefix="perflow_sample_")
    cls.common = [f"--workdir={cls.workdir}", f"--prompt={PROMPTS[0]}", f"--prompt={PROMPTS[1]}",
                  "--num_images=2", "--batch_size=3", "--seed=7", "--guidance_scale=3.0", "--num_steps=4"]
    cls.perflow = sample.cli(["sample", *cls.common, f"--out={cls.tmp}/perflow", f"--npz={cls.tmp}/perflow.npz"])

  def test_writes_pngs_grid_and_npz(self):
    out = os.path.join(self.tmp, "perflow")
    pngs = sorted(f for f in os.listdir(out) if f != "grid.png")
    self.assertEqual(pngs, ["0000.png", "0001.png", "0002.png", "0003.png"])
    first = np.asarray(Image.open(os.path.join(out, "0000.png")))
    self.assertEqual(first.shape, (16, 16, 3))
    grid = np.asarray(Image.open(os.path.join(out, "grid.png")))
    self.assertEqual(grid.ndim, 3)
    self.assertGreater(grid.shape[0], 2 * 16)  # two rows (prompts) plus label bands
    self.assertGreater(grid.shape[1], 2 * 16)  # two columns (images per prompt)
    data = np.load(os.path.join(self.tmp, "perflow.npz"))
    self.assertEqual(data["images"].shape, (4, 16, 16, 3))
    self.assertEqual(data["images"].dtype, np.uint8)
    self.assertEqual(data["latents"].shape, (4, 8, 8, 4))
    self.assertEqual(list(data["prompts"]), [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2)
    np.testing.assert_array_equal(data["images"][0], first)
    self.assertTrue(np.all(np.isfinite(data["latents"])))

  def test_noise_depends_on_the_image_index_not_the_batch(self):
    noise = self.perflow["noise"]
    np.testing.assert_array_equal(noise, sample.image_noise(7, range(4), (8, 8, 4)))
    self.assertGreater(np.abs(noise[0] - noise[1]).max(), 0.1)
    # Batches of one (no padding) give the same images as batches of 3 (the last one padded).
    run = sample.cli(["sample", *self.common[:-4], "--batch_size=1", "--seed=7", "--guidance_scale=3.0",
                      "--num_steps=4", f"--out={self.tmp}/single"])
    np.testing.assert_array_equal(run["noise"], noise)
    np.testing.assert_allclose(run["latents"], self.perflow["latents"], rtol=1e-5, atol=1e-4)

  def test_ddim_teacher_on_the_same_seeds(self):
    ddim = sample.cli(["sample", *self.common, "--sampler=ddim", "--num_steps=6", f"--out={self.tmp}/ddim"])
    np.testing.assert_array_equal(ddim["noise"], self.perflow["noise"])
    self.assertEqual(ddim["images"].shape, self.perflow["images"].shape)
    self.assertGreater(np.abs(ddim["latents"] - self.perflow["latents"]).max(), 1e-3)
    self.assertTrue(os.path.isfile(os.path.join(self.tmp, "ddim", "grid.png")))

  def test_fewer_steps_than_windows_refused(self):
    with self.assertRaisesRegex(ValueError, r"--num_steps=3 is fewer than the 4 PeRFlow windows.*>= 4"):
      sample.cli(["sample", *self.common, "--num_steps=3", f"--out={self.tmp}/bad"])
    with self.assertRaisesRegex(ValueError, "--prompt or --prompts_file, not both"):
      sample.read_prompts(["a"], os.path.join(self.tmp, "p.txt"))
    with self.assertRaisesRegex(ValueError, "exactly one of --workdir"):
      sample.load_models(workdir=self.workdir, pretrained=self.workdir)

  def test_pretrained_base_plus_delta_is_the_student(self):
    # The run's teacher as a diffusers pipeline folder (the "SD1.5 base"), and the student's delta.
    student = sx.loaded_run("student")
    vae, text, tokenizer = sx.torch_vae_and_text(student)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer,
        unet=sx.torch_unet(student.models.unet_params, student.models.unet),
        scheduler=diffusers.PNDMScheduler.from_config(sx.SD15_SCHEDULER_CONFIG), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    base = os.path.join(self.tmp, "base")
    pipe.save_pretrained(base, safe_serialization=True)
    delta = export.export_run(self.workdir, os.path.join(self.tmp, "delta.safetensors"), "delta", "float32",
                              "student")
    prompts_file = os.path.join(self.tmp, "prompts.txt")
    with open(prompts_file, "w") as f:
      f.write(f"{PROMPTS[0]}\n\n{PROMPTS[1]}\n")
    args = ["sample", f"--prompts_file={prompts_file}", "--num_images=1", "--batch_size=2", "--seed=7",
            "--guidance_scale=3.0", "--num_steps=4", "--resolution=16"]
    merged = sample.cli([*args, f"--pretrained={base}", f"--delta={delta}", f"--out={self.tmp}/merged"])
    direct = sample.cli([*args, f"--workdir={self.workdir}", "--weights=student", f"--out={self.tmp}/direct"])
    np.testing.assert_allclose(merged["latents"], direct["latents"], atol=1e-4)
    self.assertEqual(merged["prompts"], list(PROMPTS))
    # The same teacher as a single-file (LDM-named) community checkpoint; configs and tokenizer from the folder.
    single = os.path.join(self.tmp, "base.safetensors")
    m = student.models
    wexport.write_single_file(single, {"unet": m.unet_params, "vae": m.vae_params, "text_encoder": m.text_params},
                              "sd1")
    from_file = sample.cli([*args, f"--pretrained={single}", f"--config_path={base}", f"--delta={delta}",
                            f"--out={self.tmp}/merged_file"])
    np.testing.assert_allclose(from_file["latents"], direct["latents"], atol=1e-4)
    self.assertEqual(wexport.delta_metadata(delta)["prediction_type"], "diff_eps")  # read as the default
    # The released layout (a UNet folder with a weights variant) merges to the same UNet as the file.
    folder = export.export_run(self.workdir, os.path.join(self.tmp, "delta_dir"), "delta", "float32", "student",
                               variant="v0-1")
    from_folder = sample.load_models(pretrained=base, delta=folder, delta_variant="v0-1")
    from_single = sample.load_models(pretrained=base, delta=delta)
    for a, b in zip(jax.tree.leaves(from_folder.params), jax.tree.leaves(from_single.params)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    self.assertEqual((from_folder.prediction_type, from_folder.num_windows), ("diff_eps", 4))

if __name__ == "__main__":
  absltest.main()
