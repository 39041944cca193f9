"""train_step's pieces against their references: diffusers' EMA schedule, the warmup, gradient accumulation."""

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np
import torch
from diffusers.training_utils import EMAModel
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from perflow_jax import train_step as ts
from perflow_jax.parallel import mesh as mesh_lib
from perflow_jax.run_config import perflow_config


class EmaTest(absltest.TestCase):

  def test_decay_and_update_match_diffusers_ema_model(self):
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(5))
    ema_torch = EMAModel([param], decay=0.9999)
    ema = jnp.asarray(param.detach().numpy())
    for update in range(1, 30):
      with torch.no_grad():
        param.add_(torch.randn(5))
      ema_torch.step([param])
      decay = ts.ema_decay(jnp.asarray(update), 0.9999)
      self.assertAlmostEqual(float(decay), ema_torch.cur_decay_value, places=6, msg=f"update {update}")
      ema = ts.ema_update(ema, jnp.asarray(param.detach().numpy()), decay)
      np.testing.assert_allclose(ema, ema_torch.shadow_params[0].numpy(), rtol=1e-6, atol=1e-6)
    self.assertEqual(float(ts.ema_decay(jnp.asarray(1), 0.9999)), 0.0)  # the first update copies
    self.assertAlmostEqual(float(ts.ema_decay(jnp.asarray(4000), 0.9999)), 4000 / 4009, places=6)
    self.assertAlmostEqual(float(ts.ema_decay(jnp.asarray(10**6), 0.9999)), 0.9999, places=7)


class ScheduleTest(absltest.TestCase):

  def test_constant_without_warmup_and_linear_warmup_when_asked(self):
    optim = perflow_config().optim
    constant = ts.learning_rate_schedule(optim)
    self.assertEqual([float(constant(s)) for s in (0, 1, 500)], [8e-5] * 3)
    optim.warmup_steps = 100
    warm = ts.learning_rate_schedule(optim)
    np.testing.assert_allclose([float(warm(s)) for s in (0, 50, 100, 1000)], [0.0, 4e-5, 8e-5, 8e-5], rtol=1e-6)


class GradAccumulationTest(absltest.TestCase):

  def test_accumulated_step_equals_full_batch_step(self):
    """With a deterministic objective, A microbatches give the full batch's mean gradient and update."""

    def encode(frozen, batch, key):
      del frozen, key
      return batch["x"], batch["y"]

    objective = ts.Objective(
        prepare=lambda frozen, x, y, key: {"x": x, "y": y},
        loss=lambda p, inp: jnp.mean((inp["x"] @ p["w"] - inp["y"]) ** 2))
    rng = np.random.default_rng(0)
    batch = {"x": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32),
             "y": jnp.asarray(rng.normal(size=(8, 2)), jnp.float32)}
    params = {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)}
    results = []
    for accum in (1, 4):
      config = perflow_config()
      config.optim.grad_accum_steps = accum
      config.optim.learning_rate = 0.1
      optimizer = ts.make_optimizer(config.optim)
      step = jax.jit(ts.make_train_step(config, encode, objective, optimizer))
      state, ema = ts.init_train_state(params, optimizer)
      state, ema, metrics = step(state, ema, {}, batch, jax.random.key(0))
      results.append((state.params["w"], metrics["loss"], metrics["grad_norm"]))
    for a, b in zip(*results):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

  def test_strided_split_keeps_each_devices_examples(self):
    # Microbatch i holds examples i, A + i, ...: with 8 devices holding 4 contiguous examples each (B = 32) and
    # A = 2, every device contributes 2 of its own examples to each microbatch.
    x = jnp.arange(32)
    micro = ts.split_microbatches({"x": x}, 2)["x"]
    np.testing.assert_array_equal(micro, np.stack([np.arange(0, 32, 2), np.arange(1, 32, 2)]))
    np.testing.assert_array_equal(np.sort(np.asarray(micro).reshape(-1)), np.arange(32))

  def test_sharded_accumulated_step_equals_full_batch_and_moves_no_examples(self):
    """On a ('data', 'fsdp') = (2, 4) mesh with the batch sharded over both axes, A = 1, 2, 4 give the same update,
    and the compiled accumulation step has no batch all-gather / all-to-all / collective-permute (a contiguous
    [A, B/A] split all-gathers the batch here)."""
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 4})
    batch_sh = NamedSharding(mesh, P(("data", "fsdp")))

    def encode(frozen, batch, key):
      del frozen, key
      return batch["x"], batch["y"]

    objective = ts.Objective(
        prepare=lambda frozen, x, y, key: {"x": x, "y": y},
        loss=lambda p, inp: jnp.mean((jnp.tanh(inp["x"] @ p["w"]) - inp["y"]) ** 2))
    rng = np.random.default_rng(1)
    batch = {"x": jax.device_put(rng.normal(size=(32, 16)).astype(np.float32), batch_sh),
             "y": jax.device_put(rng.normal(size=(32, 8)).astype(np.float32), batch_sh)}
    params = {"w": jax.device_put(rng.normal(size=(16, 8)).astype(np.float32), NamedSharding(mesh, P()))}
    results = []
    for accum in (1, 2, 4):
      config = perflow_config()
      config.optim.grad_accum_steps = accum
      config.optim.learning_rate = 0.1
      optimizer = ts.make_optimizer(config.optim)
      step = jax.jit(ts.make_train_step(config, encode, objective, optimizer))
      state, ema = ts.init_train_state(params, optimizer)
      compiled = step.lower(state, ema, {}, batch, jax.random.key(0)).compile()
      hlo = compiled.as_text()
      for op in ("all-gather", "all-to-all", "collective-permute"):
        self.assertNotRegex(hlo, rf"\b{op}(-start)?\(", msg=f"grad_accum_steps={accum}: {op} in the step")
      state, ema, metrics = compiled(state, ema, {}, batch, jax.random.key(0))
      results.append((state.params["w"], metrics["loss"], metrics["grad_norm"]))
    for other in results[1:]:
      for a, b in zip(results[0], other):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

  def test_batch_not_divisible_by_microbatches_is_an_error(self):
    with self.assertRaisesRegex(ValueError, "grad_accum_steps=3"):
      ts.split_microbatches({"x": jnp.zeros((8, 2))}, 3)


if __name__ == "__main__":
  absltest.main()
