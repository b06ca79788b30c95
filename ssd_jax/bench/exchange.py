"""What one SSD round's exchange with a speculator process costs, per pipe.

A speculator process (pinned to its own core, as in a real run) answers probes: the target sends
an outcome's arrays (four i32[B]) and gets back a speculation's (i32[B, lookahead + 1] tokens,
two bool[B] flags, and f32[B, lookahead, V] proposal distributions when sampling), made on the
speculator's device. The round trip is timed from the target's side, arrays on its device at
both ends (host reads and writes included), `reps` times after a warm-up.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import numpy as np

from ssd_jax.bench import probes
from ssd_jax.bench.probes import WORK_KINDS, run_work
from ssd_jax.harness.runs import environment
from ssd_jax.speculator.process import SpeculatorOptions, SpeculatorProcess


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
    _, arrays = link.request({"op": "probe", "reply": reply}, outcome)
    arrays = jax.block_until_ready(jax.device_put(arrays, device))
    if i >= 5:
      times.append(time.perf_counter() - t)
  del arrays
  ms = np.asarray(times) * 1e3
  return {
    "median_ms": float(np.median(ms)),
    "p90_ms": float(np.quantile(ms, 0.9)),
    "min_ms": float(ms.min()),
  }


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExchangeOptions:
  """`bench exchange`: the pipes, batch sizes, speculation shape and repetitions to time, and
  the cores of this process and of the speculator."""

  pipes: tuple[str, ...] = ("shm", "transfer")
  batch_sizes: tuple[int, ...] = (1, 8)
  lookahead: int = 3
  vocab: int = 49152
  reps: int = 200
  target_cores: tuple[int, ...] = (0,)
  speculator_cores: tuple[int, ...] = (1,)


def speculator(cores, pipe: str = "shm") -> SpeculatorProcess:
  """A speculator process on `cores` that answers the probes (a tiny draft: only the channel and
  the core are measured)."""
  options = SpeculatorOptions(
    draft="tiny-llama-draft", cores=tuple(cores), pipe=pipe, extensions=(probes.MODULE,)
  )
  return SpeculatorProcess(options, jax.devices()[0])


def exchange(options: ExchangeOptions) -> dict[str, Any]:
  rows = []
  for pipe in options.pipes:
    link = speculator(options.speculator_cores, pipe)
    try:
      for batch in options.batch_sizes:
        for sampled in (False, True):
          row = {
            "pipe": pipe,
            "batch_size": batch,
            "lookahead": options.lookahead,
            "vocab": options.vocab,
            "sampled": sampled,
          }
          row |= probe_ms(link, batch, options.lookahead, options.vocab, sampled, options.reps)
          rows.append(row)
          _print_row(row)
      for kind in WORK_KINDS:
        rows.append({"pipe": pipe, "work": kind, "independence": independence(link, kind=kind)})
        _print_row(rows[-1])
    finally:
      link.close()
  return {"environment": environment(), "options": dataclasses.asdict(options), "rows": rows}


def _print_row(row: dict[str, Any]) -> None:
  """One line a person reads: the round trip's milliseconds, or an independence."""
  if "work" in row:
    i = row["independence"]
    print(
      f"{row['pipe']:>8}  {row['work']}-bound work: alone {i['alone_ms']:.1f} ms, both "
      f"processes at once {i['pair_ms']:.1f} ms, independence {i['independence']:.2f} (2 = a "
      "core of its own)",
      flush=True,
    )
    return
  payload = "sampled (tokens + q)" if row["sampled"] else "greedy (tokens)"
  print(
    f"{row['pipe']:>8}  batch {row['batch_size']:>2}, {payload:<20}  round trip median "
    f"{row['median_ms']:.2f} ms, p90 {row['p90_ms']:.2f}, min {row['min_ms']:.2f}",
    flush=True,
  )


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
  link.request(message)  # both sides compiled and warm
  for _ in range(reps):
    alone.append(run_work(size, kind))
    t = time.perf_counter()
    link.conn.send(message)  # sent, not awaited: the same work runs here meanwhile
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
  links = [speculator((c,)) for c in cores]
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
