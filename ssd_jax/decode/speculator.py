"""The draft side of a run: the draft's params and state on its own mesh, and its programs.

The host loops (`loops.py`) talk to the draft only through this object's calls, so the same
loop drives a draft on a device of this process or, behind the same calls, one in a process of
its own:

  start(tokens, lengths, warp, key, capacity)
                   prefill the prompts into the draft cache (asynchronously)
  ready()          wait for that prefill (so a run's timing starts after it)
  propose(outcome) sd: commit the last outcome, draft `lookahead` tokens now
  first()          ssd: the first speculation (the speculation cache starts empty, so it is
                   drafted now)
  expand()         ssd: expand the speculation last handed out, while the target verifies it
  next(outcome)    ssd: look the outcome up in the cache that expansion built (a hit, or a
                   backup on a miss)
  close()          end the run

Arrays cross between the meshes with `jax.device_put`, asynchronously: the outcome (a few ints
per row) in, the speculation (tokens, and q when sampling) out. Nothing here waits for a device.

In a speculator process `serving.serve` runs the same object, answering a target's calls over a
channel (`channel.py`; the target's side is `remote.RemoteSpeculator`).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from ssd_jax import sharding
from ssd_jax.decode import draft as draft_lib
from ssd_jax.decode import speculate
from ssd_jax.decode.metrics import NullTimer
from ssd_jax.decode.plan import DraftPlan
from ssd_jax.decode.sampling import Warp
from ssd_jax.decode.state import Outcome, Speculation, SpeculationCache
from ssd_jax.models import placement
from ssd_jax.models.registry import LoadedModel
from ssd_jax.models.transformer import Params, head_subset


def draft_params(draft: LoadedModel, mesh, draft_vocab: int | Sequence[int] | None) -> Params:
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
      "draft_vocab=N cannot pick its N most frequent tokens: pass explicit token ids, or omit "
      "draft_vocab to score the whole vocabulary"
    )
  if draft_vocab > draft.token_ranking.size:
    raise ValueError(
      f"draft_vocab={draft_vocab} but the token ranking of {draft.name!r} lists only "
      f"{draft.token_ranking.size} tokens"
    )
  return draft.token_ranking[:draft_vocab]


class LocalSpeculator:
  """The draft side on `mesh`, in this process (see the module docstring)."""

  reads_outcome = False  # `next` takes the outcome on the target's mesh, as a future

  def __init__(self, params: Params, mesh: jax.sharding.Mesh, plan: DraftPlan, timer=None):
    self.params, self.mesh, self.plan = params, mesh, plan
    self.timer = timer or NullTimer()
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

  def expand(self) -> None:
    """ssd: dispatch the expansion of the speculation last handed out, once the target's
    verification of it is dispatched: both then run at once. (Dispatched earlier, a cheap
    expansion can run inline in the dispatching thread and hold the target back.)"""
    self.state, self._cache = speculate.expand(self.params, self.state, self._last, plan=self.plan)
    self.timer.when_ready("draft", "expand_done", self._cache)

  @property
  def cache(self) -> SpeculationCache | None:
    """The speculation cache of the last expansion (a speculator process sends it to the target
    in greedy runs, which then serves hits itself)."""
    return self._cache

  def next(self, outcome: Outcome) -> Speculation:
    """ssd: the speculation for `outcome`: cached on a hit, the backup's on a miss."""
    self.state, self._last = speculate.lookup(
      self.params, self.state, self._cache, self.put(outcome), plan=self.plan
    )
    self.timer.when_ready("draft", "lookup_done", self._last)
    return self._last

  def close(self) -> None:
    """End the run (its compilations are counted by the caller, in this process)."""
    self.state = self._cache = self._last = None
