"""The benchmark sweeps behind `python -m ssd_jax.bench` (see there for the flags)."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from ssd_jax import harness
from ssd_jax.bench.programs import overlap, time_programs
from ssd_jax.cli import draft_dtype, resolve_draft_vocab
from ssd_jax.config import SpecConfig
from ssd_jax.data import load_prompts
from ssd_jax.decode import Engine, Sampling, theory, tree
from ssd_jax.models.registry import load_model


def _record(context: dict, result: harness.ModeResult, ar: harness.ModeResult | None) -> dict:
  m = result.merged
  summary = {k: v for k, v in result.summary().items() if k != "generated_token_ids"}
  summary |= {
    "tokens_per_second": result.tokens_per_second,
    "mean_accepted_on_hit": m.mean_accepted_hit,
    "mean_accepted_on_miss": m.mean_accepted_miss,
    "cache_hit_rate_after_first_round": m.later_hit_rate,
  }
  if ar is not None:
    summary["speedup_vs_ar"] = result.tokens_per_second / ar.tokens_per_second
    if context["temperature"] == 0:
      summary["greedy_equal_to_ar"] = result.tokens == ar.tokens
  return (
    context
    | {
      "mode": result.mode,
      "lookahead": result.spec.lookahead,
      "fan_out": list(result.spec.fan_out),
    }
    | summary
  )


def predict(record: dict, latency: dict, batch_size: int) -> dict[str, float]:
  """The analytical model's tokens/s for one run, from isolated latencies (ms) and the run's
  measured acceptance and hit rate (Theorem 7 / Corollary 16 for ssd; E_SD / (verify + draft)
  for sd; 1 / step for ar).

  For ssd also `predicted_overlap_tokens_per_second`: the same model with the overlap this
  machine measured instead of a perfect one (a hit round costs verify and expand dispatched
  together, plus the lookup; a miss round that plus the backup).
  """
  verify = latency["verify"]
  if record["mode"] == "ar":
    return {"predicted_tokens_per_second": 1e3 * batch_size / latency["ar_step"]}
  isolated = {
    "verify_ms_isolated": verify,
    "expand_ms_isolated": latency["expand"],
    "together_ms_isolated": latency["together"],
    "lookup_ms_isolated": latency["lookup"],
    "propose_ms_isolated": latency["propose"],
  }
  e = record["mean_accepted_tokens_per_round"]
  if record["mode"] == "sd":
    return isolated | {
      "predicted_tokens_per_second": 1e3 * batch_size * e / (verify + latency["propose"])
    }
  p = record["cache_hit_rate_after_first_round"]
  e_hit, e_miss = record["mean_accepted_on_hit"], record["mean_accepted_on_miss"]
  e_hit = e if np.isnan(e_hit) else e_hit
  e_miss = e if np.isnan(e_miss) else e_miss
  p = 0.0 if np.isnan(p) else p
  backup = latency["propose"] if record.get("backup", "neural") == "neural" else 0.0
  t_p = (latency["expand"] + latency["lookup"]) / verify
  t_b = (backup + latency["lookup"]) / verify
  speed = theory.ssd_speedup(p, e_hit, e_miss, t_p, t_b, batch_size)
  hit_round = (latency["together"] + latency["lookup"]) / verify
  miss_extra = hit_round - 1 + backup / verify  # a miss round: 1 + this, in verifications
  measured = theory.ssd_speedup(p, e_hit, e_miss, hit_round, miss_extra, batch_size)
  return isolated | {
    "predicted_tokens_per_second": 1e3 * batch_size * speed / verify,
    "predicted_overlap_tokens_per_second": 1e3 * batch_size * measured / verify,
    "t_p": t_p,
    "t_b": t_b,
    "t_sd": latency["propose"] / verify,
  }


def geometric_variants(
  lookahead: int, fan_outs: list[int], uniform_runs: list[dict], acceptance: float
) -> list[tuple[str, int, tuple[int, ...]]]:
  """Theorem 12 fan-outs with the budgets of the uniform ones, from the measured acceptance and
  the power law fitted to the uniform runs' miss rates (r = 0.5 when it cannot be fitted)."""
  if not 0 < acceptance < 1:
    return []
  usable = [(r["budget"], 1 - r["cache_hit_rate_after_first_round"]) for r in uniform_runs]
  usable = [(f, miss) for f, miss in usable if miss > 0 and not np.isnan(miss)]
  r = theory.fit_power_law(*zip(*usable, strict=True)) if len(usable) >= 2 else 0.5
  r = float(np.clip(r, 0.05, 3.0))
  return [
    (
      f"geometric (r={r:.2f}, a={acceptance:.2f})",
      f,
      tree.geometric(lookahead, f * (lookahead + 1), acceptance, r),
    )
    for f in sorted(set(fan_outs) - {1})
  ]


