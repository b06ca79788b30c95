"""`python -m ssd_jax.bench ab`: configurations alternated pass by pass on the same prompts.

On a shared host the speed drifts by 10-25 % from minute to minute, more than the differences a
default is chosen by, and a sweep runs each configuration once, minutes apart. Here every pass
runs each configuration once over the same prompts, adjacent in time, in a rotated order (pass p
starts at configuration p), and each pass's ratios to the first configuration are kept: their
median over the passes is the figure to read, their spread how far to trust it.

A configuration is `MODE[:DRAFT[:K[:F[:C]]]]`: `ar`, `sd:smollm2-135m-draft:3`,
`ssd:smollm2-135m-draft-wide:5:4` (lookahead K, uniform fan-out F), `ssd::3:4:0.5` (Saguaro
sampling's C, which only matters at T > 0). An empty or missing DRAFT is the mode's default
draft, as in `python -m ssd_jax.run`; K defaults to 3, F to 4 and C to 1. The layout
is run's: sd's draft beside the target, ssd's in a speculator process on a core of its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from ssd_jax.config import SpecConfig
from ssd_jax.data import load_prompts
from ssd_jax.decode import tree
from ssd_jax.decode.sampling import Sampling
from ssd_jax.harness import runs as harness
from ssd_jax.harness.config import DEFAULT_TARGET
from ssd_jax.models.registry import default_draft_dtype, load_model
from ssd_jax.runtime import Engine
from ssd_jax.speculator.layout import Layout


@dataclasses.dataclass(frozen=True)
class Config:
  """One configuration to alternate: a mode, its draft (None for ar), lookahead, fan-out and
  Saguaro sampling's C."""

  mode: str
  draft: str | None = None
  lookahead: int = 0
  fan_out: int = 0
  saguaro_c: float = 1.0

  @property
  def label(self) -> str:
    if self.mode == "ar":
      return "ar"
    fan = f", F={self.fan_out}" if self.mode == "ssd" else ""
    fan += f", C={self.saguaro_c:g}" if self.saguaro_c < 1.0 else ""
    return f"{self.mode} {self.draft} k={self.lookahead}{fan}"

  def spec(self) -> SpecConfig:
    if self.mode == "ar":
      return SpecConfig(mode="ar")
    if self.mode == "sd":
      return SpecConfig(mode="sd", lookahead=self.lookahead)
    return SpecConfig(
      mode="ssd",
      lookahead=self.lookahead,
      fan_out=tree.uniform(self.lookahead, self.fan_out),
      saguaro_c=self.saguaro_c,
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class AbOptions:
  """`bench ab`: the configurations (the first is the one the others are divided by), passes,
  prompts and sampling, and the layout (run's)."""

  target: str = DEFAULT_TARGET
  draft_vocab: int | None = None
  configs: tuple[Config, ...] = ()
  passes: int = 4
  prompts: str = "bundled"
  num_prompts: int | None = None
  max_new_tokens: int = 128
  temperature: float = 0.0
  seed: int = 0
  layout: Layout = dataclasses.field(default_factory=lambda: Layout("device", None))


def ab(options: AbOptions) -> dict[str, Any]:
  """Run `options.configs` alternately for `options.passes` passes; see the module docstring."""
  layout, configs = options.layout, options.configs
  if len(set(configs)) != len(configs):
    raise ValueError("--configs lists a configuration twice")
  with contextlib.ExitStack() as stack:  # stops the speculator processes however it ends
    engines = _engines(options, configs, layout, stack)
    target = next(iter(engines.values())).target
    prompts = load_prompts(options.prompts, options.num_prompts)
    ids = harness.encode(target.tokenizer, [p.text for p in prompts], chat=True)
    capacity = harness.capacity_for(ids, options.max_new_tokens, max(c.lookahead for c in configs))
    sampling = Sampling(temperature=options.temperature)
    for c in configs:  # every configuration is checked before anything is timed
      harness.check(engines[c], ids, c.spec(), sampling, options.max_new_tokens, 1, capacity)
    load_before = os.getloadavg()
    passes = []
    for p in range(options.passes):
      order = configs[p % len(configs) :] + configs[: p % len(configs)]
      runs = {
        c: _run(options, engines[c], c, ids, sampling, capacity, warmup=p == 0) for c in order
      }
      passes.append([runs[c] for c in configs])
      print(f"pass {p + 1}: " + ", ".join(f"{r['tokens_per_second']:.1f}" for r in passes[-1]))
  rows = _rows(configs, passes, layout)
  return {
    "environment": harness.environment(),
    "load_average_before_and_after": [list(load_before), list(os.getloadavg())],
    "rows": rows,
    "greedy_equal": options.temperature == 0
    and all(r["tokens"] == passes[0][0]["tokens"] for run in passes for r in run),
    "options": {k: str(v) for k, v in dataclasses.asdict(options).items()},
    "table": format_table(rows, options.passes),
  }


def _engines(options, configs, layout, stack) -> dict[Config, Engine]:
  """One engine per draft (ar shares one), the target loaded once; a draft that ssd uses gets a
  speculator process when the layout has one (sd then drafts beside the target all the same)."""
  target = load_model(options.target)
  names = list(dict.fromkeys(c.draft for c in configs if c.draft)) or [None]
  by_name = {}
  for name in names:
    draft = None if name is None else load_model(name, dtype=jnp.dtype(default_draft_dtype()))
    ssd = any(c.mode == "ssd" and c.draft == name for c in configs)
    by_name[name] = stack.enter_context(
      Engine(
        target,
        draft,
        draft_vocab=None if draft is None else options.draft_vocab,
        placement=layout.placement_for() if ssd else "device",
      )
    )
  return {c: by_name[c.draft or names[0]] for c in configs}


def _run(options, engine, config, ids, sampling, capacity, warmup) -> dict[str, Any]:
  result = harness.run_mode(
    engine,
    ids,
    config.spec(),
    sampling=sampling,
    max_new_tokens=options.max_new_tokens,
    batch_size=1,
    seed=options.seed,
    ignore_eos=False,
    capacity=capacity,
    warmup=warmup,
  )
  m = result.merged
  return {
    "tokens_per_second": result.tokens_per_second,
    "accepted_per_round": m.mean_accepted,
    "hit_rate_after_first_round": m.later_hit_rate if config.mode == "ssd" else None,
    "compiles_after_warmup": result.compiles,
    "tokens": result.tokens,
  }


def _rows(configs, passes, layout) -> list[dict[str, Any]]:
  speeds = np.array([[r["tokens_per_second"] for r in run] for run in passes])  # pass x config
  ratios = speeds / speeds[:, :1]  # within each pass, to the first configuration
  rows = []
  for j, c in enumerate(configs):
    last = passes[-1][j]
    rows.append(
      {
        "config": c.label,
        "mode": c.mode,
        "draft": c.draft,
        "lookahead": c.lookahead,
        "fan_out": c.fan_out,
        "saguaro_c": c.saguaro_c,
        "ran_on": layout.where(c.mode),
        "tokens_per_second": speeds[:, j].tolist(),
        "median_tokens_per_second": float(np.median(speeds[:, j])),
        "ratio_to_first": ratios[:, j].tolist(),
        "median_ratio_to_first": float(np.median(ratios[:, j])),
        "accepted_per_round": last["accepted_per_round"],
        "hit_rate_after_first_round": last["hit_rate_after_first_round"],
        "compiles_after_warmup": sum(run[j]["compiles_after_warmup"] for run in passes),
      }
    )
  return rows


def format_table(rows, passes: int) -> str:
  first = rows[0]["config"]
  lines = [
    f"| configuration | ran on | tok/s, {passes} passes | median | / {first}, median [range] "
    "| accepted/round | hit rate |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    hit = r["hit_rate_after_first_round"]
    lines.append(
      f"| {r['config']} | {r['ran_on']} | "
      + " ".join(f"{s:.1f}" for s in r["tokens_per_second"])
      + f" | {r['median_tokens_per_second']:.1f} | {r['median_ratio_to_first']:.2f} "
      f"[{min(r['ratio_to_first']):.2f}-{max(r['ratio_to_first']):.2f}] | "
      f"{r['accepted_per_round']:.2f} | {'-' if hit is None else f'{hit:.2f}'} |"
    )
  return "\n".join(lines)
