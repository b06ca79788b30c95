"""SSD's two draft programs per round, both jitted on the draft mesh for a `DraftPlan`.

expand  While the target verifies speculation s, pre-speculate for its likely outcomes:
        1. glue: one forward of the draft over s = [bonus, x_1..x_lookahead] writes their
           keys/values and gives the draft's distribution at every accept depth j;
        2. fork: at depth j take the top-F_j tokens, excluding x_{j+1} (a rejected token's
           residual mass is 0, so it can never be the bonus there);
        3. tree decode: `lookahead` steps over all N = Σ F_j branches at once (branches are a
           batch axis; each attends to the prefix, the glue up to its depth and its own earlier
           tokens), drawing each branch's continuation (Saguaro-scaled when C < 1).
        The result is a SpeculationCache: outcome (depth, bonus) -> next speculation.
lookup  Given the verification outcome (accepted depth, bonus): a hit serves the cached
        speculation; a miss falls back to the neural backup (draft now) or the fast backup
        (random tokens as point masses). Per sequence, with no host sync.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from ssd_jax.decode import draft as draft_lib
from ssd_jax.decode import tree
from ssd_jax.decode.plan import DraftPlan
from ssd_jax.decode.sampling import BACKUP, EXPAND, fold_rows, row_keys
from ssd_jax.decode.state import DraftState, Outcome, Speculation, SpeculationCache
from ssd_jax.models.kv_cache import KVCache, TreeKV
from ssd_jax.models.transformer import Params, forward, tree_forward


def fork(
  glue_logits: jax.Array,
  speculation: Speculation,
  fan_out: tuple[int, ...],
  fan_out_miss: tuple[int, ...],
  column_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Fork candidates per branch from the glue logits f32[B, lookahead + 1, V].

  Rows whose speculation came from the cache use `fan_out`, the others `fan_out_miss`.
  `column_ids` (i32[V]) are the token ids of the logit columns when the draft's head is
  restricted (default: column c is token c).

  Returns:
    keys i32[B, N] (forked bonus tokens), depth i32[B, N], valid bool[B, N].
  """
  B, _, V = glue_logits.shape
  excluded = jnp.concatenate([speculation.tokens[:, 1:], jnp.full((B, 1), -1, jnp.int32)], axis=1)
  token_of_column = jnp.arange(V) if column_ids is None else column_ids
  masked = jnp.where(token_of_column == excluded[..., None], -jnp.inf, glue_logits)
  values, columns = jax.lax.top_k(masked, max(*fan_out, *fan_out_miss))  # [B, T, max F]
  ids = columns if column_ids is None else column_ids[columns]
  depth_hit, rank_hit = tree.layout(fan_out)
  depth_miss, rank_miss = tree.layout(fan_out_miss)
  depth = jnp.where(speculation.hit[:, None], depth_hit, depth_miss)  # i32[B, N]
  rank = jnp.where(speculation.hit[:, None], rank_hit, rank_miss)
  rows = jnp.arange(B)[:, None]
  return ids[rows, depth, rank].astype(jnp.int32), depth, values[rows, depth, rank] > -jnp.inf


def tree_decode(
  params: Params,
  state: DraftState,
  cache: KVCache,
  forks: jax.Array,
  depth: jax.Array,
  keys: jax.Array,
  *,
  plan: DraftPlan,
) -> tuple[jax.Array, jax.Array | None]:
  """Decode `lookahead` tokens on every branch at once, starting from its forked bonus token.

  Returns tokens i32[B, N, lookahead] and their distributions f32[B, N, lookahead, V] (None
  when greedy). The branch's token i sits at depth i of the speculation it would become, which
  is verified after a hit: Saguaro uses the hit fan-out there.
  """
  B, N = forks.shape
  step = functools.partial(
    tree_forward,
    params,
    cache=cache,
    depth=depth,
    config=plan.config,
    attention_impl=plan.attention_impl,
  )

  def body(carry, i):
    tokens, scratch = carry
    logits, scratch = step(tokens, tree=scratch, step=i)  # f32[B, N, V']
    tokens, probs = draft_lib.draw(
      params, logits, state.warp, i, fold_rows(keys, i), plan=plan, fan_out=plan.fan_out
    )
    return (tokens, scratch), (tokens, probs)

  scratch = TreeKV.init(plan.config, B, plan.lookahead, N, cache.k.dtype)
  steps = jnp.arange(plan.lookahead)
  _, (tokens, probs) = jax.lax.scan(body, (forks, scratch), steps)
  return jnp.moveaxis(tokens, 0, -1), None if probs is None else jnp.moveaxis(probs, 0, 2)


