"""Shared helpers for the model parity tests: perturbed torch references and conversion to our Flax trees."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import numpy as np
import torch

from perflow_jax.models import abstract_params
from perflow_jax.weights import names

torch.set_grad_enabled(False)


def perturb_(model: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
  """Adds N(0, scale^2) noise to EVERY parameter, so zero biases / unit norm scales cannot hide a mapping bug."""
  gen = torch.Generator().manual_seed(seed)
  for p in model.parameters():
    p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
  return model.eval()


def state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def convert(model: torch.nn.Module, flax_module: nn.Module, what: str = "model") -> dict[str, Any]:
  """torch model -> params for `flax_module` via the project's naming rule (raises on any mismatch)."""
  target = nn.meta.unbox(abstract_params(flax_module))
  return names.torch_to_flax(state_dict_numpy(model), target, what=what)


def nchw_to_nhwc(x: torch.Tensor) -> np.ndarray:
  return x.detach().numpy().transpose(0, 2, 3, 1)


def nhwc_to_nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def rel_err(ours: Any, ref: Any) -> tuple[float, float]:
  """(max abs error, max abs error / max abs reference)."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  err = float(np.max(np.abs(ours - ref)))
  return err, err / max(float(np.max(np.abs(ref))), 1e-12)
