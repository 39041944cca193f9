"""`python -m perflow_jax.train` as one process of the pod rehearsal, with a compilation cache of its own.

JAX writes persistent-cache entries from process 0 only, and on CPU the other processes' cache keys differ from
process 0's, so in a shared cache processes 1..3 compile every launch while process 0 loads, and a loaded and a
freshly compiled executable can disagree on their collectives (WORKSPACE.md). Here every process writes and reads
its own directory (JAX_COMPILATION_CACHE_DIR, set per process by the test): the first launch compiles everywhere,
the later launches load everywhere, each process the very executable it compiled itself. Test-only: the trainer
and real pods keep JAX's behaviour.
"""

import os
import runpy
import sys

from jax._src import compiler
from jax._src import distributed

_write_entry = compiler._cache_write  # pylint: disable=protected-access


def _write_entry_from_any_process(*args, **kwargs):
  process_id = distributed.global_state.process_id
  distributed.global_state.process_id = 0  # the only check that keeps processes 1..3 from writing
  try:
    return _write_entry(*args, **kwargs)
  finally:
    distributed.global_state.process_id = process_id


compiler._cache_write = _write_entry_from_any_process  # pylint: disable=protected-access

if __name__ == "__main__":
  sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, as `-m` would have it
  sys.argv[0] = "perflow_jax.train"
  runpy.run_module("perflow_jax.train", run_name="__main__", alter_sys=True)
