"""Errors for people: a user error ends every CLI in one message and exit status 2, the traceback on request.

Five real CLI runs (each fails before any model is built; started together, they share the imports' wait), the rest
in-process through `perflow_jax.cli`'s parse and report functions.
"""

import errno
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from unittest import mock

from absl import app
from absl import flags
from absl.testing import absltest
from ml_collections import config_flags
import numpy as np

from perflow_jax import cli
from perflow_jax import config_lib
from perflow_jax import run_config
from perflow_jax.weights import export as wexport
from perflow_jax.weights import io as wio

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CONFIG = textwrap.dedent('''
    import ml_collections

    def get_config(arg=None):
      if arg not in (None, "", "small"):
        raise ValueError(f"unknown config argument {arg!r}; known: ['small'].")
      config = ml_collections.ConfigDict()
      config.total_steps = 10
      config.optim = ml_collections.ConfigDict({"learning_rate": 1e-4, "weight_decay": 0.01, "grad_clip": 1.0})
      config.model = ml_collections.ConfigDict({"dtype": "float32", "unet": {"sample_size": 8}})
      return config
''')


def _write_run_without_checkpoint(workdir: str) -> None:
  """A run's workdir as train leaves it before its first checkpoint: config.json only."""
  config = run_config.perflow_config()
  config.model.tokenizer = "procedural"
  config_lib.write_config_json(config, workdir, is_primary=True)


def _cli_run(args, env=None):
  """Starts `python -m perflow_jax.<args>` in the repository (collected by `_finish`)."""
  base = {k: v for k, v in os.environ.items() if k != cli.TRACEBACK_ENV}
  return subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env={**base, **(env or {})},
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc):
  out, err = proc.communicate(timeout=240)
  return proc.returncode, out, err


def _flags_defined_in(module_file: str) -> set[str]:
  """The flag names a CLI module defines (read from its source: importing several CLIs would define them twice)."""
  with open(os.path.join(REPO, "perflow_jax", module_file), encoding="utf-8") as f:
    source = f.read()
  names = set(re.findall(r"DEFINE_\w+\(\s*\"(\w+)\"", source))
  names |= set(re.findall(r"string\(\"(\w+)\"", source))  # the define_flags helpers' shorthand
  return names


def _mentioned_flags(message: str) -> set[str]:
  """The --flags a message tells the user to pass (not --config.* fields)."""
  return set(re.findall(r"(?<![\w.-])--(\w+)(?![\w.])", message))


