"""FID Inception: full-network parity with a PyTorch FID Inception on random weights, key sets, weight errors.

torchvision does not import with the CPU torch build here, so the reference is a compact PyTorch FID
Inception written below with pytorch-fid's module names (torchvision's Inception3 with pytorch-fid's
FIDInceptionA/C/E_1/E_2 blocks, fc of 1008 classes, no aux head), run the way pytorch-fid runs it: bilinear
resize of [0, 1] images to 299 (align_corners=False), then 2x - 1.
"""

import os
import shutil
import tempfile

from absl.testing import absltest
import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from perflow_jax.evaluation import features
from perflow_jax.evaluation import inception


class _Conv(nn.Module):
  """torchvision's BasicConv2d: conv without bias, BatchNorm eps 1e-3, ReLU."""

  def __init__(self, cin, cout, kernel, stride=1, padding=0):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
    self.bn = nn.BatchNorm2d(cout, eps=0.001)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


def _avg(x):
  return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _A(nn.Module):

  def __init__(self, cin, pool_features):
    super().__init__()
    self.branch1x1 = _Conv(cin, 64, 1)
    self.branch5x5_1, self.branch5x5_2 = _Conv(cin, 48, 1), _Conv(48, 64, 5, padding=2)
    self.branch3x3dbl_1 = _Conv(cin, 64, 1)
    self.branch3x3dbl_2, self.branch3x3dbl_3 = _Conv(64, 96, 3, padding=1), _Conv(96, 96, 3, padding=1)
    self.branch_pool = _Conv(cin, pool_features, 1)

  def forward(self, x):
    return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                      self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                      self.branch_pool(_avg(x))], 1)


class _B(nn.Module):

  def __init__(self, cin):
    super().__init__()
    self.branch3x3 = _Conv(cin, 384, 3, stride=2)
    self.branch3x3dbl_1 = _Conv(cin, 64, 1)
    self.branch3x3dbl_2, self.branch3x3dbl_3 = _Conv(64, 96, 3, padding=1), _Conv(96, 96, 3, stride=2)

  def forward(self, x):
    return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                      F.max_pool2d(x, 3, stride=2)], 1)


class _C(nn.Module):

  def __init__(self, cin, c7):
    super().__init__()
    row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
    self.branch1x1 = _Conv(cin, 192, 1)
    self.branch7x7_1, self.branch7x7_2, self.branch7x7_3 = _Conv(cin, c7, 1), _Conv(c7, c7, **row), _Conv(
        c7, 192, **col)
    self.branch7x7dbl_1, self.branch7x7dbl_2 = _Conv(cin, c7, 1), _Conv(c7, c7, **col)
    self.branch7x7dbl_3, self.branch7x7dbl_4 = _Conv(c7, c7, **row), _Conv(c7, c7, **col)
    self.branch7x7dbl_5 = _Conv(c7, 192, **row)
    self.branch_pool = _Conv(cin, 192, 1)

  def forward(self, x):
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = x
    for i in range(1, 6):
      bd = getattr(self, f"branch7x7dbl_{i}")(bd)
    return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_avg(x))], 1)


class _D(nn.Module):

  def __init__(self, cin):
    super().__init__()
    self.branch3x3_1, self.branch3x3_2 = _Conv(cin, 192, 1), _Conv(192, 320, 3, stride=2)
    self.branch7x7x3_1 = _Conv(cin, 192, 1)
    self.branch7x7x3_2 = _Conv(192, 192, (1, 7), padding=(0, 3))
    self.branch7x7x3_3 = _Conv(192, 192, (7, 1), padding=(3, 0))
    self.branch7x7x3_4 = _Conv(192, 192, 3, stride=2)

  def forward(self, x):
    b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
    return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class _E(nn.Module):

  def __init__(self, cin, max_pool):
    super().__init__()
    self.max_pool = max_pool
    self.branch1x1 = _Conv(cin, 320, 1)
    self.branch3x3_1 = _Conv(cin, 384, 1)
    self.branch3x3_2a = _Conv(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3_2b = _Conv(384, 384, (3, 1), padding=(1, 0))
    self.branch3x3dbl_1, self.branch3x3dbl_2 = _Conv(cin, 448, 1), _Conv(448, 384, 3, padding=1)
    self.branch3x3dbl_3a = _Conv(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = _Conv(384, 384, (3, 1), padding=(1, 0))
    self.branch_pool = _Conv(cin, 192, 1)

  def forward(self, x):
    b3 = self.branch3x3_1(x)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg(x)
    return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                      self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd), self.branch_pool(pooled)], 1)


class TorchFIDInception(nn.Module):
  """pytorch-fid's fid_inception_v3() with the FID blocks, and its InceptionV3 wrapper's preprocessing."""

  def __init__(self):
    super().__init__()
    self.Conv2d_1a_3x3 = _Conv(3, 32, 3, stride=2)
    self.Conv2d_2a_3x3 = _Conv(32, 32, 3)
    self.Conv2d_2b_3x3 = _Conv(32, 64, 3, padding=1)
    self.Conv2d_3b_1x1 = _Conv(64, 80, 1)
    self.Conv2d_4a_3x3 = _Conv(80, 192, 3)
    self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = _A(192, 32), _A(256, 64), _A(288, 64)
    self.Mixed_6a = _B(288)
    self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e = _C(768, 128), _C(768, 160), _C(768, 160), _C(
        768, 192)
    self.Mixed_7a = _D(768)
    self.Mixed_7b, self.Mixed_7c = _E(1280, max_pool=False), _E(2048, max_pool=True)
    self.fc = nn.Linear(2048, 1008)

  def forward(self, images01):
    """images [B, 3, H, W] in [0, 1] -> pool features [B, 2048]."""
    x = F.interpolate(images01, size=(299, 299), mode="bilinear", align_corners=False)
    x = 2 * x - 1
    x = F.max_pool2d(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))), 3, stride=2)
    x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
    for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
      x = getattr(self, f"Mixed_{name}")(x)
    return F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)


