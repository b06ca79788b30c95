"""python -m ssd_jax.bench: benchmarks written as JSON (plots and a markdown report for sweeps).

  sweep     mode x lookahead x fan-out (uniform and geometric) x temperature x batch size x prompt
            set; every configuration's metrics, each program's latency in isolation, and the
            analytical model's prediction next to the measurement. Optionally HF transformers'
            generate and assisted generation on the same prompts (--hf).
  ab        configurations (mode, draft, lookahead, fan-out) alternated pass by pass on the same
            prompts, each pass's ratios to the first kept: defaults chosen on a noisy host.
  models    prefill and decode tokens/s of the target alone, f32 and bf16 (and HF eager, --hf).
  overlap   whether this machine runs the target's verification and the draft's expansion at
            the same time (SSD's premise): each alone, then both dispatched together.
  exchange  one SSD round's exchange with a speculator process, per pipe (shared memory and
            jax.experimental.transfer), greedy and sampled payloads; and how independent the
            speculator's core is, for compute-bound and for memory-bound (decode-like) work.
  forward   the forward's cost against new tokens T, with and without logits, at several cache
            fills, for the target and the draft; tree steps over N branches; the products alone.
  serving   continuous batching's throughput-latency curve: requests at fixed concurrencies and
            Poisson rates through a session per mode; tokens/s, TTFT and TPOT p50/p99,
            acceptance and hit rate by occupancy; beside static batches through generate.
  lower     every program of ar, sd and ssd exported for cuda and tpu at the card's layout: a
            4-way tensor-parallel target and a 1-device draft on virtual CPU devices, abstract
            weights of real models' shapes in bfloat16; the weights and KV cache per device;
            exits non-zero if any program fails to lower.
  rounds    what one decode round costs and the host's part of it: per mode, draft placement
            and batch size, ms a round and the driving thread's CPU time a round.
  device    one bounded run on an accelerator (8 minutes by default): versions, the GPU tests,
            ar/sd/ssd decoding, tree attention and round-program timings, theory's predictions;
            JSON and a markdown summary. --cpu-smoke: the same at tiny shapes on this CPU.

Speed is compared as ratios measured side by side in one run: the machine may be shared. Check
it is idle first (`uptime`), and never time while tests run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from ssd_jax.cli.arguments import Parser, core_list, finite_float
from ssd_jax.config import DEFAULT_FAN_OUT, DEFAULT_LOOKAHEAD, MODES
from ssd_jax.harness.config import DEFAULT_TARGET
from ssd_jax.models.registry import default_draft
from ssd_jax.speculator.layout import apply_layout, pin_cores, resolve_layout, set_cpu_devices

PROG = "python -m ssd_jax.bench"

_EXAMPLES = """examples:
  python -m ssd_jax.bench sweep --out runs/bench                   # the default sweep
  python -m ssd_jax.bench sweep --quick --target tiny-llama --draft tiny-llama-draft
  python -m ssd_jax.bench sweep --batch-sizes 1 2 4 8 --backup auto --lookaheads 5
  python -m ssd_jax.bench sweep --hf                               # + HF transformers
  python -m ssd_jax.bench models --hf
  python -m ssd_jax.bench ab --configs sd:smollm2-135m-draft:3 ssd:smollm2-135m-draft-wide:5:4
  python -m ssd_jax.bench forward --fills 256 --new-tokens 1 4 8
  python -m ssd_jax.bench exchange --pipes shm --batch-sizes 1
  python -m ssd_jax.bench serving --concurrencies 1 2 4 8 --rates 0.5 1 --requests 16
  python -m ssd_jax.bench lower --pairs llama-70b/1b --batch-sizes 16 --platforms tpu
  python -m ssd_jax.bench rounds --batch-sizes 1 8                 # the host's part of a round
  python -m ssd_jax.bench device --out runs/device                 # on a GPU machine
  python -m ssd_jax.bench device --cpu-smoke --out runs/device-smoke"""

_DRAFT_VOCAB = (
  "score only the draft's N most frequent tokens (as in python -m ssd_jax.run: default 8192 "
  "when the draft ships a token ranking; 0 = the whole vocabulary)"
)


def _doc(command: str) -> str:
  """The paragraph of this module's docstring that describes `command`."""
  lines = __doc__.split("\n\n")[1].splitlines()
  start = next(i for i, line in enumerate(lines) if line.split()[0] == command)
  end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith("   ")), None)
  text = " ".join(line.strip() for line in lines[start:end])
  return text[len(command) :].strip()


