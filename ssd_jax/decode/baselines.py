"""The two baselines SSD is measured against, as host loops over jitted round programs.

ar  one target step per token (verification with lookahead 0: the bonus is sampled from p).
sd  synchronous speculative decoding: each round the draft proposes `lookahead` tokens in one
    program, then the target verifies them in one program; the draft idles while the target
    verifies and vice versa.
"""

from __future__ import annotations

import jax.numpy as jnp

from ssd_jax.decode import draft as draft_lib
from ssd_jax.decode import target as target_lib
from ssd_jax.decode.state import DraftState, Speculation, TargetState


def run_ar(run, tstate: TargetState, dstate: DraftState | None):
  """Autoregressive decoding. Returns (final target state, host rounds, extra metrics)."""
  del dstate
  B = run.batch_size
  no_draft = run.to_target(
    Speculation(
      tokens=jnp.zeros((B, 1), jnp.int32),
      probs=None,
      point_mass=jnp.zeros((B,), bool),
      hit=jnp.zeros((B,), bool),
    )
  )
  state = tstate

  def dispatch():
    nonlocal state
    if run.timer:
      run.timer.mark("dispatch")
    state, _, report = target_lib.step(
      run.engine.target_params, state, no_draft, **run.target_kwargs
    )
    if run.timer:
      run.timer.when_ready("target", "verify_done", report)
    return report

  from ssd_jax.decode.engine import drive  # noqa: PLC0415 (engine imports this module)

  rounds = drive(run, dispatch)
  return state, rounds, {}


def run_sd(run, tstate: TargetState, dstate: DraftState):
  """Synchronous speculative decoding."""
  engine, spec = run.engine, run.spec
  draft_kwargs = dict(
    config=engine.draft.config,
    lookahead=spec.lookahead,
    sampling=run.sampling,
    fan_out=spec.fan_out or None,
    saguaro_c=spec.saguaro_c,
    attention_impl=engine.attention_impl,
  )
  state, dstate, outcome = tstate, dstate, None
  last = run.to_draft(tstate.last)

  def dispatch():
    nonlocal state, dstate, outcome, last
    if run.timer:
      run.timer.mark("dispatch")
    dstate, proposal = draft_lib.propose(engine.draft_params, dstate, outcome, last, **draft_kwargs)
    if run.timer:
      run.timer.when_ready("draft", "draft_done", proposal)
    state, outcome_t, report = target_lib.step(
      engine.target_params, state, run.to_target(proposal), **run.target_kwargs
    )
    if run.timer:
      run.timer.when_ready("target", "verify_done", report)
    outcome = run.to_draft(outcome_t)
    last = outcome.bonus
    return report

  from ssd_jax.decode.engine import drive  # noqa: PLC0415

  rounds = drive(run, dispatch)
  return state, rounds, {}
