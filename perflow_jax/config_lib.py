"""Config machinery for the ``get_config(arg)`` config files: argument parsing, the base training config,
schema validation, config.json. It lives in the package (configs/ is not installed) so the trainer and the CLIs
can validate any config; configs/common.py re-exports it for the config files.

A config file reads::

  from configs import common

  def get_config(arg=None):
    arg = common.parse_arg(arg, runlocal=False, variant="sd15", batch=64)
    config = common.base_config(total_steps=20 if arg.runlocal else 20_000)
    ...
    return config

and the trainer loads it with ``config_flags.DEFINE_config_file("config", lock_config=True)``, so
``--config=configs/x.py:runlocal,batch=4 --config.total_steps=10`` works and a misspelt ``--config.totl_steps``
fails. Before training, ``validate(config, training_schema(...))`` rejects unknown or missing fields, wrong types
and inconsistent values with a message naming the field.
"""

from __future__ import annotations

import difflib
import json
from typing import Any, Mapping

import ml_collections

from perflow_jax import storage
from perflow_jax.parallel import distributed as distributed_lib
from perflow_jax.parallel import mesh as mesh_lib
from perflow_jax.parallel import sharding as sharding_lib

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _convert(key: str, text: str, default: Any) -> Any:
  if isinstance(default, bool):
    if text.lower() in _TRUE:
      return True
    if text.lower() in _FALSE:
      return False
    raise ValueError(f"config argument {key}={text!r} is not a boolean; use {key}=true or {key}=false.")
  if isinstance(default, int):
    try:
      return int(text)
    except ValueError:
      raise ValueError(f"config argument {key}={text!r} is not an integer.") from None
  if isinstance(default, float):
    try:
      return float(text)
    except ValueError:
      raise ValueError(f"config argument {key}={text!r} is not a number.") from None
  return text


def parse_arg(arg: str | None, **spec: Any) -> ml_collections.ConfigDict:
  """Parses a config file's argument string, big_vision style, into typed values.

  ``"runlocal,variant=sd21,batch=4"`` with ``spec = dict(runlocal=False, variant="sd15", batch=64)`` gives
  ``runlocal=True, variant="sd21", batch=4``. A bare word sets a boolean to True; ``key=value`` is converted to the
  type of the key's default (bool, int, float or str).

  Args:
    arg: the text after ':' in ``--config=path.py:ARG``, or None / ''.
    **spec: every allowed key with its default value.

  Returns:
    A ConfigDict with every key of ``spec``.
  """
  values = dict(spec)
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    key, has_value, text = item.partition("=")
    key = key.strip()
    if key not in spec:
      close = difflib.get_close_matches(key, list(spec), n=1)
      hint = f" Did you mean {close[0]!r}?" if close else ""
      raise ValueError(f"unknown config argument {key!r} in {arg!r}; known: {sorted(spec)}.{hint}")
    if not has_value:
      if not isinstance(spec[key], bool):
        raise ValueError(f"config argument {key!r} needs a value ({key}=...); only booleans can be bare words.")
      values[key] = True
    else:
      values[key] = _convert(key, text.strip(), spec[key])
  return ml_collections.ConfigDict(values)


