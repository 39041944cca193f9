r"""PeRFlow on Stable Diffusion 1.5: the reference's SD1.5 recipe (K=4, DDIM-8 per window, cfg_sync, diff_eps).

  python -m perflow_jax.train --config=configs/sd15.py --workdir=gs://BUCKET/runs/sd15 \
      --config.model.pretrained=/path/to/stable-diffusion-v1-5 \
      --config.data.source=tfds --config.data.name=my_laion_subset --config.data.data_dir=gs://BUCKET/tfds

  # the same recipe shrunk for one machine (batch 8, 256 px, 20 steps):
  python -m perflow_jax.train --config=configs/sd15.py:runlocal --workdir=/tmp/sd15_local \
      --config.model.pretrained=/path/to/stable-diffusion-v1-5

  # a topology preset (mesh, global batch, accumulation; see TOPOLOGIES): v5p-128, v5e-256, gpu-4x8, and N
  # slices of one over DCN as NxNAME, e.g. 2xv5p-128
  python -m perflow_jax.train --config=configs/sd15.py:v5e-256 ...

`model.pretrained` takes a diffusers folder, a single-file .safetensors (community fine-tunes) or a directory
written by `python -m perflow_jax.convert`. The reference trained ~4,000 steps at global batch 1024 (README).
"""

from configs import common

# Global batch 1024 (the reference's) on each. measured_gib: `python -m perflow_jax.benchmark --mode=memory
# --config=configs/sd15.py --num_devices=FSDP --per_device_batch=B --config.mesh.data=1 --config.mesh.fsdp=FSDP`
# (+ --config.optim.grad_accum_steps=A where A > 1; B = global / devices, including the accumulation) on
# simulated CPU devices: per-device memory depends on fsdp and the microbatch, not on data (perflow_jax.topologies).
# Every preset keeps the default teacher placement, sharding.teacher='gather_once' (launch/README.md, "Sizing the
# mesh", point 6), and was measured with it (with 'fsdp' before: v5p-128 45.63, v5e-256 13.95, gpu-4x8 50.48).
# fsdp is the smallest that fits (launch/README.md, "Sizing the mesh") and maps onto whole torus axes: on v5p
# (4x4x4 chips in a v5p-128) jax.make_mesh does not split a physical axis, so fsdp is 4, 16 or 64 there.
# Several slices: 'NxNAME' (perflow_jax.topologies), e.g. 2xv5p-128 = 128 chips, data 32 over dcn_data=2 slices,
# fsdp 4 inside each, 8 per chip (at most v5p-128's memory).
TOPOLOGIES = {
    # 64 chips x 95 GiB, 16 examples per chip: --num_devices=4 --per_device_batch=16 --config.mesh.fsdp=4.
    "v5p-128": common.Topology(devices=64, device_memory_gib=95, data=16, fsdp=4, global_batch=1024,
                               measured_gib=45.63),
    # 256 chips x 16 GiB, 4 examples per chip: --num_devices=16 --per_device_batch=4 --config.mesh.fsdp=16. The
    # benchmark's step reads latents; from images the frozen VAE encoder also runs in the step. Two microbatches
    # of 2 (--config.optim.grad_accum_steps=2) measured 14.35 GiB (teacher 'fsdp'): the accumulation loop costs more.
    "v5e-256": common.Topology(devices=256, device_memory_gib=16, data=16, fsdp=16, global_batch=1024,
                               measured_gib=13.87),
    # SLURM, 4 nodes x 8 H100 (80 GiB): FSDP inside a node, data across nodes. JAX gives each GPU host its own
    # slice_index, so the 4 nodes are 4 slices (dcn_data=4). 32 per GPU as 2 microbatches of 16: --num_devices=8
    # --per_device_batch=32 --config.mesh.fsdp=8 --config.optim.grad_accum_steps=2.
    "gpu-4x8": common.Topology(devices=32, device_memory_gib=80, data=4, fsdp=8, dcn_data=4, global_batch=1024,
                               grad_accum_steps=2, measured_gib=50.74),
}

VALIDATION_PROMPTS = (
    "RAW photo, 8k uhd, dslr, high quality, film grain, a portrait of a woman in a garden",
    "RAW photo, 8k uhd, dslr, high quality, film grain, a red sports car on a mountain road",
    "RAW photo, 8k uhd, dslr, high quality, film grain, a cat sleeping on a windowsill",
    "RAW photo, 8k uhd, dslr, high quality, film grain, a lighthouse at sunset",
)


def get_config(arg=None):
  arg = common.parse_arg_with_topology(arg, TOPOLOGIES, runlocal=False)
  if arg.runlocal and arg.topology:
    raise ValueError(f"runlocal and topology={arg.topology!r} exclude each other: runlocal is the one-machine run.")
  config = common.perflow_config(total_steps=20 if arg.runlocal else 10_000, log_every=1 if arg.runlocal else 50,
                                 checkpoint_every=10 if arg.runlocal else 500, keep_checkpoints=3)
  config.model.dtype = "bfloat16"  # student compute; master weights stay float32
  config.model.teacher_dtype = "bfloat16"
  config.model.remat = True
  # Exact attention, 512 queries at a time: the 'xla' path holds float32 logits [B, 8, 4096, 4096] (0.5 GiB per
  # example per self-attention layer at 64x64 latents). Full-size step on 8 simulated devices, FSDP 8, per-device
  # batch 4 (benchmark --mode=memory): 40.1 GiB/device with 'xla', 16.5 with 1024-query chunks, 14.89 with 512.
  config.model.attention = "chunked"
  config.model.attention_query_chunk = 512

  pf = config.perflow
  pf.num_windows = 4
  pf.solver = "ddim"
  pf.solver_steps = 8
  pf.teacher_guidance = "cfg_sync"
  pf.prediction_type = "diff_eps"
  pf.t_grid = 1000
  pf.prompt_dropout = 0.1

  config.optim.learning_rate = 8e-5
  config.optim.warmup_steps = 0  # the reference's constant schedule (its warmup flag had no effect)
  config.optim.weight_decay = 1e-2
  config.optim.grad_clip = 1.0
  config.optim.ema_decay = 0.9999

  config.data.source = "tfds"
  config.data.resolution = 512
  config.data.batch_size = 1024
  config.data.worker_count = 8

  config.sample_every = 500
  config.sample.prompts = VALIDATION_PROMPTS
  config.sample.num_steps = (4, 8)
  config.sample.guidance_scale = 4.5
  config.sample.seed = 123456789

  if arg.runlocal:
    config.data.resolution = 256
    config.data.batch_size = 8
    config.data.worker_count = 0
    config.sample_every = 10
    config.sample.prompts = VALIDATION_PROMPTS[:2]
  common.apply_topology(config, TOPOLOGIES, arg.topology)
  return config
