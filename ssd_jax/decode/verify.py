"""Exact speculative verification, batched and jitted, with no host sync.

For sampled rows, draft token x_j (drawn from q_j) is accepted with probability
min(1, p_j(x_j) / q_j(x_j)); at the first rejection the bonus token is drawn from the residual
norm(max(0, p_j - q_j)); if all `lookahead` tokens are accepted it is drawn from p_lookahead.
Because min(p, q) + max(0, p - q) = p for *any* q, the emitted token has law p exactly, provided
q is the distribution that really produced x_j. A deterministic proposal is the point mass
q = δ_x: accepted with probability p(x), else the bonus comes from p with x removed.

Greedy rows (temperature 0) accept while x_j equals argmax p_j and take argmax p at the first
mismatch, so greedy speculative decoding emits exactly the autoregressive argmax tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ssd_jax.decode.sampling import Warp, fold_rows, sample, warped_probs


def leading_true(mask: jax.Array) -> jax.Array:
  """Number of leading True values along the last axis: i32[...]."""
  return jnp.sum(jnp.cumprod(mask.astype(jnp.int32), axis=-1), axis=-1)


def acceptance_probability(p_x: jax.Array, q_x: jax.Array) -> jax.Array:
  """min(1, p(x) / q(x)) for a token x drawn from q (q(x) > 0)."""
  return jnp.minimum(1.0, p_x / jnp.where(q_x > 0, q_x, 1.0))


def residual(p: jax.Array, q: jax.Array) -> jax.Array:
  """norm(max(0, p - q)) over the last axis; p itself where the residual has no mass (then
  p == q and a rejection has probability 0, so this only guards float round-off)."""
  r = jnp.maximum(p - q, 0.0)
  mass = r.sum(-1, keepdims=True)
  return jnp.where(mass > 0, r / jnp.where(mass > 0, mass, 1.0), p)


def verify(
  keys: jax.Array,  # key[B]
  target_logits: jax.Array,  # f32[B, lookahead + 1, V]
  draft_tokens: jax.Array,  # i32[B, lookahead]
  draft_probs: jax.Array | None,  # f32[B, lookahead, V]
  point_mass: jax.Array | None,  # bool[B]
  warp: Warp,
  *,
  greedy: bool,
) -> tuple[jax.Array, jax.Array]:
  """Accept/reject `draft_tokens` against the target and sample the bonus token.

  Args:
    keys: one PRNG key per row for its acceptance uniforms and bonus draw (`row_keys`).
    target_logits: target logits at the positions of [previous bonus, x_1..x_lookahead].
    draft_tokens: the proposed tokens x_1..x_lookahead.
    draft_probs: the distributions q_j that produced them (warped like p), or None when every
      proposal is deterministic (or every row is greedy).
    point_mass: rows whose proposals are deterministic (q = δ_x); None means none are.
    warp: per-row sampling settings, the same as the draft's; temperature 0 makes a row greedy.
    greedy: static: every row is greedy, so the stochastic path is skipped entirely.

  Returns:
    accepted i32[B] and bonus i32[B].
  """
  B, T, V = target_logits.shape
  lookahead = T - 1
  rows = jnp.arange(B)
  argmax = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)  # i32[B, T]
  greedy_accepted = leading_true(draft_tokens == argmax[:, :lookahead])
  greedy_bonus = argmax[rows, greedy_accepted]
  if greedy:
    return greedy_accepted, greedy_bonus

  p = warped_probs(target_logits, warp)  # f32[B, T, V]
  delta = jax.nn.one_hot(draft_tokens, V, dtype=jnp.float32)  # f32[B, lookahead, V]
  if draft_probs is None:
    q = delta
  elif point_mass is None:
    q = draft_probs
  else:
    q = jnp.where(point_mass[:, None, None], delta, draft_probs)
  p_x = jnp.take_along_axis(p[:, :lookahead], draft_tokens[..., None], axis=-1)[..., 0]
  q_x = jnp.take_along_axis(q, draft_tokens[..., None], axis=-1)[..., 0]
  key_accept, key_bonus = fold_rows(keys, 0), fold_rows(keys, 1)
  u = jax.vmap(lambda k: jax.random.uniform(k, (lookahead,)))(key_accept)  # f32[B, lookahead]
  accepted = leading_true(u < acceptance_probability(p_x, q_x))
  # Residual at the first rejection; after full acceptance q is "zero" so the residual is p.
  q_next = jnp.concatenate([q, jnp.zeros((B, 1, V), q.dtype)], axis=1)[rows, accepted]
  bonus = sample(key_bonus, residual(p[rows, accepted], q_next))
  stochastic = warp.temperature > 0
  return (
    jnp.where(stochastic, accepted, greedy_accepted),
    jnp.where(stochastic, bonus, greedy_bonus),
  )
