"""Continuous batching (`Session`): requests join and leave a persistent batch between rounds,
in ar, sd and ssd, on tiny random models. A request's tokens never depend on its neighbours:
greedy, each equals its prompt decoded alone; sampled with a seed, the same draws whatever runs
beside it; at T = 1 the law of every request is the target's while others join and leave (a
statistical test against the exact law, with a negative control that must fail)."""

import dataclasses

import exact
import jax
import numpy as np
import pytest

from ssd_jax import Engine, Sampling, SpecConfig, load_model
from ssd_jax.decode import slots
from ssd_jax.runtime.requests import QueueFullError, Request
from ssd_jax.speculator.base import Join, join_arrays, joins_of, seed_data
from ssd_jax.timing import count_compiles

SPECS = {
  "ar": SpecConfig(mode="ar"),
  "sd": SpecConfig(mode="sd", lookahead=3),
  "ssd": SpecConfig(mode="ssd", lookahead=3, fan_out=(2, 2, 1, 1)),
}


@pytest.fixture(scope="module")
def engine():
  return Engine(load_model("tiny-llama"), load_model("tiny-llama-draft"), placement="device")


def requests(n: int, seed: int = 0, **kw) -> list[Request]:
  rng = np.random.default_rng(seed)
  return [
    Request(
      prompt=rng.integers(1, 250, rng.integers(1, 40)).tolist(),
      max_new_tokens=int(rng.integers(1, 24)),
      ignore_eos=True,
      **kw,
    )
    for _ in range(n)
  ]


def churn(session, reqs: list[Request], seed: int = 1) -> list:
  """Submit `reqs` a few at a time between rounds (so requests join while others decode and
  leave at their own budgets), run until every one ends; their handles."""
  rng = np.random.default_rng(seed)
  handles = []
  for request in reqs:
    handles.append(session.submit(request))
    for _ in range(int(rng.integers(0, 3))):
      session.step()
  session.run()
  return handles


@pytest.mark.parametrize("mode", list(SPECS))
def test_greedy_under_churn_equals_each_request_alone(engine, mode):
  spec, reqs = SPECS[mode], requests(12)
  alone = [
    engine.generate([r.prompt], spec=spec, max_new_tokens=r.max_new_tokens, ignore_eos=True)
    for r in reqs
  ]
  with engine.session(spec, max_batch_size=4, max_model_len=128) as session:
    handles = churn(session, reqs)
    stats = session.stats
  assert [h.tokens for h in handles] == [a.tokens[0] for a in alone]
  assert all(h.finish_reason == "length" for h in handles)
  assert stats.resizes > 0 and len(stats.occupancy) >= 3  # rows moved, buckets changed
  assert stats.finished_requests == len(reqs)


@pytest.mark.parametrize("mode", ["sd", "ssd"])
def test_a_seeded_request_draws_the_same_whatever_runs_beside_it(engine, mode):
  """Its randomness is its own seed's at its own positions: alone, or in another slot among
  requests that join and leave, it draws the same tokens."""
  spec = SPECS[mode]
  mine = Request(
    prompt=[5, 17, 99, 3], sampling=Sampling(temperature=1.0), max_new_tokens=20, seed=7
  )
  others = requests(6, seed=3, sampling=Sampling(temperature=0.8))
  with engine.session(spec, max_batch_size=4, max_model_len=128) as session:
    alone = session.submit(mine)
    session.run()
    handles = churn(session, [*others[:3], mine, *others[3:]])
  assert handles[3].tokens == alone.tokens and len(alone.tokens) == 20
  with engine.session(spec, max_batch_size=4, max_model_len=128) as session:  # another seed
    other = session.submit(dataclasses.replace(mine, seed=8))
    session.run()
  assert other.tokens != alone.tokens


