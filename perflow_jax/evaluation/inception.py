"""pytorch-fid's FID Inception-v3 in Flax, loaded from the user's weights file: 2048-d pool features for FID.

The FID network is torchvision's Inception-v3 with the TensorFlow 2015-12-05 weights and four kinds of patched
blocks (pytorch-fid's FIDInceptionA/C/E_1/E_2): their average pools ignore the zero padding
(``count_include_pad=False``, as TensorFlow's), and the last block (Mixed_7c) max-pools where the paper
average-pools. Its classifier has 1008 classes. Features are the global average of Mixed_7c, [B, 2048].

Preprocessing follows pytorch-fid: bilinear resize to 299x299 without antialiasing (``F.interpolate``,
align_corners=False, which ``jax.image.resize(..., antialias=False)`` reproduces) of images in [-1, 1]. pytorch-fid
resizes [0, 1] images and then maps them to [-1, 1]; both steps are affine, so the order does not matter.

Weights: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (a torch state dict, read with
``torch.load(weights_only=True)``), or a .safetensors/.npz with the same keys. Nothing is downloaded. Every key of
the file must map onto the model and vice versa; BatchNorm's ``num_batches_tracked`` counters may be present or not.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from perflow_jax.evaluation import features as features_lib
from perflow_jax.weights import io as weights_io

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008  # The TF 2015-12-05 graph's classifier (1000 ImageNet classes plus unused ones).
BN_EPSILON = 1e-3  # torchvision's BasicConv2d BatchNorm eps.


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nn.Module):
  """Conv (no bias) -> BatchNorm (running statistics, eps 1e-3) -> ReLU; NHWC. Names as torchvision's."""
  features: int
  kernel: int | tuple[int, int]
  stride: int = 1
  padding: int | tuple[int, int] = 0
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ph, pw = _pair(self.padding)
    x = nn.Conv(self.features, _pair(self.kernel), strides=_pair(self.stride), padding=((ph, ph), (pw, pw)),
                use_bias=False, precision=self.precision, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
  # TensorFlow's average pool, which the FID blocks patch in: padded zeros are not counted.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


class FIDInceptionA(nn.Module):
  """Mixed_5b/c/d: 1x1, 5x5, double 3x3 and pooled branches; out 224 + pool_features channels."""
  pool_features: int
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda *a, **k: BasicConv2d(*a, precision=self.precision, **k)
    b1 = conv(64, 1, name="branch1x1")(x)
    b5 = conv(64, 5, padding=2, name="branch5x5_2")(conv(48, 1, name="branch5x5_1")(x))
    b3 = conv(64, 1, name="branch3x3dbl_1")(x)
    b3 = conv(96, 3, padding=1, name="branch3x3dbl_3")(conv(96, 3, padding=1, name="branch3x3dbl_2")(b3))
    bp = conv(self.pool_features, 1, name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a (unpatched): strided 3x3, strided double 3x3 and 3x3/2 max pool; 35x35 -> 17x17."""
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda *a, **k: BasicConv2d(*a, precision=self.precision, **k)
    b3 = conv(384, 3, stride=2, name="branch3x3")(x)
    bd = conv(64, 1, name="branch3x3dbl_1")(x)
    bd = conv(96, 3, stride=2, name="branch3x3dbl_3")(conv(96, 3, padding=1, name="branch3x3dbl_2")(bd))
    bp = nn.max_pool(x, (3, 3), strides=(2, 2))
    return jnp.concatenate([b3, bd, bp], axis=-1)


class FIDInceptionC(nn.Module):
  """Mixed_6b/c/d/e: factorised 7x7 branches of width channels_7x7; out 768 channels."""
  channels_7x7: int
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda *a, **k: BasicConv2d(*a, precision=self.precision, **k)
    c7 = self.channels_7x7
    row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
    b1 = conv(192, 1, name="branch1x1")(x)
    b7 = conv(c7, 1, name="branch7x7_1")(x)
    b7 = conv(192, name="branch7x7_3", **col)(conv(c7, name="branch7x7_2", **row)(b7))
    bd = conv(c7, 1, name="branch7x7dbl_1")(x)
    bd = conv(c7, name="branch7x7dbl_2", **col)(bd)
    bd = conv(c7, name="branch7x7dbl_3", **row)(bd)
    bd = conv(c7, name="branch7x7dbl_4", **col)(bd)
    bd = conv(192, name="branch7x7dbl_5", **row)(bd)
    bp = conv(192, 1, name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a (unpatched): strided 3x3 and 7x7-then-strided-3x3 branches and a max pool; 17x17 -> 8x8."""
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda *a, **k: BasicConv2d(*a, precision=self.precision, **k)
    b3 = conv(320, 3, stride=2, name="branch3x3_2")(conv(192, 1, name="branch3x3_1")(x))
    b7 = conv(192, 1, name="branch7x7x3_1")(x)
    b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = conv(192, 3, stride=2, name="branch7x7x3_4")(b7)
    bp = nn.max_pool(x, (3, 3), strides=(2, 2))
    return jnp.concatenate([b3, b7, bp], axis=-1)


class FIDInceptionE(nn.Module):
  """Mixed_7b (pool='avg', FIDInceptionE_1) and Mixed_7c (pool='max', FIDInceptionE_2); out 2048 channels."""
  pool: str = "avg"
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda *a, **k: BasicConv2d(*a, precision=self.precision, **k)
    b1 = conv(320, 1, name="branch1x1")(x)
    b3 = conv(384, 1, name="branch3x3_1")(x)
    b3 = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                          conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
    bd = conv(384, 3, padding=1, name="branch3x3dbl_2")(conv(448, 1, name="branch3x3dbl_1")(x))
    bd = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                          conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
    if self.pool == "avg":
      pooled = _avg_pool_3x3(x)
    else:
      # pytorch-fid's FIDInceptionE_2: the TF graph max-pools here (padding with -inf, as torch does).
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    bp = conv(192, 1, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """The FID Inception-v3 (pytorch-fid's ``fid_inception_v3``), NHWC, parameter names as the torch state dict.

  __call__: images [B, 299, 299, 3] in [-1, 1] (already resized) -> {'pool': [B, 2048] (the FID features),
  'logits': [B, 1008]}. Variables: 'params' (conv kernels, BatchNorm scale/bias, fc) and 'batch_stats'
  (BatchNorm running mean/var).
  """
  precision: Any = jax.lax.Precision.HIGHEST  # FID is sensitive to small feature errors; the cost is small.

  @nn.compact
  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    conv = lambda *a, **k: BasicConv2d(*a, precision=self.precision, **k)
    p = dict(precision=self.precision)
    x = conv(32, 3, stride=2, name="Conv2d_1a_3x3")(x)  # 149x149
    x = conv(32, 3, name="Conv2d_2a_3x3")(x)  # 147x147
    x = conv(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2))  # 73x73
    x = conv(80, 1, name="Conv2d_3b_1x1")(x)
    x = conv(192, 3, name="Conv2d_4a_3x3")(x)  # 71x71
    x = nn.max_pool(x, (3, 3), strides=(2, 2))  # 35x35
    x = FIDInceptionA(32, name="Mixed_5b", **p)(x)  # 256 channels
    x = FIDInceptionA(64, name="Mixed_5c", **p)(x)  # 288
    x = FIDInceptionA(64, name="Mixed_5d", **p)(x)  # 288
    x = InceptionB(name="Mixed_6a", **p)(x)  # 768 x 17x17
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = FIDInceptionC(c7, name=name, **p)(x)
    x = InceptionD(name="Mixed_7a", **p)(x)  # 1280 x 8x8
    x = FIDInceptionE("avg", name="Mixed_7b", **p)(x)  # 2048
    x = FIDInceptionE("max", name="Mixed_7c", **p)(x)  # 2048
    pool = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(NUM_CLASSES, precision=self.precision, name="fc")(pool)
    return {"pool": pool, "logits": logits}


def _flax_name(torch_key: str) -> tuple[str, tuple[str, ...], Any]:
  """torch key -> (collection, path in the Flax tree, how to turn the torch array into the Flax one)."""
  *module, leaf = torch_key.split(".")
  module = tuple(module)
  conv_kernel = lambda a: np.transpose(a, (2, 3, 1, 0))  # [O, I, kh, kw] -> [kh, kw, I, O]
  same = lambda a: a
  if module == ("fc",):
    return {"weight": ("params", module + ("kernel",), np.transpose),
            "bias": ("params", module + ("bias",), same)}[leaf]
  if module[-1] == "conv" and leaf == "weight":
    return "params", module + ("kernel",), conv_kernel
  if module[-1] == "bn":
    return {"weight": ("params", module + ("scale",), same), "bias": ("params", module + ("bias",), same),
            "running_mean": ("batch_stats", module + ("mean",), same),
            "running_var": ("batch_stats", module + ("var",), same)}[leaf]
  raise KeyError(torch_key)


def expected_shapes() -> dict[str, Any]:
  """The Flax variable shapes of InceptionV3: {'params': ..., 'batch_stats': ...} of ShapeDtypeStructs."""
  return jax.eval_shape(InceptionV3().init, jax.random.key(0), jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3)))


