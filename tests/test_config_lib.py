"""perflow_jax.config_lib (re-exported by configs/common.py): argument parsing, base config, validation, locked flag overrides, config.json."""

import json
import os
import shutil
import tempfile
import textwrap
from typing import Any

from absl import flags
from absl.testing import absltest
from ml_collections import config_flags
import ml_collections

from perflow_jax import config_lib as common
from perflow_jax.parallel import mesh as mesh_lib
from perflow_jax.parallel import sharding

_CONFIG_FILE = textwrap.dedent("""
    from configs import common

    def get_config(arg=None):
      arg = common.parse_arg(arg, runlocal=False, batch=8, variant="sd15")
      config = common.base_config(total_steps=10 if arg.runlocal else 1000, log_every=5)
      config.batch_size = arg.batch
      config.variant = arg.variant
      return config
""")


def _tempdir(test):
  path = tempfile.mkdtemp(prefix="perflow_cfg_")
  test.addCleanup(shutil.rmtree, path, ignore_errors=True)
  return path


class ParseArgTest(absltest.TestCase):

  def test_typed_values(self):
    arg = common.parse_arg("runlocal, variant=sd21,batch=4,lr=3e-5", runlocal=False, variant="sd15", batch=64,
                           lr=1e-4, flip=True)
    self.assertEqual(arg.to_dict(), {"runlocal": True, "variant": "sd21", "batch": 4, "lr": 3e-5, "flip": True})
    self.assertIsInstance(arg.batch, int)
    self.assertEqual(common.parse_arg("flip=false", flip=True).flip, False)
    self.assertEqual(common.parse_arg(None, batch=2).batch, 2)
    self.assertEqual(common.parse_arg("", batch=2).batch, 2)

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, r"unknown config argument 'btch'.*Did you mean 'batch'\?"):
      common.parse_arg("btch=4", batch=64)
    with self.assertRaisesRegex(ValueError, r"config argument 'batch' needs a value"):
      common.parse_arg("batch", batch=64)
    with self.assertRaisesRegex(ValueError, r"batch='four' is not an integer"):
      common.parse_arg("batch=four", batch=64)
    with self.assertRaisesRegex(ValueError, r"runlocal='maybe' is not a boolean"):
      common.parse_arg("runlocal=maybe", runlocal=False)


class ValidateTest(absltest.TestCase):

  def test_base_config_passes(self):
    config = common.base_config(total_steps=100, log_every=10)
    common.validate(config)
    self.assertEqual((config.total_steps, config.log_every, config.checkpoint_every, config.keep_checkpoints),
                     (100, 10, 1000, 3))
    self.assertEqual(config.sharding.rules, sharding.DEFAULT_RULES)
    with self.assertRaisesRegex(ValueError, r"base_config\(\) has no field 'total_step'"):
      common.base_config(total_step=3)

  def test_experiment_schema(self):
    config = common.base_config()
    config.batch_size = 4
    config.model = ml_collections.ConfigDict({"channels": (32, 64), "anything": {"goes": 1}})
    schema = common.training_schema(batch_size=int, model={"channels": tuple, "anything": Any})
    common.validate(config, schema)
    config.model.chanels = (1,)
    with self.assertRaisesRegex(ValueError, r"unknown config field 'model.chanels'. Did you mean "
                                r"'model.channels'\?"):
      common.validate(config, schema)
    with self.assertRaisesRegex(ValueError, r"\['seed'\] are base fields already"):
      common.training_schema(seed=int)

  def test_rejections_name_the_field(self):
    cases = [
        (lambda c: setattr(c, "totl_steps", 3), r"unknown config field 'totl_steps'. Did you mean 'total_steps'"),
        (lambda c: c.mesh.__setattr__("tensor", 2), r"unknown config field 'mesh.tensor'"),
        (lambda c: c.__delattr__("seed"), r"config field 'seed' is missing"),
        (lambda c: c.__setattr__("total_steps", 0), r"config.total_steps=0 must be >= 1"),
        (lambda c: c.__setattr__("log_every", 20_000), r"config.log_every=20000 exceeds config.total_steps"),
        (lambda c: c.__setattr__("keep_checkpoints", 0), r"config.keep_checkpoints=0 must be >= 1"),
        (lambda c: c.mesh.__setattr__("data", -1), r"-1 on more than one axis"),
        (lambda c: c.mesh.__setattr__("data", 0), r"config.mesh.data=0"),
        (lambda c: c.mesh.__setattr__("dcn_data", 0), r"config.mesh.dcn_data=0 must be a positive integer"),
        (lambda c: c.mesh.__setattr__("dcn_data", -1), r"config.mesh.dcn_data=-1 must be a positive integer"),
        (lambda c: c.mesh.update({"data": 6, "fsdp": 4, "dcn_data": 4}),
         r"config.mesh.data=6 is not divisible by config.mesh.dcn_data=4"),
        (lambda c: c.sharding.__setattr__("rules", (("batch", "data"), ("mlp", "model"))),
         r"maps 'mlp' to mesh axis 'model'"),
        (lambda c: c.sharding.__setattr__("rules", (("mlp", "fsdp"),)), r"no 'batch' rule"),
        (lambda c: c.sharding.__setattr__("max_replicated_fraction", 1.5), r"max_replicated_fraction=1.5"),
        (lambda c: c.distributed.__setattr__("num_processes", 4), r"4 processes are configured"),
    ]
    for mutate, message in cases:
      config = common.base_config()
      mutate(config)
      with self.assertRaisesRegex(ValueError, message):
        common.validate(config)

  def test_types(self):
    config = ml_collections.ConfigDict(common.base_config().to_dict())
    config.unlock()
    del config["total_steps"]
    config.total_steps = "10"
    with self.assertRaisesRegex(ValueError, r"config field 'total_steps' must be int, got '10' \(str\)"):
      common.validate(config)
    del config["total_steps"]
    config.total_steps = True
    with self.assertRaisesRegex(ValueError, r"'total_steps' must be int, got True"):
      common.validate(config)
    config = common.base_config()
    del config["mesh"]
    config.mesh = 8
    with self.assertRaisesRegex(ValueError, r"config field 'mesh' must be a sub-config"):
      common.validate(config)
    config = common.base_config()
    config.sharding.max_replicated_fraction = 0  # An int where a float is declared is fine.
    common.validate(config)

  def test_mesh_dcn_data(self):
    config = common.base_config()
    self.assertEqual(config.mesh.to_dict(), {"data": 1, "fsdp": -1, "dcn_data": 1})
    config.mesh.update({"data": 64, "fsdp": 16, "dcn_data": 4})  # dcn_data is not an axis: no '-1' rules apply
    common.validate(config)
    config.mesh.update({"data": -1, "fsdp": 16, "dcn_data": 4})  # data resolved from the devices at start-up
    common.validate(config)
    fields = common.base_config().to_dict()
    fields["mesh"]["dcn_data"] = True
    with self.assertRaisesRegex(ValueError, r"config field 'mesh.dcn_data' must be int, got True"):
      common.validate(ml_collections.ConfigDict(fields))


