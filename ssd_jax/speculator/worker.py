"""A speculator process's side of the channel: the handshake (`handshake.admit`: the target
proves the token and names a draft served here), the draft loaded, then the target's calls
answered by a `LocalSpeculator` on this process's device.

  open     a session: its plans (per batch size, greedy or sampled), an empty batch
  warm     compile the between-rounds programs at every shape (the session's warm-up)
  reshape  a boundary between rounds: rows moved to another batch size, requests joined (their
           prompts prefilled, their first proposals drafted now), the plan's variant; answered
           with the pending speculation; then its expansion dispatched
  next     lookup for the outcome (a hit, or the backup), sent; then its expansion dispatched
           (greedy rounds: the speculation is sent only when some row missed, and each
           expansion's cache is sent once computed: the target serves every-row hits itself)
  stop     the session is over;  bye: the target is done with this speculator

Every answer crosses on the pipe; expansions run while the target verifies what was just sent.
Other operations (the benchmarks' probes, say) are not part of the protocol: a module registers
them with `register`, and a speculator runs them only when started with that module
(`python -m ssd_jax.speculator --extension MODULE`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ssd_jax import sharding
from ssd_jax.decode.plan import DraftPlan
from ssd_jax.decode.state import Outcome, Speculation
from ssd_jax.models.registry import load_model
from ssd_jax.models.transformer import Params
from ssd_jax.models.weights import config_to_hf
from ssd_jax.speculator import handshake
from ssd_jax.speculator.auth import Drafts
from ssd_jax.speculator.base import Reshape, joins_of
from ssd_jax.speculator.channel import (
  CACHE_FIELDS,
  OUTCOME_FIELDS,
  SPECULATION_FIELDS,
  Connection,
  Pipe,
  SharedMemoryPipe,
  TransferPipe,
  keep_alive,
)
from ssd_jax.speculator.local import LocalSpeculator, draft_params, head_size
from ssd_jax.timing import NullTimer, count_compiles

# An operation beside the protocol's: handler(message, conn, pipe) answers on conn (arrays on
# pipe). Registered by the module that uses it, imported at start-up (`--extension`).
Handler = Callable[[dict[str, Any], Connection, Pipe], None]
_EXTENSIONS: dict[str, Handler] = {}
_PROTOCOL_OPS = ("open", "warm", "reshape", "next", "stop", "bye")


def register(op: str, handler: Handler) -> None:
  """Make this speculator answer `op` with `handler` (see Handler)."""
  if op in _PROTOCOL_OPS:
    raise ValueError(f"{op!r} is an operation of the protocol itself")
  _EXTENSIONS[op] = handler


def serve(conn: Connection, pipe: Pipe, params: Params, mesh, config) -> None:
  """Answer one target's calls (see remote.RemoteSpeculator) until it says bye.

  After answering `first` or `next` it dispatches the expansion of the speculation just sent:
  it runs while the target verifies that speculation, and the next `next` finds its cache.
  """
  with count_compiles() as compiles:
    _Session(conn, pipe, params, mesh, config, compiles).run()


class _Session:
  """One target's run after run, until bye."""

  def __init__(self, conn, pipe, params, mesh, config, compiles: list[str]):
    self.conn, self.pipe, self.params, self.mesh, self.config = conn, pipe, params, mesh, config
    self.compiles, self.compiled_before = compiles, 0
    self.speculator: LocalSpeculator | None = None

  def run(self) -> None:
    while True:
      message = self.conn.receive()
      op = message.get("op")
      if op == "bye":
        return
      if op in _EXTENSIONS:
        _EXTENSIONS[op](message, self.conn, self.pipe)
      elif op in _PROTOCOL_OPS:
        getattr(self, f"_{op}")(message)
      else:
        raise ValueError(f"unknown request {op!r}")

  def _answer(self, op: str, speculation: Speculation) -> None:
    fields = {f: getattr(speculation, f) for f in SPECULATION_FIELDS}
    arrays = self.pipe.pack({k: v for k, v in fields.items() if v is not None}, slot="speculation")
    self.conn.send({"op": op, "arrays": arrays})

  def _expand(self) -> None:
    """Dispatch the expansion of the speculation just sent; in greedy rounds, send its cache
    once computed (the target reads it after its verification, which runs meanwhile)."""
    cache = self.speculator.expand()
    if self.speculator.plan.greedy:
      fields = {f: getattr(cache, f) for f in CACHE_FIELDS}
      self.conn.send({"op": "cache", "arrays": self.pipe.pack(fields, slot="cache")})

  def _open(self, message) -> None:
    self.compiled_before = len(self.compiles)
    plans = {
      (b, greedy): DraftPlan.from_json(fields, self.config)
      for b, greedy, fields in message["plans"]
    }
    self.speculator = LocalSpeculator(self.params, self.mesh, plans, NullTimer())
    self.speculator.open(message["batch_size"], message["capacity"])
    self.conn.send({"op": "opened"})

  def _warm(self, message) -> None:
    self.speculator.warm_up(tuple(message["buckets"]), tuple(message["prompt_buckets"]))
    self.compiled_before = len(self.compiles)  # what `stop` reports counts from here
    self.conn.send({"op": "warmed"})

  def _reshape(self, message) -> None:
    index = message.get("index")
    change = Reshape(
      index=None if index is None else np.asarray(index, np.int32),
      free=None if index is None else np.asarray(message["free"], bool),
      joins=joins_of(self.pipe.unpack(message["arrays"])) if "arrays" in message else (),
      greedy=message["greedy"],
      bulk=message["bulk"],
    )
    self._answer("reshaped", self.speculator.reshape(change))
    self._expand()  # (again: the rows changed since the last expansion)

  def _next(self, message) -> None:
    a = self.pipe.unpack(message["arrays"])
    speculation = self.speculator.lookup(Outcome(**{f: a[f] for f in OUTCOME_FIELDS}))
    # Greedy: where every row hit, the target has served this speculation from the cache.
    if not (self.speculator.plan.greedy and np.asarray(speculation.hit).all()):
      self._answer("speculation", speculation)
    self._expand()

  def _stop(self, message) -> None:  # answered with the compilations since open (or warm-up)
    if self.speculator is not None:
      self.speculator.close()
    self.speculator = None
    self.conn.send({"op": "stopped", "compiles": len(self.compiles) - self.compiled_before})