def test_stop_tokens_and_strings_end_a_request(engine):
  spec = SPECS["ssd"]
  prompt, tokenizer = [72, 101, 108, 108, 111], engine.target.tokenizer
  free = engine.generate([prompt], spec=spec, max_new_tokens=16, ignore_eos=True).tokens[0]
  text = [tokenizer.decode(free[:i]) for i in range(len(free) + 1)]
  # A stop string: what the sixth token adds to the text (the earliest place it appears).
  stop = text[6][len(text[5]) :] or text[6]
  cut = next(i for i in range(1, len(free) + 1) if stop in text[i])
  with engine.session(spec, max_batch_size=2, max_model_len=64) as session:
    by_token = session.submit(Request(prompt=prompt, max_new_tokens=16, stop_token_ids=(free[4],)))
    by_text = session.submit(Request(prompt=prompt, max_new_tokens=16, stop=(stop,)))
    session.run()
  first = free.index(free[4]) + 1
  assert by_token.tokens == free[:first] and by_token.finish_reason == "stop"
  assert by_text.tokens == free[:cut] and by_text.finish_reason == "stop"


def test_a_cancelled_request_frees_its_slot_for_the_next_round(engine):
  spec = SPECS["ssd"]
  long, next_one = requests(2, seed=5)
  long = dataclasses.replace(long, max_new_tokens=40)
  with engine.session(spec, max_batch_size=1, max_model_len=128) as session:
    a = session.submit(long)
    session.step()
    session.step()
    b = session.submit(next_one)
    assert session.waiting() == [b]
    session.cancel(a)
    session.step()  # the boundary frees a's slot and b enters it; then b's first round
    assert session.running() == [b] and a.finish_reason == "cancelled"
    session.run()
  alone = engine.generate([next_one.prompt], spec=spec, max_new_tokens=next_one.max_new_tokens)
  assert b.tokens == alone.tokens[0] and len(a.tokens) < 40


def test_a_full_queue_and_bad_requests_are_refused(engine):
  with engine.session(SPECS["sd"], max_batch_size=1, max_model_len=64, max_queue=2) as session:
    session.submit(Request(prompt=[1, 2], max_new_tokens=4))
    session.submit(Request(prompt=[1, 2], max_new_tokens=4))
    with pytest.raises(QueueFullError, match="wait queue is full"):
      session.submit(Request(prompt=[1, 2], max_new_tokens=4))
    with pytest.raises(ValueError, match="exceed max_model_len 64"):
      session.validate(Request(prompt=[1] * 50, max_new_tokens=20))
    with pytest.raises(ValueError, match="outside the vocabulary"):
      session.validate(Request(prompt=[1, 9999]))
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
      Request(prompt=[1], max_new_tokens=0)


def test_events_stream_each_rounds_tokens_once():
  """A round's tokens arrive as one event; with the target as its own draft (every token
  accepted) a round carries several."""
  seen, target = [], load_model("tiny-llama")
  engine = Engine(target, target, placement="device")
  with engine.session(SPECS["ssd"], max_batch_size=2, max_model_len=64) as session:
    handle = session.submit(Request(prompt=[3, 4, 5], max_new_tokens=12), on_event=seen.append)
    session.run()
  streamed = [t for e in handle.events(timeout=1) for t in e.tokens]
  assert [t for e in seen for t in e.tokens] == streamed == handle.tokens
  assert seen[-1].finish_reason in ("length", "stop")
  assert sum(e.finish_reason is not None for e in seen) == 1
  assert max(len(e.tokens) for e in seen) > 1  # a round carries several tokens: speculation


def test_after_warm_up_nothing_compiles_as_requests_come_and_go(engine):
  """Every bucket, prompt bucket, variant and move between buckets compiled once; a mix of
  prompt lengths, sampling settings, budgets and cancellations then compiles nothing."""
  with engine.session(SPECS["ssd"], max_batch_size=2, max_model_len=64) as session:
    assert session.warm_up() > 0
    rng = np.random.default_rng(9)
    with count_compiles() as compiles:
      handles = []
      for i in range(16):
        t = float(rng.choice([0.0, 0.7]))
        request = Request(
          prompt=rng.integers(1, 250, rng.integers(1, 40)).tolist(),
          sampling=Sampling(temperature=t, top_k=int(rng.choice([0, 5]))),
          max_new_tokens=int(rng.integers(1, 16)),
        )
        handles.append(session.submit(request))
        session.step()
        if i % 5 == 2:
          session.cancel(handles[-2])
      session.run()
    assert all(h.done for h in handles)
  assert not compiles, len(compiles)


# -- the law of every request under churn (statistical) ----------------------------------------

