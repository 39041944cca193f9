"""Nothing lost, nothing trusted blindly: damaged checkpoints, changed configs on resume, two jobs on one workdir,
and the read-only tools (issue 17; the data builds are in test_bad_inputs_data.py, the CLI messages in
test_cli_errors.py).

One tiny run (3 steps, a checkpoint at each) is trained once; every case works on a copy of it.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from absl.testing import absltest
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from perflow_jax import checkpoint
from perflow_jax import export
from perflow_jax import fingerprint
from perflow_jax import run_config
from perflow_jax import trainer
from perflow_jax import workdir_lock
from trainer_testutil import losses
from trainer_testutil import tiny_config


def _flip_bytes(path: str, count: int = 4096) -> None:
  """Inverts `count` bytes in the middle of a file, as a bad disk or a careless edit would."""
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    start = max(0, len(data) // 2 - count // 2)
    for i in range(start, min(len(data), start + count)):
      data[i] ^= 0xFF
    f.seek(0)
    f.write(data)


def _change_one_value(item_dir: str) -> None:
  """Rewrites a checkpoint item with one float changed: files that read back without error, different content."""
  checkpointer = ocp.StandardCheckpointer()
  tree = checkpointer.restore(item_dir)
  leaves, treedef = jax.tree.flatten(tree)
  first = next(i for i, x in enumerate(leaves) if np.asarray(x).dtype == np.float32 and np.size(x) > 1)
  changed = np.array(leaves[first])
  changed.flat[0] += 1.0
  leaves[first] = changed
  scratch = item_dir + ".rewritten"
  checkpointer.save(scratch, jax.tree.unflatten(treedef, leaves))
  checkpointer.wait_until_finished()
  checkpointer.close()
  shutil.rmtree(item_dir)
  os.rename(scratch, item_dir)


def _largest_file(folder: str) -> str:
  files = [os.path.join(d, f) for d, _, names in os.walk(folder) for f in names]
  return max(files, key=os.path.getsize)


def _config(total_steps: int) -> ml_collections.ConfigDict:
  config = tiny_config(total_steps, checkpoint_every=1)
  config.keep_checkpoints = 3
  return config


class TrainedRunTest(absltest.TestCase):
  """Cases that need a real run's checkpoints."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp(prefix="perflow_bad_inputs_")
    cls.base = os.path.join(cls.root, "base")
    trainer.train(_config(3), cls.base)

  def _copy(self, name: str) -> str:
    target = os.path.join(self.root, name)
    shutil.copytree(self.base, target)
    return target

  def test_damaged_steps_fall_back_to_the_newest_intact_one_and_harmless_changes_resume(self):
    workdir = self._copy("damaged")
    # Step 3: 4 KiB inverted inside the compressed array data (the read fails, or returns other values).
    _flip_bytes(_largest_file(os.path.join(workdir, "checkpoints", "3", "state")))
    # Step 2: arrays that read back fine but differ from what was saved (one value): only the fingerprint sees it.
    _change_one_value(os.path.join(workdir, "checkpoints", "2", "state"))
    config = _config(3)
    config.log_every = 2  # harmless changes: resumed, logged, the previous config.json kept
    config.optim.learning_rate = 5e-4
    with self.assertLogs(level="WARNING") as logs:
      trainer.train(config, workdir)
    text = "\n".join(logs.output)
    self.assertRegex(text, r"step 3 .*cannot be restored \(item 'state' (cannot be read|does not match the fingerprint)")
    self.assertRegex(text, r"step 2 .*cannot be restored \(item 'state' does not match the fingerprint saved with "
                           r"it: 1 array\(s\) differ \(\S+: content differs from what was saved")
    self.assertIn("changed config field: log_every: 1 -> 2", text)
    # Both moved aside, not deleted; resumed from step 1, so step 2 trained again to the uninterrupted run's loss.
    self.assertEqual(sorted(os.listdir(os.path.join(workdir, "checkpoints_damaged"))), ["2", "3"])
    self.assertEqual(sorted(os.listdir(os.path.join(workdir, "checkpoints"))), ["1", "2", "3"])
    np.testing.assert_allclose(losses(workdir)[2], losses(self.base)[2], rtol=1e-6)
    with open(os.path.join(workdir, "config.json")) as f:
      self.assertEqual(json.load(f)["log_every"], 2)
    with open(os.path.join(workdir, "config.before_step_1.json")) as f:
      self.assertEqual(json.load(f)["log_every"], 1)

  def test_damaged_or_changed_ema_is_refused_by_export(self):
    workdir = self._copy("changed_ema")
    _change_one_value(os.path.join(workdir, "checkpoints", "3", "ema"))
    with self.assertRaisesRegex(ValueError, r"step 3 .*'ema' does not match the fingerprint saved with it"):
      export.load_run(workdir, "ema")
    # Inverted bytes: tensorstore either fails the read or (as here, in one of the chunks) returns other values.
    _flip_bytes(_largest_file(os.path.join(workdir, "checkpoints", "3", "ema")))
    with self.assertRaisesRegex(ValueError, r"step 3 .*(cannot be read \(the files are damaged|'ema' does not match "
                                            r"the fingerprint).*Move .*checkpoints/3 to .*checkpoints_damaged/"):
      export.load_run(workdir, "ema")
    # Moved aside as the message says, the intact step 2 is read.
    os.makedirs(os.path.join(workdir, "checkpoints_damaged"))
    shutil.move(os.path.join(workdir, "checkpoints", "3"), os.path.join(workdir, "checkpoints_damaged", "3"))
    self.assertEqual(export.load_run(workdir, "ema").step, 2)

  def test_a_config_that_trains_something_else_is_refused_before_any_model_loads(self):
    workdir = self._copy("changed")
    with open(os.path.join(workdir, "config.json")) as f:
      before = f.read()
    config = _config(4)
    config.perflow.num_windows = 2
    config.data.batch_size = 4
    started = time.perf_counter()
    with self.assertRaises(run_config.ResumeConfigError) as raised:
      trainer.train(config, workdir)
    self.assertLess(time.perf_counter() - started, 10.0)  # refused from the checkpoint's JSON, no model built
    message = str(raised.exception)
    self.assertIn("data.batch_size: 8 -> 4", message)
    self.assertIn("perflow.num_windows: 4 -> 2", message)
    self.assertIn("new --workdir", message)
    with open(os.path.join(workdir, "config.json")) as f:
      self.assertEqual(f.read(), before)  # a refused start leaves config.json alone
    self.assertFalse(os.path.exists(os.path.join(workdir, workdir_lock.LOCK_FILENAME)))  # and releases the lock

  def test_a_second_job_on_the_workdir_is_refused(self):
    workdir = self._copy("locked")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    self.addCleanup(holder.kill)
    with open(os.path.join(workdir, workdir_lock.LOCK_FILENAME), "w") as f:
      json.dump({"host": socket.gethostname(), "pid": holder.pid, "started": time.time(),
                 "heartbeat": time.time(), "token": "other"}, f)
    with self.assertRaisesRegex(workdir_lock.WorkdirLockedError, rf"in use by another training job .*pid {holder.pid}"):
      trainer.train(_config(4), workdir)
    self.assertEqual(sorted(os.listdir(os.path.join(workdir, "checkpoints"))), ["1", "2", "3"])  # nothing touched
    with open(os.path.join(workdir, workdir_lock.LOCK_FILENAME)) as f:
      self.assertEqual(json.load(f)["token"], "other")

  def test_read_only_tools_fail_fast_without_a_checkpoint_and_write_nothing(self):
    workdir = self._copy("no_checkpoint")
    shutil.rmtree(os.path.join(workdir, "checkpoints"))
    shutil.rmtree(os.path.join(workdir, "tokenizer"))
    started = time.perf_counter()
    with self.assertRaisesRegex(ValueError, "has no checkpoint"):
      export.load_run(workdir, "ema")
    self.assertLess(time.perf_counter() - started, 5.0)
    export.load_run(workdir, "teacher")
    self.assertFalse(os.path.exists(os.path.join(workdir, "tokenizer")))  # reading a run does not write into it