def torch_state_dict_keys() -> set[str]:
  """The torch state-dict keys this model takes (without BatchNorm's optional num_batches_tracked)."""
  keys = set()
  for collection, tree in expected_shapes().items():
    for path in flax.traverse_util.flatten_dict(flax.core.unfreeze(tree)):
      *module, leaf = path
      leaf = {("params", "kernel"): "weight", ("params", "scale"): "weight", ("params", "bias"): "bias",
              ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}[(collection, leaf)]
      keys.add(".".join(module + [leaf]))
  return keys


def convert_state_dict(state_dict: Mapping[str, np.ndarray], source: str = "state dict") -> dict[str, Any]:
  """A pytorch-fid FID Inception state dict -> Flax variables {'params', 'batch_stats'} (float32 numpy).

  Raises:
    features_lib.FeatureNetError: on any missing or unexpected key or shape mismatch, naming them.
  """
  expected = expected_shapes()
  wanted = torch_state_dict_keys()
  given = {k for k in state_dict if not k.endswith(".num_batches_tracked")}
  missing, unexpected = sorted(wanted - given), sorted(given - wanted)
  if missing or unexpected:
    raise features_lib.FeatureNetError(
        f"{source} is not pytorch-fid's FID Inception ({WEIGHTS_FILE}): {len(missing)} keys missing "
        f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}). torchvision's ImageNet "
        "inception_v3 weights are a different network; use the FID weights.")
  flat: dict[tuple[str, ...], np.ndarray] = {}
  shapes = {c: flax.traverse_util.flatten_dict(flax.core.unfreeze(t)) for c, t in expected.items()}
  for key in sorted(wanted):
    collection, path, transform = _flax_name(key)
    value = transform(np.asarray(state_dict[key], np.float32))
    want = shapes[collection][path].shape
    if value.shape != want:
      raise features_lib.FeatureNetError(
          f"{source}: {key} has shape {np.shape(state_dict[key])}, which does not fit the FID Inception "
          f"({'.'.join(path)} {want}); is this {WEIGHTS_FILE}?")
    flat[(collection,) + path] = value
  return flax.traverse_util.unflatten_dict(flat)


