"""Logical axis names -> NamedShardings on the ('data', 'fsdp') mesh, sharded init and sharding checks.

Parameters carry logical axis names (``nn.with_logical_partitioning``): Dense kernel ('embed', 'mlp'), Conv kernel
('conv_h', 'conv_w', 'conv_in', 'conv_out'), norms ('norm',), embeddings ('vocab', 'embed') / ('positions',
'embed'). Rules map each logical name to mesh axes (or None = replicated); ``DEFAULT_RULES`` is FSDP: 'mlp',
'conv_out' and 'vocab' over 'fsdp', the batch over ('data', 'fsdp'), everything else replicated.

Divisibility: a dimension is sharded over its mesh axes only if the axes' total size divides it; otherwise the
longest prefix of those axes that divides it is used, down to none (replicated on that dimension). With
``fallback_to_largest=True`` an axis that could not be placed on its named dimension goes to the largest other
unsharded dimension it divides. Why: with FSDP every weight is all-gathered before use, so which dimension holds
the shards changes only the gather's layout, not the math; memory is what matters, and e.g. the SD VAE's last
conv (3, 3, 128, 3) or a 320-channel conv on a 128-way 'fsdp' axis would otherwise sit whole on every device.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Every logical name used in perflow_jax appears here, so a misspelt name on a parameter is an error, not a
# silently replicated tensor.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("mlp", "fsdp"),
    ("conv_out", "fsdp"),
    ("vocab", "fsdp"),
    ("embed", None),
    ("conv_in", None),
    ("conv_h", None),
    ("conv_w", None),
    ("norm", None),
    ("positions", None),
)

Rules = Sequence[tuple[str, Any]]

# config.sharding.teacher: where the frozen teacher lives (see `teacher_placement`).
TEACHER_SHARDINGS = ("fsdp", "gather_once", "replicated")


def normalize_rules(rules: Iterable[Sequence[Any]]) -> tuple[tuple[str, tuple[str, ...]], ...]:
  """Rules as (logical name, tuple of mesh axes); accepts the lists a JSON round trip makes and None / 'axis'."""
  out = []
  seen = set()
  for rule in rules:
    if len(rule) != 2 or not isinstance(rule[0], str):
      raise ValueError(f"sharding rule {rule!r} is not a (logical_name, mesh_axes) pair; write e.g. "
                       "('mlp', 'fsdp') or ('embed', None).")
    name, axes = rule
    if name in seen:
      raise ValueError(f"sharding rules name the logical axis {name!r} twice; keep one rule for it.")
    seen.add(name)
    if axes is None:
      axes = ()
    elif isinstance(axes, str):
      axes = (axes,)
    out.append((name, tuple(axes)))
  return tuple(out)


def rules_from_config(config: Any) -> tuple[tuple[str, tuple[str, ...]], ...]:
  """``config.sharding.rules`` normalized (see ``normalize_rules``)."""
  return normalize_rules(config.sharding.rules)


def _check_axes(rules: Rules, mesh: Mesh) -> None:
  for name, axes in rules:
    for axis in axes:
      if axis not in mesh.shape:
        raise ValueError(f"sharding rule ({name!r}, {axes}) names mesh axis {axis!r}, but the mesh has axes "
                         f"{tuple(mesh.shape)}; fix config.sharding.rules.")


def spec_for(shape: Sequence[int], names: Sequence[str | None], mesh: Mesh, rules: Rules,
             fallback_to_largest: bool = False, path: str = "") -> P:
  """The PartitionSpec for one array of ``shape`` whose dimensions carry logical ``names``.

  Args:
    shape: array shape.
    names: one logical name (or None) per dimension.
    mesh: the device mesh (only its axis sizes are read).
    rules: normalized rules (``normalize_rules``).
    fallback_to_largest: move an axis that does not divide its named dimension to the largest other free
      dimension it divides.
    path: the parameter's path, for error messages.

  Returns:
    A PartitionSpec with an entry (None, an axis name, or a tuple of axis names) per dimension up to the last
    sharded one.
  """
  if len(names) != len(shape):
    raise ValueError(f"parameter {path or '?'} has shape {tuple(shape)} but logical axis names {tuple(names)}; "
                     "give one name per dimension in nn.with_logical_partitioning.")
  table = dict(normalize_rules(rules))  # Cheap, and spec_for may be called with rules as written in a config.
  used: set[str] = set()
  placed: list[tuple[str, ...]] = []
  unplaced: list[tuple[str, ...]] = []
  for size, name in zip(shape, names):
    if name is None:
      placed.append(())
      continue
    if name not in table:
      raise ValueError(f"parameter {path or '?'} has logical axis {name!r} that no sharding rule names; add "
                       f"({name!r}, None) or ({name!r}, 'fsdp') to config.sharding.rules.")
    axes = tuple(a for a in table[name] if a not in used)  # A mesh axis can shard only one dimension.
    keep = len(axes)
    while keep and size % math.prod(mesh.shape[a] for a in axes[:keep]):
      keep -= 1
    placed.append(axes[:keep])
    used.update(axes[:keep])
    if axes[keep:]:
      unplaced.append(axes[keep:])
  if fallback_to_largest:
    for axes in unplaced:
      group = math.prod(mesh.shape[a] for a in axes)
      free = [i for i, (size, got) in enumerate(zip(shape, placed))
              if not got and size % group == 0 and size >= group]
      if free:
        best = max(free, key=lambda i: shape[i])
        placed[best] = axes
        used.update(axes)
  entries = [None if not a else a[0] if len(a) == 1 else a for a in placed]
  while entries and entries[-1] is None:  # Canonical form: P(None, None) is written P(), as jit reports it.
    entries.pop()
  return P(*entries)


def _path_str(path: Sequence[Any]) -> str:
  parts = []
  for k in path:
    parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
  return "/".join(parts)


def _is_box(x: Any) -> bool:
  return isinstance(x, nn.Partitioned)


def logical_to_shardings(boxed_abstract_tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES,
                         fallback_to_largest: bool = False) -> Any:
  """NamedShardings for a tree from ``jax.eval_shape`` of a Flax init (or of ``tx.init`` on boxed params).

  Leaves boxed in ``nn.LogicallyPartitioned`` are placed by their logical names and ``rules``; leaves boxed in a
  plain ``nn.Partitioned`` name mesh axes directly; unboxed leaves (an optimizer's step count) are replicated.

  Args:
    boxed_abstract_tree: pytree whose leaves are ShapeDtypeStructs / arrays, possibly inside Partitioned boxes.
    mesh: the ('data', 'fsdp') mesh.
    rules: (logical name, mesh axes) pairs; see ``DEFAULT_RULES``.
    fallback_to_largest: see the module docstring.

  Returns:
    The same tree with the boxes removed and every leaf replaced by a ``NamedSharding``.
  """
  rules = normalize_rules(rules)
  _check_axes(rules, mesh)

  def one(path, leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      spec = spec_for(leaf.value.shape, leaf.names, mesh, rules, fallback_to_largest, _path_str(path))
    elif isinstance(leaf, nn.Partitioned):
      # Names are mesh axes already (an axis, a tuple of axes, or None): each maps to itself.
      names = [None if n is None else n if isinstance(n, str) else "+".join(n) for n in leaf.names]
      identity = tuple({name: tuple(n) if isinstance(n, tuple) else (n,)
                        for name, n in zip(names, leaf.names) if name is not None}.items())
      _check_axes(identity, mesh)
      spec = spec_for(leaf.value.shape, names, mesh, identity, fallback_to_largest, _path_str(path))
    else:
      spec = P()
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(one, boxed_abstract_tree, is_leaf=_is_box)


def unbox(tree: Any) -> Any:
  """Removes Partitioned boxes: the plain param tree used as ``module.apply({'params': p}, ...)``."""
  return nn.meta.unbox(tree)


def with_shardings(abstract_tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying ``shardings``: targets for a sharded checkpoint restore or the sharding checks."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), unbox(abstract_tree),
                      shardings)


def batch_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
  """Sharding of a global batch: leading dimension over the 'batch' rule's axes (default ('data', 'fsdp'))."""
  table = dict(normalize_rules(rules))
  if "batch" not in table:
    raise ValueError("config.sharding.rules has no 'batch' rule; add ('batch', ('data', 'fsdp')).")
  axes = table["batch"]
  _check_axes((("batch", axes),), mesh)
  return NamedSharding(mesh, P(axes if len(axes) != 1 else axes[0]) if axes else P())


def replicated(mesh: Mesh) -> NamedSharding:
  """A fully replicated sharding on ``mesh`` (scalars, RNG keys)."""
  return NamedSharding(mesh, P())


def teacher_placement(mode: str, param_shardings: Any, mesh: Mesh) -> tuple[Any, NamedSharding | None]:
  """config.sharding.teacher -> (the teacher's stored shardings, the sharding the step constrains it to or None).

  'fsdp': stored and used like the student's parameters; the partitioner gathers what each UNet call needs, which
    may land inside the teacher solve's loop (S times per step). 'gather_once': stored like the student, replicated
    by one all-gather at the start of the step. 'replicated': stored whole on every device.
  """
  if mode == "fsdp":
    return param_shardings, None
  if mode == "gather_once":
    return param_shardings, replicated(mesh)
  if mode == "replicated":
    return jax.tree.map(lambda _: replicated(mesh), param_shardings), None
  raise ValueError(f"config.sharding.teacher={mode!r} is not one of {TEACHER_SHARDINGS}.")


def init_sharded(init_fn: Callable[..., Any], shardings: Any, *args: Any, **kwargs: Any) -> Any:
  """Runs ``init_fn(*args, **kwargs)`` under jit with ``out_shardings``, so no device or host holds it whole.

  Boxes in ``init_fn``'s output are removed first (``unbox``), so it may return a Flax init's params directly.

  Args:
    init_fn: pure function returning the tree to create (e.g. ``lambda k: model.init(k, x)['params']``).
    shardings: the unboxed output structure's NamedShardings (``logical_to_shardings``).
    *args: positional arguments of ``init_fn`` (keys, example inputs), traced.
    **kwargs: keyword arguments of ``init_fn``, traced.

  Returns:
    The initialized tree, each leaf a ``jax.Array`` with its sharding.
  """
  return jax.jit(lambda *a, **k: unbox(init_fn(*a, **k)), out_shardings=shardings)(*args, **kwargs)


def _leaf_bytes(leaf: Any) -> tuple[int, int, bool, str]:
  """(global bytes, bytes per device, whether sharded over any axis, spec string) for an array-like leaf."""
  itemsize = np.dtype(leaf.dtype).itemsize
  total = math.prod(leaf.shape) * itemsize
  sharding = getattr(leaf, "sharding", None)
  if sharding is None:
    return total, total, False, "unsharded"
  per_device = math.prod(sharding.shard_shape(leaf.shape)) * itemsize
  spec = getattr(sharding, "spec", None)
  return total, per_device, per_device < total, str(spec)


def _uses_axis(leaf: Any, axis: str) -> bool:
  spec = getattr(getattr(leaf, "sharding", None), "spec", None)
  if spec is None:
    return False
  for entry in spec:
    if entry == axis or (isinstance(entry, tuple) and axis in entry):
      return True
  return False


def per_device_bytes(tree: Any) -> int:
  """Bytes of ``tree`` held by one device (leaves: jax.Arrays or ShapeDtypeStructs with a sharding)."""
  return sum(_leaf_bytes(leaf)[1] for leaf in jax.tree.leaves(unbox(tree)))


def sharding_summary(tree: Any) -> dict[str, int]:
  """Global bytes, bytes per device and parameter count of ``tree``, for the start-up log."""
  leaves = jax.tree.leaves(unbox(tree))
  return {
      "num_params": sum(math.prod(leaf.shape) for leaf in leaves),
      "total_bytes": sum(_leaf_bytes(leaf)[0] for leaf in leaves),
      "per_device_bytes": sum(_leaf_bytes(leaf)[1] for leaf in leaves),
  }


def replicated_fraction(tree: Any, axis: str = "fsdp") -> float:
  """Fraction of the bytes of ``tree`` in leaves that are not sharded over mesh ``axis``."""
  leaves = jax.tree.leaves(unbox(tree))
  total = sum(_leaf_bytes(leaf)[0] for leaf in leaves)
  if total == 0:
    return 0.0
  replicated_bytes = sum(_leaf_bytes(leaf)[0] for leaf in leaves if not _uses_axis(leaf, axis))
  return replicated_bytes / total


def assert_sufficiently_sharded(params: Any, mesh: Mesh, max_replicated_fraction: float,
                                axis: str = "fsdp") -> float:
  """Fails when more than ``max_replicated_fraction`` of the parameter bytes are not sharded over ``axis``.

  A parameter that lost its logical axis names (or a rule that maps nothing to 'fsdp') then becomes an error at
  start-up, not an out-of-memory on a large slice. No-op when the mesh's ``axis`` has size 1.

  Args:
    params: tree of jax.Arrays or ShapeDtypeStructs with shardings (``with_shardings``).
    mesh: the mesh.
    max_replicated_fraction: tolerance in [0, 1].
    axis: the mesh axis parameters should be sharded over.

  Returns:
    The measured replicated fraction.
  """
  if not 0.0 <= max_replicated_fraction <= 1.0:
    raise ValueError(f"max_replicated_fraction={max_replicated_fraction} must be in [0, 1].")
  fraction = replicated_fraction(params, axis)
  if mesh.shape.get(axis, 1) <= 1 or fraction <= max_replicated_fraction:
    return fraction
  flat = jax.tree_util.tree_flatten_with_path(unbox(params))[0]
  worst = sorted(((_leaf_bytes(leaf)[0], _path_str(path), leaf) for path, leaf in flat
                  if not _uses_axis(leaf, axis)), key=lambda t: -t[0])[:5]
  listing = "; ".join(f"{p} {tuple(leaf.shape)} {_leaf_bytes(leaf)[3]} ({b / 2**20:.2f} MiB)"
                      for b, p, leaf in worst)
  raise ValueError(
      f"{fraction:.1%} of the parameter bytes are replicated across mesh axis {axis!r} (size "
      f"{mesh.shape[axis]}), above config.sharding.max_replicated_fraction={max_replicated_fraction}. Largest "
      f"replicated: {listing}. Give these parameters logical axis names, map a name to {axis!r} in "
      "config.sharding.rules, set config.sharding.fallback_to_largest=True, or raise the tolerance.")


def shardings_like(tree: Any) -> Any:
  """The shardings of an existing tree of jax.Arrays (e.g. to restore a checkpoint into the same layout)."""
  return jax.tree.map(lambda x: x.sharding, tree)


def leaf_specs(shardings: Any) -> Mapping[str, P]:
  """{'a/b/kernel': PartitionSpec} for a NamedSharding tree: readable in logs and in tests by parameter path."""
  flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
  return {_path_str(path): s.spec for path, s in flat}


def compiled_memory(compiled: Any) -> dict[str, float]:
  """Per-device bytes of a compiled step (memory_analysis); `total_bytes` = arguments + outputs + temporaries
  - aliased (donated state is updated in place) + generated code. {} where the backend reports nothing."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  (not every backend implements it)
    return {}
  if m is None:
    return {}
  fields = ("argument", "output", "temp", "alias", "generated_code")
  out = {f"{f}_bytes": int(getattr(m, f"{f}_size_in_bytes", 0)) for f in fields}
  out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
                        + out["generated_code_bytes"])
  out["total_gib"] = out["total_bytes"] / 2**30
  return out
