"""The SSD engine: greedy equality, hand-computed fork/lookup cases, placement, recompilation,
bad input. Statistical exactness of its paths is in test_exactness.py."""

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssd_jax import Engine, Sampling
from ssd_jax.config import SpecConfig
from ssd_jax.decode import draft as draft_lib
from ssd_jax.decode import slots, speculate, tree
from ssd_jax.decode.plan import DraftPlan
from ssd_jax.decode.state import Outcome, Speculation, SpeculationCache
from ssd_jax.models import KVCache, placement
from ssd_jax.models.prefill import prefill_window
from ssd_jax.models.registry import load_model
from ssd_jax.speculator.base import Join, admissions
from ssd_jax.speculator.remote import served_from
from ssd_jax.timing import count_compiles

PROMPTS = [[5, 17, 99, 3, 42, 8, 8, 120], [7, 1], [200, 201, 202, 203, 204]]
FAMILIES = ["tiny-llama", "tiny-qwen2", "tiny-qwen3"]


@pytest.fixture(scope="module")
def models():
  return {name: load_model(name) for name in [*FAMILIES, "tiny-llama-draft"]}


@pytest.fixture(scope="module")
def ar_tokens(models):
  return {
    (f, b): Engine(models[f]).generate(PROMPTS[:b], max_new_tokens=20, ignore_eos=True).tokens
    for f in FAMILIES
    for b in (1, 3)
  }


def fan_outs(lookahead, kind):
  if kind == "uniform":
    return tree.uniform(lookahead, 2), ()
  if kind == "geometric":
    return tree.geometric(lookahead, 2 * (lookahead + 1), acceptance=0.7), ()
  # "miss": nothing cached for the all-accepted outcome, so draft == target always misses.
  return (3,) * lookahead + (0,), ()


# Every family with hit-heavy configurations; the miss paths (one per backup) on one family.
CASES = [(f, k, b) for f in FAMILIES for k, b in (("uniform", "neural"), ("geometric", "fast"))]
CASES += [("tiny-llama", "miss", "neural"), ("tiny-llama", "miss", "fast")]


@pytest.mark.parametrize(("family", "kind", "backup"), CASES)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("lookahead", [2, 5])
def test_greedy_ssd_equals_ar(models, ar_tokens, family, batch, lookahead, kind, backup):
  target = models[family]
  fan_out, fan_out_miss = fan_outs(lookahead, kind)
  spec = SpecConfig(
    mode="ssd", lookahead=lookahead, fan_out=fan_out, fan_out_miss=fan_out_miss, backup=backup
  )
  out = Engine(target, target).generate(
    PROMPTS[:batch], spec=spec, max_new_tokens=20, ignore_eos=True
  )
  assert out.tokens == ar_tokens[family, batch]
  m = out.metrics
  if kind == "miss":
    # Always a miss after a neural backup (it drafts like the target: all accepted, uncached);
    # after a fast backup the rejection at depth 0 is cached, so hits and misses alternate.
    misses = m.accept_hist[0].sum()
    assert misses == m.rounds if backup == "neural" else misses > batch
  else:  # draft == target: every round after the first hits (all accepted, bonus = argmax)
    first_rounds = batch
    assert m.hit_rate == pytest.approx((m.rounds - first_rounds) / m.rounds)
    assert m.mean_accepted_hit == lookahead + 1


@pytest.mark.parametrize("backup", ["neural", "fast"])
def test_greedy_ssd_with_unrelated_draft(models, ar_tokens, backup):
  spec = SpecConfig(mode="ssd", lookahead=3, fan_out=(3, 2, 2, 1), backup=backup)
  out = Engine(models["tiny-qwen2"], models["tiny-llama-draft"]).generate(
    PROMPTS, spec=spec, max_new_tokens=20, ignore_eos=True
  )
  assert out.tokens == ar_tokens["tiny-qwen2", 3]


