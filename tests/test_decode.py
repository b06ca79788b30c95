"""Decoding loops: greedy equality across modes, EOS and budgets, determinism, the API."""

import dataclasses

import numpy as np
import pytest

from ssd_jax.config import SpecConfig
from ssd_jax.decode import Engine, Sampling
from ssd_jax.models.registry import LoadedModel, load_model

PROMPTS = [[5, 17, 99, 3, 42, 8, 8, 120], [7, 1], [200, 201, 202, 203, 204]]
FAMILIES = ["tiny-llama", "tiny-qwen2", "tiny-qwen3"]


@pytest.fixture(scope="module")
def models():
  return {name: load_model(name) for name in [*FAMILIES, "tiny-llama-draft"]}


@pytest.fixture(scope="module")
def ar_tokens(models):
  """Greedy autoregressive reference per family and batch shape."""
  out = {}
  for family in FAMILIES:
    engine = Engine(models[family])
    for batch in (1, 3):
      out[family, batch] = engine.generate(
        PROMPTS[:batch], max_new_tokens=24, ignore_eos=True
      ).tokens
  return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("lookahead", [1, 4, 7])
@pytest.mark.parametrize("draft_kind", ["same", "unrelated"])
def test_greedy_sd_equals_ar(models, ar_tokens, family, batch, lookahead, draft_kind):
  target = models[family]
  draft = target if draft_kind == "same" else models["tiny-llama-draft"]
  result = Engine(target, draft).generate(
    PROMPTS[:batch],
    spec=SpecConfig(mode="sd", lookahead=lookahead),
    max_new_tokens=24,
    ignore_eos=True,
  )
  assert result.tokens == ar_tokens[family, batch]
  m = result.metrics
  if draft_kind == "same":
    assert m.acceptance_per_position == [1.0] * lookahead
  else:
    assert m.acceptance_per_position[0] < 0.2  # an unrelated random draft rarely agrees
  assert m.generated_tokens == 24 * batch


def test_eos_and_per_row_budgets(models):
  target = models["tiny-llama"]
  free = Engine(target).generate(PROMPTS, max_new_tokens=30, ignore_eos=True).tokens
  # Pick a token the first row emits at step 5 and declare it EOS: row 0 must stop right there.
  eos = free[0][5]
  config = dataclasses.replace(target.config, eos_token_ids=(eos,))
  stopping = LoadedModel(target.name, config, target.params, target.tokenizer)
  for spec in (SpecConfig(mode="ar", lookahead=0), SpecConfig(mode="sd", lookahead=3)):
    out = Engine(stopping, target).generate(PROMPTS, spec=spec, max_new_tokens=[30, 4, 11])
    for row, (tokens, budget) in enumerate(zip(out.tokens, [30, 4, 11], strict=True)):
      expected = free[row][:budget]
      if eos in expected:
        expected = expected[: expected.index(eos) + 1]
      assert tokens == expected, (spec.mode, row)


@pytest.mark.parametrize("mode", ["ar", "sd"])
def test_sampling_is_deterministic_per_seed(models, mode):
  engine = Engine(models["tiny-qwen2"], models["tiny-llama-draft"])
  spec = SpecConfig(mode=mode, lookahead=3 if mode == "sd" else 0)
  run = lambda seed: (
    engine.generate(
      PROMPTS,
      spec=spec,
      sampling=Sampling(temperature=1.0),
      max_new_tokens=16,
      seed=seed,
      ignore_eos=True,
    ).tokens
  )
  assert run(0) == run(0)
  assert run(0) != run(1)


def test_mixed_greedy_and_sampled_rows(models):
  """Per-row temperatures: the greedy row reproduces greedy AR inside a sampled batch."""
  target = models["tiny-llama"]
  greedy = Engine(target).generate(PROMPTS, max_new_tokens=12, ignore_eos=True).tokens
  out = Engine(target, models["tiny-llama-draft"]).generate(
    PROMPTS,
    spec=SpecConfig(mode="sd", lookahead=2),
    temperatures=[0.0, 1.0, 0.7],
    max_new_tokens=12,
    ignore_eos=True,
  )
  assert out.tokens[0] == greedy[0]
  assert out.tokens[1] != greedy[1] or out.tokens[2] != greedy[2]


def test_metrics_are_consistent(models):
  out = Engine(models["tiny-llama"], models["tiny-llama"]).generate(
    PROMPTS, spec=SpecConfig(mode="sd", lookahead=4), max_new_tokens=20, ignore_eos=True
  )
  m = out.metrics
  assert m.generated_tokens == sum(len(t) for t in out.tokens) == 60
  assert m.tokens_per_second == pytest.approx(m.generated_tokens / m.decode_seconds)
  assert m.mean_accepted == 5.0
  summary = m.summary()
  assert summary["accepted_histogram"][-1] == m.rounds
  np.testing.assert_allclose(summary["acceptance_per_position"], 1.0)


def test_bad_inputs(models):
  target = models["tiny-llama"]
  with pytest.raises(ValueError, match="needs a draft model"):
    Engine(target).generate(PROMPTS, spec=SpecConfig(mode="sd", lookahead=2))
  mismatched = load_model("tiny-llama-draft")
  mismatched = LoadedModel(
    "other", dataclasses.replace(mismatched.config, vocab_size=300), mismatched.params, None
  )
  with pytest.raises(ValueError, match="vocabulary of 300 tokens but target"):
    Engine(target, mismatched)
  with pytest.raises(ValueError, match=r"capacity 16 cannot hold the longest prompt \(20 tokens\)"):
    Engine(target).generate([list(range(20))], max_new_tokens=2, capacity=16)
  with pytest.raises(ValueError, match="temperatures must be 3 values"):
    Engine(target).generate(PROMPTS, temperatures=[1.0])
  with pytest.raises(ValueError, match="lookahead must be an int >= 1"):
    SpecConfig(mode="sd", lookahead=0)
