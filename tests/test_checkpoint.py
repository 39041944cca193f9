"""Checkpoints: sharded bit-exact round trip, keep-last-N, damaged-checkpoint fallback, SIGTERM save."""

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

from absl.testing import absltest
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from perflow_jax import checkpoint

REPO = pathlib.Path(__file__).resolve().parents[1]


def _config(every=2, keep=2):
  return ml_collections.ConfigDict({"checkpoint_every": every, "keep_checkpoints": keep, "seed": 7,
                                    "model": {"channels": (32, 64)}})


def _mesh(shape):
  return jax.make_mesh(shape, ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)


def _state(mesh, scale=1.0):
  """A train-state-like tree: sharded params, an optimizer moment, an int step, a replicated scalar."""
  w = jax.device_put(scale * jnp.arange(64.0, dtype=jnp.float32).reshape(8, 8) / 7.0,
                     NamedSharding(mesh, P(None, "fsdp")))
  b = jax.device_put(jnp.linspace(-1, 1, 16, dtype=jnp.float32) * scale, NamedSharding(mesh, P(("data", "fsdp"))))
  mu = jax.device_put(jnp.full((8, 8), 0.5 * scale, jnp.bfloat16), NamedSharding(mesh, P("fsdp", None)))
  count = jax.device_put(jnp.int32(11), NamedSharding(mesh, P()))
  return {"params": {"w": w, "b": b}, "opt": {"mu": mu, "count": count}, "step": 5}


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype,
                                                     sharding=getattr(x, "sharding", None)), tree)


def _tempdir(test):
  """A fresh directory removed after the test (absltest's create_tempdir needs parsed absl flags)."""
  path = tempfile.mkdtemp(prefix="perflow_ckpt_")
  test.addCleanup(shutil.rmtree, path, ignore_errors=True)
  return path


def _iterator(skip):
  it = iter(grain.MapDataset.range(1000).shuffle(seed=3).to_iter_dataset())
  for _ in range(skip):
    next(it)
  return it


class CheckpointTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.workdir = _tempdir(self)
    self.mesh = _mesh((2, 4))

  def _save_steps(self, steps, config=None, data=True):
    config = config or _config()
    manager = checkpoint.make_checkpoint_manager(self.workdir, config)
    saved = []
    for step in steps:
      state = _state(self.mesh, scale=float(step))
      if checkpoint.save_checkpoint(manager, step, state, state["params"], config,
                                    _iterator(step) if data else None):
        saved.append(step)
    checkpoint.close(manager)
    return saved

  def test_round_trip_is_bit_exact_and_sharded(self):
    config = _config()
    state = _state(self.mesh, scale=3.0)
    ema = jax.tree.map(lambda x: x * 0.25, state["params"])
    it = _iterator(13)
    manager = checkpoint.make_checkpoint_manager(self.workdir, config)
    self.assertTrue(checkpoint.save_checkpoint(manager, 4, state, ema, config, it))
    expected_next = [next(it) for _ in range(3)]
    checkpoint.close(manager)

    fresh_it = _iterator(0)
    manager = checkpoint.make_checkpoint_manager(self.workdir, config)
    restored = checkpoint.restore_checkpoint(manager, _abstract(state), _abstract(ema), fresh_it)
    checkpoint.close(manager)
    self.assertEqual(restored.step, 4)
    self.assertEqual(restored.state["step"], 5)
    for got, want in zip(jax.tree.leaves(restored.state), jax.tree.leaves(state)):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
      if hasattr(want, "sharding"):
        self.assertEqual(got.sharding, want.sharding)
        self.assertEqual(got.dtype, want.dtype)
    for got, want in zip(jax.tree.leaves(restored.ema), jax.tree.leaves(ema)):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    self.assertEqual(restored.state["opt"]["mu"].dtype, jnp.bfloat16)
    # The iterator continues exactly where the saved one stopped.
    self.assertEqual([next(fresh_it) for _ in range(3)], expected_next)
    self.assertEqual(restored.config, {"checkpoint_every": 2, "keep_checkpoints": 2, "seed": 7,
                                       "model": {"channels": [32, 64]}})
    self.assertEqual(checkpoint.saved_config(self.workdir)["seed"], 7)

  def test_restore_into_another_mesh_reshards(self):
    self._save_steps([2])
    other = _mesh((1, 8))
    target = _state(other)
    target_shardings = {"params": {"w": NamedSharding(other, P("fsdp", None)),
                                   "b": NamedSharding(other, P())}}
    abstract = _abstract(target)
    abstract["params"] = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                      abstract["params"], target_shardings["params"])
    manager = checkpoint.make_checkpoint_manager(self.workdir, _config())
    restored = checkpoint.restore_checkpoint(manager, abstract, abstract["params"])
    checkpoint.close(manager)
    self.assertEqual(restored.state["params"]["w"].sharding.spec, P("fsdp", None))
    self.assertEqual(restored.state["params"]["w"].addressable_shards[0].data.shape, (1, 8))
    np.testing.assert_array_equal(np.asarray(restored.state["params"]["w"]),
                                  np.asarray(_state(self.mesh, 2.0)["params"]["w"]))

  def test_interval_and_keep_last_n(self):
    saved = self._save_steps(range(1, 9), _config(every=2, keep=2))
    self.assertEqual(saved, [2, 4, 6, 8])
    manager = checkpoint.make_checkpoint_manager(self.workdir, _config(every=2, keep=2))
    self.assertEqual(sorted(manager.all_steps()), [6, 8])
    # A forced save off the interval (preemption) is written and counts against keep-last-N.
    state = _state(self.mesh, 9.0)
    self.assertTrue(checkpoint.save_checkpoint(manager, 9, state, state["params"], _config(), force=True))
    self.assertFalse(checkpoint.save_checkpoint(manager, 9, state, state["params"], _config(), force=True))
    checkpoint.wait_until_finished(manager)
    self.assertEqual(sorted(manager.all_steps()), [8, 9])
    restored = checkpoint.restore_checkpoint(manager, _abstract(state), _abstract(state["params"]))
    checkpoint.close(manager)
    self.assertEqual(restored.step, 9)
    # Step 9 had no iterator: its data item is absent, and restoring it with an iterator only warns.
    manager = checkpoint.make_checkpoint_manager(self.workdir, _config(every=2, keep=2))
    it = _iterator(0)
    with self.assertLogs(level="WARNING") as logs:
      restored = checkpoint.restore_checkpoint(manager, _abstract(state), _abstract(state["params"]), it)
    checkpoint.close(manager)
    self.assertEqual(restored.step, 9)
    self.assertIn("no data iterator state", "\n".join(logs.output))

  def test_empty_workdir_restores_nothing(self):
    manager = checkpoint.make_checkpoint_manager(self.workdir, _config())
    state = _state(self.mesh)
    self.assertIsNone(checkpoint.restore_checkpoint(manager, _abstract(state), _abstract(state["params"])))
    checkpoint.close(manager)
    self.assertIsNone(checkpoint.saved_config(_tempdir(self)))

  def _restore_after(self, corrupt):
    self._save_steps([2, 4])
    corrupt(pathlib.Path(self.workdir) / "checkpoints" / "4")
    manager = checkpoint.make_checkpoint_manager(self.workdir, _config())
    state = _state(self.mesh)
    it = _iterator(0)
    with self.assertLogs(level="WARNING") as logs:
      restored = checkpoint.restore_checkpoint(manager, _abstract(state), _abstract(state["params"]), it)
    steps_after = sorted(manager.all_steps())
    checkpoint.close(manager)
    return restored, "\n".join(logs.output), steps_after, it

  def test_truncated_array_file_falls_back_to_previous(self):
    def truncate(step_dir):
      files = [f for f in step_dir.glob("state/d/*") if f.is_file()]
      self.assertNotEmpty(files)
      for f in files:
        f.write_bytes(f.read_bytes()[:10])
    restored, logs, steps_after, it = self._restore_after(truncate)
    self.assertEqual(restored.step, 2)
    np.testing.assert_array_equal(np.asarray(restored.state["params"]["w"]),
                                  np.asarray(_state(self.mesh, 2.0)["params"]["w"]))
    self.assertIn("Checkpoint step 4", logs)
    self.assertEqual(steps_after, [2])  # The damaged step is out of orbax's view, so step 4 can be saved again ...
    moved = pathlib.Path(self.workdir) / "checkpoints_damaged" / "4"  # ... and moved aside, not deleted.
    self.assertTrue((moved / "state").is_dir())
    self.assertIn("Moved unreadable checkpoint step 4", logs)
    self.assertEqual(next(it), next(_iterator(2)))

  def test_deleted_metadata_file_falls_back_to_previous(self):
    def delete(step_dir):
      (step_dir / "ema" / "_METADATA").unlink()
      for f in step_dir.glob("ema/**/manifest.ocdbt"):
        f.unlink()
    restored, logs, steps_after, _ = self._restore_after(delete)
    self.assertEqual(restored.step, 2)
    self.assertIn("cannot be restored", logs)
    self.assertEqual(steps_after, [2])
    self.assertTrue((pathlib.Path(self.workdir) / "checkpoints_damaged" / "4" / "ema").is_dir())

  def test_all_damaged_raises_naming_the_directory(self):
    self._save_steps([2])
    for f in (pathlib.Path(self.workdir) / "checkpoints" / "2").glob("state/d/*"):
      f.write_bytes(b"")
    manager = checkpoint.make_checkpoint_manager(self.workdir, _config())
    state = _state(self.mesh)
    with self.assertRaisesRegex(checkpoint.CheckpointUnreadableError, r"No checkpoint in .*checkpoints.*step 2"):
      with self.assertLogs(level="WARNING"):
        checkpoint.restore_checkpoint(manager, _abstract(state), _abstract(state["params"]))
    checkpoint.close(manager)

  def test_config_check_error_propagates(self):
    self._save_steps([2])

    def check(saved, step):
      self.assertEqual(step, 2)
      if saved["model"]["channels"] != [32, 128]:
        raise ValueError(f"model.channels {saved['model']['channels']} != [32, 128]")

    manager = checkpoint.make_checkpoint_manager(self.workdir, _config())
    state = _state(self.mesh)
    with self.assertRaisesRegex(ValueError, r"model.channels \[32, 64\]"):
      checkpoint.restore_checkpoint(manager, _abstract(state), _abstract(state["params"]), check_config=check)
    checkpoint.close(manager)

  def test_bad_options_raise(self):
    with self.assertRaisesRegex(ValueError, "checkpoint_every=0"):
      checkpoint.make_checkpoint_manager(self.workdir, _config(every=0))
    with self.assertRaisesRegex(ValueError, "keep_checkpoints=0"):
      checkpoint.make_checkpoint_manager(self.workdir, _config(keep=0))


