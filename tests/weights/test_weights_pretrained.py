"""load_pretrained on tiny perturbed SD1 / SD2 / SDXL models: diffusers folder == single file (bit-identical),
float32 parity with the PyTorch models, export round trips, shardings, and the errors a user can cause."""

import functools
import os
import shutil

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np
import torch

from perflow_jax.parallel import mesh as mesh_lib
from perflow_jax.parallel import sharding as sharding_lib
from perflow_jax.weights import export
from perflow_jax.weights import io
from perflow_jax.weights import names
from perflow_jax.weights import pretrained
import weights_testutil as wt

HIGHEST = jax.lax.Precision.HIGHEST
_TMP = None


def _tmp() -> str:
  return _TMP


def setUpModule():
  global _TMP
  import tempfile  # pylint: disable=g-import-not-at-top
  _TMP = tempfile.mkdtemp()


def tearDownModule():
  shutil.rmtree(_TMP, ignore_errors=True)


def _flat(tree):
  return names.flatten(jax.device_get(tree))


def _rel_err(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / np.abs(want).max())


class _Family:
  """One family's tiny models, written as a folder and a single file, loaded both ways."""

  def __init__(self, family: str, seed: int):
    self.family = family
    self.configs = wt.tiny_configs(family)
    self.torch = wt.build_torch_models(self.configs, seed)
    root = os.path.join(_tmp(), family)
    self.folder = wt.write_diffusers_folder(os.path.join(root, "diffusers"), family, self.configs, self.torch)
    self.file = wt.write_ldm_file(os.path.join(root, "model.safetensors"), family, self.torch)
    pred = "v_prediction" if family == "sd2" else None
    self.from_folder = pretrained.load_pretrained(self.folder, precision=HIGHEST)
    self.from_file = pretrained.load_pretrained(self.file, prediction_type=pred, config_path=self.folder,
                                                precision=HIGHEST)


_FAMILIES = {}


def _family(name: str) -> _Family:
  if name not in _FAMILIES:
    _FAMILIES[name] = _Family(name, seed=len(_FAMILIES))
  return _FAMILIES[name]


