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

import concurrent.futures
import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from perflow_jax.parallel import distributed

# Knuth's multiplicative hash constant: spreads consecutive indices over all 32 bits.
_INDEX_MULTIPLIER = np.uint32(0x9E3779B1)
_MOD = 2**32
_CHUNK = 1 << 22  # elements per numpy pass: bounds the temporaries (a few 16 MiB arrays)

Fingerprint = dict[str, list[int]]  # leaf path -> [words, weighted, nonfinite]


def _words(data: np.ndarray) -> np.ndarray:
  """The element bit patterns as uint32, flattened (a view for 32-bit dtypes)."""
  data = np.ascontiguousarray(data)
  if data.dtype == np.bool_:
    return data.astype(np.uint32).ravel()
  if data.dtype.itemsize == 8:  # host int64/float64 scalars: both halves folded into one word
    bits = data.view(np.uint64).ravel()
    return ((bits & np.uint64(0xFFFFFFFF)) ^ (bits >> np.uint64(32))).astype(np.uint32)
  unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32}[data.dtype.itemsize]
  return data.view(unsigned).ravel().astype(np.uint32, copy=False)


@functools.lru_cache(maxsize=1)
def _arange_chunk() -> np.ndarray:
  return np.arange(_CHUNK, dtype=np.uint32)


def _consecutive(n: int) -> np.ndarray:
  return _arange_chunk()[:n]


def _flat_indices(index: tuple[slice, ...], block: tuple[int, ...], shape: tuple[int, ...],
                  lo: int, hi: int) -> np.ndarray:
  """uint32 global row-major flat indices (mod 2**32) of elements lo:hi of the block at `index` in `shape`."""
  starts = [s.start or 0 for s in index] + [0] * (len(shape) - len(index))
  strides = [int(np.prod(shape[a + 1:], dtype=np.int64)) for a in range(len(shape))]
  if tuple(block[1:]) == tuple(shape[1:]):  # whole rows (leading-axis or no sharding): consecutive indices
    base = starts[0] * strides[0] if shape else 0
    return _consecutive(hi - lo) + np.uint32((base + lo) % _MOD)
  local = np.unravel_index(np.arange(lo, hi, dtype=np.int64), block)
  flat = np.zeros(hi - lo, np.uint64)
  for axis, (start, stride) in enumerate(zip(starts, strides)):
    flat += (local[axis] + start).astype(np.uint64) * np.uint64(stride)
  return flat.astype(np.uint32)


def _block_sums(data: np.ndarray, index: tuple[slice, ...], shape: tuple[int, ...]) -> np.ndarray:
  """[words, weighted, nonfinite] of the block `data` at `index` of a global array of `shape` (the first two
  modulo 2**32)."""
  words = _words(data)
  total, weighted = 0, 0
  for lo in range(0, words.size, _CHUNK):
    hi = min(words.size, lo + _CHUNK)
    w = words[lo:hi]
    # uint32 arithmetic wraps: every product and sum below is taken modulo 2**32.
    weight = _flat_indices(index, data.shape, shape, lo, hi) * _INDEX_MULTIPLIER | np.uint32(1)
    total += int(w.sum(dtype=np.uint32))
    weighted += int((w * weight).sum(dtype=np.uint32))
  nonfinite = int(np.count_nonzero(~np.isfinite(data))) if jnp.issubdtype(data.dtype, jnp.inexact) else 0
  return np.array([total % _MOD, weighted % _MOD, nonfinite], np.uint64)


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
  # numpy releases the GIL in these loops: leaves are summed on several cores.
  with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
    partial = np.array(list(pool.map(_leaf_partial, jax.tree.leaves(tree))), np.uint64).reshape(-1, 3)
  if jax.process_count() > 1:
    shares = distributed.all_gather_strings("fingerprint", json.dumps(partial.tolist()))
    partial = np.sum([np.array(json.loads(s), np.uint64).reshape(-1, 3) for s in shares], axis=0, dtype=np.uint64)
  partial[:, :2] %= np.uint64(_MOD)
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
