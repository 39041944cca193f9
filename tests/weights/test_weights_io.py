"""Weight-file reading: safetensors (all float dtypes, sharded, corrupt), pickle opt-in, nested state dicts."""

import json
import os
import shutil
import tempfile

from absl.testing import absltest
import ml_dtypes
import numpy as np
import torch
from safetensors.torch import load_file as torch_load_safetensors
from safetensors.torch import save_file as torch_save_safetensors

from perflow_jax.weights import io


def _tmpdir(test: absltest.TestCase) -> str:
  # absltest's create_tempdir needs parsed absl flags, which pytest does not provide.
  path = tempfile.mkdtemp()
  test.addCleanup(shutil.rmtree, path, ignore_errors=True)
  return path


def _tensors():
  g = torch.Generator().manual_seed(0)
  return {
      "conv.weight": torch.randn(4, 3, 3, 3, generator=g),
      "half": torch.randn(5, 2, generator=g).half(),
      "brain": torch.randn(7, generator=g).to(torch.bfloat16),
      "steps": torch.arange(6, dtype=torch.int64).reshape(2, 3),
  }


class SafetensorsTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = _tmpdir(self)
    self.tensors = _tensors()
    self.path = os.path.join(self.dir, "model.safetensors")
    torch_save_safetensors(self.tensors, self.path)

  def test_reads_every_dtype_bit_exactly(self):
    got = io.read_safetensors(self.path)
    self.assertEqual(set(got), set(self.tensors))
    self.assertEqual(got["brain"].dtype, np.dtype(ml_dtypes.bfloat16))
    self.assertEqual(got["half"].dtype, np.float16)
    self.assertEqual(got["steps"].dtype, np.int64)
    for k, t in self.tensors.items():
      np.testing.assert_array_equal(got[k].astype(np.float64), t.double().numpy())

  def test_upcast_keeps_integers(self):
    got = io.read_safetensors(self.path, dtype=np.float32)
    self.assertEqual({k: v.dtype for k, v in got.items()},
                     {"conv.weight": np.float32, "half": np.float32, "brain": np.float32, "steps": np.int64})
    np.testing.assert_array_equal(got["brain"], self.tensors["brain"].float().numpy())

  def test_writer_is_read_by_the_reference_library(self):
    out = os.path.join(self.dir, "copy.safetensors")
    io.write_safetensors(out, io.read_safetensors(self.path), metadata={"format": "pt"})
    back = torch_load_safetensors(out)
    self.assertEqual(set(back), set(self.tensors))
    for k, t in self.tensors.items():
      self.assertTrue(torch.equal(back[k], t), k)

  def test_truncated_file_names_the_file(self):
    data = open(self.path, "rb").read()
    for cut in (len(data) - 3, 20, 4):
      bad = os.path.join(self.dir, f"cut{cut}.safetensors")
      with open(bad, "wb") as f:
        f.write(data[:cut])
      with self.assertRaisesRegex(io.WeightFileError, f"cut{cut}.safetensors is not a valid safetensors"):
        io.read_safetensors(bad)

  def test_garbage_header(self):
    bad = os.path.join(self.dir, "bad.safetensors")
    with open(bad, "wb") as f:
      f.write((12).to_bytes(8, "little") + b"not json!!!!" + b"\0" * 16)
    with self.assertRaisesRegex(io.WeightFileError, "unreadable JSON header"):
      io.read_safetensors(bad)

  def test_missing_file(self):
    with self.assertRaisesRegex(io.WeightFileError, "does not exist"):
      io.read_state_dict(os.path.join(self.dir, "nope.safetensors"))

  def test_sharded_index(self):
    shard_dir = os.path.join(self.dir, "sharded")
    os.makedirs(shard_dir)
    names = sorted(self.tensors)
    weight_map = {}
    for i, part in enumerate((names[:2], names[2:])):
      fname = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
      torch_save_safetensors({k: self.tensors[k] for k in part}, os.path.join(shard_dir, fname))
      weight_map.update({k: fname for k in part})
    index = os.path.join(shard_dir, "diffusion_pytorch_model.safetensors.index.json")
    with open(index, "w") as f:
      json.dump({"metadata": {}, "weight_map": weight_map}, f)
    self.assertEqual(io.component_weight_file(shard_dir), index)
    got = io.read_state_dict(index)
    self.assertEqual(set(got), set(self.tensors))
    np.testing.assert_array_equal(got["conv.weight"], self.tensors["conv.weight"].numpy())
    weight_map["ghost"] = weight_map[names[0]]
    with open(index, "w") as f:
      json.dump({"weight_map": weight_map}, f)
    with self.assertRaisesRegex(io.WeightFileError, "ghost"):
      io.read_state_dict(index)

  def test_component_folder_prefers_safetensors_and_reports_contents(self):
    folder = _tmpdir(self)
    with self.assertRaisesRegex(io.WeightFileError, r"no weight file in .*found \[\]"):
      io.component_weight_file(folder)
    torch.save({"a": torch.zeros(1)}, os.path.join(folder, "diffusion_pytorch_model.bin"))
    self.assertTrue(io.component_weight_file(folder).endswith(".bin"))
    torch_save_safetensors({"a": torch.zeros(1)}, os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    self.assertTrue(io.component_weight_file(folder).endswith(".safetensors"))


class PickleTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = _tmpdir(self)
    self.tensors = _tensors()
    self.path = os.path.join(self.dir, "model.ckpt")
    torch.save({"state_dict": {"state_dict": self.tensors}, "global_step": 875000}, self.path)

  def test_needs_opt_in(self):
    with self.assertRaisesRegex(io.WeightFileError, "allow_pickle=True.*safetensors|safetensors.*allow_pickle=True"):
      io.read_state_dict(self.path)

  def test_nested_state_dict_and_bf16(self):
    got = io.read_state_dict(self.path, allow_pickle=True)
    self.assertEqual(set(got), set(self.tensors))  # global_step is not a weight
    self.assertEqual(got["brain"].dtype, np.dtype(ml_dtypes.bfloat16))
    for k, t in self.tensors.items():
      np.testing.assert_array_equal(got[k].astype(np.float64), t.double().numpy())
    self.assertEqual(io.read_pickle(self.path, allow_pickle=True)["global_step"], 875000)

  def test_weights_only_refuses_code(self):
    bad = os.path.join(self.dir, "evil.ckpt")
    torch.save({"state_dict": {"x": torch.zeros(1)}, "obj": tempfile.TemporaryDirectory}, bad)
    with self.assertRaisesRegex(io.WeightFileError, "weights_only=True"):
      io.read_state_dict(bad, allow_pickle=True)

  def test_unknown_extension(self):
    with self.assertRaisesRegex(io.WeightFileError, "do not know how to read"):
      io.read_state_dict(os.path.join(self.dir, "model.onnx"))


if __name__ == "__main__":
  absltest.main()
