"""The rows of a persistent batch: requests enter and leave slots between rounds.

A state of B rows (`TargetState`, `DraftState`) is a fixed set of slots; a free slot is a row
that is done (the target computes it as padding and discards it). Between rounds a request
enters a free slot (`admit_*`: its prompt's keys/values, prefilled apart as a 1-row window, are
written into the row, every other row untouched), a finished or cancelled one leaves (`retire`),
and the whole batch moves to another size (`take_*`: a bucket of 1, 2, 4 or 8 rows, so a lightly
loaded batch does not pay for empty slots). Each is a program compiled per batch size (and
prompt bucket), with the state donated where its shape stays.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from ssd_jax.decode.sampling import Warp
from ssd_jax.decode.state import Admission, DraftState, Outcome, Speculation, TargetState
from ssd_jax.models.kv_cache import KVCache


def empty_warp(batch_size: int) -> Warp:
  return Warp(
    temperature=np.zeros(batch_size, np.float32),
    top_k=np.zeros(batch_size, np.int32),
    top_p=np.ones(batch_size, np.float32),
  )


def _seeds(batch_size: int) -> jax.Array:
  # Never drawn from: every row is done until a request brings its own.
  return jax.random.wrap_key_data(np.zeros((batch_size, 2), np.uint32))


def empty_target(cache: KVCache) -> TargetState:
  """A target state of `cache.batch_size` free slots (host arrays beside the cache: place them
  on the target mesh)."""
  B = cache.batch_size
  return TargetState(
    cache=cache,
    last=np.zeros(B, np.int32),
    num_out=np.zeros(B, np.int32),
    max_new=np.zeros(B, np.int32),
    warp=empty_warp(B),
    done=np.ones(B, bool),
    seed=_seeds(B),
    ignore_eos=np.zeros(B, bool),
  )


def empty_draft(cache: KVCache) -> DraftState:
  return DraftState(cache=cache, warp=empty_warp(cache.batch_size), seed=_seeds(cache.batch_size))


def _set_rows(rows, slot, value):
  return jax.tree.map(lambda a, v: a.at[slot].set(v), rows, value)


@functools.partial(jax.jit, donate_argnames="state")
def admit_target(state: TargetState, window: KVCache, admission: Admission) -> TargetState:
  """`admission`'s k requests in their slots: each prompt's keys/values (`window`, k rows; all
  but its last token, which is pending), a fresh budget and its settings. `state` is donated."""
  a, slot = admission, admission.slot
  return TargetState(
    cache=state.cache.write_rows(window, slot, a.length - 1),
    last=state.last.at[slot].set(a.last),
    num_out=state.num_out.at[slot].set(0),
    max_new=state.max_new.at[slot].set(a.max_new),
    warp=_set_rows(state.warp, slot, a.warp),
    done=state.done.at[slot].set(a.max_new <= 0),
    seed=state.seed.at[slot].set(jax.random.wrap_key_data(a.seed)),
    ignore_eos=state.ignore_eos.at[slot].set(a.ignore_eos),
  )


@functools.partial(jax.jit, donate_argnames="state")
def admit_draft(state: DraftState, window: KVCache, admission: Admission) -> DraftState:
  """The draft's side of `admit_target`. `state` is donated."""
  slot = admission.slot
  return DraftState(
    cache=state.cache.write_rows(window, slot, admission.length - 1),
    warp=_set_rows(state.warp, slot, admission.warp),
    seed=state.seed.at[slot].set(jax.random.wrap_key_data(admission.seed)),
  )


@functools.partial(jax.jit, donate_argnames="state")
def retire(state: TargetState, rows: jax.Array) -> TargetState:
  """Rows bool[B] end now (cancelled, or stopped by the host): done, generating nothing more.
  `state` is donated."""
  return dataclasses.replace(state, done=state.done | rows)


def _take(tree, index):
  return jax.tree.map(lambda a: a[index], tree)


@jax.jit
def take_target(state: TargetState, index: jax.Array, free: jax.Array) -> TargetState:
  """The rows `index` (i32[B']) as a state of B' rows; rows where `free` (bool[B']) are free
  slots (their content is whatever row they copied, done)."""
  return TargetState(
    cache=state.cache.take_rows(index),
    last=state.last[index],
    num_out=state.num_out[index],
    max_new=state.max_new[index],
    warp=_take(state.warp, index),
    done=state.done[index] | free,
    seed=state.seed[index],
    ignore_eos=state.ignore_eos[index],
  )


@jax.jit
def take_draft(state: DraftState, index: jax.Array) -> DraftState:
  """The draft's side of `take_target`."""
  return DraftState(
    cache=state.cache.take_rows(index), warp=_take(state.warp, index), seed=state.seed[index]
  )


@jax.jit
def take_speculation(speculation: Speculation, index: jax.Array) -> Speculation:
  """A pending speculation's rows `index`, following its rows to their new slots."""
  return _take(speculation, index)


@jax.jit
def take_outcome(outcome: Outcome, index: jax.Array, free: jax.Array) -> Outcome:
  """sd: the last outcome's rows `index` (a free row commits nothing)."""
  outcome = _take(outcome, index)
  return outcome.with_committed(jnp.where(free, 0, outcome.committed))


@jax.jit
def patch_speculation(speculation: Speculation, fresh: Speculation, rows: jax.Array):
  """`speculation` with rows bool[B] replaced by `fresh`'s (new requests' first proposals)."""
  where = lambda new, old: jnp.where(rows.reshape(rows.shape + (1,) * (old.ndim - 1)), new, old)
  return jax.tree.map(where, fresh, speculation)