def test_fork_hand_computed():
  """Depth j forks the top-F_j glue tokens, skipping the token speculated there."""
  V = 6
  glue = jnp.log(
    jnp.asarray(
      [
        [
          [0.5, 0.2, 0.1, 0.1, 0.05, 0.05],  # depth 0: x_1 = 0 is excluded -> 1, then 2
          [0.1, 0.1, 0.6, 0.1, 0.05, 0.05],  # depth 1: x_2 = 3 excluded -> 2
          [0.0, 0.0, 0.0, 0.0, 0.3, 0.7],  # depth 2 (all accepted): nothing excluded -> 5, 4
        ]
      ]
    )
  )
  speculation = Speculation(
    tokens=jnp.asarray([[9 % V, 0, 3]]),
    probs=None,
    point_mass=jnp.zeros(1, bool),
    hit=jnp.asarray([True]),
  )
  keys, depth, valid = speculate.fork(glue, speculation, (2, 1, 2), (1, 1, 3))
  np.testing.assert_array_equal(keys, [[1, 2, 2, 5, 4]])
  np.testing.assert_array_equal(depth, [[0, 0, 1, 2, 2]])
  assert valid.all()
  # A row whose speculation was a miss uses the miss list; tokens of zero mass are invalid.
  speculation = dataclasses.replace(speculation, hit=jnp.asarray([False]))
  keys, depth, valid = speculate.fork(glue, speculation, (2, 1, 2), (1, 1, 3))
  np.testing.assert_array_equal(keys[0, :3], [1, 2, 5])
  np.testing.assert_array_equal(depth, [[0, 1, 2, 2, 2]])
  assert valid[0, :4].all() and not valid[0, 4]  # the third candidate at depth 2 has p = 0


def _cache(B=3, lookahead=2):
  """Branches: (depth 0, key 7), (depth 1, key 8), (depth 2, key 9) for every row."""
  keys = jnp.asarray([[7, 8, 9]] * B)
  tokens = jnp.arange(B * 3 * lookahead).reshape(B, 3, lookahead) + 100
  return SpeculationCache(
    keys=keys,
    depth=jnp.asarray([[0, 1, 2]] * B),
    tokens=tokens,
    probs=None,
    valid=jnp.ones((B, 3), bool),
  )


@pytest.mark.parametrize("seed", range(20))
def test_hits_served_from_a_sent_cache_are_the_lookups(models, seed):
  """What a target serves from a speculator's greedy cache (`remote.served_from`, host arrays) is
  what the speculator's own lookup would serve, and it serves only when every row hits: random
  caches with repeated keys and invalid branches, outcomes that hit some rows or all."""
  rng = np.random.default_rng(seed)
  B, N, lookahead = 3, 6, 2
  cache = SpeculationCache(
    keys=jnp.asarray(rng.integers(0, 4, (B, N)), jnp.int32),
    depth=jnp.asarray(rng.integers(0, lookahead + 1, (B, N)), jnp.int32),
    tokens=jnp.asarray(rng.integers(0, 50, (B, N, lookahead)), jnp.int32),
    probs=None,
    valid=jnp.asarray((rng.random((B, N)) < 0.8) | (np.arange(N) == 0)),
  )
  # Each row's outcome is one of its valid branches (the first of equal ones is served); with
  # odd seeds row 1's bonus is no key at all: a miss, so nothing may be served.
  branch = np.asarray([rng.choice(np.flatnonzero(row)) for row in np.asarray(cache.valid)])
  rows = np.arange(B)
  bonus = np.asarray(cache.keys)[rows, branch]
  bonus[1] = 99 if seed % 2 else bonus[1]
  outcome = Outcome.of(
    accepted=jnp.asarray(np.asarray(cache.depth)[rows, branch], jnp.int32),
    bonus=jnp.asarray(bonus, jnp.int32),
    committed=jnp.ones(B, jnp.int32),
    done=jnp.zeros(B, bool),
  )
  sent = {k: np.asarray(getattr(cache, k)) for k in ("keys", "depth", "tokens", "valid")}
  served = served_from(sent, jax.device_get(outcome))
  draft = models["tiny-llama-draft"]
  plan = draft_plan(draft.config, lookahead, backup="fast")
  _, looked_up = speculate.lookup(
    draft.params, draft_state(draft, plan, B), cache, outcome, plan=plan
  )
  if seed % 2:
    assert served is None and not np.asarray(looked_up.hit)[1]
    return
  for field in ("tokens", "point_mass", "hit"):
    got, expected = getattr(served, field), np.asarray(getattr(looked_up, field))
    np.testing.assert_array_equal(got, expected)
    assert got.dtype == expected.dtype, field  # the target's step must not recompile