def read_weights(path: str) -> dict[str, np.ndarray]:
  """Reads the FID Inception state dict from a .pth (torch), .safetensors or .npz file."""
  if not os.path.isfile(path):
    raise features_lib.FeatureNetError(
        f"Inception weights {path} do not exist; download pytorch-fid's {WEIGHTS_FILE} (a release asset of the "
        "pytorch-fid project) on a machine with network access and pass its path.")
  if path.endswith(".npz"):
    try:
      with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}
    except (OSError, ValueError) as e:
      raise features_lib.FeatureNetError(f"could not read Inception weights {path} as .npz: {e}") from None
  if path.endswith((".pth", ".pt", ".bin", ".safetensors")):
    try:
      # The user named this file: torch.load(weights_only=True) refuses anything but tensors and containers.
      return weights_io.read_state_dict(path, allow_pickle=True)
    except weights_io.WeightFileError as e:
      raise features_lib.FeatureNetError(f"could not read Inception weights {path}: {e}") from None
  raise features_lib.FeatureNetError(
      f"Inception weights {path}: unknown file type; expected pytorch-fid's {WEIGHTS_FILE} (.pth) or a "
      ".safetensors/.npz with the same keys.")


class Inception:
  """A loaded FID Inception: a ``FeatureNet`` (name 'inception', dim 2048)."""

  name = "inception"
  dim = FEATURE_DIM

  def __init__(self, variables: Mapping[str, Any]):
    self.module = InceptionV3()
    self.variables = jax.device_put(dict(variables))

    def forward(variables, images):
      # pytorch-fid: F.interpolate(bilinear, align_corners=False), no antialiasing, whatever the input size.
      images = jax.image.resize(images, (images.shape[0], INPUT_SIZE, INPUT_SIZE, 3), "bilinear",
                                antialias=False)
      return {"pool": self.module.apply(variables, images)["pool"]}

    self._forward = jax.jit(forward)

  def features(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """images [N, H, W, 3] in [-1, 1] -> FID pool features [N, 2048] float64."""
    images = features_lib.check_images(images, "Inception")
    out = features_lib.batched(lambda x: jax.device_get(self._forward(self.variables, x)), images, batch_size)
    return out["pool"].astype(np.float64)


def load_inception(path: str) -> Inception:
  """Loads pytorch-fid's FID Inception from ``path`` (.pth, or .safetensors/.npz with the same keys)."""
  return Inception(convert_state_dict(read_weights(path), source=path))
