"""GET /metrics: Prometheus text of the server's requests and the session's rounds.

Per-request latencies are histograms the server observes as requests end; the session's own
counts (`SessionStats`) are read when Prometheus scrapes, by a collector, so the session's
thread never does more than count.
"""

from __future__ import annotations

from collections.abc import Sized

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ssd_jax.runtime.metrics import HIT
from ssd_jax.runtime.requests import Handle

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
  """The registry of one server: request histograms and counters, and the session collector."""

  def __init__(self, session, compiles: Sized = ()):
    self.registry = CollectorRegistry()
    r = self.registry
    self.ttft = Histogram(
      "ssd_jax_time_to_first_token_seconds",
      "submission to first token",
      buckets=_LATENCY,
      registry=r,
    )
    self.tpot = Histogram(
      "ssd_jax_time_per_output_token_seconds",
      "per output token after the first",
      buckets=_LATENCY,
      registry=r,
    )
    self.e2e = Histogram(
      "ssd_jax_request_seconds", "submission to the end", buckets=_LATENCY, registry=r
    )
    self.requests = Counter(
      "ssd_jax_requests", "requests ended, by finish reason", ["finish_reason"], registry=r
    )
    self.prompt_tokens = Counter("ssd_jax_prompt_tokens", "prompt tokens submitted", registry=r)
    r.register(_SessionCollector(session, compiles))

  def finished(self, handle: Handle, now: float) -> None:
    self.requests.labels(handle.finish_reason or "cancelled").inc()
    self.prompt_tokens.inc(len(handle.request.prompt))
    end = handle.finished or now
    self.e2e.observe(end - handle.submitted)
    if handle.first_token is not None:
      self.ttft.observe(handle.first_token - handle.submitted)
      if len(handle.tokens) > 1:
        self.tpot.observe((end - handle.first_token) / (len(handle.tokens) - 1))


class _SessionCollector:
  def __init__(self, session, compiles: Sized):
    self.session, self.compiles = session, compiles

  def collect(self):
    s = self.session
    stats = s.stats
    running, waiting = len(s.running()), len(s.waiting())
    yield _gauge("ssd_jax_requests_running", "requests in slots", running)
    yield _gauge("ssd_jax_requests_waiting", "requests waiting for a slot", waiting)
    yield _gauge("ssd_jax_slots_free", "free slots", s.buckets[-1] - running)
    yield _gauge("ssd_jax_batch_bucket", "the batch size rounds run at now", s.batch_size)
    yield _counter("ssd_jax_generation_tokens", "tokens generated", stats.generated)
    yield _counter("ssd_jax_rounds", "rounds read", stats.read)
    yield _counter(
      "ssd_jax_backup_rounds", "rounds that drafted (not from the cache)", sum(stats.drafted)
    )
    yield _counter("ssd_jax_batch_resizes", "batch bucket changes", stats.resizes)
    yield _counter(
      "ssd_jax_compiles_since_warmup", "XLA compilations after warm-up (0)", len(self.compiles)
    )
    counts = stats.accept_hist.sum(0)
    rows = int(counts.sum())
    accepted = float((counts * (np.arange(counts.size) + 1)).sum() / rows) if rows else 0.0
    yield _gauge("ssd_jax_accepted_tokens_per_round", "mean tokens per row per round", accepted)
    by_position = GaugeMetricFamily(
      "ssd_jax_acceptance_by_position",
      "fraction of row-rounds that accepted draft token j + 1",
      labels=["position"],
    )
    for j in range(counts.size - 1):
      by_position.add_metric([str(j + 1)], float(counts[j + 1 :].sum() / rows) if rows else 0.0)
    yield by_position
    hits = float(stats.accept_hist[HIT].sum() / rows) if rows else 0.0
    yield _gauge("ssd_jax_cache_hit_rate", "ssd: row-rounds whose speculation was cached", hits)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
  return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
  return CounterMetricFamily(name, doc, value=value)
