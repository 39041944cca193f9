"""Flax parameter trees -> PyTorch-world state dicts (diffusers/transformers names, OIHW / (out, in) layouts).

The inverse of loading: `export_*_state_dict(params)` gives a dict that `load_state_dict(strict=True)` accepts on
the matching diffusers/transformers model, and `params_from_state_dict` turns it back into the identical tree.
`write_single_file` writes an original-LDM-named single .safetensors file (the layout other tools load).
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np

from perflow_jax.weights import io, names, pretrained, single_file


def _host(params: Mapping[str, Any], dtype: Any | None) -> dict[str, Any]:
  """Device tree -> numpy tree (gathering sharded leaves), optionally cast."""
  tree = jax.device_get(nn.meta.unbox(dict(params)))
  cast = (lambda a: np.asarray(a, dtype)) if dtype is not None else np.asarray
  return jax.tree_util.tree_map(cast, tree)


def export_state_dict(component: str, params: Mapping[str, Any], dtype: Any | None = None) -> dict[str, np.ndarray]:
  """Flax params of one component -> the state dict of its PyTorch model.

  Args:
    component: 'unet' | 'vae' | 'text_encoder' | 'text_encoder_2'.
    params: the component's (possibly sharded) params tree.
    dtype: cast every tensor to this dtype (e.g. np.float16); None keeps the params' dtype.

  Returns:
    {name: numpy array}: UNet2DConditionModel / AutoencoderKL names, or for a text encoder the names of
    transformers' CLIPTextModel (no prefix) or, when the tree has a `text_projection`,
    CLIPTextModelWithProjection (`text_model.` prefix on the tower, `text_projection.weight` at the root).
  """
  state_dict = names.flax_to_torch(_host(params, dtype))
  if component in pretrained.TEXT_COMPONENTS and "text_projection.weight" in state_dict:
    state_dict = {(k if k == "text_projection.weight" else "text_model." + k): v for k, v in state_dict.items()}
  return state_dict


def export_unet_state_dict(params: Mapping[str, Any], dtype: Any | None = None) -> dict[str, np.ndarray]:
  """UNet params -> diffusers UNet2DConditionModel state dict (numpy, conv weights OIHW)."""
  return export_state_dict("unet", params, dtype)


def export_vae_state_dict(params: Mapping[str, Any], dtype: Any | None = None) -> dict[str, np.ndarray]:
  """VAE params -> diffusers AutoencoderKL state dict (current to_q/to_k/to_v/to_out.0 attention names)."""
  return export_state_dict("vae", params, dtype)


def export_text_state_dict(params: Mapping[str, Any], dtype: Any | None = None) -> dict[str, np.ndarray]:
  """Text-encoder params -> transformers CLIPTextModel(WithProjection) state dict."""
  return export_state_dict("text_encoder", params, dtype)


def params_from_state_dict(component: str, module: nn.Module, state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """The inverse of `export_state_dict`: a diffusers/transformers state dict -> numpy Flax tree for `module`.

  Raises:
    names.ConversionError: listing every missing, unexpected and mis-shaped key.
  """
  tree, _ = pretrained.state_dict_to_params(component, module, state_dict)
  return tree


def write_single_file(path: str, params: Mapping[str, Mapping[str, Any]], family: str,
                      dtype: Any | None = None) -> None:
  """Writes components' Flax params as one LDM-named .safetensors single file.

  Args:
    path: output .safetensors file.
    params: {'unet'[, 'vae', 'text_encoder', 'text_encoder_2']: params tree}; any subset (a UNet-only file is
      what fine-tuning tools exchange).
    family: 'sd1' | 'sd2' | 'sdxl' (decides the text-encoder prefixes and OpenCLIP naming).
    dtype: cast every tensor (e.g. np.float16); None keeps the params' dtype.
  """
  if not path.endswith(io.SAFETENSORS_SUFFIX):
    raise ValueError(f"single-file export writes safetensors; give a path ending in .safetensors, not {path}.")
  comps = {c: export_state_dict(c, p, dtype) for c, p in params.items()}
  io.write_safetensors(path, single_file.diffusers_to_ldm(comps, family), metadata={"format": "pt"})
