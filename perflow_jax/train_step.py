"""One training step as pure functions: latents -> window -> teacher solve -> target -> student update -> EMA.

Everything that depends on config strings (objective, guidance mode, solver, batch format) is resolved here,
when the step is *built*; the traced step itself has no string branches, and one run compiles one program.

Batch formats (normalised by perflow_jax.data, so the step sees one structure per run):
  images: {'images': [B, H, W, 3] float32 in [-1, 1], 'input_ids': [B, 77] int32
           [, 'input_ids_2': [B, 77] int32 (SDXL's second tokenizer)]}
  cache:  {'latent_mean', 'latent_logvar': [B, h, w, c], 'context': [B, 77, D]}  (SD1/SD2 only)

The text context is a pytree (`perflow_jax.conditioning`): [B, 77, D] for SD1/SD2, for SDXL the dict
{'hidden' [B, 77, D1+D2], 'text_embeds' [B, P], 'time_ids' [B, 6]}.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from perflow_jax import conditioning
from perflow_jax import flow
from perflow_jax.models.vae import sample_latents

Params = Any
Batch = Mapping[str, jax.Array]
# (frozen, batch, key) -> (x0 latents [B, h, w, c], context: [B, L, D] or the SDXL dict)
EncodeFn = Callable[[Mapping[str, Any], Batch, jax.Array], tuple[jax.Array, Any]]


@flax.struct.dataclass
class TrainState:
  """The student, its optimizer state and the step count (the checkpoint's 'state' item; EMA is its own item)."""
  step: jax.Array
  params: Params
  opt_state: Any


# ----------------------------------------------------------------------------------------------------- optimizer


def learning_rate_schedule(optim_config: Any) -> optax.Schedule:
  """Linear warmup from 0 over `warmup_steps`, then constant `learning_rate`.

  The reference's `--lr_warmup_steps` had no effect (diffusers' constant schedule ignores it); here a non-zero
  warmup really applies, and `warmup_steps=0` reproduces the reference exactly.
  """
  lr, warmup = float(optim_config.learning_rate), int(optim_config.warmup_steps)
  if warmup <= 0:
    return optax.constant_schedule(lr)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])


def make_optimizer(optim_config: Any) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW (torch's defaults for betas and eps; decoupled weight decay)."""
  return optax.chain(
      optax.clip_by_global_norm(float(optim_config.grad_clip)),
      optax.adamw(learning_rate_schedule(optim_config), b1=float(optim_config.b1), b2=float(optim_config.b2),
                  eps=float(optim_config.eps), weight_decay=float(optim_config.weight_decay)),
  )


def ema_decay(num_updates: jax.Array, max_decay: float) -> jax.Array:
  """diffusers EMAModel's decay for its `num_updates`-th update (1-based): 0, then (1+s)/(10+s) capped.

  With s = num_updates - 1, the first update copies the parameters (decay 0), and the decay then rises as
  (1 + s) / (10 + s) towards `max_decay` (0.9999 in both recipes; ~0.9978 at 4k steps).
  """
  s = jnp.asarray(num_updates, jnp.float32) - 1.0
  warm = jnp.minimum((1.0 + s) / (10.0 + s), max_decay)
  return jnp.where(s <= 0, 0.0, warm)


def ema_update(ema_params: Params, params: Params, decay: jax.Array) -> Params:
  """ema <- decay * ema + (1 - decay) * params, leaf by leaf, in the EMA's dtype."""
  return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p.astype(e.dtype)).astype(e.dtype),
                      ema_params, params)


# ------------------------------------------------------------------------------------------------------ encoding


def make_encode_fn(vae: Any, text_encoder: Any, scaling_factor: float, from_cache: bool, *,
                   text_encoder_2: Any = None, time_ids: Any = None) -> EncodeFn:
  """Latents x0 (sampled from the VAE posterior, as the reference) and text context for a batch.

  `frozen` holds 'vae' and 'text' (SDXL: also 'text_2') params for image batches; a latent-cache batch already
  holds the VAE moments and the text context, so neither model runs.

  Args:
    vae, text_encoder: the frozen modules.
    scaling_factor: the VAE's latent scale (0.18215 SD1/SD2, 0.13025 SDXL).
    from_cache: batches come from a latent cache (SD1/SD2 only).
    text_encoder_2: SDXL's second encoder (with projection); the batch then also holds 'input_ids_2'.
    time_ids: SDXL: the fixed micro-conditioning [6] (`conditioning.micro_conditioning`).
  """
  if from_cache:
    if text_encoder_2 is not None:
      raise ValueError("config.data.source='cache' holds one text encoder's context (SD1.x / SD2.x); an SDXL model "
                       "also needs the pooled embedding, which the cache does not store: train SDXL from images "
                       "(config.data.source='tfds' or 'procedural').")
    def encode_cached(frozen, batch, key):
      del frozen
      x0 = sample_latents(key, batch["latent_mean"], batch["latent_logvar"], scaling_factor)
      return x0, batch["context"]
    return encode_cached
  if text_encoder_2 is not None and time_ids is None:
    raise ValueError("an SDXL encode_fn needs time_ids (conditioning.micro_conditioning(resolution)).")
  fixed_ids = None if time_ids is None else np.asarray(time_ids, np.float32)

  def encode_images(frozen, batch, key):
    mean, logvar = vae.apply({"params": frozen["vae"]}, batch["images"], method=vae.encode)
    x0 = sample_latents(key, mean, logvar, scaling_factor)
    if text_encoder_2 is None:
      context = conditioning.encode_ids(text_encoder, frozen["text"], batch["input_ids"])
    else:
      context = conditioning.encode_ids(text_encoder, frozen["text"], batch["input_ids"],
                                        text_encoder_2=text_encoder_2, text_params_2=frozen["text_2"],
                                        input_ids_2=batch["input_ids_2"], time_ids=fixed_ids)
    return jax.lax.stop_gradient(x0), jax.lax.stop_gradient(context)
  return encode_images


