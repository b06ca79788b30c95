"""The stages of `python -m ssd_jax.bench device` (see device.py): each takes the results so far
and the deadline, and returns its own results as a dict of plain values."""

from __future__ import annotations

import functools
import importlib.util
import json
import platform
import re
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ssd_jax.bench import shapes
from ssd_jax.config import SpecConfig
from ssd_jax.data.prompts import BUNDLED_PATH
from ssd_jax.decode import theory
from ssd_jax.decode.sampling import Sampling
from ssd_jax.models.registry import ASSETS, LoadedModel, load_model
from ssd_jax.models.transformer import init_params
from ssd_jax.models.weights import load_hf
from ssd_jax.runtime.engine import Engine

SPECS = {
  "ar": SpecConfig(mode="ar"),
  "sd": SpecConfig(mode="sd", lookahead=3),
  "ssd": SpecConfig(mode="ssd", lookahead=3, fan_out=(2, 2, 1, 1)),
}
STAGE_FUNCTIONS = {"theory": "theory_stage"}  # where the stage's name is taken by a module
# The paper's worked examples (Theorem 12: a = 0.8; Theorem 17: p_hit = 0.85), where it reports
# no per-token acceptance for Llama-3.1-70B / 1B: the regime its 5-GPU results come from.
PAPER = {"acceptance": 0.8, "p_hit": 0.85}


def versions(done, *, deadline, smoke) -> dict:
  import jaxlib  # noqa: PLC0415

  devices = jax.devices()
  out = {
    "backend": jax.default_backend(),
    "device": devices[0].device_kind,
    "devices": len(devices),
    "jax": jax.__version__,
    "jaxlib": jaxlib.__version__,
    "python": platform.python_version(),
  }
  if shutil.which("nvidia-smi"):
    query = ["nvidia-smi", "--query-gpu=driver_version,name,memory.total", "--format=csv,noheader"]
    r = subprocess.run(query, capture_output=True, text=True, timeout=30, check=False)
    out["driver"] = (r.stdout or r.stderr).strip().splitlines()[0] if r.returncode == 0 else None
  print(f"[device] {out}", flush=True)
  return out


def gpu_tests(done, *, deadline, smoke) -> dict:
  """`pytest -m gpu` in a subprocess (this process has the GPU too: the run sets JAX not to
  preallocate its memory)."""
  tests = Path(__file__).resolve().parents[2] / "tests" / "test_gpu.py"  # a checkout's
  if smoke:
    return {"skipped": "cpu smoke (the GPU tests skip on a CPU)"}
  # test_gpu.py borrows test_tree_attention's cases, which import hypothesis.
  missing = [m for m in ("pytest", "hypothesis") if importlib.util.find_spec(m) is None]
  if missing or not tests.exists():
    return {"skipped": f"needs {tests} and pytest and hypothesis (missing: {missing})"}
  cmd = [sys.executable, "-m", "pytest", "-m", "gpu", str(tests), "-q", "-p", "no:cacheprovider"]
  timeout = max(30.0, min(100.0, deadline.left() - 330))  # the later stages keep 5.5 minutes
  try:
    r = subprocess.run(
      cmd, cwd=tests.parents[1], capture_output=True, text=True, timeout=timeout, check=False
    )
  except subprocess.TimeoutExpired as e:
    tail = (e.stdout or b"")[-2000:]
    return {"error": f"timed out after {timeout:.0f} s", "tail": str(tail)}
  found = re.findall(r"(\d+) (passed|failed|skipped|errors?)", r.stdout)
  counts = {kind: int(n) for n, kind in found}
  out = {"returncode": r.returncode, "counts": counts, "tail": r.stdout[-3000:]}
  if r.returncode not in (0, 5):  # 5: nothing collected
    out["error"] = f"pytest -m gpu exited {r.returncode}: {counts}"
  return out


def _prompts(tokenizer, vocab: int, count: int, length: int) -> list[list[int]]:
  """The bundled prompts as token ids: tokenized when the tokenizer is here, else their UTF-8
  bytes (a random-weight target reads any ids)."""
  texts = [json.loads(line)["prompt"] for line in BUNDLED_PATH.read_text().splitlines()[:count]]
  if tokenizer is not None:
    return [tokenizer.encode(t)[:length] for t in texts]
  return [[b % vocab for b in t.encode()][:length] for t in texts]


