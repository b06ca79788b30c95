"""The channel between the target's process and a speculator in another process (or host).

Two layers, both small:

  Connection  control messages: one JSON object per line over a TCP socket (loopback unless
              the user names another address). Receiving never hangs: it polls with a short
              timeout and asks `alive()` (is the peer process still there?) between polls. A
              line longer than its limit, or one that is not a JSON object, ends the connection.
  Pipe        the arrays of a message (a flat dict of arrays), moved by an existing engine:
              SharedMemoryPipe  `multiprocessing.shared_memory`, one host: the arrays are
                                copied into a segment the peer maps (the fastest here);
              TransferPipe      `jax.experimental.transfer`: device buffers pulled by the
                                peer's JAX runtime, across hosts too.
              A pipe turns arrays into a JSON header (sent on the Connection with the message)
              and a header back into arrays.

What crosses per SSD round is small: the verification outcome (`Outcome`: three ints and a flag
per row, in one array) one way; the other way the next speculation (tokens, and q when
sampling, plus hit and point-mass flags), and in greedy runs each expansion's cache (keys,
depths and tokens of every branch), so that the target serves hits itself and waits only on
misses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import select
import socket
import time
import weakref
from collections.abc import Callable
from multiprocessing import resource_tracker, shared_memory
from typing import Any

import jax
import numpy as np

from ssd_jax.decode.state import Outcome, Speculation

# The hello's version: both ends must speak the same (3: the token handshake; 4: sessions).
PROTOCOL = 4

# The longest control message: the largest real one is a start or a load request naming an
# explicit head (a token id list), far below this; a peer that sends more is not this protocol.
MESSAGE_LIMIT = 1 << 20

# The arrays of each round's messages, by name: an outcome, a speculation (fields that are None
# are not sent) and, in greedy runs, an expansion's cache.
OUTCOME_FIELDS = tuple(f.name for f in dataclasses.fields(Outcome))
SPECULATION_FIELDS = tuple(f.name for f in dataclasses.fields(Speculation))
CACHE_FIELDS = ("keys", "depth", "tokens", "valid")


class ChannelError(RuntimeError):
  """The peer is gone, timed out or broke the protocol; the message says which."""


class RefusedError(ChannelError):
  """The peer was not let in (or would not let this side in): the message says why and what to
  do. Sent as a `refused` message, received as this error."""


class Connection:
  """JSON-lines messages over a connected socket."""

  def __init__(self, sock: socket.socket, alive: Callable[[], str | None] = lambda: None):
    """`alive()` returns None while the peer lives, else why it is gone (checked while waiting)."""
    self.sock, self.alive = sock, alive
    self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    self._buffer = b""
    self.session_open = False  # a speculator serves one session at a time (`RemoteSpeculator`)

  def send(self, message: dict[str, Any]) -> None:
    try:
      self.sock.sendall(json.dumps(message).encode() + b"\n")
    except OSError as e:
      raise ChannelError(f"cannot send to the peer ({e}); {self.alive() or 'it closed'}") from e

  def receive(
    self, timeout: float | None = None, spin: float = 0.0, limit: int = MESSAGE_LIMIT
  ) -> dict[str, Any]:
    """The next message; raises ChannelError when the peer closes, dies, sends something that is
    not a JSON object on a line of at most `limit` bytes, or `timeout` passes (also while a
    message trickles in: a peer cannot hold a receiver by sending a byte now and then).

    `spin`: seconds to poll before sleeping in `select`, for an answer due within milliseconds
    on a core with nothing else to do, which then stays awake: in alternating sd / ssd pairs
    on a 2-vCPU guest, ssd / sd measured 0.95-0.96 sleeping and 0.99 polling (noisy).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    spin_until = time.monotonic() + spin
    while b"\n" not in self._buffer:
      if len(self._buffer) > limit:
        raise ChannelError(f"the peer sent a line longer than {limit} bytes: not this protocol")
      if deadline is not None and time.monotonic() > deadline:  # a peer that died says so first
        raise ChannelError(self.alive() or f"no answer from the peer within {timeout:.0f} s")
      polling = time.monotonic() < spin_until
      ready, _, _ = select.select([self.sock], [], [], 0.0 if polling else 0.5)
      if not ready and polling:
        continue
      if not ready:
        if (why := self.alive()) is not None:
          raise ChannelError(why)
        continue
      try:
        chunk = self.sock.recv(1 << 16)
      except OSError as e:  # reset by a peer that died
        raise ChannelError(self._why_closed(f"the connection broke ({e})")) from None
      if not chunk:
        raise ChannelError(self._why_closed("the peer closed the connection"))
      self._buffer += chunk
    line, self._buffer = self._buffer.split(b"\n", 1)
    if len(line) > limit:
      raise ChannelError(f"the peer sent a line longer than {limit} bytes: not this protocol")
    message = _parse(line)
    if message.get("op") == "error":
      raise ChannelError(f"the peer failed: {message.get('message')}")
    if message.get("op") == "refused":
      raise RefusedError(str(message.get("message")))
    return message

  def _why_closed(self, default: str) -> str:
    """The peer's own account if it exited (a dying process closes its socket just before
    it can be seen to have exited: wait a moment for that)."""
    for _ in range(20):
      if (why := self.alive()) is not None:
        return why
      time.sleep(0.05)
    return default

  def close(self) -> None:
    self.sock.close()


