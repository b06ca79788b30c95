"""Tokenizers through the `tokenizers` library, plus the chat formats our targets use.

HF model directories carry `tokenizer.json` (+ `tokenizer_config.json` with the chat template);
GGUF files carry the vocabulary, merges and template in their metadata, which we turn into a
`tokenizer.json` once. Chat templates are Jinja in HF; rather than depend on a template engine we
recognise the two formats our models use (ChatML for SmolLM2/Qwen, Llama-3 headers) and render
them directly, keeping any default system prompt the template injects.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import tokenizers
from tokenizers import decoders, pre_tokenizers

_CONTROL, _USER_DEFINED = 3, 4  # GGUF token types of special tokens


def tokenizer_json_from_gguf(meta: dict) -> str:
  """Build an HF `tokenizer.json` (byte-level BPE) from GGUF tokenizer metadata."""
  if meta.get("model") != "gpt2":
    raise ValueError(f"GGUF tokenizer model {meta.get('model')!r} is not supported (only 'gpt2')")
  vocab = {tok: i for i, tok in enumerate(meta["tokens"])}
  merges = [tuple(m.split(" ", 1)) for m in meta["merges"]]
  bpe = tokenizers.models.BPE(vocab=vocab, merges=merges)
  tk = tokenizers.Tokenizer(bpe)
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if meta.get("pre") == "smollm":
    # llama.cpp's "smollm" pre-tokenizer splits digits one by one before the GPT-2 regex.
    tk.pre_tokenizer = pre_tokenizers.Sequence(
      [pre_tokenizers.Digits(individual_digits=True), byte_level]
    )
  else:
    tk.pre_tokenizer = byte_level
  tk.decoder = decoders.ByteLevel()
  special = [
    tokenizers.AddedToken(tok, special=True, normalized=False)
    for tok, kind in zip(meta["tokens"], meta["token_types"], strict=True)
    if kind in (_CONTROL, _USER_DEFINED)
  ]
  tk.add_special_tokens(special)
  return tk.to_str()


class Tokenizer:
  """Text <-> token ids, and the model's chat prompt format."""

  def __init__(self, tk: tokenizers.Tokenizer, *, chat_template: str | None = None):
    self._tk = tk
    self.chat_template = chat_template

  @classmethod
  def from_directory(cls, directory: str | os.PathLike) -> Tokenizer:
    """Load `tokenizer.json` (+ optional `tokenizer_config.json`) from a model directory."""
    directory = Path(directory)
    path = directory / "tokenizer.json"
    if not path.exists():
      raise FileNotFoundError(f"{directory} has no tokenizer.json")
    template = None
    config = directory / "tokenizer_config.json"
    if config.exists():
      template = json.loads(config.read_text()).get("chat_template")
    return cls(tokenizers.Tokenizer.from_file(os.fspath(path)), chat_template=template)

  @classmethod
  def from_json(cls, text: str, chat_template: str | None = None) -> Tokenizer:
    return cls(tokenizers.Tokenizer.from_str(text), chat_template=chat_template)

  @property
  def vocab_size(self) -> int:
    return self._tk.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    return self._tk.encode(text, add_special_tokens=False).ids

  def decode(self, ids) -> str:
    return self._tk.decode([int(i) for i in ids], skip_special_tokens=False)

  def token_id(self, token: str) -> int | None:
    return self._tk.token_to_id(token)

  def apply_chat_template(self, user: str, system: str | None = None) -> str:
    """The prompt text for one user turn, ending where the assistant's reply begins."""
    return render_chat(self.chat_template, user, system)


def render_chat(template: str | None, user: str, system: str | None = None) -> str:
  """Render one user turn in the template's format (ChatML or Llama-3); raw text otherwise."""
  if not template:
    return user
  return render_messages(template, [("user", user)], system)


def render_messages(
  template: str, messages: list[tuple[str, str]], system: str | None = None
) -> str:
  """Render a conversation [(role, text), ...] ending where the assistant's reply begins.

  The template's default system prompt is used when `system` is None (as its Jinja would).
  """
  if "<|im_start|>" in template:
    if system is None:
      match = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", template, re.S)
      system = match.group(1) if match else None
    turns = [("system", system)] if system else []
    turns += messages
    body = "".join(f"<|im_start|>{role}\n{text}<|im_end|>\n" for role, text in turns)
    return body + "<|im_start|>assistant\n"
  if "<|start_header_id|>" in template:
    turns = ([("system", system)] if system else []) + list(messages)
    body = "".join(
      f"<|start_header_id|>{role}<|end_header_id|>\n\n{text}<|eot_id|>" for role, text in turns
    )
    return f"<|begin_of_text|>{body}<|start_header_id|>assistant<|end_header_id|>\n\n"
  raise ValueError(
    "unrecognised chat template (neither ChatML nor Llama-3); use --no-chat-template"
  )
