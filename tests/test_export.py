"""Export CLI: delta weights (the released PeRFlow format), merging them back, and the merged diffusers UNet."""

import json
import os
import tempfile

from absl.testing import absltest
import diffusers
import numpy as np
import torch

from perflow_jax import export
from perflow_jax.weights import export as wexport
from perflow_jax.weights import io
import sample_export_testutil as sx


def _ulps(a: np.ndarray, b: np.ndarray, base: np.ndarray) -> float:
  """Largest |a - b| in float32 units in the last place of the larger of |b| and |base| (elementwise)."""
  b = np.asarray(b, np.float32)
  scale = np.maximum(np.abs(b), np.abs(np.asarray(base, np.float32)))
  return float(np.max(np.abs(np.asarray(a, np.float32) - b) / np.spacing(scale)))


class ExportTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.workdir = sx.trained_workdir()
    cls.out = tempfile.mkdtemp(prefix="perflow_export_")
    cls.student_run = sx.loaded_run("student")
    cls.student = wexport.export_unet_state_dict(cls.student_run.params, np.float32)
    cls.teacher = wexport.export_unet_state_dict(cls.student_run.models.unet_params, np.float32)
    cls.delta32 = export.cli(["export", f"--workdir={cls.workdir}", f"--out={cls.out}/delta32.safetensors",
                              "--format=delta", "--dtype=float32", "--weights=student"])

  def test_delta_is_student_minus_teacher_with_diffusers_names(self):
    delta = io.read_safetensors(self.delta32)
    torch_keys = set(diffusers.UNet2DConditionModel(**self.student_run.config.model.unet.to_dict()).state_dict())
    self.assertEqual(set(delta), torch_keys)
    self.assertEqual({v.dtype for v in delta.values()}, {np.dtype(np.float32)})
    for k in delta:
      np.testing.assert_array_equal(delta[k], self.student[k] - self.teacher[k], err_msg=k)
    self.assertGreater(max(float(np.abs(v).max()) for v in delta.values()), 1e-4)  # training moved the student
    header, _ = io.read_safetensors_header(self.delta32)
    meta = header["__metadata__"]
    self.assertEqual((meta["format"], meta["weights"], meta["step"]), ("pt", "student", str(sx.TRAIN_STEPS)))
    self.assertEqual((meta["prediction_type"], meta["num_windows"]), ("diff_eps", "4"))

  def test_default_delta_is_float16_of_the_ema(self):
    path = export.cli(["export", f"--workdir={self.workdir}", f"--out={self.out}/delta16.safetensors"])
    delta = io.read_safetensors(path)
    self.assertEqual({v.dtype for v in delta.values()}, {np.dtype(np.float16)})
    ema = wexport.export_unet_state_dict(sx.loaded_run("ema").params, np.float32)
    for k in delta:
      np.testing.assert_array_equal(delta[k], (ema[k] - self.teacher[k]).astype(np.float16), err_msg=k)

  def test_merge_reproduces_the_student(self):
    merged, kept = wexport.merge_delta(self.teacher, io.read_safetensors(self.delta32))
    self.assertEqual(kept, [])
    worst = max(_ulps(merged[k], self.student[k], self.teacher[k]) for k in merged)
    # teacher + (student - teacher) in float32 rounds twice: at most one unit in the last place of the larger.
    self.assertLessEqual(worst, 1.0)
    self.assertEqual({v.dtype for v in merged.values()}, {np.dtype(np.float32)})

  def test_merge_casts_the_base_to_the_delta_dtype_and_back(self):
    base = {"w": np.array([1.0001, 2.0], np.float32)}
    merged, _ = wexport.merge_delta(base, {"w": np.array([0.5, -1.0], np.float16)})
    # 1.0001 is 1.0 in float16, so the merge gives float32(float16(1.0) + 0.5) = 1.5 exactly, as the reference.
    np.testing.assert_array_equal(merged["w"], np.array([1.5, 1.0], np.float32))
    self.assertEqual(merged["w"].dtype, np.float32)

  def test_mismatched_delta_lists_the_keys(self):
    delta = dict(io.read_safetensors(self.delta32))
    dropped = "conv_in.bias"
    del delta[dropped]
    delta["extra_block.weight"] = np.zeros(3, np.float32)
    delta["conv_out.weight"] = np.zeros((1, 2, 3, 3), np.float32)
    with self.assertRaises(wexport.DeltaMismatchError) as ctx:
      wexport.merge_delta(self.teacher, delta)
    msg = str(ctx.exception)
    for key in (dropped, "extra_block.weight", "conv_out.weight", "--keep_mismatched"):
      self.assertIn(key, msg)
    merged, kept = wexport.merge_delta(self.teacher, delta, keep_mismatched=True)
    self.assertEqual(kept, ["conv_in.bias", "conv_out.weight"])
    np.testing.assert_array_equal(merged["conv_in.bias"], self.teacher["conv_in.bias"])
    np.testing.assert_array_equal(merged["conv_out.weight"], self.teacher["conv_out.weight"])
    self.assertNotIn("extra_block.weight", merged)
    k = "conv_in.weight"
    self.assertLessEqual(_ulps(merged[k], self.student[k], self.teacher[k]), 1.0)

  def test_unet_folder_loads_in_diffusers_with_the_student(self):
    folder = export.cli(["export", f"--workdir={self.workdir}", f"--out={self.out}/unet", "--format=unet",
                         "--weights=student"])
    with open(os.path.join(folder, "config.json")) as f:
      self.assertEqual(json.load(f)["_class_name"], "UNet2DConditionModel")
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder)
    sd = unet.state_dict()
    self.assertEqual(set(sd), set(self.student))
    for k, v in sd.items():
      np.testing.assert_array_equal(v.numpy(), self.student[k], err_msg=k)
    with self.assertRaisesRegex(ValueError, "not empty"):
      export.cli(["export", f"--workdir={self.workdir}", f"--out={folder}", "--format=unet"])

  def test_delta_folder_loads_as_the_released_deltas_do_and_merges_like_the_reference(self):
    folder = export.cli(["export", f"--workdir={self.workdir}", f"--out={self.out}/perflow_delta",
                         "--variant=v0-1"])
    self.assertEqual(sorted(os.listdir(folder)), ["config.json", "diffusion_pytorch_model.v0-1.safetensors"])
    # The official README's loading line, then utils_perflow.merge_delta_weights_into_unet's rule transcribed:
    # each base tensor cast to the delta's dtype, the delta added, the sum cast back (README: a float16 pipeline;
    # a float32 base as well).
    delta_weights = diffusers.UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch.float16,
                                                                   variant="v0-1").state_dict()
    for base_dtype in (torch.float16, torch.float32):
      base = diffusers.UNet2DConditionModel(**self.student_run.config.model.unet.to_dict())
      base.load_state_dict({k: torch.from_numpy(v) for k, v in self.teacher.items()}, strict=True)
      unet_weights = base.to(base_dtype).state_dict()
      self.assertEqual(unet_weights.keys(), delta_weights.keys())
      ours, kept = wexport.merge_delta({k: v.numpy() for k, v in unet_weights.items()},
                                       wexport.read_delta(folder, "v0-1"))
      for key in delta_weights:
        dtype = unet_weights[key].dtype
        unet_weights[key] = unet_weights[key].to(dtype=delta_weights[key].dtype) + delta_weights[key]
        unet_weights[key] = unet_weights[key].to(dtype)
      self.assertEqual(kept, [])
      for k, v in unet_weights.items():
        np.testing.assert_array_equal(ours[k], v.numpy(), err_msg=f"{base_dtype} {k}")
    # The folder holds the same float16 dW as the single file, and the same metadata.
    single = io.read_safetensors(export.cli(["export", f"--workdir={self.workdir}",
                                             f"--out={self.out}/delta_v01.safetensors"]))
    from_folder = wexport.read_delta(folder)  # its only weights file, without naming the variant
    for k in single:
      np.testing.assert_array_equal(from_folder[k], single[k], err_msg=k)
    self.assertEqual(wexport.delta_metadata(folder, "v0-1")["num_windows"], "4")

  def test_delta_folder_errors_name_the_files(self):
    folder = os.path.join(self.out, "two_variants")
    os.makedirs(folder)
    for name in ("diffusion_pytorch_model.v0-0.safetensors", "diffusion_pytorch_model.v0-1.safetensors"):
      io.write_safetensors(os.path.join(folder, name), {"w": np.zeros(2, np.float16)})
    with self.assertRaisesRegex(ValueError, r"holds 2 weights files .*--delta_variant=v0-0"):
      wexport.read_delta(folder)
    with self.assertRaisesRegex(ValueError, r"has no diffusion_pytorch_model\.fp16\.safetensors"):
      wexport.read_delta(folder, "fp16")
    self.assertEqual(set(wexport.read_delta(folder, "v0-0")), {"w"})
    with self.assertRaisesRegex(ValueError, "is a file"):
      wexport.read_delta(self.delta32, "v0-1")
    with self.assertRaisesRegex(ValueError, "does not exist"):
      wexport.read_delta(os.path.join(self.out, "missing"))
    with self.assertRaisesRegex(ValueError, "one file"):
      export.export_run(self.workdir, os.path.join(self.out, "d.safetensors"), variant="v0-1")
    with self.assertRaisesRegex(ValueError, "letters, digits"):
      export.export_run(self.workdir, os.path.join(self.out, "d_dir"), variant="v0/1")

  def test_bad_arguments_are_refused_before_loading(self):
    with self.assertRaisesRegex(ValueError, r"not pickles; give a path ending in \.safetensors"):
      export.export_run(self.workdir, os.path.join(self.out, "delta.bin"))
    with self.assertRaisesRegex(ValueError, "teacher has no delta"):
      export.export_run(self.workdir, os.path.join(self.out, "d.safetensors"), weights="teacher")
    with self.assertRaisesRegex(ValueError, "config.json"):
      export.export_run(self.out, os.path.join(self.out, "d.safetensors"))


if __name__ == "__main__":
  absltest.main()
