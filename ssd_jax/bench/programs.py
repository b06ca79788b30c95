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

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from ssd_jax import sharding
from ssd_jax.config import SpecConfig
from ssd_jax.decode import draft as draft_lib
from ssd_jax.decode import slots, speculate
from ssd_jax.decode import target as target_lib
from ssd_jax.decode.plan import Plan
from ssd_jax.decode.sampling import Sampling
from ssd_jax.decode.state import Outcome, Speculation
from ssd_jax.models import placement
from ssd_jax.models.prefill import pad_prompts, prefill_window
from ssd_jax.speculator.base import Join, admissions

FOREVER = 10**6  # a budget no timing loop exhausts


@dataclasses.dataclass(frozen=True)
class Setup:
  """Fresh decode states of `batch_size` copies of one prompt, for timing programs alone."""

  engine: object  # ssd_jax.Engine
  plan: Plan
  tokens: np.ndarray  # i32[B, P]
  lengths: np.ndarray  # i32[B]
  sampling: Sampling
  capacity: int

  @classmethod
  def make(cls, engine, prompt, spec: SpecConfig, sampling: Sampling, capacity, batch_size=1):
    plan = engine.plan(spec, greedy=sampling.greedy, ignore_eos=True, batch_size=batch_size)
    tokens, lengths = pad_prompts([prompt] * batch_size, capacity)
    return cls(engine, plan, tokens, lengths, sampling, capacity)

  @property
  def batch_size(self) -> int:
    return self.tokens.shape[0]

  def joins(self) -> list[Join]:
    """Every row's request: the prompt, a budget no timing exhausts, the sampling settings."""
    s = self.sampling
    return [
      Join(
        slot=b,
        tokens=self.tokens[b : b + 1],
        length=int(self.lengths[b]),
        max_new=FOREVER,
        temperature=s.temperature,
        top_k=s.top_k,
        top_p=s.top_p,
        seed=np.asarray([0, b], np.uint32),
        ignore_eos=True,
      )
      for b in range(self.batch_size)
    ]

  def target_state(self, params=None, mesh=None):
    """A prefilled TargetState (on `mesh` with `params`; default: the engine's target)."""
    e = self.engine
    params, mesh = params or e.target_params, mesh or e.target_mesh
    plan = self.plan.target
    put = lambda x: jax.device_put(x, sharding.replicated(mesh))
    cache = placement.init_cache(
      plan.config, mesh, self.batch_size, self.capacity, params["embed"].dtype
    )
    state = put(slots.empty_target(cache))
    for join in self.joins():
      window = prefill_window(
        params, put(join.tokens), config=plan.config, attention_impl=plan.attention_impl
      )
      state = slots.admit_target(state, window, put(admissions((join,), False)[0][1]))
    return state

  def draft_state(self):
    e, plan = self.engine, self.plan.draft
    put = lambda x: jax.device_put(x, sharding.replicated(e.draft_mesh))
    dtype = e.draft_params["embed"].dtype
    cache = placement.init_cache(plan.config, e.draft_mesh, self.batch_size, self.capacity, dtype)
    state = put(slots.empty_draft(cache))
    for join in self.joins():
      window = prefill_window(
        e.draft_params, put(join.tokens), config=plan.config, attention_impl=plan.attention_impl
      )
      state = slots.admit_draft(state, window, put(admissions((join,), False)[0][1]))
    return state

  def last(self):
    """The pending tokens, on the draft mesh."""
    last = self.tokens[np.arange(self.batch_size), self.lengths - 1]
    return jax.device_put(last, sharding.replicated(self.engine.draft_mesh))

  def to_target(self, tree):
    return jax.device_put(tree, sharding.replicated(self.engine.target_mesh))


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


def _verifier(setup: Setup, speculation: Speculation, plan=None):
  """state -> (state, report): one target step on `speculation`."""
  e, plan = setup.engine, plan or setup.plan.target

  def run(state):
    state, report = target_lib.step(e.target_params, state, speculation, plan=plan)
    return state, report

  return run


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
  lookahead = spec.lookahead
  if len(prompt) + 2 * (reps + 2) * (lookahead + 1) > capacity:
    raise ValueError("capacity too small for the timing repetitions; raise it")
  setup = Setup.make(engine, prompt, spec, sampling, capacity, batch_size)
  params, plan = engine.draft_params, setup.plan.draft
  out = {}
  fresh = jax.device_put(np.ones(batch_size, bool), sharding.replicated(engine.draft_mesh))
  # Placed as a round's outcome reaches `propose` (host arrays would time a program of their own).
  nothing = jax.device_put(Outcome.nothing(batch_size), sharding.replicated(engine.draft_mesh))
  propose = lambda s: draft_lib.propose(params, s, nothing, setup.last(), fresh, plan=plan)
  dstate, proposal, out["propose"] = _median_ms(propose, setup.draft_state(), reps)
  on_target = setup.to_target(proposal)
  tstate, _, out["verify"] = _median_ms(_verifier(setup, on_target), setup.target_state(), reps)
  ar_plan = dataclasses.replace(setup.plan.target, lookahead=0)
  no_draft = setup.to_target(Speculation.empty(batch_size))
  _, _, out["ar_step"] = _median_ms(_verifier(setup, no_draft, ar_plan), setup.target_state(), reps)
  if spec.mode == "ssd":
    out |= _time_ssd(setup, tstate, dstate, proposal, on_target, reps)
  return out


