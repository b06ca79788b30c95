"""The benchmark sweeps behind `python -m ssd_jax.bench sweep`, `models` and `overlap`."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax.numpy as jnp
import numpy as np

from ssd_jax.bench.programs import overlap, time_programs
from ssd_jax.config import SpecConfig
from ssd_jax.data import load_prompts
from ssd_jax.decode import theory, tree
from ssd_jax.decode.sampling import Sampling
from ssd_jax.harness import runs as harness
from ssd_jax.models.registry import default_draft_dtype, load_model
from ssd_jax.runtime import Engine
from ssd_jax.speculator.layout import Layout


@dataclasses.dataclass(frozen=True, kw_only=True)
class SweepOptions:
  """`bench sweep`: mode x lookahead x fan-out (uniform and Theorem 12's) x temperature x batch
  size x prompt set, on one target / draft pair in one layout."""

  target: str = "smollm2-135m"
  draft: str = "smollm2-135m-draft"
  draft_vocab: int | None = None
  prompt_sets: tuple[str, ...] = ("humaneval", "sharegpt")
  num_prompts: int = 8
  max_new_tokens: int = 128
  lookaheads: tuple[int, ...] = (3, 5, 7)
  fan_outs: tuple[int, ...] = (1, 2, 3, 4)
  geometric: bool = True
  temperatures: tuple[float, ...] = (0.0,)
  batch_sizes: tuple[int, ...] = (1,)
  saguaro_c: float = 1.0
  backup: str = "neural"
  target_devices: int = 1
  layout: Layout = dataclasses.field(default_factory=lambda: Layout("device", None))
  seed: int = 0
  ignore_eos: bool = False
  hf: bool = False


# `bench sweep --quick`: a smoke test's few points.
QUICK_SWEEP = dict(
  prompt_sets=("bundled",), num_prompts=2, max_new_tokens=16, lookaheads=(2,), fan_outs=(1, 2)
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSpeedOptions:
  """`bench models`: the target alone, prefill and decode, f32 and bf16."""

  target: str = "smollm2-135m"
  prompt_tokens: int = 256
  decode_tokens: int = 32
  hf: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class OverlapOptions:
  """`bench overlap`: verification and expansion, alone and together, per (lookahead, fan-out)."""

  target: str = "smollm2-135m"
  draft: str = "smollm2-135m-draft"
  draft_vocab: int | None = None
  lookaheads: tuple[int, ...] = (7, 7, 4)
  fan_outs: tuple[int, ...] = (1, 3, 2)


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


def _engine(options, **kwargs) -> Engine:
  """The engine for the options' target and draft (loaded as `python -m ssd_jax.run` loads
  them: the draft in float16 beside the float32 target, its default head unless given)."""
  target = load_model(options.target)
  draft = load_model(options.draft, dtype=jnp.dtype(default_draft_dtype()))
  return Engine(target, draft, draft_vocab=options.draft_vocab, **kwargs)


def sweep(options: SweepOptions) -> dict[str, Any]:
  layout = options.layout
  engine = _engine(options, target_devices=options.target_devices, placement=layout.placement_for())
  with engine:  # stops its speculator process
    return _sweep(options, engine, layout)


def _sweep(options: SweepOptions, engine, layout) -> dict[str, Any]:
  target, draft = engine.target, engine.draft
  out: dict[str, Any] = {
    "environment": harness.environment(),
    "layout": {
      m: {"ran_on": layout.where(m), "cores": layout.cores(m)} for m in ("ar", "sd", "ssd")
    },
    "options": _jsonable(options) | {"draft_head": engine.draft_head_size},
    "runs": [],
    "latency": [],
    "hf": [],
  }
  for prompt_set in options.prompt_sets:
    prompts = load_prompts(prompt_set, options.num_prompts)
    ids = harness.encode(target.tokenizer, [p.text for p in prompts], chat=True)
    capacity = harness.capacity_for(ids, options.max_new_tokens, max(options.lookaheads)) + 256
    for temperature in options.temperatures:
      sampling = Sampling(temperature=temperature)
      for batch in options.batch_sizes:
        context = {"prompt_set": prompt_set, "temperature": temperature, "batch_size": batch}
        _sweep_point(options, engine, ids, capacity, sampling, context, out)
    if options.hf:
      from ssd_jax.bench import hf  # noqa: PLC0415 (torch is optional)

      out["hf"].append(
        {"prompt_set": prompt_set}
        | hf.compare(
          target, draft, [p.text for p in prompts], options.max_new_tokens, out["runs"], prompt_set
        )
      )
  return out


def _sweep_point(options, engine, ids, capacity, sampling, context, out) -> None:
  batch = context["batch_size"]
  run = lambda spec: harness.run_mode(
    engine,
    ids,
    spec,
    sampling=sampling,
    max_new_tokens=options.max_new_tokens,
    batch_size=batch,
    seed=options.seed,
    ignore_eos=options.ignore_eos,
    capacity=capacity,
  )
  t0 = time.time()
  ar = run(SpecConfig(mode="ar"))
  records = [_record(context, ar, ar)]
  for lookahead in options.lookaheads:
    sd = run(SpecConfig(mode="sd", lookahead=lookahead))
    records.append(_record(context, sd, ar))
    acceptance = float(np.mean(records[-1]["acceptance_per_position"]))

    def ssd(kind, budget, fan_out, lookahead=lookahead):
      spec = SpecConfig(
        mode="ssd",
        lookahead=lookahead,
        fan_out=fan_out,
        saguaro_c=options.saguaro_c,
        backup=options.backup,
      )
      return _record(context, run(spec), ar) | {"fan_out_kind": kind, "budget": budget}

    uniform = [ssd("uniform", f, tree.uniform(lookahead, f)) for f in options.fan_outs]
    records += uniform
    if options.geometric:
      variants = geometric_variants(lookahead, options.fan_outs, uniform, acceptance)
      records += [ssd(*v) for v in variants]
  _add_predictions(options, engine, ids, capacity, sampling, context, records, out)
  out["runs"] += records
  best = max((r for r in records if r["mode"] == "ssd"), key=lambda r: r["tokens_per_second"])
  print(
    f"{context}: ar {records[0]['tokens_per_second']:.1f} tok/s, best ssd "
    f"{best['tokens_per_second']:.1f} (k={best['lookahead']}, F={best['fan_out']}) "
    f"[{time.time() - t0:.0f} s]",
    flush=True,
  )


def _add_predictions(options, engine, ids, capacity, sampling, context, records, out) -> None:
  batch = context["batch_size"]
  cache: dict = {}
  for record in records:
    lookahead = max(record["lookahead"], 1)
    fan_out = tuple(record["fan_out"]) or tree.uniform(lookahead, 1)
    key = (lookahead, fan_out)
    if key not in cache:
      spec = SpecConfig(
        mode="ssd", lookahead=lookahead, fan_out=fan_out, saguaro_c=options.saguaro_c
      )
      cache[key] = time_programs(engine, ids[0], spec, sampling, capacity, batch_size=batch)
      if engine.speculator_startup is not None:  # a speculator process runs ssd
        cache[key] |= _process_overlap(engine, cache[key], batch, lookahead, sampling)
      where = {"lookahead": lookahead, "fan_out": list(fan_out)}
      out["latency"].append(context | where | cache[key])
    record["backup"] = record.get("backup") or options.backup
    record |= predict(record, cache[key], batch)


def _process_overlap(engine, latency, batch, lookahead, sampling) -> dict[str, float]:
  """With the speculator in a process of its own (independence ~1.9 here, bench overlap) a hit
  round's verify and expand run at once on separate cores, and the round adds one exchange
  with the speculator, measured on its channel: `together` is max(verify, expand) + that."""
  from ssd_jax.bench.exchange import probe_ms  # noqa: PLC0415

  vocab = engine.target.config.vocab_size
  link = engine.site.process()
  exchange = probe_ms(link, batch, lookahead, vocab, not sampling.greedy, reps=50)["median_ms"]
  together = max(latency["verify"], latency["expand"]) + exchange
  return {"together": together, "together_in_process": latency["together"], "exchange": exchange}


def _jsonable(options) -> dict:
  out = dataclasses.asdict(options)
  if "layout" in out:
    out["layout"] = str(options.layout)
  return out


def model_speed(options: ModelSpeedOptions) -> dict[str, Any]:
  """Prefill and decode tokens/s of the target alone, f32 and bf16 (and HF eager with --hf)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from ssd_jax.models import KVCache  # noqa: PLC0415
  from ssd_jax.models.prefill import prefill  # noqa: PLC0415

  rows = []
  tokens = np.random.default_rng(0).integers(0, 1000, (1, options.prompt_tokens), dtype=np.int32)
  for dtype in (jnp.float32, jnp.bfloat16):
    model = load_model(options.target, dtype=dtype)
    engine = Engine(model)
    cfg, params = model.config, engine.target_params
    capacity = options.prompt_tokens + options.decode_tokens + 64
    times = []
    for _ in range(3):  # the first call compiles
      cache = KVCache.init(cfg, 1, capacity, dtype)
      t = time.perf_counter()
      jax.block_until_ready(
        prefill(params, tokens, jnp.asarray([options.prompt_tokens]), cache, config=cfg)
      )
      times.append(time.perf_counter() - t)
    prefill_s = min(times[1:])
    gen = engine.generate(
      [tokens[0].tolist()], max_new_tokens=options.decode_tokens, ignore_eos=True, capacity=capacity
    )  # warm-up
    gen = engine.generate(
      [tokens[0].tolist()], max_new_tokens=options.decode_tokens, ignore_eos=True, capacity=capacity
    )
    rows.append(
      {
        "engine": "ssd_jax",
        "dtype": jnp.dtype(dtype).name,
        "prefill_tokens_per_second": options.prompt_tokens / prefill_s,
        "decode_tokens_per_second": gen.metrics.tokens_per_second,
      }
    )
    print(rows[-1], flush=True)
  if options.hf:
    from ssd_jax.bench import hf  # noqa: PLC0415 (torch is optional)

    rows += hf.model_speed(tokens[0].tolist(), options.decode_tokens)
  return {"environment": harness.environment(), "rows": rows, "options": _jsonable(options)}


