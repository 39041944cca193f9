"""CLIP tokenizers: load one from a folder, or write a tiny but real one for tests, the tiny config and the demo.

The real SD tokenizers (49408 tokens) cannot be downloaded here, so ``write_tiny_clip_tokenizer`` writes a folder
in exactly their format (``vocab.json`` + ``merges.txt`` + ``tokenizer_config.json`` +
``special_tokens_map.json``) that ``transformers.CLIPTokenizer.from_pretrained`` reads. Its vocabulary has the
same layout as CLIP's, only smaller:

  ids 0..255     the 256 byte-level characters (GPT-2's byte -> unicode map, printable ones first: "!" is 0)
  ids 256..511   the same characters with the end-of-word suffix ``</w>``
  ids 512..      one token per merge, in merge order; merges are built so that every word of ``words``
                 (by default the procedural vocabulary) becomes a single token
  last two ids   ``<|startoftext|>`` (BOS, CLIP's 49406) and ``<|endoftext|>`` (EOS, CLIP's 49407)

Padding uses EOS, as the SD1.5 tokenizer does, or "!" (id 0, ``pad_token="!"``) as SD2's tokenizer and SDXL's
tokenizer_2 do. Any text still tokenizes (byte fallback), so prompts outside the
vocabulary work, just with more tokens.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

import numpy as np

from perflow_jax.data import procedural

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
MAX_LENGTH = 77


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2/CLIP's reversible byte -> printable unicode character map (256 entries)."""
  # Printable latin-1 bytes map to themselves; the rest are shifted above 255 so no byte maps to whitespace or
  # a control character.
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
               + list(range(ord("\xae"), ord("\xff") + 1)))
  mapping = {b: chr(b) for b in printable}
  shift = 0
  for b in range(256):
    if b not in mapping:
      mapping[b] = chr(256 + shift)
      shift += 1
  return mapping


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
  """Byte-pair encoding of one word: repeatedly merge the lowest-ranked adjacent pair."""
  symbols = list(symbols)
  while len(symbols) > 1:
    pairs = [(ranks.get((a, b), None), i) for i, (a, b) in enumerate(zip(symbols[:-1], symbols[1:]))]
    pairs = [(r, i) for r, i in pairs if r is not None]
    if not pairs:
      break
    best = min(pairs)[0]
    merged: list[str] = []
    i = 0
    while i < len(symbols):
      if i + 1 < len(symbols) and ranks.get((symbols[i], symbols[i + 1])) == best:
        merged.append(symbols[i] + symbols[i + 1])
        i += 2
      else:
        merged.append(symbols[i])
        i += 1
    symbols = merged
  return symbols


def _word_symbols(word: str, byte_map: dict[int, str]) -> list[str]:
  chars = [byte_map[b] for b in word.encode("utf-8")]
  chars[-1] += END_OF_WORD
  return chars


def build_vocab_and_merges(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """CLIP-layout vocabulary and merge list under which each of ``words`` is a single token.

  Words are lower-cased (CLIP's normaliser lower-cases text). A word is merged left to right after the merges
  of earlier words have run; new merges rank after all earlier ones, so they never change an earlier word.
  """
  byte_map = bytes_to_unicode()
  base = list(byte_map.values())  # insertion order = CLIP's: printable bytes first, so "!" is id 0
  vocab_list = base + [c + END_OF_WORD for c in base]
  merges: list[tuple[str, str]] = []
  ranks: dict[tuple[str, str], int] = {}
  known = set(vocab_list)
  for word in sorted({w.lower() for w in words}):
    if not word or any(c.isspace() for c in word):
      raise ValueError(f"tokenizer words must be non-empty and contain no whitespace, got {word!r}")
    symbols = _apply_merges(_word_symbols(word, byte_map), ranks)
    current = symbols[0]
    for nxt in symbols[1:]:
      merges.append((current, nxt))
      ranks[(current, nxt)] = len(merges) - 1
      current = current + nxt
      if current not in known:
        known.add(current)
        vocab_list.append(current)
    if _apply_merges(_word_symbols(word, byte_map), ranks) != [word_token(word, byte_map)]:
      raise ValueError(f"could not build a single-token merge chain for word {word!r}")
  vocab_list += [BOS_TOKEN, EOS_TOKEN]
  return {tok: i for i, tok in enumerate(vocab_list)}, merges


def word_token(word: str, byte_map: dict[int, str] | None = None) -> str:
  """The vocabulary entry of a whole word: its byte characters followed by '</w>'."""
  byte_map = byte_map or bytes_to_unicode()
  return "".join(byte_map[b] for b in word.lower().encode("utf-8")) + END_OF_WORD


def write_tiny_clip_tokenizer(path: str, words: Sequence[str] = procedural.VOCABULARY,
                              pad_token: str = EOS_TOKEN) -> str:
  """Writes a CLIPTokenizer folder covering ``words`` (default: the procedural vocabulary); returns ``path``.

  ``pad_token``: EOS (SD1.x, SDXL's first tokenizer) or "!" (SD2.x, SDXL's tokenizer_2).

  The folder loads with ``load_tokenizer(path)`` or ``transformers.CLIPTokenizer.from_pretrained(path)``.
  Its vocabulary size is ``len(tokenizer)`` (the text encoder's ``vocab_size`` must be at least that).
  """
  vocab, merges = build_vocab_and_merges(words)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump(vocab, f, ensure_ascii=False)
  with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n")
    f.writelines(f"{a} {b}\n" for a, b in merges)
  if pad_token not in vocab:
    raise ValueError(f"pad_token {pad_token!r} is not in the tokenizer's vocabulary; use {EOS_TOKEN!r} or '!'.")
  specials = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": pad_token, "unk_token": EOS_TOKEN}
  config = dict(specials, tokenizer_class="CLIPTokenizer", model_max_length=MAX_LENGTH, do_lower_case=True,
                errors="replace", add_prefix_space=False)
  with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2)
  with open(os.path.join(path, "special_tokens_map.json"), "w", encoding="utf-8") as f:
    json.dump(specials, f, indent=2)
  return path


def _tokenizer_dir(path: str) -> str:
  """``path`` itself, or its ``tokenizer/`` subfolder when ``path`` is a diffusers pipeline folder."""
  for candidate in (path, os.path.join(path, "tokenizer")):
    if os.path.isfile(os.path.join(candidate, "vocab.json")) and os.path.isfile(
        os.path.join(candidate, "merges.txt")):
      return candidate
  raise ValueError(
      f"no CLIP tokenizer at {path!r}: expected vocab.json and merges.txt in it or in its tokenizer/ subfolder. "
      "Pass a diffusers pipeline folder or a tokenizer folder, or write a tiny one with "
      "perflow_jax.data.tokenizer.write_tiny_clip_tokenizer(path).")


def load_tokenizer(path: str):
  """A ``transformers.CLIPTokenizer`` from a tokenizer folder or a diffusers pipeline folder (offline)."""
  import transformers  # Imported here: loading transformers is slow and only this function needs it.

  return transformers.CLIPTokenizer.from_pretrained(_tokenizer_dir(path), local_files_only=True)


def tokenize(tokenizer, texts: Sequence[str]):
  """int32 [len(texts), 77] ids: BOS, tokens, EOS, padded (max_length) and truncated to 77 as SD does."""
  out = tokenizer(list(texts), padding="max_length", max_length=MAX_LENGTH, truncation=True,
                  return_attention_mask=False)
  return np.asarray(out["input_ids"], dtype=np.int32)
