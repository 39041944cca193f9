r"""Exports a trained PeRFlow student for PyTorch: delta weights or a merged diffusers UNet folder.

  python -m perflow_jax.export --workdir=DIR --out=delta_weights.safetensors --format=delta [--dtype=float16]
  python -m perflow_jax.export --workdir=DIR --out=delta_dir --format=delta [--variant=v0-1]
  python -m perflow_jax.export --workdir=DIR --out=unet_dir --format=unet [--dtype=float32] [--weights=student]

`delta`: dW = student - teacher for every UNet tensor, diffusers key names, float16 by default. An --out ending in
.safetensors is one file; any other --out is a UNet folder in the layout of the released PeRFlow deltas
(config.json + diffusion_pytorch_model[.VARIANT].safetensors), which their loading code reads with
`UNet2DConditionModel.from_pretrained(DIR, variant=VARIANT).state_dict()`. Merge either into any base of the
same family with `python -m perflow_jax.sample --pretrained=BASE --delta=FILE_OR_DIR` (JAX) or
`weights.export.merge_delta` (any state dict). `unet`: config.json + diffusion_pytorch_model[.VARIANT].safetensors
that `UNet2DConditionModel.from_pretrained` loads; run it with `perflow_jax.torch_scheduler.PeRFlowTorchScheduler`
(the same prediction type and windows).

`load_run` (the teacher, the student or EMA weights of a run, and its modules) is shared with the sample CLI.

Exit status: 0 when written; 2 for a user error (a bad flag, a workdir that is not a run or has no checkpoint
yet, an --out that exists, a full disk), reported in one message without a traceback (--verbosity=1 or
PERFLOW_JAX_TRACEBACK=1 adds it; see perflow_jax.cli); anything else is a bug, with its traceback.
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

from perflow_jax import checkpoint
from perflow_jax import cli as cli_lib
from perflow_jax import config_lib
from perflow_jax import storage
from perflow_jax import train_step as ts
from perflow_jax import trainer
from perflow_jax.parallel import mesh as mesh_lib
from perflow_jax.parallel import sharding as sh
from perflow_jax.weights import export as wexport
from perflow_jax.weights import io

WEIGHTS = ("ema", "student", "teacher")
FORMATS = ("delta", "unet")
DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclasses.dataclass(frozen=True)
class Run:
  """A trained run: its config, modules, teacher params and the chosen UNet weights (all sharded on `mesh`)."""
  config: Any
  models: trainer.ModelSet
  params: Any  # the chosen UNet weights (EMA, student or teacher)
  weights: str
  step: int
  mesh: jax.sharding.Mesh


def _latest_step(workdir: str) -> int:
  step = checkpoint.latest_step(workdir)  # committed steps only (a save cut short is not one)
  if step is None:
    raise ValueError(f"{workdir} has no checkpoint (nothing committed in {checkpoint.checkpoint_dir(workdir)}); pass "
                     "the workdir of a run that has saved one, or load weights='teacher'.")
  return step


def load_run(workdir: str, weights: str = "ema", step: int | None = None) -> Run:
  """Rebuilds a run's modules and teacher from its config.json and restores the chosen UNet weights.

  The mesh is ('data' 1, 'fsdp' all local devices) with the run's sharding rules, so a run trained on a pod
  loads on one host for sampling or export.

  Args:
    workdir: the run's directory (config.json, checkpoints/).
    weights: 'ema' (the EMA student, what sampling should use), 'student' (the raw trained params) or 'teacher'.
    step: checkpoint step (default: the newest).

  Raises:
    ValueError: unknown weights, a missing config.json or checkpoint.
  """
  if weights not in WEIGHTS:
    raise ValueError(f"weights={weights!r} is not one of {WEIGHTS}.")
  config = config_lib.load_config_json(workdir)
  if weights != "teacher":  # before any model is loaded: a run without a checkpoint fails in a second
    step = _latest_step(workdir) if step is None else int(step)
  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": -1})
  rules, fallback = sh.rules_from_config(config), bool(config.sharding.fallback_to_largest)
  m = trainer.load_models(config, workdir, mesh, keep_tokenizer=False)  # reading a run leaves its workdir as it is
  if weights == "teacher":
    return Run(config, m, m.unet_params, weights, 0, mesh)
  param_shardings = sh.logical_to_shardings(m.unet_abstract, mesh, rules, fallback)
  abstract_params = sh.with_shardings(m.unet_abstract, param_shardings)
  if weights == "ema":
    params = checkpoint.restore_ema_params(workdir, abstract_params, step)
  else:
    optimizer = ts.make_optimizer(config.optim)
    plain = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32), sh.unbox(m.unet_abstract))
    opt_shardings = sh.logical_to_shardings(jax.eval_shape(optimizer.init, m.unet_abstract), mesh, rules, fallback)
    shardings = ts.TrainState(step=sh.replicated(mesh), params=param_shardings, opt_state=opt_shardings)
    abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  jax.eval_shape(lambda p: ts.init_train_state(p, optimizer)[0], plain), shardings)
    params = _restore_state(workdir, abstract_state, step).params
  return Run(config, m, params, weights, step, mesh)


def _restore_state(workdir: str, abstract_state: Any, step: int) -> Any:
  """The 'state' item (TrainState) of checkpoint `step`."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  manager = ocp.CheckpointManager(checkpoint.checkpoint_dir(workdir),
                                  options=checkpoint.read_only_options(), item_names=checkpoint.ITEMS)
  try:
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))["state"]
  finally:
    manager.close()
  checkpoint.verify_weights(workdir, step, "state", state)
  return state


