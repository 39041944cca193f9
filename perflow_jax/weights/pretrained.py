"""`load_pretrained`: a Stable Diffusion model from a diffusers folder, a single-file checkpoint or a converted dir.

Every source ends in the same place: per-component diffusers-named numpy state dicts plus diffusers/transformers
config dicts, turned into Flax trees by `names.torch_to_flax` against the abstract parameter tree of our module
(so every missing, unexpected or mis-shaped key is reported at once) and placed leaf by leaf straight into the
requested shardings. A converted directory (`python -m perflow_jax.convert`) skips the renaming and is restored by
orbax directly into the shardings.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from perflow_jax import models
from perflow_jax import storage
from perflow_jax.weights import defaults, io, names, single_file

PREDICTION_TYPES = ("epsilon", "v_prediction")
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")
CONVERTED_MARKER = "perflow_pretrained.json"

# What a sharding argument may be: None (default device), or per component a pytree of shardings matching the
# params tree, or a callable from the boxed abstract params tree (models.abstract_params) to such a pytree.
ShardingSpec = Union[None, Callable[[Any], Any], Mapping[str, Any]]


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """A loaded Stable Diffusion model: modules, their parameter trees, tokenizers and the configs.

  `config` holds 'family' ('sd1'|'sd2'|'sdxl'), 'prediction_type' ('epsilon'|'v_prediction'), 'source', 'format'
  ('diffusers'|'single_file'|'converted') and each component's diffusers/transformers config dict under its
  component name ('unet', 'vae', 'text_encoder'[, 'text_encoder_2'], 'scheduler').
  """
  unet: nn.Module
  unet_params: dict[str, Any]
  vae: nn.Module
  vae_params: dict[str, Any]
  text_encoder: nn.Module
  text_params: dict[str, Any]
  tokenizer: Any
  config: dict[str, Any]
  text_encoder_2: Optional[nn.Module] = None
  text_params_2: Optional[dict[str, Any]] = None
  tokenizer_2: Any = None

  def params(self) -> dict[str, Any]:
    """{component name: params tree} for every component present."""
    out = {"unet": self.unet_params, "vae": self.vae_params, "text_encoder": self.text_params}
    if self.text_params_2 is not None:
      out["text_encoder_2"] = self.text_params_2
    return out

  def modules(self) -> dict[str, nn.Module]:
    """{component name: module} for every component present."""
    out = {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}
    if self.text_encoder_2 is not None:
      out["text_encoder_2"] = self.text_encoder_2
    return out


# ----------------------------------------------------------------------------------------------- modules


def build_module(component: str, config: Mapping[str, Any], *, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, precision: Any = None) -> nn.Module:
  """The Flax module of one component ('unet' | 'vae' | 'text_encoder' | 'text_encoder_2') from its config dict."""
  kw = dict(dtype=dtype, param_dtype=param_dtype, precision=precision)
  if component == "unet":
    return models.UNet2DConditionModel(models.UNetConfig.from_diffusers_config(config), **kw)
  if component == "vae":
    return models.AutoencoderKL(models.VAEConfig.from_diffusers_config(config), **kw)
  if component in TEXT_COMPONENTS:
    with_projection = "CLIPTextModelWithProjection" in (config.get("architectures") or [])
    return models.CLIPTextEncoder(models.CLIPTextConfig.from_transformers_config(config),
                                  with_projection=with_projection, **kw)
  raise ValueError(f"unknown component {component!r}; expected unet, vae, text_encoder or text_encoder_2.")


def normalize_state_dict(component: str, state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Brings every accepted naming of a component to the one `torch_to_flax` expects.

  VAE: old mid-attention names (query/key/value/proj_attn) -> to_q/to_k/to_v/to_out.0. Text: drops an optional
  `text_model.` prefix and the `position_ids` buffer.
  """
  if component == "vae":
    return single_file.rename_old_vae_attention(state_dict)
  if component in TEXT_COMPONENTS:
    return single_file.clip_ldm_to_diffusers(state_dict)
  return dict(state_dict)


def resolve_shardings(shardings: ShardingSpec, component: str, abstract: Any) -> Any:
  """The shardings pytree of one component from a `ShardingSpec` (None: default device)."""
  spec = shardings.get(component) if isinstance(shardings, Mapping) else shardings
  if callable(spec):
    return spec(abstract)
  return spec


