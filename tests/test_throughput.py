"""Speed reporting: the chips' bf16 peaks, TFLOP/s and MFU, the loop's wall-time split, the UNet's FLOP count,
and the persistent compilation cache's choice of folder."""

import os
import tempfile

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from perflow_jax import compile_cache
from perflow_jax import throughput
from perflow_jax.weights import pretrained
from trainer_testutil import tiny_config


class PeakTableTest(absltest.TestCase):

  def test_device_kinds_as_jax_names_them(self):
    for kind, tflops in (("TPU v4", 275), ("TPU v5 lite", 197), ("TPU v5e", 197), ("TPU v5", 459),
                         ("TPU v5p", 459), ("TPU v6 lite", 918), ("NVIDIA A100-SXM4-80GB", 312),
                         ("NVIDIA A100 80GB PCIe", 312), ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756),
                         ("NVIDIA H200", 989)):
      self.assertEqual(throughput.peak_flops_per_device(kind), tflops * 1e12, kind)
    for unknown in ("cpu", "TPU v3", "TPU v5 litepod", "NVIDIA GeForce RTX 4090"):
      self.assertIsNone(throughput.peak_flops_per_device(unknown), unknown)

  def test_step_scalars(self):
    # 8 devices, 4e15 FLOPs in 2 s: 2.5e14 FLOP/s per device = 250 TFLOP/s; on a v5p (459) MFU 0.5447.
    out = throughput.step_scalars(4e15, 2.0, 8, 459e12)
    self.assertAlmostEqual(out["perf/tflops_per_device"], 250.0)
    self.assertAlmostEqual(out["perf/mfu"], 250.0 / 459.0)
    self.assertEqual(out["perf/step_s"], 2.0)
    self.assertEqual(set(throughput.step_scalars(4e15, 2.0, 8, None)), {"perf/step_s", "perf/tflops_per_device"})
    self.assertEqual(throughput.step_scalars(0.0, 2.0, 8, 459e12), {"perf/step_s": 2.0})

  def test_model_flops_formula(self):
    config = tiny_config(4, 8, 1)  # cfg_sync teacher, 4 solver steps
    self.assertEqual(throughput.model_flops_per_step(config, 10.0), (4 + 3) * 10.0)
    config.perflow.teacher_guidance = "guided"
    self.assertEqual(throughput.model_flops_per_step(config, 10.0), (2 * 4 + 3) * 10.0)
    config.objective = "diffusion"
    self.assertEqual(throughput.model_flops_per_step(config, 10.0), 30.0)


class LoopTimerTest(absltest.TestCase):

  def test_split_of_wall_time(self):
    now = [100.0]
    timer = throughput.LoopTimer(compile_s=7.0, clock=lambda: now[0])
    now[0] += 1.0  # step
    with timer.timing("data_wait"):
      now[0] += 0.25
    with timer.timing("checkpoint"):
      now[0] += 2.0
    now[0] += 0.5  # step
    self.assertEqual(timer.lap(), {"step": 1.5, "data_wait": 0.25, "checkpoint": 2.0, "sample": 0.0})
    with timer.timing("sample"):
      now[0] += 3.0
    now[0] += 1.0
    self.assertEqual(timer.lap(), {"step": 1.0, "data_wait": 0.0, "checkpoint": 0.0, "sample": 3.0})
    self.assertEqual(timer.total_scalars(), {"time/compile_s": 7.0, "time/step_s": 2.5, "time/data_wait_s": 0.25,
                                             "time/checkpoint_s": 2.0, "time/sample_s": 3.0})

  def test_unet_forward_flops_scale_with_the_batch(self):
    config = tiny_config(1, 8, 1)
    unet = pretrained.build_module("unet", dict(config.model.unet), dtype=jnp.float32)
    params = jax.eval_shape(lambda k: unet.init(k, *unet.dummy_inputs(1))["params"], jax.random.key(0))
    dim = unet.config.cross_attention_dim

    def flops(batch):
      return throughput.unet_forward_flops(unet, params, jax.ShapeDtypeStruct((batch, 8, 8, 4), jnp.float32),
                                           jax.ShapeDtypeStruct((batch, 77, dim), jnp.float32))

    one, eight = flops(1), flops(8)
    self.assertGreater(one, 1e6)
    np.testing.assert_allclose(eight, 8 * one, rtol=1e-3)  # everything but the timestep MLP scales with B


class CompileCacheTest(absltest.TestCase):

  def test_resolve_cache_dir(self):
    resolve = compile_cache.resolve_cache_dir
    self.assertEqual(resolve("", "/runs/a", None), "/runs/a/compilation_cache")
    self.assertEqual(resolve("", "gs://b/runs/a", None), "gs://b/runs/a/compilation_cache")
    self.assertEqual(resolve("", "/runs/a", "/shared/jit"), "/shared/jit")  # the user's JAX setting wins
    self.assertEqual(resolve("gs://b/jit", "/runs/a", "/shared/jit"), "gs://b/jit")  # ... unless the config says
    self.assertIsNone(resolve("none", "/runs/a", "/shared/jit"))
    self.assertIsNone(resolve("None", "/runs/a", None))
    # Several CPU processes: no cache by default (JAX 0.10 would let them disagree and hang) ...
    self.assertIsNone(resolve("", "/runs/a", None, multiprocess_cpu=True))
    # ... but the user's own choice stands.
    self.assertEqual(resolve("", "/runs/a", "/own/jit", multiprocess_cpu=True), "/own/jit")
    self.assertEqual(resolve("/runs/jit", "/runs/a", None, multiprocess_cpu=True), "/runs/jit")

  def test_enable_points_jax_at_the_workdir_and_counts_hits(self):
    before = jax.config.jax_compilation_cache_dir
    saved_choice = compile_cache._chosen_here  # pylint: disable=protected-access
    try:
      with tempfile.TemporaryDirectory() as workdir:
        compile_cache._chosen_here = before  # pylint: disable=protected-access  (as if no user setting)
        path = compile_cache.enable("", workdir)
        self.assertEqual(path, os.path.join(workdir, "compilation_cache"))
        self.assertEqual(jax.config.jax_compilation_cache_dir, path)
        # A program no other test compiles; a new function object each time, so JAX's in-memory caches miss.
        program = lambda: jax.jit(lambda x: jnp.sin(x) * 3.0 + jnp.float32(len(workdir)))
        x = jnp.arange(4.0)
        program().lower(x).compile()
        self.assertNotEmpty([n for n in os.listdir(path) if n.endswith("-cache")])
        hits = compile_cache.cache_hits()
        program().lower(x).compile()  # read from the folder
        self.assertEqual(compile_cache.cache_hits(), hits + 1)
        # A second run's workdir gets its own folder: the first default is not mistaken for the user's setting.
        other = os.path.join(workdir, "second")
        self.assertEqual(compile_cache.enable("", other), os.path.join(other, "compilation_cache"))
        self.assertIsNone(compile_cache.enable("none", other))
        self.assertIsNone(jax.config.jax_compilation_cache_dir)
    finally:
      compile_cache._chosen_here = saved_choice  # pylint: disable=protected-access
      jax.experimental.compilation_cache.compilation_cache.reset_cache()
      jax.config.update("jax_compilation_cache_dir", before)


if __name__ == "__main__":
  absltest.main()
