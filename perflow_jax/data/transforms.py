"""Per-example grain transforms: records of any source -> one normalised example structure.

Image sources become ``{'images': float32 [R,R,3] in [-1, 1], 'input_ids': int32 [77]}`` (plus
``'input_ids_2': int32 [77]`` from SDXL's second tokenizer); latent caches become
``{'latent_mean', 'latent_logvar': float32 [h,w,c], 'context': float32 [77,D]}``. Randomness (random crop, flip)
comes from the per-record generator grain derives from the sampler seed and the record's global index, so a
batch is the same whatever the worker count and after a restore.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import grain
import numpy as np
from PIL import Image

from perflow_jax.data import tokenizer as tokenizer_lib

CACHE_KEYS = ("latent_mean", "latent_logvar", "context")


def get_path(record: dict[str, Any], key: str) -> Any:
  """``record['a']['b']`` for key 'a/b'; a ValueError naming the available keys when absent."""
  value: Any = record
  for part in key.split("/"):
    if not isinstance(value, dict) or part not in value:
      available = sorted(value) if isinstance(value, dict) else type(value).__name__
      raise ValueError(f"record has no key {key!r} (at {part!r}; available: {available}); "
                       "set config.data.image_key / config.data.text_key to the dataset's feature names")
    value = value[part]
  return value


def caption_text(value: Any) -> str:
  """A caption as str from bytes/str, or the first of a sequence of captions (e.g. COCO's five)."""
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value.item()
  if isinstance(value, (list, tuple, np.ndarray)):
    if len(value) == 0:
      return ""
    value = value[0]
  if isinstance(value, bytes):
    return value.decode("utf-8", errors="replace")
  return str(value)


def decode_image(value: Any, min_short_side: int = 0) -> Image.Image:
  """Encoded bytes (any PIL format) or a uint8 [H,W,C] array -> an RGB PIL image.

  For JPEGs, ``min_short_side`` lets the decoder downscale by a power of two while keeping the short side at
  least that long (``Image.draft``): large photos decode several times faster, with no visible change once
  resized.
  """
  if isinstance(value, np.ndarray):
    array = value if value.ndim == 3 else value[..., None]
    if array.shape[-1] == 1:
      array = np.repeat(array, 3, axis=-1)
    return Image.fromarray(np.asarray(array[..., :3], np.uint8))
  image = Image.open(io.BytesIO(value))
  if min_short_side > 0 and image.format == "JPEG":
    image.draft("RGB", (min_short_side, min_short_side))
  return image.convert("RGB")


def resize_and_crop(image: Image.Image, resolution: int, random_crop: bool,
                    rng: np.random.Generator | None) -> np.ndarray:
  """Resize the short side to ``resolution`` (bilinear, antialiased), crop R x R; uint8 [R,R,3].

  Center crop offsets follow torchvision's CenterCrop (round((size - R) / 2)); a random crop draws the offsets
  uniformly from ``rng``.
  """
  width, height = image.size
  scale = resolution / min(width, height)
  new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
  if (new_w, new_h) != (width, height):
    image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
  if random_crop:
    top = int(rng.integers(0, new_h - resolution + 1))
    left = int(rng.integers(0, new_w - resolution + 1))
  else:
    top = int(round((new_h - resolution) / 2.0))
    left = int(round((new_w - resolution) / 2.0))
  return np.asarray(image)[top:top + resolution, left:left + resolution]


def scale_to_unit(image: np.ndarray) -> np.ndarray:
  """uint8 [..., 3] -> float32 in [-1, 1] (x / 127.5 - 1)."""
  return image.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


@dataclasses.dataclass
class ImageTextExample(grain.transforms.RandomMap):
  """A record -> {'images': f32 [R,R,3] in [-1,1], 'input_ids': int32 [77][, 'input_ids_2': int32 [77]]}.

  ``tokenizer_2`` (SDXL's second tokenizer) adds 'input_ids_2', the same caption tokenized by it.
  """

  image_key: str
  text_key: str
  resolution: int
  tokenizer: Any
  random_crop: bool = False
  random_flip: bool = False
  tokenizer_2: Any = None

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    image = decode_image(get_path(element, self.image_key), self.resolution)
    pixels = resize_and_crop(image, self.resolution, self.random_crop, rng)
    if self.random_flip and rng.random() < 0.5:
      pixels = pixels[:, ::-1]
    text = caption_text(get_path(element, self.text_key))
    example = {"images": scale_to_unit(pixels), "input_ids": tokenizer_lib.tokenize(self.tokenizer, [text])[0]}
    if self.tokenizer_2 is not None:
      example["input_ids_2"] = tokenizer_lib.tokenize(self.tokenizer_2, [text])[0]
    return example


@dataclasses.dataclass
class CacheExample(grain.transforms.Map):
  """A latent-cache record -> {'latent_mean', 'latent_logvar': f32 [h,w,c], 'context': f32 [77,D]}."""

  def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.asarray(get_path(element, k), np.float32) for k in CACHE_KEYS}
