"""Plain-jnp reference of tree attention: the specification every implementation must match.

Written for clarity, not speed: one sequence and one query at a time, an explicit list of the
keys each query may see, then a softmax. Tests compare every other implementation to this.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def tree_attention_reference(
  q: jax.Array,  # [B, T, N, H]
  k: jax.Array,  # [B, S, K, H]
  v: jax.Array,  # [B, S, K, H]
  lengths: jax.Array,  # i32[B]
  depth: jax.Array,  # i32[B, T]
  tree_k: jax.Array | None = None,  # [B, R, T, K, H]
  tree_v: jax.Array | None = None,  # [B, R, T, K, H]
  tree_step: jax.Array | int | None = None,
  *,
  scale: float,
) -> jax.Array:
  """Query t of sequence b attends to main slots s < lengths[b] + depth[b, t] + 1 and, if a tree
  is given, to its own tree slots (r, t) for r <= tree_step. Returns [B, T, N, H]."""
  B, T, N, _ = q.shape
  K = k.shape[2]
  G = N // K
  S = k.shape[1]
  outputs = []
  for b in range(B):
    rows = []
    for t in range(T):
      visible = jnp.arange(S) < lengths[b] + depth[b, t] + 1  # bool[S]
      keys, values, mask = k[b], v[b], visible
      if tree_k is not None:
        R = tree_k.shape[1]
        keys = jnp.concatenate([keys, tree_k[b, :, t]], axis=0)  # [S + R, K, H]
        values = jnp.concatenate([values, tree_v[b, :, t]], axis=0)
        mask = jnp.concatenate([mask, jnp.arange(R) <= tree_step])
      heads = []
      for n in range(N):
        kv_head = n // G  # grouped-query attention: G query heads share one KV head
        scores = (keys[:, kv_head].astype(jnp.float32) @ q[b, t, n].astype(jnp.float32)) * scale
        # Masked slots must not leak even when they hold NaN (unused cache slots in tests).
        scores = jnp.where(mask, scores, -jnp.inf)
        weights = jax.nn.softmax(scores)
        vals = jnp.where(mask[:, None], values[:, kv_head].astype(jnp.float32), 0.0)
        heads.append(weights @ vals)
      rows.append(jnp.stack(heads))
    outputs.append(jnp.stack(rows))
  return jnp.stack(outputs).astype(q.dtype)
