"""Statistical exactness end to end: the decoded law equals the target's, per path; broken
verifiers (negative controls) must fail the very same test. See tests/exact.py for the design."""

import exact
import jax
import jax.numpy as jnp
import pytest

from ssd_jax.config import SpecConfig
from ssd_jax.decode import Engine, Sampling
from ssd_jax.decode import target as target_lib
from ssd_jax.decode.sampling import sample
from ssd_jax.decode.verify import verify

N = 50_000
TOKENS = 3


@pytest.fixture(scope="module")
def engine():
  target, draft = exact.tiny_pair()
  return Engine(target, draft)


def decode_law(engine, spec, temperature, seed=0, top_k=0, top_p=1.0):
  sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p)
  out = engine.generate(
    [exact.PROMPT] * N, spec=spec, sampling=sampling, max_new_tokens=TOKENS, seed=seed, capacity=24
  )
  observed = exact.counts(out.tokens, TOKENS)
  law = exact.exact_law(engine.target, exact.PROMPT, TOKENS, temperature, top_k, top_p)
  return observed, law, out.metrics


def sd_spec(c):
  fan_out = (2, 2, 1) if c < 1 else ()
  return SpecConfig(mode="sd", lookahead=2, saguaro_c=c, fan_out=fan_out)


@pytest.mark.parametrize("temperature", [0.5, 1.0])
@pytest.mark.parametrize("c", [1.0, 0.5, 0.0])
def test_sync_sd_is_exact(engine, temperature, c):
  observed, law, metrics = decode_law(engine, sd_spec(c), temperature)
  z = exact.fit_z(observed, law)
  assert z < exact.Z_MAX, (z, exact.total_variation(observed, law))
  # Partial acceptance: both the accept and the residual branches are exercised.
  assert 0.05 < metrics.acceptance_per_position[0] < 0.95


def test_ar_is_exact_with_top_k_and_top_p(engine):
  for top_k, top_p in ((3, 1.0), (0, 0.8)):
    observed, law, _ = decode_law(
      engine, SpecConfig(mode="ar", lookahead=0), 1.0, top_k=top_k, top_p=top_p
    )
    assert exact.fit_z(observed, law) < exact.Z_MAX


def test_sync_sd_is_exact_with_top_k(engine):
  observed, law, _ = decode_law(engine, sd_spec(1.0), 1.0, top_k=3)
  assert exact.fit_z(observed, law) < exact.Z_MAX


def _argmax_match(key, logits, drafts, q, point_mass, temperature, *, sampling):
  """The reference implementation's non-hit path: accept by argmax match, bonus from p."""
  del q, point_mass
  greedy, _ = verify(
    key, logits, drafts, None, None, jnp.zeros_like(temperature), sampling=Sampling()
  )
  p = sampling.probs(logits, temperature[:, None])
  bonus = sample(key, p[jnp.arange(logits.shape[0]), greedy])
  return greedy, bonus


def _bonus_from_p(key, logits, drafts, q, point_mass, temperature, *, sampling):
  """Correct acceptance, but the bonus after a rejection is drawn from p, not the residual."""
  accepted, _ = verify(key, logits, drafts, q, point_mass, temperature, sampling=sampling)
  p = sampling.probs(logits, temperature[:, None])
  return accepted, sample(jax.random.fold_in(key, 1), p[jnp.arange(logits.shape[0]), accepted])


@pytest.mark.parametrize("broken", [_argmax_match, _bonus_from_p])
def test_negative_controls_fail(engine, monkeypatch, broken):
  monkeypatch.setattr(target_lib, "verify", broken)
  jax.clear_caches()
  try:
    observed, law, _ = decode_law(engine, sd_spec(1.0), 1.0)
  finally:
    monkeypatch.undo()
    jax.clear_caches()
  assert exact.fit_z(observed, law) > 3 * exact.Z_MAX


def ssd_spec(fan_out, backup="neural", c=1.0):
  return SpecConfig(mode="ssd", lookahead=1, fan_out=fan_out, backup=backup, saguaro_c=c)