def _sub(sub, command: str) -> argparse.ArgumentParser:
  doc = _doc(command)
  p = sub.add_parser(command, help=doc.split(";")[0].split(":")[0], description=doc)
  p.add_argument(
    "--out", type=Path, default=Path("runs/bench"), help="folder for the JSON (default %(default)s)"
  )
  return p


def _models(p, draft: bool = True) -> None:
  p.add_argument(
    "--target", default="smollm2-135m", help="model name or path (default %(default)s)"
  )
  if draft:
    p.add_argument(
      "--draft", default="smollm2-135m-draft", help="model name or path (default %(default)s)"
    )
    p.add_argument("--draft-vocab", type=int, metavar="N", help=_DRAFT_VOCAB)


def _layout(p) -> None:
  p.add_argument(
    "--draft-placement",
    choices=("auto", "device", "process"),
    default="auto",
    help="where ssd's draft runs, as in python -m ssd_jax.run (default auto: a pinned "
    "speculator process on a CPU host)",
  )
  p.add_argument("--layout-cores", metavar="N|all", help="as run's --target-cores")


def build_parser() -> Parser:
  p = Parser(
    prog=PROG,
    description="Benchmarks of ssd_jax, written as JSON: "
    + __doc__.split("\n\n")[0].split(": ", 1)[1],
    epilog=_EXAMPLES,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
  s = _sub(sub, "sweep")
  _models(s)
  s.add_argument(
    "--prompt-sets",
    nargs="+",
    default=["humaneval", "sharegpt"],
    help="prompt sets, as run's --prompts (default %(default)s)",
  )
  s.add_argument("--num-prompts", type=int, default=8, help="per set (default %(default)s)")
  s.add_argument("--max-new-tokens", type=int, default=128, help="per prompt (default %(default)s)")
  s.add_argument("--lookaheads", type=int, nargs="+", default=[3, 5, 7], help="default %(default)s")
  s.add_argument(
    "--fan-outs",
    type=int,
    nargs="+",
    default=[1, 2, 3, 4],
    help="uniform ssd fan-outs (default %(default)s)",
  )
  s.add_argument("--no-geometric", action="store_true", help="skip Theorem 12's fan-outs")
  s.add_argument(
    "--temperatures", type=finite_float, nargs="+", default=[0.0], help="default %(default)s"
  )
  s.add_argument("--batch-sizes", type=int, nargs="+", default=[1], help="default %(default)s")
  s.add_argument(
    "--saguaro-c", type=finite_float, default=1.0, help="Saguaro sampling's C (default %(default)s)"
  )
  s.add_argument(
    "--backup",
    choices=("neural", "fast", "auto"),
    default="neural",
    help="after a cache miss (default %(default)s)",
  )
  s.add_argument(
    "--target-devices",
    type=int,
    default=1,
    help="the target's tensor-parallel devices (default %(default)s)",
  )
  _layout(s)
  s.add_argument("--seed", type=int, default=0, help="default %(default)s")
  s.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens")
  s.add_argument("--hf", action="store_true", help="also run HF transformers (needs make hf)")
  s.add_argument("--quick", action="store_true", help="a tiny sweep (a smoke test)")
  a = _sub(sub, "ab")
  a.add_argument(
    "--target", default="smollm2-135m", help="model name or path (default %(default)s)"
  )
  a.add_argument("--draft-vocab", type=int, metavar="N", help=_DRAFT_VOCAB)
  a.add_argument(
    "--configs",
    type=parse_config,
    nargs="+",
    default=["sd", "ssd"],
    metavar="MODE[:DRAFT[:K[:F[:C]]]]",
    help="the first is the one the others are divided by (default: sd and ssd as run has them)",
  )
  a.add_argument("--passes", type=int, default=4, help="default %(default)s")
  a.add_argument(
    "--prompts", default="bundled", help="a prompt set, as run's --prompts (default %(default)s)"
  )
  a.add_argument("--num-prompts", type=int, help="default: all bundled ones, else 8")
  a.add_argument("--max-new-tokens", type=int, default=128, help="default %(default)s")
  a.add_argument("--temperature", type=finite_float, default=0.0, help="default %(default)s")
  a.add_argument("--seed", type=int, default=0, help="default %(default)s")
  _layout(a)
  m = _sub(sub, "models")
  _models(m, draft=False)
  m.add_argument("--prompt-tokens", type=int, default=256, help="default %(default)s")
  m.add_argument("--decode-tokens", type=int, default=32, help="default %(default)s")
  m.add_argument("--hf", action="store_true", help="also HF eager (needs make hf)")
  o = _sub(sub, "overlap")
  _models(o)
  o.add_argument("--lookaheads", type=int, nargs="+", default=[7, 7, 4], help="default %(default)s")
  o.add_argument(
    "--fan-outs",
    type=int,
    nargs="+",
    default=[1, 3, 2],
    help="paired with --lookaheads (default %(default)s)",
  )
  x = _sub(sub, "exchange")
  x.add_argument(
    "--pipes",
    nargs="+",
    choices=("shm", "transfer"),
    default=["shm", "transfer"],
    help="default %(default)s",
  )
  x.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="default %(default)s")
  x.add_argument("--lookahead", type=int, default=3, help="default %(default)s")
  x.add_argument(
    "--vocab", type=int, default=49152, help="q's width when sampling (default %(default)s)"
  )
  x.add_argument("--reps", type=int, default=200, help="default %(default)s")
  x.add_argument(
    "--target-cores", type=core_list, default=[0], help="this process's cores (default 0)"
  )
  x.add_argument(
    "--speculator-cores", type=core_list, default=[1], help="the speculator's (default 1)"
  )
  v = _sub(sub, "serving")
  v.add_argument(
    "--target", default="smollm2-135m", help="model name or path (default %(default)s)"
  )
  v.add_argument("--draft", help="one draft for sd and ssd (default: each mode's own)")
  v.add_argument(
    "--modes", nargs="+", choices=MODES, default=list(MODES), help="default %(default)s"
  )
  v.add_argument(
    "--prompt-sets", nargs="+", default=["humaneval", "sharegpt"], help="default %(default)s"
  )
  v.add_argument("--num-prompts", type=int, default=16, help="per set (default %(default)s)")
  v.add_argument("--max-new-tokens", type=int, default=64, help="per request (default %(default)s)")
  v.add_argument(
    "--concurrencies", type=int, nargs="+", default=[1, 2, 4, 8], help="default %(default)s"
  )
  v.add_argument(
    "--rates", type=finite_float, nargs="*", default=[], help="Poisson arrivals, requests/s"
  )
  v.add_argument("--requests", type=int, default=16, help="per load point (default %(default)s)")
  v.add_argument("--max-batch-size", type=int, default=8, help="slots (default %(default)s)")
  v.add_argument(
    "--temperatures",
    type=finite_float,
    nargs="+",
    default=[0.0],
    help="requests cycle through them (default %(default)s)",
  )
  v.add_argument("--seed", type=int, default=0, help="default %(default)s")
  v.add_argument(
    "--no-static", action="store_true", help="skip the static batches through generate"
  )
  v.add_argument(
    "--soak", type=int, default=0, help="then N short requests per mode: memory after 100 and N"
  )
  v.add_argument(
    "--http",
    metavar="URL",
    help="measure a running python -m ssd_jax.serve at URL instead (its mode as --modes MODE; "
    "the same prompts and load points, over HTTP)",
  )
  v.add_argument("--api-key", help="with --http: the server's --api-key")
  _layout(v)
  f = _sub(sub, "forward")
  f.add_argument(
    "--models",
    nargs="+",
    default=["smollm2-135m", "smollm2-135m-draft"],
    help="default %(default)s",
  )
  f.add_argument(
    "--fills",
    type=int,
    nargs="+",
    default=[256, 1024, 4096],
    help="cache fills (default %(default)s)",
  )
  f.add_argument(
    "--new-tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="default %(default)s"
  )
  f.add_argument(
    "--branches", type=int, nargs="+", default=[8, 24], help="tree branches (default %(default)s)"
  )
  f.add_argument("--reps", type=int, default=12, help="default %(default)s")
  r = _sub(sub, "rounds")
  r.add_argument("--target", default="tiny-llama", help="default %(default)s")
  r.add_argument("--draft", default="tiny-llama-draft", help="default %(default)s")
  r.add_argument(
    "--modes", nargs="+", choices=MODES, default=list(MODES), help="default %(default)s"
  )
  r.add_argument(
    "--placements",
    nargs="+",
    choices=("device", "process"),
    default=["device", "process"],
    help="where ssd's draft runs; ar and sd run with the first (default %(default)s)",
  )
  r.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="default %(default)s")
  r.add_argument("--max-new-tokens", type=int, default=400, help="per row (default %(default)s)")
  r.add_argument("--repeats", type=int, default=3, help="runs kept best of (default %(default)s)")
  r.add_argument("--lookahead", type=int, default=3, help="default %(default)s")
  _lower_flags(_sub(sub, "lower"))
  d = _sub(sub, "device")
  d.add_argument(
    "--minutes", type=finite_float, default=8.0, help="the run's time limit (default %(default)s)"
  )
  d.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (the suite's)")
  return p


def _lower_flags(p) -> None:
  from ssd_jax.bench.shapes import PAIRS  # noqa: PLC0415 (imports JAX; no backend starts)

  p.add_argument("--pairs", nargs="+", choices=sorted(PAIRS), default=list(PAIRS))
  p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16], help="default %(default)s")
  p.add_argument("--impls", nargs="+", choices=["xla", "pallas"], default=["xla", "pallas"])
  p.add_argument("--platforms", nargs="+", choices=["cuda", "tpu"], default=["cuda", "tpu"])
  p.add_argument(
    "--capacity", type=int, default=8192, help="KV cache slots per row (default %(default)s)"
  )