def training_unet(unet: Any, model_config: Any) -> Any:
  """The UNet module the step runs (student and teacher alike): `unet` with config.model's remat and attention.

  Both options change only how the step executes, never the parameter tree, so the same params apply.
  """
  return unet.clone(remat=bool(model_config.remat), attention_impl=str(model_config.attention),
                    attention_query_chunk=int(model_config.attention_query_chunk))


# --------------------------------------------------------------------------------------------------- objectives
#
# An objective is two functions: `prepare(frozen, x0, context, key) -> inputs` does everything that needs no
# gradient (for PeRFlow: the window, the noised start, the teacher's window solve, the target), and
# `loss(params, inputs) -> scalar` is the only part differentiated. So the teacher never enters autodiff.


class Objective(NamedTuple):
  prepare: Callable[[Mapping[str, Any], jax.Array, jax.Array, jax.Array], dict]
  loss: Callable[[Params, dict], jax.Array]


TEACHER_SOLVE_SCOPE = "teacher_solve"


def make_perflow_objective(config: Any, unet: Any, teacher_prediction_type: str) -> Objective:
  """The PeRFlow objective of reference section 3.4, closed over the recipe in `config.perflow`."""
  pf = config.perflow
  ac = jnp.asarray(flow.sd_alphas_cumprod(), jnp.float32)
  windows = flow.TimeWindows(int(pf.num_windows))

  def make_eps_fn(teacher_fn, context, dropped, empty):
    if pf.teacher_guidance == "guided":  # SDXL recipe: full prompt vs "", scale w, one batched call
      return flow.guided_eps_fn(teacher_fn, context, ac, mode="guided",
                                guidance_scale=float(pf.teacher_guidance_scale), uncond_context=empty,
                                prediction_type=teacher_prediction_type)
    # cfg_sync (SD1.5 recipe): the teacher sees exactly the student's (dropped) prompt, unguided.
    return flow.guided_eps_fn(teacher_fn, dropped, ac, mode="cfg_sync", prediction_type=teacher_prediction_type)

  def prepare(frozen, x0, context, key):
    k_t, k_noise, k_drop = jax.random.split(key, 3)
    t = windows.sample_t(k_t, x0.shape[0], grid=int(pf.t_grid))
    t_start, t_end = windows.bounds(t)
    noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
    z_start = flow.add_noise(x0, noise, t_start, ac)
    if pf.zero_snr:
      z_start = flow.zero_snr_start(z_start, noise, t_start)
    # SDXL: hidden states and pooled embedding of an example are dropped together; time ids never.
    dropped = conditioning.drop_prompts(k_drop, context, frozen["empty_context"], float(pf.prompt_dropout))
    teacher_fn = lambda z, ts, c: conditioning.apply_unet(unet, frozen["teacher"], z, ts, c)
    eps_fn = make_eps_fn(teacher_fn, context, dropped, frozen["empty_context"])
    with jax.named_scope(TEACHER_SOLVE_SCOPE):  # names the solver's loop in the compiled program (hlo_stats)
      z_end = flow.window_solve(eps_fn, z_start, t_start, t_end, int(pf.solver_steps), ac, solver=pf.solver,
                                num_windows=windows.num_windows)
    return {"z_t": flow.interpolate(z_start, z_end, t, t_start, t_end), "t": t, "t_start": t_start,
            "context": dropped,
            "target": flow.perflow_target(z_start, z_end, t_start, t_end, ac, pf.prediction_type)}

  def loss(params, inputs):
    prediction = conditioning.apply_unet(unet, params, inputs["z_t"], flow.student_timestep(inputs["t"]),
                                         inputs["context"])
    return flow.perflow_loss(prediction, inputs["target"], inputs["t"], inputs["t_start"],
                             num_windows=int(pf.num_windows), weighting=pf.weighting, distance=pf.distance)

  return Objective(prepare, loss)


