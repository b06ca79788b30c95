"""Operations a speculator process answers for the benchmarks only, beside its protocol: a
speculator started with `--extension ssd_jax.bench.probes` (`SpeculatorOptions.extensions`)
registers them.

  probe   the channel's own cost: arrays of the asked shapes, answered at once
  work    a fixed load, timed there (compute-bound, or memory-bound like a decode step): how
          independent the speculator's core and its share of memory bandwidth are
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ssd_jax.speculator import worker

MODULE = __name__  # what a speculator process is told to import
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


_probe_replies: dict[str, dict[str, jax.Array]] = {}


def _probe(message: dict[str, Any], conn, pipe) -> None:
  pipe.unpack(message["arrays"])
  shapes = {name: (dtype, tuple(shape)) for name, dtype, shape in message["reply"]}
  reply = _probe_replies.setdefault(
    str(shapes), {k: jax.device_put(np.zeros(s, d)) for k, (d, s) in shapes.items()}
  )
  conn.send({"op": "probe", "arrays": pipe.pack(reply)})


def _timed_work(message: dict[str, Any], conn, pipe) -> None:
  del pipe
  conn.send({"op": "work", "seconds": run_work(message["size"], message.get("kind", "compute"))})


worker.register("probe", _probe)
worker.register("work", _timed_work)
