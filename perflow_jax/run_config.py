"""The fields of a perflow_jax training config beyond the base ones, and the checks the trainer runs at start.

`perflow_config()` returns the base fields (seed, cadences, mesh, sharding, distributed; see
`perflow_jax.config_lib.base_config`) plus the sections below, with the SD1.5 recipe of the reference as defaults.
Config files (configs/*.py) start from it and change what their recipe changes.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import ml_collections

from perflow_jax import config_lib
from perflow_jax import storage
from perflow_jax.data import pipeline
from perflow_jax.models import layers

OBJECTIVES = ("perflow", "diffusion")
STUDENT_PREDICTION_TYPES = ("diff_eps", "ddim_eps", "velocity")
TEACHER_PREDICTION_TYPES = ("epsilon", "v_prediction")
SOLVERS = ("ddim", "ddim_grid", "dpmpp_2m")
GUIDANCE = ("cfg_sync", "guided")
DTYPE_NAMES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = layers.ATTENTION_IMPLS


def perflow_config(**base_overrides: Any) -> ml_collections.ConfigDict:
  """Base fields + model, perflow, diffusion, optim, data and sample sections (the SD1.5 recipe's values)."""
  config = config_lib.base_config(**base_overrides)
  config.objective = "perflow"  # or 'diffusion': train/fine-tune a teacher with the standard objective

  config.model = ml_collections.ConfigDict()
  config.model.pretrained = ""  # diffusers folder | single file | converted dir; '' = random init from the dicts
  config.model.tokenizer = ""  # tokenizer folder; '' = the pretrained one ('procedural' = the tiny built-in one)
  config.model.teacher_prediction_type = ""  # 'epsilon' | 'v_prediction'; '' = from the pretrained scheduler
  config.model.dtype = "float32"  # compute dtype of the student (master weights are always float32)
  config.model.teacher_dtype = "float32"  # storage/compute dtype of the frozen teacher
  config.model.remat = False  # rematerialise UNet blocks in the backward pass
  # UNet attention: 'xla' (jax.nn.dot_product_attention, full float32 logits) or 'chunked' (exact, one block of
  # logits at a time, flash-style backward; what fits 512 px SD in 16 GiB per device, and several times faster on
  # CPU). Execution only: same parameters.
  config.model.attention = "xla"
  config.model.attention_query_chunk = 1024  # query rows per chunk for 'chunked'
  config.model.init_seed = 0  # random init only
  config.model.init_from = ""  # a workdir: start the student from its EMA weights ('' = from the teacher)
  config.model.unet = ml_collections.ConfigDict()  # diffusers-style configs, random init only
  config.model.vae = ml_collections.ConfigDict()
  config.model.text_encoder = ml_collections.ConfigDict()
  config.model.text_encoder_2 = ml_collections.ConfigDict()  # SDXL's second (bigG-style) encoder; empty: SD1/SD2
  # SDXL micro-conditioning (orig_h, orig_w, crop_top, crop_left, target_h, target_w), fixed for every example;
  # () = the reference's (R, R, 0, 0, R, R) with R = config.data.resolution.
  config.model.time_ids = ()

  config.perflow = ml_collections.ConfigDict()
  config.perflow.num_windows = 4
  config.perflow.solver = "ddim"  # the reference's DDIM; 'dpmpp_2m' reaches its accuracy in fewer teacher calls
  config.perflow.solver_steps = 8  # teacher calls per window
  config.perflow.teacher_guidance = "cfg_sync"  # SD1.5 recipe; 'guided' = the SDXL recipe
  config.perflow.teacher_guidance_scale = 7.5  # 'guided' only
  config.perflow.prediction_type = "diff_eps"
  config.perflow.t_grid = 1000  # training t on a 1/t_grid grid (SDXL: 200)
  config.perflow.prompt_dropout = 0.1
  config.perflow.weighting = "none"  # 'reciprocal' | 'rcp_win'
  config.perflow.distance = "l2"  # 'pseudo_huber'
  # The SDXL script's --zero_snr: a window starting at t = 1 starts from pure noise, as sampling does (SD's
  # schedule keeps 0.068 of the signal at t = 1). Off in the released recipes.
  config.perflow.zero_snr = False

  config.diffusion = ml_collections.ConfigDict()
  config.diffusion.prediction_type = "epsilon"
  config.diffusion.prompt_dropout = 0.1

  config.optim = ml_collections.ConfigDict()
  config.optim.learning_rate = 8e-5
  config.optim.warmup_steps = 0  # the reference's warmup flag had no effect; a value > 0 here really warms up
  config.optim.weight_decay = 1e-2
  config.optim.b1 = 0.9
  config.optim.b2 = 0.999
  config.optim.eps = 1e-8
  config.optim.grad_clip = 1.0
  config.optim.ema_decay = 0.9999
  config.optim.grad_accum_steps = 1

  config.data = pipeline.default_data_config()

  config.sample_every = 0  # steps between periodic samples (0: never)
  config.sample = ml_collections.ConfigDict()
  config.sample.prompts = ("a photo of a cat",)
  config.sample.num_steps = (4, 8)
  config.sample.guidance_scale = 4.5
  config.sample.seed = 0

  # After the last step: `python -m perflow_jax.evaluate` on the final EMA weights, into workdir/eval/.
  config.eval = ml_collections.ConfigDict()
  config.eval.at_end = False
  config.eval.samplers = ("ddim-50", "ddim-4", "perflow-4", "perflow-8")
  config.eval.reference = "ddim-50"  # the teacher's many-step result every sampler is measured against
  config.eval.prompts = "procedural:256"  # or a prompts file (one per line) via eval.prompts_file
  config.eval.prompts_file = ""
  config.eval.features = ""  # 'classifier:DIR' | 'inception:FILE' ('' = no Fréchet distance / faithfulness)
  config.eval.real = "procedural"  # real images for the Fréchet distance: 'procedural' | .npz | folder | ''
  config.eval.guidance_scale = 3.0
  config.eval.seed = 0
  config.eval.batch_size = 32
  return config


RUN_SCHEMA = config_lib.training_schema(
    objective=str,
    model={"pretrained": str, "tokenizer": str, "teacher_prediction_type": str, "dtype": str, "teacher_dtype": str,
           "remat": bool, "attention": str, "attention_query_chunk": int, "init_seed": int, "init_from": str,
           "unet": Any, "vae": Any, "text_encoder": Any, "text_encoder_2": Any, "time_ids": (tuple, list)},
    perflow={"num_windows": int, "solver": str, "solver_steps": int, "teacher_guidance": str,
             "teacher_guidance_scale": float, "prediction_type": str, "t_grid": int, "prompt_dropout": float,
             "weighting": str, "distance": str, "zero_snr": bool},
    diffusion={"prediction_type": str, "prompt_dropout": float},
    optim={"learning_rate": float, "warmup_steps": int, "weight_decay": float, "b1": float, "b2": float,
           "eps": float, "grad_clip": float, "ema_decay": float, "grad_accum_steps": int},
    data=Any,
    sample_every=int,
    sample={"prompts": (tuple, list), "num_steps": (tuple, list), "guidance_scale": float, "seed": int},
    eval={"at_end": bool, "samplers": (tuple, list), "reference": str, "prompts": str, "prompts_file": str,
          "features": str, "real": str, "guidance_scale": float, "seed": int, "batch_size": int},
)


def _choice(value: str, allowed: tuple[str, ...], name: str) -> None:
  if value not in allowed:
    raise ValueError(f"config.{name}={value!r} is not one of {allowed}.")


def validate_run_config(config: Any) -> None:
  """Rejects unknown/missing fields and inconsistent values before anything starts; names the field and fix."""
  config_lib.validate(config, RUN_SCHEMA)
  pipeline.check_data_config(config.data)
  _choice(config.objective, OBJECTIVES, "objective")
  pf, mc, opt = config.perflow, config.model, config.optim
  _choice(pf.prediction_type, STUDENT_PREDICTION_TYPES, "perflow.prediction_type")
  _choice(pf.solver, SOLVERS, "perflow.solver")
  _choice(pf.teacher_guidance, GUIDANCE, "perflow.teacher_guidance")
  _choice(mc.dtype, DTYPE_NAMES, "model.dtype")
  _choice(mc.teacher_dtype, DTYPE_NAMES, "model.teacher_dtype")
  _choice(mc.attention, ATTENTION_IMPLS, "model.attention")
  if mc.attention_query_chunk < 1:
    raise ValueError(f"config.model.attention_query_chunk={mc.attention_query_chunk} must be >= 1.")
  if mc.teacher_prediction_type:
    _choice(mc.teacher_prediction_type, TEACHER_PREDICTION_TYPES, "model.teacher_prediction_type")
  _choice(config.diffusion.prediction_type, TEACHER_PREDICTION_TYPES, "diffusion.prediction_type")
  if pf.num_windows < 1 or pf.solver_steps < 1:
    raise ValueError("config.perflow.num_windows and config.perflow.solver_steps must be >= 1.")
  if pf.t_grid < pf.num_windows or pf.t_grid % pf.num_windows:
    raise ValueError(f"config.perflow.t_grid={pf.t_grid} must be a multiple of num_windows={pf.num_windows}, so "
                     "that every window holds the same number of grid points.")
  if 1000 // (pf.num_windows * pf.solver_steps) < 1:
    raise ValueError(f"num_windows * solver_steps = {pf.num_windows * pf.solver_steps} exceeds the 1000 SD "
                     "timesteps: the DDIM stride 1000 // (K S) would be 0. Use fewer solver steps.")
  for name in ("prompt_dropout",):
    if not 0.0 <= pf[name] <= 1.0 or not 0.0 <= config.diffusion[name] <= 1.0:
      raise ValueError(f"config.perflow.{name} / config.diffusion.{name} must be probabilities in [0, 1].")
  if opt.learning_rate <= 0 or opt.grad_clip <= 0 or opt.warmup_steps < 0:
    raise ValueError("config.optim.learning_rate and grad_clip must be > 0 and warmup_steps >= 0.")
  if not 0.0 <= opt.ema_decay < 1.0:
    raise ValueError(f"config.optim.ema_decay={opt.ema_decay} must be in [0, 1).")
  if opt.grad_accum_steps < 1 or config.data.batch_size % opt.grad_accum_steps:
    raise ValueError(f"config.data.batch_size={config.data.batch_size} must be a multiple of "
                     f"config.optim.grad_accum_steps={opt.grad_accum_steps}.")
  if not mc.pretrained and not (mc.unet and mc.vae and mc.text_encoder):
    raise ValueError("config.model.pretrained is empty: pass the teacher with --config.model.pretrained=PATH (a "
                     "diffusers folder, a single-file checkpoint or a `perflow_jax.convert` directory), or set "
                     "config.model.unet, .vae and .text_encoder (diffusers-style config dicts) to start from a "
                     "random initialisation.")
  _validate_sdxl(config)
  if (config.objective == "perflow" and config.sample_every
      and any(n < pf.num_windows for n in config.sample.num_steps)):
    raise ValueError(f"config.sample.num_steps={tuple(config.sample.num_steps)}: PeRFlow needs at least "
                     f"num_windows={pf.num_windows} steps (one per window).")
  if config.eval.at_end:
    check_eval_config(config.eval, pf.num_windows)


# Fields whose change on resume would train something else than the checkpoint holds: the models and their
# dtypes, the objective and its flow (windows, prediction type, solver, guidance, grid), the optimizer's kind and
# moments' meaning, and the global batch/resolution. A prefix covers its sub-fields. Every other field (cadences,
# total_steps, seeds, learning rate and schedule, mesh, data location, sampling, eval, attention, remat)
# may change on resume; the changes are logged.
FIELDS_FIXED_ON_RESUME = (
    "objective", "model.unet", "model.vae", "model.text_encoder", "model.text_encoder_2", "model.dtype",
    "model.teacher_dtype", "model.teacher_prediction_type", "model.init_seed", "model.time_ids", "perflow",
    "diffusion", "optim.b1", "optim.b2", "optim.eps", "optim.weight_decay", "data.batch_size",
    "data.resolution", "data.source",
)


class ResumeConfigError(ValueError):
  """The config of a resumed run changes what its checkpoint trains."""


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  """{'a.b': leaf} of nested dicts; tuples as lists, as they come back from JSON."""
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flat(value, f"{prefix}{key}."))
    return out if out or not prefix else {prefix[:-1]: {}}
  return {prefix[:-1]: list(tree) if isinstance(tree, tuple) else tree}


