"""A speculator in a process of its own, and the target's side of talking to it.

`SpeculatorProcess` starts one (a child of this process, pinned to its own cores before JAX
starts there) or connects to one another host runs (`python -m ssd_jax.speculator --listen`),
loads the draft there from the same name or path, and stops it. It never leaves a process
behind: the engine closes it (also on exceptions and at interpreter exit), and the child exits
by itself once this process is gone. A speculator that dies gives a ChannelError naming its exit
status and the end of its log within a second, never a hang.

`RemoteSpeculator` has the calls of `LocalSpeculator` (start / ready / first / expand / next /
close)
for one run; the arrays of each call cross on the pipe (see channel.py).
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
import time
import warnings
import weakref
from pathlib import Path
from typing import Any

import jax
import numpy as np

from ssd_jax.decode.channel import (
  OUTCOME_FIELDS,
  PROTOCOL,
  SPECULATION_FIELDS,
  ChannelError,
  Connection,
  SharedMemoryPipe,
  TransferPipe,
)
from ssd_jax.decode.metrics import NullTimer
from ssd_jax.decode.plan import DraftPlan
from ssd_jax.decode.sampling import Warp
from ssd_jax.decode.state import Outcome, Speculation

LOAD_TIMEOUT = 900.0  # seconds for the speculator to start and load its draft
STEP_TIMEOUT = 600.0  # seconds for one answer (the first ones compile)
ANSWER_SPIN = 0.05  # seconds the target polls for a speculation before it sleeps (receive)


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
  """

  draft: str
  dtype: str = "float32"
  draft_vocab: int | tuple[int, ...] | None = None
  attention_impl: str = "xla"
  cores: tuple[int, ...] | None = None
  address: str | None = None
  pipe: str = "shm"