N = 12_000


@pytest.fixture(scope="module")
def pair():
  target, draft = exact.tiny_pair()
  return Engine(target, draft, placement="device")


def churned_law(engine, spec, sampling, n=N):
  """`n` copies of the exact prompt at `sampling`, submitted among others (greedy, other
  temperatures and prompts) that join and leave at other times; the copies' first 3 tokens."""
  rng = np.random.default_rng(11)
  mine = Request(prompt=exact.PROMPT, sampling=sampling, max_new_tokens=3)
  noise = [
    Request(prompt=[1, 2], sampling=Sampling(temperature=0.3), max_new_tokens=2),
    Request(prompt=[7, 6, 5, 4, 3, 2], max_new_tokens=5),
  ]
  handles = []
  with engine.session(spec, max_batch_size=8, max_model_len=24, max_queue=64) as session:
    for i in range(n):
      seed = i
      handles.append(session.submit(dataclasses.replace(mine, seed=seed)))
      if rng.random() < 0.5:
        session.submit(dataclasses.replace(noise[int(rng.integers(0, 2))], seed=n + i))
      if i % 8 == 7:
        for _ in range(int(rng.integers(1, 4))):
          session.step()
      while len(session.waiting()) > 48:
        session.step()
    session.run()
  observed = exact.counts([h.tokens for h in handles], 3)
  return observed, exact.exact_law(engine.target, exact.PROMPT, 3, sampling)


CHURN_SPECS = {
  "ar": SpecConfig(mode="ar"),
  "sd": SpecConfig(mode="sd", lookahead=2),
  "ssd": SpecConfig(mode="ssd", lookahead=2, fan_out=(2, 2, 2)),
}


@pytest.mark.statistical
@pytest.mark.parametrize("mode", list(CHURN_SPECS))
def test_every_request_has_the_targets_law_under_churn(pair, mode):
  observed, law = churned_law(pair, CHURN_SPECS[mode], Sampling(temperature=1.0))
  z = exact.fit_z(observed, law)
  assert z < exact.Z_MAX, (z, exact.total_variation(observed, law))


_admit_target = slots.admit_target.__wrapped__  # the function itself, before any patch


def _keeps_the_previous_warp(state, window, admission):
  """A joined row keeps its slot's previous occupant's sampling settings (the warp not
  written): a request admitted after a T = 0.3 one samples at T = 0.3."""
  admitted = _admit_target(state, window, admission)
  return dataclasses.replace(admitted, warp=state.warp)


@pytest.mark.statistical
def test_churn_negative_control_fails(pair, monkeypatch):
  monkeypatch.setattr(slots, "admit_target", jax.jit(_keeps_the_previous_warp))
  jax.clear_caches()
  try:
    observed, law = churned_law(pair, CHURN_SPECS["ssd"], Sampling(temperature=1.0))
  finally:
    monkeypatch.undo()
    jax.clear_caches()
  assert exact.fit_z(observed, law) > 3 * exact.Z_MAX


def test_joins_cross_a_pipe_as_arrays_and_come_back_the_same():
  """A speculator process learns of joins as arrays on the pipe (a generate call's thousands of
  rows would not fit a control line): every field comes back as it went, each prompt in its
  own length bucket."""
  joins = (
    Join(
      slot=2,
      tokens=np.arange(8, dtype=np.int32)[None],
      length=5,
      max_new=7,
      temperature=0.5,
      top_k=3,
      top_p=0.75,
      seed=seed_data(11),
      ignore_eos=True,
    ),
    Join(
      slot=0,
      tokens=np.arange(16, dtype=np.int32)[None] + 3,
      length=9,
      max_new=1,
      temperature=0.0,
      top_k=0,
      top_p=1.0,
      seed=seed_data(2**32 + 2),
    ),
  )
  back = joins_of(join_arrays(joins))
  assert len(back) == 2
  for sent, got in zip(joins, back, strict=True):
    np.testing.assert_array_equal(got.tokens, sent.tokens)
    np.testing.assert_array_equal(got.seed, sent.seed)
    assert dataclasses.replace(got, tokens=None, seed=None) == dataclasses.replace(
      sent, tokens=None, seed=None
    )
