"""How many teacher calls per window does DPM-Solver++(2M) need to match the reference's DDIM-8?

For each of the K windows, the teacher's window endpoint is solved with every solver and step count and
compared (RMS over all elements) with a reference endpoint:

  gaussian: x0 ~ N(mu, s^2) per dimension has an exact PF-ODE flow, the affine map that keeps the standardised
    value (z - sqrt(ab) mu) / sqrt(ab s^2 + 1 - ab); its epsilon is exact at every integer timestep, so the
    error is pure solver error. The reference is the closed form.
  unet: a random-weight model shaped like SD's UNet (a tiny perflow_jax.models.unet config when that module is
    importable, else a small random conv net with a timestep embedding). The reference is a 200-step
    DPM-Solver++(2M) solve on the same endpoints.

Run: python -m perflow_jax.flow.solver_study [--models=gaussian,unet] [--max_steps=8] [--json=out.json]

Findings (K = 4, seed 0, CPU): on the Gaussian, 2M with 4 calls per window is below DDIM-8's error in every
window (3 suffice in the two middle windows); the 200-step 2M reference is within 5e-4 of the closed form.
On the random UNet, 2M-4 beats DDIM-8 in the noisiest window, 2M-5 in the middle two, and only 2M-8 in the data
window; its errors are not monotone in the step count, because a random network's output is rough in t (its
sinusoidal time embedding has frequencies up to 1 rad per timestep), which a trained teacher's is not. The
reference's 'ddim' at S = 64 is worse than at S = 5: its stride 3 on a 3.9-timestep grid skips flow.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from perflow_jax.flow import _checks
from perflow_jax.flow.schedule import add_noise, alpha_bar, sd_alphas_cumprod
from perflow_jax.flow.solvers import EpsFn, window_solve
from perflow_jax.flow.windows import TimeWindows

REFERENCE_STEPS = 200
BASELINE = ("ddim", 8)


def gaussian_eps_fn(mu: jax.Array, std: jax.Array, alphas_cumprod: np.ndarray | jax.Array) -> EpsFn:
  """The exact epsilon E[eps | z] for x0 ~ N(mu, std^2) per dimension.

  z = sqrt(ab) x0 + sqrt(1 - ab) eps gives E[eps | z] = sqrt(1 - ab) (z - sqrt(ab) mu) / (ab std^2 + 1 - ab).

  Args:
    mu, std: arrays broadcastable to z's per-example shape [...].
    alphas_cumprod: [n] schedule; timestep -1 reads index 0 as the solvers do.
  """
  ac = jnp.asarray(alphas_cumprod, jnp.float32)

  def eps_fn(z: jax.Array, timestep: jax.Array) -> jax.Array:
    ab = _checks.per_example(ac[jnp.clip(timestep, 0, ac.shape[0] - 1)], z)
    return jnp.sqrt(1.0 - ab) * (z - jnp.sqrt(ab) * mu) / (ab * std ** 2 + 1.0 - ab)

  return eps_fn


def gaussian_window_end(z: jax.Array, alpha_bar_start: jax.Array, alpha_bar_end: jax.Array, mu: jax.Array,
                        std: jax.Array) -> jax.Array:
  """The exact PF-ODE flow of z [B, ...] from alpha_bar_start to alpha_bar_end ([B] each) for Gaussian data."""
  a_s = _checks.per_example(alpha_bar_start, z)
  a_e = _checks.per_example(alpha_bar_end, z)
  u = (z - jnp.sqrt(a_s) * mu) / jnp.sqrt(a_s * std ** 2 + 1.0 - a_s)
  return jnp.sqrt(a_e) * mu + jnp.sqrt(a_e * std ** 2 + 1.0 - a_e) * u


def _window_batch(num_windows: int, per_window: int) -> tuple[jax.Array, jax.Array, np.ndarray]:
  """t_start, t_end [K * M] (window-major, noisiest first) and the window id of each example."""
  tw = TimeWindows(num_windows)
  ids = np.repeat(np.arange(num_windows), per_window)
  return (jnp.asarray(tw.starts[ids], jnp.float32), jnp.asarray(tw.ends[ids], jnp.float32), ids)


def per_window_rms(z: jax.Array, reference: jax.Array, window_ids: np.ndarray, num_windows: int) -> np.ndarray:
  """[K] RMS of z - reference over the examples (and all elements) of each window."""
  sq = np.asarray(jnp.mean(jnp.square(z - reference).reshape(z.shape[0], -1), axis=1), np.float64)
  return np.array([math.sqrt(sq[window_ids == k].mean()) for k in range(num_windows)])


def endpoint_errors(eps_fn: EpsFn, z_start: jax.Array, t_start: jax.Array, t_end: jax.Array,
                    reference: jax.Array, alphas_cumprod: np.ndarray, window_ids: np.ndarray, num_windows: int,
                    runs: Sequence[tuple[str, int]]) -> dict[tuple[str, int], np.ndarray]:
  """{(solver, steps): [K] per-window RMS endpoint error against reference}."""
  out = {}
  for solver, steps in runs:
    solve = jax.jit(lambda z, s, e, solver=solver, steps=steps: window_solve(
        eps_fn, z, s, e, steps, alphas_cumprod, solver=solver, num_windows=num_windows))
    out[(solver, steps)] = per_window_rms(solve(z_start, t_start, t_end), reference, window_ids, num_windows)
  return out


def steps_to_match(errors: dict[tuple[str, int], np.ndarray], solver: str = "dpmpp_2m",
                   baseline: tuple[str, int] = BASELINE) -> dict[str, Any]:
  """Fewest steps of `solver` whose error is <= the baseline's, per window and for all windows at once.

  The REFERENCE_STEPS run (scored only to check the reference) is not a candidate.

  Returns:
    {'per_window': [K] steps (None where no tried count matches), 'all_windows': steps or None}.
  """
  base = errors[baseline]
  tried = sorted(s for (name, s) in errors if name == solver and s != REFERENCE_STEPS)
  per_window = []
  for k in range(base.shape[0]):
    per_window.append(next((s for s in tried if errors[(solver, s)][k] <= base[k]), None))
  all_windows = next((s for s in tried if np.all(errors[(solver, s)] <= base)), None)
  return {"per_window": per_window, "all_windows": all_windows}


def _runs(max_steps: int) -> list[tuple[str, int]]:
  runs = [BASELINE, ("ddim_grid", BASELINE[1])]
  runs += [("dpmpp_2m", s) for s in range(1, max_steps + 1)]
  runs += [("ddim", s) for s in (1, 2, 4) if s != BASELINE[1]]
  return runs


def gaussian_study(num_windows: int = 4, max_steps: int = 8, per_window: int = 2, shape=(8, 8, 4),
                   seed: int = 0) -> dict[tuple[str, int], np.ndarray]:
  """Per-window endpoint errors on Gaussian data against the closed-form flow (see endpoint_errors)."""
  ac = sd_alphas_cumprod()
  k_mu, k_std, k_x, k_n = jax.random.split(jax.random.PRNGKey(seed), 4)
  mu = 0.5 * jax.random.normal(k_mu, shape)
  std = jax.random.uniform(k_std, shape, minval=0.3, maxval=1.5)
  t_start, t_end, ids = _window_batch(num_windows, per_window)
  batch = t_start.shape[0]
  x0 = mu + std * jax.random.normal(k_x, (batch,) + tuple(shape))
  z_start = add_noise(x0, jax.random.normal(k_n, x0.shape), t_start, ac)
  reference = gaussian_window_end(z_start, alpha_bar(t_start, ac), alpha_bar(t_end, ac), mu, std)
  # The 200-step 2M solve is also scored here: it is the reference of the UNet study, so its own error on the
  # closed form says how far that reference can be trusted.
  return endpoint_errors(gaussian_eps_fn(mu, std, ac), z_start, t_start, t_end, reference, ac, ids,
                         num_windows, _runs(max_steps) + [("dpmpp_2m", REFERENCE_STEPS)])


def _random_unet(key: jax.Array, latent_shape: Sequence[int], context_len: int
                 ) -> tuple[Callable[[jax.Array, jax.Array], jax.Array], str]:
  """A random-weight eps model (z [B, H, W, C], timestep int32 [B]) -> eps, and a description."""
  h, w, c = latent_shape
  try:
    from perflow_jax.models.unet import UNet2DConditionModel, UNetConfig  # pylint: disable=g-import-not-at-top
  except ImportError:
    UNet2DConditionModel = None
  if UNet2DConditionModel is not None:
    cfg = UNetConfig(sample_size=h, in_channels=c, out_channels=c, block_out_channels=(32, 64),
                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=(1, 1),
                     transformer_layers_per_block=(1, 1), attention_head_dim=(2, 2), norm_num_groups=8,
                     cross_attention_dim=32)
    model = UNet2DConditionModel(cfg)
    k_init, k_ctx = jax.random.split(key)
    context = jax.random.normal(k_ctx, (1, context_len, cfg.cross_attention_dim))
    params = model.init(k_init, jnp.zeros((1, h, w, c)), jnp.ones((1,)), context)["params"]

    def eps_fn(z, timestep):
      ctx = jnp.broadcast_to(context, (z.shape[0],) + context.shape[1:])
      return model.apply({"params": params}, z, timestep.astype(jnp.float32), ctx)

    return eps_fn, "perflow_jax.models.unet.UNet2DConditionModel, block_out_channels=(32, 64), random init"

  k1, k2, k3 = jax.random.split(key, 3)
  width = 32
  w1 = jax.random.normal(k1, (3, 3, c, width)) / math.sqrt(9 * c)
  w2 = jax.random.normal(k2, (3, 3, width, c)) / math.sqrt(9 * width)
  wt = jax.random.normal(k3, (2 * 16, width)) / math.sqrt(32)

  def conv(x, k):
    return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def eps_fn(z, timestep):
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(16) / 16)
    arg = timestep.astype(jnp.float32)[:, None] * freqs
    temb = jnp.concatenate([jnp.sin(arg), jnp.cos(arg)], axis=1) @ wt
    hidden = jax.nn.silu(conv(z, w1) + temb[:, None, None, :])
    return conv(hidden, w2) + 0.5 * z

  return eps_fn, "random 2-layer conv net with a sinusoidal timestep embedding (models.unet not importable)"


def unet_study(num_windows: int = 4, max_steps: int = 8, per_window: int = 2, shape=(16, 16, 4),
               seed: int = 0) -> tuple[dict[tuple[str, int], np.ndarray], str]:
  """Per-window endpoint errors with a random UNet-shaped teacher against a 200-step 2M reference."""
  ac = sd_alphas_cumprod()
  k_model, k_x, k_n = jax.random.split(jax.random.PRNGKey(seed), 3)
  eps_fn, description = _random_unet(k_model, shape, context_len=8)
  t_start, t_end, ids = _window_batch(num_windows, per_window)
  x0 = jax.random.normal(k_x, (t_start.shape[0],) + tuple(shape))
  z_start = add_noise(x0, jax.random.normal(k_n, x0.shape), t_start, ac)
  reference = jax.jit(lambda z, s, e: window_solve(eps_fn, z, s, e, REFERENCE_STEPS, ac, solver="dpmpp_2m"))(
      z_start, t_start, t_end)
  return endpoint_errors(eps_fn, z_start, t_start, t_end, reference, ac, ids, num_windows,
                         _runs(max_steps)), description


def format_table(errors: dict[tuple[str, int], np.ndarray], num_windows: int) -> str:
  tw = TimeWindows(num_windows)
  head = "solver      steps " + " ".join(f"[{s:.2f},{e:.2f}]" for s, e in zip(tw.starts, tw.ends))
  lines = [head]
  for (solver, steps), err in sorted(errors.items()):
    lines.append(f"{solver:<11} {steps:>5} " + " ".join(f"{v:11.3e}" for v in err))
  return "\n".join(lines)


FLAGS = flags.FLAGS


def _define_flags() -> None:
  # Defined only when run as a script: importing this module (tests, notebooks) must not claim global absl
  # flag names such as --seed that the package's CLIs define.
  flags.DEFINE_list("models", ["gaussian", "unet"], "Teachers to study: gaussian, unet.")
  flags.DEFINE_integer("num_windows", 4, "K.")
  flags.DEFINE_integer("max_steps", 8, "Largest DPM-Solver++(2M) step count tried.")
  flags.DEFINE_integer("seed", 0, "PRNG seed.")
  flags.DEFINE_string("json", None, "Optional path for the results as JSON.")


def main(argv: Sequence[str]) -> None:
  del argv
  results = {}
  for name in FLAGS.models:
    if name == "gaussian":
      errors, what = gaussian_study(FLAGS.num_windows, FLAGS.max_steps, seed=FLAGS.seed), "Gaussian closed form"
    elif name == "unet":
      errors, what = unet_study(FLAGS.num_windows, FLAGS.max_steps, seed=FLAGS.seed)
      what += f"; reference dpmpp_2m x {REFERENCE_STEPS}"
    else:
      raise ValueError(f"Unknown model {name!r} in --models; choose gaussian or unet.")
    match = steps_to_match(errors)
    print(f"== {name}: {what}\nRMS endpoint error per window:\n{format_table(errors, FLAGS.num_windows)}")
    print(f"dpmpp_2m steps matching ddim x 8, per window: {match['per_window']}; all windows: "
          f"{match['all_windows']}\n")
    results[name] = {"teacher": what, "match": match,
                     "errors": {f"{s}_{n}": e.tolist() for (s, n), e in sorted(errors.items())}}
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
