r"""Benchmarks: the training step's speed and memory, few-step sampling latency, the input pipeline.

  python -m perflow_jax.benchmark --config=configs/bench.py --out=/tmp/bench.json           # --mode=step
  python -m perflow_jax.benchmark --mode=sample --config=configs/bench.py
  python -m perflow_jax.benchmark --mode=memory --config=configs/sd15.py --num_devices=8 --per_device_batch=4
  python -m perflow_jax.benchmark --mode=data --config=configs/tiny.py --config.data.worker_count=4

step: the trainer's step (`train_step.make_train_step`, same shardings and donation) on random weights and a
  latent-cache batch ({'latent_mean','latent_logvar','context'}, logvar = -30 so x0 is the mean), so neither the
  VAE nor the text encoder is measured (as in `shared/bench/torch_perflow_step.py`); the empty-prompt context is
  zeros. SDXL (`--family=sdxl`, or a config whose model.unet has addition_embed_type 'text_time'): the context
  is `perflow_jax.conditioning`'s dict {'hidden' [B, 77, 2048], 'text_embeds' [B, 1280], 'time_ids' [B, 6]},
  shaped by tracing `conditioning.encode_ids` with the configured text encoders (`context_shapes`); the two text
  encoders, which the trainer runs inside the step on image batches, are not measured either. Reports compile
  time, the median of `--steps` steps after one warm-up, examples/s, model FLOPs per step, achieved FLOP/s
  against the measured peak of a jitted float32 matmul, the compiled per-device memory, and the teacher solve's
  share of the step.
  * FLOPs: XLA's cost analysis counts a while loop's body once (the teacher's `fori_loop` over solver steps and
    the sampler's loop), so `flops_per_step` is built from the cost analysis of one lowered UNet forward at the
    step's batch: (solver_steps * g + 3) * forward, g = 2 for the 'guided' teacher (cond + uncond) and 1 for
    cfg_sync, 3 = the student's forward and backward (remat's extra forward is not model work); the trainer logs
    the same count (`perflow_jax.throughput`). On a chip with a known bf16 peak `mfu` = achieved FLOP/s per
    device / that peak.
    `xla_step_flops` is the raw cost analysis of the whole step, for reference.
  * Teacher share: a second program, the step's `encode` + `objective.prepare` only (window, noising, the
    teacher's window solve, target), compiled with the same shardings and timed on the same batch;
    teacher_share = its median / the step's median.
  * Peak: best of 5 runs of a jitted [n, n] @ [n, n] float32 matmul on one device (`--peak_matmul_size`);
    `flops_fraction_of_peak` = flops_per_step / median_step_s / (peak * devices).
memory: lowers and compiles the step with abstract inputs only (ShapeDtypeStructs with shardings: no weight is
  materialised) on the config's mesh, and reports the compiled per-device memory. Where config.model.unet/vae/
  text_encoder(_2) are empty the published configs of `--family` (sd1 | sd2 | sdxl) are used
  (perflow_jax.weights.defaults); without the flag, the config's family (`config_family`: configs/sdxl.py is
  sdxl through its model.time_ids, a config without model dicts otherwise sd1). `--per_device_batch` sets
  the global batch to per-device batch * devices. On CPU, `--num_devices` simulates devices. The step uses
  config.model.attention ('chunked' keeps one block of attention logits live; configs/sd15.py uses it).
  XLA:CPU's default scheduler starts many weight all-gathers early; the environment
  `XLA_FLAGS=--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED` gives a memory-minimising schedule
  (SD1.5, per-device batch 4, 1024-query chunks: 16.5 -> 10.0 GiB): how much of the CPU number is scheduling.
sample: PeRFlow-N (`sampling.perflow_sample`, `--perflow_steps`) against the teacher's DDIM-M
  (`sampling.ddim_sample`, `--ddim_steps`) from the same noise at the same batch, with config.sample's guidance
  (one batched cond + uncond call per step) and config.model.attention; latents only, the VAE decode (the same
  for both) is not timed.
data: input-pipeline throughput (images/s) as the trainer sees it: global batches from `make_train_iterator`
  (decode, crop, flip, tokenize, batch, transfer into sharded jax.Arrays) after a warm-up. Without --config the
  data settings come from `--data.*`; without --tokenizer a tiny CLIP tokenizer is written to a temporary folder.

XLA flags for the CPU (e.g. `--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY`) go in
the XLA_FLAGS environment variable. `--cpu_fast_flags` (on by default; --nocpu_fast_flags turns it off) appends
CPU_FAST_XLA_FLAGS: XNN greedy graph fusion gave the bench step a bitwise-identical loss and halved its time here
(83 s -> 43 s median on a heavily shared 2-core machine; the same lead as bench/README's 0.84 s -> 0.50 s forward).
`--xla_cpu_enable_fast_math=true` made the step another ~14% faster here but is not among them: it drops NaN/Inf
semantics, and the trainer relies on a non-finite loss surfacing as one.

Where the bench step's time went (jax.profiler traces of one step on the 2-core CPU, fixed in this order):
`jax.nn.dot_product_attention` on the 1024-token layers (now `model.attention='chunked'`, models/attention.py),
a one-iteration gradient-accumulation loop that made XLA:CPU lower conv weight gradients to a generic
convolution (now no loop when grad_accum_steps == 1), GroupNorm statistics reduced straight over a minor axis of
C/G channels (now positions first, models/layers.py): 23.3 s -> ~4.5 s per step. What remains is XLA:CPU's
matmuls and convolutions: alone, a [4096, 64] @ [64, 512] dense layer or a 3x3 conv at 32x32x128 -> 64 takes
1.3-2.3x as long as torch's oneDNN kernels here (the oneDNN flags of XLA:CPU did not change the step).

Exit status: 0 when measured; 2 for a user error (a bad flag, an unknown config field or a bad value, a missing
config file), reported in one message without a traceback (--verbosity=1 or PERFLOW_JAX_TRACEBACK=1 adds it; see
perflow_jax.cli).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import statistics
import tempfile
import time
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
from ml_collections import config_flags

from perflow_jax import cli as cli_lib
from perflow_jax import throughput
from perflow_jax.data import pipeline

_MODE = flags.DEFINE_enum("mode", "step", ["step", "memory", "sample", "data"],
                          "step: training step speed; memory: compiled per-device memory from abstract inputs; "
                          "sample: PeRFlow vs DDIM latency; data: input pipeline throughput.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/bench.py, ...).")
_DATA = config_flags.DEFINE_config_dict("data", pipeline.default_data_config(),
                                        "Data settings when no --config is given (data mode).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "CLIP tokenizer folder (data mode; default: a tiny one).")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 50, "Batches timed after the warm-up (data mode).")
_WARMUP = flags.DEFINE_integer("warmup_batches", 5, "Batches read before timing (data mode).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed calls after one warm-up call (step and sample modes).")
_NUM_DEVICES = flags.DEFINE_integer("num_devices", 0, "CPU only: simulate this many devices (0: as given).")
_PER_DEVICE_BATCH = flags.DEFINE_integer("per_device_batch", 0, "Global batch = this * devices (0: the config's).")
_FAMILY = flags.DEFINE_enum("family", "", ["", "sd1", "sd2", "sdxl"], "Published model configs used where the "
                            "config's model.unet / .vae / .text_encoder[_2] are empty; '' = the config's family "
                            "(`config_family`).")
_PEAK_SIZE = flags.DEFINE_integer("peak_matmul_size", 2048, "n of the [n, n] @ [n, n] peak-throughput matmul.")
_PERFLOW_STEPS = flags.DEFINE_integer("perflow_steps", 4, "PeRFlow sampling steps (sample mode).")
_DDIM_STEPS = flags.DEFINE_integer("ddim_steps", 25, "Teacher DDIM steps (sample mode).")
_CPU_FAST = flags.DEFINE_boolean("cpu_fast_flags", True, "Append CPU_FAST_XLA_FLAGS to XLA_FLAGS (they affect "
                                 "only the CPU backend).")
_OUT = flags.DEFINE_string("out", None, "Write the results as JSON here.")

# XLA:CPU flags that sped up the bench step here with an identical loss (`--cpu_fast_flags`).
CPU_FAST_XLA_FLAGS = ("--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",)
CONTEXT_LENGTH = 77  # CLIP's token count: the context's sequence length
LOGVAR_POINT = -30.0  # latent-cache logvar of the benchmark batch: exp(-15) ~ 3e-7, x0 is the mean


# ------------------------------------------------------------------------------------------------ measurement


def median_seconds(fn: Callable[[], Any], repeats: int) -> dict[str, float]:
  """Runs `fn` (which blocks until its result is ready) `repeats` times: median, min and max seconds."""
  if repeats < 1:
    raise ValueError(f"--steps={repeats}: time at least one call.")
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def peak_matmul_flops(size: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of one device: best of `repeats` runs of a jitted float32 [size, size] @ [size, size] matmul."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  device = jax.devices()[0]
  x = jax.device_put(jnp.ones((size, size), jnp.float32), device)
  matmul = jax.jit(lambda a, b: a @ b).lower(x, x).compile()
  jax.block_until_ready(matmul(x, x))
  best = median_seconds(lambda: jax.block_until_ready(matmul(x, x)), repeats)["min_s"]
  return 2.0 * size**3 / best


def cost_flops(compiled: Any) -> float:
  """XLA's FLOP count of a compiled program (loop bodies counted once; see the module docstring)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
    cost = cost[0]
  return float(cost.get("flops", 0.0)) if cost else 0.0