# Fields newer than some checkpoints' configs, and the value their absence meant.
_ADDED_LATER = {
    "mesh.dcn_data": 1,  # one slice
    "perflow.zero_snr": False,  # runs before the option trained without it
    "compilation_cache_dir": "",  # JAX's setting (there was no other)
    "data.prefetch": 0,  # each batch read when the step asked for it
    "sharding.teacher": "fsdp",  # sharded like the student
}


def _fixed(field: str) -> bool:
  return any(field == f or field.startswith(f + ".") for f in FIELDS_FIXED_ON_RESUME)


def resume_changes(saved: dict[str, Any], config: Any) -> tuple[list[str], list[str]]:
  """(refused, allowed): the `field: old -> new` lines between a checkpoint's config and the config resuming it.

  Args:
    saved: the config dict saved with the checkpoint (JSON).
    config: the new run's ConfigDict.
  """
  old = _flat(saved)
  new = _flat(json.loads(config_lib.config_to_json(config)))
  missing = object()
  refused, allowed = [], []
  for field in sorted(set(old) | set(new)):
    before, after = old.get(field, missing), new.get(field, missing)
    if before is missing:
      before = _ADDED_LATER.get(field, missing)
    if before == after:
      continue
    line = f"{field}: {'(absent)' if before is missing else json.dumps(before)} -> " \
           f"{'(absent)' if after is missing else json.dumps(after)}"
    (refused if _fixed(field) else allowed).append(line)
  return refused, allowed


