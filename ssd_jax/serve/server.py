"""uvicorn's server, told to end open streams when asked to stop."""

from __future__ import annotations

import asyncio
import contextlib
import signal

import uvicorn

from ssd_jax.serve.runner import Runner

SHUTDOWN = "the server is shutting down"


class Server(uvicorn.Server):
  """The first SIGINT or SIGTERM also ends the open streams with an error chunk and refuses
  new requests (uvicorn alone would wait for the streams to finish)."""

  def __init__(self, config: uvicorn.Config, runner: Runner):
    super().__init__(config)
    self.runner = runner

  def handle_exit(self, sig, frame) -> None:
    with contextlib.suppress(RuntimeError):  # no loop runs: nothing is open
      loop = asyncio.get_running_loop()
      loop.call_soon_threadsafe(self.runner.abort, SHUTDOWN)
    super().handle_exit(sig, frame)

  def run_until_signal(self, sockets) -> None:
    """Serve until a signal; return (not die) after it, so that the caller stops the session and
    the speculator. uvicorn raises the signal again once it has stopped, to the handlers it
    found: these ones only note it."""
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
      self.run(sockets=sockets)
    finally:
      for s, handler in previous.items():
        signal.signal(s, handler)
