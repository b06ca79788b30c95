"""A speculator process's side of the channel: the hello (load the draft the target names),
then its calls answered by a `LocalSpeculator` on this process's device.

  start   prefill (answered once done, so the target's timing starts after it)
  first   the first speculation, sent; then its expansion dispatched
  next    lookup for the outcome (a hit, or the backup), sent; then its expansion dispatched
          (greedy runs: the speculation is sent only when some row missed, and each expansion's
          cache is sent once computed: the target serves every-row hits from it itself)
  stop    the run is over;  bye: the target is done with this speculator
  probe   the channel's own cost (arrays of asked shapes, answered at once)
  work    a fixed load (compute-bound, or memory-bound like a decode step), timed: how
          independent this process's core and its share of memory bandwidth are

Every answer crosses on the pipe; expansions run while the target verifies what was just sent.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from ssd_jax import sharding
from ssd_jax.decode.channel import (
  CACHE_FIELDS,
  OUTCOME_FIELDS,
  PROTOCOL,
  SPECULATION_FIELDS,
  Connection,
  SharedMemoryPipe,
  TransferPipe,
)
from ssd_jax.decode.metrics import count_compiles
from ssd_jax.decode.plan import DraftPlan
from ssd_jax.decode.sampling import Warp
from ssd_jax.decode.speculator import LocalSpeculator, draft_params
from ssd_jax.decode.state import Outcome, Speculation
from ssd_jax.models.registry import load_model
from ssd_jax.models.transformer import Params
from ssd_jax.models.weights import config_to_hf


def serve(conn, pipe, params: Params, mesh, config) -> None:
  """Answer one target's calls (see remote.RemoteSpeculator) until it says bye.

  After answering `first` or `next` it dispatches the expansion of the speculation just sent:
  it runs while the target verifies that speculation, and the next `next` finds its cache.
  """
  with count_compiles() as compiles:
    _serve(conn, pipe, params, mesh, config, compiles)


def _serve(conn, pipe, params: Params, mesh, config, compiles: list[str]) -> None:
  speculator, probes = None, {}
  compiled_before = 0

  def answer(speculation: Speculation) -> None:
    fields = {f: getattr(speculation, f) for f in SPECULATION_FIELDS}
    arrays = pipe.pack({k: v for k, v in fields.items() if v is not None}, slot="speculation")
    conn.send({"op": "speculation", "arrays": arrays})

  def expand() -> None:
    """Dispatch the expansion of the speculation just sent; in greedy runs, send its cache once
    computed (the target reads it after its verification, which runs meanwhile)."""
    speculator.expand()
    if speculator.plan.greedy:
      fields = {f: getattr(speculator.cache, f) for f in CACHE_FIELDS}
      conn.send({"op": "cache", "arrays": pipe.pack(fields, slot="cache")})

  while True:
    message = conn.receive()
    op = message["op"]
    if op == "start":
      compiled_before = len(compiles)
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
      expand()
    elif op == "next":
      a = pipe.unpack(message["arrays"])
      speculation = speculator.next(Outcome(**{f: a[f] for f in OUTCOME_FIELDS}))
      # Greedy: where every row hit, the target has served this speculation from the cache.
      if not (speculator.plan.greedy and np.asarray(speculation.hit).all()):
        answer(speculation)
      expand()
    elif op == "stop":  # answered with the compilations since this run's start
      if speculator is not None:
        speculator.close()
      speculator = None
      conn.send({"op": "stopped", "compiles": len(compiles) - compiled_before})
    elif op == "probe":  # the channel's own cost: answer arrays of the asked shapes at once
      pipe.unpack(message["arrays"])
      shapes = {name: (dtype, tuple(shape)) for name, dtype, shape in message["reply"]}
      cached = probes.setdefault(
        str(shapes), {k: jax.device_put(np.zeros(s, d)) for k, (d, s) in shapes.items()}
      )
      conn.send({"op": "probe", "arrays": pipe.pack(cached)})
    elif op == "work":  # how independent this core is: the target times the same work
      seconds = run_work(message["size"], message.get("kind", "compute"))
      conn.send({"op": "work", "seconds": seconds})
    elif op == "bye":
      return
    else:
      raise ValueError(f"unknown request {op!r}")


def serve_connection(sock) -> None:
  """A speculator's whole life with one target: the hello (load the draft it names, place it on
  this process's first device, start the pipe), then `serve`. Any failure is sent to the target
  as an error message before it is raised here."""
  conn = Connection(sock)
  pipe = None
  try:
    hello = conn.receive()
    if hello.get("op") != "hello" or hello.get("protocol") != PROTOCOL:
      raise ValueError(f"expected a protocol-{PROTOCOL} hello, got {hello!r:.80}")
    draft = load_model(hello["draft"], dtype=jnp.dtype(hello["dtype"]))
    device = jax.devices()[0]
    mesh = sharding.mesh_of([device])
    vocab = hello["draft_vocab"]
    params = draft_params(draft, mesh, tuple(vocab) if isinstance(vocab, list) else vocab)
    here = sock.getsockname()[0]  # where the target reaches this host
    pipe = TransferPipe(device, here) if hello["pipe"] == "transfer" else SharedMemoryPipe()
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


WORK_KINDS = ("compute", "memory")
MEMORY_WORK_BYTES = 256 << 20  # streamed per memory-bound run: far more than a CPU's last cache


@functools.partial(jax.jit, static_argnames="size")
def _compute_work(x, *, size: int):
  w = jnp.full((size, 3 * size), 1e-3, jnp.float32)
  for _ in range(10):
    x = jnp.tanh(x @ w)[:, :size]
  return x


@jax.jit
def _memory_work(x, weights):
  """Four rows through a stack of [size, size] matrices, as a decode step streams its weights:
  each matrix is read from memory once and used for little arithmetic."""
  return jax.lax.scan(lambda x, w: (jnp.tanh(x @ w), None), x, weights)[0]


@functools.cache
def _work_inputs(size: int, kind: str) -> tuple[jax.Array, ...]:
  if kind == "compute":
    inputs = (jnp.ones((size, size), jnp.float32),)
  elif kind == "memory":
    layers = max(1, MEMORY_WORK_BYTES // (size * size * 4))
    inputs = (jnp.ones((4, size), jnp.float32), jnp.full((layers, size, size), 1e-3, jnp.float32))
  else:
    raise ValueError(f"work kind must be one of {WORK_KINDS}, got {kind!r}")
  jax.block_until_ready(_work(inputs, size, kind))  # compiled and run once before any timing
  return inputs


def _work(inputs, size: int, kind: str) -> jax.Array:
  return _compute_work(*inputs, size=size) if kind == "compute" else _memory_work(*inputs)


def run_work(size: int, kind: str = "compute") -> float:
  """Seconds of a fixed load, run alone and at once in two processes to say how independent
  their cores are: "compute", ten [size, size] @ [size, 3 size] products (cache-resident), or
  "memory", MEMORY_WORK_BYTES of [size, size] matrices streamed through four rows (a decode
  step's access pattern: on one host the two processes then share the memory bandwidth)."""
  inputs = _work_inputs(size, kind)
  t = time.perf_counter()
  jax.block_until_ready(_work(inputs, size, kind))
  return time.perf_counter() - t