# ---------------------------------------------------------------------------------------------- the step setup


def config_family(config: Any) -> str:
  """'sd1' | 'sd2' | 'sdxl' as far as `config` says: its non-empty model.unet / .vae / .text_encoder[_2] by
  `defaults.family_of_configs`; with none set, 'sdxl' where model.time_ids (SDXL's micro-conditioning, which
  configs/sdxl.py spells out) is set, else 'sd1' (SD1 and SD2 configs without model dicts look alike: pass
  --family=sd2)."""
  from perflow_jax.weights import defaults  # pylint: disable=g-import-not-at-top

  mc = config.model
  given = {c: dict(mc[c]) for c in ("unet", "vae", "text_encoder", "text_encoder_2") if mc.get(c)}
  if given:
    return defaults.family_of_configs(given)
  return "sdxl" if tuple(mc.get("time_ids", ())) else "sd1"


def complete_model_configs(config: Any, family: str = "sd1") -> Any:
  """A copy of `config` whose empty model.unet / .vae / .text_encoder (SDXL: also .text_encoder_2) are the
  published `family` configs (perflow_jax.weights.defaults), with teacher_prediction_type set: enough to build
  the step."""
  from perflow_jax.weights import defaults  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top

  config = copy.deepcopy(config)
  published = defaults.family_configs(family)
  for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
    if component in published and not config.model[component]:
      config.model[component] = ml_collections.ConfigDict(
          {k: v for k, v in published[component].items() if not k.startswith("_")})
  if not config.model.teacher_prediction_type:
    config.model.teacher_prediction_type = published["scheduler"].get("prediction_type", "epsilon")
  return config


