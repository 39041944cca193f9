"""The command-line tools' entry point: a user error ends in one short message on stderr and exit status 2.

Every CLI (train, sample, export, evaluate, convert, prepare_data, benchmark) starts with ``cli.run(main, ...)``
instead of ``absl.app.run(main)``. Exit status:

- 0: done.
- 2: a user error, reported as one message (what, where, how to fix) on stderr, without a traceback: a bad or
  missing flag, an unknown config field (``--config.optim.lrr=1``: the full path and a "did you mean"), a bad
  config value, a missing config file, a missing or unreadable file, a wrong architecture or a checkpoint that
  does not fit, an unwritable output, a full disk. absl's ``app.UsageError`` is one of them: it also exits 2 here
  (absl alone prints the whole usage text and exits 1).
- 75: train only, after a preemption or a first Ctrl-C (``perflow_jax.preemption``).
- anything else (1 from absl/Python): a programming error, with its traceback. A second Ctrl-C stays a
  KeyboardInterrupt.

``--verbosity=1`` (absl's flag, or any higher value; ``-v 1``) or the environment variable
``PERFLOW_JAX_TRACEBACK=1`` prints a user error's traceback before the message (the status stays 2).

User errors are, by type: ``ValueError`` (the codebase raises it, and its subclasses, for bad input, with a message
that names the field or file and the fix), ``app.UsageError``, absl flag errors (``flags.Error``, config_flags'
included), ``FileNotFoundError``, ``PermissionError``, ``IsADirectoryError``, ``NotADirectoryError``,
``FileExistsError``, an OSError for a read-only file system or a name too long, a full disk (an OSError with errno ENOSPC or EDQUOT anywhere in
the exception's chain, or an error whose text carries the system's "No space left on device" / "Disk quota
exceeded", as tensorstore's do), ``storage.MissingCloudStorageSupport`` and ``workdir_lock.WorkdirLockedError``.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import os
import re
import sys
import traceback
from typing import Any, Callable, Iterator, Mapping, Sequence, TextIO

from absl import app
from absl import flags

EXIT_USER_ERROR = 2
TRACEBACK_ENV = "PERFLOW_JAX_TRACEBACK"
MAX_MESSAGE_CHARS = 2000

_DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_DISK_FULL_TEXTS = tuple(os.strerror(e) for e in sorted(_DISK_FULL_ERRNOS))  # "No space left on device", ...
_USER_OS_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EISDIR, errno.ENOTDIR,
                   errno.ENAMETOOLONG, errno.EEXIST}
_FIX_BY_ERRNO = {
    errno.ENOENT: "check the path",
    errno.EACCES: "check its permissions, or choose a location you can read and write",
    errno.EPERM: "check its permissions, or choose a location you can read and write",
    errno.EROFS: "that file system is read-only; choose another location",
    errno.EISDIR: "a file was expected there, not a folder",
    errno.ENOTDIR: "a part of that path is a file, not a folder",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.EEXIST: "something is already there (a file where a folder is needed?); choose another path",
}
# Named rather than imported, so that this module stays light (prepare_data's --help must stay fast).
_USER_ERROR_CLASSES = ("perflow_jax.storage.MissingCloudStorageSupport",
                       "perflow_jax.workdir_lock.WorkdirLockedError")
_CONFIG_PARSE_MARK = "Error whilst parsing config file"  # ml_collections.config_flags wraps get_config's errors
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class ConfigFlagError(ValueError):
  """A config file flag names a file that is not there, or an override names a field the config does not have."""


# --------------------------------------------------------------------------------------------- the entry point


def run(main: Callable[[list[str]], Any], *, output_flags: Sequence[str] = (), disk_full_note: str = "") -> None:
  """``absl.app.run(main)``, with user errors (see the module docstring) ending in one message and status 2.

  Args:
    main: the CLI's main(argv).
    output_flags: the flags naming where the CLI writes (train: workdir), for the full-disk message.
    disk_full_note: what the full-disk message adds (train: that finished checkpoints are kept).
  """
  options = {"output_flags": tuple(output_flags), "disk_full_note": disk_full_note}

  def parse(argv: list[str]) -> list[str]:
    with user_errors_exit(argv, **options):
      return parse_flags(argv)

  def guarded_main(argv: list[str]) -> Any:
    with user_errors_exit(sys.argv, **options):
      return main(argv)

  app.run(guarded_main, flags_parser=parse)


@contextlib.contextmanager
def user_errors_exit(argv: Sequence[str], *, output_flags: Sequence[str] = (), disk_full_note: str = "",
                     flag_values: flags.FlagValues | None = None, stream: TextIO | None = None,
                     environ: Mapping[str, str] | None = None) -> Iterator[None]:
  """Inside the block, a user error prints its message (and, when asked, its traceback) and raises
  SystemExit(2); any other exception propagates unchanged. `argv` is read for --verbosity."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except  (KeyboardInterrupt and SystemExit pass)
    exit_on_user_error(e, argv, output_flags=output_flags, disk_full_note=disk_full_note,
                       flag_values=flag_values, stream=stream, environ=environ)
    raise


