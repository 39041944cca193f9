"""Preemption signals in one process: SIGTERM and a first Ctrl-C ask for a save; a second Ctrl-C aborts."""

import os
import signal
from unittest import mock

from absl.testing import absltest
import jax

from perflow_jax import preemption
from perflow_jax.parallel import distributed


class HandlersTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    for signum in (signal.SIGINT, signal.SIGTERM):
      self.addCleanup(signal.signal, signum, signal.getsignal(signum))

  def test_sigterm_asks_for_a_save(self):
    preempted = preemption.install_handlers()
    self.assertFalse(preempted(1))
    with self.assertLogs(level="WARNING") as logs:
      os.kill(os.getpid(), signal.SIGTERM)  # Python runs the handler before the next bytecode
      self.assertTrue(preempted(2))
    self.assertIn("saving a checkpoint", "\n".join(logs.output))
    self.assertTrue(preempted(3))

  def test_first_ctrl_c_saves_second_aborts(self):
    preempted = preemption.install_handlers()
    with self.assertLogs(level="WARNING") as logs:
      os.kill(os.getpid(), signal.SIGINT)
      self.assertTrue(preempted(5))
    self.assertIn("Press Ctrl-C again to abort", "\n".join(logs.output))
    with self.assertRaisesRegex(KeyboardInterrupt, "second Ctrl-C"):
      os.kill(os.getpid(), signal.SIGINT)
      preempted(6)

  def test_ctrl_c_goes_through_jax_notifier_when_the_runtime_runs(self):
    # With the distributed runtime JAX's notifier owns SIGTERM; Ctrl-C is turned into a SIGTERM to this process.
    sigterm_before = signal.getsignal(signal.SIGTERM)
    with mock.patch.object(distributed, "preemption_sync_available", return_value=True), \
        mock.patch.object(preemption.multihost_utils, "reached_preemption_sync_point", return_value=True) as sync, \
        mock.patch.object(preemption.os, "kill") as kill:
      preempted = preemption.install_handlers()
      self.assertEqual(signal.getsignal(signal.SIGTERM), sigterm_before)  # left to JAX
      signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
      kill.assert_called_once_with(os.getpid(), signal.SIGTERM)
      self.assertTrue(preempted(7))
      sync.assert_called_once_with(7)

  def test_several_processes_without_the_preemption_service_fail_clearly(self):
    with mock.patch.object(jax, "process_count", return_value=4):
      with self.assertRaisesRegex(RuntimeError, "4 processes run without JAX's preemption service"):
        preemption.install_handlers()

  def test_exit_status_and_message(self):
    self.assertEqual(preemption.PREEMPTED_EXIT_CODE, 75)
    e = preemption.Preempted(12, "/runs/a")
    self.assertEqual(e.step, 12)
    self.assertIn("checkpoint of step 12 saved in /runs/a; run the same command again to resume", str(e))


if __name__ == "__main__":
  absltest.main()
