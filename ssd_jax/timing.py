"""Timing device work without blocking the controller, and counting compilations.

`RoundTimer` records when each round's programs finish (one waiter thread per device stream);
`NullTimer`, the timer of untraced runs, does nothing, so the loops never test for tracing. Both
keep the `Timer` contract. `count_compiles` counts the XLA programs compiled inside a block: a
warm run must compile none.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from queue import Queue
from typing import Any, Protocol

import jax


class Timer(Protocol):
  """Records when each round's device work finishes; a no-op unless a run is traced."""

  def start(self) -> None:
    """Make now time 0 (the first round's dispatch)."""
    ...

  def mark(self, name: str) -> None:
    """Record `name` now (a host event, such as a dispatch)."""
    ...

  def when_ready(self, stream: str, name: str, value: Any) -> None:
    """Record `name` once every array in `value` is computed (on `stream`'s device)."""
    ...

  def close(self) -> dict[str, list[float]]:
    """Stop watching; every name's timestamps, in seconds since `start`."""
    ...


class NullTimer:
  """The timer of untraced runs: every call does nothing (the loops never test for tracing)."""

  t0 = 0.0

  def start(self) -> None:
    pass

  def mark(self, name: str) -> None:
    pass

  def when_ready(self, stream: str, name: str, value: Any) -> None:
    pass

  def close(self) -> dict[str, list[float]]:
    return {}


class RoundTimer:
  """Timestamps when device work of each round finishes, without blocking the controller.

  One waiter thread per stream (the target's and the draft's devices each run their programs in
  dispatch order) blocks on the arrays it is handed and records completion times. Only used
  when tracing; the untraced loop has no extra threads.
  """

  def __init__(self):
    self.t0 = time.perf_counter()
    self.times: dict[str, list[float]] = {}
    self._queues: dict[str, Queue] = {}
    self._threads: list[threading.Thread] = []
    self._lock = threading.Lock()

  def start(self) -> None:
    """Make now time 0 (the first round's dispatch)."""
    self.t0 = time.perf_counter()

  def _record(self, name: str, t: float) -> None:
    with self._lock:
      self.times.setdefault(name, []).append(t - self.t0)

  def mark(self, name: str) -> None:
    self._record(name, time.perf_counter())

  def when_ready(self, stream: str, name: str, value: Any) -> None:
    """Record `name` when every array in `value` is computed (watched on `stream`'s thread)."""
    if stream not in self._queues:
      queue: Queue = Queue()
      thread = threading.Thread(target=self._wait, args=(queue,), daemon=True)
      thread.start()
      self._queues[stream], self._threads = queue, [*self._threads, thread]
    self._queues[stream].put((name, value))

  def _wait(self, queue: Queue) -> None:
    while (item := queue.get()) is not None:
      name, value = item
      jax.block_until_ready(value)
      self._record(name, time.perf_counter())

  def close(self) -> dict[str, list[float]]:
    for queue in self._queues.values():
      queue.put(None)
    for thread in self._threads:
      thread.join()
    return dict(self.times)


_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


@contextlib.contextmanager
def count_compiles() -> Iterator[list[str]]:
  """Collects one entry per program compiled inside the block (any thread): an XLA backend
  compilation, or a load from JAX's persistent compilation cache where one is enabled (the
  program was lowered again, which a warm run must not do either)."""
  seen: list[str] = []

  def on_duration(event: str, duration: float, **kwargs) -> None:
    if event == _COMPILE_EVENT:
      seen.append(event)

  def on_event(event: str, **kwargs) -> None:
    if event == _CACHE_HIT_EVENT:
      seen.append(event)

  jax.monitoring.register_event_duration_secs_listener(on_duration)
  jax.monitoring.register_event_listener(on_event)
  try:
    yield seen
  finally:
    jax.monitoring.unregister_event_duration_listener(on_duration)
    jax.monitoring.unregister_event_listener(on_event)
