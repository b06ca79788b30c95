"""Tree attention as dense masked einsums: what XLA fuses well on CPU and is the portable default.

Scores for all main-cache slots are computed and masked; the tree part is a per-branch
("diagonal") product over tree steps, merged with the main part in one softmax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG = -1e30  # finite, so a fully masked row gives a uniform (never NaN) softmax before masking


def tree_attention_xla(
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
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  G = N // K
  qg = q.reshape(B, T, K, G, H)
  f32 = jnp.float32
  scores = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=f32) * scale
  limit = lengths[:, None] + depth + 1  # i32[B, T]
  visible = jnp.arange(S)[None, None, :] < limit[:, :, None]  # bool[B, T, S]
  scores = jnp.where(visible[:, None, None], scores, _NEG)
  # Unused slots may hold anything (NaN in tests); zero them so 0 * NaN cannot leak.
  v_main = jnp.where(
    jnp.arange(S)[None, :, None, None] < jnp.max(limit, axis=1)[:, None, None, None],
    v,
    jnp.zeros((), v.dtype),
  )
  if tree_k is None:
    weights = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum(
      "BKGTS,BSKH->BTKGH", weights.astype(v.dtype), v_main, preferred_element_type=f32
    )
    return out.reshape(B, T, N, H).astype(q.dtype)
  R = tree_k.shape[1]
  tree_scores = jnp.einsum("BTKGH,BRTKH->BKGTR", qg, tree_k, preferred_element_type=f32) * scale
  tree_visible = jnp.arange(R) <= tree_step  # bool[R]
  tree_scores = jnp.where(tree_visible, tree_scores, _NEG)
  weights = jax.nn.softmax(jnp.concatenate([scores, tree_scores], axis=-1), axis=-1)
  w_main, w_tree = weights[..., :S], weights[..., S:]
  v_tree = jnp.where(tree_visible[None, :, None, None, None], tree_v, jnp.zeros((), tree_v.dtype))
  out = jnp.einsum("BKGTS,BSKH->BTKGH", w_main.astype(v.dtype), v_main, preferred_element_type=f32)
  out += jnp.einsum(
    "BKGTR,BRTKH->BTKGH", w_tree.astype(v.dtype), v_tree, preferred_element_type=f32
  )
  return out.reshape(B, T, N, H).astype(q.dtype)
