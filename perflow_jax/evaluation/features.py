"""Feature networks for Fréchet distances: the common interface, batching and ``load_feature_net``.

A feature net maps images ``[N, H, W, 3]`` (float, in [-1, 1], any size: each net resizes to its own input
size) to features ``[N, dim]`` float64. Two kinds exist:

  * ``classifier:PATH``: the small procedural-data classifier (``perflow_jax.evaluation.classifier``), 128-d,
    for the offline demo;
  * ``inception:PATH``: the FID Inception-v3 of pytorch-fid (``perflow_jax.evaluation.inception``), 2048-d, from
    a weights file that the user supplies (nothing is downloaded).
"""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import numpy as np

from perflow_jax import storage

KINDS: tuple[str, ...] = ("classifier", "inception")


@runtime_checkable
class FeatureNet(Protocol):
  """A loaded feature network: ``features(images [N,H,W,3] in [-1,1]) -> [N, dim]`` float64."""

  name: str  # 'classifier' | 'inception'
  dim: int

  def features(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    ...


class FeatureNetError(ValueError):
  """A feature-net spec or weights file that cannot be used; the message says how to fix it."""


def check_images(images: np.ndarray, who: str) -> np.ndarray:
  """Validates images ``[N, H, W, 3]`` in [-1, 1] and returns them as float32.

  Raises instead of guessing on uint8 input: 0..255 pixels fed as [-1, 1] would silently give huge features.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"{who}: expected images [N, H, W, 3], got shape {images.shape}.")
  if not np.issubdtype(images.dtype, np.floating):
    raise ValueError(f"{who}: expected float images in [-1, 1], got dtype {images.dtype}; scale uint8 pixels "
                     "with images / 127.5 - 1.")
  return images.astype(np.float32, copy=False)


def batched(fn: Callable[[np.ndarray], dict[str, np.ndarray]], images: np.ndarray,
            batch_size: int) -> dict[str, np.ndarray]:
  """Applies ``fn`` (images [B, ...] -> {name: [B, ...]}) in batches and concatenates the results.

  Every call gets exactly ``min(batch_size, N)`` images (the last batch is padded by repeating its final
  image and the padding dropped afterwards), so a jitted ``fn`` compiles once whatever N is.
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  n = len(images)
  if n == 0:
    raise ValueError("no images given")
  size = min(batch_size, n)
  parts: dict[str, list[np.ndarray]] = {}
  for start in range(0, n, size):
    chunk = images[start:start + size]
    valid = len(chunk)
    if valid < size:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - valid, axis=0)])
    for name, value in fn(chunk).items():
      parts.setdefault(name, []).append(np.asarray(value)[:valid])
  return {name: np.concatenate(values) for name, values in parts.items()}


def load_feature_net(spec: str) -> FeatureNet:
  """Loads a feature net from ``'classifier:PATH'`` or ``'inception:PATH'``.

  Args:
    spec: the kind and the path, separated by the first ':'. For 'classifier', PATH is a directory written by
      ``python -m perflow_jax.evaluation.classifier --out=DIR`` (e.g. assets/demo/classifier). For 'inception',
      PATH is pytorch-fid's pt_inception-2015-12-05-6726825d.pth, or a .safetensors/.npz with the same keys.

  Raises:
    FeatureNetError: naming the spec, the file and what to do.
  """
  kind, sep, path = spec.partition(":")
  if not sep or kind not in KINDS or not path:
    raise FeatureNetError(
        f"feature net spec {spec!r} is not KIND:PATH with KIND one of {KINDS}; e.g. "
        "'classifier:assets/demo/classifier' or 'inception:/path/to/pt_inception-2015-12-05-6726825d.pth'.")
  if not storage.exists(path):
    if kind == "classifier":
      fix = ("train one with `python -m perflow_jax.evaluation.classifier --out=DIR` and pass 'classifier:DIR' "
             "(the repository ships assets/demo/classifier)")
    else:
      fix = ("download pytorch-fid's FID Inception weights pt_inception-2015-12-05-6726825d.pth (a release "
             "asset of the pytorch-fid project) on a machine with network access and pass 'inception:FILE'")
    raise FeatureNetError(f"feature net spec {spec!r}: {path} does not exist; {fix}.")
  path = storage.local_copy(path)  # a bucket's folder or file: read from a local copy
  # Imported here: each module pulls in its own model code, and both import this module.
  if kind == "classifier":
    from perflow_jax.evaluation import classifier  # pylint: disable=g-import-not-at-top
    return classifier.load_classifier(path)
  from perflow_jax.evaluation import inception  # pylint: disable=g-import-not-at-top
  return inception.load_inception(path)
