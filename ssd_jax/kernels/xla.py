"""Tree attention as masked einsums: what XLA fuses well on CPU and is the portable default.

Up to `dense_slots` main-cache slots, scores for all of them are computed and masked in one
softmax; the tree part is a per-branch ("diagonal") product over tree steps, merged in the same
softmax. A longer cache, given as every layer's stacked cache with the layer to read (decode:
`forward` and `tree_forward`), is read block by block up to the longest visible slot, with an
online softmax: a step costs what the sequence holds, not what the cache could hold (with a
4,096-slot cache holding 150 tokens, the dense form made a decode step of SmolLM2-135M 2.7x
slower on one core; docs/BENCHMARKS.md, 2026-12-06).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG = -1e30  # finite, so a fully masked row gives a uniform (never NaN) softmax before masking

DENSE_SLOTS = 512  # main-cache slots read at once; a default run's whole cache
BLOCK_SLOTS = 512  # slots per block beyond them


def tree_attention_xla(
  q: jax.Array,  # [B, T, N, H]
  k: jax.Array,  # [B, S, K, H], or [L, B, S, K, H] with `layer`
  v: jax.Array,  # the same
  lengths: jax.Array,  # i32[B]
  depth: jax.Array,  # i32[B, T]
  tree_k: jax.Array | None = None,  # [B, R, T, K, H]
  tree_v: jax.Array | None = None,  # [B, R, T, K, H]
  tree_step: jax.Array | int | None = None,
  *,
  scale: float,
  layer: jax.Array | int | None = None,
  dense_slots: int = DENSE_SLOTS,
  block_slots: int = BLOCK_SLOTS,
) -> jax.Array:
  if layer is not None and k.shape[2] > dense_slots:
    return _blocked(
      q, k, v, lengths, depth, tree_k, tree_v, tree_step, scale, layer, dense_slots, block_slots
    )
  if layer is not None:
    k, v = k[layer], v[layer]
  return _dense(q, k, v, lengths, depth, tree_k, tree_v, tree_step, scale)


def _dense(q, k, v, lengths, depth, tree_k, tree_v, tree_step, scale):
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


def _blocked(q, k, v, lengths, depth, tree_k, tree_v, tree_step, scale, layer, dense, block):
  """The first `dense` slots of layer `layer` at once, then blocks of `block` slots up to the
  longest limit (a loop of as many blocks as the sequences need), then the tree slots, merged
  by an online softmax. Only the slots read are sliced out of the stacked cache."""
  B, T, N, H = q.shape
  S, K = k.shape[2], k.shape[3]
  G = N // K
  block = min(block, S)
  qg = q.reshape(B, T, K, G, H)
  limit = lengths[:, None] + depth + 1  # i32[B, T]
  row_limit = jnp.max(limit, axis=1)  # i32[B]: slots past it may hold anything (NaN in tests)

  def slots(x, start, size):  # [B, size, K, H] of layer `layer`, from slot `start`
    return jax.lax.dynamic_slice(x, (layer, 0, start, 0, 0), (1, B, size, K, H))[0]

  def main_block(state, start, first_new):
    """Fold slots [start, start + size) into the softmax state; slots below `first_new` were
    folded already (a last block shifted back to fit in the cache)."""
    size = dense if first_new is None else block
    slot = start + jnp.arange(size)
    seen = slot[None, None, :] < limit[:, :, None]  # bool[B, T, size]
    if first_new is not None:
      seen &= slot >= first_new
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", qg, slots(k, start, size), preferred_element_type=f32)
    values = jnp.where(
      (slot[None, :] < row_limit[:, None])[:, :, None, None], slots(v, start, size), 0
    )
    scores = jnp.where(seen[:, None, None], scores * scale, _NEG)
    return _fold(state, scores, values, "BKGTS,BSKH->BKGTH")

  def loop_body(j, state):
    first_new = dense + j * block
    return main_block(state, jnp.minimum(first_new, S - block), first_new)

  f32 = jnp.float32
  state = (
    jnp.full((B, K, G, T), _NEG, f32),  # running max
    jnp.zeros((B, K, G, T), f32),  # running sum of exponentials
    jnp.zeros((B, K, G, T, H), f32),  # running weighted values
  )
  state = main_block(state, 0, None)
  blocks = jnp.maximum(jnp.max(row_limit) - dense + block - 1, 0) // block
  state = jax.lax.fori_loop(0, blocks, loop_body, state)
  if tree_k is not None:
    R = tree_k.shape[1]
    tree_visible = jnp.arange(R) <= tree_step  # bool[R]
    scores = jnp.einsum("BTKGH,BRTKH->BKGTR", qg, tree_k, preferred_element_type=f32) * scale
    values = jnp.where(tree_visible[None, :, None, None, None], tree_v, 0)
    state = _fold(state, jnp.where(tree_visible, scores, _NEG), values, "BKGTR,BRTKH->BKGTH")
  _, total, weighted = state
  out = weighted / total[..., None]  # [B, K, G, T, H]
  return jnp.moveaxis(out, 3, 1).reshape(B, T, N, H).astype(q.dtype)


def _fold(state, scores, values, spec: str):
  """One step of the online softmax: fold `scores` [B, K, G, T, n] and their `values` in."""
  peak, total, weighted = state
  new_peak = jnp.maximum(peak, scores.max(axis=-1))
  p = jnp.exp(scores - new_peak[..., None])
  rescale = jnp.exp(peak - new_peak)
  weighted = weighted * rescale[..., None] + jnp.einsum(
    spec, p.astype(values.dtype), values, preferred_element_type=jnp.float32
  )
  return new_peak, total * rescale + p.sum(axis=-1), weighted
