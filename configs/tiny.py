r"""A random-initialised tiny SD-family model on the procedural dataset: the test and smoke-run config.

  python -m perflow_jax.train --config=configs/tiny.py --workdir=/tmp/tiny

A few dozen steps take about a minute on 2 CPU cores. Arguments: `diffusion` trains the standard diffusion
objective instead of PeRFlow (e.g. configs/tiny.py:diffusion); `sdxl` trains a tiny SDXL-shaped model (two text
encoders, text_time conditioning) with the SDXL recipe's flow settings (guided teacher, ddim_eps, t grid 200).
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, diffusion=False, sdxl=False)
  config = common.perflow_config(total_steps=30, log_every=5, checkpoint_every=10, keep_checkpoints=2)
  config.objective = "diffusion" if arg.diffusion else "perflow"
  config.model = common.tiny_model()
  config.perflow.solver_steps = 4
  config.perflow.t_grid = 1000
  config.optim.learning_rate = 1e-3
  config.optim.ema_decay = 0.99
  config.data.source = "procedural"
  config.data.resolution = 16
  config.data.batch_size = 8
  config.data.procedural_size = 256
  config.sample_every = 0
  config.sample.prompts = ("a red circle on a blue background", "a green square on a white background")
  config.sample.num_steps = (4, 8)
  config.sample.guidance_scale = 1.0
  if arg.sdxl:
    config.model = common.tiny_sdxl_model()
    config.perflow.teacher_guidance = "guided"
    config.perflow.teacher_guidance_scale = 7.5
    config.perflow.prediction_type = "ddim_eps"
    config.perflow.t_grid = 200
    config.sample.guidance_scale = 2.0
  return config
