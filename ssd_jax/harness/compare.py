"""The modes of a run side by side: decode the prompts with each, then the headline ratios, the
table (what each mode ran on, tokens/s and per core, acceptance, hit rate) and the JSON.

With a speculator process on a CPU host the table can add ar and sd on every core of the machine
(`Output.all_cores`), run in a process of its own pinned to every core, so nobody mistakes where
this machine's cores are best spent.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import sys
from collections.abc import Callable
from pathlib import Path

from ssd_jax.data import load_prompts
from ssd_jax.harness import runs
from ssd_jax.harness.config import RunConfig, Speculation
from ssd_jax.runtime import Engine
from ssd_jax.speculator.layout import Layout, describe_cores

Progress = Callable[[str, int], None]


@dataclasses.dataclass(frozen=True)
class Workload:
  """The run's prompts, encoded, and the one cache size every batch uses."""

  names: list[str]  # each prompt's id
  ids: list[list[int]]
  capacity: int


@dataclasses.dataclass
class Comparison:
  """What a run measured: each mode over the prompts, and ar and sd on every core if asked."""

  config: RunConfig
  layout: Layout
  workload: Workload
  results: dict[str, runs.ModeResult]
  all_cores: dict[str, dict]
  engines: dict[str, Engine]
  speculator_startup: dict[str, float] | None = None  # how ssd's speculator process started

  @property
  def ratios(self) -> dict[str, float]:
    out = runs.ratios(self.results)
    ssd, sd = self.results.get("ssd"), self.all_cores.get("sd")
    if ssd is not None and sd is not None:
      out["ssd/sd on all cores"] = ssd.tokens_per_second / sd["tokens_per_second"]
    return out


def wants_all_cores(config: RunConfig, layout: Layout) -> bool:
  """ar and sd on every core: only beside ssd in a speculator process on this host; by default
  with every mode, on request (`--all-cores`) with a single one."""
  possible = "ssd" in config.modes and layout.speculator_cores is not None
  asked = config.output.all_cores
  return possible and (asked if asked is not None else set(config.modes) == {"ar", "sd", "ssd"})


def describe(config: RunConfig, layout: Layout) -> str:
  """What the run will do, said before it does it."""
  d = config.decoding
  modes = ", ".join(config.modes[:-1]) + (" and " if len(config.modes) > 1 else "")
  modes += config.modes[-1]
  count = d.prompt_limit or "all"
  sampling = "greedy" if d.sampling.greedy else f"temperature {d.sampling.temperature:g}"
  where = "; ".join(
    f"{m} on {layout.where(m)}"
    + ("" if m != "ssd" or layout.placement == "device" else " (a speculator process)")
    for m in config.modes
  )
  text = (
    f"{modes} on {count} {d.prompts} prompts ({d.max_new_tokens} new tokens at most, {sampling}, "
    f"batch {d.batch_size}); {where}"
  )
  if wants_all_cores(config, layout):
    text += (
      f"; then ar and sd on all {os.cpu_count()} cores, for comparison (--no-all-cores skips them)"
    )
  return text


def workload(config: RunConfig, engines: dict[str, Engine]) -> Workload:
  """The prompts, encoded for the target, with every mode's configuration checked against them
  before anything decodes. Raises ValueError (or FileNotFoundError) naming what is wrong."""
  d = config.decoding
  engine = engines[config.modes[-1]]
  tokenizer = engine.target.tokenizer
  if tokenizer is None:
    raise ValueError(f"target {engine.target.name!r} has no tokenizer; give a model with one")
  prompts = load_prompts(d.prompts, d.prompt_limit)
  chat = d.chat_template and bool(tokenizer.chat_template)
  ids = runs.encode(tokenizer, [p.text for p in prompts], chat)
  capacity = runs.capacity_for(ids, d.max_new_tokens, config.lookahead)
  for mode in config.modes:
    runs.check(
      engines[mode], ids, config.spec(mode), d.sampling, d.max_new_tokens, d.batch_size, capacity
    )
  return Workload([p.id for p in prompts], ids, capacity)


