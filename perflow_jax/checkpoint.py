"""Orbax checkpoints of a training run, in ``workdir/checkpoints``.

Each checkpoint step holds five items:
  state        the train state pytree (student params, optimizer state, step): opaque here, saved as is;
  ema          the EMA params;
  data         the grain iterator state, one JSON file per process (absent when the run has no iterator);
  config       the run's config as JSON, so a checkpoint describes itself;
  fingerprint  `perflow_jax.fingerprint` of `state` and `ema`, computed on device at save time and checked after
               every restore, so flipped bits in the array files are found instead of trained on.

Saves are async (the device->host copy happens before ``save_checkpoint`` returns, so donating the state to the
next step is safe) and atomic (orbax writes to a temporary directory and renames it on commit), every
``config.checkpoint_every`` steps, keeping the last ``config.keep_checkpoints``. Restore reads the newest step into
abstract targets that carry shardings, so arrays land sharded; if the newest step is unreadable on any process, all
processes fall back to the one before, and the unreadable step is moved aside (``checkpoints_damaged/``). A step
whose restored arrays do not match their fingerprint counts as unreadable; the CLIs that read a run's weights
(export, sample, evaluate) refuse such weights, and weights with NaN/inf, with an error.

Typical use in a trainer::

  manager = make_checkpoint_manager(workdir, config)
  preempted = perflow_jax.preemption.install_handlers()
  restored = restore_checkpoint(manager, abstract_state, abstract_ema, data_iterator=it)
  for step in range(first, config.total_steps + 1):
    ...
    stop = preempted(step)  # Once per step, on every process.
    save_checkpoint(manager, step, state, ema, config, it, force=stop or step == config.total_steps)
    if stop: break
  close(manager)
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable, Mapping, NamedTuple

import jax
import orbax.checkpoint as ocp
from etils import epath
from grain import python as grain_python

from perflow_jax import fingerprint as fingerprint_lib
from perflow_jax import storage
from perflow_jax.parallel import distributed

ITEMS = ("state", "ema", "data", "config", "fingerprint")
FINGERPRINTED = ("state", "ema")


class Restored(NamedTuple):
  """What ``restore_checkpoint`` returns: the step and the restored items (``config`` as a plain dict)."""
  step: int
  state: Any
  ema: Any
  config: dict[str, Any]


def config_to_dict(config: Any) -> dict[str, Any]:
  """A ConfigDict (or mapping) as JSON-able nested dicts; tuples become lists, as in any JSON round trip."""
  if hasattr(config, "to_json_best_effort"):
    return json.loads(config.to_json_best_effort(sort_keys=True))
  return json.loads(json.dumps(dict(config), sort_keys=True, default=str))


def checkpoint_dir(workdir: str | epath.PathLike) -> epath.Path:
  """``workdir/checkpoints``."""
  return storage.as_path(workdir) / "checkpoints"


def make_checkpoint_manager(workdir: str | epath.PathLike, config: Any,
                            async_save: bool = True) -> ocp.CheckpointManager:
  """The run's CheckpointManager in ``workdir/checkpoints``.

  Args:
    workdir: the run's directory.
    config: reads ``checkpoint_every`` (save interval in steps) and ``keep_checkpoints`` (how many to keep).
    async_save: write in a background thread after the blocking device->host copy.

  Returns:
    An ``orbax.checkpoint.CheckpointManager``; call ``close`` on it at the end.
  """
  every, keep = int(config.checkpoint_every), int(config.keep_checkpoints)
  if every < 1:
    raise ValueError(f"config.checkpoint_every={every} must be >= 1 (steps between checkpoints).")
  if keep < 1:
    raise ValueError(f"config.keep_checkpoints={keep} must be >= 1 (checkpoints kept on disk).")
  # Orbax's default policy also saves the first step of a fresh run; a step-1 checkpoint only costs time here.
  policy = ocp.checkpoint_managers.AnySavePolicy([
      ocp.checkpoint_managers.FixedIntervalPolicy(every),
      ocp.checkpoint_managers.PreemptionCheckpointingPolicy(),
  ])
  options = ocp.CheckpointManagerOptions(
      save_decision_policy=policy,
      max_to_keep=keep,
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True,  # A save cut short by a crash leaves a temporary directory; drop it.
  )
  handlers = {
      "state": ocp.StandardCheckpointHandler(),
      "ema": ocp.StandardCheckpointHandler(),
      "data": grain_python.PyGrainCheckpointHandler(),
      "config": ocp.JsonCheckpointHandler(),
      "fingerprint": ocp.JsonCheckpointHandler(),
  }
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS,
                               item_handlers=handlers)


def save_checkpoint(manager: ocp.CheckpointManager, step: int, state: Any, ema_params: Any, config: Any,
                    data_iterator: Any = None, force: bool = False) -> bool:
  """Saves a checkpoint at ``step`` if it is a save step (``checkpoint_every``) or ``force``; all processes call it.

  Args:
    manager: from ``make_checkpoint_manager``.
    step: the number of optimizer steps done.
    state: train state pytree of jax.Arrays / scalars.
    ema_params: EMA param pytree.
    config: the run's config (ConfigDict or mapping), stored as JSON.
    data_iterator: a grain iterator (``DataLoader`` iterator or ``DatasetIterator``) or None.
    force: save even off the interval (preemption, last step). A step that already has a checkpoint is skipped.

  Returns:
    Whether a save was started.
  """
  if step in manager.all_steps() or not (force or manager.should_save(step)):
    return False
  # Decided here rather than inside manager.save: the fingerprint costs a pass over the arrays, paid at save steps only.
  fingerprints = {"state": fingerprint_lib.fingerprint(state), "ema": fingerprint_lib.fingerprint(ema_params),
                  "structure": {"state": fingerprint_lib.structure(state),
                                "ema": fingerprint_lib.structure(ema_params)}}
  items = {
      "state": ocp.args.StandardSave(state),
      "ema": ocp.args.StandardSave(ema_params),
      "config": ocp.args.JsonSave(config_to_dict(config)),
      "fingerprint": ocp.args.JsonSave(fingerprints),
  }
  if data_iterator is not None:
    items["data"] = grain_python.PyGrainCheckpointSave(data_iterator)
  saved = manager.save(step, args=ocp.args.Composite(**items), force=True)
  if saved:
    logging.info("Checkpoint save started at step %d in %s", step, manager.directory)
  return saved


def _has_item(manager: ocp.CheckpointManager, step: int, item: str) -> bool:
  return (epath.Path(manager.directory) / str(step) / item).exists()


def restore_config(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  """The config JSON saved with checkpoint ``step``."""
  return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]


def restore_checkpoint(manager: ocp.CheckpointManager, abstract_state: Any, abstract_ema: Any,
                       data_iterator: Any = None,
                       check_config: Callable[[dict[str, Any], int], None] | None = None) -> Restored | None:
  """Restores the newest checkpoint that every process can read; None when there is none.

  All processes consider the same steps, newest first. For each, every process first reads, without orbax, the
  small files it will need (the step's metadata, each item's metadata, the config, its own data iterator state),
  and the processes agree through the coordination service (not a collective): a step that any process could not
  read (a truncated or missing file, a transient read error) is skipped by all of them. Only then do they restore
  it with orbax together, since orbax's restore has barriers that a process which gave up early would leave the
  others waiting at. So every process restores the same step. The skipped newer steps are moved aside to
  ``workdir/checkpoints_damaged/`` (never deleted: a step that failed for a transient reason can be moved back), so
  that the run can save those step numbers again. One process alone falls back past a step whose array data fails
  inside orbax too; with several processes such a failure stops the run with an error naming the step to move
  aside. ``check_config`` is called with each candidate's saved config and step before its arrays are read; the
  ValueError it raises (e.g. a config that trains something else) is not a damaged checkpoint and propagates, as
  does CheckpointArchitectureError for saved arrays of other shapes or dtypes than ``abstract_state``'s.

  Args:
    manager: from ``make_checkpoint_manager``.
    abstract_state: the train state as ShapeDtypeStructs with ``.sharding`` (``parallel.sharding.with_shardings``),
      so restored arrays are placed straight into their shardings.
    abstract_ema: the EMA params, likewise.
    data_iterator: a grain iterator whose state is set in place when the checkpoint has one.
    check_config: optional caller check ``check_config(saved_config_dict, step)``.

  Returns:
    ``Restored(step, state, ema, config)`` or None when the directory holds no checkpoint.
  """
  steps = _steps_on_every_process(manager)
  if not steps:
    return None
  damaged: list[tuple[int, str]] = []
  for step in steps:
    (saved_config, saved_fingerprint), unreadable = _read_small_files(manager, step)
    # "ok" rather than "": the coordination service's key-value store is given a non-empty value.
    errors = distributed.all_gather_strings(f"readable step {step}", unreadable or "ok")
    error = "; ".join(f"process {i}: {e}" for i, e in enumerate(errors) if e != "ok")
    if not error:
      restored, error = _try_restore(manager, step, saved_config, saved_fingerprint, abstract_state, abstract_ema,
                                     data_iterator, check_config)
      if error and jax.process_count() > 1:
        raise CheckpointUnreadableError(
            f"checkpoint step {step} in {manager.directory} failed to restore on process {jax.process_index()} "
            f"({error[:1000]}), after every process could read its metadata. Move {manager.directory}/{step} to "
            f"{damaged_dir(epath.Path(manager.directory).parent)}/ and start the run again; it resumes from the "
            "step before.")
    if not error:  # the same verdict on every process: the fingerprints are computed on the global arrays
      error = "; ".join(mismatch for item in FINGERPRINTED
                        if (mismatch := _verify_item(saved_fingerprint, item, restored[item], step)))
    if error:
      damaged.append((step, error))
      logging.warning("Checkpoint step %d in %s cannot be restored (%s); trying an older one.", step,
                      manager.directory, error[:1000])
      continue
    if damaged:
      _move_aside(manager, [s for s, _ in damaged], restored_step=step)
    logging.info("Restored checkpoint step %d from %s", step, manager.directory)
    return Restored(step, restored["state"], restored["ema"], restored["config"])
  details = "; ".join(f"step {s}: {msg[:300]}" for s, msg in damaged)
  raise CheckpointUnreadableError(
      f"No checkpoint in {manager.directory} could be restored ({details}). If the model or optimizer changed "
      "since these were written, use a new --workdir; otherwise move the damaged step directories away.")


def _steps_on_every_process(manager: ocp.CheckpointManager) -> list[int]:
  """The steps every process sees in the directory, newest first (a listing can lag on a shared filesystem)."""
  local = sorted(manager.all_steps(), reverse=True)
  seen = [json.loads(s) for s in distributed.all_gather_strings("checkpoint steps", json.dumps(local))]
  common = set(local).intersection(*map(set, seen))
  for i, steps in enumerate(seen):
    if set(steps) != common:
      logging.warning("Process %d sees checkpoint steps %s that not every process sees; they are not restored.",
                      i, sorted(set(steps) - common))
  return sorted(common, reverse=True)


def _read_small_files(manager: ocp.CheckpointManager,
                      step: int) -> tuple[tuple[dict[str, Any] | None, dict[str, Any] | None], str]:
  """Reads, without orbax, the small JSON files of ``step`` that this process needs.

  Returns:
    ((the saved config, the saved fingerprints or None for a step saved before fingerprints), '') when all
    parse, else ((None, None), which file failed and why).
  """
  step_dir = epath.Path(manager.directory) / str(step)
  names = ["config/metadata", "_CHECKPOINT_METADATA", "state/_METADATA", "ema/_METADATA"]
  if (step_dir / "data").exists():
    names.append(f"data/process_{jax.process_index()}-of-{jax.process_count()}.json")
  has_fingerprint = (step_dir / _FINGERPRINT_FILE).exists()
  if has_fingerprint:
    names.append(_FINGERPRINT_FILE)
  parsed = []
  for name in names:
    try:
      parsed.append(json.loads((step_dir / name).read_text()))
    except Exception as e:  # pylint: disable=broad-except
      return (None, None), f"{name}: {type(e).__name__}: {str(e)[:300]}"
  # config/metadata is the JSON the config item saved; fingerprint/metadata the fingerprint item's.
  return (parsed[0], parsed[-1] if has_fingerprint else None), ""


_FINGERPRINT_FILE = "fingerprint/metadata"


def read_fingerprints(workdir: str | epath.PathLike, step: int) -> dict[str, Any] | None:
  """The fingerprints saved with checkpoint ``step`` of ``workdir`` ({item: {leaf path: numbers}}); None for a
  checkpoint written before fingerprints were."""
  path = checkpoint_dir(workdir) / str(step) / _FINGERPRINT_FILE
  return json.loads(path.read_text()) if path.exists() else None


def _verify_item(saved: Mapping[str, Any] | None, item: str, tree: Any, step: int) -> str:
  """'' when ``tree`` (restored item ``item`` of ``step``) matches its saved fingerprint, else what differs."""
  if saved is None:
    logging.warning("Checkpoint step %d has no fingerprint (written by an older perflow_jax); its %s arrays are "
                    "restored unverified.", step, item)
    return ""
  problems = fingerprint_lib.differences(saved.get(item, {}), fingerprint_lib.fingerprint(tree))
  if not problems:
    return ""
  return (f"item {item!r} does not match the fingerprint saved with it: {len(problems)} array(s) differ "
          f"({'; '.join(problems[:3])}), the files were changed or damaged after the save")


def verify_weights(workdir: str | epath.PathLike, step: int, item: str, tree: Any) -> None:
  """Raises ValueError when restored weights of checkpoint ``step`` are damaged or hold NaN/inf.

  For the CLIs that read a run's weights (export, sample, evaluate, init_from): weights are never shipped or
  sampled from when they differ from what the trainer saved, or are not finite.

  Args:
    workdir: the run's directory.
    step: the checkpoint step the weights came from.
    item: 'ema' or 'state'.
    tree: the restored arrays of that item.
  """
  directory = checkpoint_dir(workdir)
  mismatch = _verify_item(read_fingerprints(workdir, step), item, tree, step)
  if mismatch:
    raise ValueError(f"checkpoint step {step} in {directory}: {mismatch}. {_older_step_hint(workdir, step)}")
  bad = fingerprint_lib.nonfinite_leaves(fingerprint_lib.fingerprint(tree))
  if bad:
    total = sum(bad.values())
    raise ValueError(f"checkpoint step {step} in {directory}: the {item!r} weights hold {total} NaN/inf value(s) in "
                     f"{len(bad)} array(s) (e.g. {next(iter(bad))}); nothing is written from them. "
                     f"{_older_step_hint(workdir, step)}")


def _older_step_hint(workdir: str | epath.PathLike, step: int) -> str:
  return (f"Move {checkpoint_dir(workdir) / str(step)} to {damaged_dir(workdir)}/ and run the command again: it then "
          "reads the newest remaining step (a resumed training run does this by itself).")


def _try_restore(manager, step, saved_config, saved_fingerprint, abstract_state, abstract_ema, data_iterator,
                 check_config):
  """This process's attempt at ``step``: (items, '') or (None, the reason it failed)."""
  if check_config is not None:
    check_config(saved_config, step)
  _check_architecture(manager, step, saved_fingerprint, {"state": abstract_state, "ema": abstract_ema})
  # One item per restore call, so that a failure names its item (every process makes the same calls).
  items = {"state": ocp.args.StandardRestore(abstract_state), "ema": ocp.args.StandardRestore(abstract_ema)}
  if data_iterator is not None:
    if _has_item(manager, step, "data"):
      items["data"] = grain_python.PyGrainCheckpointRestore(data_iterator)
    else:
      logging.warning("Checkpoint step %d has no data iterator state; the input pipeline starts afresh.", step)
  restored = {"config": saved_config}
  for item, args in items.items():
    try:
      restored[item] = manager.restore(step, args=ocp.args.Composite(**{item: args}))[item]
    except Exception as e:  # pylint: disable=broad-except
      return None, f"item {item!r} cannot be read: {_short_error(e)}"
  return restored, ""