# (spec, check on the metrics that the intended path carried most rounds)
SSD_PATHS = {
  # F covers every token that can be a bonus (V - 1 at depth 0, V after full acceptance):
  # every round after the first is served from the cache.
  "hit": (ssd_spec((exact.V - 1, exact.V)), lambda m: m.later_hit_rate == 1.0),
  "neural miss": (ssd_spec((1, 1)), lambda m: m.later_hit_rate < 0.5),
  "fast miss": (ssd_spec((1, 1), backup="fast"), lambda m: m.later_hit_rate < 0.5),
}


@pytest.mark.parametrize("path", list(SSD_PATHS))
@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_ssd_paths_are_exact(engine, path, temperature):
  spec, exercised = SSD_PATHS[path]
  observed, law, metrics = decode_law(engine, spec, temperature)
  assert exercised(metrics), metrics.later_hit_rate
  assert exact.fit_z(observed, law) < exact.Z_MAX, exact.total_variation(observed, law)


@pytest.mark.parametrize("c", [1.0, 0.5, 0.0])
def test_ssd_saguaro_is_exact(engine, c):
  observed, law, metrics = decode_law(engine, ssd_spec((4, 4), c=c), 1.0)
  assert metrics.later_hit_rate > 0.3  # partial coverage: hits and misses both frequent
  assert exact.fit_z(observed, law) < exact.Z_MAX, exact.total_variation(observed, law)


def test_ssd_negative_control_fails(engine, monkeypatch):
  """Branch tokens drawn greedily while the cache stores q: sampler and verifier disagree."""
  from ssd_jax.decode import speculate  # noqa: PLC0415

  monkeypatch.setattr(
    speculate, "sample", lambda key, probs: jnp.argmax(probs, -1).astype(jnp.int32)
  )
  jax.clear_caches()
  try:
    observed, law, metrics = decode_law(engine, ssd_spec((exact.V - 1, exact.V)), 1.0)
  finally:
    monkeypatch.undo()
    jax.clear_caches()
  assert metrics.later_hit_rate == 1.0
  assert exact.fit_z(observed, law) > 3 * exact.Z_MAX


# A draft whose head scores 5 of the 8 tokens, in an order unlike the ids': q is zero on the
# other 3, and a column-to-id mix-up would misplace q (the negative control below).
RESTRICTED = [6, 1, 3, 4, 0]


@pytest.fixture(scope="module")
def restricted():
  target, draft = exact.tiny_pair()
  return Engine(target, draft, draft_vocab=RESTRICTED)


@pytest.mark.parametrize(
  "spec",
  [sd_spec(1.0), sd_spec(0.5), ssd_spec((4, 5)), ssd_spec((1, 1)), ssd_spec((2, 2), c=0.5)],
  ids=str,
)
def test_restricted_draft_vocab_is_exact(restricted, spec):
  observed, law, metrics = decode_law(restricted, spec, 1.0)
  assert 0.05 < metrics.acceptance_per_position[0] < 0.95
  assert exact.fit_z(observed, law) < exact.Z_MAX, exact.total_variation(observed, law)


def test_restricted_draft_vocab_negative_control_fails(restricted, monkeypatch):
  """q handed to the verifier by column position instead of token id."""
  from ssd_jax.decode import draft as draft_lib  # noqa: PLC0415

  def unmapped(params, probs, vocab_size):
    pad = vocab_size - probs.shape[-1]
    return jnp.pad(probs, [(0, 0)] * (probs.ndim - 1) + [(0, pad)])

  monkeypatch.setattr(draft_lib, "to_vocab", unmapped)
  jax.clear_caches()
  try:
    observed, law, _ = decode_law(restricted, sd_spec(1.0), 1.0)
  finally:
    monkeypatch.undo()
    jax.clear_caches()
  assert exact.fit_z(observed, law) > 3 * exact.Z_MAX
