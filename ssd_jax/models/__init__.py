"""Decoder-only transformers (Llama-3, Qwen2, Qwen3, SmolLM2) as pure functions over pytrees.

Dimension letters, used in einsums, shape comments and names throughout ssd_jax:

  B  batch (sequences)            T  new tokens in one forward (queries; tree branches)
  S  KV-cache slots per sequence  R  tree steps (rounds of the draft's branch decode)
  D  model width                  F  MLP hidden width
  N  query heads                  K  key/value heads
  G  query heads per KV head      H  head dimension
  V  vocabulary                   L  layers

The speculative-decoding knobs are never single letters in code: `lookahead` and
`fan_out` are spelled out (the paper's K and F clash with the letters above).
"""

from ssd_jax.models.kv_cache import KVCache, TreeKV
from ssd_jax.models.transformer import (
  forward,
  hidden_states,
  init_params,
  lm_head,
  param_axes,
  score,
  tree_forward,
)

__all__ = [
  "KVCache",
  "TreeKV",
  "forward",
  "hidden_states",
  "init_params",
  "lm_head",
  "param_axes",
  "score",
  "tree_forward",
]
