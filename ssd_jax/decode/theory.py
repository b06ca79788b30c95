"""The paper's analytical model, as plain functions (Kumar, Dao, May 2026, §3).

Times are relative to one target verification. E denotes expected tokens emitted per round
(bonus included); p_hit the probability that a verification outcome is in the speculation cache.
"""

from __future__ import annotations

import math

import numpy as np


def expected_tokens_sd(acceptance: float, lookahead: int) -> float:
  """E_SD = (1 - a^(K+1)) / (1 - a): tokens per round with i.i.d. acceptance a (Leviathan)."""
  if acceptance >= 1.0:
    return float(lookahead + 1)
  return (1.0 - acceptance ** (lookahead + 1)) / (1.0 - acceptance)


def sd_speedup(e_sd: float, t_sd: float) -> float:
  """Sync SD over AR: E_SD / (1 + T_SD), T_SD = drafting time / verify time."""
  return e_sd / (1.0 + t_sd)


def ssd_speedup(
  p_hit: float, e_hit: float, e_miss: float, t_p: float, t_b: float, batch_size: int = 1
) -> float:
  """Theorem 7 (batch 1) and Corollary 16 (batch b): SSD over AR.

  A hit round costs max(1, T_p) (drafting overlaps verification); a round in which any of the
  b sequences misses costs 1 + T_b (verify, then the backup drafts), so the whole batch waits.
  """
  all_hit = p_hit**batch_size
  tokens = p_hit * e_hit + (1.0 - p_hit) * e_miss
  return tokens / (all_hit * max(1.0, t_p) + (1.0 - all_hit) * (1.0 + t_b))


def ssd_over_sd_bounds(p_hit: float, t_sd: float, e_hit: float, e_sd: float) -> tuple[float, float]:
  """Corollary 9: lower and upper bounds of speedup_SSD / speedup_SD.

  (1 + T_SD) / (1 + (1 - p_hit) T_SD) · E_hit/E_SD  <=  ratio  <=  (1 + T_SD) · E_hit/E_SD.
  """
  gain = e_hit / e_sd
  return (1.0 + t_sd) / (1.0 + (1.0 - p_hit) * t_sd) * gain, (1.0 + t_sd) * gain


def geometric_fan_out(
  lookahead: int, budget: float, acceptance: float, exponent: float
) -> np.ndarray:
  """Theorem 12: the optimal (continuous) fan-out per accept depth 0..lookahead.

  With capped-geometric accept lengths P(k) = a^k (1 - a) for k < K and P(K) = a^K, and an
  r-power-law miss rate 1 - p_hit(F) = F^-r (Definition 11), maximizing the hit probability
  under Σ F_k = budget gives F_k ∝ P(k)^(1 / (1 + r)).
  """
  if not 0.0 < acceptance < 1.0:
    raise ValueError(f"acceptance must be in (0, 1), got {acceptance}")
  if exponent <= 0:
    raise ValueError(f"power-law exponent r must be > 0, got {exponent}")
  k = np.arange(lookahead + 1, dtype=np.float64)
  prob = acceptance**k * (1.0 - acceptance)
  prob[-1] = acceptance**lookahead
  weights = prob ** (1.0 / (1.0 + exponent))
  return budget * weights / weights.sum()


def round_to_budget(values: np.ndarray, budget: int, minimum: int = 0) -> tuple[int, ...]:
  """Integers that sum to `budget`, each >= `minimum`, closest to `values` (largest
  remainder)."""
  values = np.maximum(np.asarray(values, np.float64), minimum)
  if budget < minimum * len(values):
    raise ValueError(f"budget {budget} cannot give {len(values)} depths at least {minimum} each")
  scaled = values * budget / values.sum()
  floors = np.maximum(np.floor(scaled).astype(int), minimum)
  while floors.sum() > budget:  # the minimum pushed us over: take from the most rounded-up
    over = np.where(floors > minimum, floors - scaled, -np.inf)
    floors[np.argmax(over)] -= 1
  order = np.argsort(-(scaled - floors), kind="stable")
  for i in order[: budget - floors.sum()]:
    floors[i] += 1
  return tuple(int(f) for f in floors)


def fit_power_law(fan_outs, miss_rates) -> float:
  """Least-squares exponent r of 1 - p_hit(F) = c · F^-r on log-log axes (Figure 3)."""
  f = np.log(np.asarray(fan_outs, np.float64))
  m = np.log(np.asarray(miss_rates, np.float64))
  slope = np.polyfit(f, m, 1)[0]
  return float(-slope)


def backup_threshold(
  p_hit: float,
  e_hit: float,
  e_miss_neural: float,
  t_neural: float,
  e_miss_fast: float = 1.0,
  t_fast: float = 0.0,
  max_batch: int = 4096,
) -> float:
  """Theorem 17: the batch size b* from which the fast backup beats the neural one.

  Returns the smallest b at which `ssd_speedup` with the fast backup is at least the one with
  the neural backup (inf if the neural backup always wins up to `max_batch`).
  """
  for b in range(1, max_batch + 1):
    neural = ssd_speedup(p_hit, e_hit, e_miss_neural, 1.0, t_neural, b)
    fast = ssd_speedup(p_hit, e_hit, e_miss_fast, 1.0, t_fast, b)
    if fast >= neural:
      return float(b)
  return math.inf


def choose_backup(batch_size: int, threshold: float) -> str:
  """ "neural" below b*, "fast" from it on."""
  return "neural" if batch_size < threshold else "fast"
