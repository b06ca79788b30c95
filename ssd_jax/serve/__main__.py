"""python -m ssd_jax.serve: an OpenAI-compatible HTTP server on a continuous batch.

Loads the models as `python -m ssd_jax.run` does (the same flags and CPU layout: in ssd, the
speculator process on a core of its own), compiles every program the session may run, and only
then listens and says where. SIGINT or SIGTERM: new requests are refused, open streams end with
an error chunk, uvicorn closes its connections, then the session and the speculator stop.
"""

from __future__ import annotations

import contextlib
import socket
import sys

import uvicorn

from ssd_jax.harness.engines import build_engines, layout_of
from ssd_jax.serve import cli
from ssd_jax.serve.app import Served, create_app
from ssd_jax.serve.metrics import ServerMetrics
from ssd_jax.serve.runner import Runner
from ssd_jax.serve.server import Server
from ssd_jax.speculator.layout import apply_layout, set_cpu_devices
from ssd_jax.timing import count_compiles


def _say(text: str) -> None:
  print(f"{cli.PROG}: {text}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
  parser = cli.build_parser()
  args = parser.parse_args(argv)
  try:
    config = cli.serve_config(args)
    layout = layout_of(config.run)
  except ValueError as e:
    parser.error(str(e))
  layout = apply_layout(layout)  # pins this process before JAX starts
  set_cpu_devices(config.run.layout.target_devices, config.run.layout.draft_devices)
  with contextlib.ExitStack() as stack:  # stops the session and the speculator however it ends
    _say(f"loading {config.run.models.target} ({config.mode}); compiling takes a while")
    try:
      engine = build_engines(config.run, layout, stack)[config.mode]
      session = engine.session(
        config.run.spec(config.mode),
        max_batch_size=config.max_batch_size,
        max_model_len=config.max_model_len,
        max_queue=config.max_queue,
      )
    except (ValueError, FileNotFoundError) as e:
      parser.error(str(e))
    stack.callback(_close, session, engine)
    return _serve(config, engine, session, stack)
  return 0


def _close(session, engine) -> None:
  """Stop the session's thread and the draft side; a speculator that cannot say goodbye (it
  died) is stopped by the engine."""
  try:
    session.close()
  except Exception as e:  # the engine stops what is left
    _say(f"closing the session: {type(e).__name__}: {e}")
  engine.close()


def _serve(config: cli.ServeConfig, engine, session, stack: contextlib.ExitStack) -> int:
  # The HTTP stack is imported only here: the inference packages never need it.
  seconds = session.warm_up()
  compiles = stack.enter_context(count_compiles())
  session.start()
  metrics = ServerMetrics(session, compiles)
  # ar and sd draft (if at all) in this process: only ssd has a speculator process to watch.
  runner = Runner(session, metrics, engine.site.gone if config.mode == "ssd" else _none)
  d = config.run.decoding
  target = engine.target
  served = Served(
    name=config.model_name,
    tokenizer=target.tokenizer,
    eos_ids=tuple(target.config.eos_token_ids),
    max_model_len=session.max_model_len,
    lookahead=session.lookahead,
    sampling=d.sampling,
    max_new_tokens=d.max_new_tokens,
    seed=config.seed,
    api_key=config.api_key,
  )
  app = create_app(runner, served, metrics)
  # A bound on uvicorn's wait for connections to close after a signal (the streams end at once).
  server = Server(
    uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5, lifespan="off"), runner
  )
  sock = socket.create_server((config.host, config.port))
  host, port = sock.getsockname()[:2]
  _say(
    f"compiled in {seconds:.0f} s; serving {served.name} ({config.mode}, "
    f"{session.buckets[-1]} slots, max_model_len {session.max_model_len}) on "
    f"http://{host}:{port}/v1"
  )
  server.run_until_signal([sock])
  _say("stopped")
  return 0


def _none() -> None:
  """No speculator process to watch (the session's own errors say what failed)."""


if __name__ == "__main__":
  sys.exit(main())
