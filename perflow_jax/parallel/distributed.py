"""Multi-process start-up, per platform, and the coordination-service helpers every process shares.

Whether ``jax.distributed.initialize`` runs, and with which arguments, is decided by ``distributed_args`` (pure, so
every platform's case is unit-tested with a faked environment):

  explicit   ``config.distributed.{coordinator_address,num_processes,process_id}`` or the ``JAX_COORDINATOR_ADDRESS``
             / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` environment: used as given (num_processes 1 = one process);
  TPU        always initialise (as MaxText does): on a Cloud TPU VM JAX reads the worker list, this worker's number
             and the slices (``MEGASCALE_*``) from the VM's metadata; on GKE from the webhook's ``TPU_WORKER_*``.
             One host initialises too, which gives it the preemption notifier;
  GPU, CPU   only when a cluster launcher announces several processes (SLURM, Open MPI); one process otherwise.

``config.distributed.auto_detect=False`` turns off everything but the explicit settings. Importing this module
never starts distributed JAX and never touches a backend: ``maybe_initialize_distributed`` must run before the first
JAX computation.
"""

from __future__ import annotations

import glob
import itertools
import logging
import os
from typing import Any, Callable, Mapping

import jax

# Environment variables that tell us this process is one of several (the launcher set them).
COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"
CONFIG_FIELDS = ("coordinator_address", "num_processes", "process_id", "auto_detect")

_GOOGLE_PCI_VENDOR = "0x1ae0"  # Cloud TPU chips on a TPU VM's PCI bus
_NVIDIA_PCI_VENDOR = "0x10de"


def _env_int(env: Mapping[str, str], name: str, unset: int) -> int:
  value = env.get(name, "").strip()
  if not value:
    return unset
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"environment variable {name}={value!r} is not an integer; unset it or fix it.") from None


def _pci_vendors(pci_root: str = "/sys/bus/pci/devices") -> set[str]:
  vendors = set()
  for path in glob.glob(os.path.join(pci_root, "*", "vendor")):
    try:
      with open(path) as f:
        vendors.add(f.read().strip().lower())
    except OSError:
      continue
  return vendors


def detect_platform(env: Mapping[str, str] | None = None,
                    pci_vendors: Callable[[], set[str]] = _pci_vendors) -> str:
  """'tpu', 'gpu' or 'cpu', without starting a JAX backend (which must not start before ``initialize``).

  ``JAX_PLATFORMS`` decides when set (its first entry); otherwise the PCI bus: Google's vendor id is a TPU VM's chips,
  NVIDIA's a GPU. Nothing is looked up over the network.
  """
  env = os.environ if env is None else env
  requested = env.get("JAX_PLATFORMS", "").strip().lower()
  if requested:
    first = requested.split(",")[0].strip()
    return {"cuda": "gpu", "rocm": "gpu"}.get(first, first)
  vendors = pci_vendors()
  if _GOOGLE_PCI_VENDOR in vendors:
    return "tpu"
  if _NVIDIA_PCI_VENDOR in vendors:
    return "gpu"
  return "cpu"


def announced_process_count(env: Mapping[str, str]) -> tuple[int, str]:
  """How many processes a cluster launcher announced, and the variable that said so ((1, '') when none did)."""
  def count(name: str) -> int:
    try:
      return int(env.get(name, "1").split("(")[0] or 1)  # SLURM writes e.g. "4(x2)" in some fields.
    except ValueError:
      return 1
  tpu_hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  candidates = [(len(tpu_hosts), "TPU_WORKER_HOSTNAMES"), (count("MEGASCALE_NUM_SLICES"), "MEGASCALE_NUM_SLICES"),
                (count("SLURM_NTASKS"), "SLURM_NTASKS"), (count("OMPI_COMM_WORLD_SIZE"), "OMPI_COMM_WORLD_SIZE")]
  best = max(candidates, key=lambda c: c[0])
  return (best[0], best[1]) if best[0] > 1 else (1, "")


def distributed_args(distributed_config: Mapping[str, Any] | None, env: Mapping[str, str] | None = None,
                     platform: str = "cpu") -> dict[str, Any] | None:
  """Decides how (and whether) to call ``jax.distributed.initialize``; pure, so it is testable.

  Args:
    distributed_config: ``config.distributed`` with ``coordinator_address`` (str, '' = unset),
      ``num_processes`` (int, 0 = unset), ``process_id`` (int, -1 = unset) and ``auto_detect`` (bool); or None.
    env: environment (default ``os.environ``).
    platform: 'tpu', 'gpu' or 'cpu' (``detect_platform``).

  Returns:
    Keyword arguments for ``jax.distributed.initialize`` (``{}`` = JAX detects everything; a partial dict = JAX
    detects the rest), or None for a single process without the distributed runtime.
  """
  env = os.environ if env is None else env
  cfg = dict(distributed_config or {})
  unknown = set(cfg) - set(CONFIG_FIELDS)
  if unknown:
    raise ValueError(f"config.distributed has unknown fields {sorted(unknown)}; known: {', '.join(CONFIG_FIELDS)}.")
  address = cfg.get("coordinator_address") or env.get(COORDINATOR_ENV, "").strip() or None
  num = cfg.get("num_processes") or _env_int(env, NUM_PROCESSES_ENV, 0)
  pid = cfg.get("process_id", -1)
  if pid is None or pid < 0:
    pid = _env_int(env, PROCESS_ID_ENV, -1)
  if num > 1:
    if not address or pid < 0:
      raise ValueError(f"{num} processes are configured but coordinator_address={address!r} and "
                       f"process_id={pid}: set config.distributed.coordinator_address ('host:port' of process 0) "
                       f"and config.distributed.process_id (0..{num - 1}), or the {COORDINATOR_ENV} and "
                       f"{PROCESS_ID_ENV} environment variables.")
    if pid >= num:
      raise ValueError(f"process_id={pid} is out of range for num_processes={num}; use 0..{num - 1}.")
    return {"coordinator_address": address, "num_processes": num, "process_id": pid}
  if num == 1:
    return None
  if not cfg.get("auto_detect", True):
    return None
  if platform == "tpu" or announced_process_count(env)[0] > 1:
    # A coordinator address given without a count: JAX detects the count and this process's id around it.
    return {"coordinator_address": address} if address else {}
  return None


