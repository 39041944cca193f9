"""Fingerprints of array pytrees: what a checkpoint step records at save time and checks at restore.

Each leaf gets three numbers:
  words     the sum of the leaf's elements read as unsigned integers (bit patterns: float32 -> uint32,
            bfloat16/float16 -> uint16, ...), modulo 2**32;
  weighted  the same sum with every element's word multiplied by an odd number derived from its flat index,
            so a swap of two elements or a changed word anywhere changes it;
  nonfinite the number of NaN/inf elements (0 for integer leaves).

Integer addition modulo 2**32 is associative and commutative, so the numbers do not depend on how the leaf is
sharded: each process sums the shards it holds (one copy of each: replica 0), and the processes add their
partial sums, exchanged through the coordination service (`parallel.distributed.all_gather_strings`; no
collective). A run restored on another mesh reproduces them exactly. Any change of a single word changes
`weighted` (an odd multiplier times a nonzero difference below 2**32 is nonzero mod 2**32); random corruption of
several words goes unnoticed with probability about 2**-64.

The sums are taken with numpy on the host copies of the shards: no device program to compile (a jitted
fingerprint of the tiny model's train state took tens of seconds to compile in the 4-process pod rehearsal, at
every start), and one pass over the bytes, at checkpoint steps only.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from perflow_jax.parallel import distributed

# Knuth's multiplicative hash constant: spreads consecutive indices over all 32 bits.
_INDEX_MULTIPLIER = np.uint64(0x9E3779B1)
_MOD = np.uint64(2**32)
_CHUNK = 1 << 22  # elements per numpy pass: bounds the temporaries (a few 32 MiB arrays)

Fingerprint = dict[str, list[int]]  # leaf path -> [words, weighted, nonfinite]


def _words(data: np.ndarray) -> np.ndarray:
  """The element bit patterns as uint64, flattened."""
  if data.dtype == np.bool_:
    return data.astype(np.uint64).ravel()
  unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[data.dtype.itemsize]
  return np.ascontiguousarray(data).view(unsigned).astype(np.uint64).ravel()


def _block_sums(data: np.ndarray, index: tuple[slice, ...], shape: tuple[int, ...]) -> np.ndarray:
  """[words, weighted, nonfinite] (uint64, the first two mod 2**32) of the block `data` at `index` of a global
  array of `shape`."""
  words = _words(data)
  starts = [s.start or 0 for s in index] + [0] * (len(shape) - len(index))
  # Flat indices in the global array: an outer sum of each axis's contribution, row-major.
  strides = np.cumprod((shape[1:] + (1,))[::-1])[::-1] if shape else np.array([], np.int64)
  flat = np.zeros(data.shape, np.uint64) if data.ndim else np.zeros((), np.uint64)
  for axis, (start, stride) in enumerate(zip(starts, strides)):
    extent = np.arange(start, start + data.shape[axis], dtype=np.uint64) * np.uint64(stride)
    flat = flat + extent.reshape([-1 if a == axis else 1 for a in range(data.ndim)])
  flat = flat.ravel()
  total, weighted = np.uint64(0), np.uint64(0)
  for lo in range(0, words.size, _CHUNK):
    w, i = words[lo:lo + _CHUNK], flat[lo:lo + _CHUNK]
    weight = ((i * _INDEX_MULTIPLIER) % _MOD) | np.uint64(1)
    total = (total + w.sum(dtype=np.uint64)) % _MOD
    weighted = (weighted + ((w * weight) % _MOD).sum(dtype=np.uint64)) % _MOD
  nonfinite = np.uint64(np.count_nonzero(~np.isfinite(data))) if jnp.issubdtype(data.dtype, jnp.inexact) else 0
  return np.array([total, weighted, nonfinite], np.uint64)


def _host_view(x: Any) -> Any:
  """Typed PRNG keys as their key data; bfloat16 and friends keep their dtype (numpy sees ml_dtypes)."""
  if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(x)
  return x


def _leaf_partial(x: Any) -> np.ndarray:
  """This process's share of a leaf's sums: its replica-0 shards (a host value counts on process 0 only)."""
  x = _host_view(x)
  if isinstance(x, jax.Array):
    parts = [_block_sums(np.asarray(shard.data), shard.index, x.shape)
             for shard in x.addressable_shards if shard.replica_id == 0]
  elif jax.process_index() == 0:
    data = np.asarray(x)
    parts = [_block_sums(data, (), data.shape)]
  else:
    parts = []
  return np.sum(parts, axis=0, dtype=np.uint64) if parts else np.zeros(3, np.uint64)


def leaf_paths(tree: Any) -> list[str]:
  """'/'-joined key paths of the leaves, in flattening order (dict keys, dataclass fields, sequence indices)."""
  def name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        return str(getattr(key, attr))
    return str(key)
  return ["/".join(name(k) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def fingerprint(tree: Any) -> Fingerprint:
  """{leaf path: [words, weighted, nonfinite]} of a pytree of arrays, every process getting the same numbers.

  With several processes every one of them calls it, in the same order (a key-value exchange).
  """
  partial = np.array([_leaf_partial(x) for x in jax.tree.leaves(tree)], np.uint64).reshape(-1, 3)
  if jax.process_count() > 1:
    shares = distributed.all_gather_strings("fingerprint", json.dumps(partial.tolist()))
    partial = np.sum([np.array(json.loads(s), np.uint64).reshape(-1, 3) for s in shares], axis=0, dtype=np.uint64)
  partial[:, :2] %= _MOD
  return {path: [int(v) for v in row] for path, row in zip(leaf_paths(tree), partial)}


def structure(tree: Any) -> dict[str, str]:
  """{leaf path: 'dtype[d0,d1,...]'} of a pytree of arrays or ShapeDtypeStructs: what an architecture looks like."""
  def describe(x: Any) -> str:
    if not hasattr(x, "dtype"):  # a Python scalar leaf: the dtype JAX gives it (int32 without x64)
      x = jax.ShapeDtypeStruct(np.shape(x), jax.dtypes.canonicalize_dtype(np.result_type(x)))
    name = str(x.dtype) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else np.dtype(x.dtype).name
    return f"{name}[{','.join(map(str, x.shape))}]"
  return {path: describe(x) for path, x in zip(leaf_paths(tree), jax.tree.leaves(tree))}


def nonfinite_leaves(fp: Fingerprint) -> dict[str, int]:
  """{leaf path: NaN/inf count} of the leaves that have any."""
  return {path: v[2] for path, v in fp.items() if v[2]}


def differences(saved: Fingerprint, actual: Fingerprint) -> list[str]:
  """Human-readable differences between a recorded and a recomputed fingerprint; [] when they agree."""
  problems = [f"{p}: missing from the restored arrays" for p in saved if p not in actual]
  problems += [f"{p}: not in the saved fingerprint" for p in actual if p not in saved]
  problems += [f"{p}: content differs from what was saved" for p in saved if p in actual and saved[p] != actual[p]]
  return problems
