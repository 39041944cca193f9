r"""Trains a PeRFlow student (or, with objective='diffusion', a teacher) from a config file.

  python -m perflow_jax.train --config=configs/sd15.py --workdir=/path/to/run
  python -m perflow_jax.train --config=configs/tiny.py --workdir=/tmp/tiny --config.total_steps=20
  python -m perflow_jax.train --config=configs/sd15.py:runlocal --workdir=/tmp/sd15_local
  python -m perflow_jax.train --config=configs/sd15.py:v5e-256 --workdir=gs://BUCKET/runs/sd15   # a topology preset

Every config field can be overridden with --config.a.b=value; unknown fields and inconsistent values are
rejected before anything starts. Rerunning with the same --workdir resumes from its newest intact checkpoint (one
whose arrays match the fingerprints saved with them; damaged steps are moved to checkpoints_damaged/). A resume
whose config would train something else (perflow_jax.run_config.FIELDS_FIXED_ON_RESUME: models, windows,
prediction type, solver, guidance, optimizer kind, global batch, ...) is refused with the changed fields; other
changes are logged. One job per workdir: a second one is refused while the first holds workdir/lock.json.

Exit status: 0 when the run reached config.total_steps; 75 after a preemption (SIGTERM) or a first Ctrl-C, once
every process has saved the same step (the launchers in launch/ restart the job on 75, and it resumes); 2 for a
user error (a bad flag, an unknown config field or a bad value, a missing config file or teacher, a checkpoint of
another architecture, an unwritable --workdir, a full disk), reported in one message without a traceback
(--verbosity=1 or PERFLOW_JAX_TRACEBACK=1 adds it; see perflow_jax.cli); anything else is an error with its
traceback. A second Ctrl-C aborts without a final checkpoint.
"""

import logging as std_logging
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from perflow_jax import cli as cli_lib
from perflow_jax import preemption
from perflow_jax import trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (configs/X.py[:arg]).", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory, local or gs://: checkpoints/, tensorboard/, metrics.jsonl, samples/, config.json.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  # orbax logs every save step at INFO; keep the console for the progress line.
  std_logging.getLogger("absl").addFilter(
      lambda r: not r.pathname or "orbax" not in r.pathname or r.levelno >= std_logging.WARNING)
  try:
    trainer.train(_CONFIG.value, _WORKDIR.value)
  except preemption.Preempted as e:
    logging.warning("%s", e)
    sys.exit(preemption.PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
  cli_lib.run(main, output_flags=("workdir",),
              disk_full_note="Checkpoints already committed are kept: rerun the same command to resume once there is "
                             "room.")
