"""The draft side on a mesh of this process: `LocalSpeculator` (the `Speculator` contract of
`base.py`) and `LocalSite`, which hands one out per run.

Arrays cross between the meshes with `jax.device_put`, asynchronously: the outcome (a few ints
per row) in, the speculation (tokens, and q when sampling) out. Nothing here waits for a device.
In a speculator process `worker.serve` runs the same object, answering a target's calls over a
channel.

The draft's head: `Engine(draft_vocab=)` restricts it to a token subset (`head_subset`); by
default a draft that ships a token ranking scores its DEFAULT_DRAFT_VOCAB most frequent tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ssd_jax import sharding
from ssd_jax.decode import draft as draft_lib
from ssd_jax.decode import slots, speculate
from ssd_jax.decode.plan import DraftPlan
from ssd_jax.decode.state import DraftState, Outcome, Report, Speculation, SpeculationCache
from ssd_jax.models import placement
from ssd_jax.models.prefill import prefill_window
from ssd_jax.models.registry import LoadedModel
from ssd_jax.models.transformer import Params, head_subset
from ssd_jax.speculator.base import Join, PlanKey, Reshape, SpeculatorStats, admissions
from ssd_jax.timing import Timer

# The default draft head: a draft that ships a token ranking scores its N most frequent tokens
# (capped at the ranking's length). In the default run that makes proposals 1.5x and expansions
# 3x cheaper at the same tokens per round (docs/BENCHMARKS.md); outputs never change.
DEFAULT_DRAFT_VOCAB = 8192

DraftVocab = int | Sequence[int] | None


def default_draft_vocab(draft: LoadedModel, draft_vocab: DraftVocab = None) -> DraftVocab:
  """The head a draft runs with: `draft_vocab` as given (0: the whole vocabulary), or by default
  (None) its DEFAULT_DRAFT_VOCAB most frequent tokens when it ships a token ranking, else all."""
  if draft_vocab is None:
    if draft.token_ranking is None:
      return None
    n = min(DEFAULT_DRAFT_VOCAB, draft.token_ranking.size)
    return None if n >= draft.config.vocab_size else n  # all of it: no restriction to make
  if isinstance(draft_vocab, int | np.integer) and draft_vocab == 0:
    return None
  return draft_vocab


def draft_params(draft: LoadedModel, mesh, draft_vocab: DraftVocab) -> Params:
  """The draft's params placed on `mesh`, its head restricted to `draft_vocab` if given (the
  first N of its token ranking, or explicit token ids; see `transformer.head_subset`)."""
  params = placement.place_params(draft.params, draft.config, mesh)
  if draft_vocab is None:
    return params
  head = head_subset(draft.params, vocab_ids(draft, draft_vocab), draft.config)
  return params | jax.device_put(head, sharding.replicated(mesh))


def vocab_ids(draft: LoadedModel, draft_vocab: int | Sequence[int]) -> np.ndarray:
  """The token ids a restricted draft head scores: the first N of the draft's token ranking,
  or an explicit list."""
  if not isinstance(draft_vocab, int | np.integer):
    return np.asarray(draft_vocab)
  vocab = draft.config.vocab_size
  if not 1 <= draft_vocab <= vocab:
    raise ValueError(
      f"draft_vocab must be in [1, {vocab}] (the vocabulary size), got {draft_vocab}"
    )
  if draft.token_ranking is None:
    raise ValueError(
      f"draft {draft.name!r} has no token ranking (token_ranking.npy in its directory), so "
      "draft_vocab=N cannot pick its N most frequent tokens: pass explicit token ids, or 0 "
      "(or nothing) to score the whole vocabulary"
    )
  if draft_vocab > draft.token_ranking.size:
    raise ValueError(
      f"draft_vocab={draft_vocab} but the token ranking of {draft.name!r} lists only "
      f"{draft.token_ranking.size} tokens"
    )
  return draft.token_ranking[:draft_vocab]


def head_size(params: Params, config) -> int:
  """Columns of a draft's LM head (its vocabulary unless restricted)."""
  ids = params.get("head_ids")
  return config.vocab_size if ids is None else int(ids.shape[0])