def draft_plan(config, lookahead, backup="neural", fan_out=(1, 1, 1)):
  return DraftPlan(
    config=config,
    head_size=config.vocab_size,
    lookahead=lookahead,
    fan_out=fan_out,
    fan_out_miss=fan_out,
    saguaro_c=1.0,
    backup=backup,
    expands=True,
    greedy=True,
    attention_impl="xla",
  )


def draft_state(draft, plan, B, mesh=None):
  """A draft state after prefilling B prompts of four 1s (lengths 3 + the pending token)."""
  put = (lambda x: x) if mesh is None else (lambda x: jax.device_put(x, mesh.devices.flat[0]))
  cache = (
    KVCache.init(draft.config, B, 32)
    if mesh is None
    else placement.init_cache(draft.config, mesh, B, 32, jnp.float32)
  )
  params = draft.params if mesh is None else put(draft.params)
  rows = put(dataclasses.replace(slots.empty_draft(cache), cache=None))
  state = dataclasses.replace(rows, cache=cache)
  tokens = np.ones((1, 16), np.int32)
  joins = tuple(
    Join(
      slot=b,
      tokens=tokens,
      length=4,
      max_new=8,
      temperature=0.0,
      top_k=0,
      top_p=1.0,
      seed=np.asarray([0, b], np.uint32),
    )
    for b in range(B)
  )
  ((padded, admission),) = admissions(joins, bulk=True)
  window = prefill_window(params, put(padded), config=plan.config)
  return slots.admit_draft(state, window, put(admission))


def test_lookup_hit_miss_partial_batch_and_all_accepted(models):
  draft = models["tiny-llama-draft"]
  B, lookahead = 3, 2
  # Row 0: depth 1, bonus 8 -> hit. Row 1: depth 1, bonus 7 -> miss (7 is a depth-0 key).
  # Row 2: all accepted (depth 2 = lookahead), bonus 9 -> hit.
  outcome = Outcome.of(
    accepted=jnp.asarray([1, 1, 2]),
    bonus=jnp.asarray([8, 7, 9]),
    committed=jnp.asarray([2, 2, 3]),
    done=jnp.zeros(3, bool),
  )
  cache = _cache(B, lookahead)
  hit, index = speculate.find(cache, outcome)
  np.testing.assert_array_equal(hit, [True, False, True])
  np.testing.assert_array_equal(index[jnp.asarray([0, 2])], [1, 2])
  fast = draft_plan(draft.config, lookahead, backup="fast")
  state = draft_state(draft, fast, B)
  new_state, spec = speculate.lookup(draft.params, state, cache, outcome, plan=fast)
  np.testing.assert_array_equal(new_state.cache.lengths, [5, 5, 6])  # 3 + committed
  np.testing.assert_array_equal(spec.tokens[:, 0], [8, 7, 9])
  np.testing.assert_array_equal(spec.tokens[0, 1:], cache.tokens[0, 1])
  np.testing.assert_array_equal(spec.tokens[2, 1:], cache.tokens[2, 2])
  np.testing.assert_array_equal(spec.hit, [True, False, True])
  np.testing.assert_array_equal(spec.point_mass, [False, True, False])
  # Neural backup: the miss row gets exactly what the draft proposes from its bonus.
  neural = draft_plan(draft.config, lookahead)
  _, spec = speculate.lookup(
    draft.params, draft_state(draft, neural, B), cache, outcome, plan=neural
  )
  state = draft_state(draft, neural, B)
  _, fresh = draft_lib.propose(
    draft.params, state, outcome, outcome.bonus, jnp.zeros(B, bool), plan=neural
  )
  np.testing.assert_array_equal(spec.tokens[1], fresh.tokens[1])
  assert not spec.point_mass.any()


