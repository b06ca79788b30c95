"""Decoding loops: greedy equality across modes, EOS and budgets, determinism, the API."""

import dataclasses
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssd_jax import Engine, Sampling
from ssd_jax.config import SpecConfig
from ssd_jax.decode.state import Outcome, Report
from ssd_jax.models.registry import LoadedModel, load_model
from ssd_jax.timing import count_compiles

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
  engine = Engine(models["tiny-llama"], models["tiny-llama"])
  t0 = time.perf_counter()
  out = engine.generate(
    PROMPTS, spec=SpecConfig(mode="sd", lookahead=4), max_new_tokens=20, ignore_eos=True
  )
  call_seconds = time.perf_counter() - t0
  m = out.metrics
  assert m.generated_tokens == sum(len(t) for t in out.tokens) == 60
  # Prefill and decode are two spans inside the call, in seconds (no speed is claimed: a wrong
  # unit or a span that starts before the call fails whatever the machine's speed).
  assert m.prefill_seconds > 0 and m.decode_seconds > 0
  assert m.prefill_seconds + m.decode_seconds <= call_seconds
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
  with pytest.raises(ValueError, match="temperatures has 1 entries for 3 prompts"):
    Engine(target).generate(PROMPTS, temperatures=[1.0])
  with pytest.raises(ValueError, match="lookahead must be an int >= 1"):
    SpecConfig(mode="sd", lookahead=0)


@pytest.mark.parametrize(
  ("kwargs", "message"),
  [
    (dict(prompts=[]), "non-empty list of token-id lists"),
    (dict(prompts="hello"), "non-empty list of token-id lists"),
    (dict(prompts=[[1, 2], []]), "prompt 1 must be a non-empty list of int token ids"),
    (dict(prompts=[[1, 2.5]]), "prompt 0 must be a non-empty list of int token ids"),
    (dict(prompts=[[1, 264]]), r"prompt 0 has token id 264 outside the vocabulary \[0, 264\)"),
    (dict(prompts=[[3, -1]]), "prompt 0 has token id -1 outside the vocabulary"),
    (dict(max_new_tokens=[4, 4]), "max_new_tokens has 2 entries for 3 prompts"),
    (dict(max_new_tokens=-1), "max_new_tokens must be >= 0"),
    (dict(max_new_tokens=2.5), "max_new_tokens must be an int"),
    (dict(temperatures=[0.5, float("nan"), 1.0]), "temperatures: temperature must be a finite"),
    (dict(temperatures=[0.5, -1.0, 1.0]), "temperature must be a finite number >= 0"),
    (dict(sampling=[Sampling()]), "sampling has 1 entries for 3 prompts"),
    (dict(max_new_tokens=9000), "exceed the model's context of 8192"),
  ],
)
def test_bad_generate_arguments_are_named(models, kwargs, message):
  kwargs = dict(prompts=PROMPTS) | kwargs
  with pytest.raises(ValueError, match=message):
    Engine(models["tiny-llama"]).generate(kwargs.pop("prompts"), **kwargs)


@pytest.mark.parametrize(
  "fields",
  [
    dict(temperature=float("nan")),
    dict(temperature=float("inf")),
    dict(temperature=-0.5),
    dict(top_k=-1),
    dict(top_k=2.0),
    dict(top_p=0.0),
    dict(top_p=float("nan")),
    dict(top_p=1.5),
  ],
  ids=str,
)
def test_bad_sampling_is_refused(fields):
  with pytest.raises(ValueError, match="must be"):
    Sampling(**fields)


SETTINGS = [
  Sampling(temperature=0.9),
  Sampling(temperature=0.3),
  Sampling(temperature=0.8, top_k=5),
  Sampling(temperature=1.2, top_p=0.7),
  [Sampling(temperature=0.2, top_k=3), Sampling(temperature=1.1, top_p=0.5)],
  [Sampling(), Sampling(temperature=0.6, top_k=1)],  # a greedy row in a sampled batch
]


