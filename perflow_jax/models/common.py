"""Helpers over any model in this package: abstract parameter trees and parameter counts."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np


def abstract_params(module: nn.Module, batch_size: int = 1) -> Any:
  """The 'params' collection of `module.init` as jax.ShapeDtypeStruct leaves, without computing anything.

  The logical-partitioning boxes (nn.LogicallyPartitioned) are kept, so the result can be turned into
  shardings; `flax.linen.meta.unbox` gives the plain tree (e.g. as a `torch_to_flax` target).

  Args:
    module: any model of this package (it provides `dummy_inputs`).
    batch_size: batch of the dummy inputs (does not change parameter shapes).
  """
  inputs = module.dummy_inputs(batch_size)
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs))
  return variables["params"]


def param_count(tree: Any) -> int:
  """Total number of scalars in a (boxed or plain) parameter tree of arrays or ShapeDtypeStructs."""
  leaves = jax.tree_util.tree_leaves(nn.meta.unbox(tree))
  return int(sum(int(np.prod(leaf.shape)) for leaf in leaves))
