"""The command line of `python -m ssd_jax.run`: flags in groups, parsed once into a `RunConfig`.

A usage error is one line naming the flag and the fix (the whole usage is on `--help`). The
value types here refuse a bad number before anything loads.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from ssd_jax.config import BACKUPS, DEFAULT_FAN_OUT, DEFAULT_LOOKAHEAD, MODES
from ssd_jax.decode.sampling import Sampling
from ssd_jax.harness.config import (
  DEFAULT_TARGET,
  Decoding,
  Layout,
  Models,
  Output,
  RunConfig,
  Speculation,
)
from ssd_jax.models.registry import DEFAULT_DRAFTS
from ssd_jax.speculator import auth
from ssd_jax.speculator.local import DEFAULT_DRAFT_VOCAB


class Parser(argparse.ArgumentParser):
  """An ArgumentParser whose usage errors are one line, with where to read more."""

  def error(self, message: str):
    self.exit(2, f"{self.prog}: error: {message} (all flags: {self.prog} --help)\n")


def finite_float(text: str) -> float:
  """argparse type: a finite float (NaN and infinities are refused)."""
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
  if not math.isfinite(value):
    raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
  return value


def core_list(text: str) -> list[int]:
  """argparse type: "1" or "0,1" or "0-3" -> sorted core ids that exist here."""
  cores: set[int] = set()
  try:
    for part in text.split(","):
      lo, _, hi = part.partition("-")
      cores |= set(range(int(lo), int(hi or lo) + 1))
  except ValueError:
    raise argparse.ArgumentTypeError(
      f"expected core ids like 1 or 0,1 or 0-3, got {text!r}"
    ) from None
  missing = cores - set(range(os.cpu_count() or 1))
  if missing or not cores:
    raise argparse.ArgumentTypeError(f"no such cores here: {sorted(missing) or text}")
  return sorted(cores)


EXAMPLES = """examples:
  python -m ssd_jax.run                                   # the embedded default, every mode
  python -m ssd_jax.run --mode ssd --lookahead 5 --fan-out 2 --temperature 0.7
  python -m ssd_jax.run --prompts humaneval --num-prompts 20 --json out.json
  python -m ssd_jax.run --lookahead 7 --fan-out-list 4 3 2 2 1 1 1 4 --backup fast --batch-size 4
  python -m ssd_jax.run --chat --mode ssd
  python -m ssd_jax.run --target tiny-llama --draft tiny-llama-draft   # random test models

layout: on a CPU host ssd's draft runs in a speculator process pinned to a core of its own
(--draft-placement auto): ar, sd (its draft beside the target) and ssd's target run on cores
[0, N) (--target-cores, default all but one), the speculator on core N. With every mode the
table then adds ar and sd on all cores (--no-all-cores skips them): the best use of this
machine's cores without SSD. A run without ssd keeps every core. With --draft-placement device
the draft gets a virtual device of this process: placement, not compute (all CPU devices of one
process share one thread pool). --speculator HOST:PORT uses a speculator another host runs
(python -m ssd_jax.speculator --listen HOST:PORT --draft NAME --token-file token), with
--speculator-token-file token (the same secret; or SSD_JAX_SPECULATOR_TOKEN on both).