def exit_on_user_error(exc: BaseException, argv: Sequence[str], *, output_flags: Sequence[str] = (),
                       disk_full_note: str = "", flag_values: flags.FlagValues | None = None,
                       stream: TextIO | None = None, environ: Mapping[str, str] | None = None) -> None:
  """Raises SystemExit(2) after reporting `exc` when it is a user error; returns (doing nothing) otherwise."""
  message = user_error_message(exc, output_flags=output_flags, disk_full_note=disk_full_note,
                               flag_values=flag_values)
  if message is None:
    return
  stream = sys.stderr if stream is None else stream
  show_traceback = wants_traceback(argv, os.environ if environ is None else environ)
  try:
    if show_traceback:
      traceback.print_exception(exc, file=stream)
    stream.write(f"{_program(argv)}: error: {message}\n")
    if not show_traceback:
      stream.write(f"(exit status {EXIT_USER_ERROR}; --verbosity=1 or {TRACEBACK_ENV}=1 shows the traceback)\n")
    stream.flush()
  except OSError:
    pass  # stderr itself is gone (a closed pipe): the status still says it
  raise SystemExit(EXIT_USER_ERROR) from None


def wants_traceback(argv: Sequence[str], environ: Mapping[str, str]) -> bool:
  """--verbosity >= 1 (or -v N) on the command line, or PERFLOW_JAX_TRACEBACK set to 1/true/yes."""
  if str(environ.get(TRACEBACK_ENV, "")).strip().lower() in ("1", "true", "yes", "on"):
    return True
  verbose = False
  for _, value in _argv_values(argv, "verbosity") + _argv_values(argv, "v"):
    try:
      verbose = int(value) >= 1
    except ValueError:
      continue
  return verbose


def _program(argv: Sequence[str]) -> str:
  spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  if spec is not None and getattr(spec, "name", "").startswith("perflow_jax."):
    return spec.name
  return os.path.basename(argv[0]) if argv else "perflow_jax"


# ------------------------------------------------------------------------------------------- the message


def user_error_message(exc: BaseException, *, output_flags: Sequence[str] = (), disk_full_note: str = "",
                       flag_values: flags.FlagValues | None = None) -> str | None:
  """The one-line report of a user error (what, where, how to fix); None when `exc` is a programming error."""
  fv = flags.FLAGS if flag_values is None else flag_values
  full = _disk_full(exc)
  if full is not None:
    return _shorten(_disk_full_message(full, output_flags, disk_full_note, fv))
  if not is_user_error(exc):
    return None
  if isinstance(exc, flags.Error):
    return _shorten(_flag_error_text(exc) + " (--helpfull lists the flags.)")
  if isinstance(exc, app.UsageError):
    return _shorten(f"{exc} (--helpfull lists the flags.)")
  if isinstance(exc, OSError) and exc.filename is not None and exc.errno in _FIX_BY_ERRNO:
    path = os.fsdecode(exc.filename)
    flag = _flag_naming(path, output_flags, fv)
    where = f"{path} ({flag})" if flag else path
    return _shorten(f"{exc.strerror or type(exc).__name__}: {where}; {_FIX_BY_ERRNO[exc.errno]}.")
  if isinstance(exc, OSError) and exc.errno is not None and exc.strerror and exc.filename is None:
    text = exc.strerror.strip()  # OSError(errno, message): the message without "[Errno N]"
  else:
    text = str(exc).strip() or type(exc).__name__
  if type(exc).__module__.split(".")[0] != "perflow_jax" and type(exc) not in (ValueError, OSError):
    text = f"{type(exc).__name__}: {text}"  # e.g. a JSONDecodeError: the type says what failed to parse
  site = _foreign_raise_site(exc)
  if site:
    text += f" (raised in {site})"
  return _shorten(text)


