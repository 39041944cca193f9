r"""The offline demo: PeRFlow-accelerates the committed demo teacher in minutes on a laptop CPU.

  python -m perflow_jax.train --config=configs/demo.py --workdir=/tmp/perflow_demo

The teacher (`assets/demo/teacher`, a diffusers folder: autoencoder, UNet, CLIP text encoder, tokenizer) was
trained here on the procedural shapes dataset (`python -m perflow_jax.demo.build_teacher`). After the last step the
run evaluates teacher DDIM-50, DDIM-4, PeRFlow-4 and PeRFlow-8 on the same 256 prompts and noise and writes
`workdir/eval/` (grid.png, grid_<sampler>.png, eval.json, eval.md).
"""

import os

from perflow_jax.demo import recipes

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config(arg=None):
  del arg
  return recipes.demo_config(os.path.join(_ROOT, recipes.TEACHER_DIR), os.path.join(_ROOT, recipes.CLASSIFIER_DIR))
