r"""Samples images from a PeRFlow run or a pretrained model (plus optional delta weights), in JAX.

  python -m perflow_jax.sample --workdir=DIR --prompt="a red circle" --num_steps=4 --guidance_scale=4.5 \
      --out=samples/ [--npz=samples.npz] [--sampler=perflow|ddim] [--weights=ema|student|teacher]
  python -m perflow_jax.sample --pretrained=SD15_DIR_OR_FILE --delta=delta_weights.safetensors \
      --prompts_file=prompts.txt --num_steps=8 --guidance_scale=7.5 --out=samples/

SDXL runs and folders work the same way: both text encoders condition the UNet (perflow_jax.conditioning), with
time ids (S, S, 0, 0, S, S) for images of side S unless the run fixed `model.time_ids`.

Samplers: `perflow` (PeRFlowScheduler, N >= K steps) and `ddim` (the teacher's deterministic DDIM, any N, SD's
'leading' spacing with steps_offset 1). Image i (prompt i // num_images) starts from the noise of
fold_in(key(seed), i) whatever the batch size, so samplers and step counts compare image for image. The whole
loop (CFG batched: uncond and cond in one UNet call) and the VAE decode are one jit-compiled program per
(sampler, N, guidance scale).

Writes out/NNNN.png per image, out/grid.png (labelled "sampler-N: prompt") and, with --npz, `images` uint8
[M, H, W, 3], `latents` float32 [M, h, w, c] and `prompts`.

Exit status: 0 when written; 2 for a user error (a bad flag, a missing file, a run without a checkpoint, a delta
that does not fit the base), reported in one message without a traceback (--verbosity=1 or PERFLOW_JAX_TRACEBACK=1
adds it; see perflow_jax.cli); anything else is a bug, with its traceback.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from perflow_jax import cli as cli_lib
from perflow_jax import conditioning
from perflow_jax import config_lib
from perflow_jax import export as export_lib
from perflow_jax import metrics
from perflow_jax import sampling
from perflow_jax import storage
from perflow_jax.flow import losses
from perflow_jax.weights import export as wexport
from perflow_jax.weights import pretrained as pretrained_lib

SAMPLERS = ("perflow", "ddim")


@dataclasses.dataclass(frozen=True)
class Models:
  """Everything sampling needs: modules, the chosen UNet params and how to read the UNet's output."""
  unet: Any
  params: Any
  vae: Any
  vae_params: Any
  text_encoder: Any
  text_params: Any
  tokenizer: Any
  scaling_factor: float
  teacher_prediction_type: str  # 'epsilon' | 'v_prediction': how ddim reads the output
  prediction_type: str  # the PeRFlow student's: 'diff_eps' | 'ddim_eps' | 'velocity'
  num_windows: int
  resolution: int  # default image side
  # SDXL: the second text encoder, its params and tokenizer, and the run's fixed time ids (None: derived from the
  # sampled side as (R, R, 0, 0, R, R), diffusers' default for a square image without crop).
  text_encoder_2: Any = None
  text_params_2: Any = None
  tokenizer_2: Any = None
  time_ids: tuple[float, ...] | None = None
  teacher_params: Any = None  # the teacher UNet's params (what `ddim` samples in an evaluation)

  def encode_prompts(self, prompts: Sequence[str], side: int) -> Any:
    """Prompts -> context [N, 77, D] (SD1/SD2) or the SDXL dict, with time ids for images of `side` pixels."""
    if self.text_encoder_2 is None:
      return sampling.encode_prompts(self.text_encoder, self.text_params, self.tokenizer, list(prompts))
    return sampling.encode_prompts(self.text_encoder, self.text_params, self.tokenizer, list(prompts),
                                   text_encoder_2=self.text_encoder_2, text_params_2=self.text_params_2,
                                   tokenizer_2=self.tokenizer_2,
                                   time_ids=conditioning.micro_conditioning(side, self.time_ids or ()))


