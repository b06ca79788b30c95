"""Statistical exactness end to end: the decoded law equals the target's, per path; broken
verifiers and samplers (negative controls) must fail the very same test. See tests/exact.py for
the design; the oracle warps logits in plain numpy, independently of ssd_jax."""

import dataclasses

import exact
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssd_jax import Engine, Sampling
from ssd_jax.config import SpecConfig
from ssd_jax.decode import draft as draft_lib
from ssd_jax.decode import sampling as sampling_lib
from ssd_jax.decode import speculate
from ssd_jax.decode import target as target_lib
from ssd_jax.decode import verify as verify_lib
from ssd_jax.decode.sampling import Warp, fold_rows, sample, warped_probs
from ssd_jax.decode.verify import verify
from ssd_jax.models.registry import LoadedModel
from ssd_jax.runtime import session as session_lib

pytestmark = pytest.mark.statistical

N = 50_000
TOKENS = 3
SAMPLED = Sampling(temperature=1.0)


@pytest.fixture(scope="module")
def engine():
  target, draft = exact.tiny_pair()
  return Engine(target, draft)


def decode_law(engine, spec, sampling, seed=0, tokens=TOKENS, prompt=exact.PROMPT, eos=None):
  out = engine.generate(
    [prompt] * N, spec=spec, sampling=sampling, max_new_tokens=tokens, seed=seed, capacity=24
  )
  observed = exact.counts(out.tokens, tokens, eos)
  law = exact.exact_law(engine.target, prompt, tokens, sampling, eos)
  return observed, law, out.metrics


def assert_exact(observed, law):
  z = exact.fit_z(observed, law)
  print(f"z = {z:.2f}")  # seen with -s: the margin each path passes by
  assert z < exact.Z_MAX, (z, exact.total_variation(observed, law))


def assert_broken(observed, law):
  z = exact.fit_z(observed, law)
  print(f"z = {z:.2f}")
  assert z > 3 * exact.Z_MAX, (z, exact.total_variation(observed, law))


def sd_spec(c, lookahead=2):
  fan_out = (2,) * lookahead + (1,) if c < 1 else ()
  return SpecConfig(mode="sd", lookahead=lookahead, saguaro_c=c, fan_out=fan_out)


def ssd_spec(fan_out, backup="neural", c=1.0):
  return SpecConfig(
    mode="ssd", lookahead=len(fan_out) - 1, fan_out=fan_out, backup=backup, saguaro_c=c
  )


@pytest.mark.parametrize("temperature", [0.5, 1.0])
@pytest.mark.parametrize("c", [1.0, 0.5, 0.0])
def test_sync_sd_is_exact(engine, temperature, c):
  observed, law, metrics = decode_law(engine, sd_spec(c), Sampling(temperature=temperature))
  assert_exact(observed, law)
  # Partial acceptance: both the accept and the residual branches are exercised.
  assert 0.05 < metrics.acceptance_per_position[0] < 0.95


@pytest.mark.parametrize("sampling", [Sampling(temperature=1.0, top_k=3), Sampling(top_p=0.8)])
@pytest.mark.parametrize("mode", ["ar", "sd"])
def test_top_k_and_top_p_are_exact(engine, mode, sampling):
  sampling = dataclasses.replace(sampling, temperature=1.0)
  spec = SpecConfig(mode="ar", lookahead=0) if mode == "ar" else sd_spec(1.0)
  assert_exact(*decode_law(engine, spec, sampling)[:2])


_top_k_mask, _top_p_mask = sampling_lib.top_k_mask, sampling_lib.top_p_mask


def _top_k_one_too_few(probs, top_k):
  """top-k cut at the (k - 1)-th most likely token, an off-by-one at the cut (k = 1 and k = 0,
  off, unchanged). Both p and q are cut alike, so speculation stays self-consistent: only the
  oracle's independent warp can see it."""
  return _top_k_mask(probs, jnp.where(top_k > 1, top_k - 1, top_k))


def _top_p_one_too_few(probs, top_p):
  """top-p without the token that crosses top_p (as if each token's own mass were counted in the
  mass before it): the least likely kept token dropped wherever more than one is kept."""
  top_p = jnp.broadcast_to(top_p, probs.shape[:-1])[..., None]
  keep = _top_p_mask(probs, top_p[..., 0])
  least = jnp.min(jnp.where(keep, probs, jnp.inf), axis=-1, keepdims=True)
  several = keep.sum(-1, keepdims=True) > 1
  return keep & ~((probs == least) & several & (top_p < 1.0))


