"""Running decoding modes over prompt sets: the shared core of `python -m ssd_jax.run` and the
benchmarks. Nothing here parses flags or reads the environment."""

from __future__ import annotations

import dataclasses
import platform
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from ssd_jax.config import SpecConfig
from ssd_jax.decode.sampling import Sampling
from ssd_jax.models.prefill import bucket_length
from ssd_jax.models.tokenizer import Tokenizer
from ssd_jax.runtime import Engine, Metrics
from ssd_jax.runtime.metrics import median_ms
from ssd_jax.timing import count_compiles


def encode(tokenizer: Tokenizer, texts: Sequence[str], chat: bool) -> list[list[int]]:
  """Token ids of each prompt, in the model's chat format when `chat` is set."""
  return [tokenizer.encode(tokenizer.apply_chat_template(t) if chat else t) for t in texts]


@dataclasses.dataclass
class ModeResult:
  """One mode's run over all prompts: merged metrics and per-prompt tokens."""

  mode: str
  spec: SpecConfig
  tokens: list[list[int]]
  metrics: list[Metrics]  # one per batch
  compiles: int = 0  # XLA compilations in the timed batches (after the warm-up), both processes
  warmup_seconds: float = 0.0  # the warm-up batches (compilation), not in tokens/s

  @property
  def generated_tokens(self) -> int:
    return sum(m.generated_tokens for m in self.metrics)

  @property
  def decode_seconds(self) -> float:
    return sum(m.decode_seconds for m in self.metrics)

  @property
  def tokens_per_second(self) -> float:
    return self.generated_tokens / self.decode_seconds if self.decode_seconds else 0.0

  @property
  def merged(self) -> Metrics:
    """The batches' metrics as one run (counts and times summed; per-round timestamps stay
    with their batch, see `summary`)."""
    first = self.metrics[0]
    return dataclasses.replace(
      first,
      num_sequences=sum(m.num_sequences for m in self.metrics),
      active_sequences=sum(m.active_sequences for m in self.metrics),
      generated_tokens=self.generated_tokens,
      decode_seconds=self.decode_seconds,
      prefill_seconds=sum(m.prefill_seconds for m in self.metrics),
      loop_rounds=sum(m.loop_rounds for m in self.metrics),
      accept_hist=sum(m.accept_hist for m in self.metrics),
      round_times={},
      round_drafted=[],
      extra={k: v for k, v in first.extra.items() if k != "speculator_compiles"}
      | _summed(self.metrics, "rounds_served_by_target"),
      backup_rounds=sum(m.backup_rounds for m in self.metrics),
    )

  def summary(self) -> dict[str, Any]:
    out = self.merged.summary()
    pooled: dict[str, list] = {}
    for m in self.metrics:  # stage durations pooled over every batch's rounds
      for k, v in m.stage_samples().items():
        pooled.setdefault(k, []).extend(v)
    out |= {f"{k}_median": v for k, v in median_ms(pooled).items()}
    if "expand_ms" in pooled and (np.asarray(pooled["verify_ms"]) > 0).any():
      # Does the draft's expansion finish within the target's verification, round by round?
      expand, verify = np.asarray(pooled["expand_ms"]), np.asarray(pooled["verify_ms"])
      ratio = expand[verify > 0] / verify[verify > 0]
      out["expand_over_verify_p10_p50_p90"] = np.quantile(ratio, [0.1, 0.5, 0.9]).tolist()
      out["expand_within_verify_fraction"] = float((ratio <= 1.0).mean())
    out["spec"] = dataclasses.asdict(self.spec)
    out["per_batch_tokens_per_second"] = [m.tokens_per_second for m in self.metrics]
    out["compiles_after_warmup"] = self.compiles
    out["warmup_seconds"] = self.warmup_seconds
    out["generated_token_ids"] = self.tokens
    return out


def _summed(metrics, key: str) -> dict[str, int]:
  """{key: its sum over the batches} when the batches report it."""
  values = [m.extra[key] for m in metrics if key in m.extra]
  return {key: sum(values)} if values else {}