def latent_shape(config: Any) -> tuple[int, int, int]:
  """(h, w, c) of the latents of config.data.resolution under config.model.vae's downsampling."""
  vae, unet = config.model.vae, config.model.unet
  factor = 2 ** (len(vae["block_out_channels"]) - 1)
  size = int(config.data.resolution) // factor
  if size < 1 or int(config.data.resolution) % factor:
    raise ValueError(f"config.data.resolution={config.data.resolution} is not a multiple of the VAE's "
                     f"downsampling factor {factor}; choose a multiple of {factor}.")
  return size, size, int(unet["in_channels"])


def is_sdxl(config: Any) -> bool:
  """Whether config.model.unet takes SDXL's added conditioning (addition_embed_type 'text_time')."""
  return config.model.unet.get("addition_embed_type") == "text_time"


def context_shapes(config: Any, batch_size: int) -> Any:
  """The UNet's context for `batch_size` prompts (`perflow_jax.conditioning`) as float32 ShapeDtypeStructs.

  SD1/SD2: [B, 77, unet.cross_attention_dim], as a latent cache stores it. SDXL: the dict {'hidden' [B, 77,
  D1+D2], 'text_embeds' [B, P], 'time_ids' [B, 6]} that `conditioning.encode_ids` returns for the configured
  text encoders and `conditioning.micro_conditioning` time ids, traced abstractly (nothing runs)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  mc = config.model
  if not is_sdxl(config):
    return jax.ShapeDtypeStruct((batch_size, CONTEXT_LENGTH, int(mc.unet["cross_attention_dim"])), jnp.float32)
  from perflow_jax import conditioning  # pylint: disable=g-import-not-at-top
  from perflow_jax import models  # pylint: disable=g-import-not-at-top
  from perflow_jax.weights import pretrained  # pylint: disable=g-import-not-at-top

  # As the trainer builds them: SDXL's second encoder always carries the text projection.
  arch = {"text_encoder_2": {"architectures": ["CLIPTextModelWithProjection"]}}
  one, two = (pretrained.build_module(c, {**arch.get(c, {}), **dict(mc[c])})
              for c in ("text_encoder", "text_encoder_2"))
  ids = jax.ShapeDtypeStruct((batch_size, CONTEXT_LENGTH), jnp.int32)
  time_ids = conditioning.micro_conditioning(int(config.data.resolution), tuple(mc.get("time_ids", ())))
  encode = lambda p1, p2, i1, i2: conditioning.encode_ids(one, p1, i1, text_encoder_2=two, text_params_2=p2,
                                                          input_ids_2=i2, time_ids=time_ids)
  context = jax.eval_shape(encode, models.abstract_params(one), models.abstract_params(two), ids, ids)
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32), context)


@dataclasses.dataclass(frozen=True)
class StepSetup:
  """Everything to lower the trainer's step: the jitted step, a teacher-only `prepare` and their inputs' types.

  `abstract_args` are (state, ema, frozen, batch, base_key) as ShapeDtypeStructs carrying their shardings.
  """
  config: Any
  mesh: Any
  unet: Any
  step: Any  # jax.jit of train_step.make_train_step(...), donating state and EMA
  prepare: Any  # jax.jit of (frozen, batch, key) -> the objective's inputs (teacher solve included)
  abstract_args: tuple[Any, ...]


def build_step(config: Any, mesh: Any) -> StepSetup:
  """The trainer's step for `config` on `mesh`, fed a latent-cache batch (see the module docstring); SDXL's
  batch carries its conditioning dict (`context_shapes`) as the context."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from perflow_jax import models  # pylint: disable=g-import-not-at-top
  from perflow_jax import run_config  # pylint: disable=g-import-not-at-top
  from perflow_jax import train_step as ts  # pylint: disable=g-import-not-at-top
  from perflow_jax import trainer  # pylint: disable=g-import-not-at-top
  from perflow_jax.parallel import sharding as sh  # pylint: disable=g-import-not-at-top
  from perflow_jax.weights import pretrained  # pylint: disable=g-import-not-at-top

  run_config.validate_run_config(config)
  mc = config.model
  rules, fallback = sh.rules_from_config(config), bool(config.sharding.fallback_to_largest)
  unet = pretrained.build_module("unet", dict(mc.unet), dtype=trainer.DTYPES[mc.dtype])
  abstract = models.abstract_params(unet)
  param_sh = sh.logical_to_shardings(abstract, mesh, rules, fallback)
  optimizer = ts.make_optimizer(config.optim)
  opt_sh = sh.logical_to_shardings(jax.eval_shape(optimizer.init, abstract), mesh, rules, fallback)
  state_sh = ts.TrainState(step=sh.replicated(mesh), params=param_sh, opt_state=opt_sh)
  params = sh.with_shardings(abstract, param_sh)  # float32 master weights
  state, ema = jax.eval_shape(lambda p: ts.init_train_state(p, optimizer), params)
  state, ema = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), (state, ema),
                            (state_sh, param_sh))

  batch_size, (h, w, c) = int(config.data.batch_size), latent_shape(config)
  rep, batch_sh = sh.replicated(mesh), sh.batch_sharding(mesh, rules)
  latent = jax.ShapeDtypeStruct((batch_size, h, w, c), jnp.float32, sharding=batch_sh)
  context = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=batch_sh),
                         context_shapes(config, batch_size))
  batch = {"latent_mean": latent, "latent_logvar": latent, "context": context}
  teacher_dtype = trainer.DTYPES[mc.teacher_dtype]
  # The "" prompt's context: the same structure with leading dim 1 (the trainer's frozen['empty_context']).
  empty = jax.tree.map(lambda a: jax.ShapeDtypeStruct((1,) + a.shape[1:], a.dtype, sharding=rep), context)
  frozen = {"empty_context": empty}
  teacher_shardings, teacher_constraint = sh.teacher_placement(config.sharding.teacher, param_sh, mesh)
  if config.objective == "perflow":
    frozen["teacher"] = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, teacher_dtype, sharding=s),
                                     params, teacher_shardings)
  key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=rep)

  student = ts.training_unet(unet, mc)
  objective = ts.OBJECTIVES[config.objective](config, student, mc.teacher_prediction_type or "epsilon")
  # Passes batch['context'] through unchanged: an array, or SDXL's dict (the trainer's image path computes the
  # same dict with the text encoders inside the step; those and the VAE encoder are not part of this program).
  encode = ts.make_encode_fn(None, None, float(mc.vae.get("scaling_factor", 0.18215)), from_cache=True)
  step_fn = ts.make_train_step(config, encode, objective, optimizer, teacher_sharding=teacher_constraint)
  shardings = lambda tree: jax.tree.map(lambda a: a.sharding, tree)
  step = jax.jit(step_fn, in_shardings=(state_sh, param_sh, shardings(frozen), shardings(batch), rep),
                 out_shardings=(state_sh, param_sh, rep), donate_argnums=(0, 1))

  def prepare_fn(frozen, batch, key):
    if teacher_constraint is not None:
      frozen = {**frozen, "teacher": jax.lax.with_sharding_constraint(frozen["teacher"], teacher_constraint)}
    k_enc, k_loss = jax.random.split(key)
    x0, context = encode(frozen, batch, k_enc)
    return objective.prepare(frozen, x0, context, k_loss)

  prepare = jax.jit(prepare_fn, in_shardings=(shardings(frozen), shardings(batch), rep))
  return StepSetup(config, mesh, unet, step, prepare, (state, ema, frozen, batch, key))


