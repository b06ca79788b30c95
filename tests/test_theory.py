"""The analytical model: closed forms, the paper's worked examples, and optimality checks."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ssd_jax.decode import theory, tree


def test_expected_tokens_sd():
  assert theory.expected_tokens_sd(0.0, 5) == 1.0
  assert theory.expected_tokens_sd(1.0, 5) == 6.0
  assert theory.expected_tokens_sd(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)


def test_ssd_speedup_limits():
  # All hits and drafting hidden: E_hit tokens per verification.
  assert theory.ssd_speedup(1.0, 5.0, 2.0, 0.8, 0.5) == 5.0
  # Drafting slower than verification stretches hit rounds to T_p.
  assert theory.ssd_speedup(1.0, 5.0, 2.0, 2.0, 0.5) == 2.5
  # Corollary 16: as b grows every round waits for a backup.
  big = theory.ssd_speedup(0.9, 5.0, 3.0, 1.0, 0.5, batch_size=10_000)
  assert big == pytest.approx((0.9 * 5 + 0.1 * 3) / 1.5)


@settings(max_examples=50, deadline=None)
@given(st.floats(0.01, 0.99), st.floats(0.0, 2.0), st.floats(0.5, 0.95), st.integers(1, 8))
def test_corollary_9_brackets_theorem_7(p_hit, t_sd, a, lookahead):
  """With primary = backup = the SD draft (E_miss = E_hit = E_SD, T_b = T_SD, T_p <= 1), the
  ratio of Theorem 7 to SD's speedup lies inside Corollary 9's bounds."""
  e = theory.expected_tokens_sd(a, lookahead)
  ratio = theory.ssd_speedup(p_hit, e, e, 1.0, t_sd) / theory.sd_speedup(e, t_sd)
  lower, upper = theory.ssd_over_sd_bounds(p_hit, t_sd, e, e)
  assert lower - 1e-9 <= ratio <= upper + 1e-9


def test_geometric_fan_out_matches_the_worked_example():
  f = theory.geometric_fan_out(7, 24, 0.8, 0.5)
  np.testing.assert_allclose(f, [4.2, 3.6, 3.1, 2.7, 2.3, 2.0, 1.7, 4.3], atol=0.06)
  assert f.sum() == pytest.approx(24)
  assert tree.geometric(7, 24, 0.8, 0.5) == (4, 4, 3, 3, 2, 2, 2, 4)


def _hit_probability(fan_out, a, r):
  k = np.arange(len(fan_out))
  prob = a**k * (1 - a)
  prob[-1] = a ** (len(fan_out) - 1)
  f = np.asarray(fan_out, float)
  return float((prob * np.where(f > 0, 1 - f ** (-r), 0.0)).sum())


@settings(max_examples=30, deadline=None)
@given(st.floats(0.3, 0.95), st.floats(0.2, 1.5), st.integers(2, 8))
def test_geometric_beats_uniform_and_perturbations(a, r, lookahead):
  budget = 3 * (lookahead + 1)
  f = theory.geometric_fan_out(lookahead, budget, a, r)
  best = _hit_probability(f, a, r)
  assert best >= _hit_probability([3.0] * (lookahead + 1), a, r) - 1e-12
  rng = np.random.default_rng(0)
  for _ in range(20):  # any budget-preserving perturbation is worse (the objective is concave)
    d = rng.normal(size=f.shape) * 0.05 * f
    g = f + d - d.mean()
    if (g > 0).all():
      assert _hit_probability(g, a, r) <= best + 1e-12


@given(st.lists(st.floats(0.0, 10.0), min_size=1, max_size=10), st.integers(0, 60))
def test_round_to_budget_keeps_the_budget(values, extra):
  budget = len(values) + extra
  if sum(values) == 0:
    values = [1.0] * len(values)
  out = theory.round_to_budget(np.asarray(values), budget, minimum=1)
  assert sum(out) == budget and min(out) >= 1


def test_fit_power_law_recovers_the_exponent():
  f = np.array([2, 4, 8, 16, 32, 64])
  assert theory.fit_power_law(f, 0.8 * f**-0.55) == pytest.approx(0.55)


def test_backup_threshold_matches_the_derived_b_star():
  """p = 0.85, E_hit = E_miss = 5, T_b = 0.5: b* = ln(1 - (5/(0.85*5+0.15) - 1)/0.5) / ln 0.85
  ≈ 1.96, so the fast backup wins from b = 2 on (the paper's Fig. 6 crossover)."""
  assert theory.backup_threshold(0.85, 5.0, 5.0, 0.5) == 2.0
  assert theory.choose_backup(1, 2.0) == "neural"
  assert theory.choose_backup(2, 2.0) == "fast"
  # A free backup that is as good as a hit: neural always wins.
  assert theory.backup_threshold(0.85, 5.0, 5.0, 0.0) == float("inf")


def test_tree_layout():
  depth, rank = tree.layout((2, 0, 3))
  np.testing.assert_array_equal(depth, [0, 0, 2, 2, 2])
  np.testing.assert_array_equal(rank, [0, 1, 0, 1, 2])
  assert tree.uniform(3, 2) == (2, 2, 2, 2)
  with pytest.raises(ValueError, match="acceptance must be in"):
    tree.geometric(3, 8, 1.0)
