"""Logical-axis rules -> PartitionSpecs by parameter path, sharded init, and the sharding checks."""

import math

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from perflow_jax.parallel import mesh as mesh_lib
from perflow_jax.parallel import sharding

_lp = nn.with_logical_partitioning
_init = nn.initializers.normal(0.02)


class TinyNet(nn.Module):
  """Uses every logical name perflow_jax models use: embeddings, Dense, Conv, LayerNorm, GroupNorm."""

  @nn.compact
  def __call__(self, tokens, image):
    # tokens [B, 7] int; image [B, 4, 4, 4] NHWC.
    x = nn.Embed(64, 32, embedding_init=_lp(_init, ("vocab", "embed")), name="token_embedding")(tokens)
    x = x + self.param("position_embedding", _lp(_init, ("positions", "embed")), (7, 32))
    x = nn.LayerNorm(scale_init=_lp(nn.initializers.ones, ("norm",)),
                     bias_init=_lp(nn.initializers.zeros, ("norm",)), name="ln")(x)
    x = nn.Dense(48, kernel_init=_lp(_init, ("embed", "mlp")), bias_init=_lp(_init, ("mlp",)), name="fc1")(x)
    x = nn.Dense(12, kernel_init=_lp(_init, ("embed", "mlp")), bias_init=_lp(_init, ("mlp",)), name="fc2")(x)
    h = nn.Conv(16, (3, 3), kernel_init=_lp(_init, ("conv_h", "conv_w", "conv_in", "conv_out")),
                bias_init=_lp(_init, ("conv_out",)), name="conv_in")(image)
    h = nn.GroupNorm(4, scale_init=_lp(nn.initializers.ones, ("norm",)),
                     bias_init=_lp(nn.initializers.zeros, ("norm",)), name="norm")(h)
    h = nn.Conv(3, (3, 3), kernel_init=_lp(_init, ("conv_h", "conv_w", "conv_in", "conv_out")),
                bias_init=_lp(_init, ("conv_out",)), name="conv_out")(h)
    return x.mean() + h.mean()


_TOKENS = jnp.zeros((2, 7), jnp.int32)
_IMAGE = jnp.zeros((2, 4, 4, 4), jnp.float32)


def _init_params(key):
  return TinyNet().init(key, _TOKENS, _IMAGE)["params"]


_ABSTRACT = jax.eval_shape(_init_params, jax.random.key(0))
_PLAIN = jax.jit(lambda k: sharding.unbox(_init_params(k)))(jax.random.key(0))

# Expected specs by path for each 'fsdp' size; names not listed are replicated (P()).
_COMMON = {"fc1/kernel": P(None, "fsdp"), "fc1/bias": P("fsdp"), "conv_in/kernel": P(None, None, None, "fsdp"),
           "conv_in/bias": P("fsdp"), "token_embedding/embedding": P("fsdp")}
_EXPECTED = {
    1: {**_COMMON, "fc2/kernel": P(None, "fsdp"), "fc2/bias": P("fsdp"),
        "conv_out/kernel": P(None, None, None, "fsdp"), "conv_out/bias": P("fsdp")},
    4: {**_COMMON, "fc2/kernel": P(None, "fsdp"), "fc2/bias": P("fsdp")},
    8: dict(_COMMON),
}
# With fallback_to_largest, an axis that misses its named dimension lands on the largest free one it divides.
_FALLBACK = {
    1: {},
    4: {"conv_out/kernel": P(None, None, "fsdp")},
    8: {"conv_out/kernel": P(None, None, "fsdp"), "fc2/kernel": P("fsdp")},
}


def _mesh(shape):
  return mesh_lib.make_mesh({"data": shape[0], "fsdp": shape[1]})