def _context_values(context: Any, key: Any, time_ids: Any, fill: Callable[..., Any]) -> Any:
  """A context like the abstract `context`: `fill(key, shape)` for the text fields, SDXL's `time_ids` broadcast."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from perflow_jax import conditioning  # pylint: disable=g-import-not-at-top

  if not isinstance(context, dict):
    return fill(key, context.shape)
  keys = jax.random.split(key, len(conditioning.TEXT_KEYS))
  values = {k: fill(k_, context[k].shape) for k, k_ in zip(conditioning.TEXT_KEYS, keys)}
  ids = context[conditioning.TIME_IDS]
  return {**values, conditioning.TIME_IDS: jnp.broadcast_to(jnp.asarray(time_ids, jnp.float32), ids.shape)}


def materialize(setup: StepSetup, seed: int = 0) -> tuple[Any, ...]:
  """Concrete step inputs matching `setup.abstract_args`: a random-init student (= teacher, = EMA), zero empty
  context, a latent-cache batch with x0 ~ N(0, 1) and context ~ N(0, 1) (as the torch reference feeds); SDXL's
  text fields likewise, its time ids the config's micro-conditioning."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from perflow_jax import conditioning  # pylint: disable=g-import-not-at-top
  from perflow_jax import train_step as ts  # pylint: disable=g-import-not-at-top
  from perflow_jax.parallel import sharding as sh  # pylint: disable=g-import-not-at-top

  state_a, ema_a, frozen_a, batch_a, key_a = setup.abstract_args
  shardings = lambda tree: jax.tree.map(lambda a: a.sharding, tree)
  unet, config = setup.unet, setup.config
  key = jax.random.key(seed)
  params = sh.init_sharded(lambda k: unet.init(k, *unet.dummy_inputs(1))["params"], shardings(ema_a),
                           jax.random.fold_in(key, 0))
  optimizer = ts.make_optimizer(config.optim)
  state, ema = jax.jit(lambda p: ts.init_train_state(p, optimizer),
                       out_shardings=(shardings(state_a), shardings(ema_a)))(params)
  scaling = float(config.model.vae.get("scaling_factor", 0.18215))
  time_ids = conditioning.micro_conditioning(int(config.data.resolution), tuple(config.model.get("time_ids", ())))

  def make_batch(k):
    k_x, k_c = jax.random.split(k)
    shape = batch_a["latent_mean"].shape
    return {"latent_mean": jax.random.normal(k_x, shape, jnp.float32) / scaling,
            "latent_logvar": jnp.full(shape, LOGVAR_POINT, jnp.float32),
            "context": _context_values(batch_a["context"], k_c, time_ids,
                                       lambda k_, s: jax.random.normal(k_, s, jnp.float32))}

  batch = jax.jit(make_batch, out_shardings=shardings(batch_a))(jax.random.fold_in(key, 1))
  empty = jax.jit(lambda: _context_values(frozen_a["empty_context"], jax.random.key(0), time_ids,
                                          lambda _, s: jnp.zeros(s, jnp.float32)),
                  out_shardings=shardings(frozen_a["empty_context"]))()
  frozen = {"empty_context": empty}
  if "teacher" in frozen_a:
    frozen["teacher"] = jax.jit(lambda p: jax.tree.map(lambda x, a: x.astype(a.dtype), p, frozen_a["teacher"]),
                                out_shardings=shardings(frozen_a["teacher"]))(params)
  base_key = jax.device_put(jax.random.key(int(config.seed)), key_a.sharding)
  return state, ema, frozen, batch, base_key