@pytest.mark.parametrize("mode", ["ar", "sd", "ssd"])
def test_new_sampling_settings_compile_nothing(models, mode):
  """Temperatures, top-k and top-p are data: after one sampled warm-up, any mix of them, for
  the batch or per row, runs the programs already compiled."""
  spec = {
    "ar": SpecConfig(mode="ar", lookahead=0),
    "sd": SpecConfig(mode="sd", lookahead=3),
    "ssd": SpecConfig(mode="ssd", lookahead=3, fan_out=(2, 2, 1, 1)),
  }[mode]
  engine = Engine(models["tiny-llama"], models["tiny-llama-draft"])
  prompts = [[1, 2, 3], [4, 5, 6, 7]]
  run = lambda **kw: engine.generate(prompts, spec=spec, max_new_tokens=16, **kw)
  run(sampling=Sampling(temperature=0.7))
  with count_compiles() as compiles:
    for seed, sampling in enumerate(SETTINGS):
      run(sampling=sampling, seed=seed)
    run(sampling=Sampling(temperature=0.7), temperatures=[0.2, 1.1])
  assert compiles == []


def test_count_compiles_counts_a_fresh_compile(models):
  """The positive control of every "nothing compiles" assertion (here, in test_ssd, test_run
  and test_speculator): a program compiled inside the block is counted once, in this thread or
  another; a warm one is not; and a warm engine's run that needs a program it lacks (a prompt
  in a longer bucket) is counted too."""
  x = jnp.arange(3.0)
  fresh = jax.jit(lambda x: x * 3 + 1)  # a function of its own: no program cached for it yet
  with count_compiles() as compiles:
    fresh(x)
  assert len(compiles) == 1, compiles
  with count_compiles() as compiles:
    fresh(x)
  assert compiles == []
  with count_compiles() as compiles:
    thread = threading.Thread(target=lambda: jax.jit(lambda x: x - 7)(x))
    thread.start()
    thread.join()
  assert len(compiles) == 1, compiles

  engine = Engine(models["tiny-llama"])
  run = lambda prompt: engine.generate([prompt], max_new_tokens=4, capacity=64)
  run([1, 2, 3])  # warm for prompts of up to 16 tokens
  with count_compiles() as compiles:
    run([4, 5, 6, 7])
  assert compiles == []
  with count_compiles() as compiles:
    run([4] * 20)  # the prefill of a 32-token bucket: compiled now
  assert len(compiles) >= 1


def test_a_report_reads_to_the_host_as_one_array_with_every_field():
  """A round's report packs every field into one array on the device (one copy to the host),
  and the host's views give back each field as the round computed it."""
  rng = np.random.default_rng(0)
  B, L = 5, 3
  fields = dict(
    tokens=rng.integers(0, 50_000, (B, L + 1)).astype(np.int32),
    count=rng.integers(0, L + 2, B).astype(np.int32),
    hit=rng.random(B) < 0.5,
  )
  decided = dict(
    accepted=rng.integers(0, L + 1, B).astype(np.int32),
    bonus=rng.integers(0, 50_000, B).astype(np.int32),
    committed=rng.integers(0, L + 2, B).astype(np.int32),
    done=rng.random(B) < 0.5,
  )
  outcome = jax.jit(lambda d: Outcome.of(**d))(decided)
  for drafted in (False, True):
    report = jax.jit(Report.pack)(**fields, drafted=np.bool_(drafted), outcome=outcome)
    host = report.on_host()
    assert isinstance(host.packed, np.ndarray) and host.on_host() is host
    for name, value in fields.items():
      got = getattr(host, name)
      assert got.dtype == value.dtype and np.array_equal(got, value), name
    assert host.drafted == drafted and np.array_equal(host.done, decided["done"])
    for name, value in decided.items():
      for side in (report.outcome, host.outcome):  # the device's (for the draft), the host's
        got = np.asarray(getattr(side, name))
        assert got.dtype == value.dtype and np.array_equal(got, value), name
    assert host.outcome.packed.flags.c_contiguous  # sent to a speculator process as it is
