"""Frozen configuration dataclasses. Validation only: no I/O, no defaults read from the world.

Every config here is hashable, so it can be a static argument of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import math
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


Mode = Literal["ar", "sd", "ssd"]
Backup = Literal["neural", "fast", "auto"]
MODES: tuple[str, ...] = ("ar", "sd", "ssd")
BACKUPS: tuple[str, ...] = ("neural", "fast", "auto")

# The defaults of every entry point (the Python API, `python -m ssd_jax.run`, the benchmarks):
# the fastest sd and ssd settings of the benchmark sweeps for the embedded pair on a 2-core CPU
# (docs/BENCHMARKS.md). Stated here once.
DEFAULT_LOOKAHEAD = 3
DEFAULT_FAN_OUT = 4  # ssd's fork candidates at every accept depth


@dataclasses.dataclass(frozen=True, kw_only=True)
class Calibration:
  """What Theorem 17 needs to choose the backup of `backup="auto"`, for one draft / target pair.

  None estimates a field (`decode.policy`): `t_neural` from the two models' parameter counts
  (lookahead draft steps, each costing the draft / target parameter ratio of a verification),
  `e_hit` from an acceptance rate of 0.7, `e_miss_neural` as `e_hit`.

  Attributes:
    p_hit: the probability that a row's verification outcome is in the speculation cache.
    e_hit: tokens a round emits after a hit (bonus included).
    e_miss_neural: tokens a round emits after a miss served by the neural backup.
    t_neural: the neural backup's drafting time over one verification's.
  """

  p_hit: float = 0.85
  e_hit: float | None = None
  e_miss_neural: float | None = None
  t_neural: float | None = None

  def __post_init__(self):
    if not 0.0 <= self.p_hit <= 1.0:
      raise ValueError(f"calibration p_hit must be in [0, 1], got {self.p_hit}")
    for name in ("e_hit", "e_miss_neural", "t_neural"):
      value = getattr(self, name)
      if value is not None and not (math.isfinite(value) and value >= 0):
        raise ValueError(f"calibration {name} must be a finite number >= 0, got {value}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpecConfig:
  """How to decode: the mode and, for speculation, its knobs. `SpecConfig()` is ssd as
  `python -m ssd_jax.run` runs it.

  Attributes:
    mode: "ar" (target only), "sd" (synchronous speculative decoding) or "ssd" (speculative
      speculative decoding: the draft pre-speculates on its own device during verification).
    lookahead: draft tokens per round (the paper's K); default DEFAULT_LOOKAHEAD (0 for ar).
    fan_out: fork candidates per accept depth 0..lookahead after a cache hit (the paper's F^p),
      a tuple of lookahead + 1 ints; default for ssd DEFAULT_FAN_OUT at every depth. sd reads it
      only for Saguaro sampling (C < 1).
    fan_out_miss: the same after a miss (F^b); must have the same sum as `fan_out` so the
      expansion has one static shape. Defaults to `fan_out`.
    saguaro_c: Saguaro sampling's C in [0, 1] (1 = plain draft sampling).
    backup: what a cache miss falls back to: "neural" (draft now), "fast" (random tokens) or
      "auto" (neural below the batch size b*, fast from it on: Theorem 17).
    auto_batch_threshold: b* for "auto"; None = Theorem 17 with `calibration`.
    calibration: Theorem 17's inputs for "auto" (see `Calibration`).
  """

  mode: Mode = "ssd"
  lookahead: int | None = None
  fan_out: tuple[int, ...] | None = None
  fan_out_miss: tuple[int, ...] = ()
  saguaro_c: float = 1.0
  backup: Backup = "neural"
  auto_batch_threshold: float | None = None
  calibration: Calibration = Calibration()

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
    if self.backup not in BACKUPS:
      raise ValueError(f"backup must be one of {BACKUPS}, got {self.backup!r}")
    if self.mode == "ar":
      if self.lookahead not in (None, 0) or self.fan_out or self.fan_out_miss:
        raise ValueError("lookahead and fan_out apply only to sd and ssd, not to mode 'ar'")
      self._resolve(lookahead=0, fan_out=())
    else:
      lookahead = DEFAULT_LOOKAHEAD if self.lookahead is None else self.lookahead
      if isinstance(lookahead, bool) or not isinstance(lookahead, int) or lookahead < 1:
        raise ValueError(f"lookahead must be an int >= 1 for {self.mode}, got {lookahead!r}")
      fan_out = self.fan_out
      if fan_out is None:
        fan_out = (DEFAULT_FAN_OUT,) * (lookahead + 1) if self.mode == "ssd" else ()
      self._resolve(lookahead=lookahead, fan_out=tuple(fan_out))
    self._check_fan_outs()

  def _resolve(self, **fields) -> None:
    for name, value in fields.items():  # a frozen dataclass fills its defaults this way
      object.__setattr__(self, name, value)
    object.__setattr__(self, "fan_out_miss", tuple(self.fan_out_miss))

  def _check_fan_outs(self) -> None:
    if not (isinstance(self.saguaro_c, int | float) and 0.0 <= self.saguaro_c <= 1.0):
      raise ValueError(f"saguaro_c must be in [0, 1], got {self.saguaro_c}")
    for name in ("fan_out", "fan_out_miss"):
      value = getattr(self, name)
      if value and len(value) != self.lookahead + 1:
        raise ValueError(
          f"{name} needs lookahead + 1 = {self.lookahead + 1} entries (one per accept depth "
          f"0..{self.lookahead}), got {len(value)}: {list(value)}"
        )
      if any(isinstance(f, bool) or not isinstance(f, int) or f < 0 for f in value):
        raise ValueError(f"{name} entries must be ints >= 0, got {list(value)}")
    if self.mode == "ssd" and not self.fan_out:
      raise ValueError("ssd needs a fan_out list (one entry per accept depth 0..lookahead)")
    if self.saguaro_c < 1.0 and not self.fan_out:
      raise ValueError("saguaro_c < 1 scales the top-F draft tokens, so it needs a fan_out list")
    if self.fan_out and sum(self.fan_out) == 0:
      raise ValueError("fan_out must fork at least one branch (its sum is 0)")
    if self.fan_out_miss and sum(self.fan_out_miss) != sum(self.fan_out):
      raise ValueError(
        f"fan_out and fan_out_miss must have equal sums (one static expansion shape): "
        f"{sum(self.fan_out)} != {sum(self.fan_out_miss)}"
      )