def unet_forward_flops(setup: StepSetup, batch_size: int) -> float:
  """XLA's FLOPs of one UNet forward (compute dtype, no loop) at `batch_size`, from abstract inputs."""
  import jax  # pylint: disable=g-import-not-at-top

  _, ema_a, _, batch_a, _ = setup.abstract_args
  resize = lambda a: jax.ShapeDtypeStruct((batch_size,) + a.shape[1:], a.dtype)
  return throughput.unet_forward_flops(setup.unet, ema_a, resize(batch_a["latent_mean"]),
                                       jax.tree.map(resize, batch_a["context"]))


# ------------------------------------------------------------------------------------------------------ modes


def _mesh(config: Any):
  from perflow_jax.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top

  mesh_config = config.mesh if config is not None and "mesh" in config else {"data": -1, "fsdp": 1}
  return mesh_lib.make_mesh(mesh_config)


def _describe(config: Any, mesh: Any) -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top

  pf, unet = config.perflow, config.model.unet
  return {"batch_size": int(config.data.batch_size), "latent_shape": list(latent_shape(config)),
          "block_out_channels": list(unet["block_out_channels"]), "objective": config.objective,
          "num_windows": int(pf.num_windows), "solver": pf.solver, "solver_steps": int(pf.solver_steps),
          "teacher_guidance": pf.teacher_guidance, "dtype": config.model.dtype,
          "teacher_dtype": config.model.teacher_dtype, "remat": bool(config.model.remat),
          "attention": config.model.attention, "family": config_family(config),
          "mesh": {k: int(v) for k, v in mesh.shape.items()}, "devices": jax.device_count(),
          "platform": jax.devices()[0].platform, "xla_flags": os.environ.get("XLA_FLAGS", "")}


