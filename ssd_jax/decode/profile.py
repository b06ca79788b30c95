"""Latency of each round program in isolation: the inputs of the analytical model.

Each program is run alone (dispatch, then block until ready) `reps` times after a warm-up, on
the engine's placed weights, and the median is reported in milliseconds:

  ar_step    target step with no draft tokens (one token)
  verify     target step over [pending, lookahead draft tokens]
  propose    the draft drafting `lookahead` tokens (sync SD's drafting; the neural backup)
  expand     SSD's expansion (glue + fork + tree decode over all branches)
  together   verify and expand dispatched together, as in an SSD round: max(verify, expand)
             when the draft's device is hardware of its own, up to their sum when it is not
  lookup     SSD's cache lookup (on a hit: no backup runs)
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from ssd_jax import sharding
from ssd_jax.config import SpecConfig
from ssd_jax.decode import draft as draft_lib
from ssd_jax.decode import speculate
from ssd_jax.decode import target as target_lib
from ssd_jax.decode.sampling import Sampling
from ssd_jax.decode.state import Speculation
from ssd_jax.models.prefill import pad_prompts


def _median_ms(fn, state, reps: int):
  """Time fn(state) -> (state, out) `reps` times, threading the (donated) state through."""
  state, out = fn(state)  # warm-up / compile
  jax.block_until_ready(out)
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    state, out = fn(state)
    jax.block_until_ready((state, out))
    times.append(time.perf_counter() - t)
  return state, out, float(np.median(times) * 1e3)


def time_programs(
  engine,
  prompt: list[int],
  spec: SpecConfig,
  sampling: Sampling,
  capacity: int,
  batch_size: int = 1,
  reps: int = 10,
) -> dict[str, float]:
  """Median milliseconds of each program for `batch_size` copies of `prompt`."""
  k = spec.lookahead
  if len(prompt) + 2 * (reps + 2) * (k + 1) > capacity:
    raise ValueError("capacity too small for the timing repetitions; raise it")
  tokens, lengths = pad_prompts([prompt] * batch_size, capacity)
  B = batch_size
  to_t = lambda x: jax.device_put(x, sharding.replicated(engine.target_mesh))
  to_d = lambda x: jax.device_put(x, sharding.replicated(engine.draft_mesh))
  dtype = jax.tree.leaves(engine.target_params)[0].dtype
  temps = np.full(B, sampling.temperature, np.float32)
  tstate = target_lib.start(
    engine.target_params,
    to_t(tokens),
    to_t(lengths),
    sharding.init_cache(engine.target.config, engine.target_mesh, B, capacity, dtype),
    to_t(np.full(B, 10**6, np.int32)),
    to_t(temps),
    to_t(jax.random.key(0)),
    config=engine.target.config,
    lookahead=k,
    attention_impl=engine.attention_impl,
  )
  dstate = draft_lib.start(
    engine.draft_params,
    to_d(tokens),
    to_d(lengths),
    sharding.init_cache(engine.draft.config, engine.draft_mesh, B, capacity, dtype),
    to_d(temps),
    to_d(jax.random.key(1)),
    config=engine.draft.config,
    attention_impl=engine.attention_impl,
  )
  common = dict(
    config=engine.draft.config, lookahead=k, sampling=sampling, attention_impl=engine.attention_impl
  )
  last = to_d(jnp.asarray(tokens[:, len(prompt) - 1]))
  out = {}
  dstate, proposal, out["propose"] = _median_ms(
    lambda s: draft_lib.propose(engine.draft_params, s, None, last, **common), dstate, reps
  )
  kwargs = dict(
    config=engine.target.config, sampling=sampling, eos_ids=(), attention_impl=engine.attention_impl
  )
  spec_t = to_t(proposal)
  tstate, _, out["verify"] = _median_ms(
    lambda s: _drop_report(target_lib.step(engine.target_params, s, spec_t, **kwargs)), tstate, reps
  )
  none = to_t(
    Speculation(
      tokens=jnp.zeros((B, 1), jnp.int32),
      probs=None,
      point_mass=jnp.zeros(B, bool),
      hit=jnp.zeros(B, bool),
    )
  )
  _, _, out["ar_step"] = _median_ms(
    lambda s: _drop_report(target_lib.step(engine.target_params, s, none, **kwargs)),
    target_lib.start(
      engine.target_params,
      to_t(tokens),
      to_t(lengths),
      sharding.init_cache(engine.target.config, engine.target_mesh, B, capacity, dtype),
      to_t(np.full(B, 10**6, np.int32)),
      to_t(temps),
      to_t(jax.random.key(0)),
      config=engine.target.config,
      lookahead=0,
      attention_impl=engine.attention_impl,
    ),
    reps,
  )
  if spec.mode == "ssd":
    expand_kwargs = dict(
      common, fan_out=spec.fan_out, fan_out_miss=spec.miss_fan_out, saguaro_c=spec.saguaro_c
    )
    dstate, cache, out["expand"] = _median_ms(
      lambda s: speculate.expand(engine.draft_params, s, proposal, **expand_kwargs), dstate, reps
    )

    def together(states):
      t, d = states
      t, _, report = target_lib.step(engine.target_params, t, spec_t, **kwargs)
      d, spec_cache = speculate.expand(engine.draft_params, d, proposal, **expand_kwargs)
      return (t, d), (report, spec_cache)

    # tstate has committed at most (reps + 1) * (k + 1) tokens: the capacity check covers both.
    (tstate, dstate), _, out["together"] = _median_ms(together, (tstate, dstate), reps)
    hit = _outcome_for(cache, 0)
    lookup_kwargs = dict(
      common, fan_out_miss=spec.miss_fan_out, backup="neural", saguaro_c=spec.saguaro_c
    )
    _, _, out["lookup"] = _median_ms(
      lambda s: _tokens_only(speculate.lookup(engine.draft_params, s, cache, hit, **lookup_kwargs)),
      dstate,
      reps,
    )
  return out


def _drop_report(result):
  state, _outcome, report = result
  return state, report


def _outcome_for(cache, branch: int):
  """An outcome that hits branch `branch` of every row (committing nothing, so it repeats)."""
  from ssd_jax.decode.verify import Outcome  # noqa: PLC0415

  B = cache.keys.shape[0]
  return Outcome(
    accepted=cache.depth[:, branch],
    bonus=cache.keys[:, branch],
    committed=jnp.zeros((B,), jnp.int32),
  )


def _tokens_only(result):
  state, spec = result
  return state, spec.tokens


def overlap(
  engine, prompt: list[int], spec: SpecConfig, sampling: Sampling, capacity: int, reps: int = 10
) -> dict[str, float]:
  """How well this machine runs the target's verification and the draft's expansion at once.

  Times each alone, then both dispatched together (as an SSD round does). The efficiency
  (verify + expand) / together is 2 with perfect overlap and 1 when the two devices share one
  core's worth of compute; SSD's gain over SD needs it well above 1.

  Two more numbers say why: `verify_cores`, the process's CPU seconds per second of wall time
  while the verification runs alone (how much of the machine the target already uses), and
  `independence` = 2 * verify / pair, where pair times the same verification on the target's
  device and on the draft's at once (on CPU, when both meshes have one device): 2 when the draft's
  device is hardware of its own (separate GPUs), 1 when the devices share one pool of compute
  (XLA's CPU devices share one intra-op thread pool).
  """
  k = spec.lookahead
  tokens, lengths = pad_prompts([prompt], capacity)
  to_t = lambda x: jax.device_put(x, sharding.replicated(engine.target_mesh))
  to_d = lambda x: jax.device_put(x, sharding.replicated(engine.draft_mesh))
  dtype = jax.tree.leaves(engine.target_params)[0].dtype

  def start_target(params, mesh):
    put = lambda x: jax.device_put(x, sharding.replicated(mesh))
    return target_lib.start(
      params,
      put(tokens),
      put(lengths),
      sharding.init_cache(engine.target.config, mesh, 1, capacity, dtype),
      put(np.full(1, 10**6, np.int32)),
      put(np.zeros(1, np.float32)),
      put(jax.random.key(0)),
      config=engine.target.config,
      lookahead=k,
      attention_impl=engine.attention_impl,
    )

  new_t = lambda: start_target(engine.target_params, engine.target_mesh)
  dstate = draft_lib.start(
    engine.draft_params,
    to_d(tokens),
    to_d(lengths),
    sharding.init_cache(engine.draft.config, engine.draft_mesh, 1, capacity, dtype),
    to_d(np.zeros(1, np.float32)),
    to_d(jax.random.key(1)),
    config=engine.draft.config,
    attention_impl=engine.attention_impl,
  )
  common = dict(
    config=engine.draft.config, lookahead=k, sampling=sampling, attention_impl=engine.attention_impl
  )
  dstate, proposal = draft_lib.propose(
    engine.draft_params, dstate, None, to_d(jnp.asarray(tokens[:, len(prompt) - 1])), **common
  )
  spec_t = to_t(proposal)
  kwargs = dict(
    config=engine.target.config, sampling=sampling, eos_ids=(), attention_impl=engine.attention_impl
  )
  expand_kwargs = dict(common, fan_out=spec.fan_out, fan_out_miss=spec.miss_fan_out)
  verify = lambda t: target_lib.step(engine.target_params, t, spec_t, **kwargs)
  expand = lambda d: speculate.expand(engine.draft_params, d, proposal, **expand_kwargs)
  tstate, used = new_t(), 0
  times = {"verify": [], "expand": [], "together": []}
  for i in range(reps + 1):
    used += 2 * (k + 1)  # two verifications commit at most this many tokens
    if len(prompt) + used >= capacity:
      tstate, used = new_t(), 2 * (k + 1)  # keep the cache from filling up
    t = time.perf_counter()
    tstate, _, report = verify(tstate)
    jax.block_until_ready(report)
    t1 = time.perf_counter()
    dstate, cache = expand(dstate)
    jax.block_until_ready(cache)
    t2 = time.perf_counter()
    tstate, _, report = verify(tstate)
    dstate, cache = expand(dstate)
    jax.block_until_ready((report, cache))
    t3 = time.perf_counter()
    if i:  # the first pass compiles
      times["verify"].append(t1 - t)
      times["expand"].append(t2 - t1)
      times["together"].append(t3 - t2)
  out = {f"{k}_ms": float(np.median(v) * 1e3) for k, v in times.items()}
  out["efficiency"] = (out["verify_ms"] + out["expand_ms"]) / out["together_ms"]
  return out | _machine_share(engine, start_target, spec_t, kwargs, k, len(prompt), capacity, reps)


def _machine_share(engine, start_target, spec_t, kwargs, k, prompt_len, capacity, reps):
  """verify_cores and independence (see `overlap`)."""
  verify = lambda p, t, s: target_lib.step(p, t, s, **kwargs)
  tstate = start_target(engine.target_params, engine.target_mesh)  # its program ran in overlap
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(reps):  # at most reps * (k + 1) tokens committed: fits (see overlap)
    tstate, _, report = verify(engine.target_params, tstate, spec_t)
    jax.block_until_ready(report)
  out = {"verify_cores": (time.process_time() - cpu) / (time.perf_counter() - wall)}
  single = engine.target_mesh.size == 1 and engine.draft_mesh.size == 1
  if not single or engine.target_mesh.devices.flat[0].platform != "cpu":
    # An accelerator's draft device need not hold the target (nor is the answer in doubt there).
    return out | {"pair_ms": float("nan"), "independence": float("nan")}
  # A replica of the target on the draft's (virtual CPU) device, verifying the same speculation.
  replica = sharding.place_params(engine.target.params, engine.target.config, engine.draft_mesh)
  spec_d = jax.device_put(spec_t, sharding.replicated(engine.draft_mesh))
  states = [
    start_target(engine.target_params, engine.target_mesh),
    start_target(replica, engine.draft_mesh),
  ]
  pairs = [(engine.target_params, spec_t), (replica, spec_d)]
  alone, pair = [], []
  for i in range(reps + 1):
    if prompt_len + 3 * (i + 1) * (k + 1) >= capacity:
      break
    t = time.perf_counter()
    states[0], _, report = verify(pairs[0][0], states[0], pairs[0][1])
    jax.block_until_ready(report)
    t1 = time.perf_counter()
    reports = []
    for j, (params, spec) in enumerate(pairs):
      states[j], _, report = verify(params, states[j], spec)
      reports.append(report)
    jax.block_until_ready(reports)
    t2 = time.perf_counter()
    if i:  # the first pass compiles the replica's program
      alone.append(t1 - t)
      pair.append(t2 - t1)
  alone_ms, pair_ms = float(np.median(alone) * 1e3), float(np.median(pair) * 1e3)
  return out | {"pair_ms": pair_ms, "independence": 2 * alone_ms / pair_ms}
