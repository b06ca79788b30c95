"""One decoder-only transformer for Llama-3, Qwen2, Qwen3 and SmolLM2, as pure functions.

Params are a plain dict pytree with the layers stacked on a leading L axis, so one compiled
layer body runs under `lax.scan`; the KV cache travels in the scan carry and is written with a
scatter, which XLA performs in place when the cache is donated (measured on this JAX: the carry
layout is 4x faster than scanning the cache as xs/ys).

Two entry points share the layer body:
  forward       T new tokens per sequence at positions lengths + arange(T), written to the main
                cache (prefill, verification, the draft's glue forward and its decode steps).
  tree_forward  one token per tree branch at step r, written to the tree scratch; reads the main
                cache without changing it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ssd_jax.config import ModelConfig
from ssd_jax.kernels import tree_attention
from ssd_jax.models import layers
from ssd_jax.models.kv_cache import KVCache, TreeKV

Params = dict[str, Any]

# Logical axis names of every parameter (see ssd_jax.sharding for the rule table).
_LAYER_AXES = {
  "attn_norm": ("layers", "embed"),
  "wq": ("layers", "embed", "heads", "head_dim"),
  "wk": ("layers", "embed", "kv_heads", "head_dim"),
  "wv": ("layers", "embed", "kv_heads", "head_dim"),
  "wo": ("layers", "heads", "head_dim", "embed"),
  "bq": ("layers", "heads", "head_dim"),
  "bk": ("layers", "kv_heads", "head_dim"),
  "bv": ("layers", "kv_heads", "head_dim"),
  "q_norm": ("layers", "head_dim"),
  "k_norm": ("layers", "head_dim"),
  "mlp_norm": ("layers", "embed"),
  "w_gate": ("layers", "embed", "mlp"),
  "w_up": ("layers", "embed", "mlp"),
  "w_down": ("layers", "mlp", "embed"),
}


def param_shapes(config: ModelConfig) -> Params:
  """Shapes of every parameter, in the same tree as the params."""
  L, D, N, K = config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads
  H, F, V = config.head_dim, config.intermediate_size, config.vocab_size
  layer = {
    "attn_norm": (L, D),
    "wq": (L, D, N, H),
    "wk": (L, D, K, H),
    "wv": (L, D, K, H),
    "wo": (L, N, H, D),
    "mlp_norm": (L, D),
    "w_gate": (L, D, F),
    "w_up": (L, D, F),
    "w_down": (L, F, D),
  }
  if config.qkv_bias:
    layer |= {"bq": (L, N, H), "bk": (L, K, H), "bv": (L, K, H)}
  if config.qk_norm:
    layer |= {"q_norm": (L, H), "k_norm": (L, H)}
  shapes = {"embed": (V, D), "layers": layer, "final_norm": (D,)}
  if not config.tie_embeddings:
    shapes["lm_head"] = (D, V)
  return shapes


def param_axes(config: ModelConfig) -> Params:
  """Logical axis names of every parameter, in the same tree as the params."""
  shapes = param_shapes(config)
  axes = {
    "embed": ("vocab", "embed"),
    "layers": {name: _LAYER_AXES[name] for name in shapes["layers"]},
    "final_norm": ("embed",),
  }
  if "lm_head" in shapes:
    axes["lm_head"] = ("embed", "vocab")
  return axes


def init_params(
  config: ModelConfig, key: jax.Array, dtype=jnp.float32, scale: float = 1.0
) -> Params:
  """Random params (tests, tiny demo models, training from scratch).

  Matrices get std scale / sqrt(fan_in), with the fan-in taken from each parameter's contracted
  axes; norm weights are 1 + noise and biases small noise, so every parameter matters in tests.
  """
  D, H = config.hidden_size, config.head_dim
  fan_in = {
    "wq": D,
    "wk": D,
    "wv": D,
    "wo": config.num_heads * H,
    "w_gate": D,
    "w_up": D,
    "w_down": config.intermediate_size,
    "embed": D,
    "lm_head": D,
  }
  shapes = param_shapes(config)
  flat, treedef = jax.tree_util.tree_flatten_with_path(
    shapes, is_leaf=lambda x: isinstance(x, tuple)
  )
  keys = jax.random.split(key, len(flat))
  out = []
  for (path, shape), k in zip(flat, keys, strict=True):
    name = path[-1].key
    noise = jax.random.normal(k, shape)
    if "norm" in name:
      x = 1.0 + 0.1 * noise
    elif name in ("bq", "bk", "bv"):
      x = 0.1 * scale * noise
    else:
      x = noise * (scale / fan_in[name] ** 0.5)
    out.append(x.astype(dtype))
  return jax.tree.unflatten(treedef, out)


def _qkv(x, lp, positions, config: ModelConfig):
  """Projections, optional bias (Qwen2) and q/k norm (Qwen3), then RoPE."""
  q = jnp.einsum("BTD,DNH->BTNH", x, lp["wq"])
  k = jnp.einsum("BTD,DKH->BTKH", x, lp["wk"])
  v = jnp.einsum("BTD,DKH->BTKH", x, lp["wv"])
  if config.qkv_bias:
    q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
  if config.qk_norm:
    q = layers.rms_norm(q, lp["q_norm"], config.rms_norm_eps)
    k = layers.rms_norm(k, lp["k_norm"], config.rms_norm_eps)
  inv_freq = layers.rope_inv_freq(config)
  return layers.apply_rope(q, positions, inv_freq), layers.apply_rope(k, positions, inv_freq), v


# attend(layer_index, q, k_new, v_new, kv_state) -> (attention output [B, T, N, H], kv_state)
AttendFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


def _decoder(
  params: Params,
  tokens,
  positions,
  kv_state,
  attend: AttendFn,
  config: ModelConfig,
  return_logits: bool,
  final_norm: bool = False,
):
  """Embed, run all layers under one scan with `kv_state` in the carry, then the LM head
  (or only the final norm, or neither)."""
  x = params["embed"][tokens]  # [B, T, D]
  if x.dtype == jnp.float16:
    # Half-precision weights are storage only: activations, and so every product, stay f32
    # (each layer's weights are converted as the scan reads them). For a draft this halves
    # the memory it streams, which a verification on the next core shares.
    x = x.astype(jnp.float32)

  def layer(carry, xs):
    x, kv_state = carry
    lp, index = xs
    h = layers.rms_norm(x, lp["attn_norm"], config.rms_norm_eps)
    q, k, v = _qkv(h, lp, positions, config)
    out, kv_state = attend(index, q, k, v, kv_state)
    x = x + jnp.einsum("BTNH,NHD->BTD", out, lp["wo"])
    h = layers.rms_norm(x, lp["mlp_norm"], config.rms_norm_eps)
    x = x + layers.gated_mlp(h, lp["w_gate"], lp["w_up"], lp["w_down"])
    return (x, kv_state), None

  xs = (params["layers"], jnp.arange(config.num_layers))
  (x, kv_state), _ = jax.lax.scan(layer, (x, kv_state), xs)
  if not (return_logits or final_norm):
    return None, kv_state
  x = layers.rms_norm(x, params["final_norm"], config.rms_norm_eps)
  if not return_logits:
    return x, kv_state
  return lm_head(params, x, config), kv_state


def forward(
  params: Params,
  tokens: jax.Array,  # i32[B, T]
  cache: KVCache,
  *,
  config: ModelConfig,
  attention_impl: str = "xla",
  return_logits: bool = True,
  kv_window: int | None = None,
) -> tuple[jax.Array | None, KVCache]:
  """T new tokens per sequence at positions `cache.lengths + arange(T)`.

  Keys and values are written to the main cache; `cache.lengths` is left unchanged (the caller
  commits tokens by setting lengths). Each new token attends causally to the slots before it.

  Args:
    kv_window: static bound on the slots attention reads; every position the call reaches
      (lengths + T) must be below it (prefill: its padded length). Without it, attention is
      given the whole stacked cache and the layer to read, and reads no further than the
      sequences reach (kernels/xla.py).

  Returns:
    f32 logits [B, T, V] (None when `return_logits` is False) and the updated cache.
  """
  B, T = tokens.shape
  positions = cache.lengths[:, None] + jnp.arange(T, dtype=jnp.int32)  # i32[B, T]
  rows = jnp.arange(B)[:, None]
  depth = jnp.arange(T, dtype=jnp.int32)

  def attend(index, q, k, v, kv):
    k_all, v_all = kv
    k_all = k_all.at[index, rows, positions].set(k.astype(k_all.dtype))
    v_all = v_all.at[index, rows, positions].set(v.astype(v_all.dtype))
    if kv_window is None:  # decode: the op reads this layer's slots up to what the rows hold
      keys, values, layer = k_all, v_all, index
    else:
      keys, values, layer = k_all[index, :, :kv_window], v_all[index, :, :kv_window], None
    out = tree_attention(q, keys, values, cache.lengths, depth, layer=layer, impl=attention_impl)
    return out, (k_all, v_all)

  logits, (k_all, v_all) = _decoder(
    params, tokens, positions, (cache.k, cache.v), attend, config, return_logits
  )
  return logits, KVCache(k=k_all, v=v_all, lengths=cache.lengths)


def tree_forward(
  params: Params,
  tokens: jax.Array,  # i32[B, T]  one token per branch
  cache: KVCache,
  tree: TreeKV,
  depth: jax.Array,  # i32[T] or i32[B, T]  fork depth of each branch
  step: jax.Array,  # i32[]  tree step r
  *,
  config: ModelConfig,
  attention_impl: str = "xla",
) -> tuple[jax.Array, TreeKV]:
  """Tree step `step` of the draft's branch decode.

  Branch t, forked at depth[t], sits at position lengths + depth[t] + 1 + step; it sees the
  main-cache slots up to its fork point (prefix and glue) and its own tree slots 0..step. Its
  key/value goes to tree slot (step, t); the main cache is only read.

  Returns:
    f32 logits [B, T, V] and the updated tree scratch.
  """
  depth = jnp.broadcast_to(depth, tokens.shape)  # i32[B, T]
  positions = cache.lengths[:, None] + depth + 1 + step  # i32[B, T]

  def attend(index, q, k, v, kv):
    tk, tv = kv
    tk = tk.at[index, :, step].set(k.astype(tk.dtype))
    tv = tv.at[index, :, step].set(v.astype(tv.dtype))
    out = tree_attention(
      q,
      cache.k,
      cache.v,
      cache.lengths,
      depth,
      tk[index],
      tv[index],
      step,
      layer=index,
      impl=attention_impl,
    )
    return out, (tk, tv)

  logits, (tk, tv) = _decoder(params, tokens, positions, (tree.k, tree.v), attend, config, True)
  return logits, TreeKV(k=tk, v=tv)


def hidden_states(
  params: Params, tokens: jax.Array, *, config: ModelConfig, attention_impl: str = "xla"
) -> jax.Array:
  """Final-normed hidden states [B, T, D] of whole sequences, causal, without a KV cache
  (training and evaluation; keys and values flow straight into attention)."""
  B, T = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  zeros, depth = jnp.zeros((B,), jnp.int32), jnp.arange(T, dtype=jnp.int32)

  def attend(index, q, k, v, kv):
    del index
    return tree_attention(q, k, v, zeros, depth, impl=attention_impl), kv

  x, _ = _decoder(
    params, tokens, positions, (), attend, config, return_logits=False, final_norm=True
  )
  return x


def lm_head(params: Params, x: jax.Array, config: ModelConfig) -> jax.Array:
  """Logits f32[..., V] from final-normed hidden states [..., D]; with a restricted head (see
  `head_subset`) f32[..., V'], column c scoring token `params["head_ids"][c]`."""
  if "head" in params:
    head = params["head"]
  elif config.tie_embeddings:
    return tied_head(params["embed"], x)
  else:
    head = params["lm_head"]
  return jnp.einsum("...D,DV->...V", x, head, preferred_element_type=jnp.float32)


# A few rows (a verification's lookahead + 1, a draft's branches) through the tied head: on a
# CPU, XLA's product of [rows, D] with the [V, D] embedding read as [D, V] costs 3-4x one row's
# (13.9 against 3.6 ms for SmolLM2-135M's 113 MB table at 4 rows on one core), while the same
# product taken block by block, [V/n, D] x [D, rows], streams each block once: 7.6 ms, a
# verification of 4 tokens 10-17 % faster (docs/BENCHMARKS.md, 2026-12-06). One row and many
# rows (prefill, training) keep the single product, as do accelerators.
HEAD_BLOCK_ROWS = 1024  # embedding rows per block: 2.4 MB of SmolLM2's f32 table, cache-sized
BLOCKED_HEAD_MAX_ROWS = 32  # beyond this the single product is as fast (64 rows: a tie)


def tied_head(embed: jax.Array, x: jax.Array) -> jax.Array:
  """Logits f32[..., V] = x [..., D] against the tied embedding [V, D] (see the note above)."""
  V, D = embed.shape
  rows = x.reshape(-1, D)
  blocks = _head_blocks(V)

  def single(rows, embed):
    return jnp.einsum("TD,DV->TV", rows, embed.T, preferred_element_type=jnp.float32)

  def blocked(rows, embed):
    out = jax.lax.map(
      lambda block: jnp.einsum("VD,TD->VT", block, rows, preferred_element_type=jnp.float32),
      embed.reshape(blocks, V // blocks, D),
    )  # f32[blocks, V / blocks, rows]
    return out.reshape(V, -1).T

  if blocks == 1 or not 1 < rows.shape[0] <= BLOCKED_HEAD_MAX_ROWS:
    logits = single(rows, embed)
  else:
    logits = jax.lax.platform_dependent(rows, embed, cpu=blocked, default=single)
  return logits.reshape(*x.shape[:-1], V)


def _head_blocks(vocab_size: int) -> int:
  """The most blocks of at least HEAD_BLOCK_ROWS rows that split the vocabulary evenly."""
  for blocks in range(vocab_size // HEAD_BLOCK_ROWS, 1, -1):
    if vocab_size % blocks == 0:
      return blocks
  return 1


def head_subset(params: Params, ids, config: ModelConfig) -> Params:
  """The entries that restrict the LM head to the tokens `ids` (V' distinct ids): add them to
  `params` and `lm_head` scores only those tokens, V' columns instead of V.

  For a small draft with a large vocabulary the head is most of a decode step (SmolLM2's
  49,152 x 192 head is 80% of the shipped draft's multiply-adds): scoring the few thousand
  tokens the target actually emits makes drafting several times cheaper. The draft then never
  proposes a token outside `ids`; verification accepts or corrects any proposal, so decoding
  stays exact (it is the acceptance rate that pays for tokens left out).
  """
  ids = np.asarray(ids)
  if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"draft vocabulary: expected a non-empty 1-D list of token ids, got {ids!r}")
  if ids.min() < 0 or ids.max() >= config.vocab_size:
    raise ValueError(
      f"draft vocabulary: token ids must be in [0, {config.vocab_size}), "
      f"got {ids.min()}..{ids.max()}"
    )
  if np.unique(ids).size != ids.size:
    raise ValueError("draft vocabulary: token ids must be distinct")
  table = params["embed"] if config.tie_embeddings else np.asarray(params["lm_head"]).T
  return {"head": np.asarray(table)[ids].T, "head_ids": ids.astype(np.int32)}


def score(
  params: Params, tokens: jax.Array, *, config: ModelConfig, attention_impl: str = "xla"
) -> jax.Array:
  """Causal logits f32[B, T, V] of whole sequences, without a KV cache."""
  x = hidden_states(params, tokens, config=config, attention_impl=attention_impl)
  return lm_head(params, x, config)