def test_an_expanded_proposal_leaves_its_last_key_to_the_glue(models):
  """ssd's proposals skip writing the last draft token's key/value (the expansion's glue
  forward writes all of them): after the expansion the draft cache is the one sd's full
  proposal leaves, and so is everything the expansion drafted."""
  draft = models["tiny-llama-draft"]
  B, lookahead = 2, 3
  plans = [
    dataclasses.replace(draft_plan(draft.config, lookahead, fan_out=(2, 1, 1, 1)), expands=e)
    for e in (False, True)
  ]
  before, after = [], []
  for plan in plans:
    state, speculation = draft_lib.propose(
      draft.params,
      draft_state(draft, plan, B),
      Outcome.nothing(B),
      jnp.asarray([5, 9]),
      jnp.ones(B, bool),
      plan=plan,
    )
    before.append(np.asarray(state.cache.k))
    after.append(speculate.expand(draft.params, state, speculation, plan=plan))
  assert not np.array_equal(*before)  # the skipped write, before the glue
  (full, cache_full), (skipped, cache_skipped) = after
  end = int(full.cache.lengths.max()) + lookahead + 1  # every slot anything wrote
  np.testing.assert_array_equal(skipped.cache.k[:, :, :end], full.cache.k[:, :, :end])
  np.testing.assert_array_equal(skipped.cache.v[:, :, :end], full.cache.v[:, :, :end])
  np.testing.assert_array_equal(cache_skipped.tokens, cache_full.tokens)
  np.testing.assert_array_equal(cache_skipped.keys, cache_full.keys)


@pytest.fixture
def drafting_runs(monkeypatch):
  """Counts executions of the draft's synchronous drafting (first proposals and neural backups)
  on the device, with `jax.debug.callback`."""
  runs = []
  decode_steps = draft_lib.decode_steps

  def counted(*args, **kwargs):
    jax.debug.callback(lambda: runs.append(1))
    return decode_steps(*args, **kwargs)

  monkeypatch.setattr(draft_lib, "decode_steps", counted)
  jax.clear_caches()
  yield runs
  monkeypatch.undo()
  jax.clear_caches()


def test_finished_rows_do_not_force_the_neural_backup(models, drafting_runs):
  """A miss in a row that is done after this outcome (EOS, budget, padding) must not make the
  batch wait for a backup."""
  draft = models["tiny-llama-draft"]
  plan = draft_plan(draft.config, 2)
  outcome = Outcome.of(
    accepted=jnp.asarray([1, 1, 2]),
    bonus=jnp.asarray([8, 7, 9]),  # row 1 misses
    committed=jnp.asarray([2, 2, 3]),
    done=jnp.asarray([False, True, False]),
  )
  state = draft_state(draft, plan, 3)
  jax.block_until_ready(speculate.lookup(draft.params, state, _cache(), outcome, plan=plan))
  assert drafting_runs == []
  active_miss = Outcome.of(
    accepted=outcome.accepted,
    bonus=outcome.bonus,
    committed=outcome.committed,
    done=jnp.zeros(3, bool),
  )
  state = draft_state(draft, plan, 3)
  jax.block_until_ready(speculate.lookup(draft.params, state, _cache(), active_miss, plan=plan))
  assert drafting_runs == [1]