def accept(sock, token: str | None, drafts: Drafts) -> tuple[Connection, handshake.Request]:
  """The handshake on a new connection (`handshake.admit`): the connection and what its target
  asked for, once admitted; else the socket is closed and RefusedError or ChannelError raised."""
  # A peer that stops reading cannot hold a send of the handshake either.
  sock.settimeout(handshake.HANDSHAKE_SECONDS)
  conn = Connection(sock)
  try:
    request = handshake.admit(conn, token, drafts, peer=sock.getpeername()[0])
  except BaseException:
    conn.close()
    raise
  sock.settimeout(None)  # an admitted target's calls come when its run needs them
  keep_alive(sock)
  return conn, request


def serve_request(conn: Connection, request: handshake.Request) -> None:
  """The rest of a speculator's life with an admitted target: load the draft it asked for, place
  it on this process's first device, start the pipe, answer `ready`, then `serve`. Any failure is
  sent to the target as an error message before it is raised here."""
  pipe = None
  try:
    draft = load_model(request.draft, dtype=jnp.dtype(request.dtype))
    device = jax.devices()[0]
    mesh = sharding.mesh_of([device])
    params = draft_params(draft, mesh, request.draft_vocab)
    here = conn.sock.getsockname()[0]  # where the target reaches this host
    pipe = TransferPipe(device, here) if request.pipe == "transfer" else SharedMemoryPipe()
    ready = {
      "op": "ready",
      "pid": os.getpid(),
      "config": config_to_hf(draft.config),
      "head_size": head_size(params, draft.config),
    }
    if isinstance(pipe, TransferPipe):
      pipe.connect(request.transfer_address)  # checked: on the target's own host
      ready["transfer_address"] = pipe.address
    conn.send(ready)
    serve(conn, pipe, params, mesh, draft.config)
  except Exception as e:
    with contextlib.suppress(Exception):
      conn.send({"op": "error", "message": f"{type(e).__name__}: {e}"})
    raise
  finally:
    if pipe is not None:
      pipe.close()
    conn.close()


def serve_connection(sock, token: str | None, drafts: Drafts) -> None:
  """A speculator's whole life with one target: `accept`, then `serve_request`."""
  serve_request(*accept(sock, token, drafts))