class CommandLineRunsTest(absltest.TestCase):
  """The real entry points: exit status 2, one message, no traceback unless asked."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp(prefix="cli_errors_")
    cls.run_dir = os.path.join(cls.tmp, "run")
    _write_run_without_checkpoint(cls.run_dir)
    cls.workdirs = {name: os.path.join(cls.tmp, name) for name in ("missing_config", "unknown_field", "bad_value")}
    procs = {
        "missing_config": _cli_run(["perflow_jax.train", "--config=configs/nope.py",
                                    f"--workdir={cls.workdirs['missing_config']}"]),
        "unknown_field": _cli_run(["perflow_jax.train", "--config=configs/tiny.py",
                                   f"--workdir={cls.workdirs['unknown_field']}", "--config.optim.lrr=1"]),
        "bad_value_verbose": _cli_run(["perflow_jax.train", "--config=configs/tiny.py",
                                       f"--workdir={cls.workdirs['bad_value']}", "--config.total_steps=0",
                                       "--verbosity=1"]),
        "export_no_checkpoint": _cli_run(["perflow_jax.export", f"--workdir={cls.run_dir}",
                                          f"--out={cls.tmp}/delta.safetensors"]),
        "sample_no_checkpoint_env": _cli_run(["perflow_jax.sample", f"--workdir={cls.run_dir}", "--prompt=a",
                                              f"--out={cls.tmp}/samples"], env={cli.TRACEBACK_ENV: "1"}),
    }
    cls.results = {name: _finish(proc) for name, proc in procs.items()}

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def _user_error(self, name, traceback=False):
    code, _, err = self.results[name]
    self.assertEqual(code, cli.EXIT_USER_ERROR, f"{name}: {err[-3000:]}")
    errors = [line for line in err.splitlines() if ": error: " in line]
    self.assertLen(errors, 1, err[-3000:])
    if traceback:
      self.assertIn("Traceback (most recent call last)", err)
    else:
      self.assertNotIn("Traceback", err)
      self.assertIn(f"{cli.TRACEBACK_ENV}=1 shows the traceback", err)
    return errors[0]

  def test_missing_config_file(self):
    line = self._user_error("missing_config")
    self.assertFalse(os.path.exists(self.workdirs["missing_config"]))
    self.assertIn("perflow_jax.train: error: config file configs/nope.py does not exist "
                  "(from --config=configs/nope.py). Config files in configs/:", line)
    for name in ("sd15.py", "tiny.py", "demo.py"):
      self.assertIn(name, line)
    self.assertNotIn("common.py", line)  # a helper module, not a config

  def test_unknown_nested_field(self):
    line = self._user_error("unknown_field")
    self.assertIn("unknown config field optim.lrr (from --config.optim.lrr=1); did you mean optim.learning_rate? "
                  "Fields of optim: b1, b2, ema_decay, eps,", line)
    self.assertFalse(os.path.exists(self.workdirs["unknown_field"]), "a rejected command line writes nothing")

  def test_bad_config_value_with_verbosity_shows_the_traceback(self):
    line = self._user_error("bad_value_verbose", traceback=True)
    self.assertIn("config.total_steps=0 must be >= 1", line)

  def test_export_without_checkpoint_names_only_export_flags(self):
    line = self._user_error("export_no_checkpoint")
    self.assertIn(f"--workdir={self.run_dir} has no checkpoint yet", line)
    self.assertNotIn("--weights=teacher", line)
    self.assertLessEqual(_mentioned_flags(line), _flags_defined_in("export.py"))

  def test_sample_without_checkpoint_and_traceback_env(self):
    line = self._user_error("sample_no_checkpoint_env", traceback=True)
    self.assertIn("has no checkpoint yet", line)
    self.assertIn("--weights=teacher", line)  # sample has that flag
    self.assertLessEqual(_mentioned_flags(line), _flags_defined_in("sample.py"))
    self.assertFalse(os.path.exists(os.path.join(self.tmp, "samples")))


class _InProcess(absltest.TestCase):
  """Parses and reports through cli's functions on a fresh FlagValues with a config file flag."""

  def setUp(self):
    super().setUp()
    self.tmp = tempfile.mkdtemp(prefix="cli_errors_")
    self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)
    self.configs = os.path.join(self.tmp, "configs")
    os.makedirs(self.configs)
    with open(os.path.join(self.configs, "small.py"), "w") as f:
      f.write(_CONFIG)
    with open(os.path.join(self.configs, "helpers.py"), "w") as f:
      f.write("X = 1\n")
    self.config_path = os.path.join(self.configs, "small.py")

  def run_cli(self, argv, body=None, environ=None, output_flags=("workdir",), note=""):
    """(exit status, what went to stderr, the FlagValues): parses argv, then runs body(fv) like a main."""
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config", flag_values=fv, sys_argv=list(argv))
    flags.DEFINE_string("workdir", None, "run directory", flag_values=fv)
    stream = io.StringIO()
    options = dict(output_flags=output_flags, disk_full_note=note, flag_values=fv, stream=stream,
                   environ=environ or {})
    try:
      with cli.user_errors_exit(argv, **options):
        cli.parse_flags(argv, fv)
        if body is not None:
          body(fv)
    except SystemExit as e:
      return e.code, stream.getvalue(), fv
    return 0, stream.getvalue(), fv

  def error_line(self, text):
    lines = text.strip().splitlines()
    self.assertLen(lines, 2, text)  # the message and the hint
    self.assertIn(": error: ", lines[0])
    return lines[0]