class SpeculatorProcess:
  """One speculator and the connection to it (see the module docstring)."""

  def __init__(self, options: SpeculatorOptions, device: jax.Device):
    self.options, self.device = options, device
    self.process: subprocess.Popen | None = None
    self.log: Path | None = None
    t0 = time.perf_counter()
    sock = self._connect() if options.address else self._spawn()
    self.conn = Connection(sock, alive=self.gone)
    try:
      # The transfer server listens where the peer reaches this host: the connection's address.
      here = sock.getsockname()[0]
      self.pipe = TransferPipe(device, here) if options.pipe == "transfer" else SharedMemoryPipe()
      t1 = time.perf_counter()
      ready = self._hello()
    except BaseException:  # a failed start (a Ctrl-C too) leaves no process, segment or log
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
    cmd += ["--parent", str(os.getpid())]
    if self.options.cores:
      cmd += ["--cores", ",".join(map(str, self.options.cores))]
    fd, log = tempfile.mkstemp(prefix="ssd_jax-speculator-", suffix=".log")
    self.log = Path(log)
    cmd += ["--log", log]  # removed by the child if this process dies before it can
    # A session of its own: a Ctrl-C reaches this process, which then stops the speculator.
    self.process = subprocess.Popen(
      cmd, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, start_new_session=True
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
            self.close()
            raise ChannelError(why or "the speculator did not connect in time") from None
    finally:
      listener.close()

  def _connect(self) -> socket.socket:
    host, _, port = self.options.address.rpartition(":")
    try:
      return socket.create_connection((host, int(port)), timeout=30)
    except (OSError, ValueError) as e:
      raise ChannelError(
        f"cannot reach a speculator at {self.options.address} ({e}); start one there with "
        "python -m ssd_jax.speculator --listen HOST:PORT"
      ) from e

  def _hello(self) -> dict[str, Any]:
    o = self.options
    hello = {
      "op": "hello",
      "protocol": PROTOCOL,
      "draft": o.draft,
      "dtype": o.dtype,
      "draft_vocab": list(o.draft_vocab) if isinstance(o.draft_vocab, tuple) else o.draft_vocab,
      "attention_impl": o.attention_impl,
      "pipe": o.pipe,
    }
    if isinstance(self.pipe, TransferPipe):
      hello["transfer_address"] = self.pipe.address
    self.conn.send(hello)
    ready = self.conn.receive(timeout=LOAD_TIMEOUT)
    if isinstance(self.pipe, TransferPipe):
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

  def speculator(self, plan: DraftPlan, timer=None) -> RemoteSpeculator:
    return RemoteSpeculator(self, plan, timer)

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


class RemoteSpeculator:
  """The draft side of one run, in a speculator process: LocalSpeculator's calls over the
  channel. Speculations arrive on the host (shared memory) or on this process's device
  (transfer); the loop places them on the target mesh either way.

  In greedy runs the speculator also sends each expansion's cache (keys, depths, tokens, a few
  ints per branch) as soon as it is computed, during the verification it overlaps; a round whose
  every row hits is then served here without waiting for the speculator, which receives the
  outcome all the same (to advance its cache and expand the served speculation) and answers
  only rounds with a miss. Both ends decide hit or miss by the same test on the same arrays.
  """

  reads_outcome = True  # `next` needs the round's outcome now (the loop reads it for us)

  def __init__(self, link: SpeculatorProcess, plan: DraftPlan, timer=None):
    self.link, self.plan = link, plan
    self.timer = timer or NullTimer()
    self.served_here = 0  # rounds whose speculation came from a cache, without an answer

  def _call(self, message: dict[str, Any], arrays: dict[str, Any] | None = None):
    if arrays is not None:
      message["arrays"] = self.link.pipe.pack(arrays)
    self.link.conn.send(message)

  def _receive(self, op: str) -> dict[str, np.ndarray]:
    # Due in a few ms (a lookup, or a backup on a miss); the target's core waits for it anyway.
    message = self.link.conn.receive(timeout=STEP_TIMEOUT, spin=ANSWER_SPIN)
    if message.get("op") != op:
      raise ChannelError(f"expected the speculator's {op}, got {message.get('op')!r}")
    return self.link.pipe.unpack(message["arrays"])

  def _speculation(self) -> Speculation:
    fields = self._receive("speculation")
    return Speculation(**{name: fields.get(name) for name in SPECULATION_FIELDS})

  def start(self, tokens, lengths, warp: Warp, key, capacity: int) -> None:
    arrays = {
      "tokens": tokens,
      "lengths": lengths,
      "temperature": warp.temperature,
      "top_k": warp.top_k,
      "top_p": warp.top_p,
      "key": np.asarray(jax.random.key_data(key)),
    }
    self._call({"op": "start", "plan": self.plan.to_json(), "capacity": capacity}, arrays)

  def ready(self) -> None:
    """Wait for the speculator's prefill (its first start compiles there)."""
    self.link.conn.receive(timeout=STEP_TIMEOUT)

  def first(self) -> Speculation:
    self._call({"op": "first"})
    return self._speculation()

  def expand(self) -> None:
    """Nothing to do: the speculator expands each speculation right after sending it."""

  def next(self, outcome: Outcome) -> Speculation:
    # The cache of the speculation just verified (greedy), copied out before the speculator
    # may write the next one: it writes that only after this outcome.
    cache = _on_host(self._receive("cache")) if self.plan.greedy else None
    self._call({"op": "next"}, {name: getattr(outcome, name) for name in OUTCOME_FIELDS})
    speculation = None if cache is None else served_from(cache, outcome)
    if speculation is None:
      speculation = self._speculation()
    else:
      self.served_here += 1
    self.timer.when_ready("draft", "lookup_done", speculation)
    return speculation

  def close(self) -> None:
    """End the run; returns the speculator's XLA compilations during it (None if unknown)."""
    with contextlib.suppress(ChannelError):
      self._call({"op": "stop"})
      while (message := self.link.conn.receive(timeout=STEP_TIMEOUT))["op"] != "stopped":
        pass  # the last expansion's cache, which no round needs any more
      return message["compiles"]
    return None


def _on_host(arrays: dict[str, Any]) -> dict[str, np.ndarray]:
  """Host arrays as they are (shared memory), device ones read (transfer)."""
  return {k: v if isinstance(v, np.ndarray) else jax.device_get(v) for k, v in arrays.items()}


def served_from(cache: dict[str, np.ndarray], outcome: Outcome) -> Speculation | None:
  """The next speculation from a greedy speculation cache when every row's outcome hits it (the
  speculator's `speculate.find` and `lookup`, on host arrays), else None."""
  accepted, bonus = np.asarray(outcome.accepted), np.asarray(outcome.bonus)
  match = (cache["depth"] == accepted[:, None]) & (cache["keys"] == bonus[:, None]) & cache["valid"]
  if not match.any(axis=1).all():
    return None
  rows = np.arange(match.shape[0])
  tokens = np.concatenate([bonus[:, None], cache["tokens"][rows, match.argmax(axis=1)]], axis=1)
  return Speculation(
    tokens=tokens.astype(np.int32),
    probs=None,
    point_mass=np.zeros(rows.size, bool),
    hit=np.ones(rows.size, bool),
  )


def resolve_placement(placement: str, address: str | None, device: jax.Device) -> str:
  """ "device" or "process" (see Engine's `draft_placement`)."""
  if placement not in ("auto", "device", "process"):
    raise ValueError(f"draft_placement must be auto, device or process, got {placement!r}")
  if address is not None:
    return "process"
  if placement == "auto":  # a core of its own only exists in a process of its own on CPU
    return "process" if device.platform == "cpu" and (os.cpu_count() or 1) > 1 else "device"
  return placement


def speculator_options(draft, draft_vocab, attention_impl, cores, address, pipe):
  """What the speculator process is asked to run: the same draft, head and attention impl."""
  if draft.source is None:
    raise ValueError(
      f"draft {draft.name!r} was not loaded by name or path (load_model), so a speculator "
      "process cannot load it too: save it (models.weights.save_hf) and load it from there"
    )
  if address is None and cores is None:
    cores = _spare_cores()
  pipe = pipe or ("transfer" if address is not None else "shm")
  if pipe not in ("shm", "transfer"):
    raise ValueError(f"speculator_pipe must be shm or transfer, got {pipe!r}")
  if address is not None and pipe == "shm" and address.rpartition(":")[0] not in _LOOPBACK:
    raise ValueError(f"shared memory cannot reach {address}: use speculator_pipe='transfer'")
  vocab = draft_vocab if draft_vocab is None or isinstance(draft_vocab, int) else tuple(draft_vocab)
  return SpeculatorOptions(
    draft=draft.source,
    dtype=np.dtype(jax.tree.leaves(draft.params)[0].dtype).name,
    draft_vocab=vocab,
    attention_impl=attention_impl,
    cores=None if cores is None else tuple(int(c) for c in cores),
    address=address,
    pipe=pipe,
  )


_LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def _spare_cores() -> tuple[int, ...]:
  """The first core this process may not use (pinned elsewhere), else its last (shared)."""
  mine = os.sched_getaffinity(0)
  spare = sorted(set(range(os.cpu_count() or 1)) - mine)
  if spare:
    return (spare[0],)
  warnings.warn(
    "the speculator process shares a core with the target (this process may use every core): "
    "pin the target first (python -m ssd_jax.run does, see --target-cores) to give it one",
    stacklevel=3,
  )
  return (max(mine),)
