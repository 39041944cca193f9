"""Flax parameter trees -> PyTorch-world state dicts (diffusers/transformers names, OIHW / (out, in) layouts).

The inverse of loading: `export_*_state_dict(params)` gives a dict that `load_state_dict(strict=True)` accepts on
the matching diffusers/transformers model, and `params_from_state_dict` turns it back into the identical tree.
`write_single_file` writes an original-LDM-named single .safetensors file (the layout other tools load).
PeRFlow delta weights: `delta_state_dict` (student - base), `merge_delta` (the reference's merge) and
`write_unet_folder` (a merged UNet that diffusers' `from_pretrained` loads).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np

from perflow_jax import storage
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


# ------------------------------------------------------------------------------------ PeRFlow delta weights


class DeltaMismatchError(names.ConversionError):
  """A delta's keys or shapes do not match the base UNet's: the message lists them."""


def _key_report(base: Mapping[str, np.ndarray], other: Mapping[str, np.ndarray], what: str) -> dict[str, list[str]]:
  """{'missing': keys of base absent from other, 'unexpected': the reverse, 'shape': keys whose shapes differ}."""
  shape = [f"{k} (base {tuple(base[k].shape)} vs {what} {tuple(other[k].shape)})"
           for k in sorted(set(base) & set(other)) if tuple(base[k].shape) != tuple(other[k].shape)]
  return {"missing": sorted(set(base) - set(other)), "unexpected": sorted(set(other) - set(base)), "shape": shape}


def _format_report(report: Mapping[str, list[str]], what: str, limit: int = 40) -> str:
  parts = []
  for kind, label in (("missing", f"in the base but not in the {what}"),
                      ("unexpected", f"in the {what} but not in the base"), ("shape", "with different shapes")):
    keys = report[kind]
    if keys:
      shown = ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
      parts.append(f"{len(keys)} key(s) {label}: {shown}")
  return "; ".join(parts)


def delta_state_dict(student: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray],
                     dtype: Any = np.float16) -> dict[str, np.ndarray]:
  """PeRFlow delta weights dW = student - base for every UNet tensor (diffusers names), computed in float32.

  Args:
    student, base: diffusers UNet2DConditionModel state dicts with the same keys and shapes.
    dtype: stored dtype of dW (float16 as the released delta weights; float32 on request).

  Raises:
    DeltaMismatchError: listing every key that is missing, unexpected or mis-shaped.
  """
  report = _key_report(base, student, "student")
  if any(report.values()):
    raise DeltaMismatchError(f"the student and base UNets differ: {_format_report(report, 'student')}.")
  return {k: (np.asarray(student[k], np.float32) - np.asarray(base[k], np.float32)).astype(dtype) for k in base}


def merge_delta(base: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray],
                keep_mismatched: bool = False, *, delta_name: str = "the delta",
                base_name: str = "the base UNet") -> tuple[dict[str, np.ndarray], list[str]]:
  """Merges delta weights into a base UNet state dict as the reference does: (W_base as dW's dtype + dW) cast back.

  Args:
    base: diffusers-named UNet state dict of any SD1.5-family model.
    delta: dW in the same naming (e.g. from `delta_state_dict` or a released delta_weights.safetensors).
    keep_mismatched: keep the base weight for every key the delta lacks or gives another shape (multiview UNets);
      delta keys the base lacks are then ignored. Otherwise any mismatch is an error. A delta that fits no base
      tensor at all is an error either way (nothing would be applied).
    delta_name, base_name: how the error messages name the two (e.g. their paths).

  Returns:
    (merged state dict with the base's dtypes, the sorted list of base keys kept unmerged).

  Raises:
    DeltaMismatchError: a mismatch without keep_mismatched, or no tensor of the delta fitting the base, listing the
      keys.
  """
  report = _key_report(base, delta, "delta")
  if any(report.values()) and not keep_mismatched:
    raise DeltaMismatchError(f"{delta_name} does not fit {base_name}: {_format_report(report, 'delta')}. Use a "
                             "base of the delta's architecture, or pass keep_mismatched (sample and evaluate: "
                             "--keep_mismatched) to keep the base weight for these keys.")
  fitting = [k for k in base if k in delta and tuple(delta[k].shape) == tuple(np.shape(base[k]))]
  if base and not fitting:
    raise DeltaMismatchError(f"{delta_name} fits none of the {len(base)} tensors of {base_name} "
                             f"({_format_report(report, 'delta', limit=5)}), so nothing would be applied, even with "
                             "keep_mismatched. Use a delta trained for this base's architecture (the same UNet key "
                             "names and shapes, diffusers naming).")
  merged, kept = {}, []
  for k, w in base.items():
    w = np.asarray(w)
    d = delta.get(k)
    if d is None or tuple(d.shape) != tuple(w.shape):
      merged[k] = w
      kept.append(k)
      continue
    d = np.asarray(d)
    merged[k] = (w.astype(d.dtype) + d).astype(w.dtype)
  return merged, sorted(kept)


def unet_diffusers_config(unet: nn.Module) -> dict[str, Any]:
  """The diffusers UNet2DConditionModel config.json dict of our UNet module (its UNetConfig fields + class)."""
  fields = dataclasses.asdict(unet.config)
  fields = {k: (list(v) if isinstance(v, tuple) else v) for k, v in fields.items()}
  return {"_class_name": "UNet2DConditionModel", **fields}


UNET_WEIGHTS_NAME = "diffusion_pytorch_model"
_VARIANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_UNET_WEIGHTS_FILE = re.compile(r"diffusion_pytorch_model(?:\.([A-Za-z0-9][A-Za-z0-9_-]*))?\.safetensors")


def unet_weights_filename(variant: str | None = None) -> str:
  """diffusers' weights file name in a UNet folder: diffusion_pytorch_model[.VARIANT].safetensors."""
  if variant is None or variant == "":
    return UNET_WEIGHTS_NAME + io.SAFETENSORS_SUFFIX
  if not _VARIANT.fullmatch(variant):
    raise ValueError(f"variant {variant!r}: use letters, digits, '-' and '_' (e.g. 'v0-1', 'fp16'); it becomes "
                     f"part of the file name {UNET_WEIGHTS_NAME}.<variant>{io.SAFETENSORS_SUFFIX}.")
  return f"{UNET_WEIGHTS_NAME}.{variant}{io.SAFETENSORS_SUFFIX}"


def write_unet_layout(out_dir: str, config: Mapping[str, Any], state_dict: Mapping[str, np.ndarray],
                      variant: str | None = None, metadata: Mapping[str, str] | None = None) -> str:
  """Writes a diffusers UNet folder: config.json + diffusion_pytorch_model[.variant].safetensors.

  `diffusers.UNet2DConditionModel.from_pretrained(out_dir, variant=variant)` loads it. The weights are written first
  and config.json last, so a folder with config.json is complete. `out_dir` may be a URL (gs://). Returns out_dir.
  """
  filename = unet_weights_filename(variant)
  with storage.staged_folder(out_dir, last=("config.json",)) as local:
    io.write_safetensors(os.path.join(local, filename), state_dict, metadata=dict(metadata or {"format": "pt"}))
    storage.write_json(os.path.join(local, "config.json"), dict(config))
  return out_dir


def write_unet_folder(out_dir: str, unet: nn.Module, params: Mapping[str, Any], dtype: Any = np.float32,
                      variant: str | None = None) -> str:
  """Writes our UNet's weights as a diffusers UNet folder (see write_unet_layout). Returns out_dir."""
  return write_unet_layout(out_dir, unet_diffusers_config(unet), export_unet_state_dict(params, dtype), variant)


def delta_weights_file(path: str, variant: str | None = None) -> str:
  """The file holding PeRFlow delta weights given as a .safetensors file or a UNet folder in the released layout.

  The released deltas are UNet folders (`from_pretrained(DIR, variant="v0-1")`): config.json and
  diffusion_pytorch_model.<variant>.safetensors holding dW. Without `variant`, a folder's plain
  diffusion_pytorch_model.safetensors is chosen, or its only variant file.

  Args:
    path: a .safetensors file or a folder (local or gs://).
    variant: the folder's weights variant (e.g. 'v0-1'); not for a file.

  Raises:
    ValueError: no such file or folder, no weights (of that variant) in the folder, several variants and none
      chosen, or a variant given for a single file.
  """
  if storage.isdir(path):
    files = sorted(f for f in storage.listdir(path) if _UNET_WEIGHTS_FILE.fullmatch(f))
    variants = [_UNET_WEIGHTS_FILE.fullmatch(f).group(1) for f in files]
    listing = ", ".join(files) or "none"
    if variant:
      name = unet_weights_filename(variant)
      if name not in files:
        raise ValueError(f"the delta folder {path} has no {name} (its weights files: {listing}); pass one of its "
                         f"variants {[v for v in variants if v]} or none for the plain file.")
    elif None in variants:
      name = unet_weights_filename(None)
    elif len(files) == 1:
      name = files[0]
    else:
      raise ValueError(f"the delta folder {path} holds {len(files)} weights files ({listing}): choose one with "
                       f"its variant (sample/evaluate --delta_variant={variants[0] if variants else 'NAME'}).")
    file = storage.join(path, name)
  elif storage.exists(path):
    if variant:
      raise ValueError(f"--delta_variant={variant!r} picks a file in a delta folder; {path} is a file.")
    file = path
  else:
    raise ValueError(f"the delta {path} does not exist: give delta weights as a .safetensors file or a UNet folder "
                     f"(config.json + {UNET_WEIGHTS_NAME}[.variant]{io.SAFETENSORS_SUFFIX}).")
  return file


def delta_metadata(path: str, variant: str | None = None) -> dict[str, str]:
  """The safetensors metadata of delta weights (ours record prediction_type and num_windows; released ones none)."""
  header, _ = io.read_safetensors_header(delta_weights_file(path, variant))
  return dict(header.get("__metadata__") or {})


def read_delta(path: str, variant: str | None = None) -> dict[str, np.ndarray]:
  """dW in diffusers UNet names from a .safetensors file or a released-layout folder (see delta_weights_file)."""
  return io.read_safetensors(delta_weights_file(path, variant))


def component_config(component: str, module: nn.Module) -> dict[str, Any]:
  """The diffusers/transformers config.json dict of one of our modules ('unet' | 'vae' | 'text_encoder[_2]')."""
  if component == "unet":
    return unet_diffusers_config(module)
  if component == "vae":
    return {"_class_name": "AutoencoderKL", **module.config.to_diffusers_config()}
  if component in pretrained.TEXT_COMPONENTS:
    d = module.config.to_transformers_config()
    arch = "CLIPTextModelWithProjection" if d.get("projection_dim") and module.with_projection else "CLIPTextModel"
    return {"architectures": [arch], "model_type": "clip_text_model", **d}
  raise ValueError(f"unknown component {component!r}; expected unet, vae, text_encoder or text_encoder_2.")


_PIPELINE_CLASS = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline",
                   "sdxl": "StableDiffusionXLPipeline"}


def write_pipeline_folder(out_dir: str, modules: Mapping[str, nn.Module], params: Mapping[str, Any], *,
                          tokenizer_dirs: Mapping[str, str], scheduler_config: Mapping[str, Any],
                          family: str = "sd1", dtype: Any = np.float32) -> str:
  """Writes a whole diffusers-layout Stable Diffusion folder from Flax modules and params.

  `load_pretrained(out_dir)` reads it back, and diffusers' `StableDiffusionPipeline.from_pretrained(out_dir)`
  loads it (for sd1/sd2 families).

  Args:
    out_dir: the folder (created; existing component files are overwritten).
    modules, params: {'unet', 'vae', 'text_encoder'[, 'text_encoder_2']: module / params tree}.
    tokenizer_dirs: {'tokenizer'[, 'tokenizer_2']: a folder with vocab.json + merges.txt}, copied in.
    scheduler_config: the scheduler/scheduler_config.json dict (it records the prediction type).
    family: 'sd1' | 'sd2' | 'sdxl' (the pipeline class in model_index.json).
    dtype: storage dtype of the weights (np.float16 halves the size; loading casts back to float32).
  """
  weight_names = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model"}
  index: dict[str, Any] = {"_class_name": _PIPELINE_CLASS[family], "_diffusers_version": "0.42.1"}
  # model_index.json goes last: a folder that has it is complete (also on a bucket, see storage.staged_folder).
  with storage.staged_folder(out_dir, last=("model_index.json",)) as local:
    for comp, module in modules.items():
      folder = os.path.join(local, comp)
      config = component_config(comp, module)
      storage.write_json(os.path.join(folder, "config.json"), config)
      weights = os.path.join(folder, weight_names.get(comp, "model") + io.SAFETENSORS_SUFFIX)
      io.write_safetensors(weights, export_state_dict(comp, params[comp], dtype), metadata={"format": "pt"})
      library = "diffusers" if comp in weight_names else "transformers"
      index[comp] = [library, config.get("_class_name") or config["architectures"][0]]
    for name, src in tokenizer_dirs.items():
      src = storage.local_copy(src)
      for file in os.listdir(src):
        storage.copy_file(os.path.join(src, file), os.path.join(local, name, file))
      index[name] = ["transformers", "CLIPTokenizer"]
    storage.write_json(os.path.join(local, "scheduler", "scheduler_config.json"), dict(scheduler_config))
    index["scheduler"] = ["diffusers", scheduler_config.get("_class_name", "DDIMScheduler")]
    storage.write_json(os.path.join(local, "model_index.json"), index)
  return out_dir