def base_config(**overrides: Any) -> ml_collections.ConfigDict:
  """The fields every training config has, with defaults; ``overrides`` set top-level fields by name.

  Fields:
    seed: base of all randomness (``jax.random.fold_in(key, step)`` per step).
    total_steps, log_every, checkpoint_every, keep_checkpoints: run length and cadences, in optimizer steps.
    mesh.data, mesh.fsdp: total mesh axis sizes; -1 = the remaining devices (default: pure FSDP).
    mesh.dcn_data: slices (multi-slice TPU; hosts on multi-node GPU) the 'data' axis spans over the data-center
      network; 1 = one slice. See ``perflow_jax.parallel.mesh``.
    sharding.rules: (logical axis name, mesh axes) pairs; sharding.fallback_to_largest: see
      ``perflow_jax.parallel.sharding``; sharding.max_replicated_fraction: start-up sharding check tolerance;
      sharding.teacher: the frozen teacher's placement, one of ``sharding_lib.TEACHER_SHARDINGS``: 'gather_once'
      (default: sharded like the student, all-gathered once at the start of each step, so the solver's loop runs
      without collectives; a whole teacher per device during the step), 'fsdp' (sharded like the student and
      used sharded: the partitioner moves weights or activations inside the loop, S times per step),
      'replicated' (a whole teacher per device all the time, no gathers).
    distributed.*: multi-process start-up (see ``perflow_jax.parallel.distributed``).
    compilation_cache_dir: the persistent compilation cache; '' = JAX's own setting, else
      ``<workdir>/compilation_cache``; 'none' = off (see ``perflow_jax.compile_cache``).
  """
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.total_steps = 10_000
  config.log_every = 50
  config.checkpoint_every = 1000
  config.keep_checkpoints = 3
  config.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "dcn_data": 1})
  config.sharding = ml_collections.ConfigDict({
      "rules": sharding_lib.DEFAULT_RULES,
      "fallback_to_largest": True,
      "max_replicated_fraction": 0.1,
      "teacher": "gather_once",
  })
  config.distributed = ml_collections.ConfigDict({
      "coordinator_address": "",
      "num_processes": 0,
      "process_id": -1,
      "auto_detect": True,
  })
  config.compilation_cache_dir = ""
  for key, value in overrides.items():
    if key not in config:
      raise ValueError(f"base_config() has no field {key!r}; known: {sorted(config.keys())}. Add new fields to the "
                       "returned config directly.")
    config[key] = value
  return config


# Types of the base fields; a nested dict is a sub-config, ``Any`` accepts any value or sub-tree.
TRAINING_SCHEMA: Mapping[str, Any] = {
    "seed": int,
    "total_steps": int,
    "log_every": int,
    "checkpoint_every": int,
    "keep_checkpoints": int,
    "mesh": {"data": int, "fsdp": int, "dcn_data": int},
    "sharding": {"rules": (tuple, list), "fallback_to_largest": bool, "max_replicated_fraction": float,
                 "teacher": str},
    "distributed": {"coordinator_address": str, "num_processes": int, "process_id": int, "auto_detect": bool},
    "compilation_cache_dir": str,
}


def training_schema(**extra: Any) -> dict[str, Any]:
  """``TRAINING_SCHEMA`` plus an experiment's own fields (``model={...}``, ``batch_size=int``, ``data=Any``)."""
  clash = set(extra) & set(TRAINING_SCHEMA)
  if clash:
    raise ValueError(f"training_schema(): {sorted(clash)} are base fields already; do not redeclare them.")
  return {**TRAINING_SCHEMA, **extra}


def _type_name(expected: Any) -> str:
  if isinstance(expected, tuple):
    return " or ".join(t.__name__ for t in expected)
  return expected.__name__


def _type_ok(value: Any, expected: Any) -> bool:
  types = expected if isinstance(expected, tuple) else (expected,)
  if isinstance(value, bool):
    return bool in types  # bool is an int subclass; an int field must not take True.
  if float in types and isinstance(value, int):
    return True
  return isinstance(value, types)


def _check_structure(config: Mapping[str, Any], schema: Mapping[str, Any], prefix: str) -> None:
  for key in config.keys():
    if key not in schema:
      close = difflib.get_close_matches(key, list(schema), n=1)
      hint = f" Did you mean {prefix + close[0]!r}?" if close else ""
      raise ValueError(f"unknown config field {prefix + key!r}.{hint} Known fields here: {sorted(schema)}.")
  for key, expected in schema.items():
    name = prefix + key
    if key not in config:
      raise ValueError(f"config field {name!r} is missing; add it to the config (see configs/common.py).")
    value = config[key]
    if expected is Any:
      continue
    if isinstance(expected, Mapping):
      if not isinstance(value, (Mapping, ml_collections.ConfigDict)):
        raise ValueError(f"config field {name!r} must be a sub-config with fields {sorted(expected)}, "
                         f"got {type(value).__name__}.")
      _check_structure(value, expected, name + ".")
    elif not _type_ok(value, expected):
      raise ValueError(f"config field {name!r} must be {_type_name(expected)}, got {value!r} "
                       f"({type(value).__name__}).")