_SIGTERM_SCRIPT = textwrap.dedent("""
    import pathlib, sys, time
    import jax, jax.numpy as jnp, ml_collections
    from perflow_jax import checkpoint, preemption
    workdir = pathlib.Path(sys.argv[1])
    config = ml_collections.ConfigDict({"checkpoint_every": 1000, "keep_checkpoints": 2, "total_steps": 10**6})
    manager = checkpoint.make_checkpoint_manager(workdir, config)
    preempted = preemption.install_handlers()
    state = {"w": jnp.zeros((4,), jnp.float32), "step": 0}
    for step in range(1, config.total_steps + 1):
      state = {"w": state["w"] + 1.0, "step": step}
      if step == 3:
        (workdir / "running").write_text("ok")
      if preempted(step):
        checkpoint.save_checkpoint(manager, step, state, state, config, force=True)
        break
      time.sleep(0.01)
    checkpoint.close(manager)
    (workdir / "stopped_at").write_text(str(step))
""")


class SigtermTest(absltest.TestCase):

  def test_sigterm_saves_current_step(self):
    workdir = pathlib.Path(_tempdir(self))
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", XLA_FLAGS="")
    log_path = workdir / "script.log"
    with open(log_path, "wb") as log:  # A file, not a pipe: an unread pipe could fill up and block the script.
      proc = subprocess.Popen([sys.executable, "-c", _SIGTERM_SCRIPT, str(workdir)], env=env, stdout=log,
                              stderr=subprocess.STDOUT)
      self.addCleanup(lambda: proc.poll() is None and proc.kill())
      deadline = time.time() + 120
      while not (workdir / "running").exists():
        if proc.poll() is not None:
          self.fail(f"the script exited early: {log_path.read_text()[-3000:]}")
        self.assertLess(time.time(), deadline, "the script did not start training within 120 s")
        time.sleep(0.05)
      proc.send_signal(signal.SIGTERM)
      proc.wait(timeout=120)
    self.assertEqual(proc.returncode, 0, log_path.read_text()[-3000:])
    stopped_at = int((workdir / "stopped_at").read_text())
    self.assertGreaterEqual(stopped_at, 3)
    manager = checkpoint.make_checkpoint_manager(workdir, ml_collections.ConfigDict(
        {"checkpoint_every": 1000, "keep_checkpoints": 2}))
    self.assertEqual(manager.all_steps(), [stopped_at])
    abstract = {"w": jax.ShapeDtypeStruct((4,), jnp.float32), "step": 0}
    restored = checkpoint.restore_checkpoint(manager, abstract, abstract)
    checkpoint.close(manager)
    self.assertEqual(restored.state["step"], stopped_at)
    np.testing.assert_array_equal(np.asarray(restored.state["w"]), np.full((4,), float(stopped_at), np.float32))


if __name__ == "__main__":
  absltest.main()