def _short_error(e: BaseException) -> str:
  """The root cause of an orbax/tensorstore read error on one line (orbax wraps it with a many-line spec dump)."""
  while e.__cause__ is not None:
    e = e.__cause__
  return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:400] if str(e).strip() else ''}"


class CheckpointArchitectureError(ValueError):
  """A checkpoint holds arrays of other shapes or dtypes than the run restoring it: another model, not damage."""


def _check_architecture(manager: ocp.CheckpointManager, step: int, saved_fingerprint: Mapping[str, Any] | None,
                        abstract: Mapping[str, Any]) -> None:
  """Raises CheckpointArchitectureError when the saved arrays' shapes/dtypes differ from the run's."""
  saved = (saved_fingerprint or {}).get("structure")
  if saved is None:  # a checkpoint from before structures were recorded: orbax's restore checks the shapes
    return
  problems = []
  for item, tree in abstract.items():
    ours = fingerprint_lib.structure(tree)
    theirs = saved.get(item, {})
    problems += [f"{item}/{p}: saved {theirs.get(p, '(absent)')}, this run {ours.get(p, '(absent)')}"
                 for p in sorted(set(ours) | set(theirs)) if ours.get(p) != theirs.get(p)]
  if problems:
    raise CheckpointArchitectureError(
        f"checkpoint step {step} in {manager.directory} holds another architecture than this run: "
        f"{len(problems)} array(s) differ ({'; '.join(problems[:3])}). Resume it with the config it was trained "
        "with, or train this model in a new --workdir.")


