"""A small KL autoencoder for the demo teacher, trained on procedural images: 32x32x3 pixels -> 8x8x4 latents.

The demo runs in latent space like Stable Diffusion, so it exercises exactly the code path of a real SD model
(VAE posterior sampling, latent scaling, decode), and the resulting folder is an ordinary diffusers folder.
The loss is the pixel MSE of the reconstruction from a posterior sample plus a small KL term that keeps the
latents close to N(0, I); like SD, the latents are then rescaled by `scaling_factor = 1 / std(latents)`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from perflow_jax.data import procedural
from perflow_jax.models import vae as vae_lib

# 3 levels: 4x downsampling, so 32 px images give 8x8x4 latents (a UNet forward is then cheap on a CPU); narrow
# full-resolution levels because flat shapes need little capacity there and convolutions there cost the most.
DEMO_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 64), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8,
    sample_size=32, scaling_factor=1.0)


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """KL(N(mean, exp(logvar)) || N(0, I)) summed over latent dims: [B, h, w, c] -> [B]."""
  kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
  return jnp.sum(kl, axis=(1, 2, 3))


def autoencoder_loss(vae: vae_lib.AutoencoderKL, params: Any, images: jax.Array, key: jax.Array,
                     kl_weight: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Reconstruction MSE (per pixel) + kl_weight * KL (per image, summed over latents) / pixels per image."""
  mean, logvar = vae.apply({"params": params}, images, method=vae.encode)
  z = vae_lib.sample_latents(key, mean, logvar, 1.0)
  recon = vae.apply({"params": params}, z, method=vae.decode)
  mse = jnp.mean(jnp.square(recon.astype(jnp.float32) - images))
  kl = jnp.mean(kl_divergence(mean, logvar)) / np.prod(images.shape[1:])
  return mse + kl_weight * kl, {"mse": mse, "kl": kl}


def latent_scaling_factor(vae: vae_lib.AutoencoderKL, params: Any, images: np.ndarray) -> float:
  """1 / std of posterior-mean latents over `images` (how SD's 0.18215 was chosen), rounded to 5 digits."""
  mean, _ = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode))(params, images)
  return float(np.round(1.0 / np.std(np.asarray(mean)), 5))


def train_autoencoder(*, steps: int = 1000, batch_size: int = 32, learning_rate: float = 2e-3,
                      kl_weight: float = 1e-3, seed: int = 0, resolution: int = 32,
                      config: dict[str, Any] | None = None, log_every: int = 100) -> tuple[vae_lib.AutoencoderKL, Any, dict[str, float]]:
  """Trains the demo autoencoder on procedural images (seed `seed`; held-out stats on seed `seed + 1`).

  Returns:
    (module with the fitted scaling_factor in its config, params, stats {'val_mse', 'val_psnr', 'scaling_factor',
    'train_s'}).
  """
  config = dict(DEMO_VAE_CONFIG if config is None else config, sample_size=resolution)
  vae = vae_lib.AutoencoderKL(vae_lib.VAEConfig.from_diffusers_config(config))
  key = jax.random.key(seed)
  params = vae.init(jax.random.fold_in(key, 0), *vae.dummy_inputs(1))["params"]
  schedule = optax.cosine_decay_schedule(learning_rate, steps, alpha=0.05)
  optimizer = optax.adamw(schedule, weight_decay=0.0)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, images, key):
    (loss, aux), grads = jax.value_and_grad(autoencoder_loss, argnums=1, has_aux=True)(
        vae, params, images, key, kl_weight)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, dict(aux, loss=loss)

  rng = np.random.default_rng(seed)
  t0 = time.perf_counter()
  for i in range(steps):
    images = procedural.images_and_labels(seed, rng.integers(0, 2**31 - 1, batch_size), resolution)[0]
    params, opt_state, metrics = step(params, opt_state, images, jax.random.fold_in(key, i + 1))
    if (i + 1) % log_every == 0 or i + 1 == steps:
      logging.info("autoencoder step %d/%d: %s", i + 1, steps,
                   {k: round(float(v), 6) for k, v in jax.device_get(metrics).items()})
  train_s = time.perf_counter() - t0

  held_out, _ = procedural.images_and_labels(seed + 1, range(256), resolution)
  recon = jax.jit(lambda p, x: vae.apply({"params": p}, x))(params, held_out)
  val_mse = float(np.mean(np.square(np.asarray(recon) - held_out)))
  scaling = latent_scaling_factor(vae, params, held_out)
  vae = vae_lib.AutoencoderKL(vae_lib.VAEConfig.from_diffusers_config(dict(config, scaling_factor=scaling)))
  # PSNR on the [0, 1] scale (images are in [-1, 1]: peak-to-peak 2).
  stats = {"val_mse": val_mse, "val_psnr": float(10 * np.log10(4.0 / val_mse)), "scaling_factor": scaling,
           "train_s": train_s}
  return vae, params, stats
