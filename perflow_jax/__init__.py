"""perflow_jax: PeRFlow acceleration of Stable Diffusion in JAX/Flax.

Subpackages (see DESIGN in the README):
  flow      the PeRFlow mathematics as pure, jit-able functions
  models    Flax (Linen, NHWC) UNet, VAE and CLIP text encoder
  weights   PyTorch checkpoints <-> Flax parameter trees
  data      tensorflow-datasets + grain input pipeline
  parallel  device mesh, logical-axis sharding rules
"""

__version__ = "0.1.0"
