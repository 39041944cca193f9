r"""Compares samplers of a PeRFlow run (or a pretrained model + delta) on the same prompts and the same noise.

  python -m perflow_jax.evaluate --workdir=/tmp/perflow_demo --out=/tmp/perflow_demo/eval \
      --samplers=ddim-50,ddim-4,perflow-4,perflow-8 --reference=ddim-50 \
      --features=classifier:assets/demo/classifier --prompts=procedural:256
  python -m perflow_jax.evaluate --pretrained=SD15_DIR --delta=delta.safetensors --prompts_file=prompts.txt \
      --features=inception:/path/to/pt_inception-2015-12-05-6726825d.pth --real=/path/to/real_images.npz

A sampler is 'ddim-N' (the teacher's deterministic DDIM) or 'perflow-N' (the PeRFlow student, N >= K). Image i
starts from the same noise under every sampler, so the metrics compare image for image:
  - teacher fidelity: per-image RMSE and PSNR (images in [0, 1]) against the reference sampler's image (the
    teacher's many-step result), averaged;
  - Fréchet distance between the sampler's images and the real images (`--real`: for procedural prompts the
    procedural images of the same captions; a .npz of uint8 `images` or a folder of images otherwise; '' compares
    with the reference sampler's images) over the features of `--features` (the demo's classifier, or the FID
    Inception weights as a file: nothing is downloaded);
  - prompt faithfulness (procedural prompts with the classifier): the fraction of images whose shape, colour
    (and both) the classifier recovers from the caption's labels.

Writes `eval.json`, `eval.md` (a Markdown table), `grid.png` (one row per sampler, the first prompts as columns)
and `grid_<sampler>.png` per sampler.

Exit status: 0 when written; 2 for a user error (a bad flag or sampler, a missing file, a run without a
checkpoint, a delta that does not fit the base), reported in one message without a traceback (--verbosity=1 or
PERFLOW_JAX_TRACEBACK=1 adds it; see perflow_jax.cli); anything else is a bug, with its traceback.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from typing import Any, Mapping, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from perflow_jax import cli as cli_lib
from perflow_jax import export as export_lib
from perflow_jax import metrics
from perflow_jax import storage
from perflow_jax import sample as sample_lib
from perflow_jax.data import folder as folder_lib
from perflow_jax.data import procedural
from perflow_jax.data import transforms
from perflow_jax.evaluation import features as features_lib
from perflow_jax.evaluation import frechet

_SAMPLER_RE = re.compile(r"^(ddim|perflow)-(\d+)$")
GRID_COLUMNS = 8


@dataclasses.dataclass(frozen=True)
class Prompts:
  """Evaluation prompts; `labels` ({field: [N] int}) when they are procedural captions with known attributes."""
  texts: list[str]
  labels: dict[str, np.ndarray] | None = None


def parse_sampler(spec: str) -> tuple[str, int]:
  """'ddim-50' -> ('ddim', 50); 'perflow-4' -> ('perflow', 4)."""
  match = _SAMPLER_RE.match(spec.strip().lower())
  if not match or int(match.group(2)) < 1:
    raise ValueError(f"sampler {spec!r} is not 'ddim-N' or 'perflow-N' with N >= 1 (e.g. ddim-50, perflow-4).")
  return match.group(1), int(match.group(2))


def sampler_label(spec: str) -> str:
  kind, n = parse_sampler(spec)
  return f"{'PeRFlow' if kind == 'perflow' else 'DDIM'}-{n}"


def procedural_prompts(num: int, seed: int = 20261130) -> Prompts:
  """`num` procedural captions (examples 0..num-1 of `seed`) with their label fields."""
  labels = [procedural.labels(seed, i) for i in range(num)]
  return Prompts([procedural.caption(label) for label in labels],
                 {field: np.asarray([label[field] for label in labels]) for field in procedural.LABEL_FIELDS})


def procedural_real_images(prompts: Prompts, resolution: int) -> np.ndarray:
  """The procedural images of the prompts' labels: float32 [N, R, R, 3] in [-1, 1]."""
  if prompts.labels is None:
    raise ValueError("--real=procedural needs procedural prompts (--prompts=procedural:N).")
  rows = [dict(zip(prompts.labels, values)) for values in zip(*prompts.labels.values())]
  return transforms.scale_to_unit(np.stack([procedural.draw(row, resolution) for row in rows]))


