"""The draft side of a run: the draft's params and state on its own mesh, and its programs.

The host loops (`loops.py`) talk to the draft only through this object's calls, so the same
loop drives a draft on a device of this process or, behind the same calls, one in a process of
its own:

  start(batch)     prefill the prompts into the draft cache
  propose(outcome) sd: commit the last outcome, draft `lookahead` tokens now
  first()          ssd: the first speculation (the speculation cache starts empty, so it is
                   drafted now)
  expand()         ssd: expand the speculation last handed out, while the target verifies it
  next(outcome)    ssd: look the outcome up in the cache that expansion built (a hit, or a
                   backup on a miss)

Arrays cross between the meshes with `jax.device_put`, asynchronously: the outcome (a few ints
per row) in, the speculation (tokens, and q when sampling) out. Nothing here waits for a device.

`serve` runs the same object in a speculator process, answering a target's calls over a channel
(`channel.py`; the target's side is `remote.RemoteSpeculator`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
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

  def next(self, outcome: Outcome) -> Speculation:
    """ssd: the speculation for `outcome`: cached on a hit, the backup's on a miss."""
    self.state, self._last = speculate.lookup(
      self.params, self.state, self._cache, self.put(outcome), plan=self.plan
    )
    self.timer.when_ready("draft", "lookup_done", self._last)
    return self._last

  def close(self) -> None:
    self.state = self._cache = self._last = None


def serve(conn, pipe, params: Params, mesh, config) -> None:
  """Answer one target's calls (see remote.RemoteSpeculator) until it says bye.

  After answering `first` or `next` it dispatches the expansion of the speculation just sent:
  it runs while the target verifies that speculation, and the next `next` finds its cache.
  """
  speculator, probes = None, {}

  def answer(speculation: Speculation) -> None:
    fields = {f.name: getattr(speculation, f.name) for f in dataclasses.fields(Speculation)}
    conn.send(
      {"op": "speculation", "arrays": pipe.pack({k: v for k, v in fields.items() if v is not None})}
    )

  while True:
    message = conn.receive()
    op = message["op"]
    if op == "start":
      speculator = LocalSpeculator(params, mesh, DraftPlan.from_json(message["plan"], config))
      a = pipe.unpack(message["arrays"])
      warp = Warp(temperature=a["temperature"], top_k=a["top_k"], top_p=a["top_p"])
      key = jax.random.wrap_key_data(a["key"])
      speculator.start(
        np.asarray(a["tokens"]), np.asarray(a["lengths"]), warp, key, message["capacity"]
      )
      speculator.ready()
      conn.send({"op": "started"})
    elif op == "first":
      answer(speculator.first())
      speculator.expand()
    elif op == "next":
      a = pipe.unpack(message["arrays"])
      answer(speculator.next(Outcome(**{f.name: a[f.name] for f in dataclasses.fields(Outcome)})))
      speculator.expand()
    elif op == "stop":
      if speculator is not None:
        speculator.close()
      speculator = None
    elif op == "probe":  # the channel's own cost: answer arrays of the asked shapes at once
      pipe.unpack(message["arrays"])
      shapes = {name: (dtype, tuple(shape)) for name, dtype, shape in message["reply"]}
      cached = probes.setdefault(
        str(shapes), {k: jax.device_put(np.zeros(s, d)) for k, (d, s) in shapes.items()}
      )
      conn.send({"op": "probe", "arrays": pipe.pack(cached)})
    elif op == "work":  # how independent this core is: the target times the same work
      seconds = run_work(message["size"])
      conn.send({"op": "work", "seconds": seconds})
    elif op == "bye":
      return
    else:
      raise ValueError(f"unknown request {op!r}")


def serve_connection(sock) -> None:
  """A speculator's whole life with one target: the hello (load the draft it names, place it on
  this process's first device, start the pipe), then `serve`. Any failure is sent to the target
  as an error message before it is raised here."""
  import jax.numpy as jnp  # noqa: PLC0415

  from ssd_jax.decode.channel import Connection, SharedMemoryPipe, TransferPipe  # noqa: PLC0415
  from ssd_jax.models.registry import load_model  # noqa: PLC0415
  from ssd_jax.models.weights import config_to_hf  # noqa: PLC0415

  conn = Connection(sock)
  pipe = None
  try:
    hello = conn.receive()
    if hello.get("op") != "hello" or hello.get("protocol") != 1:
      raise ValueError(f"expected a protocol-1 hello, got {hello!r:.80}")
    draft = load_model(hello["draft"], dtype=jnp.dtype(hello["dtype"]))
    device = jax.devices()[0]
    mesh = sharding.mesh_of([device])
    vocab = hello["draft_vocab"]
    params = draft_params(draft, mesh, tuple(vocab) if isinstance(vocab, list) else vocab)
    pipe = TransferPipe(device) if hello["pipe"] == "transfer" else SharedMemoryPipe()
    ready = {
      "op": "ready",
      "pid": os.getpid(),
      "config": config_to_hf(draft.config),
      "head_size": int(params["head_ids"].shape[0]) if "head_ids" in params else None,
    }
    if isinstance(pipe, TransferPipe):
      pipe.connect(hello["transfer_address"])
      ready["transfer_address"] = pipe.address
    conn.send(ready)
    serve(conn, pipe, params, mesh, draft.config)
  except Exception as e:
    with contextlib.suppress(Exception):
      conn.send({"op": "error", "message": f"{type(e).__name__}: {e}"})
    raise
  finally:
    if pipe is not None:
      pipe.close()
    conn.close()


@functools.partial(jax.jit, static_argnames="size")
def _work(x, *, size: int):
  w = jnp.full((size, 3 * size), 1e-3, jnp.float32)
  for _ in range(10):
    x = jnp.tanh(x @ w)[:, :size]
  return x


@functools.cache
def _work_input(size: int) -> jax.Array:
  x = jnp.ones((size, size), jnp.float32)
  jax.block_until_ready(_work(x, size=size))  # compiled and run once before any timing
  return x


def run_work(size: int) -> float:
  """Seconds of a fixed compute load (ten [size, size] @ [size, 3 size] products): run alone
  and at once in two processes, it says how independent their cores are."""
  x = _work_input(size)
  t = time.perf_counter()
  jax.block_until_ready(_work(x, size=size))
  return time.perf_counter() - t
