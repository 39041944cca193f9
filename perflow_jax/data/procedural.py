"""A procedural text-image dataset: flat shapes drawn in numpy from captions, no network needed.

Every example is a function of ``(seed, index)`` only: ``np.random.default_rng([seed, index])`` picks a shape,
a shape colour, a different background colour, a size and a position, and the image is drawn from those at any
resolution. The caption names all five, e.g. "a large red circle at the top left on a blue background".

The vocabulary is small and fixed (``VOCABULARY``), so a tiny CLIP tokenizer covers it
(``perflow_jax.data.tokenizer.write_tiny_clip_tokenizer``), and the labels of every example are exposed
(``labels``) so that a classifier can be trained to recover colour and shape from the image.

Geometry, in fractions of the image side: the shape's centre is ``POSITIONS[p]`` and its half-extent ``r`` is
``SIZES[s]``. circle: distance <= r; square: max(|dx|, |dy|) <= r; diamond: |dx| + |dy| <= r; triangle:
apex (cx, cy - r), base corners (cx -+ r, cy + r) (pointing up; y grows downwards as in image rows).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
# RGB in 0..255; far apart so that a classifier (and a test) can tell them apart after resizing.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
# Half-extent of the shape as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.12, "medium": 0.18, "large": 0.24}
SIZE_NAMES: tuple[str, ...] = tuple(SIZES)
# Caption phrase -> shape centre (x, y) as fractions of the image side; corners leave room for a large shape.
POSITIONS: dict[str, tuple[float, float]] = {
    "in the center": (0.5, 0.5),
    "at the top left": (0.28, 0.28),
    "at the top right": (0.72, 0.28),
    "at the bottom left": (0.28, 0.72),
    "at the bottom right": (0.72, 0.72),
}
POSITION_NAMES: tuple[str, ...] = tuple(POSITIONS)

# Label fields of an example, in a fixed order; each is an index into the matching *_NAMES tuple.
LABEL_FIELDS: tuple[str, ...] = ("shape", "color", "background", "size", "position")
LABEL_NAMES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": COLOR_NAMES,
    "background": COLOR_NAMES,
    "size": SIZE_NAMES,
    "position": POSITION_NAMES,
}


def _vocabulary() -> tuple[str, ...]:
  words = {"a", "on", "background"}
  words.update(SHAPES, COLOR_NAMES, SIZE_NAMES)
  for phrase in POSITION_NAMES:
    words.update(phrase.split())
  return tuple(sorted(words))


# Every word any caption can contain (sorted); the tiny tokenizer has one token per word.
VOCABULARY: tuple[str, ...] = _vocabulary()


def labels(seed: int, index: int) -> dict[str, int]:
  """The attribute indices of example ``index``: {'shape', 'color', 'background', 'size', 'position'} -> int."""
  if index < 0:
    raise ValueError(f"procedural example index must be >= 0, got {index}")
  rng = np.random.default_rng([seed, index])
  shape = int(rng.integers(len(SHAPES)))
  color = int(rng.integers(len(COLOR_NAMES)))
  # The background is any colour but the shape's, so the shape is always visible.
  background = int(rng.integers(len(COLOR_NAMES) - 1))
  background += background >= color
  size = int(rng.integers(len(SIZE_NAMES)))
  position = int(rng.integers(len(POSITION_NAMES)))
  return {"shape": shape, "color": color, "background": background, "size": size, "position": position}


def caption(label: dict[str, int]) -> str:
  """'a {size} {color} {shape} {position} on a {background} background' for a label dict."""
  return (f"a {SIZE_NAMES[label['size']]} {COLOR_NAMES[label['color']]} {SHAPES[label['shape']]} "
          f"{POSITION_NAMES[label['position']]} on a {COLOR_NAMES[label['background']]} background")


def shape_mask(shape: str, center: tuple[float, float], half_extent: float, resolution: int) -> np.ndarray:
  """Boolean [resolution, resolution] mask of a shape; pixel (row, col) is sampled at its centre."""
  if shape not in SHAPES:
    raise ValueError(f"unknown procedural shape {shape!r}; expected one of {SHAPES}")
  coords = (np.arange(resolution, dtype=np.float64) + 0.5) / resolution
  dx = coords[None, :] - center[0]
  dy = coords[:, None] - center[1]
  r = half_extent
  if shape == "circle":
    return dx * dx + dy * dy <= r * r
  if shape == "square":
    return np.maximum(np.abs(dx), np.abs(dy)) <= r
  if shape == "diamond":
    return np.abs(dx) + np.abs(dy) <= r
  # Triangle pointing up: between y = cy - r and y = cy + r, half-width grows linearly from 0 to r.
  half_width = (dy + r) / 2.0
  return (dy <= r) & (np.abs(dx) <= half_width)


def draw(label: dict[str, int], resolution: int) -> np.ndarray:
  """The image of a label dict: uint8 [resolution, resolution, 3]."""
  if resolution < 8:
    raise ValueError(f"procedural resolution must be >= 8 pixels, got {resolution}")
  image = np.empty((resolution, resolution, 3), np.uint8)
  image[...] = COLORS[COLOR_NAMES[label["background"]]]
  mask = shape_mask(SHAPES[label["shape"]], POSITIONS[POSITION_NAMES[label["position"]]],
                    SIZES[SIZE_NAMES[label["size"]]], resolution)
  image[mask] = COLORS[COLOR_NAMES[label["color"]]]
  return image


def example(seed: int, index: int, resolution: int) -> dict[str, Any]:
  """One example: {'image': uint8 [R,R,3], 'text': str, 'label': {field: int}}."""
  label = labels(seed, index)
  return {"image": draw(label, resolution), "text": caption(label), "label": label}


def images_and_labels(seed: int, indices: Sequence[int], resolution: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Examples ``(seed, i)`` as model inputs: images float32 [N, R, R, 3] in [-1, 1] and {field: [N] int32}."""
  examples = [example(seed, int(i), resolution) for i in indices]
  images = np.stack([ex["image"] for ex in examples]).astype(np.float32) / 127.5 - 1.0
  labels_ = {field: np.asarray([ex["label"][field] for ex in examples], np.int32) for field in LABEL_FIELDS}
  return images, labels_


class ProceduralSource:
  """A grain random-access source of ``num_examples`` procedural examples (picklable, stateless).

  ``source[i]`` is ``{'image': uint8 [R,R,3], 'text': bytes (utf-8), 'shape', 'color', 'background', 'size',
  'position': int64}``, the same record layout as a prepared tfds dataset of it.
  """

  def __init__(self, num_examples: int, resolution: int, seed: int = 0):
    if num_examples <= 0:
      raise ValueError(f"procedural num_examples must be positive, got {num_examples}")
    self.num_examples = int(num_examples)
    self.resolution = int(resolution)
    self.seed = int(seed)

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < self.num_examples:
      raise IndexError(f"procedural index {index} out of range [0, {self.num_examples})")
    ex = example(self.seed, index, self.resolution)
    record = {"image": ex["image"], "text": ex["text"].encode("utf-8")}
    record.update({k: np.int64(v) for k, v in ex["label"].items()})
    return record

  def __repr__(self) -> str:
    return f"ProceduralSource(num_examples={self.num_examples}, resolution={self.resolution}, seed={self.seed})"
