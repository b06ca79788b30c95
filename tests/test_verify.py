"""Verification: hand-computed cases, the closed-form identity, and properties."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ssd_jax.decode.sampling import Sampling, Warp, saguaro, warped_probs
from ssd_jax.decode.verify import acceptance_probability, leading_true, residual, verify

BIG = 30.0  # logit gap that makes a softmax one-hot to f32 precision


def one_hot_logits(tokens, V=4):
  """Logits whose softmax (T = 1) is a point mass on each given token."""
  return jnp.asarray(jax.nn.one_hot(jnp.asarray(tokens), V) * BIG)[None]


def warp(*temperatures):
  return Warp.of([Sampling(temperature=float(t)) for t in temperatures])


def run(logits, drafts, q=None, point_mass=None, temperature=1.0, seed=0, greedy=False):
  drafts = jnp.asarray([drafts], jnp.int32)
  q = None if q is None else jnp.asarray([q], jnp.float32)
  pm = None if point_mass is None else jnp.asarray(point_mass)
  accepted, bonus = verify(
    jax.random.key(seed)[None], logits, drafts, q, pm, warp(temperature), greedy=greedy
  )
  return int(accepted[0]), int(bonus[0])


UNIFORM = [0.25] * 4
CASES = {
  # name: (target point masses per position, drafts, q per position, expected (accepted, bonus))
  "accept all, bonus from p at the end": ([1, 2, 3], [1, 2], [UNIFORM, UNIFORM], (2, 3)),
  "reject first, bonus from residual": ([2, 0, 0], [1, 0], [[0, 1, 0, 0], UNIFORM], (0, 2)),
  "reject middle": ([1, 3, 0], [1, 2], [UNIFORM, [0, 0, 1, 0]], (1, 3)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_table(name):
  targets, drafts, q, expected = CASES[name]
  for seed in range(5):  # outcomes are certain: every seed agrees
    assert run(one_hot_logits(targets), drafts, q, seed=seed) == expected


def test_point_mass_proposals():
  logits = one_hot_logits([2, 1])
  # p(x) = 0: rejected for sure; the bonus comes from p with x removed.
  assert run(logits, [1], point_mass=[True]) == (0, 2)
  # p(x) = 1: accepted for sure; the bonus comes from p after it.
  assert run(one_hot_logits([1, 3]), [1], point_mass=[True]) == (1, 3)
  # A dense q is ignored on point-mass rows.
  assert run(logits, [1], q=[[0, 0, 1, 0]], point_mass=[True]) == (0, 2)


def test_point_mass_acceptance_rate_is_p_of_x():
  """p = [0.1, 0.6, 0.3, 0]; proposing 1 deterministically is accepted w.p. 0.6 exactly."""
  B = 20000
  logits = jnp.log(jnp.asarray([[0.1, 0.6, 0.3, 1e-30], [0.25] * 4]))[None].repeat(B, 0)
  accepted, bonus = verify(
    jax.random.split(jax.random.key(1), B),  # one key per row
    logits,
    jnp.ones((B, 1), jnp.int32),
    None,
    jnp.ones((B,), bool),
    warp(*[1.0] * B),
    greedy=False,
  )
  assert abs(float(accepted.mean()) - 0.6) < 4 * (0.24 / B) ** 0.5
  rejected = np.asarray(bonus)[np.asarray(accepted) == 0]
  assert set(rejected.tolist()) <= {0, 2}  # p with x = 1 removed: 0.25 / 0.75 split
  assert abs((rejected == 0).mean() - 0.25) < 0.03


def test_greedy_ties_and_matches():
  logits = jnp.asarray([[[0.0, 5.0, 5.0, 1.0], [3.0, 0.0, 0.0, 0.0]]])
  assert run(logits, [1], temperature=0.0, greedy=True) == (1, 0)  # tie -> lowest index
  assert run(logits, [2], temperature=0.0, greedy=True) == (0, 1)
  # A greedy row inside a sampled batch takes the greedy path too.
  assert run(logits, [2], q=[UNIFORM], temperature=0.0) == (0, 1)


@pytest.mark.parametrize("c", [0.0, 1.0])
def test_saguaro_c_extremes(c):
  """q_raw = [.6, .3, .1, 0], F = 1: C = 0 moves all proposal mass off the top token."""
  q_raw = jnp.asarray([0.6, 0.3, 0.1, 0.0])
  q = saguaro(q_raw, jnp.asarray(1), c, max_fan_out=1)
  expected = [0.0, 0.75, 0.25, 0.0] if c == 0.0 else [0.6, 0.3, 0.1, 0.0]
  np.testing.assert_allclose(q, expected, atol=1e-6)
  # Target is a point mass on token 0: token 1 is rejected; the residual is all on token 0.
  assert run(one_hot_logits([0, 0]), [1], q=[q]) == (0, 0)


def _emitted_distribution(p, q):
  """Law of the token emitted at one position, from the accept/residual formula: propose y ~ q,
  keep it w.p. min(1, p(y)/q(y)), else draw from the residual."""
  kept = q * acceptance_probability(p, q)
  return kept + (1.0 - kept.sum()) * residual(p, q)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from(["dense", "point", "saguaro"]))
def test_closed_form_identity(seed, kind):
  """min(p, q) + (1 - Σ min(p, q)) · norm(max(0, p - q)) = p for every proposal q."""
  kp, kq = jax.random.split(jax.random.key(seed))
  V = 6
  p = jax.nn.softmax(jax.random.normal(kp, (V,)) * 2)
  q = jax.nn.softmax(jax.random.normal(kq, (V,)) * 2)
  if kind == "saguaro":
    q = saguaro(q, jnp.asarray(2), 0.3, max_fan_out=2)
  proposals = jnp.eye(V) if kind == "point" else q[None]  # point: every deterministic x
  for proposal in proposals:
    np.testing.assert_allclose(_emitted_distribution(p, proposal), p, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.1754943508222875e-38, 1e-30, 1e-3])
def test_a_tiny_temperature_is_the_argmax_not_nan(temperature):
  """softmax(logits / T) for T -> 0 is the point mass on the argmax (uniform over exact ties),
  never NaN, down to the smallest normal float (XLA on CPU flushes subnormals to 0: greedy)."""
  logits = jnp.asarray([[3.0, -1.0, 7.5, 2.0, -80.0], [1.0, 4.0, 4.0, -2.0, 0.5]])
  probs = jax.jit(warped_probs)(logits, warp(temperature, temperature))
  chex.assert_tree_all_finite(probs)
  np.testing.assert_allclose(probs, [[0, 0, 1, 0, 0], [0, 0.5, 0.5, 0, 0]], atol=1e-6)


_verify = jax.jit(functools.partial(verify, greedy=False))  # one program per shape


@settings(max_examples=20, deadline=None)
@given(
  st.integers(0, 2**31 - 1),
  st.sampled_from([1, 3, 5]),  # a few shapes: each compiles once
  st.sampled_from([1, 4]),
  st.floats(0.0, 1.5),
  st.booleans(),
)
# Found by hypothesis: at the smallest normal f32 temperature, logits / T overflowed and the
# softmax gave NaN, so the bonus could be the very token just rejected.
@example(seed=134, lookahead=3, B=4, temperature=1.1754943508222875e-38, point=False)
def test_properties(seed, lookahead, B, temperature, point):
  V = 7
  k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
  logits = jax.random.normal(k1, (B, lookahead + 1, V)) * 3
  q = warped_probs(jax.random.normal(k2, (B, lookahead, V)) * 3, warp(*[1.0] * B))
  drafts = jax.random.categorical(k3, jnp.log(q)).astype(jnp.int32)
  keys = jax.random.split(k4, B)
  accepted, bonus = _verify(
    keys, logits, drafts, q, jnp.full((B,), point), warp(*[temperature] * B)
  )
  chex.assert_shape([accepted, bonus], (B,))
  chex.assert_type([accepted, bonus], jnp.int32)
  assert ((accepted >= 0) & (accepted <= lookahead)).all()
  assert ((bonus >= 0) & (bonus < V)).all()
  rejected = accepted < lookahead
  rejected_token = jnp.take_along_axis(
    drafts, jnp.minimum(accepted, lookahead - 1)[:, None], axis=1
  )[:, 0]
  assert not (rejected & (bonus == rejected_token)).any()


def test_leading_true():
  mask = jnp.asarray([[1, 1, 0, 1], [0, 1, 1, 1], [1, 1, 1, 1]], bool)
  np.testing.assert_array_equal(leading_true(mask), [2, 0, 4])


_warp = jax.jit(warped_probs)


@settings(max_examples=40, deadline=None)
@given(
  st.integers(0, 2**31 - 1),
  st.integers(0, 10),  # top-k, past the vocabulary of 8 too
  st.sampled_from([1.0, 1.0 - 1e-7, 0.95, 0.6, 0.2, 1e-3]),
  st.floats(0.05, 3.0),
  st.booleans(),
)
def test_warp_matches_the_numpy_oracle(seed, top_k, top_p, temperature, ties):
  """warped_probs (bisection thresholds, f32) against the plain-numpy oracle of exact.py, with
  tied logits sometimes; per row settings differ within one batch."""
  import exact  # noqa: PLC0415 (tests/ is on the path)

  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(4, 8)) * 2
  if ties:
    logits = np.round(logits)  # many exact ties
  rows = [
    Sampling(temperature=temperature, top_k=top_k, top_p=top_p),
    Sampling(temperature=1.0, top_k=top_k),
    Sampling(temperature=temperature, top_p=top_p),
    Sampling(),
  ]
  ours = np.asarray(_warp(jnp.asarray(logits, jnp.float32), Warp.of(rows)))
  for row, sampling in enumerate(rows):
    np.testing.assert_allclose(ours[row], exact.oracle_probs(logits[row], sampling), atol=1e-5)