def lower_command(args) -> int:
  """`lower`: on this host's CPU devices whatever accelerator it has (the meshes are virtual)."""
  import jax  # noqa: PLC0415

  jax.config.update("jax_platforms", "cpu")
  set_cpu_devices(4)
  from ssd_jax.bench import lower  # noqa: PLC0415

  if min(args.batch_sizes) < 1 or args.capacity < 1024:
    raise ValueError("--batch-sizes must be >= 1 and --capacity >= 1024 (the prompt bucket)")
  layouts = lower.matrix(args.pairs, args.batch_sizes, args.impls, args.capacity)
  result = lower.run(layouts, tuple(args.platforms))
  result["command"] = f"{PROG} " + " ".join(sys.argv[1:])
  args.out.mkdir(parents=True, exist_ok=True)
  path = args.out / "lower.json"
  path.write_text(json.dumps(result, indent=1))
  print(f"wrote {path}")
  return 1 if result["failed"] else 0


def parse_config(text: str):
  """`MODE[:DRAFT[:K[:F[:C]]]]` -> `ab.Config` (argparse type: a bad one is a usage error)."""
  from ssd_jax.bench.ab import Config  # noqa: PLC0415 (imports JAX; its backend starts later)

  mode, *rest = text.split(":")
  if mode not in MODES:
    raise argparse.ArgumentTypeError(f"{text!r}: the mode must be one of {', '.join(MODES)}")
  if mode == "ar":
    if rest:
      raise argparse.ArgumentTypeError(f"{text!r}: ar takes no draft, lookahead or fan-out")
    return Config("ar")
  limit = 4 if mode == "ssd" else 2
  if len(rest) > limit:
    raise argparse.ArgumentTypeError(
      f"{text!r}: {mode} takes at most {limit} fields after the mode "
      f"({'DRAFT:K:F:C' if mode == 'ssd' else 'DRAFT:K'})"
    )
  draft = (rest[0] if rest else "") or default_draft(DEFAULT_TARGET, mode)
  numbers = rest[1:] + [""] * (4 - len(rest))
  try:
    lookahead = int(numbers[0] or DEFAULT_LOOKAHEAD)
    fan_out = int(numbers[1] or DEFAULT_FAN_OUT) if mode == "ssd" else 0
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r}: K and F must be integers") from None
  if lookahead < 1 or (mode == "ssd" and fan_out < 1):
    raise argparse.ArgumentTypeError(f"{text!r}: K and F must be >= 1")
  try:  # C is checked where every SpecConfig is: its range is SpecConfig's to say
    config = Config(mode, draft, lookahead, fan_out, finite_float(numbers[2] or "1"))
    config.spec()
  except (argparse.ArgumentTypeError, ValueError) as e:
    raise argparse.ArgumentTypeError(f"{text!r}: C: {e}") from None
  return config


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
  if args.command == "ab":
    if args.passes < 1 or args.max_new_tokens < 1 or (args.num_prompts or 1) < 1:
      parser.error("--passes, --num-prompts and --max-new-tokens must be >= 1")
    if args.temperature < 0:
      parser.error("--temperature must be >= 0 (0 = greedy)")
    if len(set(args.configs)) != len(args.configs):
      parser.error("--configs lists a configuration twice")


