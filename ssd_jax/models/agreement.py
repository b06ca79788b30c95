"""How often a model's own argmax predicts a target's greedy continuation, teacher-forced: the
agreement a draft is distilled for (tools/distill_draft.py), measured without decoding."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import numpy as np

from ssd_jax.models.transformer import head_subset, hidden_states, lm_head


@functools.partial(jax.jit, static_argnames="config")
def _greedy(params, tokens, *, config):
  # Module level, so the compiled program is reused across calls (one per padded length).
  x = hidden_states(params, tokens, config=config)
  return jax.numpy.argmax(lm_head(params, x, config), -1)


def greedy_agreement(
  model,
  prompts: Sequence[Sequence[int]],
  continuations: Sequence[Sequence[int]],
  vocab_ids: Sequence[int] | None = None,
) -> tuple[int, int]:
  """How many of a target's greedy continuation tokens `model` predicts with its own argmax
  (teacher-forced on the continuation), its head restricted to `vocab_ids` if given (as
  `Engine(draft_vocab=...)` does). Returns (agreeing tokens, tokens)."""
  params, column_ids = model.params, None
  if vocab_ids is not None:
    params = params | head_subset(params, vocab_ids, model.config)
    column_ids = params["head_ids"]
  hits = total = 0
  for prompt, cont in zip(prompts, continuations, strict=True):
    seq = np.concatenate([np.asarray(prompt), np.asarray(cont)]).astype(np.int32)
    tokens = np.zeros((1, -(-len(seq) // 64) * 64), np.int32)  # a few shapes, few compiles
    tokens[0, : len(seq)] = seq
    pred = np.asarray(_greedy(params, tokens, config=model.config))
    pred = pred[0, len(prompt) - 1 : len(seq) - 1]
    if column_ids is not None:
      pred = column_ids[pred]
    hits += int((pred == np.asarray(cont)).sum())
    total += len(cont)
  return hits, total