def _vae_factor(vae: Any) -> int:
  return 2 ** (len(vae.config.block_out_channels) - 1)


def load_models(workdir: str | None = None, pretrained: str | None = None, delta: str | None = None,
                weights: str = "ema", keep_mismatched: bool = False, tokenizer: str | None = None,
                prediction_type: str | None = None, num_windows: int | None = None,
                config_path: str | None = None, delta_variant: str | None = None) -> Models:
  """The models of a run (`workdir`, with EMA/student/teacher weights) or of a pretrained model plus a delta.

  Args:
    workdir: a training run's directory; or
    pretrained: a diffusers folder, single-file checkpoint or converted directory (`weights.load_pretrained`).
    delta: PeRFlow delta weights (diffusers UNet names) merged into the pretrained UNet unless weights='teacher':
      a .safetensors file or a UNet folder in the released layout (see weights.export.delta_weights_file).
    weights: 'ema' | 'student' | 'teacher' (pretrained: 'teacher' is the base without the delta).
    keep_mismatched: keep the base weight where the delta's keys or shapes do not match (else an error).
    tokenizer: pretrained single files: the tokenizer folder.
    config_path: pretrained single files: a diffusers folder whose configs describe the model (default: the
      published configs of the detected SD family).
    delta_variant: a delta folder's weights variant (e.g. 'v0-1'; default: its plain or only weights file).
    prediction_type, num_windows: the PeRFlow student's (default: the run's config, the delta's metadata, or
      'diff_eps' and 4).
  """
  if (workdir is None) == (pretrained is None):
    raise ValueError("give exactly one of --workdir (a training run) and --pretrained (a model folder or file).")
  if workdir is not None:
    if delta is not None:
      raise ValueError("--delta merges into --pretrained; a --workdir run already has its student weights.")
    run = export_lib.load_run(workdir, weights)
    m, pf = run.models, run.config.perflow
    return Models(m.unet, run.params, m.vae, m.vae_params, m.text_encoder, m.text_params, m.tokenizer,
                  m.scaling_factor, m.teacher_prediction_type, prediction_type or str(pf.prediction_type),
                  int(num_windows or pf.num_windows), int(run.config.data.resolution), m.text_encoder_2,
                  m.text_params_2, m.tokenizer_2, tuple(run.config.model.get("time_ids", ())) or None,
                  teacher_params=m.unet_params)
  bundle = pretrained_lib.load_pretrained(pretrained, jnp.float32, tokenizer_path=tokenizer,
                                          config_path=config_path)
  params = bundle.unet_params
  meta = wexport.delta_metadata(delta, delta_variant) if delta else {}
  if delta and weights != "teacher":
    base = wexport.export_unet_state_dict(params)
    merged, kept = wexport.merge_delta(base, wexport.read_delta(delta, delta_variant), keep_mismatched,
                                       delta_name=f"the delta {delta}", base_name=f"the UNet of {pretrained}")
    if kept:
      logging.warning("Kept the base weights of %d UNet tensor(s) the delta does not fit: %s", len(kept),
                      ", ".join(kept[:20]))
    params = pretrained_lib.place(wexport.params_from_state_dict("unet", bundle.unet, merged), jnp.float32)
  sample_size = bundle.config["unet"].get("sample_size", 64)
  side = sample_size if isinstance(sample_size, int) else sample_size[0]
  return Models(bundle.unet, params, bundle.vae, bundle.vae_params, bundle.text_encoder, bundle.text_params,
                bundle.tokenizer, float(bundle.config["vae"].get("scaling_factor", 0.18215)),
                bundle.config["prediction_type"], prediction_type or meta.get("prediction_type", "diff_eps"),
                int(num_windows or meta.get("num_windows", 4)), int(side) * _vae_factor(bundle.vae),
                bundle.text_encoder_2, bundle.text_params_2, bundle.tokenizer_2, teacher_params=bundle.unet_params)