def capacity_for(prompts: Sequence[Sequence[int]], max_new_tokens: int, lookahead: int) -> int:
  """One cache size for the whole run, so every batch reuses the same compiled programs."""
  need = bucket_length(max(len(p) for p in prompts)) + max_new_tokens + lookahead + 2
  return -(-need // 128) * 128


def check(
  engine: Engine,
  prompts: Sequence[Sequence[int]],
  spec: SpecConfig,
  sampling: Sampling,
  max_new_tokens: int,
  batch_size: int,
  capacity: int,
) -> None:
  """Raise ValueError now if `run_mode` would refuse any batch of these prompts."""
  longest = max(prompts, key=len)
  engine.validate(
    [longest] * batch_size,
    spec=spec,
    sampling=sampling,
    max_new_tokens=max_new_tokens,
    capacity=capacity,
  )


@dataclasses.dataclass(frozen=True)
class Settings:
  """What every batch of a run shares, whichever mode decodes it."""

  sampling: Sampling
  max_new_tokens: int
  batch_size: int
  seed: int
  ignore_eos: bool
  capacity: int
  trace: bool = False


def batches_of(prompts: Sequence[Sequence[int]], batch_size: int) -> list[list[Sequence[int]]]:
  return [list(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]


def warm_up(engine: Engine, batches, spec: SpecConfig, s: Settings) -> float:
  """Compile `spec`'s programs with the timed runs' shapes and static arguments: one short batch
  per prompt bucket (prefill compiles per bucket, the decode programs once). Returns seconds."""
  buckets = {bucket_length(max(map(len, b)), s.capacity): b for b in reversed(batches)}
  t0 = time.perf_counter()
  for batch in buckets.values():
    engine.generate(
      (batch * s.batch_size)[: s.batch_size],
      spec=spec,
      sampling=s.sampling,
      capacity=s.capacity,
      seed=s.seed,
      max_new_tokens=min(s.max_new_tokens, 2 * (spec.lookahead + 1) + 2),
      ignore_eos=s.ignore_eos,
      trace=s.trace,
    )
  return time.perf_counter() - t0


def decode_batch(
  engine: Engine, batch, index: int, spec: SpecConfig, s: Settings
) -> tuple[list[list[int]], Metrics, int]:
  """Batch `index` of a run: its tokens, metrics and the programs it compiled (this process's
  and a speculator process's), which after `warm_up` must be none."""
  pad = s.batch_size - len(batch)  # the last batch is padded to keep shapes (and programs)
  with count_compiles() as compiles:
    out = engine.generate(
      batch + batch[:1] * pad,
      spec=spec,
      sampling=s.sampling,
      max_new_tokens=[s.max_new_tokens] * len(batch) + [0] * pad,
      capacity=s.capacity,
      seed=s.seed + index,
      ignore_eos=s.ignore_eos,
      trace=s.trace,
    )
  remote = out.metrics.extra.get("speculator_compiles", 0)
  return out.tokens[: len(batch)], out.metrics, len(compiles) + remote


def run_mode(
  engine: Engine,
  prompts: Sequence[Sequence[int]],
  spec: SpecConfig,
  *,
  sampling: Sampling,
  max_new_tokens: int,
  batch_size: int,
  seed: int,
  ignore_eos: bool,
  capacity: int,
  warmup: bool = True,
  trace: bool = False,
  progress: Callable[[int], None] | None = None,
) -> ModeResult:
  """Generate for every prompt in batches of `batch_size`; warm-up batches compile first."""
  s = Settings(sampling, max_new_tokens, batch_size, seed, ignore_eos, capacity, trace)
  report = None if progress is None else lambda mode, n: progress(n)
  return run_interleaved({spec.mode: (engine, spec)}, prompts, s, report, warmup=warmup)[spec.mode]


def run_interleaved(
  runs: dict[str, tuple[Engine, SpecConfig]],
  prompts: Sequence[Sequence[int]],
  settings: Settings,
  progress: Callable[[str, int], None] | None = None,
  *,
  warmup: bool = True,
) -> dict[str, ModeResult]:
  """`run_mode` for several modes at once, batch by batch: every mode warms up first, then each
  batch is decoded by every mode before the next, in an order rotated by one per batch. A host
  whose speed drifts (a shared machine, a CPU changing clocks) then slows every mode alike,
  where running the modes one after another would charge the drift to whichever ran last.
  Each mode's tokens, seeds and programs are those of running it alone (`run_mode`, which is
  this with one mode). `warmup=False`: the programs are known to be warm already."""
  batches = batches_of(prompts, settings.batch_size)
  results = {
    mode: ModeResult(
      mode, spec, [], [], warmup_seconds=warm_up(engine, batches, spec, settings) if warmup else 0.0
    )
    for mode, (engine, spec) in runs.items()
  }
  for i, batch in enumerate(batches):
    for mode in rotated(list(runs), i):
      engine, spec = runs[mode]
      _add(results[mode], *decode_batch(engine, batch, i, spec, settings))
      if progress:
        progress(mode, len(batch))
  return results


def rotated(modes: list[str], i: int) -> list[str]:
  """The order the modes decode batch `i`: each mode goes first once every len(modes) batches."""
  k = i % len(modes)
  return modes[k:] + modes[:k]


def _add(result: ModeResult, tokens, metrics: Metrics, compiles: int) -> None:
  result.tokens.extend(tokens)
  result.metrics.append(metrics)
  result.compiles += compiles


def environment() -> dict[str, Any]:
  devices = jax.devices()
  return {
    "jax_version": jax.__version__,
    "platform": devices[0].platform,
    "device_kind": devices[0].device_kind,
    "num_devices": len(devices),
    "python": platform.python_version(),
    "machine": platform.machine(),
    "processor": platform.processor(),
    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
  }


def ratios(results: dict[str, ModeResult]) -> dict[str, float]:
  """Each measured pair's tokens/s ratio, headline first: "ssd/sd", "sd/ar", "ssd/ar" (only
  pairs whose both modes ran)."""
  speed = {m: r.tokens_per_second for m, r in results.items()}
  pairs = [("ssd", "sd"), ("sd", "ar"), ("ssd", "ar")]
  return {f"{a}/{b}": speed[a] / speed[b] for a, b in pairs if speed.get(a) and speed.get(b)}


def same_tokens(results: dict[str, ModeResult]) -> bool:
  runs = [r.tokens for r in results.values()]
  return all(t == runs[0] for t in runs)
