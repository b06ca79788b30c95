"""Continuous batching: a persistent batch of slots that requests enter and leave between rounds.

A `Session` owns a fixed number of slots (`max_batch_size`), each with its own rows of the
target's and the draft's KV caches, and runs rounds of its mode (ar, sd or ssd) over them. A
program submits `Request`s at any time (from any thread) and gets a `Handle` that streams the
request's tokens as rounds produce them; it can cancel one, and read what runs and what waits.
One thread (the caller of `step`, or the session's own after `start`) drives the rounds:

  round r     dispatch the mode's programs for round r (nothing waits for the device)
              read round r - 1's report (the one host read per round, a round late): tokens
              to the handles; rows that ended (EOS, budget, a stop token or string, cancelled)
              free their slots
  boundary    requests leave (a finished row is done on the device already; a row the host
              stopped is retired), the batch moves to the smallest bucket of slots that holds
              what runs and waits (1, 2, 4, 8: a lightly loaded batch does not pay for empty
              slots; rows move to the front), waiting requests enter free slots (their prompts
              prefilled into those rows, every other row untouched); the draft side does the
              same (`Speculator.reshape`): in ssd each new row's first speculation is drafted
              then (a forced miss: nothing of the slot's previous occupant is ever served to it)

Every program is compiled per bucket (and prompt-length bucket) at `warm_up`; requests of any
prompt length up to `max_model_len` and any sampling settings then run without compiling. A
request's tokens do not depend on its neighbours: its randomness comes from its own seed and
position (`sampling.row_keys`), and rows never mix. Greedy-or-sampled is chosen per round (the
plan's variant: rounds whose every row is greedy move no distributions), switched when requests
join.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

from ssd_jax.config import SpecConfig
from ssd_jax.decode import slots
from ssd_jax.decode import target as target_lib
from ssd_jax.decode.plan import Plan
from ssd_jax.decode.sampling import Sampling
from ssd_jax.decode.state import Report, Speculation, TargetState
from ssd_jax.models import placement
from ssd_jax.models.prefill import MIN_BUCKET, bucket_length, prefill_window
from ssd_jax.runtime.requests import Event, Handle, QueueFullError, Request
from ssd_jax.runtime.stats import SessionStats
from ssd_jax.speculator.base import Join, Reshape, SpeculatorStats, admissions, seed_data
from ssd_jax.timing import NullTimer, Timer

__all__ = ["Event", "Handle", "QueueFullError", "Request", "Session"]


def buckets_up_to(max_batch_size: int) -> tuple[int, ...]:
  """1, 2, 4, ... up to max_batch_size (itself included)."""
  out, b = [], 1
  while b < max_batch_size:
    out.append(b)
    b *= 2
  return (*out, max_batch_size)


@dataclasses.dataclass
class _Slot:
  handle: Handle
  stops: frozenset[int]  # the tokens that end it: its stop tokens, and EOS unless it ignores it
  device_done: bool = False  # the device knows the row ended (EOS, budget) or it was retired


class Session:
  """A persistent batch of slots for `engine`, decoding with `spec` (see the module docstring).

  Args:
    engine: the models and where they run (`runtime.Engine`).
    spec: the mode and its knobs.
    max_batch_size: slots, the most requests decoded together.
    max_model_len: cache slots per row: a prompt plus its max_new_tokens plus the lookahead must
      fit (default: the target's context, capped at 2,048).
    max_queue: requests that may wait for a slot; `submit` raises QueueFullError beyond.
    buckets: the batch sizes rounds run at (default 1, 2, 4, ... up to max_batch_size).
    timer: records round timestamps (tracing; `timing.RoundTimer`).
    bulk: admit the requests that join at one boundary in one program (`Engine.generate`'s
      whole batch at once) rather than one by one (a server's session, whose compiled shapes
      then do not depend on how many join at once).
    adapt: ssd's fan-out follows the batch size (`policy.fan_out_for`: the batch's branches
      held at one row's), so that its expansion keeps hiding under the verification as the
      batch fills; False runs `spec`'s fan-out at every size.
  """

  def __init__(
    self,
    engine,
    spec: SpecConfig,
    *,
    max_batch_size: int = 8,
    max_model_len: int | None = None,
    max_queue: int = 64,
    buckets: Sequence[int] | None = None,
    timer: Timer | None = None,
    bulk: bool = False,
    adapt: bool = True,
  ):
    if spec.mode != "ar" and engine.draft is None:
      raise ValueError(f"mode {spec.mode!r} needs a draft model")
    if max_batch_size < 1 or max_queue < 0:
      raise ValueError("max_batch_size must be >= 1 and max_queue >= 0")
    self.engine, self.spec, self.timer, self.bulk = engine, spec, timer or NullTimer(), bulk
    self.buckets = tuple(sorted(buckets or buckets_up_to(max_batch_size)))
    if self.buckets[-1] != max_batch_size:
      raise ValueError(
        f"the largest bucket must be max_batch_size {max_batch_size}: {self.buckets}"
      )
    context = min(c.max_position_embeddings for c in self._configs())
    self.max_model_len = max_model_len or min(context, 2048)
    if self.max_model_len > context:
      raise ValueError(
        f"max_model_len {self.max_model_len} exceeds the models' context of {context} positions"
      )
    self.max_queue = max_queue
    self.lookahead = spec.lookahead
    self.plans = {
      (b, greedy): engine.plan(spec, greedy=greedy, batch_size=b, adapt=adapt)
      for b in self.buckets
      for greedy in (True, False)
    }
    self.stats = SessionStats(self.lookahead)
    self._lock = threading.Condition()
    self._waiting: collections.deque[Handle] = collections.deque()
    self._cancelled: set[int] = set()
    self._inflight: collections.deque[tuple[Report, list[_Slot | None]]] = collections.deque()
    self._thread: threading.Thread | None = None
    self._stopping = False
    self.failure: str | None = None  # why the session's thread stopped, if it failed
    self._draft = None
    self._no_draft: dict[int, Speculation] = {}
    self._open(self.buckets[0])

  def _configs(self):
    yield self.engine.target.config
    if self.spec.mode != "ar":
      yield self.engine.draft.config

  # -- the program's side (any thread) ---------------------------------------------------------

  def submit(self, request: Request, on_event: Callable[[Event], None] | None = None) -> Handle:
    """Queue `request`; its handle streams its tokens. Raises ValueError for a request this
    session cannot serve (the message names what is wrong) and QueueFullError when the wait queue
    is full."""
    self.validate(request)
    handle = Handle(request, on_event)
    with self._lock:
      if self.failure is not None:
        raise RuntimeError(f"the session has stopped: {self.failure}")
      if len(self._waiting) >= self.max_queue:
        raise QueueFullError(
          f"the wait queue is full ({self.max_queue} requests wait for {self.buckets[-1]} slots);"
          " retry later"
        )
      self._waiting.append(handle)
      if self._thread is not None:  # the session's thread may be waiting for work
        self._lock.notify_all()
    return handle

  def cancel(self, handle: Handle | int) -> None:
    """End a request (waiting or running) at the next boundary; its slot is free for the next
    round. Ending one that has ended already does nothing."""
    with self._lock:
      self._cancelled.add(handle if isinstance(handle, int) else handle.id)
      self._lock.notify_all()

  def validate(self, request: Request) -> None:
    """Raise ValueError naming what this session cannot serve in `request`."""
    vocab = self.engine.target.config.vocab_size
    ids = np.asarray(request.prompt)
    if ids.ndim != 1 or ids.size == 0 or ids.dtype.kind not in "iu":  # kind: ~10x issubdtype
      raise ValueError(
        f"the prompt must be a non-empty list of int token ids, got {request.prompt!r:.60}"
      )
    bad = [int(t) for t in (*ids.tolist(), *request.stop_token_ids) if not 0 <= t < vocab]
    if bad:
      raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
    need = ids.size + request.max_new_tokens + self.lookahead + 1
    if need > self.max_model_len:
      raise ValueError(
        f"the prompt ({ids.size} tokens) + max_new_tokens ({request.max_new_tokens}) + "
        f"lookahead + 1 = {need} positions exceed max_model_len {self.max_model_len}; lower "
        "max_new_tokens or shorten the prompt"
      )
    if request.stop and self.engine.target.tokenizer is None:
      raise ValueError("stop strings need the target's tokenizer, and it has none")

  def running(self) -> list[Handle]:
    """The requests in slots now (the session thread's view)."""
    return [s.handle for s in self._slots if s is not None]

  def waiting(self) -> list[Handle]:
    with self._lock:
      return list(self._waiting)

  @property
  def batch_size(self) -> int:
    """The bucket rounds run at now."""
    return len(self._slots)

  # -- the session's thread ------------------------------------------------------------------

  def admit(self) -> None:
    """A boundary now, without a round: waiting requests enter free slots (their prompts
    prefilled on both sides)."""
    self._boundary()

  def ready(self) -> None:
    """Wait for what was dispatched (a run's timing starts after the prefill)."""
    jax.block_until_ready(self._state)
    if self._draft is not None:
      self._draft.ready()

  def _open(self, bucket: int) -> None:
    e = self.engine
    self._state: TargetState = self._empty_state(bucket)
    self._slots: list[_Slot | None] = [None] * bucket
    self._greedy = True
    self._outcome = None  # sd: the last round's outcome, which the next proposal commits
    self._pending: Speculation | None = None  # ssd: the speculation the next round verifies
    if self.spec.mode == "ar":
      return
    draft_plans = {key: plan.draft for key, plan in self.plans.items()}
    site = e.site if self.spec.mode == "ssd" else e.local
    self._draft = site.speculator(draft_plans, self.timer)
    self._pending = self._draft.open(bucket, self.max_model_len)

  def _empty_state(self, bucket: int) -> TargetState:
    """`bucket` free rows on the target mesh (the cache created in its sharding, the rest
    replicated)."""
    e = self.engine
    cache = placement.init_cache(
      e.target.config, e.target_mesh, bucket, self.max_model_len, e.target_params["embed"].dtype
    )
    rows = e._to_target(dataclasses.replace(slots.empty_target(cache), cache=None))
    return dataclasses.replace(rows, cache=cache)

  @property
  def plan(self) -> Plan:
    return self.plans[(self.batch_size, self._greedy)]

  def idle(self) -> bool:
    """Nothing runs, waits or is in flight."""
    with self._lock:
      waiting = bool(self._waiting)
    return not waiting and not self._inflight and all(s is None for s in self._slots)

  def step(self) -> bool:
    """One boundary and one round (if anything runs); False when there was nothing to do."""
    self._boundary()
    active = any(s is not None and not s.device_done for s in self._slots)
    if active:
      self._dispatch()
    while self._inflight and (len(self._inflight) > 1 or not active):
      self._read(*self._inflight.popleft())
    return active or bool(self._inflight)

  def run(self, until: Callable[[], bool] | None = None) -> None:
    """Step until `until()` holds (default: until idle)."""
    until = until or self.idle
    while not until():
      self.step()

  # -- one round -------------------------------------------------------------------------------

  def _dispatch(self) -> None:
    e, plan = self.engine, self.plan
    self.timer.mark("dispatch")
    mode = self.spec.mode
    if mode == "ar":
      speculation = self._empty_speculation()
    elif mode == "sd":
      speculation = self._draft.propose(self._outcome)
    else:
      speculation = self._pending
    self._state, report = target_lib.step(
      e.target_params, self._state, e._to_target(speculation), plan=plan.target
    )
    self.timer.when_ready("target", "verify_done", report)
    if mode == "sd":
      self._outcome = report.outcome
    elif mode == "ssd":
      self._pending, report = self._draft.next(report)
    self.stats.dispatched += 1
    self._inflight.append((report, list(self._slots)))

  def _empty_speculation(self) -> Speculation:
    """ar's speculation: no draft tokens (placed once per batch size)."""
    b = self.batch_size
    if b not in self._no_draft:
      self._no_draft[b] = self.engine._to_target(Speculation.empty(b))
    return self._no_draft[b]

  def _read(self, report: Report, table: list[_Slot | None]) -> None:
    """A round's report on the host: tokens to their requests, which rows ended. `table` is
    the slots as the round saw them (rows may have moved since; a slot moves with its row)."""
    r = report.on_host()
    self.stats.add_round(r)
    # Python lists, not numpy scalars, in the loop over rows: a `generate` of 50,000 rows reads
    # each round's report row by row.
    counts, done = r.count.tolist(), r.done.tolist()
    rows = [row for row, count in enumerate(counts) if count]
    emitted = r.tokens.tolist() if rows else []
    for row in rows:
      slot = table[row]
      if slot is None or slot.handle.done:
        continue  # a free row's padding, or a request the host ended already
      handle = slot.handle
      tokens = emitted[row][: counts[row]]
      handle.rounds += 1
      if slot.stops and not slot.stops.isdisjoint(tokens):
        tokens, finish = _through_first_stop(tokens, slot.stops), "stop"
      elif done[row]:
        finish = "length"
      else:
        finish = None
      if finish != "stop" and handle.request.stop and (cut := self._stop_string(handle, tokens)):
        finish, tokens = "stop", cut
      if finish is not None:
        slot.device_done |= done[row]
      handle._emit(Event(handle.id, tokens, finish))
      if finish is not None:
        self.stats.finished(handle)

  def _stop_string(self, handle: Handle, tokens: list[int]) -> list[int] | None:
    """The tokens up to the one that completes one of the request's stop strings in its text,
    if one does (the request then ends; whoever renders the text cuts it before the string).
    Its earlier tokens held none, so any found now ends within these."""
    decode = self.engine.target.tokenizer.decode
    for i in range(1, len(tokens) + 1):
      text = decode(handle.tokens + tokens[:i])
      if any(stop in text for stop in handle.request.stop):
        return tokens[:i]
    return None

  # -- the boundary between rounds -----------------------------------------------------------

  def _boundary(self) -> None:
    with self._lock:
      cancelled, self._cancelled = self._cancelled, set()
      for handle in [h for h in self._waiting if h.id in cancelled]:
        self._waiting.remove(handle)
        handle._emit(Event(handle.id, [], "cancelled"))
    retire = np.zeros(self.batch_size, bool)
    for i, s in enumerate(self._slots):
      if s is None:
        continue
      if s.handle.id in cancelled and not s.handle.done:
        s.handle._emit(Event(s.handle.id, [], "cancelled"))
        self.stats.finished(s.handle)
      if s.handle.done:  # ended: the slot is free for the next round
        retire[i] = not s.device_done
        self._slots[i] = None
    if retire.any():
      self._state = slots.retire(self._state, self.engine._to_target(retire))
    self._admit()

  def _admit(self) -> None:
    with self._lock:
      waiting = len(self._waiting)
    occupied = [i for i, s in enumerate(self._slots) if s is not None]
    want = self._bucket_for(len(occupied) + waiting)
    index = free = None
    if want != self.batch_size:
      index, free = self._move_rows(occupied, want)
    joins = []
    with self._lock:
      for slot, s in enumerate(self._slots):
        if s is None and self._waiting:
          handle = self._waiting.popleft()
          self._slots[slot] = _Slot(handle, self._stops(handle.request))
          joins.append(self._join(slot, handle))
    if not joins and index is None:
      return
    if joins:  # the variant follows what runs: every row greedy, or some sampled
      self._greedy = all(s.handle.request.sampling.greedy for s in self._slots if s is not None)
    change = Reshape(index, free, tuple(joins), self._greedy, self.bulk)
    self._admit_target(change)
    if self._draft is not None:
      pending = self._draft.reshape(change)
      if self.spec.mode == "ssd":
        self._pending = pending
    self.stats.joined += len(joins)

  def _stops(self, request: Request) -> frozenset[int]:
    eos = () if request.ignore_eos else self.engine.target.config.eos_token_ids
    return frozenset((*eos, *request.stop_token_ids))

  def _bucket_for(self, rows: int) -> int:
    """The smallest bucket that holds `rows` (the largest if none does)."""
    return next((b for b in self.buckets if b >= rows), self.buckets[-1])

  def _move_rows(self, occupied: list[int], bucket: int) -> tuple[np.ndarray, np.ndarray]:
    """The batch at `bucket` rows, the occupied ones first (in order), the rest free."""
    index = np.zeros(bucket, np.int32)
    index[: len(occupied)] = occupied
    free = np.arange(bucket) >= len(occupied)
    e = self.engine
    self._state = slots.take_target(self._state, e._to_target(index), e._to_target(free))
    self._slots = [self._slots[i] for i in occupied] + [None] * (bucket - len(occupied))
    if self._outcome is not None:  # sd: the last outcome follows its rows
      self._outcome = slots.take_outcome(self._outcome, e._to_target(index), e._to_target(free))
    self.stats.resizes += 1
    return index, free

  def _join(self, slot: int, handle: Handle) -> Join:
    r = handle.request
    n = len(r.prompt)
    tokens = np.zeros((1, bucket_length(n, self.max_model_len)), np.int32)
    tokens[0, :n] = r.prompt
    seed = r.seed if r.seed is not None else int(np.random.SeedSequence().generate_state(1)[0])
    return Join(
      slot=slot,
      tokens=tokens,
      length=n,
      max_new=int(r.max_new_tokens),
      temperature=float(r.sampling.temperature),
      top_k=int(r.sampling.top_k),
      top_p=float(r.sampling.top_p),
      seed=seed_data(seed),
      ignore_eos=bool(r.ignore_eos),
    )

  def _admit_target(self, change: Reshape) -> None:
    e, plan = self.engine, self.plan.target
    for tokens, admission in admissions(change.joins, change.bulk, self.batch_size):
      window = prefill_window(
        e.target_params,
        e._to_target(tokens),
        config=plan.config,
        attention_impl=plan.attention_impl,
      )
      self._state = slots.admit_target(self._state, window, e._to_target(admission))

  # -- warm-up -------------------------------------------------------------------------------

  def prompt_buckets(self) -> tuple[int, ...]:
    """The prompt-length buckets a request may need (its prefill compiles once per bucket)."""
    longest = self.max_model_len - self.lookahead - 2  # a prompt leaves room for one token
    top = bucket_length(longest, self.max_model_len)
    return tuple(b for b in (MIN_BUCKET << i for i in range(32)) if b <= top)

  def warm_up(self) -> float:
    """Compile every program this session may run, on both sides: rounds at every bucket in
    both variants (greedy, sampled), through real requests; the prefill of every prompt bucket
    and every way rows enter, leave and move between buckets. Afterwards requests of any prompt
    length up to max_model_len and any sampling settings compile nothing. Returns seconds."""
    if not self.idle():
      raise RuntimeError("warm_up needs an idle session (before any request)")
    t0 = time.perf_counter()
    prompt = [1] * MIN_BUCKET
    for greedy in (True, False):
      sampling = Sampling() if greedy else Sampling(temperature=1.0, top_p=0.9)
      for b in self.buckets:
        budget = 2 * (self.lookahead + 1) + 2  # a few rounds: hits, misses and backups
        handles = [
          self.submit(Request(prompt=prompt, sampling=sampling, max_new_tokens=budget, seed=i))
          for i in range(b)
        ]
        self.run(until=lambda handles=handles: all(h.done for h in handles))
    self.run()
    self._warm_glue()
    if self._draft is not None:
      self._draft.warm_up(self.buckets, self.prompt_buckets())
    self.stats = SessionStats(self.lookahead)
    return time.perf_counter() - t0

  def _warm_glue(self) -> None:
    """The target's between-rounds programs at every shape they may meet."""
    e, plan = self.engine, self.plan.target
    for b in self.buckets:
      state = self._empty_state(b)
      for P in self.prompt_buckets():
        join = Join(
          slot=0,
          tokens=np.zeros((1, P), np.int32),
          length=1,
          max_new=1,
          temperature=0.0,
          top_k=0,
          top_p=1.0,
          seed=np.zeros(2, np.uint32),
        )
        window = prefill_window(
          e.target_params,
          e._to_target(join.tokens),
          config=plan.config,
          attention_impl=plan.attention_impl,
        )
        state = slots.admit_target(state, window, e._to_target(admissions((join,), False)[0][1]))
      state = slots.retire(state, e._to_target(np.zeros(b, bool)))
      outcome = None
      if self.spec.mode == "sd":  # a real round's outcome (its shardings), of free rows
        spec = e._to_target(
          dataclasses.replace(
            Speculation.empty(b), tokens=np.zeros((b, self.lookahead + 1), np.int32)
          )
        )
        state, report = target_lib.step(
          e.target_params, state, spec, plan=self.plans[(b, True)].target
        )
        outcome = report.outcome
      for b2 in self.buckets:
        index, free = e._to_target((np.zeros(b2, np.int32), np.ones(b2, bool)))
        slots.take_target(state, index, free)
        if outcome is not None:
          slots.take_outcome(outcome, index, free)
      jax.block_until_ready(state)

  # -- lifetime --------------------------------------------------------------------------------

  def start(self) -> None:
    """Drive the rounds from a thread of the session's own (a server's engine thread)."""
    if self._thread is None:
      self._thread = threading.Thread(target=self._serve, name="ssd_jax-session", daemon=True)
      self._thread.start()

  def _serve(self) -> None:
    try:
      while not self._stopping:
        if not self.step():
          with self._lock:
            if not self._waiting and not self._cancelled and not self._stopping:
              self._lock.wait(timeout=0.5)
    except Exception as e:  # a dead speculator, say: every request ends, none waits forever
      self._fail(f"{type(e).__name__}: {e}")

  def _fail(self, why: str) -> None:
    """The session thread cannot go on: each request it holds or queues ends with `why`, and
    `submit` refuses new ones with it."""
    with self._lock:
      self.failure = why
      waiting, self._waiting = list(self._waiting), collections.deque()
    for handle in [*waiting, *self.running()]:
      if not handle.done:
        handle._emit(Event(handle.id, [], "error", error=why))

  @property
  def alive(self) -> bool:
    """The session's thread runs (or was never started) and has not failed."""
    started = self._thread is not None
    return self.failure is None and (not started or self._thread.is_alive())

  def close(self) -> SpeculatorStats | None:
    """Stop the thread (if started), end what runs and waits (cancelled), and the draft side;
    what the draft side counted (None without one)."""
    self._stopping = True
    with self._lock:
      self._lock.notify_all()
    if self._thread is not None:
      self._thread.join()
    for handle in [*self.waiting(), *self.running()]:
      if not handle.done:
        handle._emit(Event(handle.id, [], "cancelled"))
    stats, self._draft = (self._draft.close() if self._draft is not None else None), None
    return stats

  def __enter__(self) -> Session:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _through_first_stop(tokens: list[int], stops: frozenset[int]) -> list[int]:
  """`tokens` through the first of `stops` (a stop token, or EOS) among them, which ends the
  request (it is kept, as EOS is)."""
  return tokens[: next(i for i, t in enumerate(tokens) if t in stops) + 1]