def _random(config, name: str, dtype, seed: int = 0) -> LoadedModel:
  """Random weights of `config`'s shape, made on the default device in `dtype`."""
  init = jax.jit(init_params, static_argnames=("config", "dtype"))
  params = init(config, jax.random.key(seed), dtype=dtype)
  return LoadedModel(name, config, params, None)


def _smollm2_pair(smoke: bool):
  """(target, draft, where the target's weights come from)."""
  if smoke:
    return load_model("tiny-llama"), load_model("tiny-llama-draft"), "tiny-llama (cpu smoke)"
  try:
    return load_model("smollm2-135m"), load_model("smollm2-135m-draft"), "smollm2-135m"
  except (FileNotFoundError, ImportError, ValueError) as e:
    print(f"[device] no real SmolLM2-135M here ({e}): random weights of its shape", flush=True)
  target = _random(shapes.MODELS["smollm2-135m"], "smollm2-135m (random)", jnp.float32)
  config, params = load_hf(ASSETS / "smollm2-135m-draft")  # carries its own embedding
  return target, LoadedModel("smollm2-135m-draft", config, params, None), "random"


def decode(done, *, deadline, smoke) -> dict:
  """ar, sd and ssd on the accelerator: equal greedy tokens, tokens/s, each stage's host gap."""
  target, draft, source = _smollm2_pair(smoke)
  prompts = _prompts(target.tokenizer, target.config.vocab_size, 1 if smoke else 4, 64)
  new = 8 if smoke else 96
  run = dict(max_new_tokens=new, ignore_eos=True)
  with warnings.catch_warnings():  # one device: the draft shares it (said in the JSON)
    warnings.simplefilter("ignore")
    engine = Engine(target, draft, attention_impl="xla", placement="device")
  modes = {}
  with jax.default_matmul_precision("highest"):  # no TF32: the CPU comparison is exact
    for mode, spec in SPECS.items():
      # A smoke run generates once (compiling is most of its time), a device run warms up,
      # times untraced, then traces a run for the host gaps.
      gen = engine.generate(prompts, spec=spec, trace=smoke, **run)
      if not smoke:
        gen = engine.generate(prompts, spec=spec, **run)
      m = gen.metrics
      traced = m if smoke else engine.generate(prompts, spec=spec, trace=True, **run).metrics
      modes[mode] = {
        "tokens_per_second": m.tokens_per_second,
        "mean_accepted": m.mean_accepted,
        "hit_rate": m.later_hit_rate if mode == "ssd" else float("nan"),
        "rounds": m.loop_rounds,
        "ms_per_round": 1e3 * m.decode_seconds / max(m.loop_rounds, 1),
        "host_gap_ms": traced.stage_ms(),
        "tokens": gen.tokens,
      }
  engine.close()
  on_cpu = jax.default_backend() == "cpu"  # the CPU's tokens are the ones above
  cpu = modes["ar"]["tokens"] if on_cpu else _cpu_tokens(target, prompts, run)
  for m in modes.values():
    m["same_as_ar"] = m["tokens"] == modes["ar"]["tokens"]
  out = {
    "target": source,
    "shared_device": engine.shared,
    "modes": modes,
    # A figure, not a check: another device sums in another order, which can flip a near tie.
    "same_as_cpu": None if cpu is None else cpu == modes["ar"]["tokens"],
    "equal_across_modes": all(m["same_as_ar"] for m in modes.values()),
  }
  if not out["equal_across_modes"]:  # the exactness contract: a failure of the run
    out["error"] = "greedy tokens differ across modes"
  return out


def _cpu_tokens(target, prompts, run) -> list[list[int]] | None:
  """The CPU's greedy ar tokens on the same weights (None where JAX was told to leave the CPU
  backend out, JAX_PLATFORMS=cuda)."""
  try:
    cpu = jax.devices("cpu")[:1]
  except RuntimeError:
    return None
  host = jax.device_get(target.params)
  model = LoadedModel(target.name, target.config, host, None)
  with Engine(model, attention_impl="xla", devices=cpu) as engine:
    return engine.generate(prompts, spec=SPECS["ar"], **run).tokens


# (batch, branches, context) of the tree attention: verification-sized to expansion-sized.
ATTENTION = ((1, 16, 2048), (1, 64, 8192), (8, 32, 8192), (16, 64, 2048), (16, 64, 8192))
SMOKE_ATTENTION = ((2, 4, 64),)