class FolderAndSingleFileTest(absltest.TestCase):

  def test_bit_identical_trees(self):
    for family in ("sd1", "sd2", "sdxl"):
      f = _family(family)
      a, b = f.from_folder.params(), f.from_file.params()
      self.assertEqual(set(a), set(b))
      for comp in a:
        fa, fb = _flat(a[comp]), _flat(b[comp])
        self.assertEqual(set(fa), set(fb), f"{family} {comp}")
        for path, leaf in fa.items():
          self.assertEqual(leaf.dtype, np.float32)
          np.testing.assert_array_equal(leaf, fb[path], err_msg=f"{family} {comp} {path}")

  def test_configs_and_tokenizers(self):
    sd1, sd2, sdxl = _family("sd1"), _family("sd2"), _family("sdxl")
    self.assertEqual([f.from_folder.config["family"] for f in (sd1, sd2, sdxl)], ["sd1", "sd2", "sdxl"])
    self.assertEqual(sd1.from_file.config["prediction_type"], "epsilon")
    self.assertEqual(sd2.from_folder.config["prediction_type"], "v_prediction")  # from scheduler_config.json
    self.assertEqual(sd2.from_file.config["format"], "single_file")
    self.assertEqual(sd1.from_folder.config["vae"]["scaling_factor"], 0.18215)
    self.assertEqual(sdxl.from_folder.config["vae"]["scaling_factor"], 0.13025)
    # "a" -> "a</w>" (27), "cat" -> merged "cat</w>" (56); SD1 pads with EOS, the OpenCLIP tokenizers with "!" (26).
    for tok, pad in ((sd1.from_folder.tokenizer, wt.EOS), (sd2.from_file.tokenizer, 26),
                     (sdxl.from_folder.tokenizer_2, 26), (sdxl.from_file.tokenizer, wt.EOS)):
      self.assertEqual(tok.model_max_length, 77)
      ids = tok(["a cat"], padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids[0]
      self.assertEqual(ids, [wt.BOS, 27, 56, wt.EOS] + [pad] * 73)

  def test_prediction_type_override(self):
    f = _family("sd1")
    bundle = pretrained.load_pretrained(f.folder, prediction_type="v_prediction")
    self.assertEqual(bundle.config["prediction_type"], "v_prediction")
    self.assertEqual(bundle.config["scheduler"]["prediction_type"], "v_prediction")

  def test_bfloat16_params(self):
    f = _family("sd1")
    bundle = pretrained.load_pretrained(f.folder, dtype=jnp.bfloat16)
    want = _flat(f.from_folder.text_params)
    for path, leaf in _flat(bundle.text_params).items():
      self.assertEqual(leaf.dtype, jnp.bfloat16)
      np.testing.assert_array_equal(leaf, want[path].astype(jnp.bfloat16))
    self.assertEqual(bundle.unet.dtype, jnp.bfloat16)


class ParityTest(absltest.TestCase):
  """Loaded Flax models vs the PyTorch models they came from: full outputs, float32, HIGHEST precision."""

  def assertClose(self, got, want, what):
    err = _rel_err(got, want)
    self.assertLessEqual(err, 1e-4, f"{what}: max abs error / max abs reference = {err:.2e}")

  def _unet(self, f: _Family, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    cfg = f.configs["unet"]
    x = rng.standard_normal((batch, 8, 8, 4)).astype(np.float32)
    t = np.array([999.0, 250.5][:batch], np.float32)  # fractional timesteps, as the student sees them
    ctx = rng.standard_normal((batch, 77, cfg["cross_attention_dim"])).astype(np.float32)
    args, kwargs = [x, t, ctx], {}
    if cfg.get("addition_embed_type") == "text_time":
      cond = {"text_embeds": rng.standard_normal((batch, 16)).astype(np.float32),
              "time_ids": np.tile(np.array([[64, 64, 0, 0, 64, 64]], np.float32), (batch, 1))}
      args.append(cond)
      kwargs["added_cond_kwargs"] = {k: torch.from_numpy(v) for k, v in cond.items()}
    got = jax.jit(f.from_file.unet.apply)({"params": f.from_file.unet_params}, *args)
    with torch.no_grad():
      want = f.torch["unet"](torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), torch.from_numpy(ctx),
                             **kwargs).sample.permute(0, 2, 3, 1).numpy()
    self.assertClose(got, want, f"{f.family} UNet")

  def _ids(self, tok):
    return np.asarray(tok(["a cat", "dog ab ca"], padding="max_length", max_length=77, truncation=True).input_ids)

  def test_sd1(self):
    f = _family("sd1")
    self._unet(f)
    images = np.random.default_rng(1).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
    vae = lambda method: jax.jit(functools.partial(f.from_file.vae.apply, method=method))  # pylint: disable=unnecessary-lambda-assignment
    mean, logvar = vae("encode")({"params": f.from_file.vae_params}, images)
    decoded = vae("decode")({"params": f.from_file.vae_params}, mean)
    with torch.no_grad():
      dist = f.torch["vae"].encode(torch.from_numpy(images).permute(0, 3, 1, 2)).latent_dist
      want_dec = f.torch["vae"].decode(dist.mean).sample.permute(0, 2, 3, 1).numpy()
    self.assertClose(mean, dist.mean.permute(0, 2, 3, 1).numpy(), "VAE mean")
    self.assertClose(logvar, dist.logvar.permute(0, 2, 3, 1).numpy(), "VAE logvar")
    self.assertClose(decoded, want_dec, "VAE decode")
    ids = self._ids(f.from_file.tokenizer)
    got = jax.jit(f.from_file.text_encoder.apply)({"params": f.from_file.text_params}, ids)
    with torch.no_grad():
      want = f.torch["text_encoder"](torch.from_numpy(ids)).last_hidden_state.numpy()
    self.assertClose(got, want, "CLIP last_hidden_state")

  def test_sd2(self):
    f = _family("sd2")
    self._unet(f, batch=1)
    ids = self._ids(f.from_file.tokenizer)
    got = jax.jit(f.from_file.text_encoder.apply)({"params": f.from_file.text_params}, ids)
    with torch.no_grad():
      want = f.torch["text_encoder"](torch.from_numpy(ids)).last_hidden_state.numpy()
    self.assertClose(got, want, "OpenCLIP (fused in_proj split) last_hidden_state")

  def test_sdxl(self):
    f = _family("sdxl")
    self._unet(f, batch=1)
    ids = self._ids(f.from_file.tokenizer_2)
    encode = functools.partial(f.from_file.text_encoder_2.apply, hidden_layer=-2, method="encode")
    got = jax.jit(encode)({"params": f.from_file.text_params_2}, ids)
    with torch.no_grad():
      want = f.torch["text_encoder_2"](torch.from_numpy(ids), output_hidden_states=True)
    self.assertClose(got["hidden"], want.hidden_states[-2].numpy(), "bigG penultimate hidden state")
    self.assertClose(got["text_embeds"], want.text_embeds.numpy(), "bigG pooled projection")


class ExportTest(absltest.TestCase):

  def _fresh_torch(self, f: _Family, comp: str) -> torch.nn.Module:
    return wt.build_torch_models({c: f.configs[c] for c in ("unet", "vae", comp)}, seed=99)[comp]

  def test_state_dicts_load_strictly_and_round_trip(self):
    cases = [("sd1", "unet"), ("sd1", "vae"), ("sd1", "text_encoder"), ("sd2", "unet"), ("sd2", "text_encoder"),
             ("sdxl", "unet"), ("sdxl", "text_encoder_2")]
    for family, comp in cases:
      f = _family(family)
      params = f.from_folder.params()[comp]
      state_dict = export.export_state_dict(comp, params)
      model = self._fresh_torch(f, comp)
      result = model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, strict=True)
      self.assertEqual((result.missing_keys, result.unexpected_keys), ([], []))
      original = f.torch[comp].state_dict()
      for k, v in model.state_dict().items():
        self.assertTrue(torch.equal(v, original[k]), f"{family} {comp} {k}")
      module = f.from_folder.modules()[comp]
      back = export.params_from_state_dict(comp, module, wt.state_dicts({comp: model})[comp])
      want = _flat(params)
      got = names.flatten(back)
      self.assertEqual(set(got), set(want))
      for path, leaf in want.items():
        np.testing.assert_array_equal(got[path], leaf, err_msg=f"{family} {comp} {path}")

  def test_single_file_export_reloads_identically(self):
    for family in ("sd2", "sdxl"):
      f = _family(family)
      path = os.path.join(_tmp(), f"{family}_export.safetensors")
      export.write_single_file(path, f.from_folder.params(), family)
      reloaded = pretrained.load_pretrained(path, prediction_type="v_prediction" if family == "sd2" else None,
                                            config_path=f.folder)
      for comp, tree in f.from_folder.params().items():
        want, got = _flat(tree), _flat(reloaded.params()[comp])
        self.assertEqual(set(got), set(want))
        for path_, leaf in want.items():
          np.testing.assert_array_equal(got[path_], leaf, err_msg=f"{family} {comp} {path_}")
    fp16 = os.path.join(_tmp(), "unet_fp16.safetensors")
    export.write_single_file(fp16, {"unet": _family("sd1").from_folder.unet_params}, "sd1", dtype=np.float16)
    stored = io.read_safetensors(fp16)
    self.assertTrue(all(v.dtype == np.float16 and k.startswith("model.diffusion_model.") for k, v in stored.items()))


