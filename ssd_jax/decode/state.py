"""Decode-time data shared by the target and the draft: frozen pytrees with shape comments.

Conventions: the last committed token of each sequence (the prompt's last token, then each
round's bonus) is *pending*: it is not yet in any KV cache and is the first token the next round
feeds. So a cache's `lengths` = committed tokens - 1.

What crosses between the two sides each round is small: an `Outcome` (a few ints per row)
towards the draft, a `Speculation` (tokens, and q when sampling) towards the target.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ssd_jax.decode.sampling import Warp
from ssd_jax.models.kv_cache import KVCache

__all__ = [
  "Admission",
  "DraftState",
  "Outcome",
  "Report",
  "Speculation",
  "SpeculationCache",
  "TargetState",
  "Warp",
]


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

  @classmethod
  def empty(cls, batch_size: int) -> Speculation:
    """No draft tokens: what autoregressive decoding verifies (only the pending token)."""
    return cls(
      tokens=np.zeros((batch_size, 1), np.int32),
      probs=None,
      point_mass=np.zeros(batch_size, bool),
      hit=np.zeros(batch_size, bool),
    )


_OUTCOME = ("accepted", "bonus", "committed", "done")  # the columns of `Outcome.packed`
_ACCEPTED, _BONUS, _COMMITTED, _DONE = range(len(_OUTCOME))


def _stack(columns) -> jax.Array:
  """Columns as one i32[B, len(columns)] array (numpy where they all are, else traced)."""
  xp = np if all(isinstance(c, np.ndarray) for c in columns) else jnp
  return xp.stack([xp.asarray(c).astype(np.int32) for c in columns], axis=1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class Outcome:
  """What one verification decided, per sequence: one array, so that moving it to the draft's
  devices each round is one transfer (a `device_put` costs per array, about 40-60 us of host
  time each on CPU).

  Attributes:
    packed: i32[B, 4], per row: accepted, bonus, committed, done.

  Its views, on either side (`Outcome.of` builds one from them):
    accepted: i32[B], draft tokens accepted (0..lookahead): the accept depth.
    bonus: i32[B], the token sampled after them (residual or p_lookahead).
    committed: i32[B], tokens committed to the KV caches this round (accepted + 1, or 0 for
      sequences that had already finished).
    done: bool[B], sequences finished after this round (nothing more is verified for them, so
      the draft need not speculate for them).
  """

  packed: jax.Array  # i32[B, 4]

  @classmethod
  def of(cls, *, accepted, bonus, committed, done) -> Outcome:
    return cls(packed=_stack([accepted, bonus, committed, done]))

  @classmethod
  def nothing(cls, batch_size: int) -> Outcome:
    """An outcome that commits nothing (a host array): what a first proposal, before any
    round, commits. One program then drafts both the first proposal and every later one."""
    return cls(packed=np.zeros((batch_size, len(_OUTCOME)), np.int32))

  def with_committed(self, committed: jax.Array) -> Outcome:
    """This outcome with `committed` replaced (traced)."""
    return Outcome(packed=self.packed.at[:, _COMMITTED].set(committed))

  @property
  def accepted(self) -> jax.Array:
    return self.packed[:, _ACCEPTED]

  @property
  def bonus(self) -> jax.Array:
    return self.packed[:, _BONUS]

  @property
  def committed(self) -> jax.Array:
    return self.packed[:, _COMMITTED]

  @property
  def done(self) -> jax.Array:
    return self.packed[:, _DONE].astype(bool)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class TargetState:
  """The target's side of decoding: a fixed number of rows (slots), each holding one request's
  cache row, pending token, budget and sampling settings; a free slot is a finished row.

  Attributes:
    cache: the target KVCache (donated through every round).
    last: i32[B], the pending token.
    num_out: i32[B], generated tokens so far.
    max_new: i32[B], per-row generation budget.
    warp: per-row sampling settings.
    done: bool[B], rows that emitted EOS, exhausted their budget or hold no request.
    seed: key[B], each row's own PRNG key (its request's seed): every draw of the row comes
      from it and the row's position (`sampling.row_keys`).
    ignore_eos: bool[B], rows that keep generating past EOS.
  """

  cache: KVCache
  last: jax.Array  # i32[B]
  num_out: jax.Array  # i32[B]
  max_new: jax.Array  # i32[B]
  warp: Warp
  done: jax.Array  # bool[B]
  seed: jax.Array  # key<fry>[B]
  ignore_eos: jax.Array  # bool[B]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class Admission:
  """Requests entering slots between rounds: what both sides write into their rows (one entry
  per request, k of them).

  Attributes:
    slot: i32[k], each request's row.
    length: i32[k], prompt tokens (all but the last are prefilled; the last is pending).
    last: i32[k], the prompt's last token.
    max_new: i32[k], the generation budget.
    warp: the sampling settings (fields [k]).
    seed: u32[k, 2], the PRNG key data (`jax.random.key(seed)`'s for an int seed).
    ignore_eos: bool[k], keep generating past EOS.
  """

  slot: jax.Array  # i32[k]
  length: jax.Array  # i32[k]
  last: jax.Array  # i32[k]
  max_new: jax.Array  # i32[k]
  warp: Warp
  seed: jax.Array  # u32[k, 2]
  ignore_eos: jax.Array  # bool[k]


# The columns of a report after its tokens, in order (see `Report`): then the outcome's.
_COLUMNS = ("count", "hit", "drafted", *_OUTCOME)
_COLUMN = {name: i - len(_COLUMNS) for i, name in enumerate(_COLUMNS)}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class Report:
  """What the host reads after a round: one array, so one device-to-host copy per round (a
  leaf each would be nine, each with its own synchronisation on an accelerator).

  Attributes:
    packed: i32[B, lookahead + 8], per row: the tokens emitted this round (lookahead + 1
      columns), then count, hit, drafted, and the outcome's accepted, bonus, committed, done.
    outcome: the verification outcome, on the device, for the draft side's programs (in this
      process). The host reads it from `packed` with the rest; a speculator in another process
      gets it from there, so the report stays the one host read per round.

  Read on the host with `on_host()`. Its views, on either side:
    tokens: i32[B, lookahead + 1], tokens emitted this round, valid up to `count`.
    count: i32[B], how many (0 for sequences already finished).
    done: bool[B], sequences finished after this round.
    hit: bool[B], active sequences whose speculation this round came from the cache.
    drafted: bool[], some active sequence's speculation this round was not from the cache: in
      ssd, the round's speculation needed the first proposal or a backup.
  """

  packed: jax.Array  # i32[B, lookahead + 8]
  outcome: Outcome

  @classmethod
  def pack(cls, *, tokens, count, hit, drafted, outcome: Outcome) -> Report:
    """The report of a round (inside the target's jitted step)."""
    columns = _stack([count, hit, jnp.broadcast_to(drafted, count.shape)])
    return cls(packed=jnp.concatenate([tokens, columns, outcome.packed], axis=1), outcome=outcome)

  def on_host(self) -> Report:
    """This report read to the host as one array (a report already there, as it is)."""
    if isinstance(self.packed, np.ndarray):
      return self
    packed = np.asarray(jax.device_get(self.packed))
    # A contiguous copy of a few ints a row: a speculator process is sent it.
    outcome = Outcome(packed=np.ascontiguousarray(packed[:, -len(_OUTCOME) :]))
    return Report(packed=packed, outcome=outcome)

  @property
  def tokens(self) -> jax.Array:
    return self.packed[:, : -len(_COLUMNS)]

  @property
  def count(self) -> jax.Array:
    return self.packed[:, _COLUMN["count"]]

  @property
  def done(self) -> jax.Array:
    return self.packed[:, _COLUMN["done"]].astype(bool)

  @property
  def hit(self) -> jax.Array:
    return self.packed[:, _COLUMN["hit"]].astype(bool)

  @property
  def drafted(self) -> jax.Array:
    return self.packed[:, _COLUMN["drafted"]].any()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class DraftState:
  """The draft's side: its cache rows (same committed lengths as the target's), and each row's
  sampling settings and PRNG key (the target's).

  Attributes:
    cache: the draft KVCache.
    warp: per-row sampling settings, the same as the target's.
    seed: key[B], each row's PRNG key (drafting draws at its own use, `sampling.row_keys`).
  """

  cache: KVCache
  warp: Warp
  seed: jax.Array  # key<fry>[B]

  def advance(self, outcome: Outcome) -> DraftState:
    """Commit what the target committed (its keys/values are already written)."""
    cache = self.cache.with_lengths(self.cache.lengths + outcome.committed)
    return dataclasses.replace(self, cache=cache)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class SpeculationCache:
  """The speculation cache built by one expansion: per sequence, one entry per fork branch.

  Branch n was forked at accept depth `depth[b, n]` with bonus token `keys[b, n]`; its value is
  the speculation to verify if the outcome turns out to be (depth[b, n], keys[b, n]).

  Attributes:
    keys: i32[B, N], the forked bonus token of each branch.
    depth: i32[B, N], each branch's accept depth (the hit or the miss layout, per row).
    tokens: i32[B, N, lookahead], the branch's draft continuation.
    probs: f32[B, N, lookahead, V] proposal distributions (None in greedy runs).
    valid: bool[B, N], entries that may be served (False: a fork slot with no token behind it,
      where the depth's distribution has fewer tokens than its fan-out).
  """

  keys: jax.Array  # i32[B, N]
  depth: jax.Array  # i32[B, N]
  tokens: jax.Array  # i32[B, N, lookahead]
  probs: jax.Array | None  # f32[B, N, lookahead, V]
  valid: jax.Array  # bool[B, N]