def _parse(line: bytes) -> dict[str, Any]:
  try:
    message = json.loads(line)
  except ValueError:  # invalid JSON or UTF-8
    raise ChannelError(f"the peer sent something that is not JSON: {line[:60]!r}") from None
  if not isinstance(message, dict):
    raise ChannelError(f"the peer sent JSON that is not an object: {line[:60]!r}")
  return message


def keep_alive(sock: socket.socket, idle: int = 30, interval: int = 10, probes: int = 3) -> None:
  """Have the kernel probe an idle connection, so that a peer whose host vanished without
  closing it (a network cut) breaks it within about `idle + interval * probes` seconds instead
  of holding this side for ever."""
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
  for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval), ("TCP_KEEPCNT", probes)):
    if hasattr(socket, name):  # Linux names; elsewhere the system's defaults apply
      sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


class SharedMemoryPipe:
  """Arrays through shared memory segments on one host.

  Each side writes a kind of message (`slot`) into a segment of its own (grown when a message
  does not fit), and writes that kind again only once the peer has copied the last one out
  (the peer answers it, or a later message, first), so nothing is overwritten while it is read:
  a speculator's answers and its expansions' caches, sent back to back, go through two
  segments; a target's outcomes and joins too (a round served on the target's side waits for
  no answer, and a boundary's joins may follow it at once).

  The segments belong to the connection, not to a process: whichever side closes its pipe
  first unlinks all of them, its own and those it mapped of its peer's. A side whose peer was
  killed (SIGKILL runs no cleanup) so still leaves nothing behind. For the same reason neither
  side's resource tracker knows them: a killed process's tracker would unlink segments its peer
  still reads and warn about "leaked shared_memory objects" after the error that says what
  happened.
  """

  def __init__(self):
    self._out: dict[str, shared_memory.SharedMemory] = {}
    self._mapped: dict[str, shared_memory.SharedMemory] = {}
    _OPEN.add(self)

  def pack(self, arrays: dict[str, Any], slot: str = "") -> dict[str, Any]:
    host = {k: np.ascontiguousarray(_on_host(v)) for k, v in arrays.items()}
    size = sum(a.nbytes for a in host.values())
    out = self._out.get(slot)
    if out is None or out.size < size:
      old = self._out.pop(slot, None)
      if old is not None:
        _unlink(old)
      out = self._out[slot] = _untracked(
        shared_memory.SharedMemory(create=True, size=max(size, 1 << 16) * 2)
      )
    fields, offset = [], 0
    for name, a in host.items():
      np.ndarray(a.shape, a.dtype, out.buf, offset)[...] = a
      fields.append([name, a.dtype.str, list(a.shape), offset])
      offset += a.nbytes
    return {"segment": out.name, "fields": fields}

  def unpack(self, header: dict[str, Any]) -> dict[str, np.ndarray]:
    segment = self._mapped.get(header["segment"])
    if segment is None:
      segment = self._mapped[header["segment"]] = _untracked(
        shared_memory.SharedMemory(name=header["segment"])
      )
    return {
      name: np.array(np.ndarray(shape, np.dtype(dtype), segment.buf, offset))  # a copy
      for name, dtype, shape, offset in header["fields"]
    }

  def close(self) -> None:
    for segment in (*self._out.values(), *self._mapped.values()):
      _unlink(segment)
    self._out.clear()
    self._mapped.clear()
    _OPEN.discard(self)


