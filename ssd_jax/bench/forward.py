"""The cost of one forward against the number of new tokens: what verifying lookahead + 1 tokens
costs next to decoding one.

For each model (target and draft), cache fill and T new tokens, `models.forward` is jitted with
its cache donated (as every decode program runs it) and timed with and without the LM head;
`models.tree_forward` over N branches at tree step 0; and, as the floor, the same matrix products
alone (every layer's projections and MLP, plus the head, on [T, D] activations) in one scan.
Medians of `reps` calls after a warm-up, in milliseconds.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ssd_jax.harness.runs import environment
from ssd_jax.models import KVCache, TreeKV, forward, tree_forward
from ssd_jax.models.registry import load_model


def _median_ms(fn, state, reps: int) -> float:
  """fn(state) -> (state, out), timed `reps` times after one warm-up call (a donated state
  threads through)."""
  state, _ = jax.block_until_ready(fn(state))
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    state, _ = jax.block_until_ready(fn(state))
    times.append(time.perf_counter() - t)
  return float(np.median(times) * 1e3)


@functools.partial(jax.jit, static_argnames=("config", "logits"), donate_argnames="cache")
def _forward(params, tokens, cache, *, config, logits):
  out, cache = forward(params, tokens, cache, config=config, return_logits=logits)
  return cache, out


@functools.partial(jax.jit, static_argnames="config", donate_argnames="tree")
def _tree_step(params, tokens, cache, tree, *, depth, config):
  logits, tree = tree_forward(params, tokens, cache, tree, depth, jnp.int32(0), config=config)
  return tree, logits


@functools.partial(jax.jit, static_argnames=("config", "logits"))
def _products(params, x, *, config, logits):
  """Only the matrix products of one forward of x [1, T, D]: the weights streamed once each."""

  def layer(x, lp):
    q = jnp.einsum("BTD,DNH->BTNH", x, lp["wq"])
    k = jnp.einsum("BTD,DKH->BTKH", x, lp["wk"])
    v = jnp.einsum("BTD,DKH->BTKH", x, lp["wv"])
    o = jnp.einsum("BTNH,NHD->BTD", q, lp["wo"])
    h = jnp.einsum("BTD,DF->BTF", x, lp["w_gate"]) * jnp.einsum("BTD,DF->BTF", x, lp["w_up"])
    x = x + o + jnp.einsum("BTF,FD->BTD", h, lp["w_down"]) + (k.sum() + v.sum()) * 0
    return x, None

  x, _ = jax.lax.scan(layer, x, params["layers"])
  if logits:
    head = params["embed"].T if config.tie_embeddings else params["lm_head"]
    x = jnp.einsum("BTD,DV->BTV", x, head)
  return None, x


def _cache(config, fill: int, capacity: int) -> KVCache:
  return KVCache.init(config, 1, capacity).with_lengths(jnp.full((1,), fill))


def forward_row(params, config, fill: int, capacity: int, T: int, reps: int) -> dict:
  """forward and products-only milliseconds for T new tokens after `fill` cached ones."""
  rng = np.random.default_rng(T)
  tokens = jnp.asarray(rng.integers(0, config.vocab_size, (1, T)), jnp.int32)
  x = jnp.zeros((1, T, config.hidden_size), params["embed"].dtype)
  row = {"fill": fill, "new_tokens": T}
  for logits, suffix in ((False, ""), (True, "_logits")):
    step = functools.partial(_forward, params, tokens, config=config, logits=logits)
    row[f"forward{suffix}_ms"] = _median_ms(step, _cache(config, fill, capacity), reps)
    floor = functools.partial(_products, params, x, config=config, logits=logits)
    row[f"products{suffix}_ms"] = _median_ms(lambda _, floor=floor: floor(), None, reps)
  return row


def tree_row(params, config, fill: int, capacity: int, branches: int, reps: int) -> dict:
  """tree_forward milliseconds at tree step 0 for `branches` branches forked at depths 0..3."""
  tokens = jnp.zeros((1, branches), jnp.int32)
  depth = jnp.asarray(np.arange(branches) % 4, jnp.int32)
  step = functools.partial(
    _tree_step, params, tokens, _cache(config, fill, capacity), depth=depth, config=config
  )
  tree = TreeKV.init(config, 1, 4, branches)
  return {
    "fill": fill,
    "branches": branches,
    "tree_step_ms": _median_ms(step, tree, reps),
  }


def model_costs(model, fills, new_tokens, branches, reps) -> list[dict[str, Any]]:
  config, params = model.config, jax.device_put(model.params)
  rows = []
  for fill in fills:
    capacity = fill + max(new_tokens) + 8
    rows += [forward_row(params, config, fill, capacity, T, reps) for T in new_tokens]
    rows += [tree_row(params, config, fill, capacity, n, reps) for n in branches]
  for row in rows:
    row["model"] = model.name
    print(row, flush=True)
  return rows


@dataclasses.dataclass(frozen=True, kw_only=True)
class ForwardOptions:
  """`bench forward`: the models, cache fills, new tokens per forward, tree branches, reps."""

  models: tuple[str, ...] = ("smollm2-135m", "smollm2-135m-draft")
  fills: tuple[int, ...] = (256, 1024, 4096)
  new_tokens: tuple[int, ...] = (1, 2, 4, 8, 16)
  branches: tuple[int, ...] = (8, 24)
  reps: int = 12


def forward_costs(options: ForwardOptions) -> dict[str, Any]:
  rows = []
  for name in options.models:
    model = load_model(name)
    rows += model_costs(model, options.fills, options.new_tokens, options.branches, options.reps)
  return {"environment": environment(), "rows": rows, "summary": summarize(rows)}


def summarize(rows: list[dict]) -> list[dict]:
  """Forward at T over forward at T = 1, per model and fill (the issue's goal: T = 4 within
  1.25x, T = 8 within 1.5x), beside the same ratio of the products alone."""
  out = []
  for r in rows:
    if "new_tokens" not in r:
      continue
    base = next(
      b
      for b in rows
      if b.get("new_tokens") == 1 and (b["model"], b["fill"]) == (r["model"], r["fill"])
    )
    out.append(
      {
        "model": r["model"],
        "fill": r["fill"],
        "new_tokens": r["new_tokens"],
        "forward_over_one": r["forward_ms"] / base["forward_ms"],
        "forward_logits_over_one": r["forward_logits_ms"] / base["forward_logits_ms"],
        "products_over_one": r["products_ms"] / base["products_ms"],
      }
    )
  return out
