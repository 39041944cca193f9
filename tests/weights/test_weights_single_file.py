"""Single-file (LDM/SGM) <-> diffusers renames: tiny models bit-exact, diffusers' own converters as reference,
and the full-size SD1.5 / SD2.1 / SDXL key sets built on the meta device."""

from absl.testing import absltest
import numpy as np
import torch

from perflow_jax.weights import defaults
from perflow_jax.weights import names
from perflow_jax.weights import pretrained
from perflow_jax.weights import single_file as sf
from perflow_jax.weights.names import ConversionError
import weights_testutil as wt

# Section 1 of sd_models.md: state-dict keys per component.
_COUNTS = {
    "sd1": {"unet": 686, "vae": 248, "text_encoder": 196},
    "sd2": {"unet": 686, "vae": 248, "text_encoder": 372},
    "sdxl": {"unet": 1680, "vae": 248, "text_encoder": 196, "text_encoder_2": 517},
}


def _normalized(components):
  """Text towers without the optional `text_model.` prefix, as the forward rename returns them."""
  return {c: (sf.clip_ldm_to_diffusers(sd) if c.startswith("text") else sd) for c, sd in components.items()}


def _shape_only(model: torch.nn.Module) -> dict[str, np.ndarray]:
  # Zero-stride views: full-size shapes without allocating the tensors.
  return {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in model.state_dict().items()}


def _meta_components(family: str) -> dict[str, dict[str, np.ndarray]]:
  from diffusers import AutoencoderKL, UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # pylint: disable=g-import-not-at-top
  cfg = defaults.family_configs(family)
  out = {}
  with torch.device("meta"):
    out["unet"] = _shape_only(UNet2DConditionModel.from_config(cfg["unet"]))
    out["vae"] = _shape_only(AutoencoderKL.from_config(cfg["vae"]))
    for comp in ("text_encoder", "text_encoder_2"):
      if comp in cfg:
        text = {k: v for k, v in cfg[comp].items() if k != "architectures"}
        cls = CLIPTextModelWithProjection if comp == "text_encoder_2" else CLIPTextModel
        out[comp] = _shape_only(cls(CLIPTextConfig(**text)))
  return out