def check_resume(saved: dict[str, Any], config: Any, workdir: str, step: int, log_allowed: bool = True) -> None:
  """Refuses to resume checkpoint `step` of `workdir` with a config that trains something else; logs the
  harmless changes when `log_allowed` (see FIELDS_FIXED_ON_RESUME)."""
  refused, allowed = resume_changes(saved, config)
  if refused:
    raise ResumeConfigError(
        f"{workdir} holds checkpoint step {step} of a run with another config; resuming it with this one would "
        f"train something else:\n  " + "\n  ".join(refused) + "\nTo go on with the old run, drop these overrides. "
        "To train the new config, use a new --workdir (add --config.model.init_from=" + workdir + " to start its "
        "student from this run's EMA weights).")
  for line in allowed if log_allowed else ():
    logging.warning("Resuming step %d with a changed config field: %s", step, line)


def check_eval_config(ev: Any, num_windows: int) -> None:
  """config.eval: known samplers, a reference among them, PeRFlow step counts >= K, a feature net that exists."""
  from perflow_jax import evaluate  # pylint: disable=g-import-not-at-top  (it imports the trainer's modules)
  specs = [s.strip().lower() for s in ev.samplers]
  for spec in specs:
    kind, n = evaluate.parse_sampler(spec)
    if kind == "perflow" and n < num_windows:
      raise ValueError(f"config.eval.samplers: {spec} has fewer steps than num_windows={num_windows}; PeRFlow "
                       "needs one step per window.")
  if ev.reference.strip().lower() not in specs:
    raise ValueError(f"config.eval.reference={ev.reference!r} must be one of config.eval.samplers={specs}.")
  if ev.features and not storage.exists(ev.features.partition(":")[2]):
    raise ValueError(f"config.eval.features={ev.features!r}: {ev.features.partition(':')[2]} does not exist "
                     "(give 'classifier:DIR' or 'inception:FILE', or '' to skip the Fréchet distance).")
  if ev.batch_size < 1:
    raise ValueError(f"config.eval.batch_size={ev.batch_size} must be >= 1.")


