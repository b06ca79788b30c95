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
from ssd_jax.decode.sampling import Warp
from ssd_jax.decode.state import Outcome, Report, Speculation
from ssd_jax.speculator.base import SpeculatorStats
from ssd_jax.speculator.channel import (
  OUTCOME_FIELDS,
  SPECULATION_FIELDS,
  ChannelError,
  Connection,
  Pipe,
  TransferPipe,
)
from ssd_jax.timing import Timer

STEP_TIMEOUT = 600.0  # seconds for one answer (the first ones compile)
ANSWER_SPIN = 0.05  # seconds the target polls for a speculation before it sleeps (receive)


class RemoteSpeculator:
  """The draft side of one run, in a speculator process. Speculations arrive on the host (shared
  memory) or on this process's device (transfer); the loop places them on the target mesh
  either way.

  In greedy runs the speculator also sends each expansion's cache (keys, depths, tokens, a few
  ints per branch) as soon as it is computed, during the verification it overlaps; a round whose
  every row hits is then served here without waiting for the speculator, which receives the
  outcome all the same (to advance its cache and expand the served speculation) and answers
  only rounds with a miss. Both ends decide hit or miss by the same test on the same arrays.
  """

  def __init__(self, conn: Connection, pipe: Pipe, plan: DraftPlan, timer: Timer):
    self.conn, self.pipe, self.plan, self.timer = conn, pipe, plan, timer
    self.served_here = 0  # rounds whose speculation came from a cache, without an answer

  def _call(self, message: dict[str, Any], arrays: dict[str, Any] | None = None):
    if arrays is not None:
      message["arrays"] = self.pipe.pack(arrays)
    self.conn.send(message)

  def _receive(self, op: str) -> dict[str, np.ndarray]:
    # Due in a few ms (a lookup, or a backup on a miss); the target's core waits for it anyway.
    message = self.conn.receive(timeout=STEP_TIMEOUT, spin=ANSWER_SPIN)
    if message.get("op") != op:
      raise ChannelError(f"expected the speculator's {op}, got {message.get('op')!r}")
    return self.pipe.unpack(message["arrays"])

  def _speculation(self) -> Speculation:
    fields = self._receive("speculation")
    return Speculation(**{name: fields.get(name) for name in SPECULATION_FIELDS})

  def start(self, tokens, lengths, warp: Warp, key, capacity: int) -> None:
    arrays = {
      "tokens": tokens,
      "lengths": lengths,
      "temperature": warp.temperature,
      "top_k": warp.top_k,
      "top_p": warp.top_p,
      "key": np.asarray(jax.random.key_data(key)),
    }
    self._call({"op": "start", "plan": self.plan.to_json(), "capacity": capacity}, arrays)

  def ready(self) -> None:
    """Wait for the speculator's prefill (its first start compiles there)."""
    self.conn.receive(timeout=STEP_TIMEOUT)

  def first(self) -> Speculation:
    self._call({"op": "first"})
    return self._speculation()

  def next(self, report: Report) -> tuple[Speculation, Report]:
    """The speculator expands each speculation right after sending it, so only the outcome is
    left to send: the round's report (which carries it) is read to the host now, the round's
    one host read, and returned so the loop does not read it again."""
    report = jax.device_get(report)
    outcome = report.outcome
    # The cache of the speculation just verified (greedy), copied out before the speculator
    # may write the next one: it writes that only after this outcome.
    cache = _on_host(self._receive("cache")) if self.plan.greedy else None
    self._call({"op": "next"}, {name: getattr(outcome, name) for name in OUTCOME_FIELDS})
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
    """End the run; the speculator's XLA compilations during it (None if it cannot say)."""
    served = self.served_here if self.plan.greedy else None
    with contextlib.suppress(ChannelError):
      self._call({"op": "stop"})
      while (message := self.conn.receive(timeout=STEP_TIMEOUT))["op"] != "stopped":
        pass  # the last expansion's cache, which no round needs any more
      return SpeculatorStats(compiles=message["compiles"], served_by_target=served)
    return SpeculatorStats(served_by_target=served)


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
