"""Small helpers for the config files in configs/: the package's config machinery, re-exported.

  from configs import common

  def get_config(arg=None):
    arg = common.parse_arg(arg, runlocal=False)
    config = common.perflow_config(total_steps=20 if arg.runlocal else 20_000)
    ...
"""

# pylint: disable=unused-import
from perflow_jax.config_lib import base_config
from perflow_jax.config_lib import load_config_json
from perflow_jax.config_lib import parse_arg
from perflow_jax.config_lib import training_schema
from perflow_jax.config_lib import validate
from perflow_jax.run_config import perflow_config
from perflow_jax.run_config import tiny_model
from perflow_jax.run_config import tiny_sdxl_model
from perflow_jax.run_config import validate_run_config
from perflow_jax.topologies import apply_topology
from perflow_jax.topologies import parse_arg_with_topology
from perflow_jax.topologies import Topology
