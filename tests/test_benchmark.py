"""perflow_jax.benchmark (step, memory and sample modes on the tiny config) and the launch scripts."""

import json
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
import jax

from configs import sdxl
from configs import tiny
from perflow_jax import benchmark
from perflow_jax import run_config
from perflow_jax.parallel import mesh as mesh_lib
from perflow_jax.parallel import sharding as sh

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_config():
  config = tiny.get_config()
  config.data.source, config.data.random_flip, config.data.random_crop = "cache", False, False
  return config


class StepModeTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.TemporaryDirectory()
    out = os.path.join(cls.tmp.name, "bench.json")
    cls.proc = subprocess.run(
        [sys.executable, "-m", "perflow_jax.benchmark", "--config=configs/tiny.py", "--steps=2",
         "--peak_matmul_size=256", f"--out={out}"],
        cwd=_REPO, capture_output=True, text=True, timeout=900, check=False, env=dict(os.environ))
    cls.result = None
    if cls.proc.returncode == 0:
      with open(out) as f:
        cls.result = json.load(f)

  @classmethod
  def tearDownClass(cls):
    cls.tmp.cleanup()
    super().tearDownClass()

  def test_writes_json_with_positive_numbers(self):
    self.assertEqual(self.proc.returncode, 0, self.proc.stderr[-3000:])
    r = self.result
    self.assertEqual(r["mode"], "step")
    self.assertEqual(r["devices"], 8)
    self.assertEqual(r["batch_size"], 8)
    self.assertEqual(r["latent_shape"], [8, 8, 4])  # 16 px under the tiny VAE's 2x downsampling
    for key in ("median_step_s", "compile_s", "flops_per_step", "examples_per_s", "unet_forward_flops",
                "peak_matmul_flops_per_s", "achieved_flops_per_s", "flops_fraction_of_peak",
                "teacher_prepare_median_s", "teacher_share"):
      self.assertGreater(r[key], 0.0, key)
    self.assertGreater(r["memory"]["total_bytes"], 0)
    self.assertAlmostEqual(r["examples_per_s"], 8 / r["median_step_s"], places=6)
    # Tiny config: cfg_sync teacher with 4 solver steps + the student's forward and backward = 7 forwards.
    self.assertAlmostEqual(r["flops_per_step"], 7 * r["unet_forward_flops"], delta=1.0)
    self.assertAlmostEqual(r["flops_fraction_of_peak"],
                           r["flops_per_step"] / r["median_step_s"] / (8 * r["peak_matmul_flops_per_s"]),
                           delta=1e-9)
    self.assertIn("mode", self.proc.stdout)  # the readable table


class MemoryAndSampleModeTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.config = _tiny_config()
    cls.mesh = mesh_lib.make_mesh(cls.config.mesh)

  def test_memory_mode_builds_the_configured_attention_and_reports_the_sharded_arguments(self):
    config = self.config.copy_and_resolve_references()
    self.assertFalse(config.model.remat)

    def blockwise_calls(attention):
      config.model.attention, config.model.attention_query_chunk = attention, 16
      setup = benchmark.build_step(config, self.mesh)
      jaxpr = str(jax.make_jaxpr(setup.step)(*setup.abstract_args))
      return jaxpr.count("custom_vjp_call[")  # only the blockwise attention defines a custom VJP in the step

    self.assertEqual(blockwise_calls("xla"), 0)
    self.assertGreater(blockwise_calls("chunked"), 0)
    # One compile (of the chunked step) for both: the attention it built, and its memory report.
    result = benchmark.run_memory_benchmark(config, self.mesh)
    self.assertEqual(result["attention"], "chunked")
    # The default teacher placement ('gather_once'): gathered at the start of the step, so the teacher solve's
    # loop runs without collectives (tests/parallel/test_parallel_teacher_sharding.py: 'fsdp' has them).
    self.assertEqual(result["teacher_sharding"], "gather_once")
    self.assertEqual(result["collectives"]["teacher_solve_loop"], {})
    self.assertGreater(result["collectives"]["outside_loops"]["all-gather"], 0)
    memory = result["memory"]
    self.assertEqual(result["per_device_batch"], 1)
    self.assertEqual(result["mesh"], {"data": 1, "fsdp": 8})
    # The compiled arguments are exactly the per-device shards of state, EMA, teacher, batch and key.
    state, ema, frozen, batch, _ = benchmark.build_step(config, self.mesh).abstract_args
    expected = sum(sh.per_device_bytes(t) for t in (state, ema, frozen, batch))
    self.assertAlmostEqual(memory["argument_bytes"], expected, delta=64)
    self.assertGreater(memory["temp_bytes"], 0)
    self.assertEqual(memory["total_bytes"], memory["argument_bytes"] + memory["output_bytes"]
                     + memory["temp_bytes"] - memory["alias_bytes"] + memory["generated_code_bytes"])

  def test_memory_mode_sdxl_family(self):
    # configs/tiny.py:sdxl: an SDXL-shaped toy (two text encoders, text_time conditioning) on the shared mesh.
    config = tiny.get_config("sdxl")
    config.data.random_flip, config.data.random_crop = False, False
    self.assertEqual(benchmark.config_family(config), "sdxl")
    setup = benchmark.build_step(config, self.mesh)
    state, ema, frozen, batch, _ = setup.abstract_args
    shapes = lambda tree: jax.tree.map(lambda a: a.shape, tree)
    # conditioning.encode_ids's dict: both encoders' hidden states (32 + 32), bigG-style pooled output, time ids.
    self.assertEqual(shapes(batch["context"]), {"hidden": (8, 77, 64), "text_embeds": (8, 16), "time_ids": (8, 6)})
    self.assertEqual(shapes(frozen["empty_context"]),
                     {"hidden": (1, 77, 64), "text_embeds": (1, 16), "time_ids": (1, 6)})
    self.assertIn("add_embedding", ema)  # the UNet embeds text_embeds and time ids
    result = benchmark.run_memory_benchmark(config, self.mesh)
    self.assertEqual((result["family"], result["per_device_batch"]), ("sdxl", 1))
    expected = sum(sh.per_device_bytes(t) for t in (state, ema, frozen, batch))
    self.assertAlmostEqual(result["memory"]["argument_bytes"], expected, delta=64)
    self.assertGreater(result["memory"]["temp_bytes"], 0)

  def test_sdxl_config_gets_the_published_sdxl_model(self):
    config = sdxl.get_config("v5p-256")  # no model dicts: its time_ids say SDXL
    self.assertEqual(benchmark.config_family(config), "sdxl")
    self.assertEqual(benchmark.config_family(_tiny_config()), "sd1")
    full = benchmark._training_config(config, 0, "")  # pylint: disable=protected-access
    self.assertEqual(full.model.unet.cross_attention_dim, 2048)
    self.assertEqual(full.model.text_encoder_2.projection_dim, 1280)
    self.assertEqual(full.model.vae.scaling_factor, 0.13025)
    self.assertEqual(benchmark.latent_shape(full), (128, 128, 4))
    self.assertEqual(full.data.source, config.data.source)  # SDXL trains from images; the cache is rejected
    run_config.validate_run_config(full)
    context = jax.tree.map(lambda a: a.shape, benchmark.context_shapes(full, 2))
    self.assertEqual(context, {"hidden": (2, 77, 2048), "text_embeds": (2, 1280), "time_ids": (2, 6)})

  def test_sample_mode(self):
    result = benchmark.run_sample_benchmark(self.config, self.mesh, steps=1, perflow_steps=4, ddim_steps=8)
    self.assertGreater(result["perflow_4_median_s"], 0.0)
    self.assertGreater(result["ddim_8_median_s"], 0.0)
    self.assertAlmostEqual(result["speedup"], result["ddim_8_median_s"] / result["perflow_4_median_s"])

  def test_published_configs_fill_empty_model_sections(self):
    config = _tiny_config()
    config.model.unet = {}
    config.model.vae = {}
    full = benchmark.complete_model_configs(config, "sd1")
    self.assertEqual(tuple(full.model.unet.block_out_channels), (320, 640, 1280, 1280))
    self.assertEqual(full.model.unet.cross_attention_dim, 768)
    config.data.resolution = 512
    self.assertEqual(benchmark.latent_shape(benchmark.complete_model_configs(config, "sd1")), (64, 64, 4))
    self.assertEqual(tuple(config.model.text_encoder.keys()), tuple(full.model.text_encoder.keys()))  # kept

  def test_latent_shape_rejects_indivisible_resolution(self):
    config = _tiny_config()
    config.data.resolution = 17
    with self.assertRaisesRegex(ValueError, "multiple of 2"):
      benchmark.latent_shape(config)

  def test_table_formats_bytes_and_flops(self):
    table = benchmark.format_table({"mode": "step", "flops_per_step": 1.5e9, "memory": {"temp_bytes": 2**30}})
    self.assertIn("1.500e+09", table)
    self.assertIn("memory.temp_bytes", table)
    self.assertIn("1.000 GiB", table)


if __name__ == "__main__":
  absltest.main()
