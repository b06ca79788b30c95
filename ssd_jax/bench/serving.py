"""`python -m ssd_jax.bench serving`: the throughput-latency curve of continuous batching.

For each mode (ar, sd, ssd) a `Session` of `max_batch_size` slots runs in its own thread; a
driver submits requests with prompts from the prompt sets, either at a fixed concurrency (a new
request as soon as one ends: closed loop) or as a Poisson process at a rate (open loop). Per
point: output tokens/s over the point's wall time, TTFT (submission to first token) and TPOT
(time per output token after the first) at p50 and p99, acceptance and ssd's hit rate by how
many rows were active. The modes take the points in turn, the order rotated by one each point,
so a host whose speed drifts slows every mode alike. Every session warms up (compiles every
bucket) before its first point, and the compilations after that are counted (both processes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import threading
import time
from typing import Any

import numpy as np

from ssd_jax.config import MODES, SpecConfig
from ssd_jax.data import load_prompts
from ssd_jax.harness import runs
from ssd_jax.harness.config import DEFAULT_TARGET
from ssd_jax.models.registry import default_draft, default_draft_dtype, load_model
from ssd_jax.runtime import Engine
from ssd_jax.runtime.requests import Request
from ssd_jax.speculator.layout import Layout
from ssd_jax.timing import count_compiles


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServingOptions:
  """`bench serving`: modes, prompts, load points and the layout (run's)."""

  target: str = DEFAULT_TARGET
  draft: str | None = None  # None: each mode's default draft
  modes: tuple[str, ...] = MODES
  prompt_sets: tuple[str, ...] = ("humaneval", "sharegpt")
  num_prompts: int = 16
  max_new_tokens: int = 64
  concurrencies: tuple[int, ...] = (1, 2, 4, 8)
  rates: tuple[float, ...] = ()
  requests: int = 16  # per point
  max_batch_size: int = 8
  temperatures: tuple[float, ...] = (0.0,)  # requests cycle through them
  seed: int = 0
  static: bool = True  # beside each concurrency, the same requests as static batches (generate)
  soak: int = 0  # then this many short requests per mode, resident memory after 100 and all
  http: str | None = None  # a running server's URL: its one mode over HTTP (`bench/http.py`)
  api_key: str | None = None  # with http: the server's --api-key
  layout: Layout = dataclasses.field(default_factory=lambda: Layout("device", None))


@dataclasses.dataclass
class _Point:
  mode: str
  load: str  # "concurrency C" or "rate R/s"
  wall: float = 0.0
  records: list[dict] = dataclasses.field(default_factory=list)
  stats: dict[str, Any] = dataclasses.field(default_factory=dict)


def serving(options: ServingOptions) -> dict[str, Any]:
  """Every mode at every load point (see the module docstring); JSON-ready."""
  if options.http is not None:
    return _over_http(options)
  with contextlib.ExitStack() as stack:
    sessions, engines = _sessions(options, stack)
    prompts = _prompts(options, engines[options.modes[0]].target.tokenizer)
    warm = {mode: session.warm_up() for mode, session in sessions.items()}
    for session in sessions.values():
      session.start()
    loads = [("concurrency", c) for c in options.concurrencies]
    loads += [("rate", r) for r in options.rates]
    points, compiles = [], {}
    with count_compiles() as here:
      for i, (kind, value) in enumerate(loads):
        for mode in runs.rotated(list(options.modes), i):
          points.append(_run_point(sessions[mode], mode, kind, value, prompts, options))
          print(_line(points[-1]), flush=True)
      compiles["this process"] = len(here)
    memory = (
      {m: soak(sessions[m], prompts, options, options.soak) for m in options.modes}
      if options.soak
      else {}
    )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # The sessions end before the static batches: a speculator process serves one session at a
    # time, and `generate` opens one of its own.
    for mode, session in sessions.items():
      stats = session.close()
      if stats is not None and stats.compiles is not None:
        compiles[f"{mode} speculator"] = stats.compiles
    static = _static(options, engines, prompts) if options.static else []
  return {
    "environment": runs.environment(),
    "options": dataclasses.asdict(options) | {"layout": str(options.layout)},
    "warmup_seconds": warm,
    "compiles_after_warmup": compiles,
    "max_rss_mib": rss / 1024,
    "memory": memory,
    "points": [_summary(p) for p in points],
    "static": static,
  }


def _sessions(options: ServingOptions, stack: contextlib.ExitStack):
  target = load_model(options.target)
  engines, sessions = {}, {}
  for mode in options.modes:
    name = None if mode == "ar" else (options.draft or default_draft(options.target, mode))
    draft = None if name is None else load_model(name, dtype=default_draft_dtype())
    placement = options.layout.placement_for() if mode == "ssd" else "device"
    engine = stack.enter_context(Engine(target, draft, placement=placement))
    spec = SpecConfig(mode=mode)
    engines[mode] = engine
    sessions[mode] = engine.session(
      spec, max_batch_size=options.max_batch_size, max_model_len=_model_len(options)
    )
    stack.callback(sessions[mode].close)
  return sessions, engines


def _model_len(options: ServingOptions) -> int:
  return 512 + options.max_new_tokens + 16


def _over_http(options: ServingOptions) -> dict[str, Any]:
  """The load points against the server at `options.http` (which runs `options.modes[0]`):
  the same prompts and requests, measured at the client."""
  from ssd_jax.bench.http import HttpSession  # noqa: PLC0415

  if len(options.modes) != 1:
    raise ValueError("--http measures the one mode the server runs: give it as --modes MODE")
  mode = options.modes[0]
  session = HttpSession(options.http, api_key=options.api_key)
  # Prompts cut as in process where the server's context is the same (run it with
  # --max-model-len 512 + max_new_tokens + 16 to compare the two), else to fit its context.
  model_len = min(session.max_model_len(), _model_len(options))
  prompts = _prompts(options, load_model(options.target).tokenizer, model_len)
  loads = [("concurrency", c) for c in options.concurrencies]
  loads += [("rate", r) for r in options.rates]
  points = []
  for kind, value in loads:
    points.append(_run_point(session, mode, kind, value, prompts, options))
    print(_line(points[-1]), flush=True)
  return {
    "environment": runs.environment(),
    "options": dataclasses.asdict(options) | {"layout": "the server's", "api_key": None},
    "http": options.http,
    "points": [_summary(p) for p in points],
    "static": [],
  }


def _prompts(options: ServingOptions, tokenizer, model_len: int | None = None) -> list[list[int]]:
  out = []
  longest = (model_len or _model_len(options)) - options.max_new_tokens - 8
  for name in options.prompt_sets:
    texts = [p.text for p in load_prompts(name, options.num_prompts)]
    chat = bool(tokenizer.chat_template)
    out += [ids[-longest:] for ids in runs.encode(tokenizer, texts, chat)]
  return out


def _request(prompts, i: int, options: ServingOptions) -> Request:
  from ssd_jax.decode.sampling import Sampling  # noqa: PLC0415

  return Request(
    prompt=prompts[i % len(prompts)],
    sampling=Sampling(temperature=options.temperatures[i % len(options.temperatures)]),
    max_new_tokens=options.max_new_tokens,
    seed=options.seed + i,
  )


def _run_point(session, mode: str, kind: str, value, prompts, options) -> _Point:
  """One load point: `options.requests` requests at a concurrency or a Poisson rate."""
  point = _Point(mode, f"{kind} {value:g}")
  handles, lock = [], threading.Lock()
  done = threading.Semaphore(0)
  on_event = lambda event: done.release() if event.finish_reason else None
  rng = np.random.default_rng(options.seed)
  t0 = time.perf_counter()
  if kind == "concurrency":
    for i in range(options.requests):
      if i >= value:
        done.acquire()  # a slot's worth of work ended: the next one goes in
      with lock:
        handles.append(session.submit(_request(prompts, i, options), on_event=on_event))
  else:
    for i in range(options.requests):
      time.sleep(rng.exponential(1.0 / value))
      handles.append(session.submit(_request(prompts, i, options), on_event=on_event))
  for h in handles:
    h.result(timeout=3600)
  point.wall = time.perf_counter() - t0
  for h in handles:
    n = len(h.tokens)
    ttft = h.first_token - h.submitted
    tpot = (h.finished - h.first_token) / (n - 1) if n > 1 else float("nan")
    point.records.append({"tokens": n, "ttft": ttft, "tpot": tpot, "rounds": h.rounds})
  point.stats = _stats(session)
  return point


def _stats(session) -> dict[str, Any]:
  s = session.stats
  out = {
    "mean_accepted": s.mean_accepted,
    "hit_rate": s.hit_rate,
    "resizes": s.resizes,
    "occupancy": dict(s.occupancy),
    "hit_rate_by_occupancy": {n: h / t for n, (h, t) in s.hits_by_occupancy.items() if t},
  }
  session.stats = type(s)(s.lookahead)  # each point counts its own rounds
  return out


def _summary(p: _Point) -> dict[str, Any]:
  tokens = sum(r["tokens"] for r in p.records)
  pct = lambda key, q: float(np.nanpercentile([r[key] for r in p.records], q) * 1e3)
  return {
    "mode": p.mode,
    "load": p.load,
    "requests": len(p.records),
    "tokens": tokens,
    "wall_seconds": p.wall,
    "tokens_per_second": tokens / p.wall,
    "ttft_ms_p50": pct("ttft", 50),
    "ttft_ms_p99": pct("ttft", 99),
    "tpot_ms_p50": pct("tpot", 50),
    "tpot_ms_p99": pct("tpot", 99),
  } | p.stats


def _line(p: _Point) -> str:
  s = _summary(p)
  return (
    f"{s['mode']:>3} {s['load']:<16} {s['tokens_per_second']:7.2f} tok/s  TTFT p50 "
    f"{s['ttft_ms_p50']:7.0f} ms  TPOT p50 {s['tpot_ms_p50']:6.0f} ms p99 "
    f"{s['tpot_ms_p99']:6.0f} ms  accepted/round {s['mean_accepted']:.2f}"
  )


def _static(options: ServingOptions, engines: dict[str, Engine], prompts) -> list[dict]:
  """The same requests as static batches of C through `Engine.generate`, per concurrency C:
  what continuity is compared with."""
  out = []
  for c in options.concurrencies:
    for mode in options.modes:
      engine, spec = engines[mode], SpecConfig(mode=mode)
      ids = [_request(prompts, i, options).prompt for i in range(options.requests)]
      settings = runs.Settings(
        sampling=_request(prompts, 0, options).sampling,
        max_new_tokens=options.max_new_tokens,
        batch_size=c,
        seed=options.seed,
        ignore_eos=False,
        capacity=runs.capacity_for(ids, options.max_new_tokens, spec.lookahead),
      )
      result = runs.run_interleaved({mode: (engine, spec)}, ids, settings)[mode]
      prefill = sum(m.prefill_seconds for m in result.metrics)
      with_prefill = result.generated_tokens / (result.decode_seconds + prefill)
      out.append(
        {
          "mode": mode,
          "batch_size": c,
          "tokens_per_second": result.tokens_per_second,
          "tokens_per_second_with_prefill": with_prefill,
        }
      )
      print(
        f"static {mode} batch {c}: {result.tokens_per_second:.2f} tok/s decoding, "
        f"{with_prefill:.2f} with the prefills",
        flush=True,
      )
  return out


def rss_mib(pid: int | str = "self") -> float:
  """A process's resident memory now (not its peak): this one's by default."""
  with open(f"/proc/{pid}/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def soak(session, prompts, options: ServingOptions, n: int) -> dict[str, float]:
  """`n` short requests through `session` at full concurrency: resident memory after the
  first 100 and after all (a leak grows it with every request), of this process and of the
  speculator process where the session has one."""
  if n <= 0:
    return {}
  short = dataclasses.replace(options, max_new_tokens=8)
  marks, handles = {}, []
  for i in range(n):
    handles.append(session.submit(_request(prompts, i, short)))
    while len(session.waiting()) >= options.max_batch_size:
      time.sleep(0.01)
    if i + 1 in (100, n):
      for h in handles:
        h.result(timeout=3600)
      marks[f"rss_mib_after_{i + 1}"] = rss_mib()
      if (child := getattr(session.engine.site, "child_pid", None)) is not None:
        marks[f"speculator_rss_mib_after_{i + 1}"] = rss_mib(child)
  return marks


def plot(result: dict[str, Any], out) -> Any:
  """serving.png: output tokens/s against TPOT p50 for each mode, one marker per load point
  (concurrency: filled, labelled by C; rate: hollow)."""
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, ax = plt.subplots(figsize=(6.5, 4))
  for mode in dict.fromkeys(p["mode"] for p in result["points"]):
    points = [p for p in result["points"] if p["mode"] == mode]
    closed = [p for p in points if p["load"].startswith("concurrency")]
    line = ax.plot(
      [p["tpot_ms_p50"] for p in closed], [p["tokens_per_second"] for p in closed], "o-", label=mode
    )[0]
    for p in closed:
      ax.annotate(p["load"].split()[1], (p["tpot_ms_p50"], p["tokens_per_second"]), fontsize=7)
    open_ = [p for p in points if p["load"].startswith("rate")]
    ax.plot(
      [p["tpot_ms_p50"] for p in open_],
      [p["tokens_per_second"] for p in open_],
      "o",
      mfc="none",
      color=line.get_color(),
    )
  ax.set_xlabel("TPOT p50 (ms per output token)")
  ax.set_ylabel("output tokens/s")
  ax.set_title("continuous batching: throughput against latency (labels: concurrency)")
  ax.legend()
  fig.tight_layout()
  path = out / "serving.png"
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
