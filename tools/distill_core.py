"""What every distillation stage of `distill_draft.py` shares: the loss against the teacher's
top-k and the optimizer step (the narrow draft's `train` and the wide draft's `wide`,
`wide_draft.py`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def pooled_cross_entropy(student, top, p, in_top, first, mask):
  """Cross-entropy to the teacher's top-k with the remaining mass pooled into one "other"
  bucket (forward KL up to the teacher's entropy), and greedy agreement; both masked means.

  Args:
    student: the student's log-probabilities [B, G, V] over the columns it scores.
    top: `student` at the teacher's top-k [B, G, k]; p: the teacher's probabilities there,
      zero where a token is not among the student's columns (`in_top` False: its mass is
      pooled with the rest).
    first: the teacher's greedy token as a column [B, G]; mask: f32[B, G] scored positions.
  """
  rest_p = jnp.clip(1.0 - p.sum(-1), 0.0, 1.0)
  rest_q = jnp.log1p(-jnp.clip((jnp.exp(top) * in_top).sum(-1), 0.0, 1.0 - 1e-6))
  ce = -(p * top).sum(-1) - rest_p * rest_q
  agree = (jnp.argmax(student, -1) == first).astype(jnp.float32)
  n = mask.sum()
  return (ce * mask).sum() / n, (agree * mask).sum() / n


def adamw(params, grads, state, step, lr, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.01):
  """One AdamW step; weight decay on matrices only (not norms)."""
  m, v = state
  m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, m, grads)
  v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, v, grads)
  t = step + 1

  def update(p, m, v):
    decay = weight_decay * p if p.ndim >= 2 else 0.0
    return p - lr * ((m / (1 - b1**t)) / (jnp.sqrt(v / (1 - b2**t)) + eps) + decay)

  return jax.tree.map(update, params, m, v), (m, v)


def learning_rate(step, total, peak, warmup=100):
  """Linear warm-up to `peak`, then cosine to 10 % of it at `total`."""
  warm = peak * (step + 1) / warmup
  progress = jnp.clip((step - warmup) / max(1, total - warmup), 0.0, 1.0)
  return jnp.where(step < warmup, warm, peak * (0.1 + 0.9 * 0.5 * (1 + jnp.cos(jnp.pi * progress))))


def clipped_update(params, opt, grads, step, *, total, peak, warmup):
  """The gradients clipped to global norm 1, then one AdamW step on the schedule."""
  norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
  grads = jax.tree.map(lambda g: g * jnp.minimum(1.0, 1.0 / (norm + 1e-6)), grads)
  return adamw(params, grads, opt, step, learning_rate(step, total, peak, warmup))
