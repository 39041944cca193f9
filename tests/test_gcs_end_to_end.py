"""A run whose workdir and teacher live in a bucket, end to end, against a Cloud Storage emulator on 127.0.0.1.

train (teacher at gs://bucket/teacher, workdir gs://bucket/run) -> SIGTERM -> exit 75 -> train again (resumes) ->
export, sample and evaluate read the gs:// workdir and write into the bucket. The losses equal an uninterrupted run
on local disk; the bucket holds every file WORKSPACE.md promises; no local `gs:` folder appears; and no client
contacted any address but 127.0.0.1.
"""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from unittest import mock

from absl.testing import absltest
import numpy as np

from perflow_jax import evaluate
from perflow_jax import export
from perflow_jax import metrics
from perflow_jax import preemption
from perflow_jax import sample
from perflow_jax import storage
from perflow_jax import trainer
from perflow_jax.weights import io
import gcs_testutil
from trainer_testutil import losses
from trainer_testutil import tiny_config
from trainer_testutil import write_tiny_teacher

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
EVERY = 2
TEACHER = "gs://bucket/teacher"
RUN = "gs://bucket/run"
OUT = "gs://bucket/out"


def _config(pretrained: str):
  config = tiny_config(STEPS, checkpoint_every=EVERY)
  config.model.pretrained = pretrained
  config.perflow.solver_steps = 1  # the test is about storage: a quarter of the teacher's work per step
  return config


def _local_gs_folders(*roots: str) -> list[str]:
  """Folders named like a URL's first segment ('gs:') anywhere under the roots: what os.path on a URL makes."""
  found = []
  for root in roots:
    for dirpath, dirnames, _ in os.walk(root):
      found += [os.path.join(dirpath, d) for d in dirnames if d.startswith("gs:")]
      dirnames[:] = [d for d in dirnames if d not in (".git", "__pycache__")]
  return found


class GcsEndToEndTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp(prefix="perflow_gcs_e2e_")
    cls.gcs = gcs_testutil.GcsEmulator.for_test_class(cls)
    cls.env = {**os.environ, **cls.gcs.env(), "PERFLOW_JAX_CACHE": os.path.join(cls.root, "child_cache")}
    cls.enterClassContext(mock.patch.dict(os.environ, {"PERFLOW_JAX_CACHE": os.path.join(cls.root, "cache")}))
    # The teacher: the tiny config's random initialisation as a diffusers folder, uploaded to the bucket.
    cls.local_teacher = write_tiny_teacher(cls.root)
    storage.copy_folder(cls.local_teacher, TEACHER)
    # The reference: the same run, uninterrupted, on local disk.
    cls.local_run = os.path.join(cls.root, "local_run")
    trainer.train(_config(cls.local_teacher), cls.local_run)

  def _train(self, **popen):
    cmd = [sys.executable, "-m", "perflow_jax.train", "--config=configs/tiny.py", f"--workdir={RUN}",
           f"--config.total_steps={STEPS}", "--config.log_every=1", f"--config.checkpoint_every={EVERY}",
           "--config.mesh.data=8", "--config.mesh.fsdp=1", f"--config.model.pretrained={TEACHER}",
           f"--config.sample_every={STEPS}", "--config.sample.num_steps=(4,)", "--config.perflow.solver_steps=1"]
    return subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, **popen)

  def _committed_steps(self) -> list[int]:
    names = self.gcs.list_objects(f"{RUN}/checkpoints/")
    # On a bucket orbax writes a step in place and marks it finished with commit_success.txt (no rename).
    return sorted({int(m.group(1)) for n in names if (m := re.match(r"run/checkpoints/(\d+)/commit_success.txt$", n))})

  def test_train_preempt_resume_then_export_sample_evaluate_in_the_bucket(self):
    # 1. Train in the bucket; SIGTERM once the first checkpoint is committed: the run saves and exits 75.
    proc = self._train()
    deadline = time.time() + 600
    while not self._committed_steps() and proc.poll() is None and time.time() < deadline:
      time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    self.assertEqual(proc.returncode, preemption.PREEMPTED_EXIT_CODE, err[-3000:])
    stopped_at = self._committed_steps()
    self.assertNotEmpty(stopped_at)
    self.assertLess(stopped_at[-1], STEPS, "SIGTERM came too late to interrupt the run")

    # 2. The same command resumes from the bucket and finishes; the losses equal the uninterrupted local run.
    proc = self._train()
    _, err = proc.communicate(timeout=900)
    self.assertEqual(proc.returncode, 0, err[-3000:])
    self.assertEqual(losses(RUN), losses(self.local_run), f"stopped after {stopped_at}")
    self.assertEqual(sorted(losses(RUN)), list(range(1, STEPS + 1)))

    # 3. export, sample and evaluate read the gs:// workdir and write into the bucket.
    delta_url = export.cli(["export", f"--workdir={RUN}", f"--out={OUT}/delta.safetensors"])
    local_delta = export.cli(["export", f"--workdir={self.local_run}",
                              f"--out={os.path.join(self.root, 'delta.safetensors')}"])
    got, want = io.read_safetensors(delta_url), io.read_safetensors(local_delta)
    self.assertEqual(sorted(got), sorted(want))
    for name in want:
      np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    unet_url = export.cli(["export", f"--workdir={RUN}", f"--out={OUT}/unet", "--format=unet"])
    self.assertEqual(json.loads(storage.read_text(f"{unet_url}/config.json"))["_class_name"], "UNet2DConditionModel")
    result = sample.cli(["sample", f"--workdir={RUN}", f"--out={OUT}/samples", f"--npz={OUT}/samples.npz",
                         "--prompt=a red circle on a blue background", "--num_steps=4", "--batch_size=2"])
    report = evaluate.cli(["evaluate", f"--workdir={RUN}", f"--out={RUN}/eval", "--samplers=ddim-4,perflow-4",
                           "--reference=ddim-4", "--prompts=procedural:2", "--batch_size=2"])
    self.assertEqual(set(report["samplers"]), {"ddim-4", "perflow-4"})

    # 4. The bucket holds what WORKSPACE.md promises (and the CLIs' outputs); nothing went to a local 'gs:' folder.
    names = self.gcs.list_objects("gs://bucket/")
    top = {n.split("/")[1] for n in names if n.startswith("run/")}
    self.assertEqual(top, {"config.json", "checkpoints", "metrics.jsonl", "tensorboard", "samples", "eval"})
    committed = self._committed_steps()  # keep_checkpoints=2: the final step and the one before
    self.assertLen(committed, 2)
    self.assertEqual(committed[-1], STEPS)
    self.assertIn(f"run/samples/step_{STEPS:07d}.png", names)
    for name in ("eval.json", "eval.md", "grid.png", "grid_ddim-4.png", "grid_perflow-4.png"):
      self.assertIn(f"run/eval/{name}", names)
    events = [n for n in names if n.startswith("run/tensorboard/") and "tfevents" in n]
    self.assertNotEmpty(events)
    self.assertIn(b"loss", b"".join(self.gcs.read_bytes(f"gs://bucket/{n}") for n in events))
    for name in ("out/delta.safetensors", "out/unet/diffusion_pytorch_model.safetensors", "out/samples/0000.png", "out/samples/grid.png", "out/samples.npz"):
      self.assertIn(name, names)
    self.assertLen(result["images"], 1)
    self.assertEqual(metrics.read_metrics(RUN)[-1]["step"], STEPS)
    self.assertEqual(_local_gs_folders(REPO, self.root, os.getcwd()), [])
    self.assertEqual(self.gcs.foreign_contacts(), [])


if __name__ == "__main__":
  absltest.main()