def run_step_benchmark(config: Any, mesh: Any, *, steps: int = 5, peak_matmul_size: int = 2048
                       ) -> dict[str, Any]:
  """Compiles and times the training step; see the module docstring for every number's method."""
  import jax  # pylint: disable=g-import-not-at-top
  from perflow_jax.parallel import sharding as sh  # pylint: disable=g-import-not-at-top

  setup = build_step(config, mesh)
  start = time.perf_counter()
  compiled = setup.step.lower(*setup.abstract_args).compile()
  compile_s = time.perf_counter() - start
  logging.info("Step compiled in %.1f s; timing %d steps.", compile_s, steps)
  state, ema, frozen, batch, key = materialize(setup)
  state, ema, metrics = compiled(state, ema, frozen, batch, key)  # warm-up
  jax.block_until_ready(metrics)
  carry = [state, ema]

  def one_step():
    carry[0], carry[1], m = compiled(carry[0], carry[1], frozen, batch, key)
    jax.block_until_ready(m)

  step_times = median_seconds(one_step, steps)
  loss = float(jax.device_get(metrics["loss"]))

  logging.info("Step median %.3f s; timing the teacher-only program.", step_times["median_s"])
  prepare = setup.prepare.lower(*setup.abstract_args[2:]).compile()
  jax.block_until_ready(prepare(frozen, batch, key))
  prepare_times = median_seconds(lambda: jax.block_until_ready(prepare(frozen, batch, key)), steps)

  batch_size = int(config.data.batch_size)
  forward = unet_forward_flops(setup, batch_size)
  flops = throughput.model_flops_per_step(config, forward)
  peak = peak_matmul_flops(peak_matmul_size)
  achieved = flops / step_times["median_s"]
  return {
      "mode": "step", **_describe(config, mesh),
      "compile_s": compile_s, "median_step_s": step_times["median_s"], "min_step_s": step_times["min_s"],
      "max_step_s": step_times["max_s"], "steps": steps, "examples_per_s": batch_size / step_times["median_s"],
      "flops_per_step": flops, "unet_forward_flops": forward, "xla_step_flops": cost_flops(compiled),
      "achieved_flops_per_s": achieved, "peak_matmul_flops_per_s": peak,
      "flops_fraction_of_peak": achieved / (peak * jax.device_count()),
      **throughput.step_scalars(flops, step_times["median_s"], jax.device_count(),
                                throughput.peak_flops_per_device(jax.devices()[0].device_kind)),
      "teacher_prepare_median_s": prepare_times["median_s"],
      "teacher_share": prepare_times["median_s"] / step_times["median_s"],
      "memory": sh.compiled_memory(compiled), "first_loss": loss,
  }