def image_noise(seed: int, indices: Sequence[int], shape: tuple[int, int, int]) -> np.ndarray:
  """[len(indices), h, w, c] float32 N(0, I): image i's noise is normal(fold_in(key(seed), i)), batch-free."""
  key = jax.random.key(int(seed))
  draw = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32))
  return np.asarray(draw(jnp.asarray(list(indices), jnp.uint32)))


def make_sample_fn(models: Models, sampler: str, num_steps: int, guidance_scale: float) -> Any:
  """jit((params, vae_params, noise [B,h,w,c], context, uncond) -> (latents, images [-1,1])).

  context: [B,L,D] (SDXL: the dict of `conditioning`); uncond: the same structure with leading dim 1.
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"--sampler={sampler!r} is not one of {SAMPLERS}.")
  if sampler == "perflow":
    if models.prediction_type not in losses.PREDICTION_TYPES:
      raise ValueError(f"prediction_type={models.prediction_type!r} is not one of {losses.PREDICTION_TYPES}.")
    if num_steps < models.num_windows:
      raise ValueError(f"--num_steps={num_steps} is fewer than the {models.num_windows} PeRFlow windows: each "
                       f"window needs at least one step, so pass --num_steps >= {models.num_windows} (or "
                       "--sampler=ddim for the teacher).")
  w = float(guidance_scale)

  def run(params, vae_params, noise, context, uncond):
    if sampler == "perflow":
      z = sampling.perflow_sample(models.unet, params, noise, context, uncond, num_steps, w, models.num_windows,
                                  models.prediction_type)
    else:
      z = sampling.ddim_sample(models.unet, params, noise, context, uncond, num_steps, w,
                               models.teacher_prediction_type)
    return z, sampling.decode_latents(models.vae, vae_params, z, models.scaling_factor)

  return jax.jit(run)


def generate(models: Models, prompts: Sequence[str], *, negative_prompt: str = "", num_steps: int = 4,
             guidance_scale: float = 4.5, sampler: str = "perflow", seed: int = 0, num_images: int = 1,
             resolution: int | None = None, batch_size: int = 4) -> dict[str, Any]:
  """Samples num_images images per prompt.

  Returns:
    {'images': uint8 [M,H,W,3], 'latents': float32 [M,h,w,c], 'prompts': [M] str, 'noise': float32 [M,h,w,c]}
    with M = len(prompts) * num_images, prompt-major.
  """
  if not prompts:
    raise ValueError("no prompts: pass --prompt (repeatable) or --prompts_file.")
  if num_images < 1 or batch_size < 1:
    raise ValueError(f"--num_images={num_images} and --batch_size={batch_size} must be >= 1.")
  side = int(resolution or models.resolution)
  multiple = _vae_factor(models.vae) * 2 ** (len(models.unet.config.block_out_channels) - 1)
  if side % multiple:
    raise ValueError(f"--resolution={side} must be a multiple of {multiple} (VAE and UNet downsampling).")
  h = side // _vae_factor(models.vae)
  fn = make_sample_fn(models, sampler, num_steps, guidance_scale)
  all_prompts = [p for p in prompts for _ in range(num_images)]
  # The negative is the encoded `negative_prompt` ("" by default), as PeRFlow's training uses for SDXL too;
  # diffusers' SDXL pipeline instead zeroes it when no negative prompt is given (force_zeros_for_empty_prompt).
  uncond = models.encode_prompts([negative_prompt], side)
  latents, images, noises = [], [], []
  for start in range(0, len(all_prompts), batch_size):
    chunk = all_prompts[start:start + batch_size]
    # Pad the last batch with repeats so one compiled program serves every batch.
    padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
    idx = list(range(start, start + len(chunk))) + [start + len(chunk) - 1] * (batch_size - len(chunk))
    noise = image_noise(seed, idx, (h, h, models.unet.config.in_channels))
    context = models.encode_prompts(padded, side)
    z, x = jax.device_get(fn(models.params, models.vae_params, noise, context, uncond))
    latents.append(np.asarray(z)[:len(chunk)])
    images.append(metrics.to_uint8(np.asarray(x)[:len(chunk)]))
    noises.append(noise[:len(chunk)])
  return {"images": np.concatenate(images), "latents": np.concatenate(latents).astype(np.float32),
          "prompts": all_prompts, "noise": np.concatenate(noises)}


def write_outputs(result: dict[str, Any], out: str, label: str, npz: str | None = None,
                  num_images: int = 1) -> list[str]:
  """PNG per image, a labelled grid (one row per prompt) and optionally the npz (local paths or URLs); returns the
  written paths."""
  out = storage.absolute(out)
  storage.makedirs(out)
  paths = []
  for i, image in enumerate(result["images"]):
    path = storage.join(out, f"{i:04d}.png")
    metrics.save_png(image, path)
    paths.append(path)
  grid = metrics.image_grid(result["images"], ncols=num_images,
                            labels=[f"{label}: {p}" for p in result["prompts"]])
  paths.append(storage.join(out, "grid.png"))
  metrics.save_png(grid, paths[-1])
  if npz:
    with storage.atomic_write(npz, "wb") as f:
      np.savez(f, images=result["images"], latents=result["latents"], prompts=np.asarray(result["prompts"]))
    paths.append(npz)
  return paths


def read_prompts(prompts: Sequence[str] | None, prompts_file: str | None) -> list[str]:
  """--prompt values, or the non-empty lines of --prompts_file (not both)."""
  if prompts and prompts_file:
    raise ValueError("give --prompt or --prompts_file, not both.")
  if prompts_file:
    if not storage.isfile(prompts_file):
      raise ValueError(f"--prompts_file={prompts_file} does not exist.")
    prompts = [line.strip() for line in storage.read_text(prompts_file).splitlines() if line.strip()]
  if not prompts:
    raise ValueError("no prompts: pass --prompt (repeatable) or a non-empty --prompts_file.")
  return list(prompts)


def define_flags(fv: flags.FlagValues) -> None:
  """The CLI's flags, defined on `fv` (only when run as a script, or on a fresh FlagValues by `cli`)."""
  def string(name, default, help_text):
    flags.DEFINE_string(name, default, help_text, flag_values=fv)

  string("workdir", None, "A training run's directory (its EMA, student or teacher weights).")
  string("pretrained", None, "A diffusers folder, single-file checkpoint or converted dir.")
  string("delta", None, "PeRFlow delta weights to merge into --pretrained: a .safetensors file or a UNet folder "
         "(the released layout).")
  string("delta_variant", None, "A --delta folder's weights variant, e.g. v0-1 (default: its plain or only file).")
  flags.DEFINE_bool("keep_mismatched", False, "Keep base weights for keys the delta does not fit.", flag_values=fv)
  string("tokenizer", None, "Tokenizer folder for single-file --pretrained checkpoints.")
  string("config_path", None, "Single-file --pretrained: a diffusers folder with the model's configs.")
  flags.DEFINE_multi_string("prompt", None, "A prompt (repeatable).", flag_values=fv)
  string("prompts_file", None, "A text file with one prompt per line.")
  string("negative_prompt", "", "Negative prompt (the unconditional branch of CFG).")
  flags.DEFINE_integer("num_steps", 4, "Sampling steps N (perflow: N >= num_windows).", flag_values=fv)
  flags.DEFINE_float("guidance_scale", 4.5, "Classifier-free guidance scale w (1 = no guidance).", flag_values=fv)
  flags.DEFINE_enum("sampler", "perflow", list(SAMPLERS), "perflow (the student) or ddim (the teacher).",
                    flag_values=fv)
  flags.DEFINE_enum("weights", None, list(export_lib.WEIGHTS),
                    "UNet weights (default: ema for perflow, teacher for ddim).", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Noise seed; image i uses fold_in(key(seed), i).", flag_values=fv)
  flags.DEFINE_integer("num_images", 1, "Images per prompt.", flag_values=fv)
  string("out", "samples", "Output folder for the PNGs and grid.png.")
  string("npz", None, "Optional .npz of the uint8 images (and latents, prompts).")
  flags.DEFINE_integer("resolution", None, "Image side (default: the run's / model's).", flag_values=fv)
  flags.DEFINE_integer("batch_size", 4, "Images per compiled call.", flag_values=fv)
  flags.DEFINE_integer("num_windows", None, "PeRFlow windows K (default: the run's, or 4).", flag_values=fv)
  flags.DEFINE_enum("prediction_type", None, list(losses.PREDICTION_TYPES),
                    "The PeRFlow student's prediction type (default: the run's, the delta's, or diff_eps).",
                    flag_values=fv)
  flags.DEFINE_enum("precision", "default", ["default", "high", "highest"], "Matmul/conv precision.",
                    flag_values=fv)


def _num_windows_before_loading(fv: flags.FlagValues) -> int:
  """K as load_models will set it, read from the flags, the run's config.json or the delta's metadata."""
  if fv.num_windows:
    return int(fv.num_windows)
  if fv.workdir:
    return int(config_lib.load_config_json(fv.workdir).perflow.num_windows)
  return int(wexport.delta_metadata(fv.delta, fv.delta_variant).get("num_windows", 4)) if fv.delta else 4


def run_flags(fv: flags.FlagValues) -> dict[str, Any]:
  """Samples as the parsed flags say and writes the outputs; returns `generate`'s result."""
  prompts = read_prompts(fv.prompt, fv.prompts_file)
  weights = fv.weights or ("teacher" if fv.sampler == "ddim" else "ema")
  if fv.workdir and weights != "teacher":  # before any model is loaded
    export_lib.check_run_checkpoint(fv.workdir, "train it until it saves one (every config.checkpoint_every "
                                    "steps), or sample its teacher with --weights=teacher (--sampler=ddim does).")
  k = _num_windows_before_loading(fv) if fv.sampler == "perflow" else 0
  if fv.num_steps < k:  # refused before loading a model (make_sample_fn checks the same)
    raise ValueError(f"--num_steps={fv.num_steps} is fewer than the {k} PeRFlow windows: each window needs at "
                     f"least one step, so pass --num_steps >= {k} (or --sampler=ddim for the teacher).")
  with jax.default_matmul_precision(fv.precision):
    models = load_models(fv.workdir, fv.pretrained, fv.delta, weights, fv.keep_mismatched, fv.tokenizer,
                         fv.prediction_type, fv.num_windows, fv.config_path, fv.delta_variant)
    result = generate(models, prompts, negative_prompt=fv.negative_prompt, num_steps=fv.num_steps,
                      guidance_scale=fv.guidance_scale, sampler=fv.sampler, seed=fv.seed,
                      num_images=fv.num_images, resolution=fv.resolution, batch_size=fv.batch_size)
  label = f"{'PeRFlow' if fv.sampler == 'perflow' else 'DDIM'}-{fv.num_steps}"
  if jax.process_index() == 0:  # every process samples the same images; one writes them
    paths = write_outputs(result, fv.out, label, fv.npz, fv.num_images)
    logging.info("Wrote %d files to %s", len(paths), fv.out)
  return result


def cli(argv: Sequence[str]) -> dict[str, Any]:
  """The CLI in-process: argv as on the command line (argv[0] is the program name)."""
  fv = flags.FlagValues()
  define_flags(fv)
  fv(list(argv))
  return run_flags(fv)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  result = run_flags(flags.FLAGS)
  print(f"wrote {len(result['images'])} images and {storage.join(flags.FLAGS.out, 'grid.png')}")


if __name__ == "__main__":
  define_flags(flags.FLAGS)
  cli_lib.run(main, output_flags=("out", "npz"))
