"""What a program submits to a `Session` and what it gets back: a `Request`, and a `Handle` that
streams its tokens as rounds produce them.

A handle is written by the session's thread and read by any other: `events()` yields each
round's new tokens (a round of speculative decoding may carry several), `result()` waits for the
end, `on_event` (given to `Session.submit`) is called from the session's thread for each event
(an asyncio server hands them to its loop with `call_soon_threadsafe`).
"""

from __future__ import annotations

import dataclasses
import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import numpy as np

from ssd_jax.decode.sampling import Sampling

FinishReason = Literal["stop", "length", "cancelled", "error"]
_ids = itertools.count(1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Request:
  """One generation request.

  Attributes:
    prompt: token ids (the target's tokenizer).
    sampling: temperature, top-k, top-p (greedy by default).
    max_new_tokens: at most this many tokens.
    stop_token_ids: tokens that end the request beside the model's EOS (included in its
      output, as EOS is).
    stop: strings that end the request (not included in its output); needs the target's
      tokenizer.
    ignore_eos: keep generating past EOS (fixed-length benchmarks).
    seed: this request's PRNG seed: with it, its tokens are the same whatever else runs beside
      it; None draws one.
  """

  prompt: Sequence[int]
  sampling: Sampling = dataclasses.field(default_factory=Sampling)
  max_new_tokens: int = 64
  stop_token_ids: tuple[int, ...] = ()
  stop: tuple[str, ...] = ()
  ignore_eos: bool = False
  seed: int | None = None

  def __post_init__(self):
    m = self.max_new_tokens
    if isinstance(m, bool) or not isinstance(m, int | np.integer) or m < 1:
      raise ValueError(f"max_new_tokens must be an int >= 1, got {m!r}")
    if not isinstance(self.sampling, Sampling):
      raise ValueError(f"sampling must be a Sampling, got {type(self.sampling).__name__}")
    if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
      raise ValueError(f"seed must be an int or None, got {self.seed!r}")
    # The defaults (empty tuples) need nothing: a `generate` call makes 50,000 requests.
    if self.stop_token_ids or not isinstance(self.stop_token_ids, tuple):
      object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
    if self.stop or not isinstance(self.stop, tuple):
      object.__setattr__(self, "stop", tuple(self.stop))
      if any(not isinstance(s, str) or not s for s in self.stop):
        raise ValueError(f"stop must be non-empty strings, got {list(self.stop)!r}")


@dataclasses.dataclass(frozen=True)
class Event:
  """New tokens of one request from one round; `finish_reason` on its last event."""

  request_id: int
  tokens: list[int]
  finish_reason: FinishReason | None = None
  error: str | None = None


class QueueFullError(RuntimeError):
  """The session's wait queue is full: retry later (a server answers 429 or 503)."""


# One condition for every handle's end, rather than a threading.Event each: a `generate` of
# 50,000 rows makes 50,000 handles, and an Event (a Condition and a lock inside) costs ~20 us
# to make. A waiter wakes at any handle's end and checks its own.
_ENDED = threading.Condition()


class Handle:
  """A submitted request: its tokens so far, how it ended, its events as they come."""

  def __init__(self, request: Request, on_event: Callable[[Event], None] | None = None):
    self.id = next(_ids)
    self.request = request
    self.tokens: list[int] = []
    self.finish_reason: FinishReason | None = None
    self.error: str | None = None
    self.submitted = time.perf_counter()
    self.first_token: float | None = None  # perf_counter of the first token's arrival
    self.finished: float | None = None
    self.rounds = 0  # rounds in which it was verified
    self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
    self._ended = False  # set last, once its final event is out
    self._on_event = on_event

  @property
  def done(self) -> bool:
    return self._ended

  def _emit(self, event: Event) -> None:
    """Called by the session's thread only."""
    now = time.perf_counter()
    if event.tokens and self.first_token is None:
      self.first_token = now
    self.tokens.extend(event.tokens)
    if event.finish_reason is not None:
      self.finish_reason, self.error, self.finished = event.finish_reason, event.error, now
    self._events.put(event)
    if self._on_event is not None:
      self._on_event(event)
    if event.finish_reason is not None:
      with _ENDED:
        self._ended = True
        _ENDED.notify_all()

  def events(self, timeout: float | None = None) -> Iterator[Event]:
    """Each event until the last (blocking; `timeout` seconds at most for each)."""
    while True:
      event = self._events.get(timeout=timeout)
      yield event
      if event.finish_reason is not None:
        return

  def result(self, timeout: float | None = None) -> list[int]:
    """All its tokens, once it has ended. Raises TimeoutError, or RuntimeError if the session
    failed it."""
    with _ENDED:
      ended = _ENDED.wait_for(lambda: self._ended, timeout)
    if not ended:
      raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
    if self.finish_reason == "error":
      raise RuntimeError(f"request {self.id} failed: {self.error}")
    return list(self.tokens)