def place(tree: Mapping[str, Any], dtype: Any, shardings: Any = None) -> dict[str, Any]:
  """numpy tree -> jax.Array tree of `dtype`, each leaf put straight into its sharding.

  With shardings, every device receives only its own slice (make_array_from_callback), cast on the host slice by
  slice: no device, and no host beyond the numpy source, ever holds a full replicated copy. Without, each leaf
  goes to the default device.
  """
  dtype = np.dtype(dtype)

  def put(x, sharding=None):
    x = np.asarray(x)
    if sharding is None:
      return jax.device_put(np.ascontiguousarray(x, dtype=dtype))
    return jax.make_array_from_callback(x.shape, sharding,
                                        lambda idx: np.ascontiguousarray(x[idx], dtype=dtype))

  if shardings is None:
    return jax.tree_util.tree_map(put, dict(tree))
  return jax.tree_util.tree_map(put, dict(tree), shardings)


def state_dict_to_params(component: str, module: nn.Module, state_dict: Mapping[str, np.ndarray],
                         *, what: str | None = None) -> tuple[dict[str, np.ndarray], Any]:
  """Diffusers-named state dict -> (numpy Flax tree matching `module`, its boxed abstract tree).

  Raises:
    names.ConversionError: listing every missing, unexpected and mis-shaped key.
  """
  abstract = models.abstract_params(module)
  target = nn.meta.unbox(abstract)
  tree = names.torch_to_flax(normalize_state_dict(component, state_dict), target, what or component)
  return tree, abstract


# ----------------------------------------------------------------------------------------------- sources


