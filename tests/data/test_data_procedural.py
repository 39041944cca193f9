"""Procedural dataset: deterministic by seed, and the drawn shape/colours are where the caption says."""

from absl.testing import absltest
import numpy as np

from perflow_jax.data import procedural

# Probe points (dx, dy) in units of the half-extent r, and which shapes cover them (see the module docstring's
# geometry). The four rows differ, so the probes identify the shape.
_PROBES = ((0.9, -0.9), (0.9, 0.9), (0.65, -0.65), (0.0, -0.9))
_INSIDE = {
    "circle": (False, False, True, True),
    "square": (True, True, True, True),
    "triangle": (False, True, False, True),
    "diamond": (False, False, False, True),
}


def _parse(caption):
  """Caption -> (size, color, shape, position phrase, background), read from the words only."""
  words = caption.split()
  assert words[0] == "a" and words[-1] == "background" and words[-4:-2] == ["on", "a"], caption
  return words[1], words[2], words[3], " ".join(words[4:-4]), words[-2]


class ProceduralTest(absltest.TestCase):

  def test_deterministic_by_seed(self):
    a = procedural.example(7, 11, 32)
    b = procedural.example(7, 11, 32)
    np.testing.assert_array_equal(a["image"], b["image"])
    self.assertEqual(a["text"], b["text"])
    self.assertEqual(a["label"], b["label"])
    # Another seed gives another dataset (compare many examples: single ones can coincide).
    captions = [procedural.example(7, i, 8)["text"] for i in range(20)]
    others = [procedural.example(8, i, 8)["text"] for i in range(20)]
    self.assertNotEqual(captions, others)

  def test_caption_words_are_in_vocabulary_and_match_labels(self):
    for index in range(50):
      ex = procedural.example(3, index, 16)
      self.assertTrue(set(ex["text"].split()) <= set(procedural.VOCABULARY), ex["text"])
      size, color, shape, position, background = _parse(ex["text"])
      label = ex["label"]
      self.assertEqual(procedural.SHAPES[label["shape"]], shape)
      self.assertEqual(procedural.COLOR_NAMES[label["color"]], color)
      self.assertEqual(procedural.COLOR_NAMES[label["background"]], background)
      self.assertEqual(procedural.SIZE_NAMES[label["size"]], size)
      self.assertEqual(procedural.POSITION_NAMES[label["position"]], position)
      self.assertNotEqual(color, background)
    self.assertLen(procedural.VOCABULARY, 26)

  def test_drawn_shape_colour_and_position_follow_caption(self):
    res = 256  # large enough that the probes sit >= 1.5 px from every shape edge
    seen_shapes = set()
    for index in range(40):
      ex = procedural.example(5, index, res)
      size, color, shape, position, background = _parse(ex["text"])
      seen_shapes.add(shape)
      image = ex["image"]
      cx, cy = procedural.POSITIONS[position]
      r = procedural.SIZES[size]

      def pixel(fx, fy):
        return tuple(image[int(fy * res), int(fx * res)])

      self.assertEqual(pixel(cx, cy), procedural.COLORS[color])
      # The corner diagonally opposite the shape is background.
      self.assertEqual(pixel(0.02 if cx > 0.5 else 0.97, 0.02 if cy > 0.5 else 0.97),
                       procedural.COLORS[background])
      for (dx, dy), inside in zip(_PROBES, _INSIDE[shape]):
        want = procedural.COLORS[color] if inside else procedural.COLORS[background]
        self.assertEqual(pixel(cx + dx * r, cy + dy * r), want, f"{ex['text']} probe {(dx, dy)}")
      # Only the two named colours appear.
      colours = {tuple(int(v) for v in c) for c in np.unique(image.reshape(-1, 3), axis=0)}
      self.assertEqual(colours, {procedural.COLORS[color], procedural.COLORS[background]})
    self.assertEqual(seen_shapes, set(procedural.SHAPES))

  def test_source_records(self):
    source = procedural.ProceduralSource(5, 24, seed=2)
    self.assertLen(source, 5)
    record = source[4]
    self.assertEqual(record["image"].shape, (24, 24, 3))
    self.assertEqual(record["image"].dtype, np.uint8)
    self.assertEqual(record["text"], procedural.example(2, 4, 24)["text"].encode())
    self.assertEqual(int(record["shape"]), procedural.labels(2, 4)["shape"])
    with self.assertRaises(IndexError):
      source[5]  # pylint: disable=pointless-statement
    with self.assertRaisesRegex(ValueError, "num_examples"):
      procedural.ProceduralSource(0, 24)


if __name__ == "__main__":
  absltest.main()