def _attention_inputs(B, T, S, heads, kv_heads, head_dim, dtype, tree_steps: int = 4):
  keys = jax.random.split(jax.random.key(1), 5)
  normal = lambda key, shape: jax.random.normal(key, shape, jnp.float32).astype(dtype)
  q = normal(keys[0], (B, T, heads, head_dim))
  k = normal(keys[1], (B, S, kv_heads, head_dim))
  v = normal(keys[2], (B, S, kv_heads, head_dim))
  lengths = jnp.full((B,), S - T - 8, jnp.int32)  # a nearly full cache
  depth = jnp.arange(T, dtype=jnp.int32) % 8  # fork depths 0..7
  tree_k = normal(keys[3], (B, tree_steps, T, kv_heads, head_dim))
  tree_v = normal(keys[4], (B, tree_steps, T, kv_heads, head_dim))
  return q, k, v, lengths, depth, tree_k, tree_v, jnp.int32(tree_steps - 2)


def _median_ms(fn, args, reps: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times) * 1e3)


def attention(done, *, deadline, smoke) -> dict:
  """Tree attention per impl: median ms and the largest difference from the reference."""
  from ssd_jax.kernels import tree_attention  # noqa: PLC0415

  dims = (4, 2, 32, jnp.float32) if smoke else (32, 8, 128, jnp.bfloat16)
  tolerance = 1e-4 if smoke else 5e-2  # bf16 outputs (~3 significant digits) on the GPU
  rows = []
  for B, T, S in SMOKE_ATTENTION if smoke else ATTENTION:
    if not smoke and deadline.left() < 200:  # keep time for the program timings
      rows.append({"shape": [B, T, S], "skipped": "deadline"})
      break
    args = _attention_inputs(B, T, S, *dims)
    row = {"shape": [B, T, S], "ms": {}, "max_error": {}}
    outs = {}
    for impl in ("reference", "xla", "pallas"):
      fn = jax.jit(functools.partial(tree_attention, impl=impl))
      row["ms"][impl] = _median_ms(fn, args, 3 if smoke else 20)
      outs[impl] = np.asarray(fn(*args), np.float32)
    for impl in ("xla", "pallas"):
      row["max_error"][impl] = float(np.max(np.abs(outs[impl] - outs["reference"])))
    row["agree"] = all(e <= tolerance for e in row["max_error"].values())
    rows.append(row)
  out = {"heads": dims[:3], "dtype": jnp.dtype(dims[3]).name, "tolerance": tolerance, "rows": rows}
  if not all(r.get("agree", True) for r in rows):
    out["error"] = "an impl disagrees with the reference beyond the tolerance"
  return out


# (batch, lookahead, fan-out) of the program timings, most wanted first: the deadline may stop
# the list anywhere. Lookahead 3 and 7 verify 4 and 8 tokens; ar_step is the one-token forward.
PROGRAM_CONFIGS = ((1, 3, 4), (8, 3, 4), (1, 7, 4), (1, 3, 1), (8, 7, 4), (1, 5, 2), (8, 3, 1))
SMOKE_PROGRAM_CONFIGS = ((2, 2, 2),)


def _timing_pair(smoke: bool):
  if smoke:
    return load_model("tiny-llama"), load_model("tiny-llama-draft"), 48, 256
  t, d = shapes.MODELS["llama-3.1-8b"], shapes.MODELS["llama-3.2-1b"]
  target = _random(t, "llama-3.1-8b (random)", jnp.bfloat16)
  draft = _random(d, "llama-3.2-1b (random)", jnp.bfloat16, seed=1)
  return target, draft, 1000, 2048  # a prompt of 1000 tokens in a 2048-slot cache


