r"""PeRFlow on Stable Diffusion XL: the reference's SDXL recipe (K=4, DDIM-10 per window, guided teacher, ddim_eps).

  python -m perflow_jax.train --config=configs/sdxl.py --workdir=gs://BUCKET/runs/sdxl \
      --config.model.pretrained=/path/to/stable-diffusion-xl-base-1.0 \
      --config.data.source=tfds --config.data.name=my_laion_subset --config.data.data_dir=gs://BUCKET/tfds

  # the same recipe shrunk for one machine (batch 4, 512 px, 20 steps):
  python -m perflow_jax.train --config=configs/sdxl.py:runlocal --workdir=/tmp/sdxl_local \
      --config.model.pretrained=/path/to/stable-diffusion-xl-base-1.0

  # a topology preset (mesh, global batch; see TOPOLOGIES): v5p-256, or N slices of it as Nxv5p-256
  python -m perflow_jax.train --config=configs/sdxl.py:v5p-256 ...

The reference (perflow_accelerate_ddimeps_sdxl.py, train.sh) differs from the SD1.5 recipe in: the teacher solves
each window with 10 DDIM steps under classifier-free guidance 7.5 (positive = the full prompt, negative = the ""
embedding; no cfg_sync), the student predicts `ddim_eps`, training t lies on a 1/200 grid, lr 1e-4, bfloat16,
1024 px. Conditioning (perflow_jax.conditioning): both encoders' penultimate hidden states concatenated to 2048,
bigG's projected pooled output as text_embeds, and fixed micro-conditioning time ids (R, R, 0, 0, R, R) with R the
training resolution; prompt dropout 0.1 replaces hidden states and pooled embedding by the "" prompt's together.
The reference trains with the sdxl-vae-fp16-fix VAE: use a diffusers folder whose vae/ holds it (same shapes).
Its global batch is not stated (8 per GPU x 2 accumulation on 16 A100s would be 256).
Sampling: the reference suggests 4-8 steps at guidance 1.5-2.5 (its validation: 4 and 8 steps at 2.0).
"""

from configs import common

VALIDATION_PROMPTS = (
    "A photo of a cat sitting on a windowsill, soft morning light, high detail",
    "A red sports car on a mountain road at sunset, cinematic",
    "A lighthouse on a cliff above a stormy sea, oil painting",
    "A bowl of ramen with an egg and green onions, food photography",
)

RESOLUTION = 1024

# SDXL's UNet has 2.6B parameters (3x SD1.5's; student, EMA, AdamW and a bf16 teacher: ~43 GiB of state). fsdp 8
# (launch/README.md, "Sizing the mesh": the smallest that fits, 8 or 16) is one torus axis of the 4x4x8 v5p-256
# (jax.make_mesh does not split v5p axes) and holds ~5.4 GiB of sharded state per chip; data 16 is the 4x4 plane.
# Global batch 256 (the config's; the reference's is not stated), 2 per chip. Memory: 47.87 GiB/device measured
# with the default teacher placement 'gather_once' (48.24 with 'fsdp'; XLA:CPU buffer assignment;
# launch/README.md, "Sizing the mesh"), 5.39 of it sharded state, ~47 GiB under v5p's
# 95: XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true" python -m
# perflow_jax.benchmark --mode=memory --config=configs/sdxl.py:v5p-256 --num_devices=8 --per_device_batch=2
# --config.mesh.data=1 --config.mesh.fsdp=8 (the flags only cheapen LLVM codegen; same bytes without them).
# XLA:CPU's memory-optimized scheduler brought the 'fsdp' step to 26.49 GiB: ~22 GiB of it is the CPU schedule.
TOPOLOGIES = {
    "v5p-256": common.Topology(devices=128, device_memory_gib=95, data=16, fsdp=8, global_batch=256,
                               measured_gib=47.87),
}


def get_config(arg=None):
  arg = common.parse_arg_with_topology(arg, TOPOLOGIES, runlocal=False)
  if arg.runlocal and arg.topology:
    raise ValueError(f"runlocal and topology={arg.topology!r} exclude each other: runlocal is the one-machine run.")
  config = common.perflow_config(total_steps=20 if arg.runlocal else 10_000, log_every=1 if arg.runlocal else 50,
                                 checkpoint_every=10 if arg.runlocal else 500, keep_checkpoints=3)
  config.model.dtype = "bfloat16"  # the reference casts the whole student to bf16; master weights stay float32
  config.model.teacher_dtype = "bfloat16"
  config.model.remat = True  # the reference trains SDXL with gradient checkpointing
  # 128x128 latents at 1024 px: self-attention over 4096 tokens at the second level, as SD1.5's first level at
  # 512 px, where exact query-chunked attention took the step from 40.1 to 14.89 GiB/device (README, Measured).
  config.model.attention = "chunked"
  config.model.attention_query_chunk = 512

  pf = config.perflow
  pf.num_windows = 4
  pf.solver = "ddim"
  pf.solver_steps = 10  # the DDIM stride 1000 // (4 * 10) = 25 is exact: no off-grid steps as with SD1.5's 8
  pf.teacher_guidance = "guided"  # no --cfg_sync: teacher CFG on the full prompt against ""
  pf.teacher_guidance_scale = 7.5
  pf.prediction_type = "ddim_eps"
  pf.t_grid = 200  # --discrete_timesteps 200
  pf.prompt_dropout = 0.1
  pf.zero_snr = False  # the script's --zero_snr (first window from pure noise); off in the released train.sh

  config.optim.learning_rate = 1e-4
  config.optim.warmup_steps = 0  # the reference's constant schedule (its warmup flag had no effect)
  config.optim.weight_decay = 1e-2
  config.optim.grad_clip = 1.0
  config.optim.ema_decay = 0.9999

  config.data.source = "tfds"  # the latent cache holds no pooled embedding: SDXL trains from images
  config.data.resolution = RESOLUTION
  config.data.batch_size = 256
  config.data.worker_count = 8

  config.sample_every = 500
  config.sample.prompts = VALIDATION_PROMPTS
  config.sample.num_steps = (4, 8)
  config.sample.guidance_scale = 2.0
  config.sample.seed = 123456789

  if arg.runlocal:
    config.data.resolution = 512
    config.data.batch_size = 4
    config.data.worker_count = 0
    config.sample_every = 10
    config.sample.prompts = VALIDATION_PROMPTS[:2]
  # The fixed micro-conditioning (orig_h, orig_w, crop_top, crop_left, target_h, target_w), spelled out so that
  # config.json records it; the reference derives it from --resolution, as () would here.
  r = config.data.resolution
  config.model.time_ids = (r, r, 0, 0, r, r)
  common.apply_topology(config, TOPOLOGIES, arg.topology)
  return config