def damaged_dir(workdir: str | epath.PathLike) -> epath.Path:
  """``workdir/checkpoints_damaged``: where unreadable steps are moved, outside orbax's view."""
  return storage.as_path(workdir) / "checkpoints_damaged"


def _move_aside(manager: ocp.CheckpointManager, steps: list[int], restored_step: int) -> None:
  """Process 0 moves the unreadable ``steps`` to ``checkpoints_damaged/<step>[.<n>]``; every process then reloads."""
  directory = epath.Path(manager.directory)
  if jax.process_index() == 0:
    target_root = damaged_dir(directory.parent)
    for step in steps:
      target, n = target_root / str(step), 1
      while target.exists():
        target, n = target_root / f"{step}.{n}", n + 1
      storage.move_tree(directory / str(step), target)
      logging.warning("Moved unreadable checkpoint step %d to %s (restored step %d instead). Delete it when you "
                      "no longer need it.", step, target, restored_step)
  distributed.barrier("damaged checkpoints moved aside")
  manager.reload()


class CheckpointUnreadableError(ValueError):
  """Every checkpoint in the directory failed to restore."""


def wait_until_finished(manager: ocp.CheckpointManager) -> None:
  """Blocks until async saves are committed; raises if a background save failed."""
  manager.wait_until_finished()
  manager.check_for_errors()