def _engine(args, **kwargs) -> Engine:
  """The engine for the flags' target and draft, recording the draft head's size in `args`."""
  target, draft = load_model(args.target), load_model(args.draft, dtype=draft_dtype(None))
  draft_vocab = resolve_draft_vocab(args.draft_vocab, draft)
  args.draft_vocab = draft_vocab or 0
  return Engine(target, draft, draft_vocab=draft_vocab, **kwargs)


def sweep(args) -> dict[str, Any]:
  layout = args.layout
  engine = _engine(
    args,
    target_devices=args.target_devices,
    draft_placement=layout.placement,
    speculator_cores=layout.speculator_cores,
  )
  with engine:  # stops its speculator process
    return _sweep(args, engine, layout)


def _sweep(args, engine, layout) -> dict[str, Any]:
  target, draft = engine.target, engine.draft
  out: dict[str, Any] = {
    "environment": harness.environment(),
    "layout": {
      m: {"ran_on": layout.where(m), "cores": layout.cores(m)} for m in ("ar", "sd", "ssd")
    },
    "args": _jsonable(args),
    "runs": [],
    "latency": [],
    "hf": [],
  }
  for prompt_set in args.prompt_sets:
    prompts = load_prompts(prompt_set, args.num_prompts)
    ids = harness.encode(target.tokenizer, [p.text for p in prompts], chat=True)
    capacity = harness.capacity_for(ids, args.max_new_tokens, max(args.lookaheads)) + 256
    for temperature in args.temperatures:
      sampling = Sampling(temperature=temperature)
      for batch in args.batch_sizes:
        context = {"prompt_set": prompt_set, "temperature": temperature, "batch_size": batch}
        _sweep_point(args, engine, ids, capacity, sampling, context, out)
    if args.hf:
      from ssd_jax.bench import hf  # noqa: PLC0415 (torch is optional)

      out["hf"].append(
        {"prompt_set": prompt_set}
        | hf.compare(
          target, draft, [p.text for p in prompts], args.max_new_tokens, out["runs"], prompt_set
        )
      )
  return out


def _sweep_point(args, engine, ids, capacity, sampling, context, out) -> None:
  batch = context["batch_size"]
  run = lambda spec: harness.run_mode(
    engine,
    ids,
    spec,
    sampling=sampling,
    max_new_tokens=args.max_new_tokens,
    batch_size=batch,
    seed=args.seed,
    ignore_eos=args.ignore_eos,
    capacity=capacity,
  )
  t0 = time.time()
  ar = run(SpecConfig(mode="ar", lookahead=0))
  records = [_record(context, ar, ar)]
  for lookahead in args.lookaheads:
    sd = run(SpecConfig(mode="sd", lookahead=lookahead))
    records.append(_record(context, sd, ar))
    acceptance = float(np.mean(records[-1]["acceptance_per_position"]))

    def ssd(kind, budget, fan_out, lookahead=lookahead):
      spec = SpecConfig(
        mode="ssd",
        lookahead=lookahead,
        fan_out=fan_out,
        saguaro_c=args.saguaro_c,
        backup=args.backup,
      )
      return _record(context, run(spec), ar) | {"fan_out_kind": kind, "budget": budget}

    uniform = [ssd("uniform", f, tree.uniform(lookahead, f)) for f in args.fan_outs]
    records += uniform
    if not args.no_geometric:
      variants = geometric_variants(lookahead, args.fan_outs, uniform, acceptance)
      records += [ssd(*v) for v in variants]
  _add_predictions(args, engine, ids, capacity, sampling, context, records, out)
  out["runs"] += records
  best = max((r for r in records if r["mode"] == "ssd"), key=lambda r: r["tokens_per_second"])
  print(
    f"{context}: ar {records[0]['tokens_per_second']:.1f} tok/s, best ssd "
    f"{best['tokens_per_second']:.1f} (k={best['lookahead']}, F={best['fan_out']}) "
    f"[{time.time() - t0:.0f} s]",
    flush=True,
  )


def _add_predictions(args, engine, ids, capacity, sampling, context, records, out) -> None:
  batch = context["batch_size"]
  cache: dict = {}
  for record in records:
    lookahead = max(record["lookahead"], 1)
    fan_out = tuple(record["fan_out"]) or tree.uniform(lookahead, 1)
    key = (lookahead, fan_out)
    if key not in cache:
      spec = SpecConfig(mode="ssd", lookahead=lookahead, fan_out=fan_out, saguaro_c=args.saguaro_c)
      cache[key] = time_programs(engine, ids[0], spec, sampling, capacity, batch_size=batch)
      if engine.draft_placement == "process":
        cache[key] |= _process_overlap(engine, cache[key], batch, lookahead, sampling)
      where = {"lookahead": lookahead, "fan_out": list(fan_out)}
      out["latency"].append(context | where | cache[key])
    record["backup"] = record.get("backup") or args.backup
    record |= predict(record, cache[key], batch)