class ConfigFlagsTest(_InProcess):

  def test_missing_config_file_lists_the_config_files(self):
    missing = os.path.join(self.configs, "nope.py")
    code, err, _ = self.run_cli(["prog", f"--config={missing}:small", "--workdir=/tmp/x"])
    self.assertEqual(code, 2)
    line = self.error_line(err)
    self.assertIn(f"config file {missing} does not exist (from --config={missing}:small). Config files in "
                  f"{self.configs}/: small.py.", line)
    code, err, _ = self.run_cli(["prog", "--config", self.configs])
    self.assertEqual(code, 2)
    self.assertIn(f"config file {self.configs} is a folder, not a config file", err)

  def test_unknown_fields_get_the_full_path_and_a_suggestion(self):
    cases = {
        "--config.optim.lrr=1": "unknown config field optim.lrr (from --config.optim.lrr=1); did you mean "
                                "optim.learning_rate? Fields of optim: grad_clip, learning_rate, weight_decay.",
        "--config.optim.wd=0.1": "did you mean optim.weight_decay?",
        "--config.learning_rate=1": "unknown config field learning_rate (from --config.learning_rate=1); did you "
                                    "mean optim.learning_rate? Fields of the config: model, optim, total_steps.",
        "--config.optm.learning_rate=1": "unknown config field optm.learning_rate (from "
                                         "--config.optm.learning_rate=1); did you mean optim.learning_rate?",
        "--config.model.unet.sampl_size=4": "did you mean model.unet.sample_size? Fields of model.unet: "
                                            "sample_size.",
        "--config.total_steps.x=1": "config field total_steps holds a value (int), not a section with fields, "
                                    "so total_steps.x does not exist (from --config.total_steps.x=1); set "
                                    "total_steps itself",
        "--config.zzz=1": "unknown config field zzz (from --config.zzz=1). Fields of the config:",
    }
    for arg, expected in cases.items():
      code, err, _ = self.run_cli(["prog", f"--config={self.config_path}", arg])
      self.assertEqual(code, 2, err)
      self.assertIn(expected, self.error_line(err))
    # Known fields parse as before.
    code, err, fv = self.run_cli(["prog", f"--config={self.config_path}", "--config.optim.learning_rate=0.5"])
    self.assertEqual((code, err), (0, ""))
    self.assertEqual(fv.config.optim.learning_rate, 0.5)

  def test_bad_config_values(self):
    code, err, _ = self.run_cli(["prog", f"--config={self.config_path}", "--config.optim.learning_rate=fast"])
    self.assertEqual(code, 2)
    self.assertIn("--config.optim.learning_rate=fast", self.error_line(err))
    # get_config's ValueError: its own message, not the traceback text config_flags wraps it in.
    code, err, _ = self.run_cli(["prog", f"--config={self.config_path}:bogus"])
    self.assertEqual(code, 2)
    line = self.error_line(err)
    self.assertIn(f"flag --config={self.config_path}:bogus: unknown config argument 'bogus'; known: ['small'].",
                  line)
    self.assertNotIn("Error whilst", err)
    # A value the config checks reject (run_config.validate_run_config raises ValueError): one line, status 2.
    config = run_config.perflow_config(total_steps=0)
    code, err, _ = self.run_cli(["prog"], body=lambda fv: run_config.validate_run_config(config))
    self.assertEqual(code, 2)
    self.assertIn("config.total_steps=0 must be >= 1", self.error_line(err))

  def test_flag_and_usage_errors(self):
    code, err, _ = self.run_cli(["prog", "--wrkdir=/tmp/x"])
    self.assertEqual(code, 2)
    self.assertIn("wrkdir", self.error_line(err))
    self.assertIn("--helpfull", err)

    def usage(fv):
      raise app.UsageError("--workdir and --out are required.")

    code, err, _ = self.run_cli(["prog"], body=usage)
    self.assertEqual(code, 2)
    self.assertIn("--workdir and --out are required. (--helpfull lists the flags.)", self.error_line(err))