def check_training_values(config: Any) -> None:
  """Range and consistency checks of the base fields (run by ``validate``)."""
  for name in ("total_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
    if config[name] < 1:
      raise ValueError(f"config.{name}={config[name]} must be >= 1.")
  if config.log_every > config.total_steps:
    raise ValueError(f"config.log_every={config.log_every} exceeds config.total_steps={config.total_steps}: "
                     "nothing would be logged; lower log_every.")
  mesh = {axis: config.mesh[axis] for axis in mesh_lib.MESH_AXES}
  for axis, size in mesh.items():
    if size == 0 or size < -1:
      raise ValueError(f"config.mesh.{axis}={size}: an axis size is a positive integer or -1 (the rest).")
  if list(mesh.values()).count(-1) > 1:
    raise ValueError(f"config.mesh has -1 on more than one axis ({mesh}); at most one axis can be -1.")
  slices = mesh_lib.num_slices(config.mesh)  # a positive int
  if mesh["data"] != -1 and mesh["data"] % slices:
    raise ValueError(f"config.mesh.data={mesh['data']} is not divisible by config.mesh.dcn_data={slices}: the data "
                     f"axis is split evenly over the slices; make data a multiple of {slices}.")
  rules = sharding_lib.normalize_rules(config.sharding.rules)
  for name, axes in rules:
    for axis in axes:
      if axis not in mesh_lib.MESH_AXES:
        raise ValueError(f"config.sharding.rules maps {name!r} to mesh axis {axis!r}; the mesh axes are "
                         f"{mesh_lib.MESH_AXES}.")
  if "batch" not in dict(rules):
    raise ValueError("config.sharding.rules has no 'batch' rule; add ('batch', ('data', 'fsdp')).")
  if config.sharding.teacher not in sharding_lib.TEACHER_SHARDINGS:
    raise ValueError(f"config.sharding.teacher={config.sharding.teacher!r} is not one of "
                     f"{sharding_lib.TEACHER_SHARDINGS}.")
  fraction = config.sharding.max_replicated_fraction
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"config.sharding.max_replicated_fraction={fraction} must be in [0, 1].")
  distributed_lib.distributed_args(config.distributed, env={})  # Raises on an incomplete multi-process setting.


def validate(config: Any, schema: Mapping[str, Any] = TRAINING_SCHEMA) -> None:
  """Rejects unknown, missing and wrongly typed fields, then inconsistent base-field values.

  Args:
    config: the ConfigDict ``get_config`` returned (after flag overrides).
    schema: field -> type, tuple of types, nested schema dict, or ``Any``; usually ``training_schema(...)``.

  Raises:
    ValueError naming the field and what to do.
  """
  _check_structure(config, schema, "")
  if all(key in schema for key in TRAINING_SCHEMA):
    check_training_values(config)


def config_to_json(config: Any) -> str:
  """The config as indented, key-sorted JSON (tuples become lists)."""
  if isinstance(config, ml_collections.ConfigDict):
    return config.to_json_best_effort(indent=2, sort_keys=True)
  return json.dumps(config, indent=2, sort_keys=True)


def write_config_json(config: Any, workdir: str, is_primary: bool | None = None,
                      keep_previous_as: str = "") -> str | None:
  """Writes ``workdir/config.json`` atomically from process 0; returns its path (None on other processes).

  keep_previous_as: when set and a different config.json exists, it is kept as ``config.<keep_previous_as>.json``.
  """
  if is_primary is None:
    import jax  # pylint: disable=g-import-not-at-top
    is_primary = jax.process_index() == 0
  if not is_primary:
    return None
  path = storage.join(storage.absolute(workdir), "config.json")
  text = config_to_json(config) + "\n"
  if keep_previous_as and storage.exists(path):
    previous = storage.read_text(path)
    if previous == text:
      return path
    storage.write_text(storage.join(storage.absolute(workdir), f"config.{keep_previous_as}.json"), previous)
  storage.write_text(path, text)
  return path


def load_config_json(path: str) -> ml_collections.ConfigDict:
  """Reads a ``config.json`` back as a ConfigDict (lists where the original had tuples)."""
  if storage.isdir(path):
    path = storage.join(path, "config.json")
  if not storage.exists(path):
    raise ValueError(f"{path} does not exist; pass a run's workdir or its config.json.")
  data = json.loads(storage.read_text(path))
  if isinstance(data.get("mesh"), dict):
    data["mesh"].setdefault("dcn_data", 1)  # runs written before config.mesh.dcn_data existed: one slice
  return ml_collections.ConfigDict(data)
