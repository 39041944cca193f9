r"""The demo teacher's recipe: a small SD-style model trained here, with the standard diffusion objective.

Not run by hand: `python -m perflow_jax.demo.build_teacher --workdir=/tmp/demo_teacher_build` trains the
autoencoder, writes the starting folder and runs this recipe through the trainer (about an hour on 2 busy CPU
cores), then writes `assets/demo/teacher`. To rerun only the UNet training on a starting folder:

  python -m perflow_jax.train --config=configs/demo_teacher.py:init=/tmp/demo_teacher_build/init \
      --workdir=/tmp/demo_teacher_run

Arguments: `init` = the starting folder (trained autoencoder, random UNet and text encoder).
"""

from configs import common
from perflow_jax.demo import recipes


def get_config(arg=None):
  arg = common.parse_arg(arg, init="")
  return recipes.teacher_config(arg.init)
