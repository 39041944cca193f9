"""`python -m perflow_jax.benchmark --mode=data` runs and reports throughput (the number itself is not asserted)."""

import json
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class DataBenchmarkTest(absltest.TestCase):

  def test_data_mode_writes_json(self):
    with tempfile.TemporaryDirectory() as tmp:
      out = os.path.join(tmp, "bench.json")
      run = subprocess.run(
          [sys.executable, "-m", "perflow_jax.benchmark", "--mode=data", "--data.resolution=16",
           "--data.batch_size=8", "--data.procedural_size=32", "--num_batches=3", "--warmup_batches=1",
           f"--out={out}"],
          cwd=_REPO, capture_output=True, text=True, timeout=300, check=False,
          env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"))
      self.assertEqual(run.returncode, 0, run.stderr[-3000:])
      with open(out) as f:
        result = json.load(f)
    self.assertEqual(result["mode"], "data")
    self.assertEqual(result["batch_size"], 8)
    self.assertEqual(result["devices"], 8)
    self.assertEqual(result["num_batches"], 3)
    self.assertGreater(result["images_per_s"], 0.0)
    self.assertAlmostEqual(result["images_per_s"], 8 * result["batches_per_s"], places=6)


if __name__ == "__main__":
  absltest.main()
