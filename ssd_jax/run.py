"""python -m ssd_jax.run: decode with ar / sd / ssd and compare them side by side.

With no arguments: SmolLM2-135M-Instruct as target, the shipped distilled draft, the bundled
prompts, all three modes, greedy; prints a table of tokens/s, speedup over ar, mean accepted
tokens per round and cache hit rate, then one sample completion. `--chat` talks instead.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from pathlib import Path

from ssd_jax.cli import (
  DEFAULT_DRAFT_VOCAB,
  DEFAULT_DRAFTS,
  apply_layout,
  draft_dtype,
  exit_with_parent,
  finite_float,
  resolve_draft_vocab,
  resolve_layout,
  setup_devices,
)
from ssd_jax.config import BACKUPS, MODES

DEFAULT_TARGET = "smollm2-135m"

_EXAMPLES = """examples:
  python -m ssd_jax.run                                   # the embedded default, all modes
  python -m ssd_jax.run --mode ssd --lookahead 5 --fan-out 2 --temperature 0.7
  python -m ssd_jax.run --prompts humaneval --num-prompts 20 --json out.json
  python -m ssd_jax.run --lookahead 7 --fan-out-list 4 3 2 2 1 1 1 4 --backup fast --batch-size 4
  python -m ssd_jax.run --chat --mode ssd
  python -m ssd_jax.run --target tiny-llama --draft tiny-llama-draft   # random test models

layout: on a CPU host ssd's draft runs in a speculator process of its own, pinned to a core of
its own (--draft-placement auto, the default): ar, sd (its draft beside the target) and ssd's
target run on cores [0, N) (--target-cores, default all but one), the speculator on core N. The
table then adds sd on all cores, the best use of this machine's cores without SSD. With
--draft-placement device the draft gets a virtual device of this process: placement, not
compute (all CPU devices of one process share one thread pool). --speculator HOST:PORT uses a
speculator another host runs (python -m ssd_jax.speculator --listen HOST:PORT).

