"""Jitted programs of the draft for synchronous drafting (sync SD, and SSD's neural backup).

start      prefill the prompts into the draft cache.
propose    draft `lookahead` tokens from the pending token in one program (a scan over
           single-token steps), then write the last draft token's key/value too, so that the
           draft cache covers every token the target may accept.
commit     advance lengths by what the target committed.
fast       the fast backup: random tokens proposed as point masses.

A draft whose head is restricted to a token subset (`transformer.head_subset`) produces logits
over the subset's columns: `to_tokens` maps sampled columns to token ids, `to_vocab` spreads a
proposal distribution over the whole vocabulary for the verifier (zero outside the subset).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ssd_jax.config import ModelConfig
from ssd_jax.decode.sampling import Sampling, saguaro, sample
from ssd_jax.decode.state import DraftState, Speculation
from ssd_jax.decode.verify import Outcome
from ssd_jax.models.kv_cache import KVCache
from ssd_jax.models.prefill import prefill
from ssd_jax.models.transformer import Params, forward


@functools.partial(jax.jit, static_argnames=("config", "attention_impl"), donate_argnames="cache")
def start(
  params: Params,
  tokens: jax.Array,
  prompt_lengths: jax.Array,
  cache: KVCache,
  temperature: jax.Array,
  key: jax.Array,
  *,
  config: ModelConfig,
  attention_impl: str = "xla",
) -> DraftState:
  """Prefill all but the pending last prompt token. `cache` is donated."""
  cache = prefill.__wrapped__(
    params, tokens, prompt_lengths - 1, cache, config=config, attention_impl=attention_impl
  )
  return DraftState(cache=cache, temperature=temperature.astype(jnp.float32), key=key)


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


def draft_probs(
  logits: jax.Array,
  temperature: jax.Array,
  depth: jax.Array | int,
  *,
  sampling: Sampling,
  fan_out: tuple[int, ...] | None,
  saguaro_c: float,
):
  """The proposal distribution at accept depth `depth`: warped like the target's p, then
  Saguaro-scaled with that depth's fan-out when C < 1."""
  probs = sampling.probs(logits, temperature)
  if saguaro_c < 1.0 and fan_out is not None:
    f = jnp.asarray(fan_out, jnp.int32)[depth]
    probs = saguaro(probs, f, saguaro_c, max_fan_out=max(max(fan_out), 1))
  return probs


def decode_steps(
  params: Params,
  cache: KVCache,
  first: jax.Array,
  temperature: jax.Array,
  key: jax.Array,
  *,
  config: ModelConfig,
  lookahead: int,
  sampling: Sampling,
  fan_out: tuple[int, ...] | None,
  saguaro_c: float,
  attention_impl: str,
  kv_window: int | None,
):
  """Feed `first` then each sampled token; return tokens [B, lookahead], their proposal
  distributions [B, lookahead, V] (None when greedy) and the cache with all of
  [first, x_1..x_lookahead] written (lengths unchanged)."""
  base = cache.lengths
  fwd = functools.partial(
    forward, params, config=config, attention_impl=attention_impl, kv_window=kv_window
  )

  def body(carry, j):
    token, cache, key = carry
    logits, cache = fwd(token[:, None], cache.with_lengths(base + j))
    logits = logits[:, 0]
    if sampling.greedy:
      token = to_tokens(params, jnp.argmax(logits, -1))
      return (token, cache, key), (token, None)
    probs = draft_probs(
      logits, temperature, j, sampling=sampling, fan_out=fan_out, saguaro_c=saguaro_c
    )
    key, sub = jax.random.split(key)
    token = to_tokens(params, sample(sub, probs))
    return (token, cache, key), (token, to_vocab(params, probs, config.vocab_size))

  (last, cache, _), (tokens, probs) = jax.lax.scan(body, (first, cache, key), jnp.arange(lookahead))
  _, cache = fwd(last[:, None], cache.with_lengths(base + lookahead), return_logits=False)
  tokens = tokens.T  # [B, lookahead]
  probs = None if probs is None else probs.transpose(1, 0, 2)
  return tokens, probs, cache.with_lengths(base)


def commit(state: DraftState, outcome: Outcome) -> DraftState:
  cache = state.cache.with_lengths(state.cache.lengths + outcome.committed)
  return DraftState(cache=cache, temperature=state.temperature, key=state.key)


@functools.partial(
  jax.jit,
  static_argnames=(
    "config",
    "lookahead",
    "sampling",
    "fan_out",
    "saguaro_c",
    "attention_impl",
    "kv_window",
  ),
  donate_argnames="state",
)
def propose(
  params: Params,
  state: DraftState,
  outcome: Outcome | None,
  last: jax.Array,
  *,
  config: ModelConfig,
  lookahead: int,
  sampling: Sampling,
  fan_out: tuple[int, ...] | None = None,
  saguaro_c: float = 1.0,
  attention_impl: str = "xla",
  kv_window: int | None = None,
) -> tuple[DraftState, Speculation]:
  """Commit the previous outcome (if any), then draft from the pending token `last` (i32[B]).

  `state` is donated.
  """
  if outcome is not None:
    state = commit(state, outcome)
  key, sub = jax.random.split(state.key)
  tokens, probs, cache = decode_steps(
    params,
    state.cache,
    last,
    state.temperature,
    sub,
    config=config,
    lookahead=lookahead,
    sampling=sampling,
    fan_out=fan_out,
    saguaro_c=saguaro_c,
    attention_impl=attention_impl,
    kv_window=kv_window,
  )
  B = last.shape[0]
  spec = Speculation(
    tokens=jnp.concatenate([last[:, None], tokens], axis=1),
    probs=probs,
    point_mass=jnp.zeros((B,), bool),
    hit=jnp.zeros((B,), bool),
  )
  return DraftState(cache=cache, temperature=state.temperature, key=key), spec


def fast_tokens(key: jax.Array, batch_size: int, lookahead: int, vocab_size: int) -> jax.Array:
  """The fast backup's proposal: uniformly random ids i32[B, lookahead] (point masses)."""
  return jax.random.randint(key, (batch_size, lookahead), 0, vocab_size, jnp.int32)
