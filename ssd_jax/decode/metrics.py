"""What a generation run measured: throughput, acceptance, cache hits, per-round timing."""

from __future__ import annotations

import dataclasses
import threading
import time
from queue import Queue
from typing import Any

import jax
import numpy as np

HIT, MISS = 1, 0  # second index of TargetState.accept_hist


@dataclasses.dataclass(frozen=True, kw_only=True)
class Metrics:
  """Per-run measurements. Decode time excludes prefill and compilation (warm programs).

  Attributes:
    mode: "ar", "sd" or "ssd".
    lookahead: draft tokens per round (0 for ar).
    generated_tokens: tokens emitted over all sequences.
    decode_seconds: wall time from the first round's dispatch to the last token on the host.
    prefill_seconds: wall time of prefill (target and draft).
    loop_rounds: rounds the host dispatched.
    accept_hist: i64[2, lookahead + 1], rounds of active sequences by (speculation was a cache
      hit, accepted draft tokens).
    round_times: per-round timestamps in seconds since the first dispatch (see RoundTimer),
      empty unless tracing was on.
  """

  mode: str
  lookahead: int
  num_sequences: int
  generated_tokens: int
  decode_seconds: float
  prefill_seconds: float
  loop_rounds: int
  accept_hist: np.ndarray
  round_times: dict[str, list[float]] = dataclasses.field(default_factory=dict)
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def tokens_per_second(self) -> float:
    return self.generated_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

  @property
  def rounds(self) -> int:
    """Sequence-rounds: rounds summed over sequences while active."""
    return int(self.accept_hist.sum())

  def _mean_tokens(self, hist: np.ndarray) -> float:
    n = hist.sum()
    return float((hist * (np.arange(hist.shape[-1]) + 1)).sum() / n) if n else float("nan")

  @property
  def mean_accepted(self) -> float:
    """Mean tokens emitted per round, counting the bonus token (1.0 for ar)."""
    return self._mean_tokens(self.accept_hist.sum(0))

  @property
  def mean_accepted_hit(self) -> float:
    return self._mean_tokens(self.accept_hist[HIT])

  @property
  def mean_accepted_miss(self) -> float:
    return self._mean_tokens(self.accept_hist[MISS])

  @property
  def hit_rate(self) -> float:
    """Fraction of sequence-rounds whose speculation came from the cache (ssd only)."""
    n = self.accept_hist.sum()
    return float(self.accept_hist[HIT].sum() / n) if n else float("nan")

  @property
  def acceptance_per_position(self) -> list[float]:
    """P(draft token j is accepted | rounds), j = 1..lookahead."""
    counts = self.accept_hist.sum(0)
    n = counts.sum()
    if not n or self.lookahead == 0:
      return []
    return [float(counts[j:].sum() / n) for j in range(1, self.lookahead + 1)]

  def median_ms(self, start: str, end: str) -> float:
    """Median over rounds of round_times[end] - round_times[start], in milliseconds."""
    a, b = self.round_times.get(start, []), self.round_times.get(end, [])
    n = min(len(a), len(b))
    return float(np.median(np.subtract(b[:n], a[:n])) * 1e3) if n else float("nan")

  def summary(self) -> dict[str, Any]:
    """JSON-ready fields (DESIGN.md §5)."""
    out = {
      "mode": self.mode,
      "lookahead": self.lookahead,
      "num_sequences": self.num_sequences,
      "generated_tokens": self.generated_tokens,
      "decode_seconds": self.decode_seconds,
      "prefill_seconds": self.prefill_seconds,
      "tokens_per_second": self.tokens_per_second,
      "rounds": self.rounds,
      "loop_rounds": self.loop_rounds,
      "mean_accepted_tokens_per_round": self.mean_accepted,
      "acceptance_per_position": self.acceptance_per_position,
      "accepted_histogram": self.accept_hist.sum(0).tolist(),
    }
    if self.mode == "ssd":
      out |= {
        "cache_hit_rate": self.hit_rate,
        "mean_accepted_on_hit": self.mean_accepted_hit,
        "mean_accepted_on_miss": self.mean_accepted_miss,
      }
    for name in ("verify", "draft", "lookup"):
      if f"{name}_done" in self.round_times:
        out[f"{name}_ms_median"] = self.median_ms("dispatch", f"{name}_done")
    out |= self.extra
    return out


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
