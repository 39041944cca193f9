r"""The speed benchmark's configuration: exactly the step of shared/bench/torch_perflow_step.py.

  python -m perflow_jax.benchmark --config=configs/bench.py --out=/tmp/bench.json
  python -m perflow_jax.benchmark --mode=sample --config=configs/bench.py

An SD1.5-architecture UNet at width 64 (block channels 64/128/256/256, two layers per block, cross-attention
768, 8 heads, 32 norm groups), 32x32 latents, batch 4, K=4 windows, DDIM with 8 teacher steps per window,
cfg_sync, diff_eps, AdamW with clipping, float32, random init. The benchmark feeds latent-cache batches (random
latents and a random 768-wide context, as the reference), so the VAE and the text encoder are not in the measured
step; they are tiny here only to complete the model section (the tiny VAE downsamples 2x: 64 px -> 32 latents).
"""

from configs import common

WIDTH = 64


def get_config(arg=None):
  del arg
  config = common.perflow_config(total_steps=10, log_every=1, checkpoint_every=10, keep_checkpoints=1)
  config.model = common.tiny_model()
  config.model.unet = dict(
      sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
      block_out_channels=(WIDTH, 2 * WIDTH, 4 * WIDTH, 4 * WIDTH), attention_head_dim=8, cross_attention_dim=768,
      down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
      up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, norm_num_groups=32)
  # perflow_config's defaults are the SD1.5 recipe (K=4, DDIM-8, cfg_sync, diff_eps, AdamW 8e-5 / 1e-2 / clip 1)
  # in float32 without remat: exactly the reference step. Only the prompt dropout differs.
  config.perflow.prompt_dropout = 0.0  # the reference step feeds every example its (random) context
  # Blockwise attention with a flash-style backward, as the reference's torch SDPA (a fused CPU flash kernel)
  # does: on this CPU it took the 1024-token layers from 157 to 18 ms forward (see models/attention.py).
  config.model.attention = "chunked"

  config.data.source = "cache"
  config.data.resolution = 64  # 32x32 latents under the tiny VAE's 2x downsampling
  config.data.batch_size = 4

  config.sample.guidance_scale = 4.5  # sample mode: CFG, one batched cond + uncond call per step
  return config