class LocalSpeculator:
  """The draft side on `mesh`, in this process: sd's `base.Drafter` and ssd's
  `base.Speculator`, for one session of a persistent batch.

  Args:
    plans: the draft plan of each (batch size, every row greedy) the session may run.
  """

  def __init__(
    self, params: Params, mesh: jax.sharding.Mesh, plans: dict[PlanKey, DraftPlan], timer: Timer
  ):
    self.params, self.mesh, self.plans, self.timer = params, mesh, plans, timer
    self.state: DraftState | None = None
    self.pending: Speculation | None = None  # ssd: the speculation to verify (and expand) next
    self._cache: SpeculationCache | None = None
    self.greedy = True
    self._fresh = self._pending_tokens = None  # sd: rows joined since the last proposal

  @property
  def plan(self) -> DraftPlan:
    return self.plans[(self.batch_size, self.greedy)]

  @property
  def batch_size(self) -> int:
    return self.state.cache.batch_size

  def put(self, tree):
    """Place a pytree (host or another mesh's arrays) on the draft mesh."""
    return sharding.place(tree, self.mesh)

  def open(self, batch_size: int, capacity: int) -> Speculation | None:
    """An empty batch of `batch_size` free rows of `capacity` slots each; ssd: the (empty)
    pending speculation."""
    config = next(iter(self.plans.values())).config
    cache = placement.init_cache(
      config, self.mesh, batch_size, capacity, self.params["embed"].dtype
    )
    rows = self.put(dataclasses.replace(slots.empty_draft(cache), cache=None))
    self.state = dataclasses.replace(rows, cache=cache)  # the cache as created, in its sharding
    self.pending = self.put(empty_speculation(batch_size, self.plan))
    self._fresh = np.zeros(batch_size, bool)
    self._pending_tokens = np.zeros(batch_size, np.int32)
    return self.pending if self.plan.expands else None

  def reshape(self, change: Reshape) -> Speculation | None:
    """Apply a boundary's change: rows moved to another batch size, requests joined, the plan
    switched between greedy and sampled. ssd: returns the pending speculation, each joined row's
    replaced by a first proposal drafted now (a forced miss: nothing of the slot's previous
    occupant is ever served to it); sd: the next proposal drafts for the joined rows."""
    if change.index is not None:
      index = self.put(change.index)
      self.state = slots.take_draft(self.state, index)
      self.pending = slots.take_speculation(self.pending, index)
      self._fresh = self._fresh[change.index] | change.free
      self._pending_tokens = self._pending_tokens[change.index]
    for tokens, admission in admissions(change.joins, change.bulk, self.batch_size):
      window = prefill_window(
        self.params,
        self.put(tokens),
        config=self.plan.config,
        attention_impl=self.plan.attention_impl,
      )
      self.state = slots.admit_draft(self.state, window, self.put(admission))
      self._fresh[admission.slot], self._pending_tokens[admission.slot] = True, admission.last
    self.greedy = change.greedy
    if not self.plan.expands:  # sd: the next proposal starts the joined rows
      return None
    self.pending = self.put(_as_plan(self.pending, self.plan))
    if change.joins:
      self.state, first = draft_lib.propose(
        self.params,
        self.state,
        self._nothing(),
        self.put(self._pending_tokens),
        self.put(np.ones(self.batch_size, bool)),
        plan=self.plan,
      )
      joined = np.zeros(self.batch_size, bool)
      joined[[j.slot for j in change.joins]] = True
      self.pending = slots.patch_speculation(self.pending, first, self.put(joined))
      self._fresh[:] = False
    return self.pending

  def _nothing(self) -> Outcome:
    """`Outcome.nothing` as a round's outcome reaches `propose` (device arrays on the draft
    mesh, not host ones, which would compile a program of their own)."""
    return jax.device_put(Outcome.nothing(self.batch_size), sharding.replicated(self.mesh))

  def warm_up(self, buckets: tuple[int, ...], prompt_buckets: tuple[int, ...]) -> None:
    """Compile the draft side's between-rounds programs at every shape they may meet (its
    rounds' programs compiled in the session's warm-up rounds): the prefill of every prompt
    bucket, a row entering at every batch size, rows moving between batch sizes, a pending
    speculation changing variant and taking first proposals."""
    capacity, live = self.state.cache.capacity, (self.state, self.pending, self.greedy)

    def empty(b: int, greedy: bool) -> None:  # b free rows, the pending speculation in the variant
      self.open(b, capacity)
      self.greedy = greedy
      self.pending = self.put(_as_plan(self.pending, self.plan))

    for b in buckets:
      self.open(b, capacity)
      for greedy in (True, False, True):
        joins = tuple(
          _warm_join(slot, P) for slot, P in zip(range(b), prompt_buckets, strict=False)
        )
        self.reshape(Reshape(index=None, free=None, joins=joins, greedy=greedy))
        for P in prompt_buckets[b:]:  # prompt buckets the first joins left out
          self.reshape(Reshape(index=None, free=None, joins=(_warm_join(0, P),), greedy=greedy))
        # Rows move with the pending speculation in either form a session may hold then: as
        # `open` made it (host arrays) or as a program left it (device arrays, committed),
        # which compile apart.
        for b2 in buckets:
          for joined in (False, True):
            empty(b, greedy)
            if joined:
              self.reshape(Reshape(None, None, (_warm_join(0, prompt_buckets[0]),), greedy))
            self.reshape(Reshape(np.zeros(b2, np.int32), np.ones(b2, bool), (), greedy))
        empty(b, greedy)  # the next variant's joins at this size again
      jax.block_until_ready(self.state)
    self.state, self.pending, self.greedy = live
    self._fresh = np.zeros(self.batch_size, bool)
    self._pending_tokens = np.zeros(self.batch_size, np.int32)

  def ready(self) -> None:
    """Wait for what was dispatched (the loop's timing starts after the prefill)."""
    jax.block_until_ready((self.state, self.pending))

  def propose(self, outcome: Outcome | None) -> Speculation:
    """sd: commit `outcome` (None before the first round) and draft from each row's bonus token
    (a joined row's from its prompt's last token)."""
    if outcome is None:  # the first proposal: every row starts from its prompt
      outcome, fresh = self._nothing(), np.ones(self.batch_size, bool)
    else:
      outcome, fresh = self.put(outcome), self._fresh
    self.state, speculation = draft_lib.propose(
      self.params,
      self.state,
      outcome,
      self.put(self._pending_tokens),
      self.put(fresh),
      plan=self.plan,
    )
    self._fresh = np.zeros(self.batch_size, bool)
    self.timer.when_ready("draft", "draft_done", speculation)
    return speculation

  def expand(self) -> SpeculationCache:
    """ssd: dispatch the expansion of the pending speculation. Called once the target's
    verification of it is dispatched, so both run at once (dispatched earlier, a cheap expansion
    can run inline in the dispatching thread and hold the target back)."""
    self.state, self._cache = speculate.expand(
      self.params, self.state, self.pending, plan=self.plan
    )
    self.timer.when_ready("draft", "expand_done", self._cache)
    return self._cache

  def lookup(self, outcome: Outcome) -> Speculation:
    """ssd: the speculation for `outcome`: cached on a hit, the backup's on a miss."""
    self.state, self.pending = speculate.lookup(
      self.params, self.state, self._cache, self.put(outcome), plan=self.plan
    )
    self.timer.when_ready("draft", "lookup_done", self.pending)
    return self.pending

  def next(self, report: Report) -> tuple[Speculation, Report]:
    """ssd: expand the speculation being verified, then look its outcome up. The outcome stays
    a future on the target's mesh: nothing here reads it."""
    self.expand()
    return self.lookup(report.outcome), report

  def close(self) -> SpeculatorStats:
    """End the session (its compilations happen in this process, where the caller counts
    them)."""
    self.state = self._cache = self.pending = None
    return SpeculatorStats()


