r"""PeRFlow on Stable Diffusion 2.1 (768-v): the `velocity` recipe on a v-prediction teacher at 768 px.

  python -m perflow_jax.train --config=configs/sd21.py --workdir=gs://BUCKET/runs/sd21 \
      --config.model.pretrained=/path/to/stable-diffusion-2-1 \
      --config.data.source=tfds --config.data.name=my_laion_subset --config.data.data_dir=gs://BUCKET/tfds

The reference released SD2.1 weights (perflow-sd21-artius) but no SD2.1 training script; this follows its SD
script with pred_type=velocity and the teacher solver's v-prediction branch. Single-file SD2 checkpoints do not
record their prediction type: keep `model.teacher_prediction_type='v_prediction'`.
"""

from configs import common
from configs import sd15


def get_config(arg=None):
  runlocal = common.parse_arg(arg, runlocal=False).runlocal
  config = sd15.get_config(arg)
  config.model.teacher_prediction_type = "v_prediction"
  config.perflow.prediction_type = "velocity"
  config.data.resolution = 384 if runlocal else 768
  config.sample.guidance_scale = 7.5
  config.sample.num_steps = (8,) if not runlocal else (4, 8)
  return config