def is_user_error(exc: BaseException) -> bool:
  """Whether `exc` is a user error (the module docstring lists them)."""
  if isinstance(exc, (ValueError, app.UsageError, flags.Error, FileNotFoundError, PermissionError,
                      IsADirectoryError, NotADirectoryError)):
    return True
  if isinstance(exc, OSError):
    if exc.errno in _USER_OS_ERRNOS or exc.errno in _DISK_FULL_ERRNOS:
      return True
    return "Configuration is not available because of an earlier failure to load" in str(exc)  # config_flags
  names = {f"{c.__module__}.{c.__qualname__}" for c in type(exc).__mro__}
  return bool(names.intersection(_USER_ERROR_CLASSES))


def _chain(exc: BaseException) -> Iterator[BaseException]:
  """exc, its causes and contexts, and the members of exception groups, each once."""
  seen, todo = set(), [exc]
  while todo:
    e = todo.pop(0)
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    yield e
    todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]


def _disk_full(exc: BaseException) -> tuple[str, str | None] | None:
  """(the system's text, the file being written or None) when a full disk is behind `exc`."""
  for e in _chain(exc):
    if isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS:
      return os.strerror(e.errno), (os.fsdecode(e.filename) if e.filename is not None else None)
  for e in _chain(exc):
    for text in _DISK_FULL_TEXTS:
      if text.lower() in str(e).lower():
        return text, None
  return None


def _disk_full_message(full: tuple[str, str | None], output_flags: Sequence[str], note: str,
                       fv: flags.FlagValues) -> str:
  text, filename = full
  flag = _flag_naming(filename, output_flags, fv) if filename else None
  if flag is None and not filename:
    flag = next((f"--{name}" for name in output_flags if _flag_value(fv, name)), None)
  folder = _flag_value(fv, flag[2:]) if flag else None
  if folder and filename and _normalise(filename) != _normalise(folder):
    where = f"{folder} ({flag}; writing {filename})"
  elif folder:
    where = f"{folder} ({flag})"
  else:
    where = filename or "the output"
  if flag:
    choose = f"choose another {flag}"
  elif output_flags:
    choose = "choose another " + " or ".join(f"--{name}" for name in output_flags)
  else:
    choose = "write somewhere else"
  return f"the disk holding {where} is full ({text}). Free space there, or {choose}." + (f" {note}" if note else "")


def _flag_value(fv: flags.FlagValues, name: str) -> str | None:
  try:
    value = fv[name].value
  except (KeyError, AttributeError):
    return None
  return value if isinstance(value, str) and value else None


def _flag_naming(path: str, preferred: Sequence[str], fv: flags.FlagValues) -> str | None:
  """'--NAME' of the string flag whose value is `path` or a folder above it (the CLI's output flags first)."""
  names = list(preferred) + [n for n in _iter_flag_names(fv) if n not in preferred]
  target = _normalise(path)
  for name in names:
    value = _flag_value(fv, name)
    if not value or ("://" in value and "://" not in path):
      continue
    base = _normalise(value)
    if target == base or target.startswith(base.rstrip("/") + "/"):
      return f"--{name}"
  return None


def _iter_flag_names(fv: flags.FlagValues) -> list[str]:
  try:
    return list(fv)
  except Exception:  # pylint: disable=broad-except
    return []


def _normalise(path: str) -> str:
  return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def _flag_error_text(exc: flags.Error) -> str:
  """absl's text; for an error raised by a config file's get_config, the original error instead of the traceback
  text config_flags puts into the message."""
  text = str(exc)
  if _CONFIG_PARSE_MARK not in text:
    return text
  prefix = text.split(_CONFIG_PARSE_MARK, 1)[0].rstrip(": ").strip()  # "flag --config=configs/x.py:arg"
  for e in _chain(exc):
    if e is not exc and _CONFIG_PARSE_MARK not in str(e) and not isinstance(e, flags.Error):
      detail = str(e) if type(e) is ValueError or isinstance(e, ConfigFlagError) else f"{type(e).__name__}: {e}"
      return f"{prefix}: {detail}"
  return f"{prefix}: {text.strip().splitlines()[-1]}"


