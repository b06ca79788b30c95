"""Jitted programs of the draft for synchronous drafting (sync SD, SSD's first proposal and its
neural backup), and the per-step drawing both they and SSD's expansion use.

propose    draft `lookahead` tokens from each row's pending token in one program (a scan over
           single-token steps), then (sd) write the last draft token's key/value too, so that
           the draft cache covers every token the target may accept; in ssd the expansion that
           follows every proposal writes them all (its glue), so that step is left out.
fast_tokens  the fast backup: random tokens proposed as point masses.

Every draw comes from the row's own key at its position (`sampling.row_keys`).

A draft whose head is restricted to a token subset (`transformer.head_subset`) produces logits
over the subset's columns: `to_tokens` maps sampled columns to token ids, `to_vocab` spreads a
proposal distribution over the whole vocabulary for the verifier (zero outside the subset).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from ssd_jax.decode.plan import DraftPlan
from ssd_jax.decode.sampling import (
  PROPOSE,
  Warp,
  fold_rows,
  row_keys,
  saguaro,
  sample,
  warped_probs,
)
from ssd_jax.decode.state import DraftState, Outcome, Speculation
from ssd_jax.models.kv_cache import KVCache
from ssd_jax.models.transformer import Params, forward


def to_tokens(params: Params, columns: jax.Array) -> jax.Array:
  """Token ids i32 of logit columns (the identity unless the head is restricted)."""
  columns = columns.astype(jnp.int32)
  return params["head_ids"][columns] if "head_ids" in params else columns


def to_vocab(params: Params, probs: jax.Array, vocab_size: int) -> jax.Array:
  """A distribution over logit columns as one over the vocabulary f32[..., V]."""
  if "head_ids" not in params:
    return probs
  full = jnp.zeros((*probs.shape[:-1], vocab_size), probs.dtype)
  return full.at[..., params["head_ids"]].set(probs)


def draw(
  params: Params,
  logits: jax.Array,
  warp: Warp,
  depth: jax.Array,
  keys: jax.Array,
  *,
  plan: DraftPlan,
  fan_out: tuple[int, ...],
) -> tuple[jax.Array, jax.Array | None]:
  """Draw the draft tokens i32[B, ...] at speculation depth `depth` from logits [B, ..., V'],
  row b with keys[b], with the distribution f32[B, ..., V] they were drawn from (None when
  every row is greedy).

  The distribution is warped like the target's p, then Saguaro-scaled with `fan_out[depth]`,
  the fan-out the next expansion will fork at that depth (C < 1 only).
  """
  if plan.greedy:
    return to_tokens(params, jnp.argmax(logits, -1)), None
  probs = warped_probs(logits, warp)
  if plan.saguaro_c < 1.0:
    f = jnp.asarray(fan_out, jnp.int32)[depth]
    probs = saguaro(probs, f, plan.saguaro_c, max_fan_out=max(max(fan_out), 1))
  return to_tokens(params, sample(keys, probs)), to_vocab(params, probs, plan.config.vocab_size)


def decode_steps(
  params: Params,
  cache: KVCache,
  first: jax.Array,
  warp: Warp,
  keys: jax.Array,
  *,
  plan: DraftPlan,
):
  """Feed `first` then each drawn token; return tokens [B, lookahead], their proposal
  distributions [B, lookahead, V] (None when greedy) and the cache with all of
  [first, x_1..x_lookahead] written (lengths unchanged; x_lookahead left to the expansion's
  glue when `plan.expands`).

  What this drafts is never a cache hit, so Saguaro scales with the miss fan-out.
  """
  base = cache.lengths
  fwd = functools.partial(forward, params, config=plan.config, attention_impl=plan.attention_impl)

  def body(carry, j):
    token, cache = carry
    logits, cache = fwd(token[:, None], cache.with_lengths(base + j))
    sub = fold_rows(keys, j)
    token, probs = draw(params, logits[:, 0], warp, j, sub, plan=plan, fan_out=plan.fan_out_miss)
    return (token, cache), (token, probs)

  steps = jnp.arange(plan.lookahead)
  (last, cache), (tokens, probs) = jax.lax.scan(body, (first, cache), steps)
  if not plan.expands:
    _, cache = fwd(last[:, None], cache.with_lengths(base + plan.lookahead), return_logits=False)
  probs = None if probs is None else probs.transpose(1, 0, 2)
  return tokens.T, probs, cache.with_lengths(base)


@functools.partial(jax.jit, static_argnames="plan", donate_argnames="state")
def propose(
  params: Params,
  state: DraftState,
  outcome: Outcome,
  pending: jax.Array,
  fresh: jax.Array,
  *,
  plan: DraftPlan,
) -> tuple[DraftState, Speculation]:
  """Commit the previous outcome, then draft from each row's pending token: the outcome's
  bonus, or `pending` (i32[B]) for `fresh` rows (bool[B]: requests that entered their slot
  since, whose outcome belongs to the slot's previous occupant; every row before the first
  round, whose outcome is `Outcome.nothing`). `state` is donated.
  """
  outcome = outcome.with_committed(jnp.where(fresh, 0, outcome.committed))
  state = state.advance(outcome)
  last = jnp.where(fresh, pending, outcome.bonus)
  keys = row_keys(state.seed, state.cache.lengths, PROPOSE)
  tokens, probs, cache = decode_steps(params, state.cache, last, state.warp, keys, plan=plan)
  B = last.shape[0]
  speculation = Speculation(
    tokens=jnp.concatenate([last[:, None], tokens], axis=1),
    probs=probs,
    point_mass=jnp.zeros((B,), bool),
    hit=jnp.zeros((B,), bool),
  )
  return dataclasses.replace(state, cache=cache), speculation


def fast_tokens(keys: jax.Array, lookahead: int, vocab_size: int) -> jax.Array:
  """The fast backup's proposal: uniformly random ids i32[B, lookahead] (point masses), row b
  drawn with keys[b]."""
  draw = lambda k: jax.random.randint(k, (lookahead,), 0, vocab_size, jnp.int32)
  return jax.vmap(draw)(keys)
