"""The draft side of a session as the host rounds see it: typed contracts, whatever runs it.

A session is a persistent batch of slots that requests enter and leave between rounds
(`runtime.session`). sd drafts through a `Drafter`, ssd through a `Speculator`; the session calls
these and nothing else of the draft, so the same rounds drive a draft on a device of this process
(`local.LocalSpeculator`, which is both) or, for ssd, one in a speculator process on this host
or another (`remote.RemoteSpeculator`):

  open(B, capacity)  an empty batch of B free rows
  reshape(change)    between rounds: rows moved to another batch size, requests joined (their
                     prompts prefilled into free rows), the plan switched between greedy and
                     sampled; ssd returns the pending speculation with each joined row's first
                     proposal in it (drafted now: a forced miss)
  warm_up(...)       compile the between-rounds programs at every shape (an idle session)
  ready()            wait for what was dispatched (a run's timing starts after the prefill)
  propose(outcome)   Drafter (sd): commit the last outcome, draft `lookahead` tokens now
  next(report)       Speculator (ssd): called once the target's verification of the pending
                     speculation is dispatched: expand that speculation while it is verified,
                     then serve the speculation for its outcome (a cache hit, or a backup on a
                     miss). Returns it with the round's report, read to the host where the
                     speculator needed the outcome there (the session then does not read it
                     again)
  close()            end the session; what the speculator counted (`SpeculatorStats`)

A `Site` is where an engine's ssd speculators run (a mesh of this process, or a speculator
process) and hands out one per session; `Placement` says which site ssd gets.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Literal, Protocol

import numpy as np

from ssd_jax.decode.plan import DraftPlan
from ssd_jax.decode.sampling import Warp
from ssd_jax.decode.state import Admission, Outcome, Report, Speculation
from ssd_jax.timing import Timer

PlanKey = tuple[int, bool]  # (batch size, every row greedy): which compiled plan a round runs


@dataclasses.dataclass(frozen=True)
class Join:
  """A request entering a free slot between rounds (host values).

  Attributes:
    slot: its row.
    tokens: i32[1, P], its prompt right-padded to a length bucket.
    length: its prompt's tokens.
    max_new: its budget; ignore_eos: whether EOS ends it.
    temperature, top_k, top_p: its sampling settings.
    seed: u32[2], its PRNG key's data (`seed_data`).
  """

  slot: int
  tokens: np.ndarray
  length: int
  max_new: int
  temperature: float
  top_k: int
  top_p: float
  seed: np.ndarray
  ignore_eos: bool = False


# A Join's scalar fields and their dtypes, as columns of arrays (`join_arrays`).
_JOIN_COLUMNS = {
  "slot": np.int32,
  "length": np.int32,
  "max_new": np.int32,
  "temperature": np.float32,
  "top_k": np.int32,
  "top_p": np.float32,
  "ignore_eos": np.bool_,
}


def join_arrays(joins: tuple[Join, ...]) -> dict[str, np.ndarray]:
  """Joins as a few arrays (one column per field, the prompts concatenated with their buckets'
  lengths), for a pipe: a generate call's thousands of rows would not fit a control line."""
  out = {
    name: np.asarray([getattr(j, name) for j in joins], t) for name, t in _JOIN_COLUMNS.items()
  }
  return out | {
    "seed": np.stack([np.asarray(j.seed, np.uint32) for j in joins]),
    "bucket": np.asarray([j.tokens.shape[1] for j in joins], np.int32),
    "tokens": np.concatenate([j.tokens[0] for j in joins]).astype(np.int32),
  }


def joins_of(arrays: dict[str, np.ndarray]) -> tuple[Join, ...]:
  """The joins `join_arrays` made (host arrays)."""
  a = {k: np.asarray(v) for k, v in arrays.items()}
  columns = [a[name].tolist() for name in _JOIN_COLUMNS]  # Python values, a column at a time
  buckets, tokens, seeds = a["bucket"].tolist(), a["tokens"], a["seed"]
  ends = np.cumsum(a["bucket"]).tolist()
  return tuple(
    Join(
      **dict(zip(_JOIN_COLUMNS, row, strict=True)),
      tokens=tokens[end - bucket : end][None],
      seed=seeds[i],
    )
    for i, (end, bucket, *row) in enumerate(zip(ends, buckets, *columns, strict=True))
  )