class ConfigFlagsTest(absltest.TestCase):
  """The trainer's ``DEFINE_config_file(..., lock_config=True)`` with a config built on these helpers."""

  def setUp(self):
    super().setUp()
    self.path = os.path.join(_tempdir(self), "tiny_cfg.py")
    with open(self.path, "w") as f:
      f.write(_CONFIG_FILE)

  def _parse(self, *overrides):
    argv = ["prog", f"--config={self.path}:runlocal,batch=4", *overrides]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=flag_values, lock_config=True, sys_argv=argv)
    flag_values(argv)
    return flag_values.config

  def test_overrides_apply_and_config_validates(self):
    config = self._parse("--config.log_every=7", "--config.mesh.fsdp=4",
                         "--config.sharding.rules=(('batch', 'data'), ('mlp', 'fsdp'))")
    self.assertTrue(config.is_locked)
    self.assertEqual((config.total_steps, config.batch_size, config.variant, config.log_every, config.mesh.fsdp),
                     (10, 4, "sd15", 7, 4))
    self.assertEqual(config.sharding.rules, (("batch", "data"), ("mlp", "fsdp")))
    common.validate(config, common.training_schema(batch_size=int, variant=str))

  def test_locked_config_rejects_typos_and_bad_types(self):
    with self.assertRaisesRegex(AttributeError, r"Did you mean \"log_every\""):
      self._parse("--config.log_evry=7")
    with self.assertRaisesRegex(AttributeError, "tensor"):
      self._parse("--config.mesh.tensor=2")
    with self.assertRaisesRegex(flags.IllegalFlagValueError, r"--config.total_steps=1.5"):
      self._parse("--config.total_steps=1.5")


class ConfigJsonTest(absltest.TestCase):

  def test_write_and_load(self):
    workdir = os.path.join(_tempdir(self), "run")
    config = common.base_config(seed=3)
    path = common.write_config_json(config, workdir, is_primary=True)
    self.assertEqual(path, os.path.join(workdir, "config.json"))
    with open(path) as f:
      data = json.load(f)
    self.assertEqual(data["seed"], 3)
    self.assertEqual(data["sharding"]["rules"][0], ["batch", ["data", "fsdp"]])
    loaded = common.load_config_json(workdir)
    self.assertEqual(loaded.mesh.to_dict(), {"data": 1, "fsdp": -1, "dcn_data": 1})
    self.assertEqual(sharding.normalize_rules(loaded.sharding.rules),
                     sharding.normalize_rules(config.sharding.rules))
    common.validate(loaded)  # Lists from JSON still validate.
    self.assertIsNone(common.write_config_json(config, os.path.join(workdir, "other"), is_primary=False))
    self.assertFalse(os.path.exists(os.path.join(workdir, "other")))
    with self.assertRaisesRegex(ValueError, r"does not exist; pass a run's workdir"):
      common.load_config_json(os.path.join(workdir, "missing.json"))

  def test_config_from_before_dcn_data_loads(self):
    # A run's config.json written before config.mesh.dcn_data existed: it loads as one slice and validates.
    workdir = os.path.join(_tempdir(self), "old_run")
    path = common.write_config_json(common.base_config(seed=5), workdir, is_primary=True)
    with open(path) as f:
      data = json.load(f)
    del data["mesh"]["dcn_data"]
    with open(path, "w") as f:
      json.dump(data, f)
    loaded = common.load_config_json(workdir)
    self.assertEqual(loaded.mesh.to_dict(), {"data": 1, "fsdp": -1, "dcn_data": 1})
    common.validate(loaded)
    self.assertEqual(dict(mesh_lib.make_mesh({"data": 1, "fsdp": -1}).shape), {"data": 1, "fsdp": 8})


if __name__ == "__main__":
  absltest.main()
