"""The PeRFlow mathematics as small, pure, jit-able JAX functions.

t in [0, 1], t = 1 is noise, t = 0 is data. See schedule (SD schedule and the t <-> timestep maps), windows
(the K time windows and the training t sampler), solvers (the teacher's window solve), losses (targets, loss,
prompt dropout) and scheduler (the few-step PeRFlow sampler).
"""

from perflow_jax.flow.losses import diffusion_loss
from perflow_jax.flow.losses import drop_prompts
from perflow_jax.flow.losses import interpolate
from perflow_jax.flow.losses import loss_weights
from perflow_jax.flow.losses import perflow_loss
from perflow_jax.flow.losses import perflow_target
from perflow_jax.flow.losses import window_coefficients
from perflow_jax.flow.schedule import add_noise
from perflow_jax.flow.schedule import alpha_bar
from perflow_jax.flow.schedule import alpha_bar_index
from perflow_jax.flow.schedule import sd_alphas_cumprod
from perflow_jax.flow.schedule import student_timestep
from perflow_jax.flow.schedule import teacher_timestep
from perflow_jax.flow.schedule import zero_snr_start
from perflow_jax.flow.scheduler import PeRFlowScheduler
from perflow_jax.flow.solvers import ddim_timesteps
from perflow_jax.flow.solvers import ddim_window_solve
from perflow_jax.flow.solvers import grid_timesteps
from perflow_jax.flow.solvers import guided_eps_fn
from perflow_jax.flow.solvers import guided_model_output
from perflow_jax.flow.solvers import logsnr_timesteps
from perflow_jax.flow.solvers import to_epsilon
from perflow_jax.flow.solvers import window_solve
from perflow_jax.flow.windows import TimeWindows

__all__ = [
    "PeRFlowScheduler",
    "TimeWindows",
    "add_noise",
    "alpha_bar",
    "alpha_bar_index",
    "ddim_timesteps",
    "ddim_window_solve",
    "diffusion_loss",
    "drop_prompts",
    "grid_timesteps",
    "guided_eps_fn",
    "guided_model_output",
    "interpolate",
    "logsnr_timesteps",
    "loss_weights",
    "perflow_loss",
    "perflow_target",
    "sd_alphas_cumprod",
    "student_timestep",
    "teacher_timestep",
    "to_epsilon",
    "window_coefficients",
    "window_solve",
    "zero_snr_start",
]
