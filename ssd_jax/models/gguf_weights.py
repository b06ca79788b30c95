"""GGUF (llama.cpp) files -> (ModelConfig, HF-named tensors, tokenizer).

Quantized tensors are dequantized with the `gguf` package. llama.cpp's converter permutes the
rows of attn_q / attn_k for its interleaved RoPE; we undo that per head so the weights match HF's
rotate-half convention.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ssd_jax.config import ModelConfig


def _field(reader, key: str, default: Any = None) -> Any:
  field = reader.fields.get(key)
  if field is None:
    return default
  return field.contents()


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undo llama.cpp's q/k row permutation: [out, in] rows interleaved per head -> rotate-half."""
  out, inp = w.shape
  return w.reshape(n_head, out // n_head // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def _config(reader) -> ModelConfig:
  arch = _field(reader, "general.architecture")
  if arch != "llama":
    raise ValueError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
  g = lambda key, default=None: _field(reader, f"llama.{key}", default)
  hidden, heads = int(g("embedding_length")), int(g("attention.head_count"))
  tokens = _field(reader, "tokenizer.ggml.tokens")
  names = {t.name for t in reader.tensors}
  eos = _field(reader, "tokenizer.ggml.eos_token_id")
  return ModelConfig(
    family="llama",
    vocab_size=int(g("vocab_size", len(tokens) if tokens else 0)),
    hidden_size=hidden,
    num_layers=int(g("block_count")),
    num_heads=heads,
    num_kv_heads=int(g("attention.head_count_kv", heads)),
    head_dim=int(g("rope.dimension_count", hidden // heads)),
    intermediate_size=int(g("feed_forward_length")),
    rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
    rope_theta=float(g("rope.freq_base", 10000.0)),
    tie_embeddings="output.weight" not in names,
    max_position_embeddings=int(g("context_length", 8192)),
    bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
    eos_token_ids=() if eos is None else (int(eos),),
  )


_NAMES = {
  "attn_norm": "input_layernorm",
  "attn_q": "self_attn.q_proj",
  "attn_k": "self_attn.k_proj",
  "attn_v": "self_attn.v_proj",
  "attn_output": "self_attn.o_proj",
  "ffn_norm": "post_attention_layernorm",
  "ffn_gate": "mlp.gate_proj",
  "ffn_up": "mlp.up_proj",
  "ffn_down": "mlp.down_proj",
}


def _hf_name(name: str) -> str:
  if name == "token_embd.weight":
    return "model.embed_tokens.weight"
  if name == "output_norm.weight":
    return "model.norm.weight"
  if name == "output.weight":
    return "lm_head.weight"
  _, layer, part, suffix = name.split(".")
  return f"model.layers.{layer}.{_NAMES[part]}.{suffix}"


def read_gguf(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, np.ndarray], dict]:
  """Read a llama-architecture GGUF file.

  Returns:
    The config, f32 tensors under HF names, and tokenizer metadata (tokens, merges, token types,
    special ids, chat template) for `ssd_jax.models.tokenizer`.
  """
  import gguf  # noqa: PLC0415 (only needed when converting a GGUF once)

  try:
    reader = gguf.GGUFReader(os.fspath(path))
  except (ValueError, OSError) as e:
    raise ValueError(f"cannot read GGUF file {path}: {e}; the file is missing or corrupt") from e
  config = _config(reader)
  tensors = {}
  for t in reader.tensors:
    w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
    w = w.reshape(tuple(int(d) for d in reversed(t.shape)))
    if t.name.endswith("attn_q.weight"):
      w = _unpermute(w, config.num_heads)
    elif t.name.endswith("attn_k.weight"):
      w = _unpermute(w, config.num_kv_heads)
    tensors[_hf_name(t.name)] = w
  tokenizer = {
    "tokens": list(_field(reader, "tokenizer.ggml.tokens")),
    "merges": list(_field(reader, "tokenizer.ggml.merges") or []),
    "token_types": [int(x) for x in _field(reader, "tokenizer.ggml.token_type")],
    "model": _field(reader, "tokenizer.ggml.model"),
    "pre": _field(reader, "tokenizer.ggml.pre"),
    "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
    "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
    "chat_template": _field(reader, "tokenizer.chat_template"),
  }
  return config, tensors, tokenizer