class ShardingTest(absltest.TestCase):

  def test_leaves_land_in_their_shardings(self):
    f = _family("sd1")
    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": -1})
    bundle = pretrained.load_pretrained(
        f.folder, shardings=lambda boxed: sharding_lib.logical_to_shardings(boxed, mesh))
    kernel = bundle.unet_params["conv_in"]["kernel"]  # (3, 3, 4, 32): conv_out over the 8-way 'fsdp' axis
    self.assertEqual(kernel.sharding.spec, jax.sharding.PartitionSpec(None, None, None, "fsdp"))
    self.assertEqual({s.data.shape for s in kernel.addressable_shards}, {(3, 3, 4, 4)})
    for comp, tree in bundle.params().items():
      want = _flat(f.from_folder.params()[comp])
      for path, leaf in names.flatten(tree).items():
        self.assertIsInstance(leaf.sharding, jax.sharding.NamedSharding)
        np.testing.assert_array_equal(np.asarray(leaf), want[path])


class ErrorTest(absltest.TestCase):

  def _copy(self, family: str) -> str:
    dst = os.path.join(wt.tmpdir(self), "copy")
    shutil.copytree(_family(family).folder, dst)
    return dst

  def test_missing_component(self):
    folder = self._copy("sd1")
    shutil.rmtree(os.path.join(folder, "vae"))
    with self.assertRaisesRegex(ValueError, "missing the vae component"):
      pretrained.load_pretrained(folder)

  def test_missing_tokenizer(self):
    folder = self._copy("sd1")
    shutil.rmtree(os.path.join(folder, "tokenizer"))
    with self.assertRaisesRegex(ValueError, "no tokenizer/ folder"):
      pretrained.load_pretrained(folder)
    with self.assertRaisesRegex(ValueError, "tokenizer_path="):
      pretrained.load_pretrained(_family("sd1").file)

  def test_truncated_weights_name_the_file(self):
    folder = self._copy("sd1")
    path = os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")
    data = open(path, "rb").read()
    with open(path, "wb") as fh:
      fh.write(data[:len(data) // 2])
    with self.assertRaisesRegex(io.WeightFileError, "unet/diffusion_pytorch_model.safetensors is not a valid"):
      pretrained.load_pretrained(folder)

  def test_pickle_needs_opt_in(self):
    folder = self._copy("sd1")
    f = _family("sd1")
    os.remove(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))
    torch.save(f.torch["unet"].state_dict(), os.path.join(folder, "unet", "diffusion_pytorch_model.bin"))
    with self.assertRaisesRegex(io.WeightFileError, "allow_pickle=True"):
      pretrained.load_pretrained(folder)
    bundle = pretrained.load_pretrained(folder, allow_pickle=True)
    want = _flat(f.from_folder.unet_params)
    for path, leaf in _flat(bundle.unet_params).items():
      np.testing.assert_array_equal(leaf, want[path])

  def test_wrong_architecture_lists_keys(self):
    folder = self._copy("sd1")
    shutil.copy(os.path.join(_family("sdxl").folder, "unet", "diffusion_pytorch_model.safetensors"),
                os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))
    with self.assertRaisesRegex(names.ConversionError, r"(?s)SD1 unet checkpoint does not match.*"
                                r"unexpected \(\d+\): add_embedding\.linear_1\.bias"):
      pretrained.load_pretrained(folder)

  def test_single_file_family_mismatch(self):
    with self.assertRaisesRegex(names.ConversionError, "architecture mismatch: .* SD2 checkpoint .* SD1 model"):
      pretrained.load_pretrained(_family("sd2").file, prediction_type="v_prediction",
                                 config_path=_family("sd1").folder)

  def test_sd2_single_file_needs_prediction_type(self):
    # With config_path the folder's scheduler config says it; with the published configs nothing does.
    with self.assertRaisesRegex(ValueError, "SD2 single-file .*prediction_type='v_prediction'"):
      pretrained.load_pretrained(_family("sd2").file, tokenizer_path=_family("sd2").folder)
    with self.assertRaisesRegex(ValueError, "prediction_type must be one of"):
      pretrained.load_pretrained(_family("sd2").file, prediction_type="v", config_path=_family("sd2").folder)

  def test_not_a_model(self):
    with self.assertRaisesRegex(ValueError, "does not exist"):
      pretrained.load_pretrained(os.path.join(_tmp(), "nothing"))
    with self.assertRaisesRegex(ValueError, "neither a diffusers folder"):
      pretrained.load_pretrained(wt.tmpdir(self))


if __name__ == "__main__":
  absltest.main()