class ShardingTest(parameterized.TestCase):

  @parameterized.parameters(((8, 1),), ((2, 4),), ((1, 8),))
  def test_specs_by_path_and_sharded_init(self, shape):
    mesh = _mesh(shape)
    for fallback in (False, True):
      shardings = sharding.logical_to_shardings(_ABSTRACT, mesh, sharding.DEFAULT_RULES, fallback)
      specs = sharding.leaf_specs(shardings)
      expected = {path: P() for path in specs}
      expected.update(_EXPECTED[shape[1]])
      if fallback:
        expected.update(_FALLBACK[shape[1]])
      self.assertEqual(specs, expected, f"mesh {shape} fallback {fallback}")
      if not fallback:
        continue  # One sharded init per mesh is enough to show jit places arrays as the specs say.
      params = sharding.init_sharded(_init_params, shardings, jax.random.key(0))
      for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(_PLAIN)):
        self.assertEqual(got.sharding, shardings_at(shardings, path))
        # Same numbers as an unsharded init with the same key.
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
      shard_shapes = {tuple(s.data.shape) for s in params["fc1"]["kernel"].addressable_shards}
      self.assertEqual(shard_shapes, {(32, 48 // shape[1])})
      # per_device_bytes of the real arrays is what device 0 actually holds.
      on_device_0 = sum(s.data.nbytes for leaf in jax.tree.leaves(params) for s in leaf.addressable_shards
                        if s.device == jax.devices()[0])
      self.assertEqual(sharding.per_device_bytes(params), on_device_0)

  def test_per_device_bytes_closed_form(self):
    mesh = _mesh((1, 8))
    shardings = sharding.logical_to_shardings(_ABSTRACT, mesh)
    abstract = sharding.with_shardings(_ABSTRACT, shardings)
    sizes = {sharding._path_str(p): math.prod(x.shape) for p, x in
             jax.tree_util.tree_flatten_with_path(sharding.unbox(_ABSTRACT))[0]}
    sharded = set(_EXPECTED[8])
    want = 4 * sum(n // 8 if path in sharded else n for path, n in sizes.items())
    self.assertEqual(sharding.per_device_bytes(abstract), want)
    summary = sharding.sharding_summary(abstract)
    self.assertEqual(summary["num_params"], sum(sizes.values()))
    self.assertEqual(summary["total_bytes"], 4 * sum(sizes.values()))
    self.assertEqual(summary["per_device_bytes"], want)
    replicated = sum(n for path, n in sizes.items() if path not in sharded) / sum(sizes.values())
    self.assertAlmostEqual(sharding.replicated_fraction(abstract), replicated, places=12)

  def test_sufficiently_sharded_check(self):
    mesh = _mesh((1, 8))
    plain = sharding.with_shardings(_ABSTRACT, sharding.logical_to_shardings(_ABSTRACT, mesh))
    with self.assertRaisesRegex(ValueError, r"24.1% of the parameter bytes .* Largest replicated: fc2/kernel "
                                r"\(48, 12\) P\(\) \(0.00 MiB\); conv_out/kernel"):
      sharding.assert_sufficiently_sharded(plain, mesh, 0.2)
    good = sharding.with_shardings(_ABSTRACT, sharding.logical_to_shardings(_ABSTRACT, mesh,
                                                                            fallback_to_largest=True))
    # Left replicated: position embedding 7*32, LayerNorm 2*32, GroupNorm 2*16, the biases of fc2 (12) and
    # conv_out (3), out of 5567 parameters.
    total = 64 * 32 + 7 * 32 + 2 * 32 + 32 * 48 + 48 + 48 * 12 + 12 + 9 * 4 * 16 + 16 + 2 * 16 + 9 * 16 * 3 + 3
    self.assertEqual(total, 5567)
    self.assertAlmostEqual(sharding.assert_sufficiently_sharded(good, mesh, 0.2),
                           (7 * 32 + 2 * 32 + 2 * 16 + 12 + 3) / total, places=12)
    no_fsdp = tuple((name, None if name != "batch" else axes) for name, axes in sharding.DEFAULT_RULES)
    bad = sharding.with_shardings(_ABSTRACT, sharding.logical_to_shardings(_ABSTRACT, mesh, no_fsdp))
    self.assertEqual(sharding.replicated_fraction(bad), 1.0)
    with self.assertRaisesRegex(ValueError, r"100.0% of the parameter bytes are replicated across mesh axis "
                                r"'fsdp' \(size 8\).*Largest replicated: token_embedding/embedding "
                                r"\(64, 32\) P\(\) \(0.01 MiB\); fc1/kernel \(32, 48\)"):
      sharding.assert_sufficiently_sharded(bad, mesh, 0.2)
    # Nothing to check when 'fsdp' has one device.
    mesh_dp = _mesh((8, 1))
    all_replicated = sharding.with_shardings(_ABSTRACT, sharding.logical_to_shardings(_ABSTRACT, mesh_dp, no_fsdp))
    self.assertEqual(sharding.assert_sufficiently_sharded(all_replicated, mesh_dp, 0.0), 1.0)

  def test_optimizer_state_follows_params(self):
    mesh = _mesh((2, 4))
    tx = optax.adamw(1e-3)
    opt_shardings = sharding.logical_to_shardings(jax.eval_shape(tx.init, _ABSTRACT), mesh)
    adam = opt_shardings[0]
    self.assertEqual(adam.count.spec, P())
    self.assertEqual(adam.mu["fc1"]["kernel"].spec, P(None, "fsdp"))
    self.assertEqual(adam.nu["conv_in"]["kernel"].spec, P(None, None, None, "fsdp"))
    opt_state = sharding.init_sharded(lambda p: tx.init(p), opt_shardings, _PLAIN)
    self.assertEqual(opt_state[0].mu["fc1"]["kernel"].sharding.spec, P(None, "fsdp"))
    self.assertEqual(sharding.leaf_specs(opt_shardings)["0/mu/fc1/kernel"], P(None, "fsdp"))

  def test_batch_sharding(self):
    mesh = _mesh((2, 4))
    self.assertEqual(sharding.batch_sharding(mesh).spec, P(("data", "fsdp")))
    self.assertEqual(sharding.batch_sharding(mesh, (("batch", "data"),)).spec, P("data"))
    batch = jax.device_put(jnp.zeros((16, 4, 4, 4)), sharding.batch_sharding(mesh))
    self.assertEqual({s.data.shape for s in batch.addressable_shards}, {(2, 4, 4, 4)})
    with self.assertRaisesRegex(ValueError, r"no 'batch' rule"):
      sharding.batch_sharding(mesh, (("mlp", "fsdp"),))

  def test_spec_for_prefix_and_used_axes(self):
    mesh = _mesh((2, 4))
    rules = sharding.normalize_rules(sharding.DEFAULT_RULES)
    self.assertEqual(sharding.spec_for((16, 3), ("batch", None), mesh, rules), P(("data", "fsdp")))
    self.assertEqual(sharding.spec_for((6, 3), ("batch", None), mesh, rules), P("data"))
    self.assertEqual(sharding.spec_for((5, 3), ("batch", None), mesh, rules), P())
    # A mesh axis shards at most one dimension: the second 'mlp' stays whole.
    self.assertEqual(sharding.spec_for((8, 8), ("mlp", "mlp"), mesh, rules), P("fsdp"))
    # Fallback never picks a dimension smaller than the axis.
    self.assertEqual(sharding.spec_for((3, 2), ("mlp", "embed"), mesh, rules, True), P())

  def test_errors_name_the_fix(self):
    mesh = _mesh((2, 4))
    rules = sharding.normalize_rules(sharding.DEFAULT_RULES)
    with self.assertRaisesRegex(ValueError, r"layer/kernel has logical axis 'mpl' that no sharding rule names"):
      sharding.spec_for((4, 4), ("embed", "mpl"), mesh, rules, path="layer/kernel")
    with self.assertRaisesRegex(ValueError, r"has shape \(4, 4\) but logical axis names \('embed',\)"):
      sharding.spec_for((4, 4), ("embed",), mesh, rules)
    with self.assertRaisesRegex(ValueError, r"names mesh axis 'tensor'"):
      sharding.logical_to_shardings(_ABSTRACT, mesh, sharding.DEFAULT_RULES[:-1] + (("positions", "tensor"),))
    with self.assertRaisesRegex(ValueError, r"logical axis 'mlp' twice"):
      sharding.normalize_rules((("mlp", "fsdp"), ("mlp", None)))
    with self.assertRaisesRegex(ValueError, r"not a \(logical_name, mesh_axes\) pair"):
      sharding.normalize_rules((("mlp",),))

  def test_plain_partitioned_names_mesh_axes(self):
    mesh = _mesh((2, 4))
    tree = {"a": nn.Partitioned(jax.ShapeDtypeStruct((16, 6), jnp.float32), (("data", "fsdp"), None)),
            "b": nn.Partitioned(jax.ShapeDtypeStruct((6, 4), jnp.float32), (None, "fsdp")),
            "c": jax.ShapeDtypeStruct((3,), jnp.int32)}
    specs = sharding.leaf_specs(sharding.logical_to_shardings(tree, mesh))
    self.assertEqual(specs, {"a": P(("data", "fsdp")), "b": P(None, "fsdp"), "c": P()})

  def test_rules_survive_a_json_round_trip(self):
    as_json = [["batch", ["data", "fsdp"]], ["mlp", "fsdp"], ["embed", None]]
    self.assertEqual(sharding.normalize_rules(as_json),
                     (("batch", ("data", "fsdp")), ("mlp", ("fsdp",)), ("embed", ())))


def shardings_at(shardings, path):
  node = shardings
  for key in path:
    node = node[key.key]
  return node


if __name__ == "__main__":
  absltest.main()