def close(manager: ocp.CheckpointManager) -> None:
  """Finishes pending saves and releases the manager's threads."""
  manager.wait_until_finished()
  manager.close()


def read_only_options() -> ocp.CheckpointManagerOptions:
  """Options of a manager that only reads (set explicitly: orbax warns about each default it has to override)."""
  return ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)


def saved_config(workdir: str | epath.PathLike, step: int | None = None) -> Mapping[str, Any] | None:
  """The config JSON of checkpoint ``step`` (default: newest) in ``workdir``, read-only; None if none exists."""
  directory = checkpoint_dir(workdir)
  if not directory.exists():
    return None
  manager = ocp.CheckpointManager(directory, options=read_only_options(),
                                  item_names=ITEMS, item_handlers={"config": ocp.JsonCheckpointHandler()})
  try:
    step = manager.latest_step() if step is None else step
    return None if step is None else restore_config(manager, step)
  finally:
    manager.close()


def latest_step(workdir: str | epath.PathLike) -> int | None:
  """The newest committed checkpoint step in ``workdir`` (None if there is none)."""
  directory = checkpoint_dir(workdir)
  if not directory.exists():
    return None
  manager = ocp.CheckpointManager(directory, options=read_only_options(), item_names=ITEMS)
  try:
    return manager.latest_step()
  finally:
    manager.close()


