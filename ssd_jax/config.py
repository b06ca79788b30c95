"""Frozen configuration dataclasses. Validation only: no I/O, no defaults read from the world.

Every config here is hashable, so it can be a static argument of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

Family = Literal["llama", "qwen2", "qwen3"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
  """Llama-3 RoPE frequency scaling ("rope_type": "llama3" in HF configs)."""

  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int

  def __post_init__(self):
    if self.factor <= 0:
      raise ValueError(f"rope scaling factor must be > 0, got {self.factor}")
    if not self.high_freq_factor > self.low_freq_factor > 0:
      raise ValueError(
        "rope scaling needs high_freq_factor > low_freq_factor > 0, got "
        f"{self.high_freq_factor} and {self.low_freq_factor}"
      )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """Architecture of one decoder-only transformer.

  Family differences are fields: Qwen2 sets `qkv_bias`, Qwen3 sets `qk_norm` (and often a
  `head_dim` other than hidden / heads), Llama-3 sets `rope_scaling`, SmolLM2 is Llama with
  `tie_embeddings`.
  """

  family: Family = "llama"
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  tie_embeddings: bool = False
  qkv_bias: bool = False
  qk_norm: bool = False
  max_position_embeddings: int = 8192
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()

  def __post_init__(self):
    for name in (
      "vocab_size",
      "hidden_size",
      "num_layers",
      "num_heads",
      "num_kv_heads",
      "head_dim",
      "intermediate_size",
    ):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
        f"({self.num_kv_heads}) for grouped-query attention"
      )
    if self.head_dim % 2:
      raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
    if self.family not in ("llama", "qwen2", "qwen3"):
      raise ValueError(f"unknown family {self.family!r}; expected llama, qwen2 or qwen3")
    if not isinstance(self.eos_token_ids, tuple):
      raise ValueError("eos_token_ids must be a tuple of ints")
    for t in self.eos_token_ids:
      if not 0 <= t < self.vocab_size:
        raise ValueError(f"eos token id {t} is outside the vocabulary [0, {self.vocab_size})")

  @property
  def group_size(self) -> int:
    """Query heads per KV head (G)."""
    return self.num_heads // self.num_kv_heads

  @property
  def num_params(self) -> int:
    """Parameter count (embedding counted once when tied)."""
    D, H, F = self.hidden_size, self.head_dim, self.intermediate_size
    attn = D * H * (2 * self.num_heads + 2 * self.num_kv_heads)
    if self.qkv_bias:
      attn += H * (self.num_heads + 2 * self.num_kv_heads)
    if self.qk_norm:
      attn += 2 * H
    per_layer = attn + 3 * D * F + 2 * D
    head = 0 if self.tie_embeddings else self.vocab_size * D
    return self.num_layers * per_layer + self.vocab_size * D + head + D
