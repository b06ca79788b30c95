"""The draft side of a run: the draft's params and state on its own mesh, and its programs.

The host loops (`loops.py`) talk to the draft only through this object's four calls, so the same
loop drives a draft on a device of this process or, behind the same calls, one in a process of
its own:

  start(batch)     prefill the prompts into the draft cache
  propose(outcome) sd: commit the last outcome, draft `lookahead` tokens now
  first()          ssd: the first speculation (the speculation cache starts empty, so it is
                   drafted now), then expand it at once
  next(outcome)    ssd: look the outcome up in the cache built while the target verified (a hit,
                   or a backup on a miss), then expand that speculation in turn

Arrays cross between the meshes with `jax.device_put`, asynchronously: the outcome (a few ints
per row) in, the speculation (tokens, and q when sampling) out. Nothing here waits for a device.
"""

from __future__ import annotations

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
from ssd_jax.models.transformer import Params


class LocalSpeculator:
  """The draft side on `mesh`, in this process (see the module docstring)."""

  def __init__(self, params: Params, mesh: jax.sharding.Mesh, plan: DraftPlan, timer=None):
    self.params, self.mesh, self.plan = params, mesh, plan
    self.timer = timer or NullTimer()
    self.state = self.last = None
    self._cache: SpeculationCache | None = None

  def put(self, tree):
    """Place a pytree (host or another mesh's arrays) on the draft mesh."""
    return jax.device_put(tree, sharding.replicated(self.mesh))

  def start(
    self, tokens: np.ndarray, lengths: np.ndarray, warp: Warp, key: jax.Array, capacity: int
  ) -> None:
    """Prefill right-padded prompts i32[B, P] (all but each pending last token)."""
    B = tokens.shape[0]
    cache = placement.init_cache(
      self.plan.config, self.mesh, B, capacity, self.params["embed"].dtype
    )
    tokens, lengths, warp, key = self.put((tokens, lengths, warp, key))
    self.state = draft_lib.start(self.params, tokens, lengths, cache, warp, key, plan=self.plan)
    self.last = self.put(np.asarray(tokens)[np.arange(B), np.asarray(lengths) - 1])

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
    """ssd: the first speculation, drafted now (a miss, as in the reference), then expanded."""
    self.state, speculation = draft_lib.propose(
      self.params, self.state, None, self.last, plan=self.plan
    )
    self._expand(speculation)
    return speculation

  def next(self, outcome: Outcome) -> Speculation:
    """ssd: the speculation for `outcome` (cached, or the backup's), then its expansion."""
    self.state, speculation = speculate.lookup(
      self.params, self.state, self._cache, self.put(outcome), plan=self.plan
    )
    self.timer.when_ready("draft", "lookup_done", speculation)
    self._expand(speculation)
    return speculation

  def _expand(self, speculation: Speculation) -> None:
    """Dispatch the expansion of `speculation`: it runs while the target verifies it."""
    self.state, self._cache = speculate.expand(self.params, self.state, speculation, plan=self.plan)
    self.timer.when_ready("draft", "expand_done", self._cache)

  def close(self) -> None:
    self.state = self._cache = None
