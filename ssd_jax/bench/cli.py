"""python -m ssd_jax.bench: benchmark sweeps written as JSON, plots and a markdown report.

  sweep   mode x lookahead x fan-out (uniform and geometric) x temperature x batch size x prompt
          set; every configuration's metrics, each program's latency in isolation, and the
          analytical model's prediction next to the measurement. Optionally HF transformers'
          generate and assisted generation on the same prompts (--hf).
  models  prefill and decode tokens/s of the target in ssd_jax (and HF eager with --hf), f32
          and bf16.
  overlap whether this machine runs the target's verification and the draft's expansion at
          the same time (SSD's premise): each alone, then both dispatched together.
  exchange  one SSD round's exchange with a speculator process, per pipe (shared memory and
          jax.experimental.transfer), greedy and sampled payloads; and how independent the
          speculator's core is, for compute-bound and for memory-bound (decode-like) work.
  ab      configurations (mode, draft, lookahead, fan-out) alternated pass by pass on the same
          prompts, each pass's ratios to the first kept: defaults chosen on a noisy host.
  forward the forward's cost against new tokens T (1..16), with and without logits, at cache
          fills 256 / 1024 / 4096, for the target and the draft, tree steps over 8 / 24
          branches, beside the matrix products alone.

Speed is compared as ratios measured side by side in one run: the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ssd_jax.cli import (
  apply_layout,
  core_list,
  finite_float,
  pin_cores,
  resolve_layout,
  setup_devices,
)

_EXAMPLES = """examples:
  python -m ssd_jax.bench sweep --out runs/bench                   # the default sweep
  python -m ssd_jax.bench sweep --quick --target tiny-llama --draft tiny-llama-draft
  python -m ssd_jax.bench sweep --batch-sizes 1 2 4 8 --backup auto --lookaheads 5
  python -m ssd_jax.bench sweep --hf                               # + HF transformers
  python -m ssd_jax.bench models --hf
  python -m ssd_jax.bench ab --configs sd:smollm2-135m-draft:3 ssd:smollm2-135m-draft-wide:5:4
  python -m ssd_jax.bench forward --fills 256 --new-tokens 1 4 8"""


_DRAFT_VOCAB = (
  "score only the draft's N most frequent tokens (as in python -m ssd_jax.run: default 8192 "
  "when the draft ships a token ranking; 0 = the whole vocabulary)"
)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="python -m ssd_jax.bench",
    description=__doc__.split("\n\n")[0],
    epilog=_EXAMPLES,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  sub = p.add_subparsers(dest="command", required=True)
  s = sub.add_parser("sweep", help="decoding sweep")
  s.add_argument("--target", default="smollm2-135m")
  s.add_argument("--draft", default="smollm2-135m-draft")
  s.add_argument("--draft-vocab", type=int, default=None, help=_DRAFT_VOCAB)
  s.add_argument("--out", type=Path, default=Path("runs/bench"))
  s.add_argument("--prompt-sets", nargs="+", default=["humaneval", "sharegpt"])
  s.add_argument("--num-prompts", type=int, default=8)
  s.add_argument("--max-new-tokens", type=int, default=128)
  s.add_argument("--lookaheads", type=int, nargs="+", default=[3, 5, 7])
  s.add_argument("--fan-outs", type=int, nargs="+", default=[1, 2, 3, 4])
  s.add_argument("--no-geometric", action="store_true", help="skip Theorem 12 fan-outs")
  s.add_argument("--temperatures", type=finite_float, nargs="+", default=[0.0])
  s.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
  s.add_argument("--saguaro-c", type=finite_float, default=1.0)
  s.add_argument("--backup", choices=("neural", "fast", "auto"), default="neural")
  s.add_argument("--target-devices", type=int, default=1)
  _layout_flags(s)
  s.add_argument("--seed", type=int, default=0)
  s.add_argument("--ignore-eos", action="store_true")
  s.add_argument("--hf", action="store_true", help="also run HF transformers (needs make hf)")
  s.add_argument("--quick", action="store_true", help="a tiny sweep (smoke test)")
  o = sub.add_parser("overlap", help="can this machine run verify and expansion at once?")
  o.add_argument("--target", default="smollm2-135m")
  o.add_argument("--draft", default="smollm2-135m-draft")
  o.add_argument("--draft-vocab", type=int, default=None, help=_DRAFT_VOCAB)
  o.add_argument("--out", type=Path, default=Path("runs/bench"))
  o.add_argument("--lookaheads", type=int, nargs="+", default=[7, 7, 4])
  o.add_argument("--fan-outs", type=int, nargs="+", default=[1, 3, 2])
  f = sub.add_parser("forward", help="forward cost against new tokens, cache fill, branches")
  f.add_argument("--models", nargs="+", default=["smollm2-135m", "smollm2-135m-draft"])
  f.add_argument("--out", type=Path, default=Path("runs/bench"))
  f.add_argument("--fills", type=int, nargs="+", default=[256, 1024, 4096])
  f.add_argument("--new-tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16])
  f.add_argument("--branches", type=int, nargs="+", default=[8, 24])
  f.add_argument("--reps", type=int, default=12)
  x = sub.add_parser("exchange", help="one round's exchange with a speculator process")
  x.add_argument("--out", type=Path, default=Path("runs/bench"))
  x.add_argument("--pipes", nargs="+", choices=("shm", "transfer"), default=["shm", "transfer"])
  x.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
  x.add_argument("--lookahead", type=int, default=3)
  x.add_argument("--vocab", type=int, default=49152)
  x.add_argument("--reps", type=int, default=200)
  x.add_argument("--target-cores", type=core_list, default=[0], help="this process's cores")
  x.add_argument("--speculator-cores", type=core_list, default=[1])
  a = sub.add_parser("ab", help="configurations alternated pass by pass (see bench.ab)")
  a.add_argument("--target", default="smollm2-135m")
  a.add_argument("--draft-vocab", type=int, default=None, help=_DRAFT_VOCAB)
  a.add_argument(
    "--configs",
    type=_config,
    nargs="+",
    default=["sd", "ssd"],
    metavar="MODE[:DRAFT[:K[:F[:C]]]]",
    help="the first is the one the others are divided by (default: sd and ssd as run has them)",
  )
  a.add_argument("--passes", type=int, default=4)
  a.add_argument("--prompts", default="bundled", help="a prompt set, as run's --prompts")
  a.add_argument("--num-prompts", type=int, default=None)
  a.add_argument("--max-new-tokens", type=int, default=128)
  a.add_argument("--temperature", type=finite_float, default=0.0)
  a.add_argument("--seed", type=int, default=0)
  a.add_argument("--out", type=Path, default=Path("runs/bench"))
  _layout_flags(a)
  m = sub.add_parser("models", help="prefill / decode speed of the target")
  m.add_argument("--target", default="smollm2-135m")
  m.add_argument("--out", type=Path, default=Path("runs/bench"))
  m.add_argument("--prompt-tokens", type=int, default=256)
  m.add_argument("--decode-tokens", type=int, default=32)
  m.add_argument("--hf", action="store_true")
  return p


def _layout_flags(p: argparse.ArgumentParser) -> None:
  p.add_argument(
    "--draft-placement",
    choices=("auto", "device", "process"),
    default="auto",
    help="where ssd's draft runs, as in python -m ssd_jax.run (auto: a pinned speculator "
    "process on CPU)",
  )
  p.add_argument("--layout-cores", metavar="N|all", help="as run's --target-cores")


def _config(text: str):
  from ssd_jax.bench.ab import parse_config  # noqa: PLC0415 (imports JAX; its backend starts later)

  return parse_config(text)


def check(args, parser) -> None:
  if getattr(args, "draft_vocab", None) is not None and args.draft_vocab < 0:
    parser.error("--draft-vocab must be >= 0 (0 = the whole vocabulary)")
  if args.command == "sweep":
    if args.num_prompts < 1 or args.max_new_tokens < 1:
      parser.error("--num-prompts and --max-new-tokens must be >= 1")
    if min(args.lookaheads) < 1 or min(args.fan_outs) < 1 or min(args.batch_sizes) < 1:
      parser.error("--lookaheads, --fan-outs and --batch-sizes must be >= 1")
    if min(args.temperatures) < 0 or not 0 <= args.saguaro_c <= 1:
      parser.error("temperatures must be >= 0 and --saguaro-c in [0, 1]")
    if args.quick:
      args.prompt_sets, args.num_prompts, args.max_new_tokens = ["bundled"], 2, 16
      args.lookaheads, args.fan_outs = [2], [1, 2]
  if args.command == "ab":
    if args.passes < 1 or args.max_new_tokens < 1 or (args.num_prompts or 1) < 1:
      parser.error("--passes, --num-prompts and --max-new-tokens must be >= 1")
    if args.temperature < 0:
      parser.error("--temperature must be >= 0 (0 = greedy)")
    args.configs = [_config(c) if isinstance(c, str) else c for c in args.configs]


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  check(args, parser)
  if getattr(args, "target_cores", None):
    pin_cores(args.target_cores)  # before JAX starts: sizes its thread pool
  if args.command in ("sweep", "ab"):
    try:
      args.layout = resolve_layout(args.draft_placement, args.layout_cores, None)
    except ValueError as e:
      parser.error(str(e))
    args.layout = apply_layout(args.layout)
  setup_devices(getattr(args, "target_devices", 1))
  args.out.mkdir(parents=True, exist_ok=True)
  from ssd_jax.bench import ab, exchange, forward, sweep  # noqa: PLC0415 (after device set-up)

  try:
    run = {
      "sweep": sweep.sweep,
      "models": sweep.model_speed,
      "overlap": sweep.measure_overlap,
      "forward": forward.forward_costs,
      "exchange": exchange.exchange,
      "ab": ab.ab,
    }[args.command]
    result = run(args)
    path = args.out / f"{args.command}.json"
  except (ValueError, FileNotFoundError) as e:
    parser.error(str(e))
  result["command"] = "python -m ssd_jax.bench " + " ".join(argv or sys.argv[1:])
  result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
  path.write_text(json.dumps(result, indent=1))
  print(f"wrote {path}")
  if args.command == "sweep":
    from ssd_jax.bench import report as report_lib  # noqa: PLC0415

    report = report_lib.write(result, args.out)
    print(f"wrote {report} and its plots")
  if args.command == "ab":
    print(result["table"])
  return 0