def restore_ema_params(workdir: str | epath.PathLike, abstract_ema: Any, step: int | None = None) -> Any:
  """The EMA params of another run's checkpoint (default: its newest), placed into ``abstract_ema``'s shardings.

  Used to start a student from an earlier run (``config.model.init_from``) without taking over its optimizer
  state or step count.
  """
  directory = checkpoint_dir(workdir)
  if not directory.exists():
    raise ValueError(f"config.model.init_from={str(workdir)!r} has no checkpoints/ directory; pass the workdir of a "
                     "run that has saved a checkpoint.")
  manager = ocp.CheckpointManager(directory, options=read_only_options(),
                                  item_names=ITEMS, item_handlers={"ema": ocp.StandardCheckpointHandler()})
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise ValueError(f"{directory} holds no checkpoint to initialise the student from (config.model.init_from).")
    saved_fingerprint = read_fingerprints(workdir, step)
    if saved_fingerprint is not None:
      _check_architecture(manager, step, saved_fingerprint, {"ema": abstract_ema})
    try:
      ema = manager.restore(step, args=ocp.args.Composite(ema=ocp.args.StandardRestore(abstract_ema)))["ema"]
    except Exception as e:  # pylint: disable=broad-except
      cause = ("the files are damaged" if saved_fingerprint is not None else
               "the files are damaged, or the weights are of another architecture than this run's UNet")
      raise ValueError(f"the EMA weights of checkpoint step {step} in {directory} cannot be read ({cause}: "
                       f"{_short_error(e)}). {_older_step_hint(workdir, step)}") from e
  finally:
    manager.close()
  verify_weights(workdir, step, "ema", ema)
  return ema