def options(cls, args, **given):
  """A command's typed options from the parsed flags of the same names (lists as tuples)."""
  values = {}
  for field in dataclasses.fields(cls):
    if field.name in given:
      values[field.name] = given[field.name]
    elif hasattr(args, field.name):
      value = getattr(args, field.name)
      values[field.name] = tuple(value) if isinstance(value, list) else value
  return cls(**values)


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  check(args, parser)
  if args.command == "lower":
    try:
      return lower_command(args)
    except ValueError as e:
      parser.error(str(e))
  if args.command == "device":
    if args.minutes <= 0:
      parser.error("--minutes must be > 0")
    from ssd_jax.bench import device  # noqa: PLC0415

    return device.command(args)
  if getattr(args, "target_cores", None):
    pin_cores(args.target_cores)  # before JAX starts: sizes its thread pool
  layout = None
  if args.command in ("sweep", "ab", "serving"):
    try:
      # `serving --http` runs no model here: this process keeps every core.
      serving_ssd = "ssd" in getattr(args, "modes", ()) and not getattr(args, "http", None)
      ssd = {"sweep": True, "serving": serving_ssd}.get(
        args.command, any(c.mode == "ssd" for c in getattr(args, "configs", ()))
      )
      layout = apply_layout(resolve_layout(args.draft_placement, args.layout_cores, ssd=ssd))
    except ValueError as e:
      parser.error(str(e))
  set_cpu_devices(getattr(args, "target_devices", 1))
  args.out.mkdir(parents=True, exist_ok=True)
  # After the device set-up: these import JAX's programs.
  from ssd_jax.bench import ab, exchange, forward, rounds, serving, sweep  # noqa: PLC0415

  commands = {
    "sweep": (sweep.sweep, sweep.SweepOptions),
    "models": (sweep.model_speed, sweep.ModelSpeedOptions),
    "overlap": (sweep.measure_overlap, sweep.OverlapOptions),
    "forward": (forward.forward_costs, forward.ForwardOptions),
    "exchange": (exchange.exchange, exchange.ExchangeOptions),
    "ab": (ab.ab, ab.AbOptions),
    "serving": (serving.serving, serving.ServingOptions),
    "rounds": (rounds.rounds, rounds.RoundsOptions),
  }
  run, kind = commands[args.command]
  given = {} if layout is None else {"layout": layout}
  if args.command == "sweep":
    given["geometric"] = not args.no_geometric
  if args.command == "serving":
    given["static"] = not args.no_static and args.http is None
  try:
    config = options(kind, args, **given)
    if args.command == "sweep" and args.quick:
      config = dataclasses.replace(config, **sweep.QUICK_SWEEP)
    result = run(config)
  except (ValueError, FileNotFoundError) as e:
    parser.error(str(e))
  result["command"] = f"{PROG} " + " ".join(argv or sys.argv[1:])
  result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
  path = args.out / f"{args.command}.json"
  path.write_text(json.dumps(result, indent=1))
  print(f"wrote {path}")
  if args.command == "sweep":
    from ssd_jax.bench import report as report_lib  # noqa: PLC0415

    report = report_lib.write(result, args.out)
    print(f"wrote {report} and its plots")
  if args.command == "ab":
    print(result["table"])
  if args.command == "serving":
    print(f"wrote {serving.plot(result, args.out)}")
  return 0