def maybe_initialize_distributed(config: Any, env: Mapping[str, str] | None = None,
                                 platform: str | None = None) -> bool:
  """Starts multi-process JAX where the platform or the launcher calls for it (see ``distributed_args``).

  Call it first in ``main``, before anything creates arrays or queries devices. Reads ``config.distributed`` if the
  config has it.

  Returns:
    True when this call initialized ``jax.distributed``.

  Raises:
    RuntimeError naming the setting to fix when a launcher announced several processes but the runtime cannot start
    (auto-detection off and nothing explicit, or ``initialize`` itself failing).
  """
  if jax.distributed.is_initialized():
    return False
  env = os.environ if env is None else env
  platform = platform or detect_platform(env)
  distributed_config = config.get("distributed") if hasattr(config, "get") else None
  kwargs = distributed_args(distributed_config, env, platform)
  if kwargs is None:
    count, variable = announced_process_count(env)
    explicit_single = bool(distributed_config and distributed_config.get("num_processes") == 1)
    if count > 1 and not explicit_single:
      raise RuntimeError(
          f"{variable}={env.get(variable)} says this is one of {count} processes, but config.distributed.auto_detect "
          "is False and no coordinator is configured. Set --config.distributed.auto_detect=true, or give "
          "--config.distributed.coordinator_address/num_processes/process_id (or JAX_COORDINATOR_ADDRESS, "
          "JAX_NUM_PROCESSES, JAX_PROCESS_ID); --config.distributed.num_processes=1 runs this process alone.")
    return False
  if platform == "cpu":
    # CPU processes exchange data over gloo; without it cross-process computations fail.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  logging.info("Initializing jax.distributed on %s with %s", platform, kwargs or "cluster auto-detection")
  try:
    jax.distributed.initialize(**kwargs)
  except Exception as e:  # pylint: disable=broad-except
    raise RuntimeError(
        f"jax.distributed.initialize({kwargs or ''}) failed on platform {platform!r}: {type(e).__name__}: {e}. "
        "On a Cloud TPU VM this needs the VM's metadata server (run on every worker of the slice); on GPU/CPU set "
        "--config.distributed.coordinator_address=HOST:PORT (process 0's host), --config.distributed."
        "num_processes and --config.distributed.process_id, or run under SLURM; "
        "--config.distributed.auto_detect=false runs one process alone.") from e
  use_coordination_barriers_in_orbax()
  logging.info("jax.distributed ready: process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def _global_state() -> Any:
  from jax._src import distributed  # pylint: disable=g-import-not-at-top  (no public client API in this JAX)
  return distributed.global_state


def _client() -> Any:
  """The distributed runtime's coordination-service client, or None (one process without the runtime)."""
  return _global_state().client


def preemption_sync_available() -> bool:
  """Whether JAX's preemption notifier and sync point run (the runtime is up and its preemption service is on)."""
  state = _global_state()
  return state.client is not None and state.preemption_sync_manager is not None


def _require_client(what: str) -> Any:
  client = _client()
  if client is None:
    raise RuntimeError(
        f"{what}: this is one of {jax.process_count()} processes but jax.distributed has no client. Call "
        "perflow_jax.parallel.distributed.maybe_initialize_distributed(config) before the first JAX computation.")
  return client


def barrier(name: str, timeout_s: float = 1800.0) -> None:
  """Waits until every process reaches `name`; a no-op with one process.

  It uses the distributed runtime's coordination service, not a collective: a collective's first use sets up its
  communicator with a short rendezvous deadline (30 s for gloo on CPU), which processes that arrive far apart
  (one still compiling, or reading a large checkpoint) would miss. Calling this before the first collective of a
  phase lines the processes up, so that rendezvous happens within moments.
  """
  if jax.process_count() == 1:
    return
  _require_client(f"barrier {name!r}").wait_at_barrier(f"perflow_jax:{name}", int(timeout_s * 1000))


_exchanges = itertools.count()


def all_gather_strings(name: str, value: str, timeout_s: float = 1800.0) -> list[str]:
  """Every process's ``value``, in process order, exchanged through the coordination service's key-value store.

  No collective and no device: it works while processes disagree (e.g. which checkpoint each can read). Every
  process must make the same sequence of calls (each call publishes keys under a new sequence number).
  """
  if jax.process_count() == 1:
    return [value]
  client = _require_client(f"exchange {name!r}")
  prefix = f"perflow_jax/{name}/{next(_exchanges)}"
  client.key_value_set(f"{prefix}/{jax.process_index()}", value)
  return [client.blocking_key_value_get(f"{prefix}/{i}", int(timeout_s * 1000)) for i in range(jax.process_count())]


def use_coordination_barriers_in_orbax() -> None:
  """Makes orbax synchronise processes through the coordination service rather than a collective.

  orbax's default barrier is a collective whose first use must rendezvous within gloo's 30 s on CPU; processes
  that reach it far apart (different load, compile or read times) then fail. Only possible where absl flags are
  parsed (the CLIs); elsewhere orbax keeps its default.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  name = "experimental_orbax_use_distributed_barrier"
  if name in flags.FLAGS and flags.FLAGS.is_parsed():
    flags.FLAGS[name].value = True