def _validate_sdxl(config: Any) -> None:
  """SDXL-specific consistency: two encoders with an SDXL UNet, widths that fit, time ids, no latent cache."""
  mc = config.model
  if mc.time_ids and (len(mc.time_ids) != 6 or any(float(v) < 0 for v in mc.time_ids)):
    raise ValueError(f"config.model.time_ids={tuple(mc.time_ids)} must be () (derived from config.data.resolution) "
                     "or 6 non-negative numbers (orig_h, orig_w, crop_top, crop_left, target_h, target_w).")
  if mc.pretrained:
    return  # the loaded model decides; load_pretrained brings text_encoder_2 with every SDXL checkpoint
  sdxl_unet = bool(mc.unet) and mc.unet.get("addition_embed_type") == "text_time"
  if sdxl_unet and not mc.text_encoder_2:
    raise ValueError("config.model.unet is an SDXL UNet (addition_embed_type='text_time') but "
                     "config.model.text_encoder_2 is empty: set it to the second text encoder's config (an "
                     "OpenCLIP-bigG-style CLIPTextModelWithProjection with projection_dim), e.g. "
                     "run_config.tiny_sdxl_model().text_encoder_2.")
  if mc.text_encoder_2 and not sdxl_unet:
    raise ValueError("config.model.text_encoder_2 is set, but config.model.unet is not an SDXL UNet: set "
                     "unet.addition_embed_type='text_time' (with addition_time_embed_dim and "
                     "projection_class_embeddings_input_dim), or clear config.model.text_encoder_2 for SD1/SD2.")
  if not sdxl_unet:
    return
  te, te2, unet = mc.text_encoder, mc.text_encoder_2, mc.unet
  if not te2.get("projection_dim"):
    raise ValueError("config.model.text_encoder_2.projection_dim is unset: SDXL's UNet reads the second encoder's "
                     "projected pooled output (text_embeds); set projection_dim (1280 for bigG).")
  width = int(te.get("hidden_size", 768)) + int(te2.get("hidden_size", 768))
  if int(unet.get("cross_attention_dim", 0)) != width:
    raise ValueError(f"config.model.unet.cross_attention_dim={unet.get('cross_attention_dim')} must equal "
                     f"text_encoder.hidden_size + text_encoder_2.hidden_size = {width} (SDXL concatenates both "
                     "encoders' penultimate hidden states).")
  added = 6 * int(unet.get("addition_time_embed_dim") or 0) + int(te2.projection_dim)
  if int(unet.get("projection_class_embeddings_input_dim") or 0) != added:
    raise ValueError(f"config.model.unet.projection_class_embeddings_input_dim="
                     f"{unet.get('projection_class_embeddings_input_dim')} must equal 6 * addition_time_embed_dim + "
                     f"text_encoder_2.projection_dim = {added}.")
  if config.data.source == "cache":
    raise ValueError("config.data.source='cache' stores one text encoder's context (SD1.x / SD2.x), not SDXL's "
                     "pooled embedding: train SDXL from images (config.data.source='tfds' or 'procedural').")


