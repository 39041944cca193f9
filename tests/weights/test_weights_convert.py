"""`python -m perflow_jax.convert`: a single file and a folder -> orbax directory -> load_pretrained, identical."""

import os
import subprocess
import sys

from absl.testing import absltest
import jax
import numpy as np

from perflow_jax.parallel import mesh as mesh_lib
from perflow_jax.parallel import sharding as sharding_lib
from perflow_jax.weights import converted
from perflow_jax.weights import names
from perflow_jax.weights import pretrained
import weights_testutil as wt

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _assert_same(test, a: pretrained.Pretrained, b: pretrained.Pretrained):
  test.assertEqual(set(a.params()), set(b.params()))
  for comp, tree in a.params().items():
    want, got = names.flatten(jax.device_get(tree)), names.flatten(jax.device_get(b.params()[comp]))
    test.assertEqual(set(got), set(want), comp)
    for path, leaf in want.items():
      test.assertEqual(got[path].dtype, leaf.dtype)
      np.testing.assert_array_equal(got[path], leaf, err_msg=f"{comp} {path}")


class ConvertTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    import tempfile  # pylint: disable=g-import-not-at-top
    cls.root = tempfile.mkdtemp()
    cls.configs = wt.tiny_configs("sd2")
    cls.models = wt.build_torch_models(cls.configs, seed=3)
    cls.folder = wt.write_diffusers_folder(os.path.join(cls.root, "diffusers"), "sd2", cls.configs, cls.models)
    cls.file = wt.write_ldm_file(os.path.join(cls.root, "sd2.safetensors"), "sd2", cls.models)
    cls.reference = pretrained.load_pretrained(cls.folder)

  @classmethod
  def tearDownClass(cls):
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(cls.root, ignore_errors=True)
    super().tearDownClass()

  def test_cli_single_file_round_trip(self):
    out = os.path.join(self.root, "converted")
    env = dict(os.environ, PYTHONPATH=_REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = ""  # one device is enough for the CLI
    cmd = [sys.executable, "-m", "perflow_jax.convert", f"--src={self.file}", f"--out={out}",
           "--prediction_type=v_prediction", f"--tokenizer={self.folder}", f"--config_path={self.folder}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn(f"wrote {out}", proc.stdout)
    self.assertTrue(os.path.isfile(os.path.join(out, pretrained.CONVERTED_MARKER)))
    bundle = pretrained.load_pretrained(out)
    self.assertEqual(bundle.config["format"], "converted")
    self.assertEqual((bundle.config["family"], bundle.config["prediction_type"]), ("sd2", "v_prediction"))
    self.assertEqual(bundle.config["unet"], self.reference.config["unet"])
    _assert_same(self, self.reference, bundle)
    ids = bundle.tokenizer(["a cat"], padding="max_length", max_length=77).input_ids[0]
    self.assertEqual(ids[:5], [wt.BOS, 27, 56, wt.EOS, 26])

    # Into a non-empty --out: refused before any work.
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    self.assertNotEqual(again.returncode, 0)
    self.assertIn("exists and is not empty", again.stderr)
    # With the published configs (no --config_path) nothing says what the SD2 UNet predicts: refused, naming the flag.
    other = os.path.join(self.root, "converted_2")
    bad = subprocess.run(cmd[:3] + [f"--src={self.file}", f"--out={other}", f"--tokenizer={self.folder}"],
                         env=env, capture_output=True, text=True, timeout=300, check=False)
    self.assertNotEqual(bad.returncode, 0)
    self.assertIn("--prediction_type", bad.stderr)
    self.assertFalse(os.path.exists(os.path.join(other, pretrained.CONVERTED_MARKER)))

  def test_save_and_restore_sharded(self):
    out = os.path.join(self.root, "sharded")
    converted.save_converted(self.reference, out)
    with self.assertRaisesRegex(ValueError, "not empty"):
      converted.save_converted(self.reference, out)
    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": -1})
    bundle = pretrained.load_pretrained(out, shardings=lambda boxed: sharding_lib.logical_to_shardings(boxed, mesh))
    kernel = bundle.unet_params["conv_in"]["kernel"]
    self.assertEqual(kernel.sharding.spec, jax.sharding.PartitionSpec(None, None, None, "fsdp"))
    _assert_same(self, self.reference, bundle)
    self.assertEqual(pretrained.load_pretrained(out, prediction_type="epsilon").config["prediction_type"], "epsilon")

  def test_interrupted_conversion_is_not_loaded(self):
    out = os.path.join(self.root, "partial")
    converted.save_converted(self.reference, out)
    os.remove(os.path.join(out, pretrained.CONVERTED_MARKER))
    with self.assertRaisesRegex(ValueError, "neither a diffusers folder"):
      pretrained.load_pretrained(out)


if __name__ == "__main__":
  absltest.main()
