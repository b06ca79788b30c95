"""The target's side of a run whose draft runs in a speculator process: `RemoteSpeculator`.

It keeps the `base.Speculator` contract over the channel (`channel.py`): each call's arrays cross
on the pipe, its control message on the connection. The speculator process answers with
`worker.serve`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import numpy as np

from ssd_jax.decode.plan import DraftPlan
from ssd_jax.decode.state import Outcome, Report, Speculation
from ssd_jax.speculator.base import PlanKey, Reshape, SpeculatorStats, join_arrays
from ssd_jax.speculator.channel import (
  OUTCOME_FIELDS,
  SPECULATION_FIELDS,
  ChannelError,
  Connection,
  Pipe,
  TransferPipe,
)
from ssd_jax.speculator.local import empty_speculation
from ssd_jax.timing import Timer

STEP_TIMEOUT = 600.0  # seconds for one answer (the first ones compile)
ANSWER_SPIN = 0.05  # seconds the target polls for a speculation before it sleeps (receive)


class RemoteSpeculator:
  """The draft side of one session, in a speculator process. Speculations arrive on the host
  (shared memory) or on this process's device (transfer); the session places them on the target
  mesh either way.

  In greedy rounds the speculator also sends each expansion's cache (keys, depths, tokens, a few
  ints per branch) as soon as it is computed, during the verification it overlaps; a round whose
  every row hits is then served here without waiting for the speculator, which receives the
  outcome all the same (to advance its cache and expand the served speculation) and answers
  only rounds with a miss. Both ends decide hit or miss by the same test on the same arrays.
  """

  def __init__(self, conn: Connection, pipe: Pipe, plans: dict[PlanKey, DraftPlan], timer: Timer):
    # One session at a time on a speculator: a second one's messages would interleave with the
    # first's on the same channel (seen as "expected the speculator's opened, got 'cache'").
    if conn.session_open:
      raise RuntimeError(
        "this engine's speculator serves one session at a time and one is open: close it "
        "(Session.close) before starting another, or give the second an engine of its own"
      )
    conn.session_open = True
    self.conn, self.pipe, self.plans, self.timer = conn, pipe, plans, timer
    self.served_here = 0  # rounds whose speculation came from a cache, without an answer
    self.greedy_rounds = 0  # rounds that could take that path (sampled ones never do)
    self.greedy, self.batch_size = True, 0

  @property
  def plan(self) -> DraftPlan:
    return self.plans[(self.batch_size, self.greedy)]

  def _call(self, message: dict[str, Any], arrays: dict[str, Any] | None = None, slot: str = ""):
    # Each kind of message has a segment of its own (`slot`): a round served here sends its
    # outcome and waits for no answer, so a reshape's joins may follow before the speculator
    # has copied that outcome out; in one segment they would overwrite it.
    if arrays is not None:
      message["arrays"] = self.pipe.pack(arrays, slot=slot)
    self.conn.send(message)

  def _receive(self, op: str, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    # Due in a few ms (a lookup, or a backup on a miss); the target's core waits for it anyway.
    while (message := self.conn.receive(timeout=STEP_TIMEOUT, spin=ANSWER_SPIN))["op"] in skip:
      pass
    if message.get("op") != op:
      raise ChannelError(f"expected the speculator's {op}, got {message.get('op')!r}")
    return message

  def _speculation(self, op: str = "speculation", skip: tuple[str, ...] = ()) -> Speculation:
    fields = self.pipe.unpack(self._receive(op, skip)["arrays"])
    return Speculation(**{name: fields.get(name) for name in SPECULATION_FIELDS})

  def open(self, batch_size: int, capacity: int) -> Speculation:
    plans = [[b, greedy, plan.to_json()] for (b, greedy), plan in self.plans.items()]
    self._call({"op": "open", "plans": plans, "batch_size": batch_size, "capacity": capacity})
    self._receive("opened")
    self.batch_size, self.greedy = batch_size, True
    return empty_speculation(batch_size, self.plan)

  def reshape(self, change: Reshape) -> Speculation:
    """The speculator applies the change, answers with the pending speculation (joined rows'
    first proposals in it) and expands it again; the expansion's cache it sent before the
    change is stale and skipped."""
    message = {"op": "reshape", "greedy": change.greedy, "bulk": change.bulk}
    if change.index is not None:
      message |= {"index": change.index.tolist(), "free": change.free.tolist()}
      self.batch_size = len(change.index)
    self._call(message, join_arrays(change.joins) if change.joins else None, slot="joins")
    self.greedy = change.greedy
    return self._speculation("reshaped", skip=("cache",))

  def warm_up(self, buckets: tuple[int, ...], prompt_buckets: tuple[int, ...]) -> None:
    """The speculator compiles its between-rounds programs (an idle session: the last
    expansion's cache, which no round needs any more, is skipped)."""
    message = {"op": "warm", "buckets": list(buckets), "prompt_buckets": list(prompt_buckets)}
    self._call(message)
    self._receive("warmed", skip=("cache",))

  def ready(self) -> None:
    """Nothing to wait for: every answer comes once its programs ran."""

  def next(self, report: Report) -> tuple[Speculation, Report]:
    """The speculator expands each speculation right after sending it, so only the outcome is
    left to send: the round's report (which carries it) is read to the host now, the round's
    one host read, and returned so the session does not read it again."""
    report = report.on_host()
    outcome = report.outcome
    # The cache of the speculation just verified (greedy), copied out before the speculator
    # may write the next one: it writes that only after this outcome.
    greedy = self.plan.greedy
    self.greedy_rounds += greedy
    cache = _on_host(self.pipe.unpack(self._receive("cache")["arrays"])) if greedy else None
    arrays = {name: getattr(outcome, name) for name in OUTCOME_FIELDS}
    self._call({"op": "next"}, arrays, slot="outcome")
    speculation = None if cache is None else served_from(cache, outcome)
    if speculation is None:
      speculation = self._speculation()
    else:
      speculation = self._as_answered(speculation)
      self.served_here += 1
    self.timer.when_ready("draft", "lookup_done", speculation)
    return speculation, report

  def _as_answered(self, speculation: Speculation) -> Speculation:
    """A speculation served here, in the form the pipe delivers the speculator's answers in
    (host arrays from shared memory, arrays on this process's device from a transfer): the
    target's program then sees one kind of argument either way and is compiled once, where a
    served round after a warm-up that had none compiled it again inside a timed run."""
    if isinstance(self.pipe, TransferPipe):
      return jax.device_put(speculation, self.pipe.device)
    return speculation

  def close(self) -> SpeculatorStats:
    """End the session; the speculator's XLA compilations during it (None if it cannot say)."""
    served = self.served_here if self.greedy_rounds else None  # None: no round could
    try:
      with contextlib.suppress(ChannelError):
        self._call({"op": "stop"})
        while (message := self.conn.receive(timeout=STEP_TIMEOUT))["op"] != "stopped":
          pass  # the last expansion's cache, which no round needs any more
        return SpeculatorStats(compiles=message["compiles"], served_by_target=served)
      return SpeculatorStats(served_by_target=served)
    finally:
      self.conn.session_open = False


def _on_host(arrays: dict[str, Any]) -> dict[str, np.ndarray]:
  """Host arrays as they are (shared memory), device ones read (transfer)."""
  return {k: v if isinstance(v, np.ndarray) else jax.device_get(v) for k, v in arrays.items()}


def served_from(cache: dict[str, np.ndarray], outcome: Outcome) -> Speculation | None:
  """The next speculation from a greedy speculation cache when every row's outcome hits it (the
  speculator's `speculate.find` and `lookup`, on host arrays), else None."""
  accepted, bonus = np.asarray(outcome.accepted), np.asarray(outcome.bonus)
  match = (cache["depth"] == accepted[:, None]) & (cache["keys"] == bonus[:, None]) & cache["valid"]
  if not match.any(axis=1).all():
    return None
  rows = np.arange(match.shape[0])
  tokens = np.concatenate([bonus[:, None], cache["tokens"][rows, match.argmax(axis=1)]], axis=1)
  return Speculation(
    tokens=tokens.astype(np.int32),
    probs=None,
    point_mass=np.zeros(rows.size, bool),
    hit=np.ones(rows.size, bool),
  )