# The pipes of this process not closed yet: a process that must exit at once (its parent is
# gone: `process.exit_with_parent`, which skips every cleanup) unlinks their segments first.
_OPEN: weakref.WeakSet[SharedMemoryPipe] = weakref.WeakSet()


def unlink_open_segments() -> None:
  """Unlink every segment of this process's open pipes (for an exit that runs no cleanup)."""
  for pipe in list(_OPEN):
    with contextlib.suppress(Exception):  # exiting anyway: the rest still go
      pipe.close()


def _untracked(segment: shared_memory.SharedMemory) -> shared_memory.SharedMemory:
  # Python < 3.13 registers every segment it creates or maps with the process's resource
  # tracker (3.13 adds `track=False`); the connection unlinks them instead (see above).
  resource_tracker.unregister(segment._name, "shared_memory")
  return segment


def _unlink(segment: shared_memory.SharedMemory) -> None:
  """Unmaps `segment` and removes its name, unless the peer removed it first."""
  segment.close()
  # `unlink` tells the tracker to forget the name: register it first so the two balance.
  resource_tracker.register(segment._name, "shared_memory")
  try:
    segment.unlink()
  except FileNotFoundError:  # the peer closed first
    resource_tracker.unregister(segment._name, "shared_memory")


class TransferPipe:
  """Arrays pulled by the peer's JAX runtime (`jax.experimental.transfer`), device to device,
  across hosts as well: the sender offers its arrays under a fresh id, the receiver pulls them
  onto its device. Needs no `jax.distributed`; this side's server listens on `host` (the
  address of the control connection here, so the peer can reach it), port chosen freely."""

  def __init__(self, device: jax.Device, host: str = "127.0.0.1"):
    from jax.experimental import transfer  # noqa: PLC0415 (only this pipe needs it)

    self.device = device
    host = f"[{host}]" if ":" in host else host  # an IPv6 address
    self.server = transfer.start_transfer_server(device.client, f"{host}:0", [f"{host}:0"])
    self.address = self.server.address()
    self._peer = None
    self._ids = itertools.count(1)

  def connect(self, address: str) -> None:
    self._peer = self.server.connect(address)

  def pack(self, arrays: dict[str, Any], slot: str = "") -> dict[str, Any]:
    del slot  # every message is pulled under an id of its own
    placed = {k: jax.device_put(v, self.device) for k, v in arrays.items()}
    uuid = next(self._ids)  # the peer pulls it from this side's server: unique here
    self.server.await_pull(uuid, list(placed.values()))
    fields = [[k, np.dtype(v.dtype).str, list(v.shape)] for k, v in placed.items()]
    return {"uuid": uuid, "fields": fields}

  def unpack(self, header: dict[str, Any]) -> dict[str, jax.Array]:
    sharding = jax.sharding.SingleDeviceSharding(self.device)
    specs = [
      jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype), sharding=sharding)
      for _, dtype, shape in header["fields"]
    ]
    arrays = self._peer.pull(header["uuid"], specs)
    return {name: a for (name, _, _), a in zip(header["fields"], arrays, strict=True)}

  def close(self) -> None:
    self._peer = None


def _on_host(x) -> np.ndarray:
  """A host copy of a device array; host arrays as they are (no device read)."""
  return x if isinstance(x, np.ndarray) else jax.device_get(x)


Pipe = SharedMemoryPipe | TransferPipe
