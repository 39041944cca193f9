"""The demo's model sizes and training recipes (configs/demo_teacher.py and configs/demo.py are thin wrappers).

Sizes are chosen for 2 CPU cores: 32 px procedural images, an autoencoder to 8x8x4 latents
(`autoencoder.DEMO_VAE_CONFIG`), a two-level SD-style UNet (2.4M parameters) and a two-layer CLIP text tower
over the procedural vocabulary. The whole teacher is a few MB, so it is committed (`assets/demo/teacher`).
"""

from __future__ import annotations

import os

import ml_collections

from perflow_jax import run_config

RESOLUTION = 32
# The committed teacher, relative to the repository root (configs/ resolve it from their own location).
TEACHER_DIR = os.path.join("assets", "demo", "teacher")
CLASSIFIER_DIR = os.path.join("assets", "demo", "classifier")

DEMO_UNET_CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(48, 96),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8, cross_attention_dim=64,
    norm_num_groups=16)
# vocab_size covers the tiny procedural tokenizer (612 tokens); eos 2 pools at the argmax id as SD1's CLIP does.
DEMO_TEXT_CONFIG = dict(
    vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5)

# Prompts of the demo's sample grids: the procedural captions the teacher was trained on.
SAMPLE_PROMPTS = (
    "a large red circle in the center on a blue background",
    "a medium yellow triangle at the top left on a black background",
    "a large green square at the bottom right on a white background",
    "a medium purple diamond in the center on a orange background",
)


def teacher_config(init_folder: str = "") -> ml_collections.ConfigDict:
  """The diffusion-objective recipe of the demo teacher, starting from `init_folder` (trained autoencoder,
  random UNet and text encoder: what `python -m perflow_jax.demo.build_teacher` writes first)."""
  config = run_config.perflow_config(total_steps=2500, log_every=25, checkpoint_every=250, keep_checkpoints=2)
  config.objective = "diffusion"
  config.model.pretrained = init_folder
  config.diffusion.prediction_type = "epsilon"
  config.diffusion.prompt_dropout = 0.1  # the unconditional branch classifier-free guidance needs
  config.optim.learning_rate = 5e-4
  config.optim.warmup_steps = 100
  config.optim.weight_decay = 0.0
  config.optim.ema_decay = 0.999
  config.data.source = "procedural"
  config.data.resolution = RESOLUTION
  config.data.batch_size = 32
  config.data.procedural_size = 100_000
  config.sample_every = 250
  config.sample.prompts = SAMPLE_PROMPTS
  config.sample.num_steps = (50,)
  config.sample.guidance_scale = 3.0
  return config


def demo_config(teacher_dir: str, classifier_dir: str) -> ml_collections.ConfigDict:
  """PeRFlow on the demo teacher: the SD1.5 recipe's structure (K=4, cfg_sync, diff_eps) sized for 2 CPU cores,
  with the evaluation (DDIM-50 / DDIM-4 / PeRFlow-4 / PeRFlow-8 on the same prompts and noise) at the end."""
  config = run_config.perflow_config(total_steps=300, log_every=25, checkpoint_every=100, keep_checkpoints=1)
  config.objective = "perflow"
  config.model.pretrained = teacher_dir
  pf = config.perflow
  pf.num_windows = 4
  # DPM-Solver++(2M) reaches DDIM-8's window-end accuracy in 4 teacher calls (perflow_jax.flow.solver_study):
  # half the teacher cost, which dominates a step.
  pf.solver = "dpmpp_2m"
  pf.solver_steps = 4
  pf.teacher_guidance = "cfg_sync"
  pf.prediction_type = "diff_eps"
  pf.t_grid = 1000
  pf.prompt_dropout = 0.1
  config.optim.learning_rate = 2e-4
  config.optim.weight_decay = 0.0
  config.optim.ema_decay = 0.99  # a short run: the EMA must follow within ~100 steps
  config.data.source = "procedural"
  config.data.resolution = RESOLUTION
  config.data.batch_size = 32
  config.data.procedural_size = 100_000
  config.data.procedural_seed = 1  # other examples than the teacher saw (the same distribution)
  config.sample_every = 0  # the end-of-run evaluation writes the grids
  config.sample.prompts = SAMPLE_PROMPTS
  config.eval.at_end = True
  config.eval.samplers = ("ddim-50", "ddim-4", "perflow-4", "perflow-8")
  config.eval.reference = "ddim-50"
  config.eval.prompts = "procedural:256"
  config.eval.features = "classifier:" + classifier_dir
  config.eval.real = "procedural"
  config.eval.guidance_scale = 3.0
  return config
