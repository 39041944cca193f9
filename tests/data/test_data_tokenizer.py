"""The tiny CLIP tokenizer folder: a real CLIPTokenizer, one token per procedural word, SD1.5 conventions."""

import json
import os
import tempfile

from absl.testing import absltest
import numpy as np
import transformers

from perflow_jax.data import procedural
from perflow_jax.data import tokenizer as tokenizer_lib


class TinyTokenizerTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.TemporaryDirectory()
    cls.path = tokenizer_lib.write_tiny_clip_tokenizer(os.path.join(cls.tmp.name, "tok"))
    cls.tok = tokenizer_lib.load_tokenizer(cls.path)

  @classmethod
  def tearDownClass(cls):
    cls.tmp.cleanup()
    super().tearDownClass()

  def test_layout_and_special_tokens(self):
    self.assertIsInstance(self.tok, transformers.CLIPTokenizer)
    with open(os.path.join(self.path, "vocab.json"), encoding="utf-8") as f:
      vocab = json.load(f)
    n = len(vocab)
    self.assertEqual(len(self.tok), n)
    # Like CLIP: 256 byte characters, the same with </w>, merges, then BOS and EOS as the last two ids.
    self.assertEqual(vocab["!"], 0)
    self.assertEqual(vocab["!</w>"], 256)
    self.assertEqual(self.tok.bos_token_id, n - 2)
    self.assertEqual(self.tok.eos_token_id, n - 1)
    self.assertEqual(self.tok.pad_token_id, n - 1)  # SD1.5 pads with EOS
    with open(os.path.join(self.path, "merges.txt"), encoding="utf-8") as f:
      merges = f.read().splitlines()[1:]
    self.assertEqual(n, 512 + len(merges) + 2)  # every merge adds exactly one token here

  def test_each_vocabulary_word_is_one_token(self):
    for word in procedural.VOCABULARY:
      ids = self.tok(word).input_ids
      self.assertLen(ids, 3, word)
      self.assertEqual(self.tok.convert_ids_to_tokens(ids[1]), word + "</w>")

  def test_tokenize_matches_clip_tokenizer(self):
    texts = [procedural.example(0, i, 8)["text"] for i in range(4)]
    texts += ["A Red, unknown-word circle!", "a " * 100]  # byte fallback; truncation at 77
    ids = tokenizer_lib.tokenize(self.tok, texts)
    self.assertEqual(ids.shape, (6, 77))
    self.assertEqual(ids.dtype, np.int32)
    fresh = transformers.CLIPTokenizer.from_pretrained(self.path, local_files_only=True)
    for row, text in zip(ids, texts):
      want = fresh(text, padding="max_length", max_length=77, truncation=True).input_ids
      np.testing.assert_array_equal(row, want)
    bos, eos = self.tok.bos_token_id, self.tok.eos_token_id
    caption_ids = ids[0]
    # BOS, 12 word tokens, EOS, then EOS padding.
    self.assertEqual(caption_ids[0], bos)
    self.assertEqual(caption_ids[13], eos)
    self.assertTrue(np.all(caption_ids[14:] == eos))
    self.assertEqual(ids[5][0], bos)
    self.assertEqual(ids[5][76], eos)
    self.assertTrue(np.all(ids[5][1:76] == self.tok.convert_tokens_to_ids("a</w>")))

  def test_diffusers_folder_and_missing_folder(self):
    root = os.path.join(self.tmp.name, "pipe")
    tokenizer_lib.write_tiny_clip_tokenizer(os.path.join(root, "tokenizer"), words=["cat"])
    tok = tokenizer_lib.load_tokenizer(root)
    self.assertEqual(len(tok), 512 + 2 + 2)  # "cat": merges c+a, ca+t</w>
    with self.assertRaisesRegex(ValueError, "write_tiny_clip_tokenizer"):
      tokenizer_lib.load_tokenizer(os.path.join(self.tmp.name, "nowhere"))


if __name__ == "__main__":
  absltest.main()
