"""Decode-time data shared by the target and the draft: frozen pytrees with shape comments.

Conventions: the last committed token of each sequence (the prompt's last token, then each
round's bonus) is *pending*: it is not yet in any KV cache and is the first token the next round
feeds. So a cache's `lengths` = committed tokens - 1.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ssd_jax.decode.verify import Outcome
from ssd_jax.models.kv_cache import KVCache

__all__ = ["DraftState", "Outcome", "Report", "SpecCache", "Speculation", "TargetState"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class Speculation:
  """What the target verifies next.

  Attributes:
    tokens: i32[B, lookahead + 1], the pending (bonus) token it was built for, then the
      `lookahead` draft tokens.
    probs: f32[B, lookahead, V], the proposal distributions that produced the draft tokens;
      None in greedy runs (verification compares argmaxes and needs no q).
    point_mass: bool[B], rows whose draft tokens are deterministic (the fast backup).
    hit: bool[B], rows served from the speculation cache (False for sync SD and backups).
  """

  tokens: jax.Array  # i32[B, lookahead + 1]
  probs: jax.Array | None  # f32[B, lookahead, V]
  point_mass: jax.Array  # bool[B]
  hit: jax.Array  # bool[B]

  @property
  def lookahead(self) -> int:
    return self.tokens.shape[1] - 1


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class TargetState:
  """The target's side of decoding: its cache, the output so far and per-row bookkeeping.

  Attributes:
    cache: the target KVCache (donated through every round).
    last: i32[B], the pending token.
    num_out: i32[B], generated tokens so far.
    max_new: i32[B], per-row generation budget.
    temperature: f32[B], per-row temperature (0 = greedy).
    done: bool[B], rows that emitted EOS or exhausted their budget.
    key: PRNG key for verification.
    accept_hist: i32[B, 2, lookahead + 1], rounds by (speculation was a cache hit, accepted
      count), counted while a row is active; rounds = its sum.
  """

  cache: KVCache
  last: jax.Array  # i32[B]
  num_out: jax.Array  # i32[B]
  max_new: jax.Array  # i32[B]
  temperature: jax.Array  # f32[B]
  done: jax.Array  # bool[B]
  key: jax.Array  # key<fry>[]
  accept_hist: jax.Array  # i32[B, 2, lookahead + 1]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class Report:
  """What the host reads after a round (the only device-to-host transfer per round).

  Attributes:
    tokens: i32[B, lookahead + 1], tokens emitted this round, valid up to `count`.
    count: i32[B], how many (0 for sequences already finished).
    done: bool[B], sequences finished after this round.
    hit: bool[B], active sequences whose speculation this round came from the cache.
  """

  tokens: jax.Array  # i32[B, lookahead + 1]
  count: jax.Array  # i32[B]
  done: jax.Array  # bool[B]
  hit: jax.Array  # bool[B]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class DraftState:
  """The draft's side: its cache (same committed lengths as the target's) and its PRNG key.

  Attributes:
    cache: the draft KVCache.
    temperature: f32[B], per-row temperature (the same as the target's).
    key: PRNG key for drafting.
  """

  cache: KVCache
  temperature: jax.Array  # f32[B]
  key: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class SpecCache:
  """The speculation cache built by one expansion: per sequence, one entry per fork branch.

  Branch n was forked at accept depth `depth[n]` with bonus token `keys[b, n]`; its value is the
  speculation to verify if the outcome turns out to be (depth[n], keys[b, n]).

  Attributes:
    keys: i32[B, N], the forked bonus token of each branch.
    depth: i32[N], each branch's accept depth (the same layout for every sequence).
    tokens: i32[B, N, lookahead], the branch's draft continuation.
    probs: f32[B, N, lookahead, V] proposal distributions (None in greedy runs).
    valid: bool[B, N], entries that may be served (False: excluded or duplicate tokens).
  """

  keys: jax.Array  # i32[B, N]
  depth: jax.Array  # i32[N]
  tokens: jax.Array  # i32[B, N, lookahead]
  probs: jax.Array | None  # f32[B, N, lookahead, V]
  valid: jax.Array  # bool[B, N]


def initial_hist(batch_size: int, lookahead: int) -> jax.Array:
  return jnp.zeros((batch_size, 2, lookahead + 1), jnp.int32)
