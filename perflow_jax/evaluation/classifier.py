r"""A small CNN that reads the labels of procedural images; its features serve the demo's Fréchet distance.

  python -m perflow_jax.evaluation.classifier --out=assets/demo/classifier [--steps=1500 --batch_size=64 --seed=0]

``ProceduralClassifier`` looks at 32x32 RGB images in [-1, 1] and has one head per procedural label field
(``perflow_jax.data.procedural.LABEL_FIELDS``: shape, color, background, size, position). Its 128-d penultimate
activations are the features of the offline demo's Fréchet distance, and its colour/shape heads measure prompt
faithfulness of generated pictures.

``train_classifier`` trains it on procedural examples of one seed with mild augmentation (blur, colour jitter,
gaussian noise), because generated pictures are slightly blurry and off-colour, and measures per-field accuracy
on examples of another seed. The output directory holds ``params.msgpack`` (flax msgpack of float32 params) and
``config.json`` (architecture, training settings, held-out accuracies); ``load_classifier`` reads it back.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from perflow_jax.data import procedural
from perflow_jax.evaluation import features as features_lib

PARAMS_FILE = "params.msgpack"
CONFIG_FILE = "config.json"
# The procedural seed of the held-out examples is the training seed plus this: different images' labels.
HELDOUT_SEED_OFFSET = 1_000_003
NUM_HELDOUT = 1024


def default_num_classes() -> tuple[tuple[str, int], ...]:
  """((field, number of classes), ...) for every procedural label field, in LABEL_FIELDS order."""
  return tuple((field, len(procedural.LABEL_NAMES[field])) for field in procedural.LABEL_FIELDS)


class ProceduralClassifier(nn.Module):
  """Five 3x3 convolutions (three strided), a dense feature layer and one linear head per label field.

  No normalisation layers: group/batch norm would remove the absolute colour that the colour heads need.
  The final 4x4 map is flattened rather than pooled so that position and size stay readable; the global mean
  and max of the third convolution's map join it, so colour does not have to be read through position.

  Attributes:
    num_classes: ((field, classes), ...), hashable so that the module stays a frozen dataclass.
    width: channels of the middle convolutions (the first has width // 2, the fourth 2 * width).
    feature_dim: size of the feature layer.
  """
  num_classes: tuple[tuple[str, int], ...] = default_num_classes()
  width: int = 32
  feature_dim: int = 128

  @nn.compact
  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    """images [B, 32, 32, 3] in [-1, 1] -> {'features': [B, feature_dim], field: logits [B, classes]}."""
    w = self.width
    x = images
    # (channels, stride): 32x32 -> 16x16 -> 8x8 -> 4x4.
    pooled = []
    for i, (channels, stride) in enumerate(((w // 2, 1), (w, 2), (w, 1), (2 * w, 2), (w, 2))):
      x = nn.relu(nn.Conv(channels, (3, 3), strides=(stride, stride), padding="SAME", name=f"conv{i}")(x))
      if i == 2:
        # Global mean and max of the 16x16 map: which colours are present and how much of each, wherever the
        # shape is; without them colour is learnt several times slower through the position-dependent path.
        pooled = [x.mean(axis=(1, 2)), x.max(axis=(1, 2))]
    x = jnp.concatenate([x.reshape(x.shape[0], -1)] + pooled, axis=-1)
    feats = nn.relu(nn.Dense(self.feature_dim, name="features")(x))
    out = {"features": feats}
    for field, classes in self.num_classes:
      out[field] = nn.Dense(classes, name=f"head_{field}")(feats)
    return out


def _module_from_config(model: Mapping[str, Any]) -> ProceduralClassifier:
  return ProceduralClassifier(num_classes=tuple((str(f), int(n)) for f, n in model["num_classes"]),
                              width=int(model["width"]), feature_dim=int(model["feature_dim"]))


class Classifier:
  """A loaded ProceduralClassifier: a ``FeatureNet`` (name 'classifier') plus label predictions."""

  name = "classifier"

  def __init__(self, module: ProceduralClassifier, params: Any, resolution: int = 32,
               config: Mapping[str, Any] | None = None):
    self.module = module
    self.params = jax.device_put(params)
    self.resolution = int(resolution)
    self.dim = int(module.feature_dim)
    self.fields = tuple(field for field, _ in module.num_classes)
    self.config = dict(config or {})

    def forward(params, images):
      if images.shape[1:3] != (self.resolution, self.resolution):
        # Antialiased when shrinking (large generated images); bilinear when enlarging.
        images = jax.image.resize(images, (images.shape[0], self.resolution, self.resolution, 3), "bilinear")
      return module.apply({"params": params}, images)

    self._forward = jax.jit(forward)

  def outputs(self, images: np.ndarray, batch_size: int = 64) -> dict[str, np.ndarray]:
    """{'features': [N, dim] float64, field: logits [N, classes] float32} for images [N, H, W, 3] in [-1, 1]."""
    images = features_lib.check_images(images, "Classifier")
    out = features_lib.batched(lambda x: jax.device_get(self._forward(self.params, x)), images, batch_size)
    out["features"] = out["features"].astype(np.float64)
    return out

  def features(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """images [N, H, W, 3] in [-1, 1] (resized to the training resolution) -> features [N, dim] float64."""
    return self.outputs(images, batch_size)["features"]

  def predict(self, images: np.ndarray, batch_size: int = 64) -> dict[str, np.ndarray]:
    """images [N, H, W, 3] in [-1, 1] -> {field: predicted class index [N] int64} for every label field."""
    out = self.outputs(images, batch_size)
    return {field: np.argmax(out[field], axis=-1).astype(np.int64) for field in self.fields}


def _blur3(x: jax.Array) -> jax.Array:
  """[B, H, W, C] -> the same images under a separable [1, 2, 1] / 4 blur with edge padding."""
  for axis in (1, 2):
    pad = [(0, 0)] * 4
    pad[axis] = (1, 1)
    p = jnp.pad(x, pad, mode="edge")
    n = x.shape[axis]
    x = (jax.lax.slice_in_dim(p, 0, n, axis=axis) + 2 * jax.lax.slice_in_dim(p, 1, n + 1, axis=axis)
         + jax.lax.slice_in_dim(p, 2, n + 2, axis=axis)) / 4
  return x


def augment(key: jax.Array, images: jax.Array) -> jax.Array:
  """Mild corruptions of the kind generated pictures show; images [B, H, W, 3] in [-1, 1], same shape out.

  Per image: with probability 1/2 a partial blur (a random mix of the image with its 3x3 blur, one or two
  passes); a colour jitter (per-channel gain in [0.9, 1.1] and offset in [-0.1, 0.1]); gaussian noise of
  std in [0, 0.08]; then clipping to [-1, 1] as a decoder's output is.
  """
  b = images.shape[0]
  k_blur, k_amount, k_twice, k_gain, k_offset, k_std, k_noise = jax.random.split(key, 7)
  once = _blur3(images)
  twice = _blur3(once)
  blurred = jnp.where(jax.random.bernoulli(k_twice, 0.3, (b, 1, 1, 1)), twice, once)
  amount = jax.random.uniform(k_amount, (b, 1, 1, 1)) * jax.random.bernoulli(k_blur, 0.5, (b, 1, 1, 1))
  x = images + amount * (blurred - images)
  gain = jax.random.uniform(k_gain, (b, 1, 1, 3), minval=0.9, maxval=1.1)
  offset = jax.random.uniform(k_offset, (b, 1, 1, 3), minval=-0.1, maxval=0.1)
  x = x * gain + offset
  std = jax.random.uniform(k_std, (b, 1, 1, 1), maxval=0.08)
  x = x + std * jax.random.normal(k_noise, x.shape)
  return jnp.clip(x, -1.0, 1.0)


def accuracies(predictions: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray]) -> dict[str, float]:
  """{field: fraction of predictions equal to labels} over the fields both hold."""
  return {field: float(np.mean(np.asarray(predictions[field]) == np.asarray(labels[field])))
          for field in predictions if field in labels}


def save_classifier(out_dir: str, module: ProceduralClassifier, params: Any, resolution: int,
                    extra: Mapping[str, Any] | None = None) -> None:
  """Writes out_dir/params.msgpack (float32 params) and out_dir/config.json (architecture + ``extra``)."""
  os.makedirs(out_dir, exist_ok=True)
  host = jax.tree.map(lambda a: np.asarray(a, np.float32), jax.device_get(params))
  with open(os.path.join(out_dir, PARAMS_FILE), "wb") as f:
    f.write(flax.serialization.msgpack_serialize(flax.serialization.to_state_dict(host)))
  config = {
      "model": {"num_classes": [list(p) for p in module.num_classes], "width": module.width,
                "feature_dim": module.feature_dim},
      "resolution": int(resolution),
      "label_names": {field: list(procedural.LABEL_NAMES[field]) for field, _ in module.num_classes},
  }
  config.update(extra or {})
  with open(os.path.join(out_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2)
    f.write("\n")


def load_classifier(path: str) -> Classifier:
  """Loads a classifier directory written by ``train_classifier`` (or the path of a file inside it)."""
  folder = path if os.path.isdir(path) else os.path.dirname(path)
  fix = "train one with `python -m perflow_jax.evaluation.classifier --out=DIR` (see assets/demo/classifier)"
  config_path = os.path.join(folder, CONFIG_FILE)
  params_path = os.path.join(folder, PARAMS_FILE)
  for needed in (config_path, params_path):
    if not os.path.isfile(needed):
      raise features_lib.FeatureNetError(f"classifier {path}: {needed} does not exist; {fix}.")
  try:
    with open(config_path, encoding="utf-8") as f:
      config = json.load(f)
    module = _module_from_config(config["model"])
    resolution = int(config["resolution"])
  except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
    raise features_lib.FeatureNetError(f"classifier {path}: {config_path} is not a classifier config ({e}); "
                                       f"{fix}.") from None
  # Abstract init gives the expected tree, so a params file of another architecture fails here, by name.
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, resolution, resolution, 3)))["params"]
  with open(params_path, "rb") as f:
    data = f.read()
  try:
    state = flax.serialization.msgpack_restore(data)
    params = flax.serialization.from_state_dict(jax.tree.map(lambda s: None, shapes), state)
  except Exception as e:  # msgpack and flax raise several types for a corrupt or mismatched file
    raise features_lib.FeatureNetError(f"classifier {path}: {params_path} does not hold this architecture's "
                                       f"params ({e}); {fix}.") from None
  for (key_path, want), got in zip(jax.tree_util.tree_leaves_with_path(shapes), jax.tree.leaves(params)):
    if np.shape(got) != want.shape:
      raise features_lib.FeatureNetError(
          f"classifier {path}: {jax.tree_util.keystr(key_path)} has shape {np.shape(got)}, the config's "
          f"architecture needs {want.shape}; {fix}.")
  return Classifier(module, params, resolution, config)


def train_classifier(out_dir: str, *, steps: int, batch_size: int, seed: int, resolution: int = 32,
                     num_train: int = 8192, learning_rate: float = 3e-3, width: int = 32,
                     feature_dim: int = 128, log_every: int = 100) -> dict[str, Any]:
  """Trains a ProceduralClassifier, saves it to out_dir, and returns its held-out accuracies.

  Args:
    out_dir: where params.msgpack and config.json go.
    steps: optimisation steps (AdamW, warmup + cosine decay).
    batch_size: examples per step, drawn with replacement from the training pool.
    seed: the procedural seed of the training pool and the key of init, batches and augmentation; the held-out
      examples use procedural seed ``seed + HELDOUT_SEED_OFFSET``.
    resolution: image side the classifier sees.
    num_train: size of the training pool (the dataset has 4*8*7*3*5 = 3360 label combinations).
    learning_rate: peak learning rate.
    width: conv width of the model.
    feature_dim: feature layer size.
    log_every: print progress every this many steps (0: never).

  Returns:
    {'heldout': {field: accuracy}, 'heldout_augmented': {field: accuracy}} on NUM_HELDOUT examples, clean and
    under one draw of the training augmentation.
  """
  start = time.time()
  module = ProceduralClassifier(width=width, feature_dim=feature_dim)
  train_images, train_labels = procedural.images_and_labels(seed, range(num_train), resolution)
  heldout_seed = seed + HELDOUT_SEED_OFFSET
  test_images, test_labels = procedural.images_and_labels(heldout_seed, range(NUM_HELDOUT), resolution)

  key = jax.random.key(seed)
  init_key, key = jax.random.split(key)
  params = module.init(init_key, jnp.zeros((1, resolution, resolution, 3)))["params"]
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(100, steps // 10 + 1), steps,
                                                learning_rate * 0.02)
  tx = optax.adamw(schedule, weight_decay=1e-4)
  opt_state = tx.init(params)
  # The pool lives on the device once, as arguments (a closed-over array would be baked into the program).
  data_images = jnp.asarray(train_images)
  data_labels = {k: jnp.asarray(v) for k, v in train_labels.items()}

  @jax.jit
  def train_step(params, opt_state, step, data_images, data_labels):
    k_idx, k_aug = jax.random.split(jax.random.fold_in(key, step))
    idx = jax.random.randint(k_idx, (batch_size,), 0, num_train)
    images = augment(k_aug, data_images[idx])

    def loss_fn(p):
      out = module.apply({"params": p}, images)
      # Sum over fields: each head is an independent classification of the same picture.
      return sum(optax.softmax_cross_entropy_with_integer_labels(out[f], data_labels[f][idx]).mean()
                 for f, _ in module.num_classes)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  for step in range(steps):
    params, opt_state, loss = train_step(params, opt_state, step, data_images, data_labels)
    if log_every and (step + 1) % log_every == 0:
      print(f"classifier step {step + 1}/{steps}: loss {float(loss):.4f} ({time.time() - start:.0f}s)", flush=True)

  classifier = Classifier(module, params, resolution)
  heldout = accuracies(classifier.predict(test_images, 256), test_labels)
  noisy = np.asarray(augment(jax.random.key(seed + 1), jnp.asarray(test_images)))
  heldout_augmented = accuracies(classifier.predict(noisy, 256), test_labels)
  result = {"heldout": heldout, "heldout_augmented": heldout_augmented}
  save_classifier(out_dir, module, params, resolution, {
      "train": {"steps": steps, "batch_size": batch_size, "seed": seed, "num_train": num_train,
                "learning_rate": learning_rate, "seconds": round(time.time() - start, 1)},
      "heldout_seed": heldout_seed, "num_heldout": NUM_HELDOUT,
      "heldout_accuracy": heldout, "heldout_accuracy_augmented": heldout_augmented,
      "num_params": int(sum(np.size(a) for a in jax.tree.leaves(params))),
      "command": (f"python -m perflow_jax.evaluation.classifier --out={out_dir} --steps={steps} "
                  f"--batch_size={batch_size} --seed={seed} --resolution={resolution}"),
  })
  return result


def main(argv: Sequence[str]) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import app  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  fv = flags.FLAGS
  result = train_classifier(fv.out, steps=fv.steps, batch_size=fv.batch_size, seed=fv.seed,
                            resolution=fv.resolution)
  print(json.dumps(result, indent=2))
  print(f"wrote {os.path.join(fv.out, PARAMS_FILE)} and {os.path.join(fv.out, CONFIG_FILE)}")


if __name__ == "__main__":
  from absl import app as _app  # pylint: disable=g-import-not-at-top
  from absl import flags as _flags  # pylint: disable=g-import-not-at-top
  _flags.DEFINE_string("out", "assets/demo/classifier", "Output directory (params.msgpack, config.json).")
  _flags.DEFINE_integer("steps", 1500, "Training steps.")
  _flags.DEFINE_integer("batch_size", 64, "Examples per step.")
  _flags.DEFINE_integer("seed", 0, "Procedural seed of the training pool (held-out: seed + 1000003) and RNG seed.")
  _flags.DEFINE_integer("resolution", 32, "Image side.")
  _app.run(main)
