"""One path layer for local folders and Cloud Storage buckets (``gs://``).

Every path a user gives (a workdir, a teacher folder or file, a delta, an export target, a data or feature file)
goes through here, so a local path and a ``gs://`` URL behave the same. Paths stay plain strings at the API
boundary; `as_path` turns one into an ``etils.epath.Path`` (the path type orbax uses), which reaches buckets through
fsspec's gcsfs. Nothing here ever builds a local folder whose name starts with ``gs:`` (``os.path.abspath`` on a URL
does exactly that, which is why `absolute` exists).

Guarantees, by kind of write:
- one file (config.json, a report, an exported .safetensors): `atomic_write`. On local disk a temp file in the same
  folder is renamed over the target. On a bucket the file is written locally first and then uploaded as one object;
  Cloud Storage makes an object visible only once its upload completes, so a reader sees the old object or the new
  one, never a part (buckets cannot rename; an upload is their atomic step).
- a folder (an exported pipeline, a prepared dataset): `staged_folder` writes it locally and uploads it file by file,
  with the file that marks it complete written last by the caller's code order; a reader that checks for that
  file never sees half a folder. Neither local disk nor a bucket can replace a whole folder atomically.
- an append-only log (metrics.jsonl): buckets cannot append, so `perflow_jax.metrics` rewrites the whole object.

Reading big remote inputs (a teacher's weights, a delta, reference images): `local_copy` downloads the file or
folder once into a cache on local disk (``$PERFLOW_JAX_CACHE``, default ``~/.cache/perflow_jax``) and returns the
local path; the cache entry is reused while the remote listing (names, sizes, timestamps) is unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from typing import Any, Iterator

from etils import epath

GCS_PREFIX = "gs://"
GCP_INSTALL_HINT = "pip install 'perflow_jax[gcp]'  (gcsfs and google-cloud-storage)"
_CACHE_ENV = "PERFLOW_JAX_CACHE"
_MANIFEST = ".perflow_listing.json"


class MissingCloudStorageSupport(RuntimeError):
  """A gs:// path was given but the Cloud Storage client libraries are not installed."""


def is_remote(path: str | os.PathLike[str]) -> bool:
  """True for URLs with a scheme (gs://, and any other fsspec protocol), False for local paths."""
  return "://" in str(path)


def _missing_gcs_packages() -> list[str]:
  # gcsfs: every gs:// file operation (through fsspec and epath); google-cloud-storage: tensorboardX's gs:// writer.
  return [pkg for pkg, module in (("gcsfs", "gcsfs"), ("google-cloud-storage", "google.cloud.storage"))
          if _find_spec(module) is None]


def _find_spec(module: str) -> Any:
  try:
    return importlib.util.find_spec(module)
  except ModuleNotFoundError:  # a missing parent package (google, google.cloud)
    return None


def _check_support(path: str) -> None:
  if path.startswith(GCS_PREFIX):
    missing = _missing_gcs_packages()
    if missing:
      raise MissingCloudStorageSupport(
          f"{path} is on Cloud Storage, and gs:// paths need {' and '.join(missing)}, not installed here. "
          f"Run: {GCP_INSTALL_HINT}")


def absolute(path: str | os.PathLike[str]) -> str:
  """A URL as given; a local path made absolute with ``~`` expanded. (Never ``os.path.abspath`` a URL.)"""
  path = os.fspath(path)
  if is_remote(path):
    _check_support(path)
    return path.rstrip("/") if path.count("/") > 3 else path
  return os.path.abspath(os.path.expanduser(path))


def as_path(path: str | os.PathLike[str]) -> epath.Path:
  """An ``epath.Path`` for a local path or a URL; gs:// without gcsfs stops here with the pip command."""
  return epath.Path(absolute(path))


def join(base: str | os.PathLike[str], *parts: str) -> str:
  """``base/part/...`` as a string, for local paths and URLs alike."""
  base = os.fspath(base)
  if not is_remote(base):
    return os.path.join(base, *parts)
  return "/".join([base.rstrip("/")] + [p.strip("/") for p in parts if p])


