"""Real models' shapes (no weights) and what they need per device: the inputs of `bench lower`
and `bench device`.

The configs are the published architectures (Hugging Face config.json of each model), written
out here because nothing may be downloaded: what a program's shapes need, nothing more (no
tokenizer, no special tokens but EOS).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from ssd_jax.config import ModelConfig, RopeScaling
from ssd_jax.models import placement
from ssd_jax.models.transformer import param_shapes

_LLAMA3 = dict(family="llama", vocab_size=128256, rope_theta=500000.0, eos_token_ids=(128009,))
_LLAMA31_ROPE = RopeScaling(
  factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
)
_QWEN3 = dict(
  family="qwen3", vocab_size=151936, rope_theta=1000000.0, qk_norm=True, rms_norm_eps=1e-6
)

MODELS: dict[str, ModelConfig] = {
  "llama-3.1-70b": ModelConfig(
    **_LLAMA3,
    hidden_size=8192,
    num_layers=80,
    num_heads=64,
    num_kv_heads=8,
    head_dim=128,
    intermediate_size=28672,
    rope_scaling=_LLAMA31_ROPE,
    max_position_embeddings=131072,
  ),
  "llama-3.1-8b": ModelConfig(
    **_LLAMA3,
    hidden_size=4096,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    intermediate_size=14336,
    rope_scaling=_LLAMA31_ROPE,
    max_position_embeddings=131072,
  ),
  "llama-3.2-1b": ModelConfig(
    **_LLAMA3,
    hidden_size=2048,
    num_layers=16,
    num_heads=32,
    num_kv_heads=8,
    head_dim=64,
    intermediate_size=8192,
    tie_embeddings=True,
    rope_scaling=dataclasses.replace(_LLAMA31_ROPE, factor=32.0),
    max_position_embeddings=131072,
  ),
  "smollm2-135m": ModelConfig(
    family="llama",
    vocab_size=49152,
    hidden_size=576,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    intermediate_size=1536,
    rope_theta=100000.0,
    tie_embeddings=True,
    bos_token_id=1,
    eos_token_ids=(2,),
  ),
  "qwen3-32b": ModelConfig(
    **_QWEN3,
    hidden_size=5120,
    num_layers=64,
    num_heads=64,
    num_kv_heads=8,
    head_dim=128,
    intermediate_size=25600,
    max_position_embeddings=40960,
  ),
  "qwen3-0.6b": ModelConfig(
    **_QWEN3,
    hidden_size=1024,
    num_layers=28,
    num_heads=16,
    num_kv_heads=8,
    head_dim=128,
    intermediate_size=3072,
    tie_embeddings=True,
    max_position_embeddings=40960,
  ),
}

# Target / draft pairs of the card: the paper's Llama pair and a Qwen3 pair (q/k norm).
PAIRS: dict[str, tuple[str, str]] = {
  "llama-70b/1b": ("llama-3.1-70b", "llama-3.2-1b"),
  "qwen3-32b/0.6b": ("qwen3-32b", "qwen3-0.6b"),
}


def abstract_params(config: ModelConfig, mesh: Mesh, dtype=jnp.bfloat16):
  """The params as `jax.ShapeDtypeStruct`s sharded as `placement` places them: nothing is
  allocated."""
  return jax.tree.map(
    lambda shape, sharding: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding),
    param_shapes(config),
    placement.param_shardings(config, mesh),
    is_leaf=lambda x: isinstance(x, tuple),
  )


def _device_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
  total = 0
  for x in jax.tree.leaves(tree):
    shard = x.sharding.shard_shape(x.shape)
    total += math.prod(shard) * jnp.dtype(x.dtype).itemsize
  return total


def device_bytes(
  config: ModelConfig, mesh: Mesh, batch_size: int, capacity: int, dtype=jnp.bfloat16
) -> dict[str, int]:
  """Bytes per device of `config`'s weights and of its KV cache for `batch_size` rows of
  `capacity` slots, as placed on `mesh` (weights and cache only: not activations, not the
  compiled programs' temporaries)."""
  kv = placement.cache_sharding(config, mesh, batch_size, capacity).k
  shape = (config.num_layers, batch_size, capacity, config.num_kv_heads, config.head_dim)
  cache = jax.ShapeDtypeStruct(shape, dtype, sharding=kv)
  return {
    "weights": _device_bytes(abstract_params(config, mesh, dtype)),
    "kv_cache": 2 * _device_bytes(cache),  # keys and values
  }
