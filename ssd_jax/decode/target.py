"""Jitted programs of the target (verifier), run on the target mesh.

  start   prefill the prompts and build the TargetState.
  step    one round: forward [pending, draft tokens], verify, commit lengths, update per-row
          budgets, done flags and acceptance counts; report the emitted tokens to the host.
Autoregressive decoding is `step` with lookahead 0 (no draft tokens: the bonus is sampled from p).
Both are compiled for a `TargetPlan` (their only static argument).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from ssd_jax.decode.plan import TargetPlan
from ssd_jax.decode.sampling import Warp
from ssd_jax.decode.state import Outcome, Report, Speculation, TargetState, initial_hist
from ssd_jax.decode.verify import verify
from ssd_jax.models.kv_cache import KVCache
from ssd_jax.models.prefill import prefill
from ssd_jax.models.transformer import Params, forward


@functools.partial(jax.jit, static_argnames="plan", donate_argnames="cache")
def start(
  params: Params,
  tokens: jax.Array,
  prompt_lengths: jax.Array,
  cache: KVCache,
  max_new: jax.Array,
  warp: Warp,
  key: jax.Array,
  *,
  plan: TargetPlan,
) -> TargetState:
  """Prefill all but the last prompt token (it is pending) and build the state.

  Args:
    tokens: i32[B, P] right-padded prompts; prompt_lengths: i32[B].
    cache: an empty cache, donated.
    max_new: i32[B] per-row budgets; warp: per-row sampling settings.
  """
  B = tokens.shape[0]
  cache = prefill.__wrapped__(
    params,
    tokens,
    prompt_lengths - 1,
    cache,
    config=plan.config,
    attention_impl=plan.attention_impl,
  )
  return TargetState(
    cache=cache,
    last=tokens[jnp.arange(B), prompt_lengths - 1],
    num_out=jnp.zeros((B,), jnp.int32),
    max_new=max_new.astype(jnp.int32),
    warp=warp,
    done=max_new <= 0,
    key=key,
    accept_hist=initial_hist(B, plan.lookahead),
  )


def _emit(
  state: TargetState,
  drafts: jax.Array,
  accepted: jax.Array,
  bonus: jax.Array,
  eos_ids: tuple[int, ...],
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Tokens emitted this round ([x_1..x_accepted, bonus], cut after EOS and at the budget).

  Returns:
    emitted i32[B, lookahead + 1], count i32[B] (0 for finished rows), finished bool[B].
  """
  B, lookahead = drafts.shape
  j = jnp.arange(lookahead + 1)
  padded = jnp.concatenate([drafts, jnp.zeros((B, 1), jnp.int32)], axis=1)
  emitted = jnp.where(j < accepted[:, None], padded, bonus[:, None])  # i32[B, lookahead + 1]
  count = accepted + 1
  hit_eos = jnp.zeros_like(state.done)
  if eos_ids:  # static: runs that ignore EOS skip this
    is_eos = jnp.isin(emitted, jnp.asarray(eos_ids, jnp.int32)) & (j < count[:, None])
    hit_eos = is_eos.any(axis=1)
    count = jnp.where(hit_eos, jnp.argmax(is_eos, axis=1) + 1, count)
  count = jnp.minimum(count, state.max_new - state.num_out)
  count = jnp.where(state.done, 0, count)
  finished = hit_eos | (state.num_out + count >= state.max_new)
  return emitted, count, finished


@functools.partial(jax.jit, static_argnames="plan", donate_argnames="state")
def step(
  params: Params, state: TargetState, speculation: Speculation, *, plan: TargetPlan
) -> tuple[TargetState, Report]:
  """Verify one speculation and advance every active sequence. `state` is donated.

  The first column of `speculation.tokens` is replaced by the target's own pending token, so the
  target never depends on the draft for what it has already committed.
  """
  inputs = speculation.tokens.at[:, 0].set(state.last)  # i32[B, lookahead + 1]
  logits, cache = forward(
    params, inputs, state.cache, config=plan.config, attention_impl=plan.attention_impl
  )
  key, key_verify = jax.random.split(state.key)
  accepted, bonus = verify(
    key_verify,
    logits,
    inputs[:, 1:],
    speculation.probs,
    speculation.point_mass,
    state.warp,
    greedy=plan.greedy,
  )
  emitted, count, finished = _emit(state, inputs[:, 1:], accepted, bonus, plan.eos_ids)
  active = ~state.done
  B = active.shape[0]
  committed = jnp.where(active, accepted + 1, 0)
  hist = state.accept_hist.at[jnp.arange(B), speculation.hit.astype(jnp.int32), accepted].add(
    active.astype(jnp.int32)
  )
  done = state.done | (active & finished)
  new_state = dataclasses.replace(
    state,
    cache=cache.with_lengths(cache.lengths + committed),
    last=jnp.where(active, bonus, state.last),
    num_out=state.num_out + count,
    done=done,
    key=key,
    accept_hist=hist,
  )
  report = Report(
    tokens=emitted,
    count=count,
    done=done,
    hit=speculation.hit & active,
    drafted=jnp.any(active & ~speculation.hit),
    outcome=Outcome(accepted=accepted, bonus=bonus, committed=committed, done=done),
  )
  return new_state, report
