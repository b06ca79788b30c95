"""Jitted programs of the target (verifier), run on the target mesh.

  step    one round: forward [pending, draft tokens], verify, commit lengths, update per-row
          budgets and done flags; report the emitted tokens and the outcome to the host.
Autoregressive decoding is `step` with lookahead 0 (no draft tokens: the bonus is sampled from p).
It is compiled for a `TargetPlan` (its only static argument) and a batch size; requests enter
and leave its rows between rounds (`slots.py`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from ssd_jax.decode.plan import TargetPlan
from ssd_jax.decode.sampling import VERIFY, row_keys
from ssd_jax.decode.state import Outcome, Report, Speculation, TargetState
from ssd_jax.decode.verify import verify
from ssd_jax.models.transformer import Params, forward


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
    is_eos &= ~state.ignore_eos[:, None]
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
  accepted, bonus = verify(
    row_keys(state.seed, state.cache.lengths, VERIFY),
    logits,
    inputs[:, 1:],
    speculation.probs,
    speculation.point_mass,
    state.warp,
    greedy=plan.greedy,
  )
  emitted, count, finished = _emit(state, inputs[:, 1:], accepted, bonus, plan.eos_ids)
  active = ~state.done
  committed = jnp.where(active, accepted + 1, 0)
  done = state.done | (active & finished)
  new_state = dataclasses.replace(
    state,
    cache=cache.with_lengths(cache.lengths + committed),
    last=jnp.where(active, bonus, state.last),
    num_out=state.num_out + count,
    done=done,
  )
  report = Report.pack(
    tokens=emitted,
    count=count,
    hit=speculation.hit & active,
    drafted=jnp.any(active & ~speculation.hit),
    outcome=Outcome.of(accepted=accepted, bonus=bonus, committed=committed, done=done),
  )
  return new_state, report
