"""PyTorch checkpoints <-> Flax parameter trees.

  load_pretrained(path, dtype)   diffusers folder | single-file LDM checkpoint | converted dir -> `Pretrained`
  export_*_state_dict(params)    Flax params -> diffusers/transformers state dicts; write_single_file(...)
  names / single_file / io       the naming rules, the LDM renames and the weight-file readers underneath
"""

from perflow_jax.weights.export import export_state_dict
from perflow_jax.weights.export import export_text_state_dict
from perflow_jax.weights.export import export_unet_state_dict
from perflow_jax.weights.export import export_vae_state_dict
from perflow_jax.weights.export import params_from_state_dict
from perflow_jax.weights.export import write_single_file
from perflow_jax.weights.names import ConversionError
from perflow_jax.weights.pretrained import load_pretrained
from perflow_jax.weights.pretrained import Pretrained

__all__ = [
    "ConversionError", "Pretrained", "export_state_dict", "export_text_state_dict", "export_unet_state_dict",
    "export_vae_state_dict", "load_pretrained", "params_from_state_dict", "write_single_file",
]
