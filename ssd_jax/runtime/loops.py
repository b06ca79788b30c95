"""The host loops of ar, sd and ssd: each round's programs dispatched without waiting.

One controller thread; JAX's asynchronous dispatch runs the target's and the draft's programs
concurrently. `drive` dispatches a round, then reads the *previous* round's `Report` (emitted
tokens, done flags): the one host sync per round, lagging a round so the devices never wait for
Python.

  ar   step(target, no draft tokens)                     one token per round
  sd   propose (draft) -> step (target)                  the two sides take turns
  ssd  step(speculation_r) on the target while the draft expands speculation_r; then the
       draft's lookup(outcome_r) serves speculation_{r+1} (cache hit, or backup) and expands it:

       target mesh                               draft mesh (the speculator)
       step(spec_r) -> outcome_r, report_r       expand(spec_r) -> cache_r        (concurrent)
             |       outcome_r ---------------->  lookup(cache_r, outcome_r) -> spec_{r+1}
       step(spec_{r+1}) <------------ spec_{r+1}  expand(spec_{r+1}) ...
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from ssd_jax.decode import target as target_lib
from ssd_jax.decode.plan import Plan
from ssd_jax.decode.state import Report, Speculation, TargetState
from ssd_jax.models.transformer import Params
from ssd_jax.speculator import Drafter, Speculator
from ssd_jax.timing import Timer


@dataclasses.dataclass(frozen=True)
class Run:
  """What one generate() call's host loop needs (host-side; not a pytree).

  Attributes:
    plan: the run's static plan.
    target_params: the target's params, on its mesh.
    to_target: places a pytree on the target mesh.
    speculator: the draft side: sd's Drafter, ssd's Speculator (None for ar).
    timer: records round timestamps when tracing (a no-op otherwise).
    on_report: takes each round's host-side report; returns True once every sequence is done.
  """

  plan: Plan
  target_params: Params
  to_target: Callable[[Any], Any]
  speculator: Drafter | Speculator | None
  timer: Timer
  on_report: Callable[[Report], bool]

  def verify(self, state: TargetState, speculation: Speculation) -> tuple[TargetState, Report]:
    """Dispatch the target's round on `speculation` (placed on the target mesh)."""
    state, report = target_lib.step(
      self.target_params, state, self.to_target(speculation), plan=self.plan.target
    )
    self.timer.when_ready("target", "verify_done", report)
    return state, report


def drive(run: Run, dispatch_round: Callable[[], Report]) -> int:
  """Dispatch rounds until every sequence is done, reading each report one round late (a
  report already on the host is not read again). Returns the number of rounds dispatched."""
  pending, rounds = None, 0
  while True:
    run.timer.mark("dispatch")
    report = dispatch_round()
    rounds += 1
    if pending is not None and run.on_report(_on_host(pending)):
      return rounds
    pending = report


def _on_host(report: Report) -> Report:
  return report if isinstance(report.count, np.ndarray) else jax.device_get(report)


def run_ar(run: Run, state: TargetState) -> tuple[TargetState, int]:
  """Autoregressive decoding: verification with no draft tokens (the bonus is drawn from p)."""
  no_draft = run.to_target(Speculation.empty(state.last.shape[0]))

  def dispatch():
    nonlocal state
    state, report = run.verify(state, no_draft)
    return report

  rounds = drive(run, dispatch)  # before reading `state`: the rounds replace it
  return state, rounds


def run_sd(run: Run, state: TargetState) -> tuple[TargetState, int]:
  """Synchronous speculative decoding: the draft idles while the target verifies, and back."""
  outcome = None

  def dispatch():
    nonlocal state, outcome
    speculation = run.speculator.propose(outcome)
    state, report = run.verify(state, speculation)
    outcome = report.outcome
    return report

  rounds = drive(run, dispatch)  # before reading `state`: the rounds replace it
  return state, rounds


def run_ssd(run: Run, state: TargetState) -> tuple[TargetState, int]:
  """Speculative speculative decoding (see the module docstring): each round dispatches the
  verification of the current speculation, then asks the speculator for the next one, which it
  expands meanwhile and serves once the outcome is known."""
  speculator = run.speculator
  speculation = speculator.first()

  def dispatch():
    nonlocal state, speculation
    state, report = run.verify(state, speculation)
    speculation, report = speculator.next(report)
    return report

  rounds = drive(run, dispatch)  # before reading `state`: the rounds replace it
  return state, rounds


LOOPS = {"ar": run_ar, "sd": run_sd, "ssd": run_ssd}
