"""Fan-out lists and the static layout of the speculation tree.

A fan-out list gives F_j, the fork candidates at accept depth j = 0..lookahead. The tree's
branches are laid out depth by depth: branch n has depth `depth[n]` and is the `rank[n]`-th
most likely candidate at that depth. Hit and miss lists share the branch count N = Σ F_j, so
one compiled expansion serves both (each row picks its layout by whether its speculation came
from the cache).
"""

from __future__ import annotations

import numpy as np

from ssd_jax.decode import theory


def uniform(lookahead: int, fan_out: int) -> tuple[int, ...]:
  """F_j = fan_out at every depth (the reference implementation's default)."""
  if fan_out < 1:
    raise ValueError(f"fan_out must be >= 1, got {fan_out}")
  return (fan_out,) * (lookahead + 1)


def geometric(
  lookahead: int, budget: int, acceptance: float, exponent: float = 0.5, minimum: int = 1
) -> tuple[int, ...]:
  """Theorem 12's capped-geometric allocation, rounded to integers summing to `budget`.

  Args:
    lookahead: K.
    budget: N, total branches (e.g. the uniform list's sum, to keep the expansion's cost).
    acceptance: the draft's per-token acceptance rate a (measured).
    exponent: r of the power-law miss rate 1 - p_hit(F) = F^-r (measured; ~0.5 in the paper).
    minimum: branches kept at every depth (1 keeps every outcome depth reachable).
  """
  continuous = theory.geometric_fan_out(lookahead, budget, acceptance, exponent)
  return theory.round_to_budget(continuous, budget, minimum)


def layout(fan_out: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
  """(depth i32[N], rank i32[N]) of each branch for one fan-out list."""
  depth = np.repeat(np.arange(len(fan_out), dtype=np.int32), fan_out)
  rank = np.concatenate([np.arange(f, dtype=np.int32) for f in fan_out])
  return depth, rank