def dirname(path: str | os.PathLike[str]) -> str:
  path = os.fspath(path)
  if not is_remote(path):
    return os.path.dirname(os.path.abspath(os.path.expanduser(path)))
  return path.rstrip("/").rsplit("/", 1)[0]


def exists(path: str | os.PathLike[str]) -> bool:
  return as_path(path).exists()


def isdir(path: str | os.PathLike[str]) -> bool:
  return as_path(path).is_dir()


def isfile(path: str | os.PathLike[str]) -> bool:
  return as_path(path).is_file()


def listdir(path: str | os.PathLike[str]) -> list[str]:
  """Sorted names of the entries directly in a folder."""
  return sorted(p.name for p in as_path(path).iterdir())


def makedirs(path: str | os.PathLike[str]) -> None:
  """Creates a local folder and its parents; on a bucket folders are implied by object names, so nothing to do."""
  if not is_remote(path):
    os.makedirs(absolute(path), exist_ok=True)
  else:
    _check_support(os.fspath(path))


def read_text(path: str | os.PathLike[str]) -> str:
  return as_path(path).read_text(encoding="utf-8")


def read_bytes(path: str | os.PathLike[str]) -> bytes:
  return as_path(path).read_bytes()


def _fs(url: str) -> tuple[Any, str]:
  """The fsspec filesystem of a URL and the path within it."""
  import fsspec  # pylint: disable=g-import-not-at-top
  _check_support(url)
  return fsspec.core.url_to_fs(url)


def upload_file(local: str, url: str) -> None:
  """Uploads one local file as the object ``url`` (visible only once complete)."""
  fs, rpath = _fs(url)
  fs.put_file(local, rpath)


def copy_folder(local_dir: str, dst: str, last: tuple[str, ...] = ()) -> None:
  """Copies every file under the local ``local_dir`` to ``dst/<relative path>`` (a local folder or a URL); files
  whose names are in ``last`` go after all others, so a reader waiting for them sees a complete folder."""
  files = []
  for root, _, names in os.walk(local_dir):
    files += [os.path.relpath(os.path.join(root, n), local_dir) for n in names]
  files.sort(key=lambda rel: (os.path.basename(rel) in last, rel))
  for rel in files:
    copy_file(os.path.join(local_dir, rel), join(dst, *rel.split(os.sep)))


def remove_tree(path: str | os.PathLike[str]) -> None:
  """Deletes a folder (a local one, or every object under a URL's prefix)."""
  path = absolute(path)
  if is_remote(path):
    fs, rpath = _fs(path)
    fs.rm(rpath, recursive=True)
  else:
    shutil.rmtree(path)


def move_tree(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
  """Moves a folder to a path that does not exist yet. Locally one rename; on a bucket, which has no folders and
  no rename, each object is copied and then deleted, so a concurrent reader may see it half moved."""
  src, dst = absolute(src), absolute(dst)
  if is_remote(src) != is_remote(dst):
    raise ValueError(f"cannot move {src} to {dst}: both must be local or both in the same bucket.")
  if is_remote(src):
    fs, rsrc = _fs(src)
    fs.mv(rsrc.rstrip("/"), _fs(dst)[1].rstrip("/"), recursive=True)
  else:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    os.rename(src, dst)


def copy_file(src: str, dst: str) -> None:
  """Copies one file between any two of local disk and buckets."""
  if is_remote(src):
    src = local_copy(src)
  if is_remote(dst):
    upload_file(src, dst)
  else:
    makedirs(dirname(dst))
    shutil.copyfile(src, dst)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w") -> Iterator[Any]:
  """Opens ``path`` for writing (mode "w" text or "wb" bytes) so that readers see the old file or the complete new
  one; the new one appears only if the block finishes without an exception (see the module docstring)."""
  if mode not in ("w", "wb"):
    raise ValueError(f"atomic_write mode {mode!r}; use 'w' or 'wb'.")
  path = absolute(path)
  encoding = None if "b" in mode else "utf-8"
  if is_remote(path):
    with tempfile.TemporaryDirectory(prefix="perflow_upload_") as tmp_dir:
      tmp = os.path.join(tmp_dir, os.path.basename(path) or "object")
      with open(tmp, mode, encoding=encoding) as f:
        yield f
      upload_file(tmp, path)
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, mode, encoding=encoding) as f:
      yield f
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(path: str | os.PathLike[str], text: str) -> None:
  """Writes a text file atomically (see `atomic_write`)."""
  with atomic_write(path, "w") as f:
    f.write(text)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
  """Writes ``obj`` as indented JSON with a trailing newline, atomically."""
  write_text(path, json.dumps(obj, indent=2) + "\n")


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
  with atomic_write(path, "wb") as f:
    f.write(data)