@pytest.mark.parametrize(
  ("budgets", "fan_out", "backups"),
  [
    ([40, 40], (2, 2, 2, 2), 0),  # draft = target: every active round after the first hits
    ([40, 0], (2, 2, 2, 2), 0),  # a padding row (the harness pads the last batch this way)
    ([40, 4], (2, 2, 2, 2), 0),  # a row that finishes early
    ([40, 4], (3, 3, 2, 0), None),  # nothing cached for full acceptance: always a miss
  ],
)
def test_backups_run_only_for_active_misses_and_are_counted(
  models, drafting_runs, budgets, fan_out, backups
):
  target = models["tiny-llama"]
  spec = SpecConfig(mode="ssd", lookahead=3, fan_out=fan_out)
  out = Engine(target, target).generate(
    PROMPTS[:2], spec=spec, max_new_tokens=budgets, ignore_eos=True
  )
  m = out.metrics
  jax.effects_barrier()
  assert len(drafting_runs) == 1 + m.backup_rounds  # the first proposal, then the backups
  assert m.summary()["backup_rounds"] == m.backup_rounds
  if backups is None:  # every round after the first needed the backup
    assert m.backup_rounds == len(m.round_drafted) - 1 > 5
  else:
    assert m.backup_rounds == backups


def test_programs_run_on_disjoint_devices(models):
  target, draft = models["tiny-qwen3"], models["tiny-llama-draft"]
  engine = Engine(target, draft, target_devices=4)
  t_devices = {d for x in jax.tree.leaves(engine.target_params) for d in x.devices()}
  d_devices = {d for x in jax.tree.leaves(engine.draft_params) for d in x.devices()}
  assert len(t_devices) == 4 and len(d_devices) == 1 and not t_devices & d_devices
  plan = draft_plan(draft.config, 3, fan_out=(2, 2, 2, 2))
  dstate = draft_state(draft, plan, 1, mesh=engine.draft_mesh)
  (device,) = d_devices
  last, fresh = jax.device_put((jnp.ones((1,), jnp.int32), jnp.ones((1,), bool)), device)
  nothing = jax.device_put(Outcome.nothing(1), device)
  dstate, proposal = draft_lib.propose(engine.draft_params, dstate, nothing, last, fresh, plan=plan)
  _, speculations = speculate.expand(engine.draft_params, dstate, proposal, plan=plan)
  assert {d for x in jax.tree.leaves(speculations) for d in x.devices()} == d_devices


def test_tensor_parallel_target_matches_single_device(models):
  target = models["tiny-qwen3"]  # 4 query heads, 4 KV heads: splits over 4 devices
  spec = SpecConfig(mode="ssd", lookahead=3, fan_out=(2, 2, 1, 1))
  one = Engine(target, models["tiny-llama-draft"]).generate(
    PROMPTS, spec=spec, max_new_tokens=16, ignore_eos=True
  )
  four = Engine(target, models["tiny-llama-draft"], target_devices=4).generate(
    PROMPTS, spec=spec, max_new_tokens=16, ignore_eos=True
  )
  assert four.tokens == one.tokens


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_no_recompilation_after_warmup(models, temperature):
  engine = Engine(models["tiny-llama"], models["tiny-llama-draft"])
  spec = SpecConfig(mode="ssd", lookahead=3, fan_out=(2, 2, 1, 1))
  run = dict(spec=spec, sampling=Sampling(temperature=temperature), max_new_tokens=24)
  engine.generate([[1, 2, 3]], capacity=64, **run)
  with count_compiles() as compiles:
    for seed, prompt in enumerate(([4, 5, 6, 7, 8, 9], [10] * 15, [3])):  # same bucket (16)
      engine.generate([prompt], capacity=64, seed=seed, trace=seed == 1, **run)
  assert compiles == []


