"""KV caches as frozen pytrees.

The main cache holds every committed token of every sequence in fixed slots: token at position
p of sequence b lives at slot p of row b. Writes happen at `lengths + arange(T)` before attention
reads, so stale values left by rejected tokens are never seen: they lie at or beyond `lengths`
and are overwritten before any query can attend to them. Rejecting speculated tokens is therefore
only a length update, never a copy.

The tree cache is scratch for the draft's branch decode: one slot per (tree step, branch).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ssd_jax.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class KVCache:
  """Per-sequence key/value slots of all layers.

  Attributes:
    k: keys, [L, B, S, K, H] in the model's dtype.
    v: values, [L, B, S, K, H].
    lengths: i32[B], tokens whose keys/values are committed (slots [0, lengths) are valid).
  """

  k: jax.Array  # [L, B, S, K, H]
  v: jax.Array  # [L, B, S, K, H]
  lengths: jax.Array  # i32[B]

  @property
  def batch_size(self) -> int:
    return self.k.shape[1]

  @property
  def capacity(self) -> int:
    """S: slots per sequence."""
    return self.k.shape[2]

  @classmethod
  def init(cls, config: ModelConfig, batch_size: int, capacity: int, dtype=jnp.float32) -> KVCache:
    shape = (config.num_layers, batch_size, capacity, config.num_kv_heads, config.head_dim)
    return cls(
      k=jnp.zeros(shape, dtype),
      v=jnp.zeros(shape, dtype),
      lengths=jnp.zeros((batch_size,), jnp.int32),
    )

  def with_lengths(self, lengths: jax.Array) -> KVCache:
    return dataclasses.replace(self, lengths=lengths.astype(jnp.int32))

  def write_rows(self, window: KVCache, rows: jax.Array, lengths: jax.Array) -> KVCache:
    """Rows `rows` (i32[k]) holding `window`'s k rows of slots [0, P) (`prefill_window`),
    `lengths` (i32[k]) of them committed; every other row untouched. In place when the cache
    is donated."""
    P = window.capacity
    return KVCache(
      k=self.k.at[:, rows, :P].set(window.k.astype(self.k.dtype)),
      v=self.v.at[:, rows, :P].set(window.v.astype(self.v.dtype)),
      lengths=self.lengths.at[rows].set(lengths),
    )

  def take_rows(self, index: jax.Array) -> KVCache:
    """The rows `index` (i32[B']), in that order: a cache of B' rows (a resize)."""
    return KVCache(k=self.k[:, index], v=self.v[:, index], lengths=self.lengths[index])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class TreeKV:
  """Scratch keys/values of the draft's tree branches: slot (r, t) holds branch t's token of
  tree step r.

  Attributes:
    k: [L, B, R, T, K, H].
    v: [L, B, R, T, K, H].
  """

  k: jax.Array  # [L, B, R, T, K, H]
  v: jax.Array  # [L, B, R, T, K, H]

  @classmethod
  def init(
    cls, config: ModelConfig, batch_size: int, steps: int, branches: int, dtype=jnp.float32
  ) -> TreeKV:
    shape = (config.num_layers, batch_size, steps, branches, config.num_kv_heads, config.head_dim)
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))