@contextlib.contextmanager
def staged_folder(path: str | os.PathLike[str], last: tuple[str, ...] = ()) -> Iterator[str]:
  """A local folder to write ``path``'s files into: ``path`` itself when local; for a URL a temp folder that is
  uploaded (files whose names are in ``last`` at the end) when the block finishes without an exception."""
  path = absolute(path)
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)
    yield path
    return
  with tempfile.TemporaryDirectory(prefix="perflow_stage_") as tmp_dir:
    yield tmp_dir
    copy_folder(tmp_dir, path, last=last)


def cache_root() -> str:
  """Where `local_copy` keeps downloaded files: ``$PERFLOW_JAX_CACHE`` or ``~/.cache/perflow_jax``."""
  return os.path.expanduser(os.environ.get(_CACHE_ENV) or os.path.join("~", ".cache", "perflow_jax"))


def _listing(url: str) -> tuple[list[list[Any]], bool]:
  """[relative name, size, timestamp] of every object at or under ``url``, and whether it is a single file."""
  fs, rpath = _fs(url)
  rpath = rpath.rstrip("/")
  if fs.isfile(rpath):
    info = fs.info(rpath)
    return [["", info.get("size"), str(info.get("updated") or info.get("mtime") or "")]], True
  found = fs.find(rpath, detail=True)
  if not found:
    raise FileNotFoundError(f"{url} does not exist (no object at or under it).")
  rows = [[name[len(rpath) + 1:], info.get("size"), str(info.get("updated") or info.get("mtime") or "")]
          for name, info in found.items() if info.get("type") != "directory"]
  return sorted(rows), False


def local_copy(path: str | os.PathLike[str]) -> str:
  """A local path holding ``path``'s content: the path itself when local, else a cached download of the remote
  file or folder (re-downloaded when its listing changed). Raises FileNotFoundError for a missing URL."""
  path = absolute(path)
  if not is_remote(path):
    return path
  listing, single = _listing(path)
  key = hashlib.sha256(path.encode()).hexdigest()[:16]
  name = path.rstrip("/").rsplit("/", 1)[-1]
  entry = os.path.join(cache_root(), "remote", key)
  target = os.path.join(entry, name)
  manifest = os.path.join(entry, _MANIFEST)
  if os.path.exists(manifest):
    with open(manifest, encoding="utf-8") as f:
      if json.load(f) == listing:
        return target
  # Download beside the entry and swap it in, so a concurrent reader (another process on this host) never sees
  # a partial copy; whichever process finishes last leaves an identical entry.
  os.makedirs(os.path.dirname(entry), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=key + ".", dir=os.path.dirname(entry))
  fs, rpath = _fs(path)
  if single:
    fs.get_file(rpath.rstrip("/"), os.path.join(tmp, name))
  else:
    for rel, _, _ in listing:
      local = os.path.join(tmp, name, *rel.split("/"))
      os.makedirs(os.path.dirname(local), exist_ok=True)
      fs.get_file(f"{rpath.rstrip('/')}/{rel}", local)
  with open(os.path.join(tmp, _MANIFEST), "w", encoding="utf-8") as f:
    json.dump(listing, f)
  old = entry + f".old{os.getpid()}"
  if os.path.exists(entry):
    os.replace(entry, old)
  try:
    os.replace(tmp, entry)
  except OSError:  # another process put an entry in place first: keep theirs
    shutil.rmtree(tmp, ignore_errors=True)
  shutil.rmtree(old, ignore_errors=True)
  return target