@pytest.mark.parametrize(
  ("sampling", "name", "mutant"),
  [
    (Sampling(temperature=1.0, top_k=3), "top_k_mask", _top_k_one_too_few),
    (Sampling(temperature=1.0, top_p=0.8), "top_p_mask", _top_p_one_too_few),
  ],
  ids=["top-k", "top-p"],
)
def test_top_k_and_top_p_negative_controls_fail(engine, restore, sampling, name, mutant):
  """The test above (sd), with a warp that keeps one token too few, where p and q both come
  from it. Seed 0, N = 50,000: the mutants reach z = 99.1 (top-k) and z = 132.9 (top-p), the
  correct warps z = 0.27 and z = 0.19."""
  broken(restore, sampling_lib, name, mutant)
  assert_broken(*decode_law(engine, sd_spec(1.0), sampling)[:2])


def _argmax_match(key, logits, drafts, q, point_mass, warp, *, greedy):
  """The reference implementation's non-hit path: accept by argmax match, bonus from p."""
  del q, point_mass
  accepted, _ = verify(key, logits, drafts, None, None, warp, greedy=True)
  p = warped_probs(logits, warp)
  return accepted, sample(key, p[jnp.arange(logits.shape[0]), accepted])


def _bonus_from_p(key, logits, drafts, q, point_mass, warp, *, greedy):
  """Correct acceptance, but the bonus after a rejection is drawn from p, not the residual."""
  accepted, _ = verify(key, logits, drafts, q, point_mass, warp, greedy=greedy)
  p = warped_probs(logits, warp)
  return accepted, sample(fold_rows(key, 1), p[jnp.arange(logits.shape[0]), accepted])


def _ignores_point_mass(key, logits, drafts, q, point_mass, warp, *, greedy):
  """The fast backup's random tokens verified against the draft's q, not their point mass."""
  del point_mass
  return verify(key, logits, drafts, q, None, warp, greedy=greedy)


def broken(monkeypatch, module, name, replacement):
  """Swap in a broken function for one decode, compiled afresh (and restored afterwards)."""
  monkeypatch.setattr(module, name, replacement)
  jax.clear_caches()


@pytest.fixture
def restore(monkeypatch):
  yield monkeypatch
  monkeypatch.undo()
  jax.clear_caches()


@pytest.mark.parametrize("mutant", [_argmax_match, _bonus_from_p])
def test_negative_controls_fail(engine, restore, mutant):
  broken(restore, target_lib, "verify", mutant)
  assert_broken(*decode_law(engine, sd_spec(1.0), SAMPLED)[:2])


_residual = verify_lib.residual
LEAK = 0.1  # a bias this test sees with a margin (its power by LEAK: see below)


def _residual_leaking_p(p, q):
  """A small bias: after a rejection, a fraction LEAK of the bonus tokens drawn from p instead
  of the residual norm(max(0, p - q)) (a residual mixed with its fallback). Acceptance stays
  correct, so the emitted law is off by only LEAK * P(reject) * (p - residual)."""
  return (1 - LEAK) * _residual(p, q) + LEAK * p


def test_a_small_residual_bias_is_caught(engine, restore):
  """The test's power against a subtle mutant: sync sd at T = 1, C = 1, lookahead 2, 3 tokens,
  seed 0, N = 50,000 (`test_sync_sd_is_exact[1.0-1.0]`, where the correct residual reaches
  z = -0.86). The z the same decode reaches by LEAK, measured once: 0.02 -> -0.25,
  0.05 -> 1.43, 0.075 -> 4.51, 0.1 -> 7.69, 0.15 -> 14.51, 0.2 -> 21.62, 0.3 -> 35.26. So a
  bias of 5% of the bonus tokens after a rejection passes unseen at this sample size, 7.5% is
  at the threshold (Z_MAX = 4.5), and 10% is caught with a margin."""
  broken(restore, verify_lib, "residual", _residual_leaking_p)
  observed, law, _ = decode_law(engine, sd_spec(1.0), SAMPLED)
  z = exact.fit_z(observed, law)
  print(f"z = {z:.2f}")
  assert z > exact.Z_MAX, z


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
  observed, law, metrics = decode_law(engine, spec, Sampling(temperature=temperature))
  assert exercised(metrics), metrics.later_hit_rate
  assert_exact(observed, law)