def _process_overlap(engine, latency, batch, lookahead, sampling) -> dict[str, float]:
  """With the speculator in a process of its own (independence ~1.9 here, bench overlap) a hit
  round's verify and expand run at once on separate cores, and the round adds one exchange
  with the speculator, measured on its channel: `together` is max(verify, expand) + that."""
  from ssd_jax.bench.exchange import probe_ms  # noqa: PLC0415

  vocab = engine.target.config.vocab_size
  link = engine.speculator_process()
  exchange = probe_ms(link, batch, lookahead, vocab, not sampling.greedy, reps=50)["median_ms"]
  together = max(latency["verify"], latency["expand"]) + exchange
  return {"together": together, "together_in_process": latency["together"], "exchange": exchange}


def _jsonable(args) -> dict:
  return {
    k: (str(v) if not isinstance(v, int | float | str | list | bool | None) else v)
    for k, v in vars(args).items()
  }


def model_speed(args) -> dict[str, Any]:
  """Prefill and decode tokens/s of the target alone, f32 and bf16 (and HF eager with --hf)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from ssd_jax.models import KVCache  # noqa: PLC0415
  from ssd_jax.models.prefill import prefill  # noqa: PLC0415

  rows = []
  tokens = np.random.default_rng(0).integers(0, 1000, (1, args.prompt_tokens), dtype=np.int32)
  for dtype in (jnp.float32, jnp.bfloat16):
    model = load_model(args.target, dtype=dtype)
    engine = Engine(model)
    cfg, params = model.config, engine.target_params
    capacity = args.prompt_tokens + args.decode_tokens + 64
    times = []
    for _ in range(3):  # the first call compiles
      cache = KVCache.init(cfg, 1, capacity, dtype)
      t = time.perf_counter()
      jax.block_until_ready(
        prefill(params, tokens, jnp.asarray([args.prompt_tokens]), cache, config=cfg)
      )
      times.append(time.perf_counter() - t)
    prefill_s = min(times[1:])
    gen = engine.generate(
      [tokens[0].tolist()], max_new_tokens=args.decode_tokens, ignore_eos=True, capacity=capacity
    )  # warm-up
    gen = engine.generate(
      [tokens[0].tolist()], max_new_tokens=args.decode_tokens, ignore_eos=True, capacity=capacity
    )
    rows.append(
      {
        "engine": "ssd_jax",
        "dtype": jnp.dtype(dtype).name,
        "prefill_tokens_per_second": args.prompt_tokens / prefill_s,
        "decode_tokens_per_second": gen.metrics.tokens_per_second,
      }
    )
    print(rows[-1], flush=True)
  if args.hf:
    from ssd_jax.bench import hf  # noqa: PLC0415 (torch is optional)

    rows += hf.model_speed(tokens[0].tolist(), args.decode_tokens)
  return {"environment": harness.environment(), "rows": rows, "args": _jsonable(args)}


def measure_overlap(args) -> dict[str, Any]:
  """Can this machine overlap verification and expansion? (see bench.programs.overlap) With
  devices of one process, and with the speculator processes' layout on CPU (two processes
  pinned to cores of their own)."""
  engine = _engine(args)
  target = engine.target
  prompt = harness.encode(target.tokenizer, [load_prompts("bundled", 1)[0].text], chat=True)[0]
  rows = []
  for lookahead, f in zip(args.lookaheads, args.fan_outs, strict=False):
    spec = SpecConfig(mode="ssd", lookahead=lookahead, fan_out=tree.uniform(lookahead, f))
    row = {"layout": "devices of one process", "lookahead": lookahead, "fan_out": f}
    rows.append(row | overlap(engine, prompt, spec, Sampling(), 1024))
    print(rows[-1], flush=True)
  if (os.cpu_count() or 1) > 1:  # the layout python -m ssd_jax.run uses on CPU
    from ssd_jax.bench.exchange import pinned_pair_independence  # noqa: PLC0415
    from ssd_jax.decode.serving import WORK_KINDS  # noqa: PLC0415

    for kind in WORK_KINDS:  # cores of their own, and how their memory traffic contends
      rows.append(pinned_pair_independence(kind=kind))
      print(rows[-1], flush=True)
  return {"environment": harness.environment(), "rows": rows, "args": _jsonable(args)}
