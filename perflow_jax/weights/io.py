"""Reading and writing PyTorch-world weight files as numpy state dicts.

Safetensors is read by a small parser of its documented format (8-byte little-endian header length, a JSON header
of name -> dtype/shape/byte offsets, then the raw data) over a memory map. That needs no torch, keeps bfloat16 as
bfloat16 (numpy has no bfloat16; `ml_dtypes`, a JAX dependency, does) and lets a checked error name the file when it
is truncated or corrupt. Pickle-based files (`.ckpt`, `.bin`, `.pt`, `.pth`) can run code when loaded, so they are
read only on explicit opt-in (`allow_pickle=True`), with torch.load(weights_only=True).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from perflow_jax import storage

SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
INDEX_SUFFIX = ".safetensors.index.json"

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
# A header over 100 MB is not a real safetensors file (the format's own reader has the same bound).
_MAX_HEADER = 100_000_000


class WeightFileError(ValueError):
  """A weight file is missing, unreadable, corrupt, or needs an opt-in to be read."""


def _is_float(dtype: np.dtype) -> bool:
  return np.issubdtype(dtype, np.floating) or dtype in (_DTYPES["BF16"], _DTYPES["F8_E4M3"], _DTYPES["F8_E5M2"])


def cast_floats(state_dict: Mapping[str, np.ndarray], dtype: Any | None) -> dict[str, np.ndarray]:
  """Casts every floating-point tensor to `dtype` (None: keep each as stored); integer tensors are kept."""
  if dtype is None:
    return dict(state_dict)
  dtype = np.dtype(dtype)
  return {k: (v.astype(dtype) if _is_float(v.dtype) and v.dtype != dtype else v) for k, v in state_dict.items()}


def _corrupt(path: str, why: str) -> WeightFileError:
  return WeightFileError(f"{path} is not a valid safetensors file ({why}); it is probably truncated or corrupt "
                         "(an interrupted download or copy). Download or convert it again.")


def local_file(path: str) -> str:
  """A local path for a weight file given as a local path or a URL (gs://: downloaded once into the cache of
  `perflow_jax.storage.local_copy`; a sharded checkpoint's index brings its whole folder)."""
  if not storage.is_remote(path):
    return path
  try:
    if path.endswith(INDEX_SUFFIX):
      folder, name = path.rsplit("/", 1)
      return os.path.join(storage.local_copy(folder), name)
    return storage.local_copy(path)
  except FileNotFoundError:
    raise WeightFileError(f"weight file {path} does not exist.") from None


def read_safetensors_header(path: str) -> tuple[dict[str, Any], int]:
  """Returns (header dict without '__metadata__' split out, byte offset where the data starts)."""
  path = local_file(path)
  if not os.path.isfile(path):
    raise WeightFileError(f"weight file {path} does not exist.")
  size = os.path.getsize(path)
  if size < 8:
    raise _corrupt(path, f"only {size} bytes")
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    if n > _MAX_HEADER or 8 + n > size:
      raise _corrupt(path, f"header length {n} does not fit in a file of {size} bytes")
    raw = f.read(n)
  try:
    header = json.loads(raw.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise _corrupt(path, f"unreadable JSON header: {e}") from None
  if not isinstance(header, dict):
    raise _corrupt(path, "the header is not a JSON object")
  return header, 8 + n


def read_safetensors(path: str, dtype: Any | None = None) -> dict[str, np.ndarray]:
  """Reads a .safetensors file into {name: numpy array} (memory-mapped while no cast is asked for).

  Args:
    path: the file.
    dtype: None keeps every tensor's stored dtype (bfloat16 stays bfloat16); otherwise floating tensors are cast.

  Raises:
    WeightFileError: missing file, or a header/data layout that does not fit the file (truncated or corrupt).
  """
  path = local_file(path)
  header, start = read_safetensors_header(path)
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    # Read-only private map: arrays are views into it, so only what is used is ever paged in.
    buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > start else b""
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    try:
      dt = _DTYPES[info["dtype"]]
      shape = tuple(int(d) for d in info["shape"])
      begin, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
      raise _corrupt(path, f"bad header entry for {name!r}: {info!r}") from None
    nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    if end - begin != nbytes or begin < 0 or start + end > size:
      raise _corrupt(path, f"tensor {name!r} {info['dtype']}{list(shape)} needs bytes {begin}..{end} of the data "
                     f"section, which holds {size - start}")
    out[name] = np.frombuffer(buf, dtype=dt, count=nbytes // dt.itemsize, offset=start + begin).reshape(shape)
  return cast_floats(out, dtype) if dtype is not None else out


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
  """Writes {name: numpy array} as a .safetensors file (bfloat16 included) at a local path or a URL, atomically
  (`perflow_jax.storage.atomic_write`)."""
  entries, offset, arrays = {}, 0, []
  for name in sorted(tensors):
    a = np.ascontiguousarray(tensors[name])
    if a.dtype not in _NAMES:
      raise WeightFileError(f"cannot write tensor {name!r} of dtype {a.dtype} to safetensors; cast it to one of "
                            f"{sorted(str(d) for d in _NAMES)}.")
    entries[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
    arrays.append(a)
  if metadata:
    entries["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  raw = json.dumps(entries, separators=(",", ":")).encode("utf-8")
  raw += b" " * (-len(raw) % 8)  # the format pads the header so the data section starts 8-byte aligned
  with storage.atomic_write(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for a in arrays:
      f.write(a.tobytes())


def unwrap_state_dict(obj: Any) -> dict[str, Any]:
  """Unwraps `{'state_dict': {...}}` nesting (training checkpoints nest it, sometimes more than once)."""
  while isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping):
    raise WeightFileError(f"expected a state dict (a mapping of names to tensors), got {type(obj).__name__}.")
  return dict(obj)


def _torch_to_numpy(t: Any) -> Any:
  import torch  # pylint: disable=g-import-not-at-top  (optional dependency, only for pickle files)
  if not isinstance(t, torch.Tensor):
    return t
  t = t.detach().cpu()
  if t.dtype == torch.bfloat16:
    # numpy cannot hold torch's bfloat16; reinterpret the bits as ml_dtypes.bfloat16 (no rounding).
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def _tree_to_numpy(obj: Mapping[str, Any]) -> dict[str, Any]:
  return {k: (_tree_to_numpy(v) if isinstance(v, Mapping) else _torch_to_numpy(v)) for k, v in obj.items()}


def read_pickle(path: str, *, allow_pickle: bool = False) -> dict[str, Any]:
  """Reads a pickle-based torch checkpoint (.ckpt/.bin/.pt/.pth); only with `allow_pickle=True`.

  Non-tensor entries (for example `global_step`) are kept as they are, so callers can read them; nested
  `state_dict` wrappers are not unwrapped here (see `unwrap_state_dict`).
  """
  if not os.path.isfile(path):
    raise WeightFileError(f"weight file {path} does not exist.")
  if not allow_pickle:
    raise WeightFileError(
        f"{path} is a pickle-based PyTorch checkpoint, and loading pickles can run arbitrary code. Prefer a "
        ".safetensors file. To use this one anyway, convert the model once with `python -m perflow_jax.convert "
        "--src=MODEL --out=DIR --allow_pickle` (MODEL: this file, or the model folder holding it) and give DIR "
        "instead; in Python, pass allow_pickle=True. It is then loaded with torch.load(weights_only=True), which "
        "refuses anything but tensors and plain containers.")
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise WeightFileError(f"reading {path} needs PyTorch (pip install torch), or convert it to .safetensors.") from None
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many types (UnpicklingError, RuntimeError, EOFError) for bad files
    raise WeightFileError(f"could not read {path} with torch.load(weights_only=True): {e}") from None
  if not isinstance(obj, Mapping):
    raise WeightFileError(f"{path} holds a {type(obj).__name__}, not a state dict.")
  return _tree_to_numpy(obj)


def read_sharded_safetensors(index_path: str, dtype: Any | None = None) -> dict[str, np.ndarray]:
  """Reads a sharded checkpoint from its `*.safetensors.index.json` (weight_map: name -> shard file)."""
  if not os.path.isfile(index_path):
    raise WeightFileError(f"index file {index_path} does not exist.")
  try:
    with open(index_path) as f:
      weight_map = json.load(f)["weight_map"]
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise WeightFileError(f"{index_path} is not a safetensors index (needs a 'weight_map' object): {e}") from None
  folder = os.path.dirname(index_path)
  out: dict[str, np.ndarray] = {}
  for shard in sorted(set(weight_map.values())):
    part = read_safetensors(os.path.join(folder, shard), dtype)
    out.update(part)
  absent = sorted(set(weight_map) - set(out))
  if absent:
    raise WeightFileError(f"{index_path} lists {len(absent)} tensors that its shards do not hold, e.g. {absent[:5]}.")
  return out


def read_state_dict(path: str, *, dtype: Any | None = None, allow_pickle: bool = False) -> dict[str, Any]:
  """Reads any supported weight file into a flat {name: numpy array} dict ('state_dict' wrappers unwrapped).

  Args:
    path: a .safetensors file, a .safetensors.index.json of a sharded checkpoint, or (with allow_pickle) a
      .ckpt/.bin/.pt/.pth file.
    dtype: None keeps stored dtypes; otherwise floating tensors are cast to it.
    allow_pickle: opt-in for pickle-based files.
  """
  path = local_file(path)
  if path.endswith(INDEX_SUFFIX):
    return read_sharded_safetensors(path, dtype)
  if path.endswith(SAFETENSORS_SUFFIX):
    return read_safetensors(path, dtype)
  if path.endswith(PICKLE_SUFFIXES):
    # Training checkpoints carry non-tensor entries (global_step, epoch): only tensors are weights.
    flat = {k: v for k, v in unwrap_state_dict(read_pickle(path, allow_pickle=allow_pickle)).items()
            if isinstance(v, np.ndarray)}
    return cast_floats(flat, dtype) if dtype is not None else flat
  raise WeightFileError(f"do not know how to read {path}: expected .safetensors, .safetensors.index.json, or "
                        f"(with allow_pickle) one of {', '.join(PICKLE_SUFFIXES)}.")


def component_weight_file(folder: str, basenames: tuple[str, ...] = ("diffusion_pytorch_model", "model")) -> str:
  """Finds the weight file of a diffusers/transformers component folder (safetensors preferred over pickle).

  Looks for `<basename>.safetensors`, then `<basename>.safetensors.index.json` (sharded), then
  `<basename>.bin`, for each basename in order.
  """
  if not os.path.isdir(folder):
    raise WeightFileError(f"component folder {folder} does not exist.")
  for suffix in (SAFETENSORS_SUFFIX, INDEX_SUFFIX, ".bin"):
    for base in basenames:
      p = os.path.join(folder, base + suffix)
      if os.path.isfile(p):
        return p
  raise WeightFileError(
      f"no weight file in {folder}: expected one of "
      f"{', '.join(b + s for s in (SAFETENSORS_SUFFIX, INDEX_SUFFIX, '.bin') for b in basenames)} "
      f"(found {sorted(os.listdir(folder))}).")
