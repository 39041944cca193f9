"""The persistent compilation cache of a training run: a restart (after a preemption, on a resume) loads the
compiled step instead of compiling it again.

`config.compilation_cache_dir` chooses the folder:
  ''      (default) JAX's own setting where the user gave one (`JAX_COMPILATION_CACHE_DIR` or
          `jax.config.update('jax_compilation_cache_dir', ...)`), else `<workdir>/compilation_cache`, shared by
          all processes of the job (as MaxText does on TPU pods), except in a multi-process CPU run: there JAX
          0.10 writes entries from process 0 only and the other processes never hit them, and a process that
          loads its step while another compiles it can disagree on their collectives and hang (WORKSPACE.md,
          "Compilation cache and several processes"), so the default there is no cache;
  'none'  no persistent cache;
  a path  that folder, local or gs:// (JAX reaches buckets through `etils.epath`, like `perflow_jax.storage`).
JAX decides what is worth keeping (`jax_persistent_cache_min_compile_time_secs`, 1 s by default: the step is,
the small helper programs mostly are not) and, with several processes, which process writes.
"""

from __future__ import annotations

import logging

import jax
from jax.experimental.compilation_cache import compilation_cache as jax_cache

from perflow_jax import storage

DISABLED = "none"
WORKDIR_SUBDIR = "compilation_cache"
_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_chosen_here: str | None = None  # the folder `enable` last chose: not the user's own JAX setting
_hits = 0
_listening = False


def _count_hit(event: str, **_: object) -> None:
  global _hits
  if event == _HIT_EVENT:
    _hits += 1


def cache_hits() -> int:
  """Programs this process loaded from the persistent cache since `enable` first ran (compare before and after)."""
  return _hits


def resolve_cache_dir(setting: str, workdir: str, jax_setting: str | None,
                      multiprocess_cpu: bool = False) -> str | None:
  """The cache folder for `config.compilation_cache_dir` = `setting` (module docstring); None = no cache."""
  setting = setting.strip()
  if setting.lower() == DISABLED:
    return None
  if setting:
    return storage.absolute(setting)
  if jax_setting:
    return jax_setting
  if multiprocess_cpu:
    return None
  return storage.join(workdir, WORKDIR_SUBDIR)


def enable(setting: str, workdir: str) -> str | None:
  """Points JAX's persistent cache at the resolved folder; returns it.

  Call it after the distributed runtime started (the default depends on the process count) and before the first
  compilation.
  """
  global _chosen_here, _listening
  if not _listening:
    jax.monitoring.register_event_listener(_count_hit)
    _listening = True
  current = jax.config.jax_compilation_cache_dir
  multiprocess_cpu = jax.process_count() > 1 and jax.devices()[0].platform == "cpu"
  path = resolve_cache_dir(setting, workdir, None if current == _chosen_here else current, multiprocess_cpu)
  _chosen_here = path
  if path != current:
    jax_cache.reset_cache()  # JAX opens its cache once per process; a new folder needs a fresh start
    jax.config.update("jax_compilation_cache_dir", path)
  logging.info("Persistent compilation cache: %s", path or (
      "off (config.compilation_cache_dir='none')" if setting.strip() else
      "off (the default for several CPU processes; see perflow_jax.compile_cache)"))
  return path
