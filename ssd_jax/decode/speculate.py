"""SSD's two draft programs per round, both jitted on the draft mesh.

expand  While the target verifies speculation s, pre-speculate for its likely outcomes:
        1. glue: one forward of the draft over s = [bonus, x_1..x_lookahead] writes their
           keys/values and gives the draft's distribution at every accept depth j;
        2. fork: at depth j take the top-F_j tokens, excluding x_{j+1} (a rejected token's
           residual mass is 0, so it can never be the bonus there);
        3. tree decode: `lookahead` steps over all N = Σ F_j branches at once (branches are a
           batch axis; each attends to the prefix, the glue up to its depth and its own earlier
           tokens), sampling each branch's continuation (Saguaro-scaled when C < 1).
        The result is a SpecCache: outcome (depth, bonus) -> next speculation.
lookup  Given the verification outcome (accepted depth, bonus): a hit serves the cached
        speculation; a miss falls back to the neural backup (draft now) or the fast backup
        (random tokens as point masses). Per sequence, with no host sync.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ssd_jax.config import ModelConfig
from ssd_jax.decode import draft as draft_lib
from ssd_jax.decode import tree
from ssd_jax.decode.draft import decode_steps, draft_probs
from ssd_jax.decode.sampling import Sampling, sample
from ssd_jax.decode.state import DraftState, SpecCache, Speculation
from ssd_jax.decode.verify import Outcome
from ssd_jax.models.kv_cache import TreeKV
from ssd_jax.models.transformer import Params, forward, tree_forward


def fork(
  glue_logits: jax.Array,
  spec: Speculation,
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
  excluded = jnp.concatenate([spec.tokens[:, 1:], jnp.full((B, 1), -1, jnp.int32)], axis=1)
  token_of_column = jnp.arange(V) if column_ids is None else column_ids
  masked = jnp.where(token_of_column == excluded[..., None], -jnp.inf, glue_logits)
  values, columns = jax.lax.top_k(masked, max(*fan_out, *fan_out_miss))  # [B, T, max F]
  ids = columns if column_ids is None else column_ids[columns]
  depth_hit, rank_hit = tree.layout(fan_out)
  depth_miss, rank_miss = tree.layout(fan_out_miss)
  depth = jnp.where(spec.hit[:, None], depth_hit, depth_miss)  # i32[B, N]
  rank = jnp.where(spec.hit[:, None], rank_hit, rank_miss)
  rows = jnp.arange(B)[:, None]
  return ids[rows, depth, rank].astype(jnp.int32), depth, values[rows, depth, rank] > -jnp.inf


@functools.partial(
  jax.jit,
  static_argnames=(
    "config",
    "lookahead",
    "fan_out",
    "fan_out_miss",
    "sampling",
    "saguaro_c",
    "attention_impl",
    "kv_window",
  ),
  donate_argnames="state",
)
def expand(
  params: Params,
  state: DraftState,
  spec: Speculation,
  *,
  config: ModelConfig,
  lookahead: int,
  fan_out: tuple[int, ...],
  fan_out_miss: tuple[int, ...],
  sampling: Sampling,
  saguaro_c: float = 1.0,
  attention_impl: str = "xla",
  kv_window: int | None = None,
) -> tuple[DraftState, SpecCache]:
  """Build the speculation cache for the outcomes of verifying `spec`. `state` is donated.

  The glue's keys/values stay in the draft cache (lengths unchanged): whatever the outcome, the
  committed tokens among them are then already in place.
  """
  glue_logits, cache = forward(
    params,
    spec.tokens,
    state.cache,
    config=config,
    attention_impl=attention_impl,
    kv_window=kv_window,
  )
  keys, depth, valid = fork(glue_logits, spec, fan_out, fan_out_miss, params.get("head_ids"))
  B, N = keys.shape
  temperature = state.temperature[:, None]  # [B, 1]: broadcasts over branches
  step = functools.partial(
    tree_forward,
    params,
    cache=cache,
    depth=depth,
    config=config,
    attention_impl=attention_impl,
    kv_window=kv_window,
  )

  def body(carry, i):
    tokens, scratch, key = carry
    logits, scratch = step(tokens, tree=scratch, step=i)  # f32[B, N, V or V']
    if sampling.greedy:
      nxt = draft_lib.to_tokens(params, jnp.argmax(logits, -1))
      return (nxt, scratch, key), (nxt, None)
    # The branch's token i sits at depth i of the speculation it would become, which is
    # verified after a hit: Saguaro uses the hit fan-out at that depth.
    probs = draft_probs(
      logits, temperature, i, sampling=sampling, fan_out=fan_out, saguaro_c=saguaro_c
    )
    key, sub = jax.random.split(key)
    nxt = draft_lib.to_tokens(params, sample(sub, probs))
    return (nxt, scratch, key), (nxt, draft_lib.to_vocab(params, probs, config.vocab_size))

  scratch = TreeKV.init(config, B, lookahead, N, cache.k.dtype)
  key, sub = jax.random.split(state.key)
  _, (tokens, probs) = jax.lax.scan(body, (keys, scratch, sub), jnp.arange(lookahead))
  spec_cache = SpecCache(
    keys=keys,
    depth=depth,
    tokens=jnp.moveaxis(tokens, 0, -1),
    probs=None if probs is None else jnp.moveaxis(probs, 0, 2),
    valid=valid,
  )
  return DraftState(cache=cache, temperature=state.temperature, key=key), spec_cache


def find(spec_cache: SpecCache, outcome: Outcome) -> tuple[jax.Array, jax.Array]:
  """Cache lookup: hit bool[B] and the matching branch index i32[B]."""
  match = (
    (spec_cache.depth == outcome.accepted[:, None])
    & (spec_cache.keys == outcome.bonus[:, None])
    & spec_cache.valid
  )  # bool[B, N]
  return match.any(axis=1), jnp.argmax(match, axis=1)


@functools.partial(
  jax.jit,
  static_argnames=(
    "config",
    "lookahead",
    "backup",
    "fan_out_miss",
    "sampling",
    "saguaro_c",
    "attention_impl",
    "kv_window",
  ),
  donate_argnames="state",
)
def lookup(
  params: Params,
  state: DraftState,
  spec_cache: SpecCache,
  outcome: Outcome,
  *,
  config: ModelConfig,
  lookahead: int,
  backup: str,
  fan_out_miss: tuple[int, ...],
  sampling: Sampling,
  saguaro_c: float = 1.0,
  attention_impl: str = "xla",
  kv_window: int | None = None,
) -> tuple[DraftState, Speculation]:
  """Commit `outcome`, then serve the next speculation: cached on a hit, from `backup` on a
  miss. `state` is donated.

  The neural backup drafts for the whole batch, and only runs when some sequence missed
  (`lax.cond`): rows that hit keep their cached speculation either way.
  """
  state = draft_lib.commit(state, outcome)
  hit, index = find(spec_cache, outcome)
  rows = jnp.arange(hit.shape[0])
  cached_tokens = spec_cache.tokens[rows, index]  # i32[B, lookahead]
  cached_probs = None if spec_cache.probs is None else spec_cache.probs[rows, index]
  key, sub = jax.random.split(state.key)
  B = hit.shape[0]

  if backup == "fast":
    tokens = jnp.where(
      hit[:, None], cached_tokens, draft_lib.fast_tokens(sub, B, lookahead, config.vocab_size)
    )
    probs, point_mass, cache = cached_probs, ~hit, state.cache
  else:

    def neural(cache):
      t, p, c = decode_steps(
        params,
        cache,
        outcome.bonus,
        state.temperature,
        sub,
        config=config,
        lookahead=lookahead,
        sampling=sampling,
        fan_out=fan_out_miss,
        saguaro_c=saguaro_c,
        attention_impl=attention_impl,
        kv_window=kv_window,
      )
      return t, p, c

    def cached(cache):
      return cached_tokens, cached_probs, cache

    backup_tokens, backup_probs, cache = jax.lax.cond(hit.all(), cached, neural, state.cache)
    tokens = jnp.where(hit[:, None], cached_tokens, backup_tokens)
    probs = (
      None if cached_probs is None else jnp.where(hit[:, None, None], cached_probs, backup_probs)
    )
    point_mass = jnp.zeros_like(hit)
  spec = Speculation(
    tokens=jnp.concatenate([outcome.bonus[:, None], tokens], axis=1),
    probs=probs,
    point_mass=point_mass,
    hit=hit,
  )
  return DraftState(cache=cache, temperature=state.temperature, key=key), spec