def make_diffusion_objective(config: Any, unet: Any, teacher_prediction_type: str) -> Objective:
  """The standard diffusion objective (teacher pretraining / fine-tuning), prompt dropout for CFG."""
  del teacher_prediction_type  # the model trains on config.diffusion.prediction_type
  ac = jnp.asarray(flow.sd_alphas_cumprod(), jnp.float32)
  prediction_type = config.diffusion.prediction_type

  def prepare(frozen, x0, context, key):
    k_drop, k_loss = jax.random.split(key)
    dropped = conditioning.drop_prompts(k_drop, context, frozen["empty_context"],
                                        float(config.diffusion.prompt_dropout))
    return {"x0": x0, "context": dropped, "key": k_loss}

  def loss(params, inputs):
    model_fn = lambda z, ts, c: conditioning.apply_unet(unet, params, z, ts, c)
    return flow.diffusion_loss(model_fn, inputs["key"], inputs["x0"], inputs["context"], ac, prediction_type)

  return Objective(prepare, loss)


OBJECTIVES = {"perflow": make_perflow_objective, "diffusion": make_diffusion_objective}


# ---------------------------------------------------------------------------------------------------- the step


def split_microbatches(batch: Batch, num_micro: int) -> Batch:
  """[B, ...] -> [A, B/A, ...] for gradient accumulation over A microbatches, strided: microbatch i holds
  examples i, A + i, 2A + i, ...

  The batch is sharded over ('data', 'fsdp') in contiguous blocks of B/D examples per device. A contiguous split
  (microbatch i = examples i*B/A ... (i+1)*B/A - 1) would put each microbatch on only D/A devices; XLA then
  moves examples between devices (on 8 CPU devices with A = 4 it all-gathered the whole batch onto every
  device, tests/test_train_step.py). The strided split reshapes to
  [B/A, A] (the batch axis keeps its sharding: each device's block of B/D examples holds B/(D A) whole rows
  when D A divides B) and swaps axes, so every device keeps its own examples in every microbatch. The mean
  gradient over all microbatches is the same either way; only which examples share a microbatch differs.
  """
  def split(x):
    if x.shape[0] % num_micro:
      raise ValueError(f"batch of {x.shape[0]} does not split into grad_accum_steps={num_micro} microbatches.")
    return x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:]).swapaxes(0, 1)
  return jax.tree.map(split, batch)


def make_train_step(config: Any, encode_fn: EncodeFn, objective: Objective,
                    optimizer: optax.GradientTransformation, teacher_sharding: Any = None) -> Callable:
  """step(state, ema, frozen, batch, base_key) -> (state, ema, metrics); gradients accumulate over microbatches.

  The per-step key is fold_in(base_key, step), so a resumed run draws exactly what an uninterrupted one would.
  teacher_sharding: None keeps frozen['teacher'] as it comes in; a sharding (replicated, for
  config.sharding.teacher='gather_once') constrains it once at the start of the step, so an FSDP-sharded teacher
  is all-gathered once per step instead of inside the solver's loop.
  """
  num_micro = int(config.optim.grad_accum_steps)
  max_decay = float(config.optim.ema_decay)

  def step_fn(state: TrainState, ema_params: Params, frozen: Mapping[str, Any], batch: Batch,
              base_key: jax.Array):
    if teacher_sharding is not None and "teacher" in frozen:
      frozen = {**frozen, "teacher": jax.lax.with_sharding_constraint(frozen["teacher"], teacher_sharding)}
    key = jax.random.fold_in(base_key, state.step)
    micro_keys = jax.random.split(key, num_micro)

    def loss_and_grads(mb, mkey):
      k_enc, k_loss = jax.random.split(mkey)
      x0, context = encode_fn(frozen, mb, k_enc)
      inputs = objective.prepare(frozen, x0, context, k_loss)  # constants for the gradient below
      return jax.value_and_grad(objective.loss)(state.params, inputs)

    if num_micro == 1:
      # No loop and no accumulator around a single microbatch: inside a while body XLA:CPU lowers the UNet's
      # conv weight gradients to its generic convolution loop (6.8 s of the 14.0 s bench step), and the zero
      # accumulator costs a full pass over the gradients.
      loss, grads = loss_and_grads(batch, micro_keys[0])
    else:
      def accumulate(carry, xs):
        grad_sum, loss_sum = carry
        loss, grads = loss_and_grads(*xs)
        return (jax.tree.map(lambda a, g: a + g.astype(a.dtype), grad_sum, grads), loss_sum + loss), None

      carry = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros((), jnp.float32))
      (grad_sum, loss_sum), _ = jax.lax.scan(accumulate, carry, (split_microbatches(batch, num_micro), micro_keys))
      grads = jax.tree.map(lambda g: g / num_micro, grad_sum)
      loss = loss_sum / num_micro
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    step = state.step + 1
    ema_params = ema_update(ema_params, params, ema_decay(step, max_decay))
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
               "lr": learning_rate_schedule(config.optim)(state.step)}
    return TrainState(step=step, params=params, opt_state=opt_state), ema_params, metrics

  return step_fn


def init_train_state(params: Params, optimizer: optax.GradientTransformation) -> tuple[TrainState, Params]:
  """Student params (the teacher's copy or a random init) -> (a fresh TrainState, EMA params equal to them)."""
  # A real copy: the step donates both, and one buffer may not be donated twice.
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))
  return state, jax.tree.map(jnp.copy, params)
