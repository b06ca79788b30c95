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

import argparse
import contextlib
import dataclasses
import os
from typing import Any

import numpy as np

from ssd_jax import harness
from ssd_jax.cli import DEFAULT_DRAFTS, draft_dtype, finite_float, resolve_draft_vocab
from ssd_jax.config import MODES, SpecConfig
from ssd_jax.data import load_prompts
from ssd_jax.decode import Engine, Sampling, tree
from ssd_jax.models.registry import load_model


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
      return SpecConfig(mode="ar", lookahead=0)
    if self.mode == "sd":
      return SpecConfig(mode="sd", lookahead=self.lookahead)
    return SpecConfig(
      mode="ssd",
      lookahead=self.lookahead,
      fan_out=tree.uniform(self.lookahead, self.fan_out),
      saguaro_c=self.saguaro_c,
    )


def parse_config(text: str) -> Config:
  """`MODE[:DRAFT[:K[:F[:C]]]]` -> Config (argparse type: a bad one is a usage error)."""
  from ssd_jax.run import DEFAULT_FAN_OUT  # noqa: PLC0415 (run's defaults, one layer)

  mode, *rest = text.split(":")
  if mode not in MODES:
    raise argparse.ArgumentTypeError(f"{text!r}: the mode must be one of {', '.join(MODES)}")
  if mode == "ar":
    if rest:
      raise argparse.ArgumentTypeError(f"{text!r}: ar takes no draft, lookahead or fan-out")
    return Config("ar")
  limit = 4 if mode == "ssd" else 2
  if len(rest) > limit:
    raise argparse.ArgumentTypeError(
      f"{text!r}: {mode} takes at most {limit} fields after the mode "
      f"({'DRAFT:K:F:C' if mode == 'ssd' else 'DRAFT:K'})"
    )
  draft = (rest[0] if rest else "") or DEFAULT_DRAFTS[mode]
  numbers = rest[1:] + [""] * (4 - len(rest))
  try:
    lookahead = int(numbers[0] or 3)
    fan_out = int(numbers[1] or DEFAULT_FAN_OUT) if mode == "ssd" else 0
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r}: K and F must be integers") from None
  if lookahead < 1 or (mode == "ssd" and fan_out < 1):
    raise argparse.ArgumentTypeError(f"{text!r}: K and F must be >= 1")
  try:  # C is checked where every SpecConfig is: its range is SpecConfig's to say
    config = Config(mode, draft, lookahead, fan_out, finite_float(numbers[2] or "1"))
    config.spec()
  except (argparse.ArgumentTypeError, ValueError) as e:
    raise argparse.ArgumentTypeError(f"{text!r}: C: {e}") from None
  return config


def ab(args) -> dict[str, Any]:
  """Run `args.configs` alternately for `args.passes` passes; see the module docstring."""
  layout, configs = args.layout, args.configs
  if len(set(configs)) != len(configs):
    raise ValueError("--configs lists a configuration twice")
  with contextlib.ExitStack() as stack:  # stops the speculator processes however it ends
    engines = _engines(args, configs, layout, stack)
    target = next(iter(engines.values())).target
    prompts = load_prompts(args.prompts, args.num_prompts)
    ids = harness.encode(target.tokenizer, [p.text for p in prompts], chat=True)
    capacity = harness.capacity_for(ids, args.max_new_tokens, max(c.lookahead for c in configs))
    sampling = Sampling(temperature=args.temperature)
    for c in configs:  # every configuration is checked before anything is timed
      harness.check(engines[c], ids, c.spec(), sampling, args.max_new_tokens, 1, capacity)
    load_before = os.getloadavg()
    passes = []
    for p in range(args.passes):
      order = configs[p % len(configs) :] + configs[: p % len(configs)]
      runs = {c: _run(args, engines[c], c, ids, sampling, capacity, warmup=p == 0) for c in order}
      passes.append([runs[c] for c in configs])
      print(f"pass {p + 1}: " + ", ".join(f"{r['tokens_per_second']:.1f}" for r in passes[-1]))
  rows = _rows(configs, passes, layout)
  return {
    "environment": harness.environment(),
    "load_average_before_and_after": [list(load_before), list(os.getloadavg())],
    "rows": rows,
    "greedy_equal": args.temperature == 0
    and all(r["tokens"] == passes[0][0]["tokens"] for run in passes for r in run),
    "args": {k: str(v) for k, v in vars(args).items()},
    "table": format_table(rows, args.passes),
  }


def _engines(args, configs, layout, stack) -> dict[Config, Engine]:
  """One engine per draft (ar shares one), the target loaded once; a draft that ssd uses gets a
  speculator process when the layout has one (sd then drafts beside the target all the same)."""
  target = load_model(args.target)
  names = list(dict.fromkeys(c.draft for c in configs if c.draft)) or [None]
  by_name = {}
  for name in names:
    draft = None if name is None else load_model(name, dtype=draft_dtype(None))
    ssd = any(c.mode == "ssd" and c.draft == name for c in configs)
    by_name[name] = stack.enter_context(
      Engine(
        target,
        draft,
        draft_vocab=None if draft is None else resolve_draft_vocab(args.draft_vocab, draft),
        draft_placement=layout.placement if ssd else "device",
        speculator_cores=layout.speculator_cores,
      )
    )
  return {c: by_name[c.draft or names[0]] for c in configs}


def _run(args, engine, config, ids, sampling, capacity, warmup) -> dict[str, Any]:
  result = harness.run_mode(
    engine,
    ids,
    config.spec(),
    sampling=sampling,
    max_new_tokens=args.max_new_tokens,
    batch_size=1,
    seed=args.seed,
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
