"""One training job per workdir: `workdir/lock.json`, held by process 0 of the job for the whole run.

The lock records its holder (host, pid, start time) and a heartbeat that a background thread refreshes every
`HEARTBEAT_SECONDS`. A second job on the same workdir is refused with a message naming the holder. A lock is
stale, and taken over with a warning, when its holder is a process of this host that no longer runs, or when its
heartbeat is older than `STALE_SECONDS` (a holder on another host, e.g. a pod worker that was preempted without
a clean exit). Taking the lock is also the first write into the workdir, so an unwritable or file-shaped workdir
fails here, before any model is loaded.

Locally the lock is created with O_EXCL (atomic); on a bucket, where two writers can race, each writer reads the
lock back after writing it and the later writer wins: a race of two starts within a second is not excluded there.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from perflow_jax import storage

LOCK_FILENAME = "lock.json"
HEARTBEAT_SECONDS = 60.0
STALE_SECONDS = 600.0


class WorkdirLockedError(RuntimeError):
  """Another live job trains in this workdir."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, owned by another user
    return True
  return True


def stale_reason(holder: dict[str, Any], now: float | None = None) -> str:
  """Why the lock of `holder` may be taken over ('' when its job looks alive)."""
  now = time.time() if now is None else now
  if holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", -1))):
    return f"its process {holder.get('pid')} on this host no longer runs"
  age = now - float(holder.get("heartbeat", 0.0))
  if age > STALE_SECONDS:
    return f"its heartbeat is {age:.0f} s old (stale after {STALE_SECONDS:.0f} s)"
  return ""


def _describe(holder: dict[str, Any]) -> str:
  started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(holder.get("started", 0.0))))
  return (f"host {holder.get('host')!r}, pid {holder.get('pid')}, started {started}, last heartbeat "
          f"{time.time() - float(holder.get('heartbeat', 0.0)):.0f} s ago")


class WorkdirLock:
  """`with WorkdirLock(workdir):` holds the lock (on process 0 only: pass `enabled=False` elsewhere)."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.path = storage.join(workdir, LOCK_FILENAME)
    self._workdir = workdir
    self._enabled = enabled
    self._token = uuid.uuid4().hex
    self._started = time.time()
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def _record(self) -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": self._started, "heartbeat": time.time(),
            "token": self._token}

  def _read(self) -> dict[str, Any] | None:
    try:
      return json.loads(storage.read_text(self.path))
    except FileNotFoundError:
      return None
    except (ValueError, OSError) as e:  # a half-written lock: its writer died mid-write
      return {"host": "?", "pid": -1, "started": 0.0, "heartbeat": 0.0, "unreadable": str(e)}

  def _create_local(self) -> bool:
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      json.dump(self._record(), f)
    return True

  def acquire(self) -> None:
    """Takes the lock or raises WorkdirLockedError; OSError (unwritable workdir) propagates with the path."""
    if not self._enabled:
      return
    _check_workdir(self._workdir)
    for _ in range(3):
      if not storage.is_remote(self.path):
        if self._create_local():
          break
      elif not storage.exists(self.path):
        storage.write_json(self.path, self._record())
        if (self._read() or {}).get("token") == self._token:
          break
        continue
      holder = self._read()
      if holder is None:  # released between our attempt and the read
        continue
      reason = stale_reason(holder)
      if not reason:
        raise WorkdirLockedError(
            f"{self._workdir} is in use by another training job ({_describe(holder)}). Two jobs on one workdir would "
            f"overwrite each other's checkpoints. Wait for it to finish or stop it; if that job is gone, delete "
            f"{self.path} (it is taken over by itself once its heartbeat is {STALE_SECONDS:.0f} s old).")
      logging.warning("Taking over the lock of %s from a job that is gone (%s; %s).", self._workdir,
                      _describe(holder), reason)
      _remove(self.path)
    else:
      raise WorkdirLockedError(f"could not take the lock {self.path}: other jobs kept creating it.")
    self._thread = threading.Thread(target=self._heartbeat, name="workdir-lock-heartbeat", daemon=True)
    self._thread.start()

  def _heartbeat(self) -> None:
    while not self._stop.wait(HEARTBEAT_SECONDS):
      try:
        storage.write_json(self.path, self._record())
      except Exception as e:  # pylint: disable=broad-except  (a missed heartbeat is not worth stopping training)
        logging.warning("Could not refresh the workdir lock %s: %s", self.path, e)

  def release(self) -> None:
    """Stops the heartbeat and removes the lock if it is still ours."""
    if not self._enabled:
      return
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    holder = self._read()
    if holder is not None and holder.get("token") == self._token:
      _remove(self.path)

  def __enter__(self) -> "WorkdirLock":
    self.acquire()
    return self

  def __exit__(self, *exc: Any) -> None:
    self.release()


def _remove(path: str) -> None:
  storage.as_path(path).unlink(missing_ok=True)


def _check_workdir(workdir: str) -> None:
  """Creates `workdir`; a path that is a file, or a parent that cannot be written, is a clear error."""
  if storage.isfile(workdir):
    raise NotADirectoryError(f"--workdir={workdir} is a file; pass a directory (it is created if missing).")
  try:
    storage.makedirs(workdir)
  except OSError as e:
    raise OSError(e.errno, f"cannot create or write --workdir={workdir} ({e.strerror or e}); choose a directory you "
                  "can write, or fix its permissions") from e
  if not storage.is_remote(workdir) and not os.access(workdir, os.W_OK | os.X_OK):
    raise PermissionError(f"--workdir={workdir} is not writable by this user; choose a directory you can write, or "
                          "fix its permissions.")
