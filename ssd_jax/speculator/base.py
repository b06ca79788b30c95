"""The draft side of a run as the host loops see it: typed contracts, whatever runs it.

sd drafts through a `Drafter`, ssd through a `Speculator`; the loops (`runtime.loops`) call
these and nothing else of the draft, so the same loop drives a draft on a device of this process
(`local.LocalSpeculator`, which is both) or, for ssd, one in a speculator process on this host
or another (`remote.RemoteSpeculator`):

  start(tokens, lengths, warp, key, capacity)
                   prefill the prompts into the draft cache (asynchronously)
  ready()          wait for that prefill (so a run's timing starts after it)
  propose(outcome) Drafter (sd): commit the last outcome, draft `lookahead` tokens now
  first()          Speculator (ssd): the first speculation (the speculation cache starts
                   empty: drafted now)
  next(report)     Speculator (ssd): called once the target's verification of the last
                   speculation is dispatched: expand that speculation while it is verified,
                   then serve the speculation for its outcome (a cache hit, or a backup on a
                   miss). Returns it with the round's report, read to the host where the
                   speculator needed the outcome there (the loop then does not read it again)
  close()          end the run; what the speculator counted (`SpeculatorStats`)

A `Site` is where an engine's ssd speculators run (a mesh of this process, or a speculator
process) and hands out one per run; `Placement` says which site ssd gets.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Literal, Protocol

import jax
import numpy as np

from ssd_jax.decode.plan import DraftPlan
from ssd_jax.decode.sampling import Warp
from ssd_jax.decode.state import Outcome, Report, Speculation
from ssd_jax.timing import Timer


@dataclasses.dataclass(frozen=True)
class SpeculatorStats:
  """What a speculator counted during one run (None: nothing to add to the caller's counts).

  Attributes:
    compiles: XLA compilations in the speculator's own process (a speculator of this process
      compiles in it, where the caller counts them).
    served_by_target: greedy rounds whose speculation the target served from an expansion's
      cache without waiting for an answer (a speculator process only).
  """

  compiles: int | None = None
  served_by_target: int | None = None


class _DraftSide(Protocol):
  plan: DraftPlan

  def start(
    self, tokens: np.ndarray, lengths: np.ndarray, warp: Warp, key: jax.Array, capacity: int
  ) -> None: ...

  def ready(self) -> None: ...

  def close(self) -> SpeculatorStats: ...


class Drafter(_DraftSide, Protocol):
  """sd's draft side for one run (see the module docstring)."""

  def propose(self, outcome: Outcome | None) -> Speculation: ...


class Speculator(_DraftSide, Protocol):
  """ssd's draft side for one run (see the module docstring)."""

  def first(self) -> Speculation: ...

  def next(self, report: Report) -> tuple[Speculation, Report]: ...


class Site(Protocol):
  """Where an engine's draft side runs; one speculator per run."""

  def speculator(self, plan: DraftPlan, timer: Timer) -> Speculator:
    """A speculator for one run compiled for `plan` (started, for a process, on first use)."""
    ...

  def start(self) -> None:
    """Start a speculator process now, if this site has one (else it starts on first use)."""
    ...

  @property
  def startup(self) -> dict[str, float] | None:
    """Seconds a speculator process took to start and load its draft (None: none runs)."""
    ...

  def close(self) -> None:
    """Stop what this site started (a later `speculator()` starts it again)."""
    ...


PlacementKind = Literal["auto", "device", "process"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Placement:
  """Where ssd's draft side runs (sd always drafts beside the target, in this process).

  Attributes:
    kind: "device" (a mesh of this process: on a CPU its devices share this process's thread
      pool, so that is placement, not compute), "process" (a speculator process pinned to
      `cores`: compute of its own), or "auto" (a process on a CPU host where this process leaves
      a core free for it, `ssd_jax.cpu_layout()`; else a device).
    cores: the speculator process's CPU cores (default: the first core this process does not
      use).
    address: "host:port" of a speculator another host runs (`python -m ssd_jax.speculator
      --listen`); implies the process kind.
    pipe: how arrays cross to the process: "shm" (shared memory, one host; the default for a
      child) or "transfer" (`jax.experimental.transfer`; the default with an address).
    token_file: the file holding the token of the speculator at `address` (its `--token-file`);
      None: the environment variable SSD_JAX_SPECULATOR_TOKEN if set, else no token. A
      speculator process the engine starts itself gets a fresh token of its own.
  """

  kind: PlacementKind = "auto"
  cores: tuple[int, ...] | None = None
  address: str | None = None
  pipe: Literal["shm", "transfer"] | None = None
  token_file: str | None = None

  def __post_init__(self):
    if self.kind not in ("auto", "device", "process"):
      raise ValueError(f"placement must be auto, device or process, got {self.kind!r}")
    if self.pipe not in (None, "shm", "transfer"):
      raise ValueError(f"the speculator pipe must be shm or transfer, got {self.pipe!r}")
    if self.address is not None:
      host, _, port = self.address.rpartition(":")
      if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"a speculator address must be HOST:PORT, got {self.address!r}")
      if self.kind == "device":
        raise ValueError(
          "a speculator address runs the draft in a process: kind 'device' conflicts"
        )
      if self.pipe == "shm" and host not in LOOPBACK:
        raise ValueError(f"shared memory cannot reach {self.address}: use the transfer pipe")
    if self.cores is not None:
      object.__setattr__(self, "cores", tuple(int(c) for c in self.cores))
    if self.token_file is not None:
      if self.address is None:
        raise ValueError(
          "a token file is for a speculator at an address: give the placement its address (a "
          "speculator the engine starts gets a token of its own)"
        )
      object.__setattr__(self, "token_file", os.fspath(self.token_file))

  @classmethod
  def of(cls, value: Placement | str) -> Placement:
    """A placement from itself, a kind ("auto", "device", "process") or "host:port"."""
    if isinstance(value, Placement):
      return value
    if isinstance(value, str) and ":" in value:
      return cls(kind="process", address=value)
    return cls(kind=value)


LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