def programs(done, *, deadline, smoke) -> dict:
  """Each round program alone (`bench.programs.time_programs`): median ms per configuration;
  then a few traced ssd rounds: how long each program waited for the host."""
  from ssd_jax.bench.programs import time_programs  # noqa: PLC0415

  target, draft, prompt_len, capacity = _timing_pair(smoke)
  prompt = [int(x) for x in np.arange(1, prompt_len + 1) % target.config.vocab_size]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    engine = Engine(target, draft, attention_impl="xla", placement="device", draft_vocab=0)
  rows = []
  for batch, lookahead, fan_out in SMOKE_PROGRAM_CONFIGS if smoke else PROGRAM_CONFIGS:
    if not smoke and deadline.left() < 60:
      rows.append({"batch": batch, "lookahead": lookahead, "skipped": "deadline"})
      break
    spec = SpecConfig(mode="ssd", lookahead=lookahead, fan_out=(fan_out,) * (lookahead + 1))
    reps = 3 if smoke else 10
    ms = time_programs(engine, prompt, spec, Sampling(), capacity, batch, reps=reps)
    rows.append({"batch": batch, "lookahead": lookahead, "fan_out": fan_out, "ms": ms})
    print(f"[device] programs b{batch} K{lookahead} F{fan_out}: {ms}", flush=True)
  out = {"target": target.name, "draft": draft.name, "prompt": prompt_len, "rows": rows}
  if not smoke and deadline.left() > 45:
    spec = SpecConfig(mode="ssd", lookahead=3, fan_out=(4,) * 4)
    run = dict(spec=spec, max_new_tokens=16 if smoke else 48, ignore_eos=True)
    engine.generate([prompt], **run)  # compiles
    m = engine.generate([prompt], trace=True, **run).metrics
    out["ssd_rounds"] = {
      "ms_per_round": 1e3 * m.decode_seconds / max(m.loop_rounds, 1),
      "host_gap_ms": m.stage_ms(),  # per stage: how long it waited for the host's dispatch
    }
  engine.close()
  return out


def _prediction(ms: dict, acceptance: float, p_hit: float, lookahead: int, batch: int) -> dict:
  """SSD / SD and SSD / AR for a target device beside a draft device, from measured costs.

  Rounds in ms: AR one ar_step per token; SD verify + propose per E_SD tokens; SSD (Corollary
  16) max(verify, expand) when every row hits, verify + propose (the neural backup) otherwise.
  """
  e_sd = theory.expected_tokens_sd(acceptance, lookahead)
  verify = ms["verify"]
  t_p, t_b = ms["expand"] / verify, ms["propose"] / verify
  ssd_per_verify = theory.ssd_speedup(p_hit, e_sd, e_sd, t_p, t_b, batch)  # tokens per verify
  sd_per_verify = theory.sd_speedup(e_sd, t_b)
  ar_per_verify = verify / ms["ar_step"]
  return {
    "acceptance": acceptance,
    "p_hit": p_hit,
    "batch_size": batch,
    "lookahead": lookahead,
    "expected_tokens_sd": e_sd,
    "ssd_over_sd": ssd_per_verify / sd_per_verify,
    "ssd_over_ar": ssd_per_verify / ar_per_verify,
    "sd_over_ar": sd_per_verify / ar_per_verify,
  }


def _our_acceptance(decode_stage: dict) -> tuple[float, float] | None:
  """(per-token acceptance, steady hit rate) of the decode stage's real pair; None when its
  target had random weights (its acceptance says nothing)."""
  modes = decode_stage.get("modes")
  if not modes or decode_stage.get("target") == "random":
    return None
  e_sd, lookahead = modes["sd"]["mean_accepted"], SPECS["sd"].lookahead
  # Invert E_SD(a) = (1 - a^(K+1)) / (1 - a), increasing in a, by bisection.
  lo, hi = 0.0, 1.0 - 1e-9
  for _ in range(60):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if theory.expected_tokens_sd(mid, lookahead) < e_sd else (lo, mid)
  return lo, modes["ssd"]["hit_rate"]


def theory_stage(done, *, deadline, smoke) -> dict:
  timed = [r for r in done.get("programs", {}).get("rows", []) if "ms" in r]
  if not timed:
    return {"skipped": "no program timings"}
  sources = {"paper": (PAPER["acceptance"], PAPER["p_hit"])}
  ours = _our_acceptance(done.get("decode", {}))
  if ours is not None:
    sources["ours"] = ours
  predictions = []
  for row in timed:
    for name, (acceptance, p_hit) in sources.items():
      p = _prediction(row["ms"], acceptance, p_hit, row["lookahead"], row["batch"])
      predictions.append({"acceptance_source": name, "fan_out": row["fan_out"], **p})
  return {"predictions": predictions, "costs_from": done["programs"].get("target")}
