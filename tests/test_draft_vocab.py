"""A draft whose LM head scores a subset of the vocabulary: the logits it produces, greedy
equality with AR in every speculative mode, the token ranking, bad input. Statistical exactness
with a restricted head is in test_exactness.py."""

import jax
import numpy as np
import pytest

from ssd_jax import Engine
from ssd_jax.config import SpecConfig
from ssd_jax.models import KVCache
from ssd_jax.models.registry import LoadedModel, load_model
from ssd_jax.models.transformer import forward, head_subset

PROMPTS = [[5, 17, 99, 3, 42, 8, 8, 120], [7, 1], [200, 201, 202, 203, 204]]
MODES = {
  "sd": SpecConfig(mode="sd", lookahead=3),
  "ssd neural": SpecConfig(mode="ssd", lookahead=3, fan_out=(2, 2, 2, 2)),
  "ssd fast": SpecConfig(mode="ssd", lookahead=3, fan_out=(2, 2, 2, 2), backup="fast"),
}


@pytest.fixture(scope="module")
def target():
  return load_model("tiny-llama")


@pytest.fixture(scope="module")
def ar(target):
  return Engine(target).generate(PROMPTS, max_new_tokens=20, ignore_eos=True).tokens


def test_restricted_head_scores_the_subset(target):
  cfg = target.config
  ids = np.random.default_rng(0).permutation(cfg.vocab_size)[:37]
  params = jax.device_put(target.params)
  cache = KVCache.init(cfg, 1, 16)
  tokens = np.asarray([[5, 17, 99]], np.int32)
  full, _ = forward(params, tokens, cache, config=cfg)
  part, _ = forward(params | head_subset(target.params, ids, cfg), tokens, cache, config=cfg)
  assert part.shape == (1, 3, 37)
  np.testing.assert_allclose(part, full[..., ids], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", list(MODES))
def test_draft_equal_to_target_on_its_own_outputs_accepts_everything(target, ar, mode):
  """Restricted to the tokens greedy decoding emits (in a scrambled order), a draft identical
  to the target still proposes exactly the target's tokens: all accepted, every round after
  the first served from the cache. A wrong column-to-token map would break this."""
  vocab = np.random.default_rng(1).permutation(np.unique(np.concatenate([*ar, *PROMPTS])))
  out = Engine(target, target, draft_vocab=vocab).generate(
    PROMPTS, spec=MODES[mode], max_new_tokens=20, ignore_eos=True
  )
  assert out.tokens == ar
  m = out.metrics
  if mode == "sd":
    assert m.mean_accepted == pytest.approx(4.0, abs=0.5)  # only budget-clipped rounds differ
  else:
    assert m.later_hit_rate == 1.0


@pytest.mark.parametrize("mode", list(MODES))
def test_restricted_unrelated_draft_equals_ar(target, ar, mode):
  """A draft that cannot propose most tokens: outputs unchanged, acceptance lower."""
  draft = load_model("tiny-llama-draft")
  vocab = np.arange(0, target.config.vocab_size, 3)
  out = Engine(target, draft, draft_vocab=vocab).generate(
    PROMPTS, spec=MODES[mode], max_new_tokens=20, ignore_eos=True
  )
  assert out.tokens == ar


def test_ranking_picks_the_most_frequent(target, tmp_path):
  ranking = np.random.default_rng(2).permutation(target.config.vocab_size).astype(np.int32)
  draft = LoadedModel("ranked", target.config, target.params, None, ranking)
  engine = Engine(target, draft, draft_vocab=10)
  assert engine.draft_params["head"].shape == (target.config.hidden_size, 10)
  np.testing.assert_array_equal(engine.draft_params["head_ids"], ranking[:10])
  # By default a ranked draft scores its DEFAULT_DRAFT_VOCAB most frequent tokens; here that is
  # the whole (264-token) vocabulary, so nothing is restricted; 0 asks for the whole one.
  assert "head_ids" not in Engine(target, draft).draft_params
  assert "head_ids" not in Engine(target, draft, draft_vocab=0).draft_params


def test_the_default_head_is_a_ranked_drafts_most_frequent_tokens(target, monkeypatch):
  """Engine's default is the command line's: a draft that ships a ranking scores its
  DEFAULT_DRAFT_VOCAB most frequent tokens (here made smaller than the tiny vocabulary)."""
  from ssd_jax.speculator import local  # noqa: PLC0415

  monkeypatch.setattr(local, "DEFAULT_DRAFT_VOCAB", 12)
  ranking = np.random.default_rng(3).permutation(target.config.vocab_size).astype(np.int32)
  draft = LoadedModel("ranked", target.config, target.params, None, ranking)
  np.testing.assert_array_equal(Engine(target, draft).draft_params["head_ids"], ranking[:12])


def test_token_ranking_loads_from_an_hf_directory(tmp_path):
  from ssd_jax.models.weights import save_hf  # noqa: PLC0415

  model = load_model("tiny-llama")
  save_hf(tmp_path, model.config, model.params)
  assert load_model(str(tmp_path)).token_ranking is None
  np.save(tmp_path / "token_ranking.npy", np.arange(50, dtype=np.int32)[::-1])
  np.testing.assert_array_equal(load_model(str(tmp_path)).token_ranking, np.arange(50)[::-1])
  np.save(tmp_path / "token_ranking.npy", np.asarray([3, 3], np.int32))
  with pytest.raises(ValueError, match="distinct"):
    load_model(str(tmp_path))


@pytest.mark.parametrize(
  ("draft_vocab", "message"),
  [
    (10, "no token ranking"),
    (-1, r"must be in \[1, "),
    ([1, 1, 2], "distinct"),
    ([1, 99999], "must be in"),
    ([], "non-empty"),
  ],
)
def test_bad_draft_vocab(target, draft_vocab, message):
  with pytest.raises(ValueError, match=message):
    Engine(target, load_model("tiny-llama-draft"), draft_vocab=draft_vocab)


def test_draft_vocab_without_a_draft(target):
  with pytest.raises(ValueError, match="no draft"):
    Engine(target, draft_vocab=10)


def test_greedy_agreement_with_a_restricted_head(target, ar):
  """The target agrees with its own greedy continuations, restricted to the tokens they use or
  not; restricted to tokens they never use it agrees with none."""
  from ssd_jax.models.agreement import greedy_agreement  # noqa: PLC0415

  prompts, conts = PROMPTS, [a[:12] for a in ar]
  used = np.unique(np.concatenate(conts))
  unused = np.setdiff1d(np.arange(target.config.vocab_size), used)
  n = sum(map(len, conts))
  assert greedy_agreement(target, prompts, conts) == (n, n)
  assert greedy_agreement(target, prompts, conts, used[::-1]) == (n, n)
  assert greedy_agreement(target, prompts, conts, unused) == (0, n)
