"""The asyncio side of a `Session` that runs in its own thread.

`Runner.submit` queues one HTTP call's requests (a completion may carry several prompts) and
`Runner.events` yields their events on the event loop: the session's thread hands each one over
with `loop.call_soon_threadsafe` into the call's `asyncio.Queue`. Leaving the iteration early (a
client that disconnected: the response's task is cancelled) cancels the call's requests, whose
slots are then free at the next boundary. `abort` ends every open call at once with an error
(the server is shutting down).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Sequence

from ssd_jax.runtime.requests import Event, Handle, Request
from ssd_jax.runtime.session import Session
from ssd_jax.serve.metrics import ServerMetrics


@dataclasses.dataclass(frozen=True)
class Call:
  """One HTTP call's requests and the queue of their (index, event) pairs."""

  handles: list[Handle]
  queue: asyncio.Queue[tuple[int, Event]]


class Runner:
  """The session (its thread started) as the routes see it.

  Args:
    session: the continuous batch.
    metrics: observes each request as it ends.
    speculator_gone: why the speculator cannot serve (None while it can).
  """

  def __init__(
    self,
    session: Session,
    metrics: ServerMetrics,
    speculator_gone: Callable[[], str | None] = lambda: None,
  ):
    self.session, self.metrics = session, metrics
    self._speculator_gone = speculator_gone
    self._open: dict[int, Call] = {}
    self.closing: str | None = None  # why new requests are refused (shutting down)

  def dead(self) -> str | None:
    """Why the engine cannot serve (None while it can)."""
    if self.closing is not None:
      return self.closing
    if self.session.failure is not None:
      return f"the engine stopped: {self.session.failure}"
    if not self.session.alive:
      return "the engine's thread has stopped"
    return self._speculator_gone()

  def submit(self, requests: Sequence[Request]) -> Call:
    """Queue `requests` (all or none: QueueFullError when there is no room; RuntimeError when
    the engine cannot serve; ValueError for a request it cannot serve)."""
    if (why := self.dead()) is not None:
      raise RuntimeError(why)
    loop = asyncio.get_running_loop()
    call = Call([], asyncio.Queue())

    def on_event(index: int, event: Event) -> None:  # the session's thread: must never raise
      with contextlib.suppress(RuntimeError):  # the loop has closed: nobody listens any more
        loop.call_soon_threadsafe(call.queue.put_nowait, (index, event))

    try:
      for i, request in enumerate(requests):
        call.handles.append(self.session.submit(request, lambda e, i=i: on_event(i, e)))
    except BaseException:
      for handle in call.handles:
        self.session.cancel(handle)
      raise
    self._open[id(call)] = call
    return call

  async def events(self, call: Call) -> AsyncIterator[tuple[int, Event]]:
    """(index, event) of the call's requests until each has ended; the requests still running
    are cancelled if the caller stops early."""
    left = set(range(len(call.handles)))
    try:
      while left:
        i, event = await call.queue.get()
        if i not in left:
          continue
        yield i, event
        if event.finish_reason is not None:
          left.discard(i)
    finally:
      self._open.pop(id(call), None)
      now = time.perf_counter()
      for handle in call.handles:
        if not handle.done:
          self.session.cancel(handle)
        self.metrics.finished(handle, now)

  def abort(self, why: str) -> None:
    """End every open call with `why` (on the loop's thread), and refuse new ones."""
    self.closing = why
    for call in list(self._open.values()):
      for i, handle in enumerate(call.handles):
        call.queue.put_nowait((i, Event(handle.id, [], "error", error=why)))
        self.session.cancel(handle)
