"""Stateless layer math: RMSNorm, rotary embeddings (with Llama-3 scaling), gated MLP."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ssd_jax.config import ModelConfig


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """RMSNorm over the last axis, computed in f32 and cast back (as HF does)."""
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (weight.astype(jnp.float32) * x32).astype(x.dtype)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
  """Inverse frequencies f32[H / 2]; a trace-time constant since the config is static."""
  H = config.head_dim
  inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, H, 2, dtype=np.float64) / H))
  s = config.rope_scaling
  if s is None:
    return inv_freq.astype(np.float32)
  # Llama-3: long wavelengths are slowed by `factor`, short ones kept, the band between
  # interpolated smoothly (transformers' _compute_llama3_parameters).
  low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
  high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
  smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
    s.high_freq_factor - s.low_freq_factor
  )
  smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotate-half RoPE. x: [B, T, heads, H]; positions: i32[B, T]."""
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # f32[B, T, H/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def gated_mlp(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
  """SwiGLU MLP. x: [B, T, D]; w_gate, w_up: [D, F]; w_down: [F, D]."""
  gate = jnp.einsum("BTD,DF->BTF", x, w_gate)
  up = jnp.einsum("BTD,DF->BTF", x, w_up)
  return jnp.einsum("BTF,FD->BTD", jax.nn.silu(gate) * up, w_down)