def seed_data(seed: int) -> np.ndarray:
  """The key data u32[2] of `jax.random.key(seed)` (threefry, 32-bit seeds), made on the host:
  a request's key, without a device call per request."""
  return np.asarray([0, seed & 0xFFFFFFFF], np.uint32)


def admissions(
  joins: tuple[Join, ...], bulk: bool, rows: int = 0
) -> list[tuple[np.ndarray, Admission]]:
  """The joins as admissions, each with its prompts i32[k, P]: one per join, or (`bulk`) all
  in one, padded to the longest prompt bucket and to `rows` admissions (the one compiled shape
  of a `generate` call, whatever share of its rows has a budget). The padding repeats the last
  join: the same values written to the same slot again, which changes nothing."""
  if not joins:
    return []
  if not bulk:
    return [(j.tokens, _admission((j,), j.tokens)) for j in joins]
  joins = joins + joins[-1:] * max(0, rows - len(joins))
  P = max(j.tokens.shape[1] for j in joins)
  tokens = np.zeros((len(joins), P), np.int32)
  for i, j in enumerate(joins):
    tokens[i, : j.tokens.shape[1]] = j.tokens[0]
  return [(tokens, _admission(joins, tokens))]


def _admission(joins: tuple[Join, ...], tokens: np.ndarray) -> Admission:
  """The joins' columns (one pass over them: a `generate` call admits 50,000), with `tokens`
  their prompts i32[k, P]."""
  slot, length, max_new, temperature, top_k, top_p, ignore_eos, seed = zip(
    *[
      (j.slot, j.length, j.max_new, j.temperature, j.top_k, j.top_p, j.ignore_eos, j.seed)
      for j in joins
    ],
    strict=True,
  )
  length = np.asarray(length, np.int32)
  return Admission(
    slot=np.asarray(slot, np.int32),
    length=length,
    last=tokens[np.arange(len(joins)), length - 1],
    max_new=np.asarray(max_new, np.int32),
    warp=Warp(
      temperature=np.asarray(temperature, np.float32),
      top_k=np.asarray(top_k, np.int32),
      top_p=np.asarray(top_p, np.float32),
    ),
    seed=np.asarray(seed, np.uint32).reshape(len(joins), 2),
    ignore_eos=np.asarray(ignore_eos, bool),
  )


@dataclasses.dataclass(frozen=True)
class Reshape:
  """What changes in the batch at a boundary between rounds, both sides alike.

  Attributes:
    index: i32[B'], the old row each new row takes (None: the rows stay where they are).
    free: bool[B'], new rows that hold no request (with `index`).
    joins: requests entering free slots (in the new rows).
    greedy: every row of the rounds from here on is greedy (the plan's variant).
    bulk: admit the joins in one program (a `generate` call's batch) rather than one by one
      (a session's, whose compiled shapes then do not depend on how many join at once).
  """

  index: np.ndarray | None
  free: np.ndarray | None
  joins: tuple[Join, ...]
  greedy: bool
  bulk: bool = False


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
  def open(self, batch_size: int, capacity: int) -> Speculation | None: ...

  def reshape(self, change: Reshape) -> Speculation | None: ...

  def warm_up(self, buckets: tuple[int, ...], prompt_buckets: tuple[int, ...]) -> None: ...

  def ready(self) -> None: ...

  def close(self) -> SpeculatorStats: ...


class Drafter(_DraftSide, Protocol):
  """sd's draft side for one session (see the module docstring)."""

  def propose(self, outcome: Outcome | None) -> Speculation: ...


class Speculator(_DraftSide, Protocol):
  """ssd's draft side for one session (see the module docstring)."""

  def next(self, report: Report) -> tuple[Speculation, Report]: ...


class Site(Protocol):
  """Where an engine's draft side runs; one speculator per run."""

  def speculator(self, plans: dict[PlanKey, DraftPlan], timer: Timer) -> Speculator:
    """A speculator for one session, compiled for its `plans` (a process starts on first
    use)."""
    ...

  def start(self) -> None:
    """Start a speculator process now, if this site has one (else it starts on first use)."""
    ...

  @property
  def startup(self) -> dict[str, float] | None:
    """Seconds a speculator process took to start and load its draft (None: none runs)."""
    ...

  def gone(self) -> str | None:
    """Why this site's speculator process cannot serve (it died), else None (none started, or
    none to watch: a remote one's errors say, and a device of this process cannot die alone)."""
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