def read_real_images(path: str, resolution: int) -> np.ndarray:
  """Real images from a .npz (uint8 `images` [N,H,W,3]) or an image folder, center-cropped to `resolution`:
  float32 [N, R, R, 3] in [-1, 1]."""
  if not storage.exists(path):
    raise ValueError(f"--real={path} does not exist.")
  given, path = path, storage.local_copy(path)  # a bucket's file or folder: read from a local copy
  if path.endswith(".npz"):
    with np.load(path) as data:
      if "images" not in data:
        raise ValueError(f"--real={path} has no 'images' array (uint8 [N, H, W, 3]); it has {sorted(data)}.")
      images = np.asarray(data["images"])
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
      raise ValueError(f"--real={path}: 'images' must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}.")
    return transforms.scale_to_unit(images)
  if not os.path.isdir(path):
    raise ValueError(f"--real={given} is neither a .npz file nor an image folder.")
  images = []
  for file in folder_lib.image_files(path):
    try:
      with open(file, "rb") as f:
        image = transforms.decode_image(f.read(), resolution)
    except (OSError, ValueError) as e:  # a corrupt file is reported and skipped, not fatal
      logging.warning("--real: skipping %s (%s)", file, e)
      continue
    images.append(transforms.resize_and_crop(image, resolution, False, None))
  if not images:
    raise ValueError(f"--real={path} holds no readable images.")
  return transforms.scale_to_unit(np.stack(images))


def fidelity(images: np.ndarray, reference: np.ndarray) -> dict[str, float]:
  """Per-image RMSE and PSNR of uint8 images [N,H,W,3] against the reference's, on the [0, 1] scale, averaged.

  PSNR of identical images is capped at 100 dB so that the mean stays finite.
  """
  a = images.astype(np.float64) / 255.0
  b = reference.astype(np.float64) / 255.0
  rmse = np.sqrt(np.mean(np.square(a - b), axis=(1, 2, 3)))
  psnr = np.where(rmse > 0, 20.0 * np.log10(1.0 / np.maximum(rmse, 1e-12)), 100.0)
  return {"rmse": float(np.mean(rmse)), "psnr": float(np.mean(np.minimum(psnr, 100.0)))}


def faithfulness(predicted: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray]) -> dict[str, float]:
  """Fraction of images whose predicted shape, colour, and both, equal the prompt's."""
  shape = predicted["shape"] == labels["shape"]
  color = predicted["color"] == labels["color"]
  return {"shape": float(np.mean(shape)), "color": float(np.mean(color)), "shape_and_color": float(np.mean(shape & color))}


def evaluate(models: sample_lib.Models, samplers: Sequence[str], prompts: Prompts, *, reference: str,
             feature_net: features_lib.FeatureNet | None = None, real_images: np.ndarray | None = None,
             guidance_scale: float = 3.0, seed: int = 0, batch_size: int = 32,
             resolution: int | None = None) -> dict[str, Any]:
  """Samples every prompt with every sampler from the same noise and measures each against `reference`.

  Args:
    models: `sample.load_models(...)` (its `params` are the student's; `teacher_params` serve `ddim-N`).
    samplers: e.g. ('ddim-50', 'ddim-4', 'perflow-4', 'perflow-8'); `reference` must be one of them.
    prompts: the prompts (one image each) and, when procedural, their labels.
    feature_net: features for the Fréchet distance (and, if it can `predict`, prompt faithfulness); None skips
      both.
    real_images: [M, H, W, 3] in [-1, 1]; None measures the Fréchet distance against the reference's images.

  Returns:
    {'reference', 'num_images', 'guidance_scale', 'seed', 'features', 'samplers': {spec: metrics},
     'images': {spec: uint8 [N, H, W, 3]}}.
  """
  specs = [s.strip().lower() for s in samplers]
  reference = reference.strip().lower()
  if reference not in specs:
    raise ValueError(f"--reference={reference} must be one of --samplers={','.join(specs)}.")
  parsed = {spec: parse_sampler(spec) for spec in specs}
  if models.teacher_params is None and any(kind == "ddim" for kind, _ in parsed.values()):
    raise ValueError("ddim samplers need the teacher's params, and these models carry none.")
  images, timings = {}, {}
  for spec, (kind, n) in parsed.items():
    chosen = dataclasses.replace(models, params=models.teacher_params) if kind == "ddim" else models
    sample_lib.generate(chosen, prompts.texts[:batch_size], num_steps=n, guidance_scale=guidance_scale,
                        sampler=kind, seed=seed, resolution=resolution, batch_size=batch_size)  # compile
    t0 = time.perf_counter()
    result = sample_lib.generate(chosen, prompts.texts, num_steps=n, guidance_scale=guidance_scale, sampler=kind,
                                 seed=seed, resolution=resolution, batch_size=batch_size)
    timings[spec] = (time.perf_counter() - t0) / len(prompts.texts)
    images[spec] = result["images"]
    logging.info("%s: %d images in %.1f s", spec, len(prompts.texts), timings[spec] * len(prompts.texts))

  def as_float(x):
    return x.astype(np.float32) / 127.5 - 1.0

  stats_real = None
  if feature_net is not None:
    target = as_float(images[reference]) if real_images is None else real_images
    stats_real = frechet.feature_statistics(feature_net.features(target, batch_size))
  results = {}
  for spec in specs:
    row: dict[str, Any] = {"seconds_per_image": timings[spec], "unet_calls_per_image": _unet_calls(spec)}
    row.update(fidelity(images[spec], images[reference]))
    if feature_net is not None:
      stats = frechet.feature_statistics(feature_net.features(as_float(images[spec]), batch_size))
      row["frechet_distance"] = frechet.frechet_distance(*stats, *stats_real)
      if prompts.labels is not None and hasattr(feature_net, "predict"):
        row["faithfulness"] = faithfulness(feature_net.predict(as_float(images[spec]), batch_size), prompts.labels)
    results[spec] = row
  return {"reference": reference, "num_images": len(prompts.texts), "guidance_scale": float(guidance_scale),
          "seed": int(seed), "features": getattr(feature_net, "name", None),
          "frechet_against": "reference" if real_images is None else "real", "samplers": results, "images": images}