def check_run_checkpoint(workdir: str, hint: str) -> None:
  """Fails in a second, before any model is loaded, when `workdir` is not a run (no config.json) or has not saved
  a checkpoint yet. `hint` is the calling tool's advice for the latter (what each CLI can offer differs: sample can
  fall back on the teacher, export cannot).

  Raises:
    ValueError naming the workdir and the fix.
  """
  config_lib.load_config_json(workdir)  # raises when there is no config.json
  if checkpoint.latest_step(workdir) is None:
    raise ValueError(f"--workdir={workdir} has no checkpoint yet (nothing committed in "
                     f"{checkpoint.checkpoint_dir(workdir)}): {hint}")


def export_run(workdir: str, out: str, fmt: str = "delta", dtype: str | None = None, weights: str = "ema",
               variant: str | None = None) -> str:
  """Writes a run's student as delta weights (a .safetensors file or a UNet folder) or a merged UNet folder.

  Args:
    workdir: the run.
    out: delta: a .safetensors path, or a folder for the released layout; unet: a folder. A folder must not exist
      or be empty.
    fmt: 'delta' | 'unet'.
    dtype: 'float16' | 'float32' (default: float16 for delta, float32 for unet).
    weights: 'ema' | 'student'.
    variant: folders only: the weights file becomes diffusion_pytorch_model.<variant>.safetensors.

  Returns:
    out.
  """
  if fmt not in FORMATS:
    raise ValueError(f"--format={fmt!r} is not one of {FORMATS}.")
  if weights not in ("ema", "student"):
    raise ValueError(f"--weights={weights!r}: export takes 'ema' or 'student' (the teacher has no delta).")
  dtype = dtype or ("float16" if fmt == "delta" else "float32")
  if dtype not in DTYPES:
    raise ValueError(f"--dtype={dtype!r} is not one of {tuple(DTYPES)}.")
  if out.lower().endswith((".bin", ".pt", ".pth", ".ckpt")):
    raise ValueError(f"--out={out}: export writes safetensors, not pickles; give a path ending in .safetensors "
                     "(delta, one file) or a folder name (the released UNet-folder layout).")
  single_file = fmt == "delta" and out.endswith(io.SAFETENSORS_SUFFIX)
  if fmt == "unet" and out.endswith(io.SAFETENSORS_SUFFIX):
    raise ValueError(f"--format=unet writes a folder; give --out a folder name, not {out}.")
  if single_file and variant:
    raise ValueError(f"--variant={variant!r} names the weights file inside a folder; --out={out} is one file. "
                     "Give --out a folder name for the released layout, or drop --variant.")
  wexport.unet_weights_filename(variant)  # a bad variant fails now, not after loading the run
  out = storage.absolute(out)
  if not single_file and storage.isdir(out) and storage.listdir(out):
    raise ValueError(f"--out={out} exists and is not empty; give a new folder.")
  check_run_checkpoint(workdir, "train it until it saves one (every config.checkpoint_every steps), or pass the "
                       "--workdir of a run that has; export writes the trained student (the teacher has no delta).")
  run = load_run(workdir, weights)
  if fmt == "unet":
    wexport.write_unet_folder(out, run.models.unet, run.params, DTYPES[dtype], variant)
    return out
  student = wexport.export_unet_state_dict(run.params, np.float32)
  teacher = wexport.export_unet_state_dict(run.models.unet_params, np.float32)
  delta = wexport.delta_state_dict(student, teacher, DTYPES[dtype])
  metadata = {"format": "pt", "perflow_jax": "delta_weights", "step": str(run.step), "weights": weights,
              "prediction_type": str(run.config.perflow.prediction_type),
              "num_windows": str(run.config.perflow.num_windows)}
  if single_file:
    io.write_safetensors(out, delta, metadata=metadata)
  else:
    wexport.write_unet_layout(out, wexport.unet_diffusers_config(run.models.unet), delta, variant, metadata)
  return out


def define_flags(fv: flags.FlagValues) -> None:
  """The CLI's flags, defined on `fv` (only when run as a script, or on a fresh FlagValues by `cli`)."""
  flags.DEFINE_string("workdir", None, "The training run's directory.", flag_values=fv)
  flags.DEFINE_string("out", None, "Output: delta: a .safetensors file, or a new folder for the released UNet-folder "
                      "layout; unet: a new folder.", flag_values=fv)
  flags.DEFINE_enum("format", "delta", list(FORMATS),
                    "delta: dW = student - teacher (PeRFlow delta weights); unet: merged diffusers folder.",
                    flag_values=fv)
  flags.DEFINE_enum("dtype", None, list(DTYPES), "Stored dtype (default: float16 delta, float32 unet).",
                    flag_values=fv)
  flags.DEFINE_enum("weights", "ema", ["ema", "student"], "Which student weights to export.", flag_values=fv)
  flags.DEFINE_string("variant", None, "Folders only: write diffusion_pytorch_model.<VARIANT>.safetensors (the "
                      "released deltas use 'v0-1'); load with from_pretrained(DIR, variant=VARIANT).",
                      flag_values=fv)


def run_flags(fv: flags.FlagValues) -> str:
  """Runs the export the parsed flags describe; returns the written path."""
  if not fv.workdir or not fv.out:
    raise app.UsageError("--workdir and --out are required.")
  out = export_run(fv.workdir, fv.out, fv.format, fv.dtype, fv.weights, fv.variant)
  logging.info("Exported %s (%s weights) of %s", fv.format, fv.weights, fv.workdir)
  return out


def cli(argv: Sequence[str]) -> str:
  """The CLI in-process: argv as on the command line (argv[0] is the program name)."""
  fv = flags.FlagValues()
  define_flags(fv)
  fv(list(argv))
  return run_flags(fv)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  print(f"wrote {run_flags(flags.FLAGS)}")


if __name__ == "__main__":
  define_flags(flags.FLAGS)
  cli_lib.run(main, output_flags=("out",))
