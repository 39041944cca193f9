"""The PeRFlow trainer: one linear function, readable top to bottom.

runtime -> mesh -> models (teacher, VAE, text encoder; placed straight into their shardings) -> train state
(student = teacher, optimizer, EMA; sharded) -> input pipeline -> resume -> ahead-of-time compiled step -> loop
(step, metrics, periodic samples, checkpoints, preemption) -> final checkpoint.

The mathematics lives in `perflow_jax.flow` and `perflow_jax.train_step`; this file only wires it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from perflow_jax import checkpoint
from perflow_jax import compile_cache
from perflow_jax import conditioning
from perflow_jax import config_lib
from perflow_jax import metrics as metrics_lib
from perflow_jax import models
from perflow_jax import preemption
from perflow_jax import run_config
from perflow_jax import sampling
from perflow_jax import storage
from perflow_jax import throughput
from perflow_jax import train_step as ts
from perflow_jax import workdir_lock
from perflow_jax.data import pipeline
from perflow_jax.data import tokenizer as tokenization
from perflow_jax.parallel import distributed
from perflow_jax.parallel import mesh as mesh_lib
from perflow_jax.parallel import sharding as sh
from perflow_jax.weights import pretrained as pretrained_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelSet:
  """The modules of a run and their frozen parameters (the student starts as a copy of `unet_params`).

  SDXL adds the second text encoder (OpenCLIP bigG with projection), its params and tokenizer; None otherwise.
  """
  unet: nn.Module
  vae: nn.Module
  text_encoder: nn.Module
  tokenizer: Any
  unet_params: Any
  vae_params: Any
  text_params: Any
  unet_abstract: Any  # boxed abstract params: logical axis names for the shardings
  scaling_factor: float
  teacher_prediction_type: str
  text_encoder_2: nn.Module | None = None
  text_params_2: Any = None
  tokenizer_2: Any = None

  def encode_prompts(self, prompts: list[str], time_ids: Any = None) -> Any:
    """Prompts -> context: [N, 77, D] (SD1/SD2), or the SDXL dict with `time_ids` [6] (see `conditioning`)."""
    if self.text_encoder_2 is None:
      return sampling.encode_prompts(self.text_encoder, self.text_params, self.tokenizer, prompts)
    return sampling.encode_prompts(self.text_encoder, self.text_params, self.tokenizer, prompts,
                                   text_encoder_2=self.text_encoder_2, text_params_2=self.text_params_2,
                                   tokenizer_2=self.tokenizer_2, time_ids=time_ids)


def sdxl_time_ids(config: Any, m: ModelSet) -> np.ndarray | None:
  """SDXL's fixed micro-conditioning [6] for this run (config.model.time_ids, else (R, R, 0, 0, R, R) with
  R = config.data.resolution, as the reference); None for SD1/SD2 models."""
  if m.text_encoder_2 is None:
    return None
  return conditioning.micro_conditioning(int(config.data.resolution), tuple(config.model.get("time_ids", ())))


def _component_shardings(mesh, rules, fallback):
  return lambda abstract: sh.logical_to_shardings(abstract, mesh, rules, fallback)


def load_models(config: Any, workdir: str, mesh: jax.sharding.Mesh, keep_tokenizer: bool = True) -> ModelSet:
  """The teacher's modules and weights: from `config.model.pretrained`, or random from `config.model.*` configs.

  keep_tokenizer: a training run keeps a copy of a procedural tokenizer in `workdir` as its record; tools that
  only read a run (sample, export) pass False.
  """
  mc = config.model
  compute = DTYPES[mc.dtype]
  rules, fallback = sh.rules_from_config(config), bool(config.sharding.fallback_to_largest)
  place = _component_shardings(mesh, rules, fallback)
  if mc.pretrained:
    bundle = pretrained_lib.load_pretrained(mc.pretrained, jnp.float32, compute_dtype=compute,
                                            prediction_type=mc.teacher_prediction_type or None,
                                            shardings=place, tokenizer_path=mc.tokenizer or None)
    return ModelSet(bundle.unet, bundle.vae, bundle.text_encoder, bundle.tokenizer, bundle.unet_params,
                    bundle.vae_params, bundle.text_params, models.abstract_params(bundle.unet),
                    float(bundle.config["vae"].get("scaling_factor", 0.18215)),
                    bundle.config["prediction_type"], bundle.text_encoder_2, bundle.text_params_2,
                    bundle.tokenizer_2)

  # Random initialisation from diffusers-style config dicts (the tiny test model, or a teacher trained here).
  # .get: the config.json of a run from before SDXL support has no text_encoder_2 field.
  components = ("unet", "vae", "text_encoder") + (("text_encoder_2",) if mc.get("text_encoder_2") else ())
  # SDXL's second encoder always carries the text projection (its pooled output is the UNet's text_embeds).
  arch = {"text_encoder_2": {"architectures": ["CLIPTextModelWithProjection"]}}
  built = {c: pretrained_lib.build_module(c, {**arch.get(c, {}), **dict(getattr(mc, c))}, dtype=compute)
           for c in components}
  params = {}
  key = jax.random.key(int(mc.init_seed))
  for i, (c, module) in enumerate(built.items()):
    abstract = models.abstract_params(module)
    inputs = module.dummy_inputs(1)
    params[c] = sh.init_sharded(lambda k, m=module, x=inputs: m.init(k, *x)["params"], place(abstract),
                                jax.random.fold_in(key, i))
  tokenizer_dir = mc.tokenizer
  if tokenizer_dir in ("", "procedural"):
    # Every process writes its own local copy (same bytes, no cross-process barrier); process 0 also keeps one in
    # the workdir as the run's record.
    tokenizer_dir = tempfile.mkdtemp(prefix="perflow_tokenizer_")
    tokenization.write_tiny_clip_tokenizer(tokenizer_dir)
    tokenizer_2_dir = tokenizer_dir + "_2"
    if "text_encoder_2" in built:  # the same vocabulary padded with "!" (id 0), as SDXL's tokenizer_2
      tokenization.write_tiny_clip_tokenizer(tokenizer_2_dir, pad_token="!")
    if keep_tokenizer and jax.process_index() == 0:
      storage.copy_folder(tokenizer_dir, storage.join(workdir, "tokenizer"))
      if os.path.isdir(tokenizer_2_dir):
        storage.copy_folder(tokenizer_2_dir, storage.join(workdir, "tokenizer_2"))
  else:
    tokenizer_dir = storage.local_copy(tokenizer_dir)
    # SDXL's tokenizer_2: a diffusers SDXL folder's tokenizer_2/, else the first tokenizer serves both.
    tokenizer_2_dir = os.path.join(tokenizer_dir, "tokenizer_2")
  tokenizer_2 = None
  if "text_encoder_2" in built:
    tokenizer_2 = tokenization.load_tokenizer(tokenizer_2_dir if os.path.isdir(tokenizer_2_dir) else tokenizer_dir)
  return ModelSet(built["unet"], built["vae"], built["text_encoder"], tokenization.load_tokenizer(tokenizer_dir),
                  params["unet"], params["vae"], params["text_encoder"], models.abstract_params(built["unet"]),
                  float(mc.vae.get("scaling_factor", 0.18215)), mc.teacher_prediction_type or "epsilon",
                  built.get("text_encoder_2"), params.get("text_encoder_2"), tokenizer_2)


def model_flops_per_step(config: Any, m: ModelSet, empty_context: Any) -> float:
  """The model FLOPs of one step at the global batch (`throughput.model_flops_per_step`; 0 where the backend has
  no cost analysis)."""
  batch = int(config.data.batch_size)
  side = int(config.data.resolution) // 2 ** (len(m.vae.config.block_out_channels) - 1)
  latents = jax.ShapeDtypeStruct((batch, side, side, m.unet.config.in_channels), jnp.float32)
  context = jax.tree.map(lambda c: jax.ShapeDtypeStruct((batch,) + c.shape[1:], c.dtype), empty_context)
  forward = throughput.unet_forward_flops(m.unet, m.unet_params, latents, context)
  return throughput.model_flops_per_step(config, forward)


def _cast(tree: Any, dtype: Any) -> Any:
  return jax.tree.map(lambda x: x.astype(dtype), tree)


def train(config: Any, workdir: str) -> dict[str, float]:
  """Trains (or resumes) the run of `config` in `workdir`; returns the last logged metrics.

  Before any model is loaded: the config is validated, the workdir locked for this job (`workdir_lock`: a second
  job is refused; the lock's write is the writability check) and, on a resume, the newest checkpoint's config
  compared with this one (`run_config.check_resume`). config.json is written once every check has passed.

  Raises:
    preemption.Preempted: after SIGTERM or Ctrl-C, once the checkpoint of the step every process stopped at is
      committed; calling `train` again resumes from it.
    workdir_lock.WorkdirLockedError, run_config.ResumeConfigError, checkpoint.CheckpointArchitectureError: the
      workdir belongs to another live job, or holds a run this config would not continue.
  """
  workdir = storage.absolute(workdir)  # a gs:// workdir without the gcp extra stops here, naming the pip command
  run_config.validate_run_config(config)
  distributed.maybe_initialize_distributed(config)
  compile_cache.enable(config.compilation_cache_dir, workdir)  # before the first compilation
  lock = workdir_lock.WorkdirLock(workdir, enabled=jax.process_index() == 0)
  outcome = ""
  try:
    lock.acquire()
  except (workdir_lock.WorkdirLockedError, OSError) as e:
    outcome = f"{type(e).__name__}: {e}"
    if jax.process_count() == 1:
      raise
  # Process 0 holds the lock for the job; the others learn its outcome and stop with it.
  holder_error = distributed.all_gather_strings("workdir lock", outcome or "ok")[0]
  if holder_error != "ok":
    raise workdir_lock.WorkdirLockedError(f"process 0: {holder_error}")
  try:
    _check_newest_checkpoint_config(config, workdir)
    return _train(config, workdir)
  finally:
    lock.release()


def _check_newest_checkpoint_config(config: Any, workdir: str) -> None:
  """Refuses a changed config in seconds, before the models load (the restore checks the step it restores too)."""
  try:
    step = checkpoint.latest_step(workdir)
    saved = None if step is None else checkpoint.saved_config(workdir, step)
  except Exception:  # pylint: disable=broad-except  (a damaged newest step: the restore deals with it)
    return
  if saved is not None:
    run_config.check_resume(dict(saved), config, workdir, step, log_allowed=False)  # the restore logs them


def _train(config: Any, workdir: str) -> dict[str, float]:
  """`train` once the workdir is locked: the linear loop."""
  # --- mesh -------------------------------------------------------------------------------------------------------
  mesh = mesh_lib.make_mesh(config.mesh)
  rules, fallback = sh.rules_from_config(config), bool(config.sharding.fallback_to_largest)
  logging.info("Mesh %s over %d devices, %d process(es).", dict(mesh.shape), jax.device_count(),
               jax.process_count())

  # --- models: the frozen teacher, VAE and text encoder ---------------------------------------------------------
  m = load_models(config, workdir, mesh)
  param_shardings = sh.logical_to_shardings(m.unet_abstract, mesh, rules, fallback)
  sh.assert_sufficiently_sharded(sh.with_shardings(m.unet_abstract, param_shardings), mesh,
                                 float(config.sharding.max_replicated_fraction))
  time_ids = sdxl_time_ids(config, m)  # SDXL: fixed (R, R, 0, 0, R, R); None for SD1/SD2
  # The "" prompt's context: the dropped prompts' and the guided teacher's negative (SDXL: hidden + pooled).
  empty_context = m.encode_prompts([""], time_ids)
  frozen = {"empty_context": empty_context}
  teacher_shardings, teacher_constraint = sh.teacher_placement(config.sharding.teacher, param_shardings, mesh)
  if config.objective == "perflow":  # the diffusion objective has no teacher
    frozen["teacher"] = jax.device_put(_cast(m.unet_params, DTYPES[config.model.teacher_dtype]), teacher_shardings)
  from_cache = config.data.source == "cache"
  if not from_cache:
    frozen.update(vae=m.vae_params, text=m.text_params)
    if m.text_encoder_2 is not None:
      frozen["text_2"] = m.text_params_2

  # --- train state: student (float32 master weights), optimizer, EMA; restored, or created sharded --------------
  optimizer = ts.make_optimizer(config.optim)
  abstract_opt = jax.eval_shape(optimizer.init, m.unet_abstract)
  state_shardings = ts.TrainState(step=sh.replicated(mesh), params=param_shardings,
                                  opt_state=sh.logical_to_shardings(abstract_opt, mesh, rules, fallback))
  init_state = jax.jit(lambda p: ts.init_train_state(_cast(p, jnp.float32), optimizer),
                       out_shardings=(state_shardings, param_shardings))
  abstract_state, abstract_ema = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      jax.eval_shape(init_state, m.unet_params), (state_shardings, param_shardings))
  data_iter = pipeline.make_train_iterator(config.data, mesh, m.tokenizer, seed=int(config.data.shuffle_seed),
                                           sharding=sh.batch_sharding(mesh, rules), tokenizer_2=m.tokenizer_2)
  distributed.barrier("checkpoint manager")  # its creation is the first cross-process collective
  manager = checkpoint.make_checkpoint_manager(workdir, config)
  preempted = preemption.install_handlers()  # SIGTERM and Ctrl-C: save at an agreed step, then stop
  restored = checkpoint.restore_checkpoint(
      manager, abstract_state, abstract_ema, data_iterator=data_iter,
      check_config=lambda saved, step: run_config.check_resume(saved, config, workdir, step))
  # Every start-up check has passed: record the config (a different previous one is kept beside it).
  config_lib.write_config_json(config, workdir, keep_previous_as=f"before_step_{restored.step if restored else 0}")
  if restored is not None:
    state, ema_params = restored.state, restored.ema
    logging.info("Resumed from step %d.", restored.step)
  else:
    start = m.unet_params  # the student starts as the teacher ...
    if config.model.init_from:  # ... or as the EMA weights of another run
      start = checkpoint.restore_ema_params(config.model.init_from, abstract_ema)
      logging.info("Student initialised from the EMA weights in %s.", config.model.init_from)
    state, ema_params = init_state(start)

  # --- the step, compiled ahead of time ---------------------------------------------------------------------------
  # remat matters only where gradients flow; the attention option also bounds the teacher solve's memory.
  student_unet = ts.training_unet(m.unet, config.model)
  objective = ts.OBJECTIVES[config.objective](config, student_unet, m.teacher_prediction_type)
  encode_fn = ts.make_encode_fn(m.vae, m.text_encoder, m.scaling_factor, from_cache,
                                text_encoder_2=m.text_encoder_2, time_ids=time_ids)
  step_fn = ts.make_train_step(config, encode_fn, objective, optimizer, teacher_sharding=teacher_constraint)
  batch = next(data_iter)
  batch_sh = jax.tree.map(lambda x: x.sharding, batch)
  frozen_sh = jax.tree.map(lambda x: x.sharding, frozen)
  base_key = jax.jit(lambda: jax.random.key(int(config.seed)), out_shardings=sh.replicated(mesh))()
  jitted = jax.jit(step_fn, in_shardings=(state_shardings, param_shardings, frozen_sh, batch_sh,
                                          sh.replicated(mesh)),
                   out_shardings=(state_shardings, param_shardings, sh.replicated(mesh)), donate_argnums=(0, 1))
  t0 = time.perf_counter()
  lowered = jitted.lower(state, ema_params, frozen, batch, base_key)
  t1, hits = time.perf_counter(), compile_cache.cache_hits()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  logging.info("Step traced in %.1f s and compiled in %.1f s (%s); per-device memory %s", t1 - t0,
               compile_s - (t1 - t0), "loaded from the persistent compilation cache"
               if compile_cache.cache_hits() > hits else "not in the persistent compilation cache",
               sh.compiled_memory(compiled))
  flops_per_step = model_flops_per_step(config, m, empty_context)
  peak = throughput.peak_flops_per_device(jax.devices()[0].device_kind)
  logging.info("Model FLOPs per step: %.4g (%s)", flops_per_step,
               f"MFU against {peak / 1e12:.0f} TFLOP/s per {jax.devices()[0].device_kind}" if peak else
               f"no bf16 peak known for {jax.devices()[0].device_kind!r}: TFLOP/s only")
  distributed.barrier("step compiled")  # processes whose compile times differ start stepping together

  # --- loop -------------------------------------------------------------------------------------------------------
  first = int(jax.device_get(state.step))
  total = int(config.total_steps)
  writer = metrics_lib.MetricsWriter(workdir, total_steps=total, start_step=first)
  sampler = PeriodicSampler(config, m, mesh, empty_context, time_ids) if int(config.sample_every) > 0 else None
  ckpt_dir = str(checkpoint.checkpoint_dir(workdir))
  last: dict[str, float] = {"compile_s": compile_s}
  timer = throughput.LoopTimer(compile_s)
  steps_since = 0
  finished = first >= total
  stopped_at = None
  try:
    for step in range(first + 1, total + 1):
      if step > first + 1:
        with timer.timing("data_wait"):
          batch = next(data_iter)
      with jax.transfer_guard("disallow"):
        state, ema_params, step_metrics = compiled(state, ema_params, frozen, batch, base_key)
      steps_since += 1
      stop = preempted(step)
      save_now = stop or step == total or step % int(config.checkpoint_every) == 0
      if save_now or step % int(config.log_every) == 0:
        values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        # Never save a non-finite state over the last good checkpoint.
        metrics_lib.check_finite(step, values["loss"], manager.latest_step(), ckpt_dir)
        lap = timer.lap()
        values["examples_per_s"] = steps_since * int(config.data.batch_size) / sum(lap.values())
        values.update(throughput.step_scalars(flops_per_step, lap["step"] / steps_since, jax.device_count(), peak))
        values.update(timer.total_scalars())
        if step % int(config.log_every) == 0 or step == total:
          writer.write_scalars(step, values)
        last.update(values)
        steps_since = 0
      if sampler is not None and step % int(config.sample_every) == 0:
        with timer.timing("sample", wait_for=step_metrics):
          sampler.write(writer, workdir, step, ema_params)
      with timer.timing("checkpoint", wait_for=step_metrics if save_now else None):
        checkpoint.save_checkpoint(manager, step, state, ema_params, config, data_iter,
                                   force=stop or step == total)
      if stop:
        stopped_at = step
        break
      finished = step == total
  finally:  # also on an error: pending async saves commit, so the last good checkpoint is on disk
    data_iter.close()
    checkpoint.close(manager)
    writer.close()
  if stopped_at is not None:  # the checkpoint is committed (close waited for it)
    logging.warning("Preempted: checkpoint saved at step %d; exiting with status %d so that the launcher restarts "
                    "the run.", stopped_at, preemption.PREEMPTED_EXIT_CODE)
    raise preemption.Preempted(stopped_at, workdir)
  if finished and config.eval.at_end:
    evaluate_at_end(config, m, ema_params, workdir)
  return last


def evaluate_at_end(config: Any, m: ModelSet, ema_params: Any, workdir: str) -> dict[str, Any]:
  """`python -m perflow_jax.evaluate` on the final EMA weights (ddim samplers: the teacher), into workdir/eval."""
  from perflow_jax import evaluate  # pylint: disable=g-import-not-at-top  (evaluate imports this module)
  from perflow_jax import sample  # pylint: disable=g-import-not-at-top
  ev, pf = config.eval, config.perflow
  models = sample.Models(m.unet, ema_params, m.vae, m.vae_params, m.text_encoder, m.text_params, m.tokenizer,
                         m.scaling_factor, m.teacher_prediction_type, str(pf.prediction_type), int(pf.num_windows),
                         int(config.data.resolution), m.text_encoder_2, m.text_params_2, m.tokenizer_2,
                         tuple(config.model.time_ids) or None, teacher_params=m.unet_params)
  out = storage.join(workdir, "eval")
  report = evaluate.run_evaluation(
      models, out, samplers=list(ev.samplers), reference=ev.reference, prompts=ev.prompts,
      prompts_file=ev.prompts_file or None, features=ev.features or None, real=ev.real,
      guidance_scale=float(ev.guidance_scale), seed=int(ev.seed), batch_size=int(ev.batch_size))
  logging.info("Evaluation written to %s:\n%s", out, evaluate.markdown_table(report))
  return report


class PeriodicSampler:
  """Samples of the EMA weights on fixed prompts and seeds, one compiled program per step count.

  A PeRFlow run shows few-step PeRFlow samples of the student; a diffusion-objective run (a teacher being trained)
  shows DDIM samples of the model, read with config.diffusion.prediction_type.
  """

  def __init__(self, config: Any, m: ModelSet, mesh: jax.sharding.Mesh, empty_context: Any, time_ids: Any = None):
    """empty_context: the "" context (negative of CFG); time_ids: SDXL's [6] micro-conditioning, else None.

    Every process runs the sampler (the EMA params are sharded across all of them); the images come out replicated,
    so each process holds the whole grid, and process 0 writes it.
    """
    sc = config.sample
    self._m = m
    self._steps = tuple(int(n) for n in sc.num_steps)
    self._guidance = float(sc.guidance_scale)
    self._context = m.encode_prompts(list(sc.prompts), time_ids)
    self._uncond = empty_context
    latent = int(config.data.resolution) // 2 ** (len(m.vae.config.block_out_channels) - 1)
    channels = m.unet.config.in_channels
    # A host array: every process holds the same noise, and jit treats it as replicated.
    self._noise = np.asarray(jax.random.normal(jax.random.key(int(sc.seed)),
                                               (len(sc.prompts), latent, latent, channels)))
    self._prompts = list(sc.prompts)
    pf = config.perflow
    self._label = "PeRFlow" if config.objective == "perflow" else "DDIM"

    def run(params, vae_params, noise, context, uncond, num_steps):
      if config.objective == "perflow":
        z = sampling.perflow_sample(m.unet, params, noise, context, uncond, num_steps, self._guidance,
                                    int(pf.num_windows), pf.prediction_type)
      else:
        z = sampling.ddim_sample(m.unet, params, noise, context, uncond, num_steps, self._guidance,
                                 config.diffusion.prediction_type)
      return sampling.decode_latents(m.vae, vae_params, z, m.scaling_factor)

    self._run = jax.jit(run, static_argnums=(5,), out_shardings=sh.replicated(mesh))

  def write(self, writer: metrics_lib.MetricsWriter, workdir: str, step: int, params: Any) -> None:
    """One row per step count, one column per prompt; to TensorBoard and `samples/step_<step>.png`."""
    rows, labels = [], []
    for n in self._steps:
      rows.append(jax.device_get(self._run(params, self._m.vae_params, self._noise, self._context, self._uncond, n)))
      labels += [f"{self._label}-{n}: {p}" for p in self._prompts]
    grid = metrics_lib.image_grid(np.concatenate(rows), ncols=len(self._prompts), labels=labels)
    writer.write_images(step, {"samples": grid})
    if writer.enabled:
      path = storage.join(workdir, "samples", f"step_{step:07d}.png")
      metrics_lib.save_png(grid, path)
      logging.info("Samples of step %d written to %s", step, path)