def _warm_join(slot: int, prompt_bucket: int) -> Join:
  """A request of one token in a prompt bucket (compiling, never decoded)."""
  return Join(
    slot=slot,
    tokens=np.zeros((1, prompt_bucket), np.int32),
    length=1,
    max_new=1,
    temperature=0.0,
    top_k=0,
    top_p=1.0,
    seed=np.zeros(2, np.uint32),
  )


def empty_speculation(batch_size: int, plan: DraftPlan) -> Speculation:
  """No proposal yet: what free rows carry (they are done, so nothing verifies it)."""
  return Speculation(
    tokens=np.zeros((batch_size, plan.lookahead + 1), np.int32),
    probs=None,
    point_mass=np.zeros(batch_size, bool),
    hit=np.zeros(batch_size, bool),
  )


def _as_plan(speculation: Speculation, plan: DraftPlan) -> Speculation:
  """A pending speculation in `plan`'s form: greedy plans move no distributions; a sampled plan
  after a greedy one gets point masses (every row drafted greedily, deterministically: q is the
  point mass on its token, which verification takes exactly)."""
  if plan.greedy:
    return dataclasses.replace(speculation, probs=None)
  if speculation.probs is not None:
    return speculation
  B, lookahead = speculation.tokens.shape[0], plan.lookahead
  return dataclasses.replace(
    speculation,
    probs=jnp.zeros((B, lookahead, plan.config.vocab_size), jnp.float32),
    point_mass=jnp.ones((B,), bool),
  )


class LocalSite:
  """Speculators on a mesh of this process."""

  def __init__(self, params: Params, mesh: jax.sharding.Mesh):
    self.params, self.mesh = params, mesh

  def speculator(self, plans: dict[PlanKey, DraftPlan], timer: Timer) -> LocalSpeculator:
    return LocalSpeculator(self.params, self.mesh, plans, timer)

  def start(self) -> None:
    pass

  @property
  def startup(self) -> None:
    return None

  def gone(self) -> None:
    return None

  def close(self) -> None:
    pass
