"""PyTorch state-dict names and layouts <-> Flax parameter paths, one rule set for every model.

The Flax path of a tensor is its PyTorch dotted name with "." -> "/", except that a numeric list index is fused
onto its parent with "_" (Linen's naming of submodules held in lists): ``down_blocks.0.resnets.1.conv1.weight``
becomes ``down_blocks_0/resnets_1/conv1/kernel``. Which leaf name a ``weight`` becomes (``kernel``, ``scale`` or
``embedding``) is read from the target Flax tree, never guessed from the tensor's rank: embeddings and linear
weights are both 2-D.

Layouts: conv weight (O, I, kh, kw) -> kernel (kh, kw, I, O); linear weight (out, in) -> kernel (in, out);
norm weight -> scale; embedding weight -> embedding, untouched.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

# Flax module names that end in "_<digit>" natively (not a fused list index), so the inverse rule keeps them.
NATIVE_UNDERSCORE_DIGIT = frozenset({"linear_1", "linear_2"})

_INDEX = re.compile(r"^\d+$")
_FUSED = re.compile(r"^(.*)_(\d+)$")


def torch_name_to_flax_path(name: str) -> tuple[str, ...]:
  """'a.0.b.weight' -> ('a_0', 'b', 'weight'): the module path, with the torch leaf name kept for later."""
  out: list[str] = []
  for part in name.split("."):
    if _INDEX.match(part) and out:
      out[-1] = f"{out[-1]}_{part}"
    else:
      out.append(part)
  return tuple(out)


def flax_path_to_torch_module(path: tuple[str, ...]) -> str:
  """('down_blocks_0', 'resnets_1', 'conv1') -> 'down_blocks.0.resnets.1.conv1' (module part only)."""
  parts = []
  for p in path:
    m = _FUSED.match(p)
    if m and p not in NATIVE_UNDERSCORE_DIGIT:
      parts.extend([m.group(1), m.group(2)])
    else:
      parts.append(p)
  return ".".join(parts)


def flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  """Nested dict -> {path tuple: leaf}."""
  flat = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      flat.update(flatten(v, prefix + (k,)))
    else:
      flat[prefix + (k,)] = v
  return flat


def unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
  """{path tuple: leaf} -> nested dict."""
  tree: dict[str, Any] = {}
  for path, v in flat.items():
    node = tree
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = v
  return tree


class ConversionError(ValueError):
  """A checkpoint does not fit the model: the message lists every offending key."""


def _describe(keys, limit=20) -> str:
  keys = sorted(keys)
  head = ", ".join(keys[:limit])
  return head + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _to_flax_layout(leaf: str, tensor: np.ndarray, target_ndim: int) -> np.ndarray:
  if leaf == "kernel":
    if tensor.ndim == 4:
      return np.transpose(tensor, (2, 3, 1, 0))
    if tensor.ndim == 2:
      return tensor.T
  return tensor


def _to_torch_layout(leaf: str, array: np.ndarray) -> np.ndarray:
  if leaf == "kernel":
    if array.ndim == 4:
      return np.transpose(array, (3, 2, 0, 1))
    if array.ndim == 2:
      return array.T
  return array


def torch_to_flax(state_dict: Mapping[str, np.ndarray], target: Mapping[str, Any],
                  what: str = "model") -> dict[str, Any]:
  """Converts a diffusers/transformers-named state dict into the Flax tree described by `target`.

  Args:
    state_dict: torch-style names -> numpy arrays (any float dtype; kept as given).
    target: the Flax param tree (arrays or jax.ShapeDtypeStruct, e.g. from jax.eval_shape), whose paths and shapes
      the result must match exactly.
    what: a name for messages ("UNet", "VAE", ...).

  Returns:
    A nested dict with the same paths as `target`.

  Raises:
    ConversionError: naming every missing, unexpected and mis-shaped key.
  """
  flat_target = flatten(target)
  # For each module path, which leaf names does the Flax tree have there?
  leaves_at: dict[tuple[str, ...], set[str]] = {}
  for path in flat_target:
    leaves_at.setdefault(path[:-1], set()).add(path[-1])

  out: dict[tuple[str, ...], np.ndarray] = {}
  unexpected, mis_shaped = [], []
  for name, tensor in state_dict.items():
    *module, torch_leaf = torch_name_to_flax_path(name)
    module = tuple(module)
    have = leaves_at.get(module, set())
    if torch_leaf == "bias":
      leaf = "bias"
    elif torch_leaf == "weight":
      found = have & {"kernel", "scale", "embedding"}
      leaf = found.pop() if len(found) == 1 else None
    else:
      leaf = torch_leaf if torch_leaf in have else None
    if leaf is None or module + (leaf,) not in flat_target:
      unexpected.append(name)
      continue
    want = tuple(flat_target[module + (leaf,)].shape)
    array = _to_flax_layout(leaf, np.asarray(tensor), len(want))
    if tuple(array.shape) != want:
      mis_shaped.append(f"{name} {tuple(np.shape(tensor))} -> {'/'.join(module + (leaf,))} expects {want}")
      continue
    out[module + (leaf,)] = array
  missing = ["/".join(p) for p in flat_target if p not in out]
  if unexpected or missing or mis_shaped:
    lines = [f"{what} checkpoint does not match the {what} config:"]
    if missing:
      lines.append(f"  missing ({len(missing)}): {_describe(missing)}")
    if unexpected:
      lines.append(f"  unexpected ({len(unexpected)}): {_describe(unexpected)}")
    if mis_shaped:
      lines.append(f"  shape mismatch ({len(mis_shaped)}): {_describe(mis_shaped, 10)}")
    lines.append("  Check that the config matches the checkpoint (model family SD1/SD2/SDXL, channel widths, "
                 "cross-attention width, linear vs conv projections).")
    raise ConversionError("\n".join(lines))
  return unflatten(out)


def flax_to_torch(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The inverse of `torch_to_flax`: Flax tree -> diffusers/transformers names and PyTorch layouts (numpy)."""
  out = {}
  for path, array in flatten(params).items():
    leaf = path[-1]
    torch_leaf = "bias" if leaf == "bias" else "weight"
    name = f"{flax_path_to_torch_module(path[:-1])}.{torch_leaf}"
    out[name] = _to_torch_layout(leaf, np.asarray(array))
  return out
