"""What one SSD round's exchange with a speculator process costs, per pipe.

A speculator process (pinned to its own core, as in a real run) answers probes: the target sends
an outcome's arrays (four i32[B]) and gets back a speculation's (i32[B, lookahead + 1] tokens,
two bool[B] flags, and f32[B, lookahead, V] proposal distributions when sampling), made on the
speculator's device. The round trip is timed from the target's side, arrays on its device at
both ends (host reads and writes included), `reps` times after a warm-up.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np

from ssd_jax.decode.remote import SpeculatorOptions, SpeculatorProcess
from ssd_jax.decode.serving import WORK_KINDS, run_work


def probe_ms(
  link: SpeculatorProcess, batch: int, lookahead: int, vocab: int, sampled: bool, reps: int
) -> dict[str, float]:
  device = link.device
  outcome = {
    k: jax.device_put(np.zeros(batch, np.int32), device) for k in ("accepted", "bonus", "committed")
  }
  outcome["done"] = jax.device_put(np.zeros(batch, bool), device)
  reply = [
    ["tokens", "<i4", [batch, lookahead + 1]],
    ["point_mass", "|b1", [batch]],
    ["hit", "|b1", [batch]],
  ]
  if sampled:
    reply.append(["probs", "<f4", [batch, lookahead, vocab]])
  times = []
  for i in range(reps + 5):
    t = time.perf_counter()
    link.conn.send({"op": "probe", "arrays": link.pipe.pack(outcome), "reply": reply})
    answer = link.conn.receive(timeout=60)
    arrays = jax.block_until_ready(jax.device_put(link.pipe.unpack(answer["arrays"]), device))
    if i >= 5:
      times.append(time.perf_counter() - t)
  del arrays
  ms = np.asarray(times) * 1e3
  return {
    "median_ms": float(np.median(ms)),
    "p90_ms": float(np.quantile(ms, 0.9)),
    "min_ms": float(ms.min()),
  }


def exchange(args) -> dict[str, Any]:
  from ssd_jax import harness  # noqa: PLC0415

  rows = []
  for pipe in args.pipes:
    options = SpeculatorOptions(
      draft="tiny-llama-draft", cores=tuple(args.speculator_cores), pipe=pipe
    )
    link = SpeculatorProcess(options, jax.devices()[0])
    try:
      for batch in args.batch_sizes:
        for sampled in (False, True):
          row = {
            "pipe": pipe,
            "batch_size": batch,
            "lookahead": args.lookahead,
            "vocab": args.vocab,
            "sampled": sampled,
          }
          row |= probe_ms(link, batch, args.lookahead, args.vocab, sampled, args.reps)
          rows.append(row)
          print(row, flush=True)
      for kind in WORK_KINDS:
        rows.append({"pipe": pipe, "work": kind, "independence": independence(link, kind=kind)})
        print(rows[-1], flush=True)
    finally:
      link.close()
  return {"environment": harness.environment(), "rows": rows}


def independence(
  link: SpeculatorProcess, size: int = 576, reps: int = 15, kind: str = "compute"
) -> dict[str, float]:
  """2 x (the work alone here) / (the same work here and in the speculator at once): 2 when the
  speculator's core is compute of its own, 1 when the two share one pool. With `kind="memory"`
  (a decode step's weight streaming) it also says how much the two processes' shares of the
  host's memory bandwidth hold each other back: a bound on what a verification can lose to an
  expansion beside it (which streams far less than this work)."""
  message = {"op": "work", "size": size, "kind": kind}
  alone, pair = [], []
  run_work(size, kind)
  link.conn.send(message)  # both sides compiled and warm
  link.conn.receive(timeout=120)
  for _ in range(reps):
    alone.append(run_work(size, kind))
    t = time.perf_counter()
    link.conn.send(message)
    run_work(size, kind)
    link.conn.receive(timeout=120)
    pair.append(time.perf_counter() - t)
  return _independence(alone, pair)


def pinned_pair_independence(
  cores=(0, 1), size: int = 576, reps: int = 15, kind: str = "compute"
) -> dict[str, float]:
  """The process layout's independence measured apart from this process: two speculator
  processes pinned to `cores` run the same work (`kind`, see `independence`), each alone, then
  both at once."""
  message = {"op": "work", "size": size, "kind": kind}
  links = [
    SpeculatorProcess(SpeculatorOptions(draft="tiny-llama-draft", cores=(c,)), jax.devices()[0])
    for c in cores
  ]
  try:

    def work(which) -> float:
      t = time.perf_counter()
      for link in which:
        link.conn.send(message)
      for link in which:
        link.conn.receive(timeout=120)
      return time.perf_counter() - t

    work(links)  # compiled and warm on both
    alone, pair = [], []
    for _ in range(reps):  # interleaved, so the host's drift falls on both alike
      alone.append(work(links[:1]))
      pair.append(work(links))
  finally:
    for link in links:
      link.close()
  layout = f"processes on cores {','.join(map(str, cores))}"
  return {"layout": layout, "work": kind} | _independence(alone, pair)


def _independence(alone: list[float], pair: list[float]) -> dict[str, float]:
  """Medians of the alone and pair timings (seconds) and 2 x alone / pair."""
  alone_s, pair_s = float(np.median(alone)), float(np.median(pair))
  return {"alone_ms": alone_s * 1e3, "pair_ms": pair_s * 1e3, "independence": 2 * alone_s / pair_s}