def _randomized_reference(seed=0):
  """The reference with random weights that keep activations O(1) through all 94 conv layers."""
  torch.manual_seed(seed)
  model = TorchFIDInception().eval()
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, nn.Conv2d):
        fan_in = module.weight[0].numel()
        module.weight.normal_(0.0, (2.0 / fan_in) ** 0.5)
      elif isinstance(module, nn.BatchNorm2d):
        module.weight.uniform_(0.8, 1.2)
        module.bias.normal_(0.0, 0.1)
        module.running_mean.normal_(0.0, 0.1)
        module.running_var.uniform_(0.5, 1.5)
  return model


class InceptionTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp(prefix="perflow_inception_")
    cls.model = _randomized_reference()
    cls.state_dict = {k: v.numpy() for k, v in cls.model.state_dict().items()}
    cls.pth = os.path.join(cls.tmp, inception.WEIGHTS_FILE)
    torch.save(cls.model.state_dict(), cls.pth)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def test_key_set_matches_reference(self):
    reference = {k for k in self.state_dict if not k.endswith("num_batches_tracked")}
    self.assertEqual(inception.torch_state_dict_keys(), reference)
    self.assertLen(reference, 472)

  def test_features_match_pytorch(self):
    images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    net = features.load_feature_net(f"inception:{self.pth}")
    self.assertEqual((net.name, net.dim), ("inception", 2048))
    got = net.features(images, batch_size=2)
    with torch.no_grad():
      want = self.model(torch.from_numpy((images + 1) / 2).permute(0, 3, 1, 2)).double().numpy()
    self.assertEqual((got.shape, got.dtype), ((2, 2048), np.float64))
    scale = np.abs(want).max()
    self.assertGreater(scale, 1e-2)  # the random network did not collapse to zero
    self.assertGreater(np.std(want), 1e-3 * scale)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * scale)

  def test_other_formats_read_the_same(self):
    npz = os.path.join(self.tmp, "fid.npz")
    np.savez(npz, **self.state_dict)
    from_npz = inception.read_weights(npz)
    from_pth = inception.read_weights(self.pth)
    self.assertEqual(set(from_npz), set(from_pth))
    for k in from_pth:
      np.testing.assert_array_equal(from_npz[k], from_pth[k])
    # Without num_batches_tracked (older state dicts) the conversion is the same.
    lean = {k: v for k, v in self.state_dict.items() if not k.endswith("num_batches_tracked")}
    variables = inception.convert_state_dict(lean)
    np.testing.assert_array_equal(variables["params"]["Mixed_7c"]["branch_pool"]["conv"]["kernel"],
                                  np.transpose(self.state_dict["Mixed_7c.branch_pool.conv.weight"], (2, 3, 1, 0)))
    np.testing.assert_array_equal(variables["batch_stats"]["Conv2d_1a_3x3"]["bn"]["var"],
                                  self.state_dict["Conv2d_1a_3x3.bn.running_var"])

  def test_bad_weights_give_clear_errors(self):
    with self.assertRaisesRegex(features.FeatureNetError, "not exist.*pt_inception-2015-12-05"):
      features.load_feature_net(f"inception:{os.path.join(self.tmp, 'missing.pth')}")
    with self.assertRaisesRegex(features.FeatureNetError, "not exist.*pt_inception-2015-12-05"):
      inception.load_inception(os.path.join(self.tmp, "missing.pth"))
    partial = dict(self.state_dict)
    del partial["Mixed_6b.branch7x7_2.conv.weight"]
    partial["AuxLogits.fc.weight"] = np.zeros((1008, 768), np.float32)  # torchvision's ImageNet model has it
    with self.assertRaisesRegex(features.FeatureNetError,
                                r"1 keys missing.*Mixed_6b\.branch7x7_2.*1 unexpected.*AuxLogits"):
      inception.convert_state_dict(partial, source="x.pth")
    wrong = dict(self.state_dict)
    wrong["fc.weight"] = np.zeros((1000, 2048), np.float32)
    with self.assertRaisesRegex(features.FeatureNetError, r"fc\.weight has shape \(1000, 2048\)"):
      inception.convert_state_dict(wrong, source="x.pth")
    garbage = os.path.join(self.tmp, "garbage.pth")
    with open(garbage, "wb") as f:
      f.write(b"not a torch file")
    with self.assertRaisesRegex(features.FeatureNetError, "could not read Inception weights"):
      inception.load_inception(garbage)
    other = os.path.join(self.tmp, "weights.h5")
    open(other, "wb").close()
    with self.assertRaisesRegex(features.FeatureNetError, "unknown file type"):
      inception.load_inception(other)
    with self.assertRaisesRegex(features.FeatureNetError, "KIND:PATH"):
      features.load_feature_net(self.pth)


if __name__ == "__main__":
  absltest.main()
