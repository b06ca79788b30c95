"""Small random models with a byte-level tokenizer: fast tests and demos without real weights."""

from __future__ import annotations

import functools
import zlib

import jax
import tokenizers
from tokenizers import decoders, pre_tokenizers

from ssd_jax.config import ModelConfig, RopeScaling
from ssd_jax.models.tokenizer import Tokenizer
from ssd_jax.models.transformer import Params, init_params

# 256 byte symbols, then ChatML specials and reserved ids (a vocabulary divisible by 8).
SPECIALS = ("<|im_start|>", "<|im_end|>", *(f"<|reserved_{i}|>" for i in range(6)))
VOCAB = 256 + len(SPECIALS)
IM_END = 257
CHATML = "<|im_start|>user\n{{ content }}<|im_end|>\n<|im_start|>assistant\n"

_COMMON = dict(vocab_size=VOCAB, eos_token_ids=(IM_END,), bos_token_id=256)
CONFIGS = {
  "tiny-llama": ModelConfig(
    family="llama",
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    intermediate_size=128,
    rope_theta=10000.0,
    **_COMMON,
    rope_scaling=RopeScaling(
      factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64
    ),
  ),
  "tiny-qwen2": ModelConfig(
    family="qwen2",
    hidden_size=64,
    num_layers=2,
    num_heads=6,
    num_kv_heads=2,
    head_dim=16,
    intermediate_size=128,
    qkv_bias=True,
    tie_embeddings=True,
    **_COMMON,
  ),
  "tiny-qwen3": ModelConfig(
    family="qwen3",
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=4,
    head_dim=24,
    intermediate_size=128,
    qk_norm=True,
    **_COMMON,
  ),
  "tiny-llama-draft": ModelConfig(
    family="llama",
    hidden_size=32,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    head_dim=16,
    intermediate_size=64,
    **_COMMON,
  ),
}
NAMES = tuple(CONFIGS)


def build(name: str) -> tuple[ModelConfig, Params]:
  """The named tiny model with weights from a seed derived from its name (stable across runs)."""
  config = CONFIGS[name]
  key = jax.random.key(zlib.crc32(name.encode()))
  return config, jax.tree.map(jax.device_get, init_params(config, key, scale=2.0))


@functools.cache
def byte_tokenizer() -> Tokenizer:
  """Every byte is a token (GPT-2 byte-level alphabet), plus ChatML specials."""
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  byte_to_char = sorted(alphabet, key=lambda c: _byte_of(c))
  vocab = {c: i for i, c in enumerate(byte_to_char)}
  tk = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
  tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tk.decoder = decoders.ByteLevel()
  tk.add_special_tokens([tokenizers.AddedToken(s, special=True) for s in SPECIALS])
  return Tokenizer(tk, chat_template=CHATML)


@functools.cache
def _byte_table() -> dict[str, int]:
  # GPT-2's byte -> printable-char map: printable bytes map to themselves, others to 256 + i.
  printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
  table, extra = {}, 0
  for b in range(256):
    if b in printable:
      table[chr(b)] = b
    else:
      table[chr(256 + extra)] = b
      extra += 1
  return table


def _byte_of(char: str) -> int:
  return _byte_table()[char]
