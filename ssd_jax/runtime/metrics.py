"""What a generation run measured: throughput, acceptance, cache hits, per-round timing."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

HIT, MISS = 1, 0  # second index of TargetState.accept_hist


@dataclasses.dataclass(frozen=True, kw_only=True)
class Metrics:
  """Per-run measurements. Decode time excludes prefill and compilation (warm programs).

  Attributes:
    mode: "ar", "sd" or "ssd".
    lookahead: draft tokens per round (0 for ar).
    num_sequences: rows in the batch; active_sequences: rows with a budget > 0.
    generated_tokens: tokens emitted over all sequences.
    decode_seconds: wall time from the first round's dispatch to the last token on the host.
    prefill_seconds: wall time of prefill (target and draft).
    loop_rounds: rounds the host dispatched.
    accept_hist: i64[2, lookahead + 1], rounds of active sequences by (speculation was a cache
      hit, accepted draft tokens).
    round_times: per-round timestamps in seconds since the first dispatch (see RoundTimer),
      empty unless tracing was on.
    round_drafted: per round read by the host, whether some active sequence's speculation was
      not served from the cache (in ssd: the first proposal, then the rounds that needed a
      backup; in sd: every round).
    backup_rounds: ssd: rounds whose speculation needed a backup for some active sequence, i.e.
      the rounds in which the draft's backup ran (the first round's is the first proposal).
  """

  mode: str
  lookahead: int
  num_sequences: int
  active_sequences: int
  generated_tokens: int
  decode_seconds: float
  prefill_seconds: float
  loop_rounds: int
  accept_hist: np.ndarray
  round_times: dict[str, list[float]] = dataclasses.field(default_factory=dict)
  round_drafted: list[bool] = dataclasses.field(default_factory=list)
  backup_rounds: int = 0
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
  def later_hit_rate(self) -> float:
    """Hit rate over rounds after each sequence's first, which always misses (the cache
    starts empty): the steady-state rate the analytical model uses."""
    n = self.accept_hist.sum() - self.active_sequences
    return float(self.accept_hist[HIT].sum() / n) if n > 0 else float("nan")

  @property
  def acceptance_per_position(self) -> list[float]:
    """P(draft token j is accepted | rounds), j = 1..lookahead."""
    counts = self.accept_hist.sum(0)
    n = counts.sum()
    if not n or self.lookahead == 0:
      return []
    return [float(counts[j:].sum() / n) for j in range(1, self.lookahead + 1)]

  def stage_ms(self) -> dict[str, float]:
    """Median per-round duration of each stage in milliseconds (see `stage_samples`)."""
    return median_ms(self.stage_samples())

  def stage_samples(self) -> dict[str, np.ndarray]:
    """Per-round duration (seconds) of each stage, from the completion timestamps.

    A stage can start only when its inputs exist, so its duration in round r is its completion
    time minus the latest of: the round's dispatch and the completion of what it waits for
    (ssd: verify r waits for lookup r-1, which produced its speculation; expand r, dispatched
    as soon as lookup r-1 was, waits for nothing else; lookup r for verify r and expand r. sd:
    the draft waits for verify r-1, verify for the draft; ar: verify r-1). With a speculator
    process, ssd reports `next_ms` instead: from verify r's completion to speculation r + 1's
    arrival (the exchange, the lookup and any backup). Completions are
    observed by waiter threads, which wake up late by up to a scheduler tick on a busy host; a
    stage observed to end before what it waited for took at most that long and counts as 0.
    """
    t = {k: np.asarray(v) for k, v in self.round_times.items()}
    if "dispatch" not in t or "verify_done" not in t:
      return {}
    n = min(len(v) for v in t.values())
    t = {k: v[:n] for k, v in t.items()}
    prev = lambda x, first: np.concatenate([[first], x[:-1]])  # completion of round r - 1
    start = lambda *deps: np.maximum.reduce([t["dispatch"], *deps])
    out = {}
    if self.mode == "ssd":
      out["verify_ms"] = t["verify_done"] - start(prev(t["lookup_done"], -np.inf))
      out["round_ms"] = np.diff(t["lookup_done"], prepend=0.0)[1:]
      if "expand_done" not in t:
        # A speculator process: its expansion is not observable here; what the target waits
        # for after verifying is the exchange plus the speculator's lookup (and backup).
        out["next_ms"] = t["lookup_done"] - t["verify_done"]
        return {k: np.maximum(v, 0.0) for k, v in out.items()}
      # Expansion 0 starts with the loop (time 0).
      out["expand_ms"] = t["expand_done"] - prev(t["lookup_done"], 0.0)
      lookup = t["lookup_done"] - np.maximum(t["verify_done"], t["expand_done"])
      # Lookup r serves round r + 1: on a miss there its time includes the backup.
      missed = np.asarray(self.round_drafted[1 : n + 1], bool)
      out["lookup_ms"] = lookup[: len(missed)][~missed]
      out["backup_ms"] = lookup[: len(missed)][missed]
    elif self.mode == "sd":
      out["draft_ms"] = t["draft_done"] - start(prev(t["verify_done"], -np.inf))
      out["verify_ms"] = t["verify_done"] - t["draft_done"]
      out["round_ms"] = np.diff(t["verify_done"])
    else:
      out["verify_ms"] = t["verify_done"] - start(prev(t["verify_done"], -np.inf))
      out["round_ms"] = np.diff(t["verify_done"])
    return {k: np.maximum(v, 0.0) for k, v in out.items()}

  def summary(self) -> dict[str, Any]:
    """JSON-ready fields: what `python -m ssd_jax.run --json` writes per mode."""
    out = {
      "mode": self.mode,
      "lookahead": self.lookahead,
      "num_sequences": self.num_sequences,
      "active_sequences": self.active_sequences,
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
        "cache_hit_rate_after_first_round": self.later_hit_rate,
        "mean_accepted_on_hit": self.mean_accepted_hit,
        "mean_accepted_on_miss": self.mean_accepted_miss,
        "backup_rounds": self.backup_rounds,
      }
    out |= {f"{k}_median": v for k, v in self.stage_ms().items()}
    out |= self.extra
    return out


def median_ms(samples: dict[str, np.ndarray]) -> dict[str, float]:
  return {k: float(np.median(v) * 1e3) if len(v) else float("nan") for k, v in samples.items()}
