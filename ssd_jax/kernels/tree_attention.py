"""Tree attention: one op for verification, the draft's glue forward and its tree branches.

Query t of sequence b attends to
  (1) main-cache slots s < lengths[b] + depth[t] + 1: the committed prefix plus the glue tokens
      up to its fork depth (for plain causal attention over new tokens, depth = arange(T)), and
  (2) optionally its own tree slots (r, t) for r <= tree_step: the branch's earlier tokens.

The mask is derived from `lengths` and `depth` inside each implementation; no [T, S] mask is
ever materialized by callers.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from ssd_jax.kernels.reference import tree_attention_reference
from ssd_jax.kernels.xla import tree_attention_xla

Impl = Literal["reference", "xla", "pallas"]
IMPLS: tuple[str, ...] = ("reference", "xla", "pallas")


def default_impl(platform: str) -> str:
  """Default tree-attention impl for a platform ("cpu", "gpu", "cuda", "rocm", "tpu").

  "xla" everywhere: on CPU the Pallas kernel could only run interpreted; on GPU and TPU no
  device measurement shows it beating XLA's fused einsums yet (tools/bench_tree_attention.py
  measures it). Change this with a benchmark, not a guess. Deciding needs no Pallas import.
  """
  if platform not in ("cpu", "gpu", "cuda", "rocm", "tpu"):
    raise ValueError(f"unknown platform {platform!r}")
  return "xla"


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class BlockSizes:
  """Tiling of the Pallas kernel: `block_kv` main-cache slots per step."""

  block_kv: int = 128

  def __post_init__(self):
    if self.block_kv <= 0 or self.block_kv & (self.block_kv - 1):
      raise ValueError(f"block_kv must be a positive power of two, got {self.block_kv}")


def static_validate_inputs(q, k, v, lengths, depth, tree_k, tree_v, tree_step) -> None:
  """Shape checks at trace time; each error names the offending argument."""
  if q.ndim != 4:
    raise ValueError(f"q must be [B, T, N, H], got shape {q.shape}")
  B, T, N, H = q.shape
  if k.ndim != 4 or k.shape[0] != B or k.shape[3] != H:
    raise ValueError(f"k must be [B={B}, S, K, H={H}], got shape {k.shape}")
  if v.shape != k.shape:
    raise ValueError(f"v must have k's shape {k.shape}, got {v.shape}")
  if N % k.shape[2]:
    raise ValueError(f"query heads N={N} must be a multiple of KV heads K={k.shape[2]}")
  if lengths.shape != (B,):
    raise ValueError(f"lengths must be i32[B={B}], got shape {lengths.shape}")
  if depth.shape not in ((T,), (B, T)):
    raise ValueError(f"depth must be i32[T={T}] or i32[B={B}, T={T}], got shape {depth.shape}")
  if (tree_k is None) != (tree_v is None):
    raise ValueError("tree_k and tree_v must be given together")
  if tree_k is not None:
    K = k.shape[2]
    if tree_k.ndim != 5 or tree_k.shape[0] != B or tree_k.shape[2:] != (T, K, H):
      raise ValueError(f"tree_k must be [B={B}, R, T={T}, K={K}, H={H}], got {tree_k.shape}")
    if tree_v.shape != tree_k.shape:
      raise ValueError(f"tree_v must have tree_k's shape {tree_k.shape}, got {tree_v.shape}")
    if tree_step is None:
      raise ValueError("tree_step is required when a tree is given")


def _layer_shape(x: jax.Array) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(x.shape[1:], x.dtype)


def tree_attention(
  q: jax.Array,  # [B, T, N, H]
  k: jax.Array,  # [B, S, K, H]
  v: jax.Array,  # [B, S, K, H]
  lengths: jax.Array,  # i32[B]
  depth: jax.Array,  # i32[T] or i32[B, T]
  tree_k: jax.Array | None = None,  # [B, R, T, K, H]
  tree_v: jax.Array | None = None,  # [B, R, T, K, H]
  tree_step: jax.Array | int | None = None,  # i32[]
  *,
  layer: jax.Array | int | None = None,  # i32[]
  impl: Impl = "xla",
  scale: float | None = None,
  block_sizes: BlockSizes | None = None,
  interpret: bool | None = None,
) -> jax.Array:
  """Grouped-query attention of T queries over a shared prefix, glue and private tree slots.

  Args:
    q: queries [B, T, N, H].
    k, v: main cache of one layer [B, S, K, H]; slots past what a query may see are never read.
    lengths: i32[B], committed tokens of each sequence before the queries' glue.
    depth: i32[T] (shared by all sequences) or i32[B, T], the fork depth of each query (query
      t of sequence b sees slots < lengths[b] + depth[b, t] + 1).
    tree_k, tree_v: optional private slots [B, R, T, K, H] (query t owns column t).
    tree_step: the last visible tree step (query t sees tree slots (r, t) with r <= tree_step).
    layer: k and v are then every layer's cache [L, B, S, K, H] and the op reads this layer's
      (the XLA impl slices out only the slots the queries see: a decode step costs what the
      sequences hold, not the cache's capacity).
    impl: "reference" (the specification), "xla" (masked einsums; past 512 slots of a stacked
      cache, blocks up to the longest limit), "pallas" (kernel).
    scale: softmax scale, 1 / sqrt(H) by default.
    block_sizes: tiling of the Pallas kernel.
    interpret: run the Pallas kernel in interpret mode (default: when not on GPU/TPU).

  Returns:
    [B, T, N, H] in q's dtype.
  """
  if layer is not None and (k.ndim != 5 or v.ndim != 5):
    raise ValueError(f"k and v must be [L, B, S, K, H] with a layer, got {k.shape}, {v.shape}")
  one_layer = (k, v) if layer is None else (_layer_shape(k), _layer_shape(v))
  static_validate_inputs(q, *one_layer, lengths, depth, tree_k, tree_v, tree_step)
  if scale is None:
    scale = q.shape[-1] ** -0.5
  depth = jnp.broadcast_to(depth, q.shape[:2])  # implementations take i32[B, T]
  if impl == "xla":
    args = (q, k, v, lengths, depth, tree_k, tree_v, tree_step)
    return tree_attention_xla(*args, scale=scale, layer=layer)
  if layer is not None:
    k, v = k[layer], v[layer]
  args = (q, k, v, lengths, depth, tree_k, tree_v, tree_step)
  if impl == "reference":
    return tree_attention_reference(*args, scale=scale)
  if impl == "pallas":
    from ssd_jax.kernels import pallas_tree_attention  # noqa: PLC0415 (Pallas imports are slow)

    return pallas_tree_attention.tree_attention_pallas(
      *args, scale=scale, block_kv=(block_sizes or BlockSizes()).block_kv, interpret=interpret
    )
  raise ValueError(f"unknown attention impl {impl!r}; expected one of {IMPLS}")