def _unet_calls(spec: str) -> int:
  """UNet evaluations per image: N steps, doubled by classifier-free guidance (batched cond + uncond)."""
  return 2 * parse_sampler(spec)[1]


def markdown_table(report: Mapping[str, Any]) -> str:
  """The report as a Markdown table, one row per sampler."""
  has_fd = any("frechet_distance" in r for r in report["samplers"].values())
  has_faith = any("faithfulness" in r for r in report["samplers"].values())
  head = ["sampler", f"RMSE vs {sampler_label(report['reference'])}", "PSNR (dB)"]
  head += ["Fréchet distance"] if has_fd else []
  head += ["shape ok", "colour ok", "both ok"] if has_faith else []
  head += ["s / image"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for spec, r in report["samplers"].items():
    cells = [sampler_label(spec), f"{r['rmse']:.4f}", f"{r['psnr']:.2f}"]
    cells += [f"{r['frechet_distance']:.1f}"] if has_fd else []
    if has_faith:
      f = r["faithfulness"]
      cells += [f"{f['shape']:.3f}", f"{f['color']:.3f}", f"{f['shape_and_color']:.3f}"]
    cells += [f"{r['seconds_per_image']:.4f}"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def write_report(report: Mapping[str, Any], out: str, prompts: Prompts) -> dict[str, str]:
  """eval.json, eval.md, grid.png (samplers as rows) and grid_<sampler>.png; returns {name: path}."""
  out = storage.absolute(out)
  storage.makedirs(out)
  paths = {"json": storage.join(out, "eval.json"), "markdown": storage.join(out, "eval.md"),
           "grid": storage.join(out, "grid.png")}
  storage.write_text(paths["json"], json.dumps({k: v for k, v in report.items() if k != "images"}, indent=2))
  storage.write_text(paths["markdown"], markdown_table(report))
  cols = min(GRID_COLUMNS, len(prompts.texts))
  rows, labels = [], []
  for spec, images in report["images"].items():
    rows.append(images[:cols])
    labels += [f"{sampler_label(spec)}: {p}" for p in prompts.texts[:cols]]
    per_sampler = storage.join(out, f"grid_{spec}.png")
    metrics.save_png(metrics.image_grid(images[:64], ncols=8), per_sampler)
    paths[f"grid_{spec}"] = per_sampler
  metrics.save_png(metrics.image_grid(np.concatenate(rows), ncols=cols, labels=labels), paths["grid"])
  return paths


def read_eval_prompts(spec: str | None, prompts_file: str | None) -> Prompts:
  """--prompts=procedural:N, or --prompts_file (one prompt per line; no labels)."""
  if prompts_file:
    return Prompts(sample_lib.read_prompts(None, prompts_file))
  kind, _, num = (spec or "").partition(":")
  if kind != "procedural" or not num.isdigit() or int(num) < 1:
    raise ValueError(f"--prompts={spec!r} must be 'procedural:N' (N >= 1), or give --prompts_file.")
  return procedural_prompts(int(num))


def define_flags(fv: flags.FlagValues) -> None:
  """The CLI's flags, defined on `fv` (only when run as a script, or on a fresh FlagValues by `cli`)."""
  def string(name, default, help_text):
    flags.DEFINE_string(name, default, help_text, flag_values=fv)

  string("workdir", None, "A training run's directory (student: its EMA weights; ddim: its teacher).")
  string("pretrained", None, "A diffusers folder, single-file checkpoint or converted dir (the teacher).")
  string("delta", None, "PeRFlow delta weights merged into --pretrained for the perflow samplers: a .safetensors "
         "file or a UNet folder (the released layout).")
  string("delta_variant", None, "A --delta folder's weights variant, e.g. v0-1 (default: its plain or only file).")
  flags.DEFINE_bool("keep_mismatched", False, "Keep base weights for keys the delta does not fit.", flag_values=fv)
  string("tokenizer", None, "Tokenizer folder for single-file --pretrained checkpoints.")
  flags.DEFINE_list("samplers", ["ddim-50", "ddim-4", "perflow-4", "perflow-8"], "Samplers to compare.",
                    flag_values=fv)
  string("reference", "ddim-50", "The sampler the others are measured against (the teacher's many-step).")
  string("prompts", "procedural:256", "'procedural:N': N procedural captions with known labels.")
  string("prompts_file", None, "A text file with one prompt per line (instead of --prompts).")
  string("features", None, "Feature net for the Fréchet distance: 'classifier:DIR' or 'inception:FILE'.")
  string("real", "procedural", "Real images for the Fréchet distance: 'procedural', a .npz (uint8 'images') or a "
         "folder; '' compares with the reference sampler's images.")
  flags.DEFINE_float("guidance_scale", 3.0, "Classifier-free guidance scale of every sampler.", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Noise seed; image i uses fold_in(key(seed), i) under every sampler.",
                       flag_values=fv)
  flags.DEFINE_integer("batch_size", 32, "Images per compiled call.", flag_values=fv)
  flags.DEFINE_integer("resolution", None, "Image side (default: the run's / model's).", flag_values=fv)
  string("out", "eval", "Output folder.")


def run_evaluation(models: sample_lib.Models, out: str, *, samplers: Sequence[str], reference: str,
                   prompts: str | None = "procedural:256", prompts_file: str | None = None,
                   features: str | None = None, real: str | None = "procedural", guidance_scale: float = 3.0,
                   seed: int = 0, batch_size: int = 32, resolution: int | None = None) -> dict[str, Any]:
  """Reads the prompts, feature net and real images named by the arguments (as the flags name them), evaluates
  and writes the report to `out` (process 0). Used by the CLI and by the trainer's end-of-run evaluation."""
  eval_prompts = read_eval_prompts(prompts, prompts_file)
  feature_net = features_lib.load_feature_net(features) if features else None
  resolution = int(resolution or models.resolution)
  real_images = None
  if feature_net is not None and real:
    real_images = (procedural_real_images(eval_prompts, resolution) if real == "procedural"
                   else read_real_images(real, resolution))
  report = evaluate(models, samplers, eval_prompts, reference=reference, feature_net=feature_net,
                    real_images=real_images, guidance_scale=guidance_scale, seed=seed, batch_size=batch_size,
                    resolution=resolution)
  if jax.process_index() == 0:
    write_report(report, out, eval_prompts)
  return report


def run_flags(fv: flags.FlagValues) -> dict[str, Any]:
  if fv.workdir:  # before any model is loaded
    export_lib.check_run_checkpoint(fv.workdir, "train it until it saves one (every config.checkpoint_every "
                                    "steps): the perflow samplers evaluate its EMA weights.")
  models = sample_lib.load_models(fv.workdir, fv.pretrained, fv.delta, "ema", fv.keep_mismatched,
                                  tokenizer=fv.tokenizer, delta_variant=fv.delta_variant)
  return run_evaluation(models, fv.out, samplers=fv.samplers, reference=fv.reference, prompts=fv.prompts,
                        prompts_file=fv.prompts_file, features=fv.features, real=fv.real,
                        guidance_scale=fv.guidance_scale, seed=fv.seed, batch_size=fv.batch_size,
                        resolution=fv.resolution)


def cli(argv: Sequence[str]) -> dict[str, Any]:
  """The CLI in-process: argv as on the command line (argv[0] is the program name)."""
  fv = flags.FlagValues()
  define_flags(fv)
  fv(list(argv))
  return run_flags(fv)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  report = run_flags(flags.FLAGS)
  print(markdown_table(report))
  print(f"wrote {storage.join(flags.FLAGS.out, 'eval.json')}")


if __name__ == "__main__":
  define_flags(flags.FLAGS)
  cli_lib.run(main, output_flags=("out",))