def _mesh():
  return jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)


class FingerprintTest(absltest.TestCase):

  def test_closed_form_of_a_small_leaf(self):
    x = np.array([[1.5, -2.0], [0.0, 3.25]], np.float32)
    words = x.view(np.uint32).astype(np.uint64).ravel()
    weights = (np.arange(4, dtype=np.uint64) * 0x9E3779B1 % 2**32) | 1
    expected = [int(words.sum() % 2**32), int((words * weights).sum() % 2**32), 0]
    self.assertEqual(fingerprint.fingerprint({"x": jnp.asarray(x)}), {"x": expected})

  def test_independent_of_sharding_and_sensitive_to_one_bit_and_a_swap(self):
    values = jax.random.normal(jax.random.key(0), (16, 24), jnp.float32)
    sharded = jax.device_put(values, NamedSharding(_mesh(), P("fsdp", "data")))
    reference = fingerprint.fingerprint({"w": values})
    self.assertEqual(fingerprint.fingerprint({"w": sharded}), reference)
    bits = np.asarray(values).view(np.uint32).copy()
    bits[7, 5] ^= 1 << 3
    flipped = fingerprint.fingerprint({"w": jnp.asarray(bits.view(np.float32))})
    self.assertNotEqual(flipped["w"][1], reference["w"][1])
    swapped = np.asarray(values).copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    self.assertEqual(fingerprint.fingerprint({"w": jnp.asarray(swapped)})["w"][0], reference["w"][0])  # same sum
    self.assertNotEqual(fingerprint.fingerprint({"w": jnp.asarray(swapped)})["w"][1], reference["w"][1])

  def test_counts_non_finite_values_in_every_float_dtype(self):
    tree = {"a": jnp.array([1.0, jnp.nan, jnp.inf], jnp.bfloat16), "b": jnp.array([0.0, -jnp.inf], jnp.float16),
            "c": jnp.arange(3, dtype=jnp.int32)}
    self.assertEqual(fingerprint.nonfinite_leaves(fingerprint.fingerprint(tree)), {"a": 2, "b": 1})


class CheckpointChecksTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.workdir = tempfile.mkdtemp(prefix="perflow_ckpt_checks_")
    self.addCleanup(shutil.rmtree, self.workdir, ignore_errors=True)
    self.config = ml_collections.ConfigDict({"checkpoint_every": 1, "keep_checkpoints": 2})

  def _save(self, state, ema):
    manager = checkpoint.make_checkpoint_manager(self.workdir, self.config)
    checkpoint.save_checkpoint(manager, 1, state, ema, self.config, force=True)
    checkpoint.close(manager)

  def test_another_architecture_is_named_and_not_treated_as_damage(self):
    self._save({"w": jnp.zeros((4, 2))}, {"w": jnp.zeros((4, 2))})
    abstract = {"w": jax.ShapeDtypeStruct((8, 2), jnp.float32)}
    manager = checkpoint.make_checkpoint_manager(self.workdir, self.config)
    with self.assertRaisesRegex(checkpoint.CheckpointArchitectureError,
                                r"another architecture .*state/w: saved float32\[4,2\], this run float32\[8,2\]"):
      checkpoint.restore_checkpoint(manager, abstract, abstract)
    checkpoint.close(manager)
    self.assertEqual(os.listdir(os.path.join(self.workdir, "checkpoints")), ["1"])  # left where it is

  def test_non_finite_weights_are_refused(self):
    ema = {"w": jnp.array([1.0, jnp.nan, 2.0])}
    self._save({"w": jnp.zeros(3)}, ema)
    with self.assertRaisesRegex(ValueError, r"step 1 .*'ema' weights hold 1 NaN/inf value\(s\) in 1 array"):
      checkpoint.restore_ema_params(self.workdir, {"w": jax.ShapeDtypeStruct((3,), jnp.float32)})


class WorkdirLockTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.workdir = tempfile.mkdtemp(prefix="perflow_lock_")
    self.addCleanup(shutil.rmtree, self.workdir, ignore_errors=True)
    self.path = os.path.join(self.workdir, workdir_lock.LOCK_FILENAME)

  def _holder(self, **fields):
    record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "heartbeat": time.time(),
              "token": "other"}
    record.update(fields)
    with open(self.path, "w") as f:
      json.dump(record, f)

  def test_acquire_and_release(self):
    lock = workdir_lock.WorkdirLock(self.workdir)
    lock.acquire()
    with open(self.path) as f:
      held = json.load(f)
    self.assertEqual((held["host"], held["pid"]), (socket.gethostname(), os.getpid()))
    with self.assertRaises(workdir_lock.WorkdirLockedError):
      workdir_lock.WorkdirLock(self.workdir).acquire()
    lock.release()
    self.assertFalse(os.path.exists(self.path))

  def test_a_dead_process_on_this_host_is_taken_over(self):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    self._holder(pid=gone.pid)
    with self.assertLogs(level="WARNING") as logs:
      with workdir_lock.WorkdirLock(self.workdir):
        pass
    self.assertIn(f"process {gone.pid} on this host no longer runs", "\n".join(logs.output))

  def test_another_host_is_stale_only_after_the_heartbeat_timeout(self):
    self._holder(host="worker-7", pid=1, heartbeat=time.time() - 30)
    with self.assertRaisesRegex(workdir_lock.WorkdirLockedError, r"host 'worker-7', pid 1"):
      workdir_lock.WorkdirLock(self.workdir).acquire()
    self._holder(host="worker-7", pid=1, heartbeat=time.time() - workdir_lock.STALE_SECONDS - 1)
    with self.assertLogs(level="WARNING"):
      with workdir_lock.WorkdirLock(self.workdir):
        pass

  def test_release_leaves_another_jobs_lock(self):
    lock = workdir_lock.WorkdirLock(self.workdir)
    lock.acquire()
    self._holder(token="other")  # e.g. taken over after our heartbeat went stale
    lock.release()
    with open(self.path) as f:
      self.assertEqual(json.load(f)["token"], "other")

  def test_a_file_shaped_or_uncreatable_workdir_is_named(self):
    as_file = os.path.join(self.workdir, "a_file")
    open(as_file, "w").close()
    with self.assertRaisesRegex(NotADirectoryError, r"--workdir=.*a_file is a file"):
      workdir_lock.WorkdirLock(as_file).acquire()
    with self.assertRaisesRegex(OSError, r"cannot create or write --workdir=.*a_file/run"):
      workdir_lock.WorkdirLock(os.path.join(as_file, "run")).acquire()


class ResumeChangesTest(absltest.TestCase):

  def test_fixed_and_harmless_fields(self):
    old = json.loads(json.dumps(tiny_config(4).to_dict()))
    new = tiny_config(8)
    new.optim.b2 = 0.99
    new.model.unet.block_out_channels = (16, 32)
    new.mesh.fsdp = 2
    refused, allowed = run_config.resume_changes(old, new)
    self.assertEqual([line.split(":")[0] for line in refused], ["model.unet.block_out_channels", "optim.b2"])
    self.assertEqual([line.split(":")[0] for line in allowed], ["checkpoint_every", "mesh.fsdp", "total_steps"])

  def test_fields_newer_than_the_checkpoint_read_as_their_old_meaning(self):
    old = json.loads(json.dumps(tiny_config(4).to_dict()))
    del old["mesh"]["dcn_data"], old["perflow"]["zero_snr"]
    self.assertEqual(run_config.resume_changes(old, tiny_config(4)), ([], []))
    new = tiny_config(4)
    new.perflow.zero_snr = True
    new.mesh.dcn_data = 2
    refused, allowed = run_config.resume_changes(old, new)
    self.assertEqual(refused, ["perflow.zero_snr: false -> true"])
    self.assertEqual(allowed, ["mesh.dcn_data: 1 -> 2"])


if __name__ == "__main__":
  absltest.main()