class FullSizeStructureTest(absltest.TestCase):
  """The published architectures: LDM names -> diffusers names give back exactly the diffusers key sets/shapes."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.components = {f: _meta_components(f) for f in sf.FAMILIES}

  def test_counts_match_the_reference(self):
    for family, comps in self.components.items():
      self.assertEqual({c: len(sd) for c, sd in comps.items()}, _COUNTS[family], family)

  def test_round_trip_key_sets_and_shapes(self):
    for family, comps in self.components.items():
      ldm = sf.diffusers_to_ldm(comps, family)
      if family == "sd2":
        # A real SD2 file has 24 OpenCLIP blocks (24 x 12 + 5 = 293 keys); diffusers keeps 23 and no projection.
        tower = sf.OPENCLIP_PREFIX["sd2"]
        for k in [k for k in ldm if ".resblocks.22." in k]:
          ldm[k.replace(".resblocks.22.", ".resblocks.23.")] = ldm[k]
        ldm[tower + "text_projection"] = np.broadcast_to(np.float32(0), (1024, 1024))
        self.assertLen([k for k in ldm if k.startswith(tower)], 293)
      if family == "sdxl":
        self.assertLen([k for k in ldm if k.startswith(sf.OPENCLIP_PREFIX["sdxl"])], 389)
      self.assertLen([k for k in ldm if k.startswith(sf.UNET_PREFIX)], _COUNTS[family]["unet"])
      got_family, back = sf.ldm_to_diffusers(ldm)
      self.assertEqual(got_family, family)
      want = _normalized(comps)
      self.assertEqual(set(back), set(want), family)
      for comp in want:
        self.assertEqual({k: v.shape for k, v in back[comp].items()}, {k: v.shape for k, v in want[comp].items()},
                         f"{family} {comp}")
        # ... and land exactly on our Flax modules' trees (torch_to_flax raises on any missing/extra/mis-shaped).
        module = pretrained.build_module(comp, defaults.family_configs(family)[comp])
        tree, _ = pretrained.state_dict_to_params(comp, module, back[comp])
        self.assertLen(names.flatten(tree), _COUNTS[family][comp], f"{family} {comp}")

  def test_reference_examples(self):
    """The worked examples of sd_models.md section 6."""
    sd1 = sf.diffusers_to_ldm(self.components["sd1"], "sd1")
    unet = {k[len(sf.UNET_PREFIX):]: v for k, v in sd1.items() if k.startswith(sf.UNET_PREFIX)}
    back = sf.unet_ldm_to_diffusers(unet)
    examples = {
        "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight":
            "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight",
        "input_blocks.9.0.op.weight": "down_blocks.2.downsamplers.0.conv.weight",
        "middle_block.1.proj_in.weight": "mid_block.attentions.0.proj_in.weight",
        "output_blocks.2.1.conv.weight": "up_blocks.0.upsamplers.0.conv.weight",
        "output_blocks.5.2.conv.weight": "up_blocks.1.upsamplers.0.conv.weight",
        "output_blocks.11.0.skip_connection.weight": "up_blocks.3.resnets.2.conv_shortcut.weight",
        "time_embed.0.weight": "time_embedding.linear_1.weight",
        "out.2.bias": "conv_out.bias",
    }
    for ldm_name, diffusers_name in examples.items():
      self.assertIn(ldm_name, unet)
      self.assertEqual(back[diffusers_name].shape, unet[ldm_name].shape)
    xl = sf.diffusers_to_ldm({"unet": self.components["sdxl"]["unet"]}, "sdxl")
    for name in ("label_emb.0.0.weight", "input_blocks.3.0.op.weight", "output_blocks.2.2.conv.weight"):
      self.assertIn(sf.UNET_PREFIX + name, xl)
    vae = sf.diffusers_to_ldm({"vae": self.components["sd1"]["vae"]}, "sd1")
    self.assertEqual(vae["first_stage_model.decoder.up.0.block.0.nin_shortcut.weight"].shape, (128, 256, 1, 1))
    self.assertEqual(vae["first_stage_model.encoder.mid.attn_1.q.weight"].shape, (512, 512, 1, 1))

  def test_detection(self):
    sd2_unet_only = sf.diffusers_to_ldm({"unet": self.components["sd2"]["unet"]}, "sd2")
    self.assertEqual(sf.detect_family(sd2_unet_only), "sd2")  # attn2.to_k of width 1024
    sd1_unet_only = sf.diffusers_to_ldm({"unet": self.components["sd1"]["unet"]}, "sd1")
    self.assertEqual(sf.detect_family(sd1_unet_only), "sd1")
    refiner = {"conditioner.embedders.0.model.positional_embedding": np.zeros((77, 1280), np.float32)}
    with self.assertRaisesRegex(ConversionError, "refiner"):
      sf.detect_family(refiner)


class TinyRenameTest(absltest.TestCase):
  """Tiny perturbed models: diffusers -> LDM -> diffusers is bit-exact, and diffusers' converters agree."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.models = {f: wt.build_torch_models(wt.tiny_configs(f), seed=i) for i, f in enumerate(sf.FAMILIES)}

  def test_round_trip_bit_exact(self):
    for family, models in self.models.items():
      ldm = wt.ldm_state_dict(family, models)
      got_family, back = sf.ldm_to_diffusers(ldm)
      self.assertEqual(got_family, family)
      want = _normalized(wt.state_dicts(models))
      self.assertEqual(set(back), set(want))
      for comp, sd in want.items():
        self.assertEqual(set(back[comp]), set(sd), f"{family} {comp}")
        for k, v in sd.items():
          self.assertEqual(back[comp][k].dtype, v.dtype)
          np.testing.assert_array_equal(back[comp][k], v, err_msg=f"{family} {comp} {k}")

  def test_agrees_with_diffusers_converters(self):
    from diffusers.loaders import single_file_utils as dsf  # pylint: disable=g-import-not-at-top
    for family, models in self.models.items():
      ldm = {k: torch.from_numpy(np.array(v)) for k, v in wt.ldm_state_dict(family, models).items()}
      _, ours = sf.ldm_to_diffusers({k: v.numpy() for k, v in ldm.items()})
      theirs = {"unet": dsf.convert_ldm_unet_checkpoint(ldm, dict(models["unet"].config)),
                "vae": dsf.convert_ldm_vae_checkpoint(ldm, dict(models["vae"].config))}
      openclip = "text_encoder" if family == "sd2" else "text_encoder_2" if family == "sdxl" else None
      if openclip:
        theirs[openclip] = sf.clip_ldm_to_diffusers(dsf.convert_open_clip_checkpoint(
            models[openclip], ldm, prefix=sf.OPENCLIP_PREFIX[family]))
      for comp, sd in theirs.items():
        # diffusers keeps every OpenCLIP block of a tiny SD2 model (it drops block 23 by name only).
        sd = {k: v for k, v in sd.items() if k in ours[comp] or comp != "text_encoder"}
        self.assertEqual(set(sd), set(ours[comp]), f"{family} {comp}")
        for k, v in sd.items():
          np.testing.assert_array_equal(ours[comp][k], v.reshape(ours[comp][k].shape).numpy(),
                                        err_msg=f"{family} {comp} {k}")

  def test_openclip_split_order(self):
    width = 4
    fused = np.arange(3 * width * width, dtype=np.float32).reshape(3 * width, width)
    out = sf.openclip_to_diffusers({"transformer.resblocks.0.attn.in_proj_weight": fused,
                                    "transformer.resblocks.0.attn.in_proj_bias": np.arange(3 * width, dtype=np.float32)})
    np.testing.assert_array_equal(out["encoder.layers.0.self_attn.q_proj.weight"], fused[:width])
    np.testing.assert_array_equal(out["encoder.layers.0.self_attn.k_proj.weight"], fused[width:2 * width])
    np.testing.assert_array_equal(out["encoder.layers.0.self_attn.v_proj.weight"], fused[2 * width:])
    np.testing.assert_array_equal(out["encoder.layers.0.self_attn.v_proj.bias"], [8, 9, 10, 11])
    proj = np.arange(6, dtype=np.float32).reshape(2, 3)
    kept = sf.openclip_to_diffusers({"text_projection": proj}, keep_projection=True)
    np.testing.assert_array_equal(kept["text_projection.weight"], proj.T)
    self.assertEqual(sf.openclip_to_diffusers({"text_projection": proj}), {})

  def test_ema_extraction(self):
    models = self.models["sd1"]
    ldm = wt.ldm_state_dict("sd1", models)
    with self.assertRaisesRegex(ConversionError, "no EMA copy"):
      sf.ldm_to_diffusers(ldm, extract_ema=True)
    ema = {}
    for k, v in ldm.items():
      if k.startswith(sf.UNET_PREFIX):
        ema["model_ema." + k[len("model."):].replace(".", "")] = v + 1.0
    self.assertIn("model_ema.diffusion_modelinput_blocks00weight", ema)
    ldm.update(ema, **{"model_ema.decay": np.float32(0.9999), "model_ema.num_updates": np.int32(5)})
    _, plain = sf.ldm_to_diffusers(ldm)
    _, with_ema = sf.ldm_to_diffusers(ldm, extract_ema=True)
    self.assertEqual(set(with_ema["unet"]), set(plain["unet"]))
    for k, v in plain["unet"].items():
      np.testing.assert_array_equal(with_ema["unet"][k], v + 1.0)
    np.testing.assert_array_equal(with_ema["vae"]["encoder.conv_in.weight"], plain["vae"]["encoder.conv_in.weight"])

  def test_old_vae_attention_names(self):
    sd = wt.state_dicts({"vae": self.models["sd1"]["vae"]})["vae"]
    old = {}
    for k, v in sd.items():
      for new, legacy in (("to_q.", "query."), ("to_k.", "key."), ("to_v.", "value."), ("to_out.0.", "proj_attn.")):
        k = k.replace(".attentions.0." + new, ".attentions.0." + legacy)
      old[k] = v
    self.assertIn("decoder.mid_block.attentions.0.proj_attn.weight", old)
    renamed = sf.rename_old_vae_attention(old)
    self.assertEqual(set(renamed), set(sd))
    for k, v in sd.items():
      np.testing.assert_array_equal(renamed[k], v)

  def test_unknown_keys_are_listed(self):
    ldm = wt.ldm_state_dict("sd1", self.models["sd1"])
    ldm["model.diffusion_model.input_blocks.1.7.mystery.weight"] = np.zeros(3, np.float32)
    ldm["first_stage_model.encoder.extra.weight"] = np.zeros(3, np.float32)
    with self.assertRaisesRegex(ConversionError, r"LDM UNet: 1 keys .*input_blocks\.1\.7\.mystery\.weight"):
      sf.ldm_to_diffusers(ldm)


if __name__ == "__main__":
  absltest.main()
