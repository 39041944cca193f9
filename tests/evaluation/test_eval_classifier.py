"""The procedural classifier: a short training learns colour, save/load round trip, the committed weights."""

import os
import shutil
import tempfile

from absl.testing import absltest
import jax
import numpy as np

from perflow_jax.data import procedural
from perflow_jax.evaluation import classifier
from perflow_jax.evaluation import features

ASSET = os.path.join(os.path.dirname(__file__), "..", "..", "assets", "demo", "classifier")
# A procedural seed that neither the committed classifier's training (0) nor its own held-out set used.
TEST_SEED = 20261130


class ClassifierTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp(prefix="perflow_classifier_")
    cls.out = os.path.join(cls.tmp, "clf")
    cls.result = classifier.train_classifier(cls.out, steps=200, batch_size=32, seed=3, num_train=1024,
                                             learning_rate=5e-3, log_every=0)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def test_short_training_learns_colour(self):
    self.assertEqual(set(self.result["heldout"]), set(procedural.LABEL_FIELDS))
    self.assertGreaterEqual(self.result["heldout"]["color"], 0.9)
    self.assertGreaterEqual(self.result["heldout"]["background"], 0.9)

  def test_save_load_round_trip(self):
    images, _ = procedural.images_and_labels(TEST_SEED, range(20), 32)
    first = classifier.load_classifier(self.out)
    again_dir = os.path.join(self.tmp, "again")
    classifier.save_classifier(again_dir, first.module, first.params, first.resolution)
    second = classifier.load_classifier(os.path.join(again_dir, classifier.PARAMS_FILE))
    chex_equal = jax.tree.map(np.array_equal, jax.device_get(first.params), jax.device_get(second.params))
    self.assertTrue(all(jax.tree.leaves(chex_equal)))
    # The same weights through the same program: bit for bit.
    np.testing.assert_array_equal(first.features(images, 8), second.features(images, 8))
    # Another batch size is another program: XLA may vectorise a convolution's sums differently (on AVX2-only
    # CPUs 9 of 2560 values moved, by at most 4.8e-7), so equal to float32 rounding, not to the bit.
    np.testing.assert_allclose(first.features(images, 8), second.features(images, 16), rtol=1e-5, atol=1e-6)
    p1, p2 = first.predict(images, 7), second.predict(images)
    self.assertEqual(set(p1), set(procedural.LABEL_FIELDS))
    for field in p1:
      np.testing.assert_array_equal(p1[field], p2[field])
    # The recorded accuracies and the reproducing command are in the config.
    self.assertEqual(first.config["heldout_accuracy"], self.result["heldout"])
    self.assertIn("--steps=200", first.config["command"])

  def test_committed_classifier(self):
    net = features.load_feature_net(f"classifier:{ASSET}")
    self.assertIsInstance(net, features.FeatureNet)
    self.assertEqual((net.name, net.dim), ("classifier", 128))
    self.assertLessEqual(sum(np.size(a) for a in jax.tree.leaves(net.params)), 200_000)
    images, labels = procedural.images_and_labels(TEST_SEED, range(256), 32)
    acc = classifier.accuracies(net.predict(images), labels)
    self.assertGreaterEqual(acc["shape"], 0.98, acc)
    self.assertGreaterEqual(acc["color"], 0.98, acc)
    feats = net.features(images[:10], batch_size=4)
    self.assertEqual((feats.shape, feats.dtype), ((10, 128), np.float64))
    # Other sizes are resized to the classifier's 32x32 inside; colour survives that.
    big, big_labels = procedural.images_and_labels(TEST_SEED, range(64), 64)
    self.assertEqual(net.features(big).shape, (64, 128))
    self.assertGreaterEqual(classifier.accuracies(net.predict(big), big_labels)["color"], 0.95)

  def test_errors(self):
    with self.assertRaisesRegex(features.FeatureNetError, "does not exist.*perflow_jax.evaluation.classifier"):
      features.load_feature_net(f"classifier:{os.path.join(self.tmp, 'nowhere')}")
    empty = os.path.join(self.tmp, "empty")
    os.makedirs(empty, exist_ok=True)
    with self.assertRaisesRegex(features.FeatureNetError, "config.json does not exist"):
      classifier.load_classifier(empty)
    net = classifier.load_classifier(self.out)
    with self.assertRaisesRegex(ValueError, "images / 127.5 - 1"):
      net.features(np.zeros((2, 32, 32, 3), np.uint8))
    with self.assertRaisesRegex(ValueError, r"\[N, H, W, 3\]"):
      net.predict(np.zeros((32, 32, 3), np.float32))


if __name__ == "__main__":
  absltest.main()
