"""What a session counted, round by round, from the reports it read (host arrays only)."""

from __future__ import annotations

import dataclasses

import numpy as np

from ssd_jax.decode.state import Report
from ssd_jax.runtime.metrics import HIT


@dataclasses.dataclass
class SessionStats:
  """Counts since the session started.

  Attributes:
    accept_hist: i64[2, lookahead + 1], rows' rounds by (speculation was a cache hit, accepted).
    accepted_by_position: i64[lookahead], rounds that accepted draft token j + 1.
    generated: tokens emitted (before the host cut any at a stop string).
    dispatched: rounds dispatched; read: rounds read; drafted: rounds read in which some active
      row's speculation was not from the cache.
    joined, finished_requests, resizes: requests that entered a slot, ended, batch resizes.
    occupancy: i64[max batch + 1], rounds read by how many rows were active.
  """

  lookahead: int
  accept_hist: np.ndarray = dataclasses.field(init=False)
  generated: int = 0
  dispatched: int = 0
  read: int = 0
  drafted: list[bool] = dataclasses.field(default_factory=list)
  joined: int = 0
  finished_requests: int = 0
  resizes: int = 0
  occupancy: dict[int, int] = dataclasses.field(default_factory=dict)
  hits_by_occupancy: dict[int, list[int]] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    self.accept_hist = np.zeros((2, self.lookahead + 1), np.int64)

  def add_round(self, r: Report) -> None:
    active = np.asarray(r.count) > 0
    n = int(active.sum())
    if not n:
      return
    hit = np.asarray(r.hit).astype(int)
    accepted = np.asarray(r.outcome.accepted)
    np.add.at(self.accept_hist, (hit[active], accepted[active]), 1)
    self.generated += int(np.asarray(r.count).sum())
    self.read += 1
    self.drafted.append(bool(r.drafted))
    self.occupancy[n] = self.occupancy.get(n, 0) + 1
    rows = self.hits_by_occupancy.setdefault(n, [0, 0])
    rows[0] += int(hit[active].sum())
    rows[1] += n

  def finished(self, handle) -> None:
    del handle
    self.finished_requests += 1

  @property
  def hit_rate(self) -> float:
    n = self.accept_hist.sum()
    return float(self.accept_hist[HIT].sum() / n) if n else float("nan")

  @property
  def mean_accepted(self) -> float:
    counts = self.accept_hist.sum(0)
    n = counts.sum()
    return float((counts * (np.arange(counts.size) + 1)).sum() / n) if n else float("nan")