devices: the target uses --target-devices (tensor parallel), the draft --draft-devices of its
own. On CPU that many virtual devices are created (at least twice the target mesh, which keeps
XLA's CPU collectives from deadlocking)."""


def build_parser() -> Parser:
  p = Parser(
    prog="python -m ssd_jax.run",
    usage="%(prog)s [--mode ar|sd|ssd|all] [--target NAME] [--draft NAME] [--chat] [flags]",
    description="Decode prompts with ar, sd and ssd and compare them side by side, or chat.",
    epilog=EXAMPLES,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  _models(p.add_argument_group("models"))
  _decoding(p.add_argument_group("decoding"))
  _speculation(p.add_argument_group("speculation (sd and ssd)"))
  _layout(p.add_argument_group("layout"))
  _output(p.add_argument_group("output"))
  return p


def add_model_flags(p: argparse.ArgumentParser) -> None:
  """The model, speculation and layout groups of flags, for another command that decodes as
  `python -m ssd_jax.run` does (the server)."""
  _models(p.add_argument_group("models"))
  _speculation(p.add_argument_group("speculation (sd and ssd)"))
  _layout(p.add_argument_group("layout"))


def _models(g) -> None:
  drafts = "; ".join(
    f"{target}: " + ", ".join(f"{m} {d}" for m, d in per.items())
    for target, per in DEFAULT_DRAFTS.items()
  )
  g.add_argument(
    "--target", default=DEFAULT_TARGET, help="model name or path (default %(default)s)"
  )
  g.add_argument(
    "--draft",
    help="model name or path of sd's and ssd's draft; default: each mode's best shipped draft "
    f"({drafts})",
  )
  g.add_argument(
    "--draft-vocab",
    type=int,
    metavar="N",
    help="the draft's head scores only the N tokens the target emits most often (its "
    "token_ranking.npy): cheaper drafting, same outputs; 0 = the whole vocabulary; default: "
    f"{DEFAULT_DRAFT_VOCAB} (or the ranking's length) when the draft ships a ranking, else 0",
  )
  g.add_argument(
    "--dtype",
    choices=("float32", "bfloat16"),
    default="float32",
    help="the target's weights and compute (default %(default)s; bfloat16 is slow on CPUs)",
  )
  g.add_argument(
    "--draft-dtype",
    choices=("float32", "float16", "bfloat16"),
    help="the draft's weights in memory (default: float16, computed in float32, beside a "
    "float32 target; else --dtype)",
  )


def _decoding(g) -> None:
  g.add_argument(
    "--mode",
    choices=[*MODES, "all"],
    default="all",
    help="ar (the target alone), sd (speculative decoding), ssd (speculative speculative "
    "decoding) or all three (default %(default)s)",
  )
  g.add_argument(
    "--prompts",
    default="bundled",
    help="bundled, humaneval, sharegpt or PATH.jsonl (default %(default)s)",
  )
  g.add_argument(
    "--num-prompts",
    type=int,
    metavar="N",
    help="how many prompts (default: all bundled ones, else 8)",
  )
  g.add_argument(
    "--max-new-tokens",
    type=int,
    default=128,
    metavar="N",
    help="per prompt, at most (default %(default)s)",
  )
  g.add_argument(
    "--temperature",
    type=finite_float,
    default=0.0,
    metavar="T",
    help="0 = greedy (default %(default)s)",
  )
  g.add_argument("--top-k", type=int, default=0, metavar="K", help="0 = off (default %(default)s)")
  g.add_argument(
    "--top-p",
    type=finite_float,
    default=1.0,
    metavar="P",
    help="in (0, 1], 1 = off (default %(default)s)",
  )
  g.add_argument(
    "--batch-size",
    type=int,
    default=1,
    metavar="B",
    help="prompts decoded together (default %(default)s)",
  )
  g.add_argument("--seed", type=int, default=0, help="PRNG seed (default %(default)s)")
  g.add_argument(
    "--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens"
  )
  g.add_argument(
    "--no-chat-template", action="store_true", help="feed prompts as raw text, not as chat turns"
  )
  g.add_argument("--chat", action="store_true", help="talk to the target instead (reads stdin)")
  g.add_argument("--metrics", action="store_true", help="with --chat: statistics after each reply")


def _speculation(g) -> None:
  g.add_argument(
    "--lookahead",
    type=int,
    metavar="K",
    help=f"draft tokens per round (default {DEFAULT_LOOKAHEAD})",
  )
  fan = g.add_mutually_exclusive_group()
  fan.add_argument(
    "--fan-out",
    type=int,
    metavar="F",
    help=f"ssd: F fork candidates at every accept depth (default {DEFAULT_FAN_OUT})",
  )
  fan.add_argument(
    "--fan-out-list",
    type=int,
    nargs="+",
    metavar="F",
    help="ssd: F_j for accept depths 0..lookahead",
  )
  fan.add_argument(
    "--geometric",
    action="store_true",
    default=None,
    help="ssd: Theorem 12's fan-out, with the branch budget of --fan-out 2",
  )
  g.add_argument(
    "--fan-out-miss-list",
    type=int,
    nargs="+",
    metavar="F",
    help="ssd: the fan-out after a cache miss (same sum)",
  )
  g.add_argument(
    "--acceptance-rate",
    type=finite_float,
    metavar="A",
    help="with --geometric: the draft's acceptance (default 0.7)",
  )
  g.add_argument(
    "--power-law",
    type=finite_float,
    metavar="R",
    help="with --geometric: the miss-rate exponent (default 0.5)",
  )
  g.add_argument(
    "--saguaro-c",
    type=finite_float,
    metavar="C",
    help="ssd: Saguaro sampling's C in [0, 1] (default 1: off)",
  )
  g.add_argument("--backup", choices=BACKUPS, help="ssd: after a cache miss (default neural)")


def _layout(g) -> None:
  g.add_argument(
    "--draft-placement",
    choices=("auto", "device", "process"),
    help="ssd: where its draft runs (default auto: a speculator process on a CPU host; see "
    "layout below)",
  )
  g.add_argument(
    "--target-cores",
    metavar="N|all",
    help="this process's cores [0, N) on a CPU host (default: all but one beside a speculator "
    "process, else all)",
  )
  g.add_argument("--speculator", metavar="HOST:PORT", help="ssd: a speculator another host runs")
  g.add_argument(
    "--speculator-token-file",
    metavar="PATH",
    help="with --speculator: the file holding its token (default: $SSD_JAX_SPECULATOR_TOKEN, "
    "else none)",
  )
  g.add_argument(
    "--speculator-pipe",
    choices=("shm", "transfer"),
    help="ssd: how arrays reach the speculator: shared memory (default on one host) or "
    "jax.experimental.transfer (default with --speculator)",
  )
  g.add_argument(
    "--target-devices",
    type=int,
    default=1,
    metavar="N",
    help="the target's tensor-parallel devices (default %(default)s)",
  )
  g.add_argument(
    "--draft-devices", type=int, metavar="M", help="the draft's own devices (default 1)"
  )
  g.add_argument(
    "--attention-impl",
    choices=("reference", "xla", "pallas"),
    help="tree attention (default: xla; pallas is interpreted on CPUs)",
  )


def _output(g) -> None:
  g.add_argument(
    "--json",
    type=Path,
    metavar="PATH",
    help="write every mode's metrics, the configuration and the environment",
  )
  g.add_argument(
    "--all-cores",
    action=argparse.BooleanOptionalAction,
    default=None,
    help="beside ssd in a speculator process, also run ar and sd on every core (default: with "
    "--mode all)",
  )
  g.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_config(args: argparse.Namespace) -> RunConfig:
  """The parsed command line as a `RunConfig`. Raises ValueError naming the flag to fix."""
  if args.chat:
    given = [
      f
      for f, default in (("prompts", "bundled"), ("num_prompts", None), ("batch_size", 1))
      if getattr(args, f) != default
    ]
    if given:
      flags = ", ".join("--" + f.replace("_", "-") for f in given)
      raise ValueError(f"{flags} cannot be combined with --chat (it reads stdin)")
  try:
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
  except ValueError as e:
    raise ValueError(_as_flag(str(e), ("temperature", "top_k", "top_p"))) from None
  if args.json is not None:
    check_writable(args.json)
  if args.speculator_token_file is not None:
    check_token_file(args.speculator_token_file)
  return RunConfig(
    modes=MODES if args.mode == "all" else (args.mode,),
    models=Models(
      target=args.target,
      draft=args.draft,
      draft_vocab=args.draft_vocab,
      dtype=args.dtype,
      draft_dtype=args.draft_dtype,
    ),
    decoding=Decoding(
      prompts=args.prompts,
      num_prompts=args.num_prompts,
      max_new_tokens=args.max_new_tokens,
      sampling=sampling,
      batch_size=args.batch_size,
      seed=args.seed,
      ignore_eos=args.ignore_eos,
      chat_template=not args.no_chat_template,
    ),
    speculation=Speculation(
      lookahead=args.lookahead,
      fan_out=args.fan_out,
      fan_out_list=None if args.fan_out_list is None else tuple(args.fan_out_list),
      geometric=bool(args.geometric),
      acceptance_rate=args.acceptance_rate,
      power_law=args.power_law,
      fan_out_miss_list=None if args.fan_out_miss_list is None else tuple(args.fan_out_miss_list),
      saguaro_c=args.saguaro_c,
      backup=args.backup,
    ),
    layout=Layout(
      target_devices=args.target_devices,
      draft_devices=1 if args.draft_devices is None else args.draft_devices,
      draft_placement=args.draft_placement,
      target_cores=args.target_cores,
      speculator=args.speculator,
      speculator_token_file=args.speculator_token_file,
      speculator_pipe=args.speculator_pipe,
      attention_impl=args.attention_impl,
    ),
    output=Output(json=args.json, progress=not args.no_progress, all_cores=args.all_cores),
    chat=args.chat,
    chat_metrics=args.metrics,
  )


def _as_flag(message: str, fields) -> str:
  """A message that starts with a field's name, starting with its flag instead."""
  for field in fields:
    if message.startswith(field + " "):
      return "--" + field.replace("_", "-") + message[len(field) :]
  return message


def check_token_file(path: str) -> None:
  """Fail now, not after the models load, when the token file cannot serve (read again, and
  kept out of the configuration, which the JSON prints, when the speculator is reached)."""
  try:
    auth.read_token(path)
  except ValueError as e:
    raise ValueError(f"--speculator-token-file: {e}") from None


def check_writable(path: Path) -> None:
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
    raise ValueError(
      f"--json {path}: cannot write there ({e.strerror}); choose another path"
    ) from None