@pytest.mark.parametrize(
  ("backup", "c"), [("neural", 1.0), ("neural", 0.5), ("neural", 0.0), ("fast", 0.5), ("fast", 0.0)]
)
def test_ssd_saguaro_is_exact(engine, backup, c):
  """Saguaro's scaled q on the cached branches, beside each backup's misses (the fast backup's
  point masses next to scaled cached q in one batch)."""
  observed, law, metrics = decode_law(engine, ssd_spec((4, 4), backup=backup, c=c), SAMPLED)
  assert 0.3 < metrics.later_hit_rate < 0.9  # partial coverage: hits and misses both frequent
  assert_exact(observed, law)


_backup = speculate._backup


def _backup_q_of_another_row(params, state, outcome, need, key, *, plan):
  """The neural backup's tokens verified against the previous row's q: a backup that drafts
  for the rows that missed and scatters its q back with a shifted row index."""
  tokens, probs, point_mass, cache = _backup(params, state, outcome, need, key, plan=plan)
  return tokens, None if probs is None else jnp.roll(probs, 1, axis=0), point_mass, cache


def test_neural_backup_negative_control_fails(engine, restore):
  """`test_ssd_paths_are_exact` on the neural-miss path (T = 1) with the mutant above: seed 0,
  N = 50,000, the mutant reaches z = 198.7, the correct backup z = -0.09."""
  broken(restore, speculate, "_backup", _backup_q_of_another_row)
  observed, law, metrics = decode_law(engine, SSD_PATHS["neural miss"][0], SAMPLED)
  assert metrics.later_hit_rate < 0.5
  assert_broken(observed, law)


# Lookahead 2 and four tokens: second-round speculations (hits and backups) are verified at
# every depth. Each warp on each path.
DEEP = {
  "hit top-k": (ssd_spec((3, 3, 3)), Sampling(temperature=1.0, top_k=4)),
  "hit top-p": (ssd_spec((3, 3, 3), c=0.5), Sampling(temperature=0.8, top_p=0.8)),
  "neural miss top-p": (ssd_spec((1, 1, 1)), Sampling(temperature=1.0, top_p=0.7)),
  "fast miss top-k": (ssd_spec((1, 1, 1), backup="fast"), Sampling(temperature=1.0, top_k=3)),
}


@pytest.mark.parametrize("case", list(DEEP))
def test_ssd_lookahead_2_with_top_k_and_top_p_is_exact(engine, case):
  spec, sampling = DEEP[case]
  observed, law, metrics = decode_law(engine, spec, sampling, tokens=4)
  assert 0.0 < metrics.later_hit_rate < 1.0 and metrics.acceptance_per_position[1] > 0.02
  assert_exact(observed, law)


MIXED = [
  Sampling(temperature=1.0),
  Sampling(temperature=0.4, top_k=3),
  Sampling(temperature=1.3, top_p=0.75),
  Sampling(temperature=0.0),
]