def settings(config: RunConfig, work: Workload) -> runs.Settings:
  d = config.decoding
  return runs.Settings(
    sampling=d.sampling,
    max_new_tokens=d.max_new_tokens,
    batch_size=d.batch_size,
    seed=d.seed,
    ignore_eos=d.ignore_eos,
    capacity=work.capacity,
    trace=config.output.json is not None,
  )


def compare(
  config: RunConfig,
  engines: dict[str, Engine],
  layout: Layout,
  work: Workload,
  progress: Progress | None = None,
) -> Comparison:
  """Every mode over the prompts, interleaved batch by batch (`runs.run_interleaved`, so the
  ratios hold on a host whose speed drifts), then ar and sd on every core if the run asks."""
  jobs = {mode: (engines[mode], config.spec(mode)) for mode in config.modes}
  results = runs.run_interleaved(jobs, work.ids, settings(config, work), progress)
  all_cores = on_all_cores(config) if wants_all_cores(config, layout) else {}
  ssd = engines.get("ssd")
  startup = None if ssd is None else ssd.speculator_startup
  return Comparison(config, layout, work, results, all_cores, engines, startup)


def all_cores_config(config: RunConfig) -> RunConfig:
  """The run of ar and sd on every core beside `config`: the same prompts, settings and sd
  draft (under --mode ssd too, where sd's is its default draft or --draft), no ssd flags."""
  return dataclasses.replace(
    config,
    modes=("ar", "sd"),
    models=dataclasses.replace(config.models, draft=config.models.draft_for("sd")),
    speculation=dataclasses.replace(config.speculation, **_ssd_only_unset()),
    layout=dataclasses.replace(
      config.layout,
      target_cores="all",
      draft_placement=None,
      speculator=None,
      speculator_token_file=None,
      speculator_pipe=None,
    ),
    output=dataclasses.replace(config.output, json=None, progress=False, all_cores=False),
  )


def on_all_cores(config: RunConfig) -> dict[str, dict]:
  """ar's and sd's summaries from a process pinned to every core (a fresh interpreter: a
  process's CPU thread pool is sized when JAX starts). A failure is reported, not raised."""
  only = all_cores_config(config)
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
    try:
      return pool.submit(_every_core, only, os.getpid()).result()
    except Exception as e:  # the comparison is extra: say why it is missing, keep the run
      print(f"(ar and sd on all cores could not run: {e})", file=sys.stderr)
      return {}


def _ssd_only_unset() -> dict:
  return {name: (False if name == "geometric" else None) for name in Speculation.SSD_ONLY}


def _every_core(config: RunConfig, parent: int) -> dict[str, dict]:
  """In the child: pin every core before JAX starts, then run `config` (ar and sd)."""
  import contextlib  # noqa: PLC0415

  from ssd_jax.harness.engines import build_engines, layout_of  # noqa: PLC0415
  from ssd_jax.speculator.layout import apply_layout, set_cpu_devices  # noqa: PLC0415
  from ssd_jax.speculator.process import exit_with_parent  # noqa: PLC0415

  exit_with_parent(parent)
  layout = apply_layout(layout_of(config))
  set_cpu_devices(config.layout.target_devices, config.layout.draft_devices)
  with contextlib.ExitStack() as stack:
    engines = build_engines(config, layout, stack)
    work = workload(config, engines)
    done = compare(config, engines, layout, work)
  return {m: r.summary() for m, r in done.results.items()}


def _all_cores() -> tuple[int, ...]:
  return tuple(range(os.cpu_count() or 1))


def ratio_line(ratios: dict[str, float]) -> str:
  return "   ".join(f"{k.replace('/', ' / ')} {v:.2f}x" for k, v in ratios.items())


