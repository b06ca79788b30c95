"""A model's params and KV cache placed on a mesh, by the rule table of `ssd_jax.sharding`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ssd_jax.config import ModelConfig
from ssd_jax.models.kv_cache import KVCache
from ssd_jax.models.transformer import Params, param_axes, param_shapes
from ssd_jax.sharding import CACHE_AXES, logical_spec


def param_shardings(config: ModelConfig, mesh: Mesh) -> Params:
  """NamedSharding of every parameter, in the params' tree structure."""
  return jax.tree.map(
    lambda axes, shape: NamedSharding(mesh, logical_spec(axes, mesh, shape)),
    param_axes(config),
    param_shapes(config),
    is_leaf=lambda x: isinstance(x, tuple),
  )


def cache_sharding(config: ModelConfig, mesh: Mesh, batch_size: int, capacity: int) -> KVCache:
  """Shardings of a KVCache: KV heads split like the attention heads; lengths replicated."""
  shape = (config.num_layers, batch_size, capacity, config.num_kv_heads, config.head_dim)
  kv = NamedSharding(mesh, logical_spec(CACHE_AXES, mesh, shape))
  return KVCache(k=kv, v=kv, lengths=NamedSharding(mesh, PartitionSpec()))


def place_params(params: Params, config: ModelConfig, mesh: Mesh) -> Params:
  """Host params -> device arrays sharded over `mesh`."""
  return jax.device_put(params, param_shardings(config, mesh))


def init_cache(config: ModelConfig, mesh: Mesh, batch_size: int, capacity: int, dtype) -> KVCache:
  """An empty KVCache created directly in its sharding on `mesh` (no host round trip)."""
  return _cache_maker(config, mesh, batch_size, capacity, jnp.dtype(dtype))()


@functools.cache
def _cache_maker(config: ModelConfig, mesh: Mesh, batch_size: int, capacity: int, dtype):
  # One jitted maker per shape, kept: a fresh lambda per call would compile on every generate.
  shardings = cache_sharding(config, mesh, batch_size, capacity)
  return jax.jit(lambda: KVCache.init(config, batch_size, capacity, dtype), out_shardings=shardings)