@functools.partial(jax.jit, static_argnames="plan", donate_argnames="state")
def expand(
  params: Params, state: DraftState, speculation: Speculation, *, plan: DraftPlan
) -> tuple[DraftState, SpeculationCache]:
  """Build the speculation cache for the outcomes of verifying `speculation`. `state` is donated.

  The glue's keys/values stay in the draft cache (lengths unchanged): whatever the outcome, the
  committed tokens among them are then already in place.
  """
  glue_logits, cache = forward(
    params, speculation.tokens, state.cache, config=plan.config, attention_impl=plan.attention_impl
  )
  column_ids = params.get("head_ids")
  forks, depth, valid = fork(glue_logits, speculation, plan.fan_out, plan.fan_out_miss, column_ids)
  keys = row_keys(state.seed, state.cache.lengths, EXPAND)
  tokens, probs = tree_decode(params, state, cache, forks, depth, keys, plan=plan)
  speculations = SpeculationCache(keys=forks, depth=depth, tokens=tokens, probs=probs, valid=valid)
  return dataclasses.replace(state, cache=cache), speculations


def find(speculations: SpeculationCache, outcome: Outcome) -> tuple[jax.Array, jax.Array]:
  """Cache lookup: hit bool[B] and the matching branch index i32[B]."""
  match = (
    (speculations.depth == outcome.accepted[:, None])
    & (speculations.keys == outcome.bonus[:, None])
    & speculations.valid
  )  # bool[B, N]
  return match.any(axis=1), jnp.argmax(match, axis=1)


def _backup(params, state: DraftState, outcome: Outcome, need: jax.Array, keys, *, plan):
  """Tokens, q and point-mass flags of the backup for the rows in `need`, and the draft cache.

  The neural backup drafts for the whole batch (one program for every row), so it runs only
  when some active row missed (`lax.cond`); finished rows never ask for it.
  """
  B = need.shape[0]
  if plan.backup == "fast":
    tokens = draft_lib.fast_tokens(keys, plan.lookahead, plan.config.vocab_size)
    return tokens, None, jnp.ones((B,), bool), state.cache

  def neural(cache):
    return draft_lib.decode_steps(params, cache, outcome.bonus, state.warp, keys, plan=plan)

  def skip(cache):
    tokens = jnp.zeros((B, plan.lookahead), jnp.int32)
    probs = None if plan.greedy else jnp.zeros((B, plan.lookahead, plan.config.vocab_size))
    return tokens, probs, cache

  tokens, probs, cache = jax.lax.cond(need.any(), neural, skip, state.cache)
  return tokens, probs, jnp.zeros((B,), bool), cache


@functools.partial(jax.jit, static_argnames="plan", donate_argnames="state")
def lookup(
  params: Params,
  state: DraftState,
  speculations: SpeculationCache,
  outcome: Outcome,
  *,
  plan: DraftPlan,
) -> tuple[DraftState, Speculation]:
  """Commit `outcome`, then serve the next speculation: cached on a hit, from `plan.backup` on
  a miss. `state` is donated.

  Rows that are done after this outcome count as hits for the backup decision: nothing is
  verified for them any more, so they must not make the whole batch wait for a backup.
  """
  state = state.advance(outcome)
  hit, index = find(speculations, outcome)
  rows = jnp.arange(hit.shape[0])
  keys = row_keys(state.seed, state.cache.lengths, BACKUP)
  tokens, probs, point_mass, cache = _backup(
    params, state, outcome, ~hit & ~outcome.done, keys, plan=plan
  )
  tokens = jnp.where(hit[:, None], speculations.tokens[rows, index], tokens)
  if speculations.probs is not None:
    cached = speculations.probs[rows, index]  # f32[B, lookahead, V]
    probs = cached if probs is None else jnp.where(hit[:, None, None], cached, probs)
  speculation = Speculation(
    tokens=jnp.concatenate([outcome.bonus[:, None], tokens], axis=1),
    probs=probs,
    point_mass=point_mass & ~hit,
    hit=hit,
  )
  return dataclasses.replace(state, cache=cache), speculation