devices: the target uses --target-devices (tensor parallel), the draft --draft-devices of its
own. On CPU that many virtual devices are created (at least twice the target mesh, which keeps
XLA's CPU collectives from deadlocking)."""

# Defaults of the flags that only some modes read; None in the parser tells "not given".
# Lookahead 3: the fastest sd setting of the benchmark sweeps for the embedded pair on a 2-core
# CPU, and ssd's with the wide draft, there at fan-out 4 (DEFAULT_FAN_OUT; docs/BENCHMARKS.md).
SSD_ONLY = {
  "fan_out": None,
  "fan_out_list": None,
  "geometric": False,
  "fan_out_miss_list": None,
  "acceptance_rate": 0.7,
  "power_law": 0.5,
  "saguaro_c": 1.0,
  "backup": "neural",
}
SPECULATIVE = {"lookahead": 3, "draft_vocab": None, "draft_devices": 1, "draft_dtype": None}
DEFAULT_FAN_OUT = 4


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="python -m ssd_jax.run",
    description=__doc__.split("\n\n")[0],
    epilog=_EXAMPLES,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("--mode", choices=[*MODES, "all"], default="all")
  p.add_argument("--target", default=DEFAULT_TARGET, help="model name or path")
  p.add_argument(
    "--draft",
    help="model name or path, for sd and ssd; default (target smollm2-135m): each mode's best "
    "shipped draft, "
    + ", ".join(f"{mode} {name}" for mode, name in DEFAULT_DRAFTS.items())
    + " (docs/DRAFT.md)",
  )
  p.add_argument(
    "--draft-vocab",
    type=int,
    help="the draft's head scores only the N tokens the target emits most often (its "
    "token_ranking.npy): cheaper drafting, same outputs; 0 = the whole vocabulary; default: "
    f"{DEFAULT_DRAFT_VOCAB} (or the ranking's length) when the draft ships a ranking, else 0",
  )
  p.add_argument("--prompts", default="bundled", help="humaneval, sharegpt, bundled or PATH.jsonl")
  p.add_argument("--num-prompts", type=int, default=None, help="default: all (bundled) or 8")
  p.add_argument("--max-new-tokens", type=int, default=128)
  p.add_argument("--lookahead", type=int, help="draft tokens per round (K); default 3")
  fan = p.add_mutually_exclusive_group()
  fan.add_argument("--fan-out", type=int, help=f"uniform fan-out F (default {DEFAULT_FAN_OUT})")
  fan.add_argument("--fan-out-list", type=int, nargs="+", help="F_j for depths 0..lookahead")
  fan.add_argument(
    "--geometric",
    action="store_true",
    default=None,
    help="Theorem 12 fan-out with the budget of --fan-out 2 per depth",
  )
  p.add_argument("--fan-out-miss-list", type=int, nargs="+", help="fan-out after a miss")
  p.add_argument("--acceptance-rate", type=finite_float, help="for --geometric (default 0.7)")
  p.add_argument("--power-law", type=finite_float, help="miss-rate exponent r, --geometric (0.5)")
  p.add_argument("--temperature", type=finite_float, default=0.0)
  p.add_argument("--top-k", type=int, default=0)
  p.add_argument("--top-p", type=finite_float, default=1.0)
  p.add_argument("--saguaro-c", type=finite_float, help="Saguaro sampling C in [0, 1] (1)")
  p.add_argument("--backup", choices=BACKUPS, help="after a cache miss (default neural)")
  p.add_argument("--batch-size", type=int, default=1)
  p.add_argument("--target-devices", type=int, default=1)
  p.add_argument("--draft-devices", type=int, help="default 1")
  p.add_argument(
    "--draft-placement",
    choices=("auto", "device", "process"),
    default="auto",
    help="where ssd's draft runs (see layout below; default auto)",
  )
  p.add_argument("--target-cores", help="N or all: this process's cores [0, N) (see layout)")
  p.add_argument("--speculator", metavar="HOST:PORT", help="a speculator another host runs")
  p.add_argument(
    "--speculator-pipe",
    choices=("shm", "transfer"),
    help="how arrays reach the speculator: shared memory (default here) or jax transfer",
  )
  p.add_argument(
    "--no-all-cores", action="store_true", help="skip the sd-on-all-cores line of the table"
  )
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--exit-with", type=int, help=argparse.SUPPRESS)  # a child of another run
  p.add_argument("--json", type=Path, help="write per-mode metrics, config and environment")
  p.add_argument("--chat", action="store_true", help="interactive chat (reads stdin lines)")
  p.add_argument("--metrics", action="store_true", help="with --chat: statistics per reply")
  p.add_argument("--attention-impl", choices=("reference", "xla", "pallas"), default=None)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument(
    "--draft-dtype",
    choices=("float32", "float16", "bfloat16"),
    help="the draft's weights in memory (default: float16, computed in float32, beside a "
    "float32 target; else --dtype)",
  )
  p.add_argument("--no-chat-template", action="store_true", help="feed prompts as raw text")
  p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens")
  p.add_argument("--no-progress", action="store_true")
  return p


def _flag(name: str) -> str:
  return "--" + name.replace("_", "-")


def apply_mode_defaults(args, parser) -> None:
  """Refuse flags the chosen mode never reads (a silently ignored flag misleads), then fill in
  their defaults."""
  modes = set(MODES) if args.mode == "all" else {args.mode}
  for names, which, absent in (
    (SSD_ONLY, "ssd", "ssd" not in modes),
    (SPECULATIVE, "sd and ssd", modes == {"ar"}),
  ):
    unused = [_flag(n) for n in names if getattr(args, n) is not None]
    if absent and unused:
      verb = "applies" if len(unused) == 1 else "apply"
      parser.error(
        f"{', '.join(unused)} {verb} only to {which}, which --mode {args.mode} does not run"
      )
  if not args.geometric and (args.acceptance_rate is not None or args.power_law is not None):
    parser.error("--acceptance-rate and --power-law only apply with --geometric")
  for name, default in (SSD_ONLY | SPECULATIVE).items():
    if getattr(args, name) is None:
      setattr(args, name, default)


def check_args(args, parser) -> None:
  apply_mode_defaults(args, parser)
  args.drafts = mode_drafts(args, parser)
  if args.max_new_tokens < 1:
    parser.error("--max-new-tokens must be >= 1")
  if args.lookahead < 1:
    parser.error("--lookahead must be >= 1")
  if args.batch_size < 1 or args.target_devices < 1 or args.draft_devices < 1:
    parser.error("--batch-size, --target-devices and --draft-devices must be >= 1")
  if args.draft_vocab is not None and args.draft_vocab < 0:
    parser.error("--draft-vocab must be >= 0 (0 = the whole vocabulary)")
  if args.num_prompts is not None and args.num_prompts < 1:
    parser.error("--num-prompts must be >= 1")
  if not 0.0 <= args.saguaro_c <= 1.0:
    parser.error("--saguaro-c must be in [0, 1]")
  if args.temperature < 0:
    parser.error("--temperature must be >= 0 (0 = greedy)")
  if args.top_k < 0:
    parser.error(f"--top-k must be >= 0 (0 = off), got {args.top_k}")
  if not 0.0 < args.top_p <= 1.0:
    parser.error(f"--top-p must be in (0, 1] (1 = off), got {args.top_p}")
  if args.chat and args.json:
    parser.error("--chat and --json cannot be combined")
  if args.chat:  # the chat reads its prompts from stdin, one reply at a time
    given = [
      f
      for f in ("prompts", "num_prompts", "batch_size")
      if getattr(args, f) != parser.get_default(f)
    ]
    if given:
      parser.error(
        f"{', '.join(map(_flag, given))} cannot be combined with --chat (it reads stdin)"
      )
  if args.metrics and not args.chat:
    parser.error("--metrics only applies to --chat")
  if args.json is not None:
    check_writable(args.json, parser)


def mode_drafts(args, parser) -> dict[str, str]:
  """The draft each speculative mode runs: --draft for both, else the default target's
  per-mode default (the benchmark sweep's pick, docs/DRAFT.md)."""
  modes = [m for m in (MODES if args.mode == "all" else [args.mode]) if m != "ar"]
  if args.draft is not None:
    return dict.fromkeys(modes, args.draft)
  if modes and args.target != DEFAULT_TARGET:
    parser.error(f"--target {args.target} needs --draft (a draft with its vocabulary)")
  return {m: DEFAULT_DRAFTS[m] for m in modes}


def check_writable(path: Path, parser) -> None:
  """Fail now, not after the whole run, when the JSON cannot be written: make its folder and
  open the file for appending (removing it again if it did not exist)."""
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    existed = path.exists()
    with path.open("a"):
      pass
    if not existed:
      path.unlink()
  except OSError as e:
    parser.error(f"--json {path}: cannot write there ({e.strerror}); choose another path")


def fan_out_lists(args, parser) -> tuple[tuple[int, ...], tuple[int, ...]]:
  from ssd_jax.decode import tree  # noqa: PLC0415 (after device setup)

  lookahead = args.lookahead
  if args.fan_out_list:
    hit = tuple(args.fan_out_list)
  elif args.geometric:
    try:
      hit = tree.geometric(lookahead, 2 * (lookahead + 1), args.acceptance_rate, args.power_law)
    except ValueError as e:
      parser.error(str(e))
  else:
    f = DEFAULT_FAN_OUT if args.fan_out is None else args.fan_out
    if f < 1:
      parser.error("--fan-out must be >= 1")
    hit = tree.uniform(lookahead, f)
  return hit, tuple(args.fan_out_miss_list or ())


def make_spec(mode: str, args, fan_out, fan_out_miss):
  from ssd_jax.config import SpecConfig  # noqa: PLC0415

  if mode == "ar":
    return SpecConfig(mode="ar", lookahead=0)
  if mode == "sd":
    return SpecConfig(mode="sd", lookahead=args.lookahead)
  return SpecConfig(
    mode="ssd",
    lookahead=args.lookahead,
    fan_out=fan_out,
    fan_out_miss=fan_out_miss,
    saguaro_c=args.saguaro_c,
    backup=args.backup,
  )


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  check_args(args, parser)
  if args.exit_with:
    exit_with_parent(args.exit_with)
  try:
    layout = resolve_layout(args.draft_placement, args.target_cores, args.speculator)
  except ValueError as e:
    parser.error(str(e))
  layout = apply_layout(layout)  # pins this process before JAX starts
  setup_devices(args.target_devices, args.draft_devices)
  from ssd_jax.decode import Sampling  # noqa: PLC0415 (after the device set-up)
  from ssd_jax.decode.channel import ChannelError  # noqa: PLC0415

  modes = list(MODES) if args.mode == "all" else [args.mode]
  if args.chat:  # the chat talks through one mode, the last (ssd under --mode all): build it only
    modes = modes[-1:]
  fan_out, fan_out_miss = fan_out_lists(args, parser)
  with contextlib.ExitStack() as stack:  # stops a speculator process however the run ends
    try:
      specs = {m: make_spec(m, args, fan_out, fan_out_miss) for m in modes}
      sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
      engines = make_engines(args, modes, layout, stack)
    except (ValueError, FileNotFoundError) as e:
      parser.error(str(e))
    try:
      return run_engines(args, parser, engines, specs, sampling, layout)
    except ChannelError as e:
      print(f"python -m ssd_jax.run: error: {e}", file=sys.stderr)
      return 1


def run_engines(args, parser, engines, specs, sampling, layout) -> int:
  modes = list(specs)
  if args.chat:
    from ssd_jax.chat import chat_loop  # noqa: PLC0415

    spec, engine = specs[modes[0]], engines[modes[0]]
    try:
      engine.plan(spec, greedy=sampling.greedy)  # a bad configuration fails before the chat
    except ValueError as e:
      parser.error(str(e))
    chat_loop(
      engine, spec, sampling, args.max_new_tokens, show_metrics=args.metrics, seed=args.seed
    )
    return 0
  from ssd_jax.sidebyside import compare  # noqa: PLC0415

  return compare(args, parser, engines, specs, sampling, layout)


def make_engines(args, modes, layout, stack: contextlib.ExitStack) -> dict:
  """One Engine per draft (ar shares the first; modes with the same draft share one), each
  closed by `stack`."""
  import jax.numpy as jnp  # noqa: PLC0415

  from ssd_jax.models.registry import load_model  # noqa: PLC0415

  target = load_model(args.target, dtype=jnp.dtype(args.dtype))
  args.draft_dtype = draft_dtype(args.draft_dtype, args.dtype)  # resolved, for --json too
  dtype = jnp.dtype(args.draft_dtype)
  by_draft: dict[str | None, list[str]] = {}
  for mode in modes:
    name = args.drafts.get(mode, next(iter(args.drafts.values()), None))
    by_draft.setdefault(name, []).append(mode)
  engines, vocab = {}, {}
  for name, group in by_draft.items():
    draft = None if name is None else load_model(name, dtype=dtype)
    draft_vocab = resolve_draft_vocab(args.draft_vocab, draft)
    engine = stack.enter_context(make_engine(args, target, draft, draft_vocab, group, layout))
    vocab |= {m: draft_vocab or 0 for m in group if m != "ar"}
    engines |= dict.fromkeys(group, engine)
  args.draft_vocabs = vocab  # per mode, in --json's layout; sd's also runs sd on all cores
  return engines


def make_engine(args, target, draft, draft_vocab, modes, layout):
  from ssd_jax.decode import Engine  # noqa: PLC0415
  from ssd_jax.decode.channel import ChannelError  # noqa: PLC0415

  with warnings.catch_warnings():
    warnings.simplefilter("always")
    engine = Engine(
      target,
      draft,
      target_devices=args.target_devices,
      draft_devices=args.draft_devices,
      attention_impl=args.attention_impl,
      draft_vocab=draft_vocab,
      draft_placement=layout.placement if "ssd" in modes else "device",
      speculator_cores=layout.speculator_cores,
      speculator_address=layout.address,
      speculator_pipe=args.speculator_pipe,
    )
  if engine.speculator_options is not None:
    # Start it (and load its draft there) now: a speculator that cannot start or be reached is
    # a bad-input error before anything is decoded, not a failure after ar and sd ran.
    try:
      engine.speculator_process()
    except ChannelError as e:
      engine.close()
      raise ValueError(f"the speculator process: {e}") from e
  return engine


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  try:
    sys.exit(main())
  except KeyboardInterrupt:  # main's ExitStack has stopped any speculator by now
    print("python -m ssd_jax.run: interrupted", file=sys.stderr)
    sys.exit(130)