def _read_json(path: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise ValueError(f"{path} does not exist.") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from None


def _folder_configs(folder: str, need_weights: bool) -> dict[str, dict[str, Any]]:
  """Component configs of a diffusers-layout folder; checks that each required component is there."""
  index = os.path.join(folder, "model_index.json")
  listed = _read_json(index) if os.path.isfile(index) else {}
  wanted = ["unet", "vae", "text_encoder"]
  if "text_encoder_2" in listed or os.path.isdir(os.path.join(folder, "text_encoder_2")):
    wanted.append("text_encoder_2")
  configs = {}
  for comp in wanted:
    path = os.path.join(folder, comp, "config.json")
    if not os.path.isfile(path):
      raise ValueError(f"{folder} is missing the {comp} component ({path} not found); a diffusers Stable Diffusion "
                       f"folder needs {', '.join(c + '/' for c in wanted)} (plus tokenizer/ and scheduler/).")
    configs[comp] = _read_json(path)
    if need_weights:
      io.component_weight_file(os.path.join(folder, comp))  # raises, naming the folder, if there are no weights
  sched = os.path.join(folder, "scheduler", "scheduler_config.json")
  configs["scheduler"] = _read_json(sched) if os.path.isfile(sched) else {}
  return configs


def _component_state_dict(folder: str, comp: str, allow_pickle: bool) -> dict[str, np.ndarray]:
  return io.read_state_dict(io.component_weight_file(os.path.join(folder, comp)), allow_pickle=allow_pickle)


def load_tokenizer(folder: str, max_length: int = 77) -> Any:
  """A transformers CLIPTokenizer from a folder with vocab.json + merges.txt or tokenizer.json (SD: 77 tokens).

  The padding token comes from the folder's files (SD1: EOS, SD2/SDXL tokenizer_2: "!").
  """
  from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top  (slow import, only when loading)
  if not os.path.isdir(folder):
    raise ValueError(f"tokenizer folder {folder} does not exist.")
  try:
    tok = CLIPTokenizer.from_pretrained(folder)
  except (OSError, ValueError, TypeError) as e:
    raise ValueError(f"could not load a CLIP tokenizer from {folder} (needs vocab.json + merges.txt or "
                     f"tokenizer.json): {e}") from None
  if tok.model_max_length is None or tok.model_max_length > max_length:
    tok.model_max_length = max_length
  return tok


def _tokenizer_dir(root: str, name: str) -> str | None:
  for cand in (os.path.join(root, name), root if name == "tokenizer" else None):
    if cand and os.path.isdir(cand) and any(
        os.path.isfile(os.path.join(cand, f)) for f in ("vocab.json", "tokenizer.json")):
      return cand
  return None


def _resolve_prediction_type(family: str, scheduler: Mapping[str, Any], given: str | None, from_file: bool,
                             path: str) -> str:
  if given is not None:
    if given not in PREDICTION_TYPES:
      raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {given!r}.")
    return given
  if "prediction_type" in scheduler:
    return scheduler["prediction_type"]
  if from_file and family == "sd2":
    raise ValueError(f"{path} is an SD2 single-file checkpoint, and those do not record what the UNet predicts. "
                     "Pass prediction_type='v_prediction' (SD2.x 768-v models) or 'epsilon' (SD2.x 512-base): "
                     "train takes --config.model.teacher_prediction_type; other tools read a folder converted once "
                     "with `python -m perflow_jax.convert --src=FILE --out=DIR --prediction_type=...`.")
  return "epsilon"


def _read_single_file(path: str, *, allow_pickle: bool, config_path: str | None, tokenizer_path: str | None,
                      extract_ema: bool, prediction_type: str | None) -> tuple[str, dict[str, Any], dict[str, Any], dict[str, str | None]]:
  ldm = io.read_state_dict(path, allow_pickle=allow_pickle)
  family = single_file.detect_family(ldm)
  if config_path is not None:
    configs = _folder_configs(config_path, need_weights=False)
    config_family = defaults.family_of_configs(configs)
    if config_family != family:
      raise names.ConversionError(
          f"architecture mismatch: {path} holds an {family.upper()} checkpoint but the configs in {config_path} "
          f"describe an {config_family.upper()} model. Point config_path at a folder of the same family, or leave "
          "it out to use the published configs.")
  else:
    configs = defaults.family_configs(family)
  # Cheap checks first: a missing prediction type fails before any tensor is renamed.
  _resolve_prediction_type(family, configs["scheduler"], prediction_type, True, path)
  sd2_layers = configs["text_encoder"].get("num_hidden_layers") if family == "sd2" else None
  _, comps = single_file.ldm_to_diffusers(ldm, family=family, extract_ema=extract_ema, sd2_text_layers=sd2_layers)
  missing = [c for c in configs if c != "scheduler" and c not in comps]
  if missing:
    raise ValueError(f"{path} has no weights for {', '.join(missing)} (an {family.upper()} single file holds the "
                     "UNet under model.diffusion_model., the VAE under first_stage_model. and the text encoder(s) "
                     "under cond_stage_model./conditioner.). Use a full checkpoint or a diffusers folder.")
  root = tokenizer_path or config_path
  tok_dirs = {name: (_tokenizer_dir(root, name) if root else None) for name in ("tokenizer", "tokenizer_2")}
  return family, configs, comps, tok_dirs


def _local_input(path: str | None, what: str) -> str | None:
  """A local path for an input given locally or as a URL (a bucket's folder or file is downloaded once into the
  cache of `perflow_jax.storage.local_copy`; the weights have to be read whole anyway)."""
  if path is None or not storage.is_remote(path):
    return path
  try:
    return storage.local_copy(path)
  except FileNotFoundError:
    raise ValueError(f"{what} {path} does not exist (no object at or under that URL).") from None


def load_pretrained(path: str, dtype: Any = jnp.float32, *, prediction_type: str | None = None,
                    allow_pickle: bool = False, shardings: ShardingSpec = None, tokenizer_path: str | None = None,
                    config_path: str | None = None, extract_ema: bool = False, compute_dtype: Any = None,
                    precision: Any = None) -> Pretrained:
  """Loads a Stable Diffusion 1.x / 2.x / XL model into Flax.

  Args:
    path: a diffusers-layout folder (model_index.json; unet/, vae/, text_encoder/[, text_encoder_2/], tokenizer/,
      scheduler/; .safetensors, sharded .safetensors or, with allow_pickle, .bin weights), a single-file LDM
      checkpoint (.safetensors, or .ckpt with allow_pickle), or a directory written by `python -m perflow_jax.convert`.
    dtype: dtype of the loaded parameters (float32 master weights by default); also the modules' param_dtype.
    prediction_type: 'epsilon' | 'v_prediction'. Overrides the scheduler config; required for SD2 single files.
    allow_pickle: allow pickle-based weight files (safetensors is preferred).
    shardings: None (default device), a callable from a component's boxed abstract params tree
      (`models.abstract_params`) to a pytree of jax.sharding.Sharding, or {component: such a tree or callable}.
    tokenizer_path: single files only: a folder with the tokenizer (vocab.json + merges.txt), or a diffusers folder
      holding tokenizer/ (and tokenizer_2/ for SDXL). A single file cannot carry one.
    config_path: single files only: a diffusers folder whose component configs describe the model (default: the
      published SD1.5 / SD2.1 / SDXL configs of the detected family). Its tokenizer is used if tokenizer_path is unset.
    extract_ema: single files only: load the UNet from the EMA copy (`model_ema.`).
    compute_dtype: the modules' compute dtype (default: dtype).
    precision: matmul precision of the modules (jax.lax.Precision.HIGHEST for float32 parity).

  Returns:
    A `Pretrained` bundle.
  """
  from perflow_jax.weights import converted  # pylint: disable=g-import-not-at-top  (it imports this module)
  compute_dtype = dtype if compute_dtype is None else compute_dtype
  source = storage.absolute(path)
  path, tokenizer_path, config_path = (_local_input(p, what) for p, what in (
      (path, "pretrained model"), (tokenizer_path, "tokenizer_path"), (config_path, "config_path")))
  if os.path.isdir(path) and os.path.isfile(os.path.join(path, CONVERTED_MARKER)):
    bundle = converted.load_converted(path, dtype, prediction_type=prediction_type, shardings=shardings,
                                      compute_dtype=compute_dtype, precision=precision)
    bundle.config["source"] = source
    return bundle
  if os.path.isdir(path):
    if not (os.path.isfile(os.path.join(path, "model_index.json")) or os.path.isdir(os.path.join(path, "unet"))):
      raise ValueError(f"{path} is neither a diffusers folder (model_index.json, unet/, ...) nor a directory "
                       f"written by `python -m perflow_jax.convert` ({CONVERTED_MARKER}).")
    configs = _folder_configs(path, need_weights=True)
    family = defaults.family_of_configs(configs)
    comps = {c: _component_state_dict(path, c, allow_pickle) for c in configs if c != "scheduler"}
    tok_dirs = {name: _tokenizer_dir(path, name) if os.path.isdir(os.path.join(path, name)) else None
                for name in ("tokenizer", "tokenizer_2")}
    fmt, from_file = "diffusers", False
  elif os.path.isfile(path):
    family, configs, comps, tok_dirs = _read_single_file(
        path, allow_pickle=allow_pickle, config_path=config_path, tokenizer_path=tokenizer_path,
        extract_ema=extract_ema, prediction_type=prediction_type)
    fmt, from_file = "single_file", True
  else:
    raise ValueError(f"pretrained model {path} does not exist (expected a diffusers folder, a single-file "
                     "checkpoint or a converted directory).")

  pred = _resolve_prediction_type(family, configs["scheduler"], prediction_type, from_file, path)
  configs["scheduler"] = dict(configs["scheduler"], prediction_type=pred)
  needed = ["tokenizer"] + (["tokenizer_2"] if family == "sdxl" else [])
  for name in needed:
    if tok_dirs.get(name) is not None:
      continue
    if from_file:
      raise ValueError(f"no {name} for {path}: a single-file checkpoint holds no tokenizer. Pass tokenizer_path= "
                       f"naming a folder with vocab.json + merges.txt, or a diffusers folder with {name}/ (sample, "
                       "evaluate and convert: --tokenizer; train: --config.model.tokenizer; prepare_data: convert "
                       "the file first).")
    raise ValueError(f"{path} has no {name}/ folder; add {name}/ (vocab.json + merges.txt) to it.")

  fields: dict[str, Any] = {}
  for comp in [c for c in configs if c != "scheduler"]:
    module = build_module(comp, configs[comp], dtype=compute_dtype, param_dtype=dtype, precision=precision)
    tree, abstract = state_dict_to_params(comp, module, comps[comp], what=f"{family.upper()} {comp}")
    params = place(tree, dtype, resolve_shardings(shardings, comp, abstract))
    suffix = "_2" if comp == "text_encoder_2" else ""
    prefix = {"unet": "unet", "vae": "vae"}.get(comp, "text")
    fields[comp] = module
    fields[f"{prefix}_params{suffix}"] = params
  for name in needed:
    max_len = configs["text_encoder"].get("max_position_embeddings", 77)
    fields[name] = load_tokenizer(tok_dirs[name], max_len)
  config = {"family": family, "prediction_type": pred, "source": source, "format": fmt,
            "tokenizer_dirs": {k: v for k, v in tok_dirs.items() if k in needed}, **configs}
  return Pretrained(config=config, **fields)
