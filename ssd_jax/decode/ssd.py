"""The SSD host loop: verification on the target mesh overlapped with expansion on the draft's.

One round, as dispatched (no host sync anywhere in it; JAX runs the two meshes concurrently):

  target mesh                                  draft mesh
  step(spec_r) -> outcome_r, report_r          expand(spec_r) -> cache_r        (concurrent)
        |        device_put(outcome_r) ------> lookup(cache_r, outcome_r) -> spec_{r+1}
  step(spec_{r+1}) <---- device_put(spec_{r+1})  expand(spec_{r+1}) ...

The first speculation is drafted synchronously (the cache starts empty). The host then reads
report_{r-1} while round r runs (engine.drive).
"""

from __future__ import annotations

from ssd_jax.decode import draft as draft_lib
from ssd_jax.decode import speculate
from ssd_jax.decode import target as target_lib
from ssd_jax.decode.state import DraftState, TargetState
from ssd_jax.decode.theory import choose_backup


def resolve_backup(run) -> tuple[str, dict]:
  """The backup to use ("auto" decides by batch size against b*, Theorem 17)."""
  spec = run.spec
  if spec.backup != "auto":
    return spec.backup, {}
  threshold = spec.auto_batch_threshold
  if threshold is None:
    threshold = run.engine.backup_threshold(spec)
  backup = choose_backup(run.batch_size, threshold)
  return backup, {"backup": backup, "backup_threshold": threshold}


def run_ssd(run, tstate: TargetState, dstate: DraftState):
  """Speculative speculative decoding. Returns (target state, host rounds, extra metrics)."""
  engine, spec = run.engine, run.spec
  backup, extra = resolve_backup(run)
  common = dict(
    config=engine.draft.config,
    lookahead=spec.lookahead,
    sampling=run.sampling,
    saguaro_c=spec.saguaro_c,
    attention_impl=engine.attention_impl,
  )
  expand_kwargs = dict(common, fan_out=spec.fan_out, fan_out_miss=spec.miss_fan_out)
  lookup_kwargs = dict(common, fan_out_miss=spec.miss_fan_out, backup=backup)
  # The cache starts empty: the first speculation is drafted now (a miss, like the reference).
  dstate, spec_d = draft_lib.propose(
    engine.draft_params,
    dstate,
    None,
    run.to_draft(tstate.last),
    config=engine.draft.config,
    lookahead=spec.lookahead,
    sampling=run.sampling,
    fan_out=spec.miss_fan_out,
    saguaro_c=spec.saguaro_c,
    attention_impl=engine.attention_impl,
  )
  state = tstate
  timer = run.timer

  def dispatch():
    nonlocal state, dstate, spec_d
    if timer:
      timer.mark("dispatch")
    state, outcome, report = target_lib.step(
      engine.target_params, state, run.to_target(spec_d), **run.target_kwargs
    )
    dstate, spec_cache = speculate.expand(engine.draft_params, dstate, spec_d, **expand_kwargs)
    if timer:
      timer.when_ready("target", "verify_done", report)
      timer.when_ready("draft", "expand_done", spec_cache)
    dstate, spec_d = speculate.lookup(
      engine.draft_params, dstate, spec_cache, run.to_draft(outcome), **lookup_kwargs
    )
    if timer:
      timer.when_ready("draft", "lookup_done", spec_d)
    return report

  from ssd_jax.decode.engine import drive  # noqa: PLC0415 (engine imports this module)

  rounds = drive(run, dispatch)
  return (
    state,
    rounds,
    extra | {"fan_out": list(spec.fan_out), "fan_out_miss": list(spec.miss_fan_out)},
  )