def measure_overlap(options: OverlapOptions) -> dict[str, Any]:
  """Can this machine overlap verification and expansion? (see bench.programs.overlap) With
  devices of one process, and with the speculator processes' layout on CPU (two processes
  pinned to cores of their own)."""
  engine = _engine(options, placement="device")
  target = engine.target
  prompt = harness.encode(target.tokenizer, [load_prompts("bundled", 1)[0].text], chat=True)[0]
  rows = []
  for lookahead, f in zip(options.lookaheads, options.fan_outs, strict=False):
    spec = SpecConfig(mode="ssd", lookahead=lookahead, fan_out=tree.uniform(lookahead, f))
    row = {"layout": "devices of one process", "lookahead": lookahead, "fan_out": f}
    rows.append(row | overlap(engine, prompt, spec, Sampling(), 1024))
    print(rows[-1], flush=True)
  if (os.cpu_count() or 1) > 1:  # the layout python -m ssd_jax.run uses on CPU
    from ssd_jax.bench.exchange import pinned_pair_independence  # noqa: PLC0415
    from ssd_jax.bench.probes import WORK_KINDS  # noqa: PLC0415

    for kind in WORK_KINDS:  # cores of their own, and how their memory traffic contends
      rows.append(pinned_pair_independence(kind=kind))
      print(rows[-1], flush=True)
  return {"environment": harness.environment(), "rows": rows, "options": _jsonable(options)}
