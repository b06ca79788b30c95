"""Prompt batches: padding to length buckets, and the jitted prefill into a KV cache.

Prompt lengths are rounded up to a bucket so that a handful of compiled programs serve every
prompt; padding tokens write keys/values beyond each sequence's length, where they are never
read (see kv_cache.py) and are overwritten by the next tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ssd_jax.config import ModelConfig
from ssd_jax.models.kv_cache import KVCache
from ssd_jax.models.transformer import Params, forward

MIN_BUCKET = 16


def bucket_length(n: int, capacity: int | None = None) -> int:
  """The smallest power of two >= max(n, MIN_BUCKET), capped at `capacity`."""
  b = max(MIN_BUCKET, 1 << max(0, n - 1).bit_length())
  return min(b, capacity) if capacity else b


def pad_prompts(
  prompts: Sequence[Sequence[int]], capacity: int, pad_id: int = 0
) -> tuple[np.ndarray, np.ndarray]:
  """Right-pad token lists to one bucket length.

  Returns:
    tokens i32[B, P] and lengths i32[B].

  Raises:
    ValueError: an empty prompt, or one that does not fit the cache.
  """
  lengths = np.array([len(p) for p in prompts], np.int32)
  if len(prompts) == 0 or (lengths == 0).any():
    raise ValueError("every prompt needs at least one token")
  if lengths.max() > capacity:
    raise ValueError(
      f"a prompt has {lengths.max()} tokens but the KV cache holds {capacity}; raise the cache "
      "capacity (--max-cache-len) or shorten the prompt"
    )
  P = bucket_length(int(lengths.max()), capacity)
  tokens = np.full((len(prompts), P), pad_id, np.int32)
  for i, p in enumerate(prompts):
    tokens[i, : len(p)] = p
  return tokens, lengths


@functools.partial(jax.jit, static_argnames=("config", "attention_impl"), donate_argnames="cache")
def prefill(
  params: Params,
  tokens: jax.Array,
  lengths: jax.Array,
  cache: KVCache,
  *,
  config: ModelConfig,
  attention_impl: str = "xla",
) -> KVCache:
  """Write the keys/values of `tokens` (i32[B, P]) from slot 0 and commit `lengths` (i32[B]).

  `cache` is donated: its buffers are reused for the result.
  """
  start = cache.with_lengths(jnp.zeros_like(cache.lengths))
  _, cache = forward(
    params,
    tokens,
    start,
    config=config,
    attention_impl=attention_impl,
    return_logits=False,
    kv_window=tokens.shape[1],
  )
  return cache.with_lengths(lengths)


@functools.partial(jax.jit, static_argnames=("config", "attention_impl"))
def prefill_window(
  params: Params, tokens: jax.Array, *, config: ModelConfig, attention_impl: str = "xla"
) -> KVCache:
  """The keys/values of k right-padded prompts (i32[k, P]) as a k-row cache of P slots, to be
  written into slots of a larger cache (`KVCache.write_rows`). Compiled once per (k, P),
  whatever the batch they join."""
  k, P = tokens.shape
  window = KVCache.init(config, k, P, params["embed"].dtype)
  _, window = forward(
    params,
    tokens,
    window,
    config=config,
    attention_impl=attention_impl,
    return_logits=False,
    kv_window=P,
  )
  return window