@pytest.mark.parametrize("mode", ["ar", "sd", "ssd"])
def test_one_host_read_per_round(models, mode, monkeypatch):
  """The loop reads one small array per round (explicitly); any implicit device-to-host
  transfer (np.asarray, int(), a Python branch on a device value) would raise."""
  engine = Engine(models["tiny-llama"], models["tiny-llama-draft"])
  spec = {
    "ar": SpecConfig(mode="ar", lookahead=0),
    "sd": SpecConfig(mode="sd", lookahead=3),
    "ssd": SpecConfig(mode="ssd", lookahead=3, fan_out=(2, 2, 1, 1)),
  }[mode]
  engine.generate(PROMPTS, spec=spec, max_new_tokens=16, ignore_eos=True)  # warm
  reads, device_get = [], jax.device_get
  monkeypatch.setattr(jax, "device_get", lambda x: reads.append(x) or device_get(x))
  with jax.transfer_guard_device_to_host("disallow"):
    out = engine.generate(PROMPTS, spec=spec, max_new_tokens=16, ignore_eos=True)
  assert out.metrics.loop_rounds >= 4
  # One read per round, of one array (the packed report: one device-to-host copy, not a copy
  # per field), and nothing after the loop.
  assert len(reads) == out.metrics.loop_rounds, (len(reads), out.metrics.loop_rounds)
  assert all(isinstance(r, jax.Array) for r in reads), [type(r) for r in reads]


def test_bad_input(models):
  with pytest.raises(ValueError, match="fan_out needs lookahead \\+ 1 = 4 entries"):
    SpecConfig(mode="ssd", lookahead=3, fan_out=(1, 2))
  with pytest.raises(ValueError, match="equal sums"):
    SpecConfig(mode="ssd", lookahead=2, fan_out=(1, 1, 1), fan_out_miss=(3, 1, 0))
  with pytest.raises(ValueError, match="needs a fan_out list"):
    SpecConfig(mode="ssd", lookahead=2, fan_out=())
  target, draft = models["tiny-llama"], models["tiny-llama-draft"]
  with pytest.raises(ValueError, match="need 9 devices"):
    Engine(target, draft, target_devices=8)
  spec = SpecConfig(mode="ssd", lookahead=6, fan_out=(1,) * 7)
  with pytest.raises(ValueError, match="capacity 16 cannot hold"):
    Engine(target, draft).generate([[1] * 8], spec=spec, max_new_tokens=4, capacity=16)


def test_single_device_shares_with_a_warning(models):
  target, draft = models["tiny-llama"], models["tiny-llama-draft"]
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    engine = Engine(target, draft, devices=jax.devices()[:1])
  assert any("cannot overlap" in str(w.message) for w in caught)
  spec = SpecConfig(mode="ssd", lookahead=2, fan_out=(1, 1, 1))
  out = engine.generate(PROMPTS[:1], spec=spec, max_new_tokens=8, ignore_eos=True)
  assert len(out.tokens[0]) == 8


def test_auto_backup_picks_by_batch_size(models):
  engine = Engine(models["tiny-llama"], models["tiny-llama-draft"])
  spec = SpecConfig(
    mode="ssd", lookahead=2, fan_out=(1, 1, 1), backup="auto", auto_batch_threshold=2
  )
  run = lambda prompts, s: engine.generate(prompts, spec=s, max_new_tokens=4).metrics.extra
  assert run(PROMPTS[:1], spec)["backup"] == "neural"
  assert run(PROMPTS, spec)["backup"] == "fast"
  # Without a configured b*, it comes from Theorem 17 with the engine's calibration.
  engine.calibration = dict(p_hit=0.85, e_hit=5.0, e_miss_neural=5.0, t_neural=0.5)
  measured = SpecConfig(mode="ssd", lookahead=2, fan_out=(1, 1, 1), backup="auto")
  extra = run(PROMPTS[:2], measured)
  assert extra["backup_threshold"] == 2.0 and extra["backup"] == "fast"