def run_memory_benchmark(config: Any, mesh: Any) -> dict[str, Any]:
  """Per-device memory of the step compiled from abstract inputs only (nothing of the model is materialised)."""
  from perflow_jax.parallel import sharding as sh  # pylint: disable=g-import-not-at-top
  setup = build_step(config, mesh)
  start = time.perf_counter()
  compiled = setup.step.lower(*setup.abstract_args).compile()
  compile_s = time.perf_counter() - start
  logging.info("Step compiled from abstract inputs in %.1f s.", compile_s)
  memory = sh.compiled_memory(compiled)
  devices = int(mesh.devices.size)
  return {"mode": "memory", **_describe(config, mesh), "compile_s": compile_s,
          "per_device_batch": int(config.data.batch_size) // devices, "memory": memory,
          "per_device_gib": memory.get("total_gib", float("nan")),
          "teacher_sharding": config.sharding.teacher, "collectives": step_collectives(compiled.as_text())}


def step_collectives(hlo_text: str) -> dict[str, Any]:
  """Collectives of a compiled step by kind: per iteration of the teacher solve's loop (None: XLA left no such
  loop, e.g. it unrolled it), per iteration of every other loop that has any (by op_name), outside every loop."""
  from perflow_jax import train_step as ts  # pylint: disable=g-import-not-at-top
  from perflow_jax.parallel import hlo_stats  # pylint: disable=g-import-not-at-top

  loops = hlo_stats.loop_collectives(hlo_text)
  solve = [loop for loop in loops if f"/{ts.TEACHER_SOLVE_SCOPE}/" in loop.op_name]
  return {"teacher_solve_loop": solve[0].counts if solve else None,
          "other_loops": {loop.op_name: loop.counts for loop in loops if loop.total and loop not in solve},
          "outside_loops": hlo_stats.entry_collectives(hlo_text)}


def run_sample_benchmark(config: Any, mesh: Any, *, steps: int = 5, perflow_steps: int = 4,
                         ddim_steps: int = 25) -> dict[str, Any]:
  """PeRFlow-N vs teacher DDIM-M latency from the same noise and prompts at the config's batch."""
  import jax  # pylint: disable=g-import-not-at-top

  from perflow_jax import sampling  # pylint: disable=g-import-not-at-top
  from perflow_jax import train_step as ts  # pylint: disable=g-import-not-at-top

  setup = build_step(config, mesh)
  _, params, frozen, batch, _ = materialize(setup)
  # The step's UNet: config.model.attention applies to sampling too (remat is a no-op without a backward pass).
  unet, pf = ts.training_unet(setup.unet, config.model), config.perflow
  guidance = float(config.sample.guidance_scale)
  noise = jax.jit(lambda m: m * float(config.model.vae.get("scaling_factor", 0.18215)))(batch["latent_mean"])
  args = (params, noise, batch["context"], frozen["empty_context"])
  samplers = {
      f"perflow_{perflow_steps}": lambda p, z, c, u: sampling.perflow_sample(
          unet, p, z, c, u, perflow_steps, guidance, int(pf.num_windows), pf.prediction_type),
      f"ddim_{ddim_steps}": lambda p, z, c, u: sampling.ddim_sample(
          unet, p, z, c, u, ddim_steps, guidance, config.model.teacher_prediction_type or "epsilon"),
  }
  result: dict[str, Any] = {"mode": "sample", **_describe(config, mesh), "guidance_scale": guidance}
  for name, fn in samplers.items():
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    result[f"{name}_compile_s"] = time.perf_counter() - start
    jax.block_until_ready(compiled(*args))
    times = median_seconds(lambda c=compiled: jax.block_until_ready(c(*args)), steps)
    result[f"{name}_median_s"], result[f"{name}_min_s"] = times["median_s"], times["min_s"]
  result["speedup"] = result[f"ddim_{ddim_steps}_median_s"] / result[f"perflow_{perflow_steps}_median_s"]
  return result


def run_data_benchmark(config_data: Any, mesh: Any, tokenizer: Any, *, num_batches: int,
                       warmup_batches: int) -> dict[str, Any]:
  """Times ``num_batches`` global batches after ``warmup_batches``; returns images/s and the settings."""
  import jax  # pylint: disable=g-import-not-at-top

  start = time.perf_counter()
  iterator = pipeline.make_train_iterator(config_data, mesh, tokenizer)
  jax.block_until_ready(next(iterator))
  first_batch_s = time.perf_counter() - start
  for _ in range(warmup_batches):
    jax.block_until_ready(next(iterator))
  start = time.perf_counter()
  for _ in range(num_batches):
    jax.block_until_ready(next(iterator))
  elapsed = time.perf_counter() - start
  batch_size = int(config_data.batch_size)
  return {
      "mode": "data",
      "images_per_s": num_batches * batch_size / elapsed,
      "batches_per_s": num_batches / elapsed,
      "first_batch_s": first_batch_s,
      "num_batches": num_batches,
      "batch_size": batch_size,
      "source": config_data.source,
      "name": config_data.name,
      "resolution": int(config_data.resolution),
      "worker_count": int(config_data.worker_count),
      "random_crop": bool(config_data.random_crop),
      "random_flip": bool(config_data.random_flip),
      "devices": jax.device_count(),
      "processes": jax.process_count(),
  }