def _foreign_raise_site(exc: BaseException) -> str | None:
  """'module.py:LINE' where `exc` was raised when that is outside perflow_jax (a library's error); None otherwise."""
  tb = exc.__traceback__
  if tb is None:
    return None
  frames = traceback.extract_tb(tb)
  if not frames:
    return None
  filename = os.path.abspath(frames[-1].filename)
  if filename.startswith(_PACKAGE_DIR + os.sep) or "<" in frames[-1].filename:
    return None
  short = filename
  for marker in ("site-packages" + os.sep, "dist-packages" + os.sep):
    if marker in filename:
      short = filename.split(marker, 1)[1]
  return f"{short}:{frames[-1].lineno}"


def _shorten(text: str) -> str:
  text = text.strip()
  if len(text) <= MAX_MESSAGE_CHARS:
    return text
  return f"{text[:MAX_MESSAGE_CHARS]} ... ({len(text) - MAX_MESSAGE_CHARS} more characters with --verbosity=1)"


# ------------------------------------------------------------------------------------------ config flags


def parse_flags(argv: Sequence[str], flag_values: flags.FlagValues | None = None) -> list[str]:
  """``flag_values(argv)`` (default: absl's FLAGS) with the config flags checked: a config file that is not there
  (before parsing), an override of a field the config does not have (when parsing fails), a config that failed
  to load (after parsing) raise ConfigFlagError naming the flag, the path and the fix."""
  fv = flags.FLAGS if flag_values is None else flag_values
  argv = list(argv)
  check_config_files(argv, fv)
  try:
    remaining = fv(argv)
  except Exception as e:
    problem = unknown_config_override(argv, fv)
    if problem:
      raise ConfigFlagError(problem) from e
    raise
  for name, flag in _config_flags(fv):
    error = _failed_config(flag.value)
    if error is not None:
      raise ConfigFlagError(f"--{name}: the config could not be loaded ({error}).") from error
  return remaining


def _config_flags(fv: flags.FlagValues) -> list[tuple[str, Any]]:
  """(name, flag) of the ml_collections config flags (DEFINE_config_file / _dict) defined on `fv`."""
  out = []
  for name in _iter_flag_names(fv):
    flag = fv[name]
    if type(flag).__name__ == "_ConfigFlag" and flag.name == name:
      out.append((name, flag))
  return out


def _is_file_flag(flag: Any) -> bool:
  return "ConfigFileFlagParser" in [c.__name__ for c in type(flag.parser).__mro__]


def _failed_config(value: Any) -> BaseException | None:
  if type(value).__name__ == "_ErrorConfig":
    return object.__getattribute__(value, "_error")
  return None


def _argv_values(argv: Sequence[str], name: str) -> list[tuple[str, str]]:
  """(as written, value) of every `--name=V` / `--name V` in argv."""
  found = []
  args = list(argv[1:])
  for i, arg in enumerate(args):
    if arg == "--":
      break
    match = re.fullmatch(rf"--?{re.escape(name)}(?:=(.*))?", arg)
    if match:
      if match.group(1) is not None:
        found.append((arg, match.group(1)))
      elif i + 1 < len(args):
        found.append((f"{arg} {args[i + 1]}", args[i + 1]))
  return found


def check_config_files(argv: Sequence[str], flag_values: flags.FlagValues | None = None) -> None:
  """Raises ConfigFlagError when a config file flag (--config=PATH[:ARG]) names a file that does not exist."""
  fv = flags.FLAGS if flag_values is None else flag_values
  for name, flag in _config_flags(fv):
    if not _is_file_flag(flag):
      continue
    for written, value in _argv_values(argv, name)[-1:]:
      path = value.split(":", 1)[0]
      if os.path.isfile(path):
        continue
      what = "is a folder, not a config file" if os.path.isdir(path) else "does not exist"
      raise ConfigFlagError(f"config file {path or '(empty)'} {what} (from {written}). {_list_config_files(path)}")


def _list_config_files(path: str) -> str:
  """'Config files in DIR: a.py, b.py.' for the folder of `path`, ./configs or the repository's configs/."""
  candidates = [os.path.dirname(path) or ".", "configs", os.path.join(os.path.dirname(_PACKAGE_DIR), "configs")]
  for folder in candidates:
    if not os.path.isdir(folder):
      continue
    names = []
    for file in sorted(os.listdir(folder)):
      full = os.path.join(folder, file)
      if file.endswith(".py") and os.path.isfile(full):
        try:
          with open(full, encoding="utf-8") as f:
            if re.search(r"^def get_config\(", f.read(), re.MULTILINE):
              names.append(file)
        except (OSError, UnicodeDecodeError):
          continue
    if names:
      return f"Config files in {folder.rstrip(os.sep)}/: {', '.join(names)}."
  return "No config files found next to it or in ./configs; run from the repository root or give the full path."


