"""Sampling strategies and Saguaro sampling, as pure functions of logits.

`Sampling` is a frozen, hashable dataclass: pass it as a static jit argument. It fixes the
*structure* of the warp (top-k, top-p); temperatures are per-row arrays so one compiled program
serves a batch that mixes greedy and sampled requests. A row with temperature 0 is greedy.

Exactness rule: the target's p and the draft's q must be warped by the same `Sampling`; the
verifier then reproduces the warped target distribution exactly.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sampling:
  """How logits become a distribution.

  Attributes:
    temperature: default temperature for every row (0 = greedy). Per-row temperatures passed to
      the jitted functions override it; it also decides `greedy` below, which lets fully greedy
      runs skip computing and moving distributions.
    top_k: keep the k most likely tokens (0 = off).
    top_p: keep the smallest set of most likely tokens with mass >= top_p (1.0 = off).
  """

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0

  def probs(self, logits: jax.Array, temperature: jax.Array) -> jax.Array:
    """Warped distribution f32[..., V]. `temperature` broadcasts against logits[..., 0]; rows
    with temperature 0 get a point mass on the argmax."""
    return warped_probs(logits, temperature, top_k=self.top_k, top_p=self.top_p)


def warped_probs(
  logits: jax.Array, temperature: jax.Array, *, top_k: int = 0, top_p: float = 1.0
) -> jax.Array:
  """softmax(logits / T) restricted to top-k / top-p; one-hot argmax where T == 0."""
  logits = logits.astype(jnp.float32)
  t = jnp.asarray(temperature, jnp.float32)[..., None]
  scaled = logits / jnp.where(t > 0, t, 1.0)
  if top_k:
    kth = jax.lax.top_k(scaled, top_k)[0][..., -1:]
    scaled = jnp.where(scaled >= kth, scaled, -jnp.inf)
  if top_p < 1.0:
    # Keep the most likely tokens until their mass reaches top_p (the crossing token included):
    # find the smallest kept logit and cut below it. Ties at the cut are all kept; p and q are
    # warped by this same function, so that choice cannot affect exactness.
    desc = -jnp.sort(-scaled, axis=-1)
    desc_probs = jax.nn.softmax(desc, axis=-1)
    kept = jnp.cumsum(desc_probs, axis=-1) - desc_probs < top_p
    cut = jnp.min(jnp.where(kept, desc, jnp.inf), axis=-1, keepdims=True)
    scaled = jnp.where(scaled >= cut, scaled, -jnp.inf)
  probs = jax.nn.softmax(scaled, axis=-1)
  greedy = jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
  return jnp.where(t > 0, probs, greedy)


def saguaro(
  probs: jax.Array, fan_out: int | jax.Array, c: float, max_fan_out: int | None = None
) -> jax.Array:
  """Saguaro sampling σ_{F,C} (paper Definition 14): the mass of the top-`fan_out` tokens is
  multiplied by `c` in [0, 1] and the distribution renormalized.

  Lowering q on the tokens the speculation cache will hold raises the residual max(0, p - q)
  there, so bonus tokens concentrate on cached outcomes. Where nothing outside the top-F has mass
  (e.g. c = 0 on a distribution supported on F tokens) the distribution is left unchanged; the
  verifier uses whatever q really produced the token, so exactness never depends on this choice.

  Args:
    probs: f32[..., V].
    fan_out: F, a static int or an int array broadcasting against probs[..., 0] (0 = no scaling).
    c: the scale C.
    max_fan_out: static upper bound of an array `fan_out`.
  """
  if c == 1.0:
    return probs
  if isinstance(fan_out, int):
    if fan_out == 0:
      return probs
    kth = jax.lax.top_k(probs, fan_out)[0][..., -1:]
    top = probs >= kth
  else:
    fan_out = jnp.asarray(fan_out)
    values = jax.lax.top_k(probs, max_fan_out)[0]  # [..., max_fan_out], descending
    index = jnp.broadcast_to(jnp.maximum(fan_out - 1, 0), probs.shape[:-1])[..., None]
    kth = jnp.take_along_axis(values, index, axis=-1)
    top = (probs >= kth) & (fan_out[..., None] > 0)
  scaled = jnp.where(top, probs * c, probs)
  total = scaled.sum(-1, keepdims=True)
  return jnp.where(total > 0, scaled / jnp.where(total > 0, total, 1.0), probs)


def sample(key: jax.Array, probs: jax.Array) -> jax.Array:
  """Draw token ids i32[...] from f32[..., V] distributions (exact: Gumbel-max on log p)."""
  return jax.random.categorical(key, jnp.log(probs), axis=-1).astype(jnp.int32)
