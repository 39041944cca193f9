"""Export CLI: delta weights (the released PeRFlow format), merging them back, and the merged diffusers UNet."""

import json
import os
import tempfile

from absl.testing import absltest
import diffusers
import numpy as np

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

  def test_bad_arguments_are_refused_before_loading(self):
    with self.assertRaisesRegex(ValueError, r"ending in \.safetensors"):
      export.export_run(self.workdir, os.path.join(self.out, "delta.bin"))
    with self.assertRaisesRegex(ValueError, "teacher has no delta"):
      export.export_run(self.workdir, os.path.join(self.out, "d.safetensors"), weights="teacher")
    with self.assertRaisesRegex(ValueError, "config.json"):
      export.export_run(self.out, os.path.join(self.out, "d.safetensors"))


if __name__ == "__main__":
  absltest.main()