class ReportTest(_InProcess):

  def test_traceback_only_on_request(self):
    def bad(fv):
      raise ValueError("--num_steps=2 is fewer than the 4 PeRFlow windows")

    for argv, environ, shown in (
        (["prog"], {}, False),
        (["prog", "--verbosity=0"], {}, False),
        (["prog", "--verbosity=1"], {}, True),
        (["prog", "-v", "2"], {}, True),
        (["prog"], {cli.TRACEBACK_ENV: "1"}, True),
        (["prog"], {cli.TRACEBACK_ENV: "0"}, False),
    ):
      fv = flags.FlagValues()  # --verbosity is read from argv: absl's logging owns the flag
      stream = io.StringIO()
      with self.assertRaises(SystemExit) as ctx:
        with cli.user_errors_exit(argv, flag_values=fv, stream=stream, environ=environ):
          bad(fv)
      self.assertEqual(ctx.exception.code, 2)
      self.assertEqual("Traceback (most recent call last)" in stream.getvalue(), shown, (argv, environ))
      self.assertIn("error: --num_steps=2 is fewer than the 4 PeRFlow windows", stream.getvalue())

  def test_programming_errors_keep_their_traceback(self):
    for error in (KeyError("params"), TypeError("unsupported operand"), RuntimeError("XLA"),
                  AttributeError("x")):
      stream = io.StringIO()
      with self.assertRaises(type(error)):
        with cli.user_errors_exit(["prog"], flag_values=flags.FlagValues(), stream=stream, environ={}):
          raise error
      self.assertEqual(stream.getvalue(), "")
    with self.assertRaises(KeyboardInterrupt):  # a second Ctrl-C stays a KeyboardInterrupt
      with cli.user_errors_exit(["prog"], stream=io.StringIO(), environ={}):
        raise KeyboardInterrupt("second Ctrl-C")
    with self.assertRaises(SystemExit) as ctx:  # train's preemption exit (75) passes through
      with cli.user_errors_exit(["prog"], stream=io.StringIO(), environ={}):
        sys.exit(75)
    self.assertEqual(ctx.exception.code, 75)

  def test_full_disk(self):
    workdir = os.path.join(self.tmp, "run")
    note = "Checkpoints already committed are kept."

    def write_to_a_full_disk(fv):  # /dev/full: every write fails with ENOSPC, as on a full disk
      with open("/dev/full", "w") as f:
        f.write("x" * 100_000)

    code, err, _ = self.run_cli(["prog", f"--workdir={workdir}"], body=write_to_a_full_disk, note=note)
    self.assertEqual(code, 2)
    self.assertEqual(self.error_line(err),
                     f"prog: error: the disk holding {workdir} (--workdir) is full (No space left on device). Free "
                     f"space there, or choose another --workdir. {note}")

    file = os.path.join(workdir, "checkpoints", "40", "state", "d", "0.tmp")

    def orbax_save_fails(fv):  # an OSError with the file, wrapped by a library
      try:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), file)
      except OSError as e:
        raise ValueError("async save of step 40 failed") from e

    code, err, _ = self.run_cli(["prog", f"--workdir={workdir}"], body=orbax_save_fails, note=note)
    self.assertEqual(code, 2)
    self.assertIn(f"the disk holding {workdir} (--workdir; writing {file}) is full (No space left on device). Free "
                  "space there, or choose another --workdir.", self.error_line(err))

    def tensorstore_text(fv):  # tensorstore reports the OS error as text only
      raise RuntimeError(f"Error writing local file \"{file}\": [OS error: {os.strerror(errno.ENOSPC)}]")

    code, err, _ = self.run_cli(["prog", f"--workdir={workdir}"], body=tensorstore_text)
    self.assertEqual(code, 2)
    self.assertIn(f"the disk holding {workdir} (--workdir) is full", self.error_line(err))

    def quota(fv):
      raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), os.path.join(self.tmp, "elsewhere", "a.png"))

    code, err, _ = self.run_cli(["prog"], body=quota, output_flags=())
    self.assertEqual(code, 2)
    self.assertIn(f"the disk holding {self.tmp}/elsewhere/a.png is full (Disk quota exceeded). Free space there, "
                  "or write somewhere else.", self.error_line(err))

  def test_missing_and_unwritable_files(self):
    workdir = os.path.join(self.tmp, "run")

    def missing(fv):
      with open(os.path.join(workdir, "config.json")) as f:
        f.read()

    code, err, _ = self.run_cli(["prog", f"--workdir={workdir}"], body=missing)
    self.assertEqual(code, 2)
    self.assertIn(f"No such file or directory: {workdir}/config.json (--workdir); check the path.",
                  self.error_line(err))

    def unwritable(fv):
      raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), workdir)

    code, err, _ = self.run_cli(["prog", f"--workdir={workdir}"], body=unwritable)
    self.assertEqual(code, 2)
    self.assertIn(f"Permission denied: {workdir} (--workdir); check its permissions, or choose a location you can "
                  "read and write.", self.error_line(err))


