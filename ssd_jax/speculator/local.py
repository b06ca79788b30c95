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

from collections.abc import Sequence

import jax
import numpy as np

from ssd_jax import sharding
from ssd_jax.decode import draft as draft_lib
from ssd_jax.decode import speculate
from ssd_jax.decode.plan import DraftPlan
from ssd_jax.decode.sampling import Warp
from ssd_jax.decode.state import Outcome, Report, Speculation, SpeculationCache
from ssd_jax.models import placement
from ssd_jax.models.registry import LoadedModel
from ssd_jax.models.transformer import Params, head_subset
from ssd_jax.speculator.base import SpeculatorStats
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
  `base.Speculator`."""

  def __init__(self, params: Params, mesh: jax.sharding.Mesh, plan: DraftPlan, timer: Timer):
    self.params, self.mesh, self.plan, self.timer = params, mesh, plan, timer
    self.state = self.last = None
    self._cache: SpeculationCache | None = None
    self._last: Speculation | None = None  # the speculation last handed out

  def put(self, tree):
    """Place a pytree (host or another mesh's arrays) on the draft mesh."""
    return sharding.place(tree, self.mesh)

  def start(
    self, tokens: np.ndarray, lengths: np.ndarray, warp: Warp, key: jax.Array, capacity: int
  ) -> None:
    """Prefill right-padded prompts i32[B, P] (all but each pending last token)."""
    B = tokens.shape[0]
    cache = placement.init_cache(
      self.plan.config, self.mesh, B, capacity, self.params["embed"].dtype
    )
    last = np.asarray(tokens)[np.arange(B), np.asarray(lengths) - 1]  # from the host copies
    tokens, lengths, warp, key = self.put((tokens, lengths, warp, key))
    self.state = draft_lib.start(self.params, tokens, lengths, cache, warp, key, plan=self.plan)
    self.last = self.put(last)

  def ready(self) -> None:
    """Wait for the prefill (the loop's timing starts after it)."""
    jax.block_until_ready(self.state)

  def propose(self, outcome: Outcome | None) -> Speculation:
    """sd: commit `outcome` (None in the first round) and draft from its bonus token."""
    if outcome is not None:
      outcome = self.put(outcome)
      self.last = outcome.bonus
    self.state, speculation = draft_lib.propose(
      self.params, self.state, outcome, self.last, plan=self.plan
    )
    self.timer.when_ready("draft", "draft_done", speculation)
    return speculation

  def first(self) -> Speculation:
    """ssd: the first speculation, drafted now (the cache is empty: a miss, as in the
    reference)."""
    self.state, self._last = draft_lib.propose(
      self.params, self.state, None, self.last, plan=self.plan
    )
    return self._last

  def expand(self) -> SpeculationCache:
    """ssd: dispatch the expansion of the speculation last handed out. Called once the target's
    verification of it is dispatched, so both run at once (dispatched earlier, a cheap expansion
    can run inline in the dispatching thread and hold the target back)."""
    self.state, self._cache = speculate.expand(self.params, self.state, self._last, plan=self.plan)
    self.timer.when_ready("draft", "expand_done", self._cache)
    return self._cache

  def lookup(self, outcome: Outcome) -> Speculation:
    """ssd: the speculation for `outcome`: cached on a hit, the backup's on a miss."""
    self.state, self._last = speculate.lookup(
      self.params, self.state, self._cache, self.put(outcome), plan=self.plan
    )
    self.timer.when_ready("draft", "lookup_done", self._last)
    return self._last

  def next(self, report: Report) -> tuple[Speculation, Report]:
    """ssd: expand the speculation being verified, then look its outcome up. The outcome stays
    a future on the target's mesh: nothing here reads it."""
    self.expand()
    return self.lookup(report.outcome), report

  def close(self) -> SpeculatorStats:
    """End the run (its compilations happen in this process, where the caller counts them)."""
    self.state = self._cache = self._last = None
    return SpeculatorStats()


class LocalSite:
  """Speculators on a mesh of this process."""

  def __init__(self, params: Params, mesh: jax.sharding.Mesh):
    self.params, self.mesh = params, mesh

  def speculator(self, plan: DraftPlan, timer: Timer) -> LocalSpeculator:
    return LocalSpeculator(self.params, self.mesh, plan, timer)

  def start(self) -> None:
    pass

  @property
  def startup(self) -> None:
    return None

  def close(self) -> None:
    pass