def unknown_config_override(argv: Sequence[str], flag_values: flags.FlagValues | None = None) -> str | None:
  """The message for the first --NAME.a.b override in argv whose field the config of flag NAME lacks; None when
  every override names a field that exists (or the config cannot be loaded here to tell)."""
  fv = flags.FLAGS if flag_values is None else flag_values
  for name, flag in _config_flags(fv):
    pattern = re.compile(rf"--?(?:no)?{re.escape(name)}\.([^=\s]+)(?:=.*)?")
    overrides = [(arg, m.group(1)) for arg in argv[1:] if (m := pattern.fullmatch(arg))]
    if not overrides:
      continue
    config = _load_config(flag, name, argv)
    if config is None:
      continue
    for arg, path in overrides:
      problem = _check_path(config, path)
      if problem:
        return f"{problem[0]} (from {arg}){problem[1]}"
  return None


def _load_config(flag: Any, name: str, argv: Sequence[str]) -> Any:
  """The config flag `name`'s config as argv gives it (a file is loaded again), or None when it cannot be."""
  try:
    if not _is_file_flag(flag):
      value = flag.value if flag.value is not None else flag.default
      return value if _is_section(value) else None
    given = _argv_values(argv, name)
    if not given:
      return None
    config = type(flag.parser)(name, lock_config=False).parse(given[-1][1])  # config_flags' file parser
    return config if _is_section(config) else None
  except Exception:  # pylint: disable=broad-except  (the flag parse reports what is wrong with the file)
    return None


def _is_section(value: Any) -> bool:
  from ml_collections import config_dict  # pylint: disable=g-import-not-at-top
  return isinstance(value, (config_dict.ConfigDict, Mapping))


def _fields(section: Any) -> list[str]:
  return sorted(str(k) for k in section.keys())


def _all_paths(section: Any, prefix: str = "") -> list[str]:
  out = []
  for key in _fields(section):
    out.append(prefix + key)
    value = section[key]
    if _is_section(value):
      out += _all_paths(value, prefix + key + ".")
  return out


def _acronym(name: str) -> str:
  return "".join(part[:1] for part in name.split("_") if part)


def _check_path(config: Any, path: str) -> tuple[str, str] | None:
  """(what is wrong, the advice) for a dotted override path that `config` does not have; None when it has it."""
  parts = path.split(".")
  node = config
  for i, part in enumerate(parts):
    if "[" in part or not part:
      return None  # indexing syntax: config_flags' own error says it
    here = ".".join(parts[:i])
    if not _is_section(node):
      return (f"config field {here} holds a value ({type(node).__name__}), not a section with fields, so {path} "
              "does not exist", f"; set {here} itself (--config.{here}=VALUE).")
    if part in node:
      node = node[part]
      continue
    prefix = here + "." if here else ""
    suggestions = _suggest(part, _fields(node), _all_paths(config), prefix)
    rest = ".".join(parts[i + 1:])
    if rest:  # a misspelt section: suggest the whole path when the rest exists under the suggestion
      suggestions = [f"{s}.{rest}" if _check_path(config, f"{s}.{rest}") is None else s for s in suggestions]
    hint = f"; did you mean {' or '.join(suggestions)}?" if suggestions else "."
    listed = ", ".join(_fields(node)) or "(none)"
    return f"unknown config field {path}", f"{hint} Fields of {here or 'the config'}: {listed}."
  return None


def _suggest(name: str, siblings: list[str], all_paths: list[str], prefix: str) -> list[str]:
  """Full paths the user may have meant: the same name elsewhere in the config, a close sibling name (or
  acronym: lr -> learning_rate), or a close name anywhere."""
  elsewhere = [p for p in all_paths if p.rsplit(".", 1)[-1] == name]
  if elsewhere:
    return elsewhere[:3]
  acronyms = {_acronym(k): k for k in siblings if "_" in k and _acronym(k) not in siblings}
  close = difflib.get_close_matches(name, siblings + list(acronyms), n=3, cutoff=0.6)
  if close:
    return list(dict.fromkeys(prefix + (c if c in siblings else acronyms[c]) for c in close))
  leaves = {}
  for p in all_paths:
    leaves.setdefault(p.rsplit(".", 1)[-1], p)
  return [leaves[c] for c in difflib.get_close_matches(name, list(leaves), n=2, cutoff=0.75)]