class LibraryMessagesTest(absltest.TestCase):
  """Messages raised in shared library code suggest only flags the CLI at hand has."""

  def test_pickle_message_names_the_convert_flags(self):
    folder = tempfile.mkdtemp(prefix="cli_errors_")
    self.addCleanup(shutil.rmtree, folder, ignore_errors=True)
    path = os.path.join(folder, "model.ckpt")
    with open(path, "wb") as f:
      f.write(b"not read")
    with self.assertRaises(wio.WeightFileError) as ctx:
      wio.read_state_dict(path)
    message = str(ctx.exception)
    self.assertIn("python -m perflow_jax.convert --src=MODEL --out=DIR --allow_pickle", message)
    self.assertEqual(_mentioned_flags(message), {"src", "out", "allow_pickle"})
    self.assertLessEqual(_mentioned_flags(message), _flags_defined_in("convert.py"))

  def test_export_and_sample_fail_before_loading_a_model(self):
    from perflow_jax import export  # pylint: disable=g-import-not-at-top
    from perflow_jax import sample  # pylint: disable=g-import-not-at-top
    from perflow_jax import trainer  # pylint: disable=g-import-not-at-top

    tmp = tempfile.mkdtemp(prefix="cli_errors_")
    self.addCleanup(shutil.rmtree, tmp, ignore_errors=True)
    run = os.path.join(tmp, "run")
    _write_run_without_checkpoint(run)
    with mock.patch.object(trainer, "load_models", side_effect=AssertionError("a model was loaded")):
      with self.assertRaises(ValueError) as ctx:
        export.cli(["export", f"--workdir={run}", f"--out={tmp}/d.safetensors"])
      self.assertNotIn("--weights=teacher", str(ctx.exception))
      self.assertLessEqual(_mentioned_flags(str(ctx.exception)), _flags_defined_in("export.py"))
      with self.assertRaisesRegex(ValueError, r"not_a_run does not exist; pass a run's workdir"):
        export.cli(["export", f"--workdir={tmp}/not_a_run", f"--out={tmp}/d.safetensors"])
      with self.assertRaises(ValueError) as ctx:
        sample.cli(["sample", f"--workdir={run}", "--prompt=a", f"--out={tmp}/s"])
      self.assertIn("--weights=teacher", str(ctx.exception))
      self.assertLessEqual(_mentioned_flags(str(ctx.exception)), _flags_defined_in("sample.py"))

  def test_keep_mismatched_with_no_matching_tensor_is_an_error(self):
    base = {"conv_in.weight": np.ones((4, 3, 3, 3), np.float32), "conv_in.bias": np.ones(4, np.float32)}
    for delta in ({"other.weight": np.zeros(3, np.float16)},  # no common key
                  {"conv_in.weight": np.zeros((8, 3, 3, 3), np.float16), "conv_in.bias": np.zeros(8, np.float16)}):
      with self.assertRaises(wexport.DeltaMismatchError) as ctx:
        wexport.merge_delta(base, delta, keep_mismatched=True, delta_name="the delta /d/sdxl_delta.safetensors",
                            base_name="the UNet of /models/sd15")
      message = str(ctx.exception)
      self.assertIn("the delta /d/sdxl_delta.safetensors fits none of the 2 tensors of the UNet of /models/sd15",
                    message)
      self.assertIn("nothing would be applied", message)
    # One tensor that fits is a partial merge, as before.
    merged, kept = wexport.merge_delta(base, {"conv_in.bias": np.full(4, 0.5, np.float16)}, keep_mismatched=True)
    self.assertEqual(kept, ["conv_in.weight"])
    np.testing.assert_array_equal(merged["conv_in.bias"], np.full(4, 1.5, np.float32))
    with self.assertRaisesRegex(wexport.DeltaMismatchError, "sample and evaluate: --keep_mismatched"):
      wexport.merge_delta(base, {"conv_in.bias": np.zeros(4, np.float16)})


if __name__ == "__main__":
  absltest.main()
