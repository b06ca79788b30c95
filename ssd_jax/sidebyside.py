"""The modes of `python -m ssd_jax.run` side by side: decode the prompts with each, print the
table (what each mode ran on, tokens/s and per core, speedup, acceptance, hit rate), write the
JSON. With a speculator process on CPU the table adds ar and sd on every core of the machine,
each run in a process of its own, so nobody mistakes where this machine's cores are best spent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

from ssd_jax import harness
from ssd_jax.cli import DEFAULT_DRAFTS
from ssd_jax.data import load_prompts


def compare(args, parser, engines, specs, sampling, layout) -> int:
  """`engines`: the Engine of each mode (modes with the same draft share one)."""
  limit = args.num_prompts or (None if args.prompts == "bundled" else 8)
  engine = engines.get("ssd", next(iter(engines.values())))
  tokenizer = engine.target.tokenizer
  try:
    prompts = load_prompts(args.prompts, limit)
    if tokenizer is None:
      raise ValueError(f"target {engine.target.name!r} has no tokenizer; give a model with one")
    chat = not args.no_chat_template and bool(tokenizer.chat_template)
    ids = harness.encode(tokenizer, [p.text for p in prompts], chat)
    capacity = harness.capacity_for(ids, args.max_new_tokens, args.lookahead)
    for mode, spec in specs.items():  # every mode's configuration is checked before decoding
      harness.check(
        engines[mode], ids, spec, sampling, args.max_new_tokens, args.batch_size, capacity
      )
  except (ValueError, FileNotFoundError) as e:
    parser.error(str(e))
  results = run_modes(args, engines, specs, sampling, ids, capacity)
  all_cores = {}
  if layout.target_cores and "ssd" in specs and not args.no_all_cores:
    all_cores = on_all_cores(args)
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


def run_modes(args, engines, specs, sampling, ids, capacity) -> dict[str, harness.ModeResult]:
  """Every mode over the prompts, interleaved batch by batch (`harness.run_interleaved`), so
  the ratios between modes hold on a host whose speed drifts during the run."""
  bar = tqdm(
    total=len(ids) * len(specs),
    desc="decoding",
    unit="prompt",
    disable=args.no_progress,
    file=sys.stderr,
  )
  settings = harness.Settings(
    sampling=sampling,
    max_new_tokens=args.max_new_tokens,
    batch_size=args.batch_size,
    seed=args.seed,
    ignore_eos=args.ignore_eos,
    capacity=capacity,
    trace=args.json is not None,
  )

  def progress(mode: str, n: int) -> None:
    bar.set_postfix_str(mode)
    bar.update(n)

  with bar:
    bar.set_postfix_str("warm-up")
    runs = {mode: (engines[mode], spec) for mode, spec in specs.items()}
    return harness.run_interleaved(runs, ids, settings, progress)


def all_cores_argv(args, mode: str) -> list[str]:
  """The same prompts and settings, `mode` only ("ar", or "sd" with its draft beside the
  target), in a process that may use every core."""
  argv = ["--mode", mode, "--draft-placement", "device", "--target-cores", "all"]
  argv += ["--no-progress", "--no-all-cores"]
  names = ["target", "prompts", "num_prompts", "max_new_tokens", "temperature", "top_k", "top_p"]
  names += ["batch_size", "target_devices", "seed", "attention_impl", "dtype"]
  if mode == "sd":
    names += ["lookahead", "draft_dtype"]
    draft, vocab = sd_draft(args)
    argv += ["--draft", draft] + ([] if vocab is None else ["--draft-vocab", str(vocab)])
  for name in names:
    value = getattr(args, name)
    if value is not None:
      argv += ["--" + name.replace("_", "-"), str(value)]
  flags = [n for n in ("no_chat_template", "ignore_eos") if getattr(args, n)]
  return argv + ["--" + n.replace("_", "-") for n in flags]


def on_all_cores(args) -> dict[str, dict]:
  """ar's and sd's summaries from processes that may use every core (a mode that failed is
  left out, with a note)."""
  out = {}
  for mode in ("ar", "sd"):
    with tempfile.TemporaryDirectory() as tmp:
      path = Path(tmp) / "all_cores.json"
      cmd = [sys.executable, "-m", "ssd_jax.run", *all_cores_argv(args, mode), "--json", str(path)]
      cmd += ["--exit-with", str(os.getpid())]
      proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
      if proc.returncode != 0 or not path.exists():
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        print(f"({mode} on all cores could not run: {tail})", file=sys.stderr)
        continue
      out[mode] = json.loads(path.read_text())["modes"][mode]
  return out


def format_table(results, args, num_prompts: int, layout, all_cores: dict) -> str:
  speed = harness.speedups(results)
  head = (
    f"{num_prompts} prompts ({args.prompts}), max {args.max_new_tokens} new tokens, "
    f"temperature {args.temperature}, batch {args.batch_size}, lookahead {args.lookahead}"
    + _vocab_head(args.draft_vocabs)
  )
  rows = [
    head,
    "",
    f"{'mode':<5} {'ran on':<18} {'draft':<24} {'tok/s':>8} {'per core':>9} {'vs ar':>7} "
    f"{'accepted/round':>15} {'hit rate':>9} {'tokens':>7}",
  ]
  for mode, r in results.items():
    m = r.merged
    rows.append(
      _row(
        mode,
        layout.where(mode),
        draft_name(args, mode),
        r.tokens_per_second,
        layout.cores(mode),
        speed.get(mode),
        m.mean_accepted,
        m.hit_rate if mode == "ssd" else None,
        r.generated_tokens,
      )
    )
  n = os.cpu_count() or 1
  for mode, summary in all_cores.items():
    ar = all_cores.get("ar")
    vs = summary["tokens_per_second"] / ar["tokens_per_second"] if ar else None
    rows.append(
      _row(
        mode,
        f"all {n} cores",
        _short(sd_draft(args)[0]) if mode == "sd" else "-",
        summary["tokens_per_second"],
        n,
        vs,
        summary["mean_accepted_tokens_per_round"],
        None,
        summary["generated_tokens"],
      )
    )
  if all_cores:
    rows.append(f"(the last {len(all_cores)}: on every core, speedups against ar on every core)")
  if args.temperature == 0 and len(results) > 1:
    same = harness.same_tokens(results)
    rows.append(f"\ngreedy outputs identical across modes: {'yes' if same else 'NO'}")
  return "\n".join(rows)


def draft_name(args, mode: str) -> str:
  """The draft `mode` ran (a path by its last part), or "-"."""
  return _short(args.drafts.get(mode))


def _short(name: str | None) -> str:
  return "-" if name is None else Path(name).name


def sd_draft(args) -> tuple[str, int | None]:
  """sd's draft and head (None: the draft's default), also under --mode ssd, which runs no sd
  of its own: sd's default draft (or --draft) with the head asked for, as --mode all would."""
  draft = args.drafts.get("sd", args.draft or DEFAULT_DRAFTS["sd"])
  return draft, args.draft_vocabs.get("sd", args.draft_vocab)


