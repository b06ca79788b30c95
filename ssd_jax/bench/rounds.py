"""`python -m ssd_jax.bench rounds`: what one decode round costs, and the host's part of it.

Each configuration (mode x where the draft runs x batch size) decodes a fixed number of tokens
(EOS ignored, greedy) after a warm-up, `repeats` times; the fastest run is kept. Per round:

- `round_ms`: the decode loop's seconds over its rounds;
- `main_thread_ms`: the CPU time of the thread that drives the rounds, over the whole call. An
  upper bound on the host's work (Python, dispatch, transfers): on a CPU, XLA runs programs this
  small largely on the thread that dispatches them, so there it includes much of the device's
  work too. On an accelerator the device's work is elsewhere and this is the host's alone.

With tiny models the rounds are short, so what the host adds to each is what shows: on a GPU a
70B round is about 15 ms, and everything here must hide behind it.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from ssd_jax.config import MODES, SpecConfig
from ssd_jax.harness.runs import environment
from ssd_jax.models.registry import load_model
from ssd_jax.runtime.engine import Engine
from ssd_jax.speculator.base import Placement

PLACEMENTS = ("device", "process")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RoundsOptions:
  target: str = "tiny-llama"
  draft: str = "tiny-llama-draft"
  modes: tuple[str, ...] = MODES
  placements: tuple[str, ...] = PLACEMENTS  # ssd's draft; ar and sd run with the first
  batch_sizes: tuple[int, ...] = (1, 8)
  max_new_tokens: int = 400
  repeats: int = 3
  lookahead: int = 3

  def __post_init__(self):
    if self.max_new_tokens < 1 or self.repeats < 1 or min(self.batch_sizes) < 1:
      raise ValueError("--max-new-tokens, --repeats and --batch-sizes must be >= 1")
    if self.lookahead < 1:
      raise ValueError("--lookahead must be >= 1")
    if unknown := set(self.placements) - set(PLACEMENTS):
      raise ValueError(f"unknown placements {sorted(unknown)}: use {', '.join(PLACEMENTS)}")


def _spec(mode: str, lookahead: int) -> SpecConfig:
  if mode == "ar":
    return SpecConfig(mode="ar")
  if mode == "sd":
    return SpecConfig(mode="sd", lookahead=lookahead)
  return SpecConfig(mode="ssd", lookahead=lookahead, fan_out=(2, 2) + (1,) * (lookahead - 1))


def _placement(kind: str) -> Placement:
  """A speculator process on the last core (this process keeps the others); a device mesh."""
  if kind == "process":
    return Placement(kind="process", cores=((os.cpu_count() or 1) - 1,))
  return Placement(kind="device")


def rounds(options: RoundsOptions) -> dict[str, Any]:
  target, draft = load_model(options.target), load_model(options.draft)
  rows = []
  for placement in options.placements:
    modes = [m for m in options.modes if m == "ssd" or placement == options.placements[0]]
    if not modes:
      continue
    with Engine(target, draft, placement=_placement(placement)) as engine:
      for mode in modes:
        for batch in options.batch_sizes:
          rows.append(_measure(engine, mode, placement, batch, options))
          print(_line(rows[-1]), flush=True)
  return {"options": dataclasses.asdict(options), "environment": environment(), "rows": rows}


def _measure(engine: Engine, mode: str, placement: str, batch: int, options) -> dict[str, Any]:
  spec = _spec(mode, options.lookahead)
  prompts = [[5, 17, 99, 3, 8][: 1 + i % 5] for i in range(batch)]
  run = lambda: engine.generate(
    prompts, spec=spec, max_new_tokens=options.max_new_tokens, ignore_eos=True
  )
  run()  # compiles
  best = None
  for _ in range(options.repeats):
    start = time.thread_time()
    metrics = run().metrics
    cpu = time.thread_time() - start
    row = {
      "mode": mode,
      "placement": placement if mode == "ssd" else "this process",
      "batch_size": batch,
      "rounds": metrics.loop_rounds,
      "round_ms": 1e3 * metrics.decode_seconds / metrics.loop_rounds,
      "main_thread_ms": 1e3 * cpu / metrics.loop_rounds,
    }
    best = row if best is None or row["round_ms"] < best["round_ms"] else best
  return best


def _line(row: dict[str, Any]) -> str:
  return (
    f"{row['mode']:>3} {row['placement']:<12} batch {row['batch_size']:>2}: "
    f"{row['round_ms']:.3f} ms a round, {row['main_thread_ms']:.3f} ms of the main thread's CPU"
  )