def mixed_z(engine, spec) -> dict[tuple[int, int], float]:
  """Each row its own temperature / top-k / top-p (a greedy row among them), ragged prompts, in
  one batch: the z of every group of rows (setting, prompt) against its own law."""
  prompts = [exact.PROMPT, [2, 7, 0]]
  rows = [(i % 4, i // 4 % 2) for i in range(2 * N)]
  out = engine.generate(
    [prompts[p] for _, p in rows],
    spec=spec,
    sampling=[MIXED[s] for s, _ in rows],
    max_new_tokens=TOKENS,
    seed=3,
    capacity=24,
  )
  z = {}
  for group in sorted(set(rows)):
    tokens = [t for t, row in zip(out.tokens, rows, strict=True) if row == group]
    law = exact.exact_law(engine.target, prompts[group[1]], TOKENS, MIXED[group[0]])
    z[group] = exact.fit_z(exact.counts(tokens, TOKENS), law)
  print({g: round(v, 2) for g, v in z.items()})
  return z


@pytest.mark.parametrize("spec", [sd_spec(1.0), ssd_spec((2, 2, 2)), ssd_spec((1, 1, 1), "fast")])
def test_mixed_per_row_settings_in_one_batch_are_exact(engine, spec):
  """Every group of rows follows its own law."""
  z = mixed_z(engine, spec)
  assert max(z.values()) < exact.Z_MAX, z


def _row_0_temperature(logits, warp):
  """Every row warped at row 0's temperature (its top-k and top-p stay its own): a per-row
  setting taken from the first row, as a scalar would be."""
  temperature = jnp.broadcast_to(warp.temperature[:1], warp.temperature.shape)
  return warped_probs(logits, dataclasses.replace(warp, temperature=temperature))


def test_mixed_per_row_settings_negative_control_fails(engine, restore):
  """The sd case above with row 0's temperature (1.0) applied to every row, target and draft
  alike. Seed 3, 25,000 rows per group (setting, prompt): the groups at T = 0.4 (top-k 3) reach
  z = 146.8 and 107.7, those at T = 1.3 (top-p 0.75) z = 48.3 and 59.3, where the correct code
  reaches at most z = 1.65. Row 0's own setting is untouched, and the greedy rows stay exact
  (their verification is greedy whatever p is)."""
  restore.setattr(draft_lib, "warped_probs", _row_0_temperature)
  broken(restore, verify_lib, "warped_probs", _row_0_temperature)
  z = mixed_z(engine, sd_spec(1.0))
  assert all(min(z[1, p], z[2, p]) > 3 * exact.Z_MAX for p in (0, 1)), z


@pytest.fixture(scope="module")
def stopping():
  """The tiny pair with the second most likely first token as EOS: many sequences stop early,
  at every position, and most do not."""
  target, draft = exact.tiny_pair()
  eos = int(np.argsort(exact.exact_law(target, exact.PROMPT, 1, SAMPLED))[-2])
  with_eos = lambda m: LoadedModel(
    m.name, dataclasses.replace(m.config, eos_token_ids=(eos,)), m.params, None
  )
  return Engine(with_eos(target), with_eos(draft)), eos


@pytest.mark.parametrize("spec", [sd_spec(1.0), ssd_spec((3, 3, 3)), ssd_spec((1, 1, 1), "fast")])
def test_eos_is_exact(stopping, spec):
  engine, eos = stopping
  observed, law, _ = decode_law(engine, spec, SAMPLED, tokens=4, eos=eos)
  cells = np.asarray(np.unravel_index(np.arange(law.size), [exact.V] * 4)).T
  early = law[(cells[:, :3] == eos).any(axis=1)].sum()  # P(stop before the 4th token)
  assert 0.05 < early < 0.8, early
  assert_exact(observed, law)


_emit = target_lib._emit


def _eos_not_absorbing(state, drafts, accepted, bonus, eos_ids):
  """EOS emitted like any other token: a row goes on after it, to its budget."""
  del eos_ids
  return _emit(state, drafts, accepted, bonus, ())


def _eos_not_stopping(self, request):
  """The tokens that end a request on the session's side, EOS left out (stop tokens still
  stop)."""
  del self
  return frozenset(request.stop_token_ids)


def test_eos_negative_control_fails(stopping, restore):
  """`test_eos_is_exact` (sd) with EOS an ordinary token: seed 0, N = 50,000, z = inf (tokens
  after an EOS, which the law gives probability 0); the correct code reaches z = -0.16. Two
  layers stop a row at EOS, the round's programs on the device (so the row stops costing rounds)
  and the session reading the round on the host (so no token after it reaches the request);
  either alone gives the law, so the mutant breaks both."""
  engine, eos = stopping
  broken(restore, target_lib, "_emit", _eos_not_absorbing)
  restore.setattr(session_lib.Session, "_stops", _eos_not_stopping)
  assert_broken(*decode_law(engine, sd_spec(1.0), SAMPLED, tokens=4, eos=eos)[:2])


def test_ssd_negative_control_fails(engine, restore):
  """Branch tokens drawn greedily while the cache stores q: sampler and verifier disagree."""
  broken(restore, draft_lib, "sample", lambda key, probs: jnp.argmax(probs, -1).astype(jnp.int32))
  observed, law, metrics = decode_law(engine, ssd_spec((exact.V - 1, exact.V)), SAMPLED)
  assert metrics.later_hit_rate == 1.0
  assert_broken(observed, law)


def test_fast_backup_negative_control_fails(engine, restore):
  """Random tokens verified as if they had come from the draft's q."""
  broken(restore, target_lib, "verify", _ignores_point_mass)
  observed, law, metrics = decode_law(engine, SSD_PATHS["fast miss"][0], SAMPLED)
  assert metrics.later_hit_rate < 0.5
  assert_broken(observed, law)


def test_saguaro_negative_control_fails(engine, restore):
  """Tokens drawn from σ_{F,C} but verified with the unscaled q."""
  draw = draft_lib.draw

  def unscaled(params, logits, warp, depth, key, *, plan, fan_out):
    tokens, _ = draw(params, logits, warp, depth, key, plan=plan, fan_out=fan_out)
    return tokens, draft_lib.to_vocab(params, warped_probs(logits, warp), plan.config.vocab_size)

  broken(restore, draft_lib, "draw", unscaled)
  observed, law, _ = decode_law(engine, ssd_spec((4, 4), c=0.0), SAMPLED)
  assert_broken(observed, law)


@pytest.fixture(scope="module")
def tensor_parallel():
  """The tiny pair with 4 query and 4 KV heads, the target's split over 4 devices (the draft on
  a fifth)."""
  target, draft = exact.tiny_pair(heads=4, kv_heads=4)
  return Engine(target, draft, target_devices=4)


@pytest.mark.parametrize("spec", [sd_spec(1.0), ssd_spec((2, 2, 2))], ids=["sd", "ssd"])
def test_tensor_parallel_target_is_exact(tensor_parallel, spec):
  """p from a target whose heads and MLP are split over 4 devices (logits all-reduced), at
  T > 0 with top-p: the sampled law, not only the argmax, is the single-device target's."""
  sampling = Sampling(temperature=0.8, top_p=0.9)
  observed, law, metrics = decode_law(tensor_parallel, spec, sampling)
  assert {d for x in jax.tree.leaves(tensor_parallel.target_params) for d in x.devices()} == set(
    jax.devices()[:4]
  )
  assert 0.05 < metrics.acceptance_per_position[0] < 0.95
  assert_exact(observed, law)


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
  observed, law, metrics = decode_law(restricted, spec, SAMPLED)
  assert 0.05 < metrics.acceptance_per_position[0] < 0.95
  assert_exact(observed, law)


def test_restricted_head_with_a_top_k_wider_than_the_head_is_exact(restricted):
  """top-k 6 > the draft head's 5 columns: nothing is cut on the draft side, the target's p is
  still its top-6."""
  assert_exact(*decode_law(restricted, ssd_spec((2, 2, 2)), Sampling(temperature=1.0, top_k=6))[:2])


def test_restricted_draft_vocab_negative_control_fails(restricted, restore):
  """q handed to the verifier by column position instead of token id."""

  def unmapped(params, probs, vocab_size):
    pad = vocab_size - probs.shape[-1]
    return jnp.pad(probs, [(0, 0)] * (probs.ndim - 1) + [(0, pad)])

  broken(restore, draft_lib, "to_vocab", unmapped)
  assert_broken(*decode_law(restricted, sd_spec(1.0), SAMPLED)[:2])


def test_oracle_warp_matches_the_documented_semantics():
  """The numpy oracle on hand-made distributions, ties included."""
  logits = np.log([[0.4, 0.2, 0.2, 0.1, 0.1]])
  top2 = exact.oracle_probs(logits, Sampling(temperature=1.0, top_k=2))  # the tie at 0.2: kept
  np.testing.assert_allclose(top2, [[0.5, 0.25, 0.25, 0, 0]])
  top_p = exact.oracle_probs(logits, Sampling(temperature=1.0, top_p=0.45))  # 0.4 < 0.45: 0.2s in
  np.testing.assert_allclose(top_p, [[0.5, 0.25, 0.25, 0, 0]])
  top_p = exact.oracle_probs(logits, Sampling(temperature=1.0, top_p=0.4))  # mass above 0.2 = 0.4
  np.testing.assert_allclose(top_p, [[1, 0, 0, 0, 0]])
  np.testing.assert_allclose(exact.oracle_probs(logits, Sampling()), [[1, 0, 0, 0, 0]])
  # The implementation agrees on the same cases.
  for s in (Sampling(temperature=1.0, top_k=2), Sampling(temperature=1.0, top_p=0.45)):
    ours = warped_probs(jnp.asarray(logits, jnp.float32), Warp.of([s]))
    np.testing.assert_allclose(ours, exact.oracle_probs(logits, s), atol=1e-6)