def _vocab_head(vocabs: dict[str, int]) -> str:
  """The header's draft heads: one N, or N per mode where they differ; nothing if whole."""
  if not any(vocabs.values()):
    return ""
  if len(set(vocabs.values())) == 1:
    return f", draft vocab {next(iter(vocabs.values()))}"
  return ", draft vocab " + ", ".join(f"{m} {v or 'all'}" for m, v in vocabs.items())


def _row(mode, where, draft, tps, cores, vs, accepted, hit, tokens) -> str:
  vs = f"{vs:>6.2f}x" if vs is not None else f"{'-':>7}"
  hit = f"{hit:>9.2f}" if hit is not None else f"{'-':>9}"
  return (
    f"{mode:<5} {where:<18} {draft:<24} {tps:>8.1f} {tps / cores:>9.1f} {vs} "
    f"{accepted:>15.2f} {hit} {tokens:>7}"
  )


def write_json(args, results, engine, layout, all_cores) -> None:
  config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
  payload = {
    "config": config,
    "environment": harness.environment()
    | {"attention_impl": engine.attention_impl, "shared_device": engine.shared},
    "layout": {
      mode: {
        "ran_on": layout.where(mode),
        "cores": layout.cores(mode),
        "draft": args.drafts.get(mode),
        "draft_vocab": args.draft_vocabs.get(mode),
      }
      for mode in results
    },
    "modes": {mode: r.summary() for mode, r in results.items()},
    "speedup_vs_ar": harness.speedups(results),
  }
  if engine.speculator_startup is not None:
    payload["speculator_startup"] = engine.speculator_startup
  if all_cores:
    payload["all_cores"] = {
      mode: {k: v for k, v in summary.items() if k != "generated_token_ids"}
      for mode, summary in all_cores.items()
    }
  if args.temperature == 0:
    payload["greedy_outputs_identical"] = harness.same_tokens(results)
  args.json.parent.mkdir(parents=True, exist_ok=True)
  args.json.write_text(json.dumps(payload, indent=1))
