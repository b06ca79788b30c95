"""The command line of `python -m ssd_jax.serve`: run's model, speculation and layout flags, the
decoding defaults a request may override, and the server's own flags."""

from __future__ import annotations

import argparse
import dataclasses

from ssd_jax.cli import arguments
from ssd_jax.config import MODES
from ssd_jax.harness.config import RunConfig

PROG = "python -m ssd_jax.serve"

EXAMPLES = """examples:
  python -m ssd_jax.serve                                   # the embedded pair, ssd, port 8000
  python -m ssd_jax.serve --mode sd --port 8001 --max-batch-size 4
  python -m ssd_jax.serve --target tiny-llama --draft tiny-llama-draft   # random test models

A request's omitted sampling fields take --temperature, --top-k and --top-p; an omitted
max_tokens takes --max-new-tokens (less where the context has less room). The listening address
is printed once every program is compiled."""

# What run's configuration holds that a server has no flag for (it reads requests, not prompt
# sets): fixed values, so `arguments.run_config` checks the rest exactly as run's.
_FIXED = dict(
  prompts="bundled",
  num_prompts=None,
  batch_size=1,
  ignore_eos=False,
  no_chat_template=False,
  chat=False,
  metrics=False,
  json=None,
  all_cores=None,
  no_progress=True,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServeConfig:
  """The server's settings beside run's configuration (one mode).

  Attributes:
    run: the models, the mode, its speculation and layout, and the default sampling.
    host, port: where it listens (port 0: any free port, printed when ready).
    max_batch_size, max_queue, max_model_len: the session's slots, wait queue and context.
    api_key: the Bearer key every /v1 request must carry (None: none needed).
    served_model_name: the model's name in /v1/models and in requests (default: --target).
    seed: the default seed of requests without one (None: each draws its own).
  """

  run: RunConfig
  host: str = "127.0.0.1"
  port: int = 8000
  max_batch_size: int = 8
  max_queue: int = 64
  max_model_len: int | None = None
  api_key: str | None = None
  served_model_name: str | None = None
  seed: int | None = None

  @property
  def mode(self) -> str:
    return self.run.modes[0]

  @property
  def model_name(self) -> str:
    return self.served_model_name or self.run.models.target


def build_parser() -> arguments.Parser:
  p = arguments.Parser(
    prog=PROG,
    usage="%(prog)s [--mode ar|sd|ssd] [--target NAME] [--draft NAME] [--port N] [flags]",
    description="Serve the target through ar, sd or ssd with an OpenAI-compatible HTTP API.",
    epilog=EXAMPLES,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  g = p.add_argument_group("server")
  g.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
  g.add_argument(
    "--port", type=int, default=8000, help="port (default %(default)s; 0: any free one)"
  )
  g.add_argument(
    "--max-batch-size",
    type=int,
    default=8,
    metavar="B",
    help="slots: requests decoded together (default %(default)s)",
  )
  g.add_argument(
    "--max-queue",
    type=int,
    default=64,
    metavar="N",
    help="requests that may wait for a slot; beyond, 429 (default %(default)s)",
  )
  g.add_argument(
    "--max-model-len",
    type=int,
    metavar="N",
    help="positions per slot: prompt + max_tokens + lookahead + 1 must fit (default: the "
    "models' context, at most 2048)",
  )
  g.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 requests")
  g.add_argument("--served-model-name", metavar="NAME", help="the model's name (default --target)")
  d = p.add_argument_group("decoding (defaults of requests that omit them)")
  d.add_argument("--mode", choices=MODES, default="ssd", help="how to decode (default %(default)s)")
  d.add_argument(
    "--max-new-tokens",
    type=int,
    default=256,
    metavar="N",
    help="max_tokens when a request gives none (default %(default)s)",
  )
  d.add_argument(
    "--temperature",
    type=arguments.finite_float,
    default=1.0,
    metavar="T",
    help="0 = greedy (default %(default)s, OpenAI's)",
  )
  d.add_argument("--top-k", type=int, default=0, metavar="K", help="0 = off (default)")
  d.add_argument(
    "--top-p",
    type=arguments.finite_float,
    default=1.0,
    metavar="P",
    help="in (0, 1], 1 = off (default)",
  )
  d.add_argument("--seed", type=int, help="the seed of requests without one (default: random)")
  arguments.add_model_flags(p)
  p.set_defaults(**_FIXED)
  return p


def serve_config(args: argparse.Namespace) -> ServeConfig:
  """The parsed command line; ValueError names the flag to fix."""
  for flag in ("port", "max_batch_size", "max_queue", "max_model_len"):
    value = getattr(args, flag)
    low = 0 if flag in ("port", "max_queue") else 1
    if value is not None and value < low:
      raise ValueError(f"--{flag.replace('_', '-')} must be >= {low}, got {value}")
  seed = args.seed
  run = arguments.run_config(argparse.Namespace(**{**vars(args), "seed": seed or 0}))
  return ServeConfig(
    run=run,
    host=args.host,
    port=args.port,
    max_batch_size=args.max_batch_size,
    max_queue=args.max_queue,
    max_model_len=args.max_model_len,
    api_key=args.api_key,
    served_model_name=args.served_model_name,
    seed=seed,
  )