# ------------------------------------------------------------------------------------------------------ CLI


def format_table(result: dict[str, Any]) -> str:
  """A readable two-column table of the scalar results (GiB for bytes, scientific for FLOPs)."""
  rows = []
  flat = dict(result)
  for k, v in result.get("memory", {}).items():
    flat[f"memory.{k}"] = v
  collectives = result.get("collectives", {})
  for k in ("teacher_solve_loop", "outside_loops"):
    if k in collectives:
      counts = collectives[k]
      flat[f"collectives.{k}"] = ("no such loop" if counts is None else
                                  ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())) or "none")
  for key, value in flat.items():
    if isinstance(value, (dict, list)):
      continue
    if isinstance(value, float) and ("flops" in key):
      text = f"{value:.3e}"
    elif key.endswith("_bytes"):
      text = f"{value / 2**30:.3f} GiB"
    elif isinstance(value, float):
      text = f"{value:.4g}"
    else:
      text = str(value)
    rows.append((key, text))
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _prepare_runtime(num_devices: int, cpu_fast: bool) -> None:
  """Settings read when JAX starts its backend: must run before the first computation."""
  import jax  # pylint: disable=g-import-not-at-top

  if cpu_fast:
    current = os.environ.get("XLA_FLAGS", "")
    missing = [f for f in CPU_FAST_XLA_FLAGS if f.split("=")[0] not in current]
    os.environ["XLA_FLAGS"] = " ".join([current, *missing]).strip()
  if num_devices:
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
      raise ValueError("--num_devices and XLA_FLAGS=--xla_force_host_platform_device_count both set the device "
                       "count; pass only one.")
    jax.config.update("jax_num_cpu_devices", int(num_devices))


def _training_config(config: Any, per_device_batch: int, family: str) -> Any:
  import jax  # pylint: disable=g-import-not-at-top

  if config is None:
    raise app.UsageError("--config is required for this mode (e.g. --config=configs/bench.py).")
  config = complete_model_configs(config, family or config_family(config))
  if per_device_batch:
    config.data.batch_size = int(per_device_batch) * jax.device_count()
  # The benchmark feeds latent-cache batches: image augmentations do not apply. SDXL keeps its image source in
  # the config (run_config rejects a cache for SDXL, which stores no pooled embedding); its step is fed the same
  # latents plus the conditioning dict (`build_step`), and config.data.source is not read.
  if not is_sdxl(config):
    config.data.source = "cache"
  config.data.random_flip, config.data.random_crop = False, False
  return config


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  _prepare_runtime(_NUM_DEVICES.value, _CPU_FAST.value)
  mode = _MODE.value
  if mode == "data":
    result = _data_main(_CONFIG.value)
  else:
    config = _training_config(_CONFIG.value, _PER_DEVICE_BATCH.value, _FAMILY.value)
    mesh = _mesh(config)
    if mode == "step":
      result = run_step_benchmark(config, mesh, steps=_STEPS.value, peak_matmul_size=_PEAK_SIZE.value)
    elif mode == "memory":
      result = run_memory_benchmark(config, mesh)
    else:
      result = run_sample_benchmark(config, mesh, steps=_STEPS.value, perflow_steps=_PERFLOW_STEPS.value,
                                    ddim_steps=_DDIM_STEPS.value)
  print(format_table(result), flush=True)
  if _OUT.value:
    with open(_OUT.value, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2)


def _data_main(config: Any) -> dict[str, Any]:
  config_data = config.data if config is not None else _DATA.value
  with tempfile.TemporaryDirectory() as tmp:
    from perflow_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top

    if config_data.source == "cache":
      tokenizer = None
    elif _TOKENIZER.value:
      tokenizer = tokenizer_lib.load_tokenizer(_TOKENIZER.value)
    else:
      tokenizer = tokenizer_lib.load_tokenizer(tokenizer_lib.write_tiny_clip_tokenizer(tmp))
    return run_data_benchmark(config_data, _mesh(config), tokenizer, num_batches=_NUM_BATCHES.value,
                              warmup_batches=_WARMUP.value)


if __name__ == "__main__":
  cli_lib.run(main, output_flags=("out",))