@pytest.mark.parametrize("impl", ["reference", "pallas"])
def test_every_attention_impl_gives_the_same_greedy_tokens(models, ar_tokens, impl):
  """The engine (verify, glue, tree steps, backups) through each tree-attention impl."""
  spec = SpecConfig(mode="ssd", lookahead=2, fan_out=(2, 1, 1))
  out = Engine(models["tiny-llama"], models["tiny-llama-draft"], attention_impl=impl).generate(
    PROMPTS[:1], spec=spec, max_new_tokens=8, ignore_eos=True
  )
  assert out.tokens[0] == ar_tokens["tiny-llama", 1][0][:8]


@pytest.mark.parametrize("backup", ["neural", "fast"])
@pytest.mark.parametrize("draft_name", ["tiny-llama", "tiny-llama-draft"])
def test_greedy_ssd_with_eos_budgets_and_ragged_prompts(models, backup, draft_name):
  """EOS mid-stream in some rows, per-row budgets, ragged prompts, batch 3: every row is AR's
  tokens cut at its first EOS or its budget."""
  target = models["tiny-llama"]
  free = Engine(target).generate(PROMPTS, max_new_tokens=30, ignore_eos=True).tokens
  eos = free[0][5]  # row 0 emits it at step 5; the others maybe later or never
  config = dataclasses.replace(target.config, eos_token_ids=(eos,))
  stopping = type(target)(target.name, config, target.params, target.tokenizer)
  budgets = [30, 4, 11]
  spec = SpecConfig(mode="ssd", lookahead=3, fan_out=(2, 2, 1, 1), backup=backup)
  out = Engine(stopping, models[draft_name]).generate(PROMPTS, spec=spec, max_new_tokens=budgets)
  for row, (tokens, budget) in enumerate(zip(out.tokens, budgets, strict=True)):
    expected = free[row][:budget]
    if eos in expected:
      expected = expected[: expected.index(eos) + 1]
    assert tokens == expected, row
  assert out.tokens[0][-1] == eos and len(out.tokens[1]) == 4


def _served_wrong_branch(speculations, outcome):
  """A lookup that finds the right entry but serves its neighbour's continuation."""
  hit, index = _find(speculations, outcome)
  return hit, (index + 1) % speculations.keys.shape[1]


_find = speculate.find
HIT_CASES = [(1, (2, 2), 1), (3, (2, 2, 2, 2), 1), (3, (3, 1, 1, 2), 3), (5, (1,) * 6, 3)]


@pytest.mark.parametrize("temperature", [0.0, 0.4])
@pytest.mark.parametrize(("lookahead", "fan_out", "batch"), HIT_CASES)
def test_with_the_target_as_draft_every_hit_accepts_everything(
  models, lookahead, fan_out, batch, temperature
):
  """A hit serves the continuation drafted for the very outcome that happened: with the target
  as its own draft (q = p), every round served from the cache accepts all its tokens."""
  target = models["tiny-qwen2"]
  spec = SpecConfig(mode="ssd", lookahead=lookahead, fan_out=fan_out)
  out = Engine(target, target).generate(
    PROMPTS[:batch],
    spec=spec,
    sampling=Sampling(temperature=temperature),
    max_new_tokens=64,
    ignore_eos=True,
    seed=1,
  )
  hits = out.metrics.accept_hist[1]  # rounds served from the cache, by accepted count
  assert hits.sum() >= 4 * batch, hits
  assert hits[:lookahead].sum() == 0, hits


def test_serving_the_wrong_branch_is_caught(models, monkeypatch):
  """The mutant: the cache entry that matched, but its neighbour's tokens."""
  monkeypatch.setattr(speculate, "find", _served_wrong_branch)
  jax.clear_caches()
  try:
    target = models["tiny-qwen2"]
    spec = SpecConfig(mode="ssd", lookahead=3, fan_out=(2, 2, 2, 2))
    out = Engine(target, target).generate(PROMPTS, spec=spec, max_new_tokens=40, ignore_eos=True)
  finally:
    monkeypatch.undo()
    jax.clear_caches()
  hits = out.metrics.accept_hist[1]
  assert hits.sum() > 0 and hits[:3].sum() > 0
