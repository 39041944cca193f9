"""Original CompVis / LDM / SGM single-file checkpoints <-> per-component diffusers-named state dicts.

A single file holds every component under a prefix (sd_models.md section 6): the UNet under
`model.diffusion_model.`, the VAE under `first_stage_model.`, CLIP-L under `cond_stage_model.transformer.` (SD1)
or `conditioner.embedders.0.transformer.` (SDXL), and an OpenCLIP tower under `cond_stage_model.model.` (SD2) or
`conditioner.embedders.1.model.` (SDXL). Each component is renamed one-to-one into the names diffusers and
transformers use, after which `names.torch_to_flax` applies. Text towers come out without the optional
`text_model.` prefix (transformers 5 `CLIPTextModel` state dicts have none), with `text_projection.weight` at the
root when there is one. Every rename has an inverse, used to write single files and to test the forward direction.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from perflow_jax.weights.names import ConversionError

FAMILIES = ("sd1", "sd2", "sdxl")

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIXES = ("first_stage_model.", "vae.")
EMA_PREFIX = "model_ema."
CLIP_PREFIX = {"sd1": "cond_stage_model.transformer.", "sdxl": "conditioner.embedders.0.transformer."}
OPENCLIP_PREFIX = {"sd2": "cond_stage_model.model.", "sdxl": "conditioner.embedders.1.model."}

# Diffusers' detection keys (CHECKPOINT_KEY_NAMES), with shorter fallbacks that also hold for tiny test models.
_SDXL_KEY = "conditioner.embedders.1.model.positional_embedding"
_SD2_TEXT_KEY = "cond_stage_model.model.token_embedding.weight"
_SD2_UNET_KEY = UNET_PREFIX + "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"

_RESNET = (("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
           ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut."))
_UNET_FIXED = (("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
               ("label_emb.0.0.", "add_embedding.linear_1."), ("label_emb.0.2.", "add_embedding.linear_2."),
               ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out."))
_VAE_ATTN = (("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0."))
_OPENCLIP_LAYER = (("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("attn.out_proj.", "self_attn.out_proj."),
                   ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2."))
# Old diffusers-format VAE files (before the Attention refactor) name the mid attention differently.
_OLD_VAE_ATTN = (("query.", "to_q."), ("key.", "to_k."), ("value.", "to_v."), ("proj_attn.", "to_out.0."))


def _swap(rest: str, table, forward: bool = True) -> str | None:
  for a, b in table:
    src, dst = (a, b) if forward else (b, a)
    if rest.startswith(src):
      return dst + rest[len(src):]
  return None


def _fail(what: str, keys: list[str], hint: str) -> ConversionError:
  keys = sorted(keys)
  more = f", ... ({len(keys) - 20} more)" if len(keys) > 20 else ""
  return ConversionError(f"{what}: {len(keys)} keys have no known rename: {', '.join(keys[:20])}{more}. {hint}")


# ----------------------------------------------------------------------------------------------- UNet


def _unet_block_size(ldm: Mapping[str, np.ndarray]) -> int:
  """L = layers_per_block + 1: the LDM input-block index of the first downsampler (or the block count)."""
  ops = [int(k.split(".")[1]) for k in ldm if re.match(r"input_blocks\.\d+\.0\.op\.", k)]
  if ops:
    return min(ops)
  blocks = [int(k.split(".")[1]) for k in ldm if k.startswith("input_blocks.")]
  return max(blocks) + 1 if blocks else 1


def unet_ldm_to_diffusers(ldm: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """LDM UNet names (prefix already stripped) -> diffusers UNet2DConditionModel names; tensors untouched."""
  size = _unet_block_size(ldm)
  out, unknown = {}, []
  for key, value in ldm.items():
    new = _swap(key, _UNET_FIXED)
    m = re.match(r"(input_blocks|output_blocks|middle_block)\.(\d+)\.(?:(\d+)\.)?(.*)$", key)
    if new is None and m:
      kind, n, i, rest = m.group(1), int(m.group(2)), m.group(3), m.group(4)
      if kind == "middle_block":
        # middle_block.0/1/2: resnet, attention, resnet (there is no inner index, `i` captured the first name part).
        rest = (i + "." if i is not None else "") + rest
        if n in (0, 2):
          new = _resnet_name(f"mid_block.resnets.{n // 2}.", rest)
        elif n == 1:
          new = f"mid_block.attentions.0.{rest}"
      elif i is not None and kind == "input_blocks" and n >= 1:
        block, j, i = (n - 1) // size, (n - 1) % size, int(i)
        if i == 0 and rest.startswith("op."):
          new = f"down_blocks.{block}.downsamplers.0.conv.{rest[3:]}"
        elif i == 0:
          new = _resnet_name(f"down_blocks.{block}.resnets.{j}.", rest)
        elif i == 1:
          new = f"down_blocks.{block}.attentions.{j}.{rest}"
      elif i is not None and kind == "output_blocks":
        block, j, i = n // size, n % size, int(i)
        if i in (1, 2) and rest.startswith("conv."):
          new = f"up_blocks.{block}.upsamplers.0.conv.{rest[5:]}"
        elif i == 0:
          new = _resnet_name(f"up_blocks.{block}.resnets.{j}.", rest)
        elif i == 1:
          new = f"up_blocks.{block}.attentions.{j}.{rest}"
    if new is None:
      unknown.append(key)
    else:
      out[new] = value
  if unknown:
    raise _fail("LDM UNet", unknown, "Is this an SD1/SD2/SDXL UNet (model.diffusion_model.*)?")
  return out


def _resnet_name(base: str, rest: str) -> str | None:
  inner = _swap(rest, _RESNET)
  return base + inner if inner is not None else None


def unet_diffusers_to_ldm(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The inverse of `unet_ldm_to_diffusers` (no prefix is added)."""
  size = 1 + len({k.split(".")[3] for k in sd if k.startswith("down_blocks.0.resnets.")})
  with_attention = {int(k.split(".")[1]) for k in sd if re.match(r"up_blocks\.\d+\.attentions\.", k)}
  out, unknown = {}, []
  for key, value in sd.items():
    new = _swap(key, _UNET_FIXED, forward=False)
    p = key.split(".")
    if new is None and p[0] in ("down_blocks", "up_blocks") and len(p) > 4:
      block, kind, j, rest = int(p[1]), p[2], int(p[3]), ".".join(p[4:])
      if p[0] == "down_blocks":
        n = block * size + j + 1
        if kind == "resnets":
          inner = _swap(rest, _RESNET, forward=False)
          new = f"input_blocks.{n}.0.{inner}" if inner is not None else None
        elif kind == "attentions":
          new = f"input_blocks.{n}.1.{rest}"
        elif kind == "downsamplers" and rest.startswith("conv."):
          new = f"input_blocks.{block * size + size}.0.op.{rest[5:]}"
      else:
        n = block * size + j
        if kind == "resnets":
          inner = _swap(rest, _RESNET, forward=False)
          new = f"output_blocks.{n}.0.{inner}" if inner is not None else None
        elif kind == "attentions":
          new = f"output_blocks.{n}.1.{rest}"
        elif kind == "upsamplers" and rest.startswith("conv."):
          slot = 2 if block in with_attention else 1
          new = f"output_blocks.{block * size + size - 1}.{slot}.conv.{rest[5:]}"
    elif new is None and p[0] == "mid_block" and len(p) > 3:
      rest = ".".join(p[3:])
      if p[1] == "resnets":
        inner = _swap(rest, _RESNET, forward=False)
        new = f"middle_block.{2 * int(p[2])}.{inner}" if inner is not None else None
      elif p[1] == "attentions":
        new = f"middle_block.1.{rest}"
    if new is None:
      unknown.append(key)
    else:
      out[new] = value
  if unknown:
    raise _fail("diffusers UNet", unknown, "Expected UNet2DConditionModel names.")
  return out