def format_table(c: Comparison) -> str:
  """The headline ratios, then a row per mode (and per all-cores mode)."""
  d, n = c.config.decoding, os.cpu_count() or 1
  rows = []
  for mode, r in c.results.items():
    engine = c.engines[mode]
    m = r.merged
    rows.append(
      [
        mode,
        c.layout.where(mode),
        _short(c.config.models.draft_for(mode)),
        f"{r.tokens_per_second:.1f}",
        f"{r.tokens_per_second / c.layout.cores(mode):.1f}",
        f"{m.mean_accepted:.2f}",
        f"{m.hit_rate:.2f}" if mode == "ssd" else "-",
        str(engine.draft_head_size or "-") if mode != "ar" else "-",
        str(r.generated_tokens),
      ]
    )
  for mode, s in c.all_cores.items():
    rows.append(
      [
        mode,
        f"all {n} cores",
        _short(c.config.models.draft_for(mode)),
        f"{s['tokens_per_second']:.1f}",
        f"{s['tokens_per_second'] / n:.1f}",
        f"{s['mean_accepted_tokens_per_round']:.2f}",
        "-",
        "-" if mode == "ar" else "as sd",
        str(s["generated_tokens"]),
      ]
    )
  head = ["mode", "ran on", "draft", "tok/s", "per core", "accepted/round", "hit rate"]
  head += ["draft head", "tokens"]
  widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
  line = lambda row: "  ".join(
    cell.ljust(w) if i < 3 else cell.rjust(w)
    for i, (cell, w) in enumerate(zip(row, widths, strict=True))
  )
  sampling = "greedy" if d.sampling.greedy else f"temperature {d.sampling.temperature:g}"
  out = [
    ratio_line(c.ratios),
    f"{len(c.workload.ids)} prompts ({d.prompts}), at most {d.max_new_tokens} new tokens, "
    f"{sampling}, batch {d.batch_size}, lookahead {c.config.lookahead}",
    "",
    line(head),
    *map(line, rows),
  ]
  if c.all_cores:
    out.append(f"(the last {len(c.all_cores)}: one process on every core, for comparison)")
  if d.sampling.greedy and len(c.results) > 1:
    same = runs.same_tokens(c.results)
    out.append(f"greedy outputs identical across modes: {'yes' if same else 'NO'}")
  return "\n".join(out)


def _short(name: str | None) -> str:
  return "-" if name is None else Path(name).name


def speculator_line(c: Comparison) -> str | None:
  """How the speculator process started, if one did."""
  startup = c.speculator_startup
  if startup is None:
    return None
  verb = "reached" if c.layout.address else "started"
  warmup = c.results["ssd"].warmup_seconds
  return (
    f"speculator process: {verb} in {startup['spawn_seconds']:.1f} s, draft loaded in "
    f"{startup['load_seconds']:.1f} s; ssd's warm-up (compiling on both sides) {warmup:.1f} s; "
    "none of it in tokens/s"
  )


def to_json(c: Comparison) -> dict:
  """What was measured, and only that: each mode's summary, the ratios of the pairs that ran,
  whether greedy outputs agree (when more than one mode ran greedily)."""
  any_engine = c.engines[c.config.modes[-1]]
  payload = {
    "config": c.config.to_json(),
    "environment": runs.environment()
    | {"attention_impl": any_engine.attention_impl, "shared_device": any_engine.shared},
    "layout": {
      mode: {
        "ran_on": c.layout.where(mode),
        "cores": c.layout.cores(mode),
        "draft": c.config.models.draft_for(mode),
        "draft_head": c.engines[mode].draft_head_size if mode != "ar" else None,
      }
      for mode in c.results
    },
    "modes": {mode: r.summary() for mode, r in c.results.items()},
    "ratios": c.ratios,
  }
  if c.speculator_startup is not None:
    payload["speculator_startup"] = c.speculator_startup
  if c.all_cores:
    cores = describe_cores(_all_cores())
    payload["all_cores"] = {
      mode: {"ran_on": cores} | {k: v for k, v in s.items() if k != "generated_token_ids"}
      for mode, s in c.all_cores.items()
    }
  if c.config.decoding.sampling.greedy and len(c.results) > 1:
    payload["greedy_outputs_identical"] = runs.same_tokens(c.results)
  return payload


def write_json(c: Comparison, path: Path) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(to_json(c), indent=1))