def tiny_model() -> ml_collections.ConfigDict:
  """config.model for a random-initialised tiny SD1-shaped model (UNet, VAE with 2x downsampling, CLIP text).

  The text encoder's vocabulary covers the tiny procedural tokenizer (`tokenizer='procedural'`, 612 tokens).
  """
  model = perflow_config().model
  model.tokenizer = "procedural"
  model.teacher_prediction_type = "epsilon"
  model.unet = ml_collections.ConfigDict(dict(
      sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
      attention_head_dim=2, cross_attention_dim=32, norm_num_groups=8))
  model.vae = ml_collections.ConfigDict(dict(
      in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
      sample_size=16, scaling_factor=0.18215))
  model.text_encoder = ml_collections.ConfigDict(dict(
      vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
      max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=32))
  return model


def tiny_sdxl_model() -> ml_collections.ConfigDict:
  """config.model for a random-initialised tiny SDXL-shaped model.

  The SDXL traits at toy size: no attention at the top UNet level, per-level transformer depth (1, 2), linear
  projections, text_time added conditioning (time ids embedded at width 8), two text encoders (CLIP-L style
  quick_gelu and bigG style gelu with projection, 3 layers so that its penultimate layer is not its last),
  context 32 + 32 = 64, text_embeds 16, VAE scaling 0.13025. Both tokenizers are the procedural one; the second is
  written with "!" padding as SDXL's tokenizer_2.
  """
  model = tiny_model()
  model.unet = ml_collections.ConfigDict(dict(
      sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
      attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
      cross_attention_dim=64, norm_num_groups=8, addition_embed_type="text_time", addition_time_embed_dim=8,
      projection_class_embeddings_input_dim=6 * 8 + 16))
  model.vae.scaling_factor = 0.13025
  model.text_encoder_2 = ml_collections.ConfigDict(dict(
      architectures=("CLIPTextModelWithProjection",), vocab_size=1024, hidden_size=32, intermediate_size=64,
      num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
      layer_norm_eps=1e-5, projection_dim=16))
  return model