# ----------------------------------------------------------------------------------------------- VAE


def vae_ldm_to_diffusers(ldm: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """LDM VAE names (prefix stripped) -> diffusers AutoencoderKL names; mid-attention 1x1 convs squeezed."""
  levels = 1 + max((int(k.split(".")[2]) for k in ldm if k.startswith("decoder.up.")), default=-1)
  out, unknown = {}, []
  for key, value in ldm.items():
    new = None
    p = key.split(".")
    if key.startswith(("quant_conv.", "post_quant_conv.")) or (len(p) > 1 and p[1] in ("conv_in", "conv_out")):
      new = key
    elif len(p) > 2 and p[1] == "norm_out":
      new = f"{p[0]}.conv_norm_out.{'.'.join(p[2:])}"
    elif len(p) > 4 and p[1] in ("down", "up") and p[3] in ("block", "downsample", "upsample"):
      level = int(p[2]) if p[1] == "down" else levels - 1 - int(p[2])
      blocks = "down_blocks" if p[1] == "down" else "up_blocks"
      if p[3] == "block" and len(p) > 5:
        rest = ".".join(p[5:]).replace("nin_shortcut.", "conv_shortcut.")
        new = f"{p[0]}.{blocks}.{level}.resnets.{p[4]}.{rest}"
      elif p[3] in ("downsample", "upsample") and p[4] == "conv":
        sampler = "downsamplers" if p[3] == "downsample" else "upsamplers"
        new = f"{p[0]}.{blocks}.{level}.{sampler}.0.conv.{'.'.join(p[5:])}"
    elif len(p) > 3 and p[1] == "mid" and p[2] in ("block_1", "block_2"):
      new = f"{p[0]}.mid_block.resnets.{int(p[2][-1]) - 1}.{'.'.join(p[3:])}"
    elif len(p) > 3 and p[1] == "mid" and p[2] == "attn_1":
      inner = _swap(".".join(p[3:]), _VAE_ATTN)
      if inner is not None:
        new = f"{p[0]}.mid_block.attentions.0.{inner}"
        if value.ndim == 4 and not inner.startswith("group_norm."):
          value = value.reshape(value.shape[:2])  # LDM stores the projections as 1x1 convs (C, C, 1, 1)
    if new is None:
      unknown.append(key)
    else:
      out[new] = value
  if unknown:
    raise _fail("LDM VAE", unknown, "Is this a KL autoencoder (first_stage_model.*)?")
  return out


def vae_diffusers_to_ldm(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The inverse of `vae_ldm_to_diffusers`: attention projections back to (C, C, 1, 1) convs."""
  sd = rename_old_vae_attention(sd)
  levels = 1 + max((int(k.split(".")[2]) for k in sd if k.startswith("decoder.up_blocks.")), default=-1)
  out, unknown = {}, []
  for key, value in sd.items():
    new = None
    p = key.split(".")
    if key.startswith(("quant_conv.", "post_quant_conv.")) or (len(p) > 1 and p[1] in ("conv_in", "conv_out")):
      new = key
    elif len(p) > 2 and p[1] == "conv_norm_out":
      new = f"{p[0]}.norm_out.{'.'.join(p[2:])}"
    elif len(p) > 5 and p[1] in ("down_blocks", "up_blocks"):
      level = int(p[2]) if p[1] == "down_blocks" else levels - 1 - int(p[2])
      ldm_blocks = "down" if p[1] == "down_blocks" else "up"
      if p[3] == "resnets":
        rest = ".".join(p[5:]).replace("conv_shortcut.", "nin_shortcut.")
        new = f"{p[0]}.{ldm_blocks}.{level}.block.{p[4]}.{rest}"
      elif p[3] in ("downsamplers", "upsamplers") and p[5] == "conv":
        sampler = "downsample" if p[3] == "downsamplers" else "upsample"
        new = f"{p[0]}.{ldm_blocks}.{level}.{sampler}.conv.{'.'.join(p[6:])}"
    elif len(p) > 4 and p[1] == "mid_block" and p[2] == "resnets":
      new = f"{p[0]}.mid.block_{int(p[3]) + 1}.{'.'.join(p[4:])}"
    elif len(p) > 4 and p[1] == "mid_block" and p[2] == "attentions":
      inner = _swap(".".join(p[4:]), _VAE_ATTN, forward=False)
      if inner is not None:
        new = f"{p[0]}.mid.attn_1.{inner}"
        if value.ndim == 2:
          value = value.reshape(value.shape + (1, 1))
    if new is None:
      unknown.append(key)
    else:
      out[new] = value
  if unknown:
    raise _fail("diffusers VAE", unknown, "Expected AutoencoderKL names.")
  return out


def rename_old_vae_attention(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Old diffusers VAE files: mid attention query/key/value/proj_attn -> to_q/to_k/to_v/to_out.0.

  Those files may also store the projections as (C, C, 1, 1) convs; they are squeezed to Linear weights.
  """
  out = {}
  for key, value in sd.items():
    m = re.match(r"^(.*\.mid_block\.attentions\.0\.)(.*)$", key)
    inner = _swap(m.group(2), _OLD_VAE_ATTN) if m else None
    if inner is not None:
      key = m.group(1) + inner
    if m and value.ndim == 4 and not m.group(2).startswith("group_norm."):
      value = value.reshape(value.shape[:2])
    out[key] = value
  return out


# ----------------------------------------------------------------------------------------------- text


def clip_ldm_to_diffusers(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """HF-named CLIP keys (prefix stripped): drop an optional `text_model.` and the `position_ids` buffer."""
  return {(k[len("text_model."):] if k.startswith("text_model.") else k): v
          for k, v in sd.items() if not k.endswith("position_ids")}


def clip_diffusers_to_ldm(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The inverse of `clip_ldm_to_diffusers`: keys get the `text_model.` prefix the LDM files carry."""
  return {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()}


def openclip_to_diffusers(sd: Mapping[str, np.ndarray], *, num_layers: int | None = None,
                          keep_projection: bool = False) -> dict[str, np.ndarray]:
  """OpenCLIP text tower (prefix stripped) -> HF CLIP names.

  Args:
    sd: OpenCLIP names: token_embedding.weight, positional_embedding, ln_final.*, text_projection (D, P),
      transformer.resblocks.i.{ln_1, ln_2, attn.in_proj_weight (3D, D), attn.in_proj_bias (3D), attn.out_proj,
      mlp.c_fc, mlp.c_proj}.
    num_layers: keep resblocks 0..num_layers-1 (SD2 keeps 23 of 24); None keeps all.
    keep_projection: bigG keeps `text_projection`, as a Linear weight (P, D) = its transpose; SD2 drops it.
  """
  out, unknown = {}, []
  for key, value in sd.items():
    m = re.match(r"transformer\.resblocks\.(\d+)\.(.*)$", key)
    if m:
      i, rest = int(m.group(1)), m.group(2)
      if num_layers is not None and i >= num_layers:
        continue
      base = f"encoder.layers.{i}."
      if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
        leaf = "weight" if rest.endswith("weight") else "bias"
        # Fused rows are q; k; v in that order (torch.nn.MultiheadAttention).
        for name, part in zip(("q_proj", "k_proj", "v_proj"), np.split(value, 3, axis=0)):
          out[f"{base}self_attn.{name}.{leaf}"] = part
        continue
      inner = _swap(rest, _OPENCLIP_LAYER)
      if inner is None:
        unknown.append(key)
      else:
        out[base + inner] = value
    elif key == "token_embedding.weight":
      out["embeddings.token_embedding.weight"] = value
    elif key == "positional_embedding":
      out["embeddings.position_embedding.weight"] = value
    elif key.startswith("ln_final."):
      out["final_layer_norm." + key[len("ln_final."):]] = value
    elif key == "text_projection":
      if keep_projection:
        out["text_projection.weight"] = np.ascontiguousarray(value.T)
    elif key in ("logit_scale", "attn_mask") or key.endswith("position_ids"):
      continue  # not part of the text tower's computation
    else:
      unknown.append(key)
  if unknown:
    raise _fail("OpenCLIP text tower", unknown, "Expected open_clip text-tower names.")
  return out


def openclip_from_diffusers(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The inverse of `openclip_to_diffusers`: q/k/v fused back into in_proj, projection transposed back."""
  sd = clip_ldm_to_diffusers(sd)
  out, unknown, fused = {}, [], {}
  for key, value in sd.items():
    m = re.match(r"encoder\.layers\.(\d+)\.(.*)$", key)
    if m:
      i, rest = int(m.group(1)), m.group(2)
      q = re.match(r"self_attn\.(q|k|v)_proj\.(weight|bias)$", rest)
      if q:
        fused.setdefault((i, q.group(2)), {})[q.group(1)] = value
        continue
      inner = _swap(rest, _OPENCLIP_LAYER, forward=False)
      if inner is None:
        unknown.append(key)
      else:
        out[f"transformer.resblocks.{i}.{inner}"] = value
    elif key == "embeddings.token_embedding.weight":
      out["token_embedding.weight"] = value
    elif key == "embeddings.position_embedding.weight":
      out["positional_embedding"] = value
    elif key.startswith("final_layer_norm."):
      out["ln_final." + key[len("final_layer_norm."):]] = value
    elif key == "text_projection.weight":
      out["text_projection"] = np.ascontiguousarray(value.T)
    else:
      unknown.append(key)
  for (i, leaf), parts in fused.items():
    if set(parts) != {"q", "k", "v"}:
      unknown.append(f"encoder.layers.{i}.self_attn.*_proj.{leaf} (only {sorted(parts)})")
      continue
    out[f"transformer.resblocks.{i}.attn.in_proj_{leaf}"] = np.concatenate([parts["q"], parts["k"], parts["v"]], 0)
  if unknown:
    raise _fail("HF CLIP text tower", unknown, "Expected CLIPTextModel names.")
  return out


# ----------------------------------------------------------------------------------------------- whole file


def detect_family(ldm: Mapping[str, np.ndarray]) -> str:
  """'sd1' | 'sd2' | 'sdxl' from the keys of an LDM single file (diffusers' detection rules, section 6)."""
  if _SDXL_KEY in ldm:
    return "sdxl"
  if any(k.startswith("conditioner.") for k in ldm):
    raise ConversionError("this single file has an SGM `conditioner.` but no OpenCLIP bigG tower at "
                          f"{_SDXL_KEY}: an SDXL refiner or another SGM model, which perflow_jax does not load.")
  if _SD2_TEXT_KEY in ldm:
    return "sd2"
  if _SD2_UNET_KEY in ldm and ldm[_SD2_UNET_KEY].shape[-1] == 1024:
    return "sd2"
  return "sd1"


def _take(ldm: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
  return {k[len(prefix):]: v for k, v in ldm.items() if k.startswith(prefix)}


def ema_unet(ldm: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The EMA UNet of a training checkpoint, LDM-named without prefix.

  EMA names are the UNet key minus its leading `model.`, with every dot removed:
  `model.diffusion_model.input_blocks.0.0.weight` -> `model_ema.diffusion_modelinput_blocks00weight`.
  """
  unet = _take(ldm, UNET_PREFIX)
  ema_key = lambda k: EMA_PREFIX + ("diffusion_model." + k).replace(".", "")  # pylint: disable=unnecessary-lambda-assignment
  missing = [k for k in unet if ema_key(k) not in ldm]
  if not unet or missing:
    raise ConversionError(f"extract_ema=True, but this file has no EMA copy of {len(missing) or 'its'} UNet weights "
                          f"(e.g. {ema_key(missing[0]) if missing else EMA_PREFIX + '...'}). Load the non-EMA "
                          "weights (extract_ema=False) or use a training checkpoint that kept `model_ema.`.")
  return {k: ldm[ema_key(k)] for k in unet}


def ldm_to_diffusers(ldm: Mapping[str, np.ndarray], *, family: str | None = None, extract_ema: bool = False,
                     sd2_text_layers: int | None = None) -> tuple[str, dict[str, dict[str, np.ndarray]]]:
  """Splits a single-file checkpoint into diffusers-named components.

  Args:
    ldm: the flat state dict (`state_dict` wrappers already removed).
    family: 'sd1' | 'sd2' | 'sdxl', or None to detect it.
    extract_ema: take the UNet from the `model_ema.` copy.
    sd2_text_layers: OpenCLIP blocks an SD2 text encoder keeps (its config's num_hidden_layers); None: all but
      the last, as in the published files (24 blocks stored, 23 used).

  Returns:
    (family, {'unet', 'vae', 'text_encoder'[, 'text_encoder_2']: diffusers-named state dict}); a component with no
    keys in the file is left out. Keys under no known prefix (schedule buffers such as `alphas_cumprod`, EMA
    bookkeeping) are ignored.
  """
  family = family or detect_family(ldm)
  if family not in FAMILIES:
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}.")
  out = {}
  unet = ema_unet(ldm) if extract_ema else _take(ldm, UNET_PREFIX)
  if unet:
    out["unet"] = unet_ldm_to_diffusers(unet)
  for prefix in VAE_PREFIXES:
    vae = _take(ldm, prefix)
    if vae:
      out["vae"] = vae_ldm_to_diffusers(vae)
      break
  if family in CLIP_PREFIX and _take(ldm, CLIP_PREFIX[family]):
    out["text_encoder"] = clip_ldm_to_diffusers(_take(ldm, CLIP_PREFIX[family]))
  if family in OPENCLIP_PREFIX:
    tower = _take(ldm, OPENCLIP_PREFIX[family])
    if tower:
      layers = {int(k.split(".")[2]) for k in tower if k.startswith("transformer.resblocks.")}
      if family == "sd2":
        # SD2 conditions on the penultimate OpenCLIP layer, so its text encoder has one block less than the file.
        keep = max(layers) if sd2_text_layers is None else sd2_text_layers
        if len(layers) - keep not in (0, 1):
          raise ConversionError(f"the SD2 OpenCLIP tower in this file has {len(layers)} blocks, but the text "
                                f"encoder config has {keep} layers (it uses all blocks or all but the last); check "
                                "the text_encoder config.")
        out["text_encoder"] = openclip_to_diffusers(tower, num_layers=keep, keep_projection=False)
      else:
        out["text_encoder_2"] = openclip_to_diffusers(tower, keep_projection=True)
  return family, out


def diffusers_to_ldm(components: Mapping[str, Mapping[str, np.ndarray]], family: str) -> dict[str, np.ndarray]:
  """Assembles a single-file (LDM-named) state dict from diffusers-named components (the inverse of
  `ldm_to_diffusers`; an SD2 file written this way lacks the unused last OpenCLIP block and projection)."""
  if family not in FAMILIES:
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}.")
  out = {}
  if "unet" in components:
    out.update({UNET_PREFIX + k: v for k, v in unet_diffusers_to_ldm(components["unet"]).items()})
  if "vae" in components:
    out.update({VAE_PREFIXES[0] + k: v for k, v in vae_diffusers_to_ldm(components["vae"]).items()})
  if "text_encoder" in components:
    if family == "sd2":
      tower = openclip_from_diffusers(components["text_encoder"])
      out.update({OPENCLIP_PREFIX["sd2"] + k: v for k, v in tower.items()})
    else:
      tower = clip_diffusers_to_ldm(clip_ldm_to_diffusers(components["text_encoder"]))
      out.update({CLIP_PREFIX[family] + k: v for k, v in tower.items()})
  if "text_encoder_2" in components:
    tower = openclip_from_diffusers(components["text_encoder_2"])
    out.update({OPENCLIP_PREFIX["sdxl"] + k: v for k, v in tower.items()})
  return out
