"""Preemption and Ctrl-C: every process saves the same step, then the run exits with a status launchers restart on.

SIGTERM (spot preemption, a TPU maintenance event, SLURM's ``--signal``, GKE pod termination, ``tpu_pod.sh stop``)
and a first Ctrl-C (SIGINT) both ask the training loop to save a checkpoint at its current step and stop; a second
Ctrl-C aborts at once (``KeyboardInterrupt``; the last committed checkpoint stays). The trainer then raises
``Preempted``, and ``python -m perflow_jax.train`` exits with ``PREEMPTED_EXIT_CODE``: every launcher in ``launch/``
restarts the job on that status, and the restarted job resumes from the checkpoint.

With the distributed runtime (several processes, or any TPU host) JAX's preemption notifier owns SIGTERM and its
sync point (``multihost_utils.reached_preemption_sync_point``) returns True on every process at one agreed step, so
one process being signalled stops all of them together. Ctrl-C is routed through the same notifier (the handler
sends this process a SIGTERM). Without the runtime (one process) a Python handler sets a flag.

Typical use::

  preempted = install_handlers()
  for step in ...:
    ...
    if preempted(step):   # once per step, on every process
      save(step, force=True); break
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Callable

import jax
from jax.experimental import multihost_utils

from perflow_jax.parallel import distributed

# EX_TEMPFAIL of sysexits.h: "a temporary failure; the user is invited to retry". 0 = finished, other = an error.
PREEMPTED_EXIT_CODE = 75


class Preempted(Exception):
  """The run stopped for a preemption or Ctrl-C after committing the checkpoint of ``step``; rerun to resume."""

  def __init__(self, step: int, workdir: str = ""):
    where = f" in {workdir}" if workdir else ""
    super().__init__(f"preempted: checkpoint of step {step} saved{where}; run the same command again to resume "
                     f"(exit status {PREEMPTED_EXIT_CODE}).")
    self.step = step


def install_handlers() -> Callable[[int], bool]:
  """Routes SIGTERM and Ctrl-C to the training loop; returns ``preempted(step) -> bool``, to poll once per step.

  Call it on every process after ``maybe_initialize_distributed``, from the main thread.

  Raises:
    RuntimeError when several processes run without JAX's preemption service (it was disabled with
    ``jax_enable_preemption_service=False``): they could not agree on a step to save.
  """
  runtime = distributed.preemption_sync_available()
  received = threading.Event()
  interrupts = 0

  def on_sigint(signum, frame):
    del signum, frame
    nonlocal interrupts
    interrupts += 1
    if interrupts > 1:
      raise KeyboardInterrupt("second Ctrl-C: aborting without a final checkpoint")
    logging.warning("Ctrl-C: saving a checkpoint at the current step, then stopping. Press Ctrl-C again to abort.")
    if runtime:
      os.kill(os.getpid(), signal.SIGTERM)  # JAX's notifier tells every process; they stop at one step
    else:
      received.set()

  signal.signal(signal.SIGINT, on_sigint)

  if runtime:
    def preempted_everywhere(step: int) -> bool:
      return bool(multihost_utils.reached_preemption_sync_point(step))
    return preempted_everywhere

  if jax.process_count() > 1:
    raise RuntimeError(
        f"{jax.process_count()} processes run without JAX's preemption service, so a SIGTERM could not stop them "
        "at one step. Leave jax_enable_preemption_service at its default (True).")

  def on_sigterm(signum, frame):
    del frame
    logging.warning("Received signal %d: saving a checkpoint at the current step, then stopping.", signum)
    received.set()

  signal.signal(signal.SIGTERM, on_sigterm)

  def preempted(step: int) -> bool:
    del step
    return received.is_set()

  return preempted
