"""A speculator in a process of its own: starting it, talking to it, stopping it.

`SpeculatorProcess` starts one (a child of this process, pinned to its own cores before JAX
starts there, given a fresh token and its one draft) or connects to one another host runs
(`python -m ssd_jax.speculator --listen`), proves the token both ways (`handshake.py`), loads
the draft there from the same name or path, and stops it. It never leaves a process
behind: the engine closes it (also on exceptions and at interpreter exit), and the child exits
by itself once this process is gone. A speculator that dies gives a ChannelError naming its exit
status and the end of its log within a second, never a hang.

`ProcessSite` is the `base.Site` of an engine whose ssd runs there: it starts the process on
first use and hands out one `remote.RemoteSpeculator` per run.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import jax
import numpy as np

from ssd_jax.decode.plan import DraftPlan
from ssd_jax.models.registry import LoadedModel
from ssd_jax.speculator import auth, handshake, layout
from ssd_jax.speculator.base import Placement, PlanKey
from ssd_jax.speculator.channel import (
  ChannelError,
  Connection,
  RefusedError,
  SharedMemoryPipe,
  TransferPipe,
  unlink_open_segments,
)
from ssd_jax.speculator.remote import RemoteSpeculator
from ssd_jax.timing import Timer

LOAD_TIMEOUT = 900.0  # seconds for the speculator to start and load its draft
REQUEST_TIMEOUT = 120.0  # seconds for an extension's answer


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpeculatorOptions:
  """How to run the draft side in a process of its own.

  Attributes:
    draft: the draft's registry name or path, loaded by the speculator itself.
    dtype: its params' dtype ("float32", "float16" or "bfloat16").
    draft_vocab: restrict its head (as `Engine(draft_vocab=)`), or None.
    attention_impl: the tree-attention implementation there.
    cores: CPU cores the child is pinned to (None: not pinned).
    address: "host:port" of a speculator another host runs; None starts a child here.
    pipe: "shm" (shared memory, one host) or "transfer" (`jax.experimental.transfer`).
    extensions: modules the child imports at start-up to register operations of their own
      (`worker.register`; the benchmarks' probes), beside the protocol's.
    token: the secret of the speculator at `address` (None: it has none); a child gets a fresh
      one of its own.
  """

  draft: str
  dtype: str = "float32"
  draft_vocab: int | tuple[int, ...] | None = None
  attention_impl: str = "xla"
  cores: tuple[int, ...] | None = None
  address: str | None = None
  pipe: str = "shm"
  extensions: tuple[str, ...] = ()
  token: str | None = dataclasses.field(default=None, repr=False)  # a secret: not in logs


class SpeculatorProcess:
  """One speculator and the connection to it (see the module docstring)."""

  def __init__(self, options: SpeculatorOptions, device: jax.Device):
    self.options, self.device = options, device
    self.process: subprocess.Popen | None = None
    self.log: Path | None = None
    # A child gets a fresh secret: no other process on this host can pose as it, or drive it.
    self.token = options.token if options.address else auth.new_token()
    self.where = f"the speculator at {options.address}" if options.address else "the speculator"
    t0 = time.perf_counter()
    sock = self._connect() if options.address else self._spawn()
    self.conn = Connection(sock, alive=self.gone)
    try:
      handshake.introduce(self.conn, self.token, self.where)
      # The transfer server listens where the peer reaches this host: the connection's address.
      here = sock.getsockname()[0]
      self.pipe = TransferPipe(device, here) if options.pipe == "transfer" else SharedMemoryPipe()
      t1 = time.perf_counter()
      ready = self._load(peer=sock.getpeername()[0])
    except BaseException as e:  # a failed start (a Ctrl-C too) leaves no process, segment or log
      if isinstance(e, RefusedError):  # nothing to say goodbye to: hang up
        self.conn.close()
      self.close()
      raise
    self.startup = {"spawn_seconds": t1 - t0, "load_seconds": time.perf_counter() - t1}
    self.pid, self.head_size = ready["pid"], ready["head_size"]
    self._finalizer = weakref.finalize(self, _stop, self.process, self.conn, self.pipe, self.log)
    atexit.register(self._finalizer)

  def _spawn(self) -> socket.socket:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    cmd = [sys.executable, "-m", "ssd_jax.speculator", "--connect", f"127.0.0.1:{port}"]
    cmd += ["--draft", self.options.draft, "--parent", str(os.getpid())]
    for module in self.options.extensions:
      cmd += ["--extension", module]
    if self.options.cores:
      cmd += ["--cores", ",".join(map(str, self.options.cores))]
    fd, log = tempfile.mkstemp(prefix="ssd_jax-speculator-", suffix=".log")
    self.log = Path(log)
    cmd += ["--log", log]  # removed by the child if this process dies before it can
    # A session of its own: a Ctrl-C reaches this process, which then stops the speculator.
    # The token goes in the environment, which only this user can read; `ps` shows a command line.
    env = os.environ | {auth.TOKEN_ENV: self.token}
    self.process = subprocess.Popen(
      cmd, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, start_new_session=True, env=env
    )
    os.close(fd)
    listener.settimeout(0.5)
    deadline = time.monotonic() + LOAD_TIMEOUT
    try:
      while True:
        try:
          sock, _ = listener.accept()
          return sock
        except TimeoutError:
          if (why := self.gone()) is not None or time.monotonic() > deadline:
            raise ChannelError(why or "the speculator did not connect in time") from None
    except BaseException:
      # Not connected (it failed, or a Ctrl-C came while it started): nothing can say goodbye
      # to it, and left alone it would find the listener closed and die keeping its log.
      self.process.kill()
      self.close()
      raise
    finally:
      listener.close()

  def _connect(self) -> socket.socket:
    host, _, port = self.options.address.rpartition(":")
    try:
      return socket.create_connection((host, int(port)), timeout=30)
    except (OSError, ValueError) as e:
      raise ChannelError(
        f"cannot reach a speculator at {self.options.address} ({e}); start one there with "
        "python -m ssd_jax.speculator --listen HOST:PORT --draft NAME"
      ) from e

  def _load(self, peer: str) -> dict[str, Any]:
    """Ask the admitted speculator for the draft; its ready (the pipe connected). `peer`: the
    speculator's host as this connection sees it."""
    o = self.options
    load = {
      "draft": o.draft,
      "dtype": o.dtype,
      "draft_vocab": list(o.draft_vocab) if isinstance(o.draft_vocab, tuple) else o.draft_vocab,
      "attention_impl": o.attention_impl,
      "pipe": o.pipe,
    }
    if isinstance(self.pipe, TransferPipe):
      load["transfer_address"] = self.pipe.address
    ready = handshake.load(self.conn, load, self.where, LOAD_TIMEOUT)
    if isinstance(self.pipe, TransferPipe):
      try:
        handshake.check_transfer_address(ready.get("transfer_address"), peer, self.where)
      except ValueError as e:
        raise RefusedError(str(e)) from None
      self.pipe.connect(ready["transfer_address"])
    return ready

  def gone(self) -> str | None:
    """None while the speculator runs; else what happened to it (exit status, end of its log)."""
    if self.process is None or self.process.poll() is None:
      return None
    tail = ""
    if self.log is not None and self.log.exists():
      lines = self.log.read_text(errors="replace").strip().splitlines()[-12:]
      tail = "; its last output:\n" + "\n".join(lines) if lines else ""
    code = self.process.returncode
    how = f"exited with status {code}"
    if code < 0:  # Popen's way of saying a signal ended it
      with contextlib.suppress(ValueError):
        how = f"was killed by {signal.Signals(-code).name} (exit status {code})"
    return f"the speculator (pid {self.process.pid}) {how}{tail}"

  def request(self, message: dict[str, Any], arrays: dict[str, Any] | None = None):
    """Send an extension's operation (see `worker.register`) and return its answer: the message
    and its arrays (host arrays with shared memory, device ones with the transfer pipe)."""
    if arrays is not None:
      message = message | {"arrays": self.pipe.pack(arrays)}
    self.conn.send(message)
    answer = self.conn.receive(timeout=REQUEST_TIMEOUT)
    return answer, self.pipe.unpack(answer["arrays"]) if "arrays" in answer else {}

  def close(self) -> None:
    """Stop the speculator (politely, then by force) and release the channel."""
    finalizer = getattr(self, "_finalizer", None)
    if finalizer is not None:
      finalizer()
      atexit.unregister(finalizer)
    else:
      _stop(self.process, getattr(self, "conn", None), getattr(self, "pipe", None), self.log)


def _stop(process, conn, pipe, log) -> None:
  # An exit stack runs every step even when one before it raised (`weakref.finalize` would
  # swallow the error, and a skipped step leaves a process, a segment or the log behind).
  # Callbacks run last-in first-out: goodbye, reap, pipe, log.
  with contextlib.ExitStack() as steps:
    if log is not None:
      steps.callback(log.unlink, missing_ok=True)
    if pipe is not None:
      steps.callback(pipe.close)
    if process is not None:
      steps.callback(_reap, process)
    if conn is not None:
      steps.callback(_goodbye, conn)


def _goodbye(conn: Connection) -> None:
  with contextlib.suppress(ChannelError):
    conn.send({"op": "bye"})
  conn.close()


def _reap(process: subprocess.Popen) -> None:
  try:
    process.wait(timeout=5)
  except subprocess.TimeoutExpired:
    process.kill()
    process.wait()


class ProcessSite:
  """An engine's speculator process (`base.Site`): started, and its draft loaded, on first use."""

  def __init__(self, options: SpeculatorOptions, device: jax.Device, head_size: int):
    self.options, self.device, self.head_size = options, device, head_size
    self._process: SpeculatorProcess | None = None

  def process(self) -> SpeculatorProcess:
    """The running speculator process, started now if it is not yet."""
    if self._process is None:
      self._process = SpeculatorProcess(self.options, self.device)
      if self._process.head_size not in (None, self.head_size):
        self.close()
        raise ValueError("the speculator's draft head differs from this engine's")
    return self._process

  def start(self) -> None:
    self.process()

  def speculator(self, plans: dict[PlanKey, DraftPlan], timer: Timer) -> RemoteSpeculator:
    link = self.process()
    return RemoteSpeculator(link.conn, link.pipe, plans, timer)

  @property
  def startup(self) -> dict[str, float] | None:
    return None if self._process is None else self._process.startup

  def gone(self) -> str | None:
    return None if self._process is None else self._process.gone()

  @property
  def child_pid(self) -> int | None:
    """The speculator's pid where it is a child of this process (None: not started, or a
    remote one, whose memory is its host's)."""
    child = None if self._process is None else self._process.process
    return None if child is None else child.pid

  def close(self) -> None:
    if self._process is not None:
      self._process.close()
      self._process = None


def options_for(
  draft: LoadedModel, draft_vocab, attention_impl: str, placement: Placement
) -> SpeculatorOptions:
  """What a speculator process is asked to run: the same draft, head and attention impl."""
  if draft.source is None:
    raise ValueError(
      f"draft {draft.name!r} was not loaded by name or path (load_model), so a speculator "
      "process cannot load it too: save it (models.weights.save_hf) and load it from there"
    )
  cores = placement.cores
  if placement.address is None and cores is None:
    cores = layout.spare_cores()
  pipe = placement.pipe or ("transfer" if placement.address is not None else "shm")
  # A speculator at an address holds the token the user gave it (a file, or the environment's).
  token = None if placement.address is None else auth.token_from(placement.token_file)
  vocab = draft_vocab if draft_vocab is None or isinstance(draft_vocab, int) else tuple(draft_vocab)
  return SpeculatorOptions(
    draft=draft.source,
    dtype=np.dtype(jax.tree.leaves(draft.params)[0].dtype).name,
    draft_vocab=vocab,
    attention_impl=attention_impl,
    cores=cores,
    address=placement.address,
    pipe=pipe,
    token=token,
  )


def exit_with_parent(parent: int, remove: str | None = None) -> None:
  """Exit at once when process `parent` is gone (removing the file `remove`, this process's
  log), watched by a daemon thread: a child started by another process never outlives it."""

  def watch():
    while os.getppid() == parent:
      time.sleep(0.5)
    if remove:
      with contextlib.suppress(OSError):
        os.unlink(remove)
    unlink_open_segments()  # the parent, killed, could not: nothing else will
    os._exit(3)

  threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
