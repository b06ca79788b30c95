"""The modes of `python -m ssd_jax.run` side by side: decode the prompts with each, print the
table (what each mode ran on, tokens/s and per core, speedup, acceptance, hit rate), write the
JSON. With a speculator process on CPU the table adds sd on every core of the machine, run in a
process of its own, so nobody mistakes where this machine's cores are best spent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

from ssd_jax import harness
from ssd_jax.data import load_prompts


def compare(args, parser, engine, specs, sampling, layout) -> int:
  limit = args.num_prompts or (None if args.prompts == "bundled" else 8)
  tokenizer = engine.target.tokenizer
  try:
    prompts = load_prompts(args.prompts, limit)
    if tokenizer is None:
      raise ValueError(f"target {engine.target.name!r} has no tokenizer; give a model with one")
    chat = not args.no_chat_template and bool(tokenizer.chat_template)
    ids = harness.encode(tokenizer, [p.text for p in prompts], chat)
    capacity = harness.capacity_for(ids, args.max_new_tokens, args.lookahead)
    for spec in specs.values():  # every mode's configuration is checked before any decodes
      harness.check(engine, ids, spec, sampling, args.max_new_tokens, args.batch_size, capacity)
  except (ValueError, FileNotFoundError) as e:
    parser.error(str(e))
  results = run_modes(args, engine, specs, sampling, ids, capacity)
  all_cores = None
  if layout.target_cores and "ssd" in specs and not args.no_all_cores:
    all_cores = sd_on_all_cores(args)
  print(format_table(results, args, len(prompts), layout, all_cores))
  if (startup := engine.speculator_startup) is not None:
    print(
      f"\nspeculator process: started in {startup['spawn_seconds']:.1f} s, draft loaded in "
      f"{startup['load_seconds']:.1f} s; ssd's warm-up (compiling on both sides) "
      f"{results['ssd'].warmup_seconds:.1f} s; none of it in tokens/s"
    )
  last = list(results)[-1]
  print(f"\nsample ({prompts[0].id}, {last}):\n{tokenizer.decode(results[last].tokens[0]).strip()}")
  if args.json:
    write_json(args, results, engine, layout, all_cores)
    print(f"\nwrote {args.json}")
  return 0


def run_modes(args, engine, specs, sampling, ids, capacity) -> dict[str, harness.ModeResult]:
  bar = tqdm(
    total=len(ids) * len(specs),
    desc="decoding",
    unit="prompt",
    disable=args.no_progress,
    file=sys.stderr,
  )
  results = {}
  with bar:
    for mode, spec in specs.items():
      bar.set_postfix_str(mode)
      results[mode] = harness.run_mode(
        engine,
        ids,
        spec,
        sampling=sampling,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
        capacity=capacity,
        trace=args.json is not None,
        progress=bar.update,
      )
  return results


def all_cores_argv(args) -> list[str]:
  """The same prompts and settings, sd only, with its draft beside the target on all cores."""
  argv = ["--mode", "sd", "--draft-placement", "device", "--target-cores", "all"]
  argv += ["--no-progress", "--no-all-cores", "--draft-vocab", str(args.draft_vocab)]
  for name in (
    "target",
    "draft",
    "prompts",
    "num_prompts",
    "max_new_tokens",
    "lookahead",
    "temperature",
    "top_k",
    "top_p",
    "batch_size",
    "target_devices",
    "seed",
    "attention_impl",
    "dtype",
  ):
    value = getattr(args, name)
    if value is not None:
      argv += ["--" + name.replace("_", "-"), str(value)]
  return argv + [
    f"--{n.replace('_', '-')}" for n in ("no_chat_template", "ignore_eos") if getattr(args, n)
  ]


def sd_on_all_cores(args) -> dict | None:
  """sd's summary from a process that may use every core (None, with a note, if it failed)."""
  with tempfile.TemporaryDirectory() as tmp:
    out = Path(tmp) / "all_cores.json"
    cmd = [sys.executable, "-m", "ssd_jax.run", *all_cores_argv(args), "--json", str(out)]
    cmd += ["--exit-with", str(os.getpid())]
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0 or not out.exists():
      tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
      print(f"(sd on all cores could not run: {tail})", file=sys.stderr)
      return None
    return json.loads(out.read_text())["modes"]["sd"]


def format_table(results, args, num_prompts: int, layout, all_cores: dict | None = None) -> str:
  speed = harness.speedups(results)
  head = (
    f"{num_prompts} prompts ({args.prompts}), max {args.max_new_tokens} new tokens, "
    f"temperature {args.temperature}, batch {args.batch_size}, lookahead {args.lookahead}"
    + (f", draft vocab {args.draft_vocab}" if args.draft_vocab else "")
  )
  rows = [
    head,
    "",
    f"{'mode':<5} {'ran on':<18} {'tok/s':>8} {'per core':>9} {'vs ar':>7} "
    f"{'accepted/round':>15} {'hit rate':>9} {'tokens':>7}",
  ]
  for mode, r in results.items():
    m = r.merged
    rows.append(
      _row(
        mode,
        layout.where(mode),
        r.tokens_per_second,
        layout.cores(mode),
        speed.get(mode),
        m.mean_accepted,
        m.hit_rate if mode == "ssd" else None,
        r.generated_tokens,
      )
    )
  if all_cores is not None:
    ar = results.get("ar")
    vs = all_cores["tokens_per_second"] / ar.tokens_per_second if ar else None
    n = os.cpu_count() or 1
    rows.append(
      _row(
        "sd",
        f"all {n} cores",
        all_cores["tokens_per_second"],
        n,
        vs,
        all_cores["mean_accepted_tokens_per_round"],
        None,
        all_cores["generated_tokens"],
      )
    )
  if args.temperature == 0 and len(results) > 1:
    same = harness.same_tokens(results)
    rows.append(f"\ngreedy outputs identical across modes: {'yes' if same else 'NO'}")
  return "\n".join(rows)


def _row(mode, where, tps, cores, vs, accepted, hit, tokens) -> str:
  vs = f"{vs:>6.2f}x" if vs is not None else f"{'-':>7}"
  hit = f"{hit:>9.2f}" if hit is not None else f"{'-':>9}"
  return (
    f"{mode:<5} {where:<18} {tps:>8.1f} {tps / cores:>9.1f} {vs} {accepted:>15.2f} {hit} "
    f"{tokens:>7}"
  )


def write_json(args, results, engine, layout, all_cores) -> None:
  config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
  payload = {
    "config": config,
    "environment": harness.environment()
    | {"attention_impl": engine.attention_impl, "shared_device": engine.shared},
    "layout": {
      mode: {"ran_on": layout.where(mode), "cores": layout.cores(mode)} for mode in results
    },
    "modes": {mode: r.summary() for mode, r in results.items()},
    "speedup_vs_ar": harness.speedups(results),
  }
  if engine.speculator_startup is not None:
    payload["speculator_startup"] = engine.speculator_startup
  if all_cores is not None:
    payload["sd_all_cores"] = {k: v for k, v in all_cores.items() if k != "generated_token_ids"}
  if args.temperature == 0:
    payload["greedy_outputs_identical"] = harness.same_tokens(results)
  args.json.parent.mkdir(parents=True, exist_ok=True)
  args.json.write_text(json.dumps(payload, indent=1))