def _time_ssd(setup: Setup, tstate, dstate, proposal, on_target, reps) -> dict[str, float]:
  """expand, together (verify + expand dispatched at once) and lookup (a hit)."""
  params, plan = setup.engine.draft_params, setup.plan.draft
  expand = lambda s: speculate.expand(params, s, proposal, plan=plan)
  verify = _verifier(setup, on_target)
  out = {}
  dstate, cache, out["expand"] = _median_ms(expand, dstate, reps)

  def together(states):
    (t, report), (d, speculations) = verify(states[0]), expand(states[1])
    return (t, d), (report, speculations)

  # tstate has committed at most (reps + 1) * (lookahead + 1) tokens: the capacity check in
  # time_programs covers both passes.
  (tstate, dstate), _, out["together"] = _median_ms(together, (tstate, dstate), reps)
  hit = _outcome_for(cache, 0)
  lookup = lambda s: _tokens_only(speculate.lookup(params, s, cache, hit, plan=plan))
  _, _, out["lookup"] = _median_ms(lookup, dstate, reps)
  return out


def _outcome_for(cache, branch: int) -> Outcome:
  """An outcome that hits branch `branch` of every row (committing nothing, so it repeats)."""
  B = cache.keys.shape[0]
  return Outcome.of(
    accepted=cache.depth[:, branch],
    bonus=cache.keys[:, branch],
    committed=jnp.zeros((B,), jnp.int32),
    done=jnp.zeros((B,), bool),
  )


def _tokens_only(result):
  state, speculation = result
  return state, speculation.tokens


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
  setup = Setup.make(engine, prompt, spec, sampling, capacity)
  lookahead = spec.lookahead
  params, plan = engine.draft_params, setup.plan.draft
  fresh = jax.device_put(np.ones(1, bool), sharding.replicated(engine.draft_mesh))
  nothing = jax.device_put(Outcome.nothing(1), sharding.replicated(engine.draft_mesh))
  dstate, proposal = draft_lib.propose(
    params, setup.draft_state(), nothing, setup.last(), fresh, plan=plan
  )
  on_target = setup.to_target(proposal)
  verify = _verifier(setup, on_target)
  expand = lambda d: speculate.expand(params, d, proposal, plan=plan)
  tstate, used = setup.target_state(), 0
  times = {"verify": [], "expand": [], "together": []}
  for i in range(reps + 1):
    used += 2 * (lookahead + 1)  # two verifications commit at most this many tokens
    if len(prompt) + used >= capacity:
      tstate, used = setup.target_state(), 2 * (lookahead + 1)  # keep the cache from filling up
    t = time.perf_counter()
    tstate, report = verify(tstate)
    jax.block_until_ready(report)
    t1 = time.perf_counter()
    dstate, cache = expand(dstate)
    jax.block_until_ready(cache)
    t2 = time.perf_counter()
    (tstate, report), (dstate, cache) = verify(tstate), expand(dstate)
    jax.block_until_ready((report, cache))
    t3 = time.perf_counter()
    if i:  # the first pass compiles
      times["verify"].append(t1 - t)
      times["expand"].append(t2 - t1)
      times["together"].append(t3 - t2)
  out = {f"{name}_ms": float(np.median(v) * 1e3) for name, v in times.items()}
  out["efficiency"] = (out["verify_ms"] + out["expand_ms"]) / out["together_ms"]
  return out | _machine_share(setup, on_target, len(prompt), reps)


def _machine_share(setup: Setup, on_target, prompt_len: int, reps: int) -> dict[str, float]:
  """verify_cores and independence (see `overlap`)."""
  engine, plan, lookahead = setup.engine, setup.plan.target, setup.plan.target.lookahead
  step = lambda params, state, speculation: target_lib.step(params, state, speculation, plan=plan)
  tstate = setup.target_state()  # its program ran in overlap
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(reps):  # at most reps * (lookahead + 1) tokens committed: fits (see overlap)
    tstate, report = step(engine.target_params, tstate, on_target)
    jax.block_until_ready(report)
  out = {"verify_cores": (time.process_time() - cpu) / (time.perf_counter() - wall)}
  single = engine.target_mesh.size == 1 and engine.draft_mesh.size == 1
  if not single or engine.target_mesh.devices.flat[0].platform != "cpu":
    # An accelerator's draft device need not hold the target (nor is the answer in doubt there).
    return out | {"alone_ms": float("nan"), "pair_ms": float("nan"), "independence": float("nan")}
  # A replica of the target on the draft's (virtual CPU) device, verifying the same speculation.
  mesh = engine.draft_mesh
  replica = placement.place_params(engine.target.params, plan.config, mesh)
  sides = [
    (engine.target_params, on_target),
    (replica, jax.device_put(on_target, sharding.replicated(mesh))),
  ]
  states = [setup.target_state(), setup.target_state(params=replica, mesh=mesh)]
  alone, together = [], []
  for i in range(reps + 1):
    if prompt_len + 3 * (i + 1) * (lookahead + 1) >= setup.capacity:
      break
    t = time.perf_counter()
    states[0], report = step(sides[0][0], states[0], sides[0][1])
    jax.block_until_ready(report)
    t1 = time.perf_counter()
    reports = []
    for j, (params, speculation) in enumerate(sides):
      states[j], report = step(params, states[j], speculation)
      reports.append(report)
    jax.block_until_ready(reports)
    t2 = time.perf_counter()
    if i:  # the first pass compiles the replica's program
      alone.append(t1 - t)
      together.append(t2 - t1)
  alone_ms, pair_ms = float(np.median(alone) * 1e3), float(np.median(together) * 1e3)
  return out | {"alone_ms": alone_ms, "pair_ms": pair_ms, "independence": 2 * alone_ms / pair_ms}
