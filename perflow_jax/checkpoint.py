"""Orbax checkpoints of a training run, in ``workdir/checkpoints``.

Each checkpoint step holds four items:
  state   the train state pytree (student params, optimizer state, step): opaque here, saved as is;
  ema     the EMA params;
  data    the grain iterator state, one JSON file per process (absent when the run has no iterator);
  config  the run's config as JSON, so a checkpoint describes itself.

Saves are async (the device->host copy happens before ``save_checkpoint`` returns, so donating the state to the
next step is safe) and atomic (orbax writes to a temporary directory and renames it on commit), every
``config.checkpoint_every`` steps, keeping the last ``config.keep_checkpoints``. Restore reads the newest step into
abstract targets that carry shardings, so arrays land sharded; if the newest step is unreadable on any process, all
processes fall back to the one before, and the unreadable step is moved aside (``checkpoints_damaged/``).

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

from perflow_jax import storage
from perflow_jax.parallel import distributed

ITEMS = ("state", "ema", "data", "config")


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
  if force and step in manager.all_steps():
    return False
  items = {
      "state": ocp.args.StandardSave(state),
      "ema": ocp.args.StandardSave(ema_params),
      "config": ocp.args.JsonSave(config_to_dict(config)),
  }
  if data_iterator is not None:
    items["data"] = grain_python.PyGrainCheckpointSave(data_iterator)
  saved = manager.save(step, args=ocp.args.Composite(**items), force=force)
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
                       check_config: Callable[[dict[str, Any]], None] | None = None) -> Restored | None:
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
  aside. ``check_config`` is called with each candidate's saved config before its arrays are read; the ValueError
  it raises (e.g. a different model shape) is not a damaged checkpoint and propagates.

  Args:
    manager: from ``make_checkpoint_manager``.
    abstract_state: the train state as ShapeDtypeStructs with ``.sharding`` (``parallel.sharding.with_shardings``),
      so restored arrays are placed straight into their shardings.
    abstract_ema: the EMA params, likewise.
    data_iterator: a grain iterator whose state is set in place when the checkpoint has one.
    check_config: optional caller check of the saved config dict.

  Returns:
    ``Restored(step, state, ema, config)`` or None when the directory holds no checkpoint.
  """
  steps = _steps_on_every_process(manager)
  if not steps:
    return None
  damaged: list[tuple[int, str]] = []
  for step in steps:
    saved_config, unreadable = _read_small_files(manager, step)
    # "ok" rather than "": the coordination service's key-value store is given a non-empty value.
    errors = distributed.all_gather_strings(f"readable step {step}", unreadable or "ok")
    error = "; ".join(f"process {i}: {e}" for i, e in enumerate(errors) if e != "ok")
    if not error:
      restored, error = _try_restore(manager, step, saved_config, abstract_state, abstract_ema, data_iterator,
                                     check_config)
      if error and jax.process_count() > 1:
        raise CheckpointUnreadableError(
            f"checkpoint step {step} in {manager.directory} failed to restore on process {jax.process_index()} "
            f"({error[:1000]}), after every process could read its metadata. Move {manager.directory}/{step} to "
            f"{damaged_dir(epath.Path(manager.directory).parent)}/ and start the run again; it resumes from the "
            "step before.")
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


def _read_small_files(manager: ocp.CheckpointManager, step: int) -> tuple[dict[str, Any] | None, str]:
  """Reads, without orbax, the small JSON files of ``step`` that this process needs.

  Returns:
    (the saved config, '') when all parse, else (None, which file failed and why).
  """
  step_dir = epath.Path(manager.directory) / str(step)
  names = ["config/metadata", "_CHECKPOINT_METADATA", "state/_METADATA", "ema/_METADATA"]
  if (step_dir / "data").exists():
    names.append(f"data/process_{jax.process_index()}-of-{jax.process_count()}.json")
  parsed = []
  for name in names:
    try:
      parsed.append(json.loads((step_dir / name).read_text()))
    except Exception as e:  # pylint: disable=broad-except
      return None, f"{name}: {type(e).__name__}: {str(e)[:300]}"
  return parsed[0], ""  # config/metadata is the JSON the config item saved


def _try_restore(manager, step, saved_config, abstract_state, abstract_ema, data_iterator, check_config):
  """This process's attempt at ``step``: (items, '') or (None, the reason it failed)."""
  if check_config is not None:
    check_config(saved_config)
  items = {"state": ocp.args.StandardRestore(abstract_state), "ema": ocp.args.StandardRestore(abstract_ema)}
  if data_iterator is not None:
    if _has_item(manager, step, "data"):
      items["data"] = grain_python.PyGrainCheckpointRestore(data_iterator)
    else:
      logging.warning("Checkpoint step %d has no data iterator state; the input pipeline starts afresh.", step)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:  # pylint: disable=broad-except
    return None, f"{type(e).__name__}: {str(e)[:500]}"
  return {"state": restored["state"], "ema": restored["ema"], "config": saved_config}, ""


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


def saved_config(workdir: str | epath.PathLike, step: int | None = None) -> Mapping[str, Any] | None:
  """The config JSON of checkpoint ``step`` (default: newest) in ``workdir``, read-only; None if none exists."""
  directory = checkpoint_dir(workdir)
  if not directory.exists():
    return None
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True),
                                  item_names=ITEMS, item_handlers={"config": ocp.JsonCheckpointHandler()})
  try:
    step = manager.latest_step() if step is None else step
    return None if step is None else restore_config(manager, step)
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
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True),
                                  item_names=ITEMS, item_handlers={"ema": ocp.StandardCheckpointHandler()})
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise ValueError(f"{directory} holds no checkpoint to initialise the student from (config.model.init_from).")
    try:
      return manager.restore(step, args=ocp.args.Composite(ema=ocp.args.StandardRestore(abstract_ema)))["ema"]
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"the EMA weights of step {step} in {directory} do not fit this run's UNet ({type(e).__name__}: "
                       f"{str(e)[:500]}). config.model.init_from must be a run of the same architecture.") from e
  finally:
    manager.close()
