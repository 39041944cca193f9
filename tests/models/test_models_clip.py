"""CLIP text encoder parity against transformers' CLIPTextModel / CLIPTextModelWithProjection (float32)."""

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
import jax
import numpy as np
import torch
import transformers

import models_testlib as tl
from perflow_jax.models import CLIPTextConfig, CLIPTextEncoder, abstract_params
from perflow_jax.weights import names

HIGHEST = jax.lax.Precision.HIGHEST
VOCAB, LENGTH = 99, 16


def _tiny(act, eos=2):
  return transformers.CLIPTextConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
      max_position_embeddings=LENGTH, hidden_act=act, projection_dim=24, eos_token_id=eos, bos_token_id=0,
      pad_token_id=1)


def _ids():
  # Row 0: short prompt padded with 0 ("!" padding, OpenCLIP style); row 1: padded with the max id (EOS style).
  return np.array([[49, 5, 7, 98] + [0] * 12, list(range(1, 11)) + [97] + [98] * 5], np.int64)


def _build(tc, with_projection, seed):
  torch.manual_seed(seed)
  cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
  ref = tl.perturb_(cls(tc), seed=seed + 1)
  module = CLIPTextEncoder(CLIPTextConfig.from_transformers_config(tc.to_dict()), precision=HIGHEST,
                           with_projection=with_projection)
  # Hub files and CLIPTextModelWithProjection prefix the tower with "text_model."; our tree is rooted at it.
  state = {k.removeprefix("text_model."): v for k, v in tl.state_dict_numpy(ref).items()}
  params = names.torch_to_flax(state, nn.meta.unbox(abstract_params(module)), what="tiny CLIP")
  return ref, module, params


class CLIPParityTest(parameterized.TestCase):

  @parameterized.named_parameters(("quick_gelu_clip_l_style", "quick_gelu", False),
                                  ("gelu_bigG_style_with_projection", "gelu", True))
  def test_outputs_match_transformers(self, act, with_projection):
    ref, module, params = _build(_tiny(act), with_projection, seed=0 if with_projection else 5)
    ids = _ids()
    want = ref(torch.from_numpy(ids), output_hidden_states=True)
    self.assertLen(want.hidden_states, 4)  # embeddings + 3 layers
    encode = jax.jit(lambda p, i, layer: module.apply({"params": p}, i, hidden_layer=layer, method=module.encode),
                     static_argnums=2)
    got = encode(params, ids, -2)
    checks = [("last_hidden_state", got["last_hidden_state"], want.last_hidden_state),
              ("penultimate (pre final LN)", got["hidden"], want.hidden_states[-2]),
              ("last layer (pre final LN)", encode(params, ids, -1)["hidden"], want.hidden_states[-1]),
              ("embeddings", encode(params, ids, 0)["hidden"], want.hidden_states[0])]
    if with_projection:
      checks.append(("text_embeds", got["text_embeds"], want.text_embeds))
    else:
      checks.append(("pooled", got["pooled"], want.pooler_output))
    for name, ours, theirs in checks:
      err, rel = tl.rel_err(ours, theirs.detach().numpy())
      print(f"CLIP {act} {name}: max abs err {err:.3g}, relative {rel:.3g}")
      self.assertEqual(ours.shape, tuple(theirs.shape))
      self.assertLess(rel, 1e-5, name)
    np.testing.assert_allclose(module.apply({"params": params}, ids), got["last_hidden_state"], atol=1e-5)

  def test_pooling_at_first_eos_when_eos_id_is_not_legacy(self):
    ref, module, params = _build(_tiny("quick_gelu", eos=50), False, seed=3)
    ids = np.array([[3, 50, 80, 50, 90] + [0] * 11, [7, 8, 50, 99 - 1] + [50] * 12], np.int64)
    want = ref(torch.from_numpy(ids)).pooler_output.detach().numpy()
    got = module.apply({"params": params}, ids, method=module.encode)["pooled"]
    self.assertLess(tl.rel_err(got, want)[1], 1e-5)

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, "hidden_act"):
      CLIPTextConfig(hidden_act="relu")
    with self.assertRaisesRegex(ValueError, "eos_token_id"):
      CLIPTextConfig.from_transformers_config({"eos_token_id": [2, 3]})
    module = CLIPTextEncoder(CLIPTextConfig(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                            num_attention_heads=2, max_position_embeddings=4))
    params = module.init(jax.random.key(0), *module.dummy_inputs())["params"]
    with self.assertRaisesRegex(ValueError, "hidden_layer"):
      module.apply({"params": params}, np.zeros((1, 4), np.int32), hidden_layer=-3, method=module.encode)
    with self.assertRaisesRegex(ValueError, "max_length"):
      module.apply({"params": params}, np.zeros((1, 5), np.int32))
    with self.assertRaisesRegex(ValueError, "projection_dim"):
      CLIPTextEncoder(module.config, with_projection=True).init(jax.random.key(0), *module.dummy_inputs())

  def test_config_from_full_clip_config_and_round_trip(self):
    full = transformers.CLIPConfig(text_config=_tiny("gelu").to_dict()).to_dict()
    cfg = CLIPTextConfig.from_transformers_config(full)
    self.assertEqual((cfg.hidden_size, cfg.hidden_act, cfg.projection_dim), (32, "gelu", 24))
    again = CLIPTextConfig.from_transformers_config(
        transformers.CLIPTextConfig(**cfg.to_transformers_config()).to_dict())
    self.assertEqual(again, cfg)


if __name__ == "__main__":
  absltest.main()
