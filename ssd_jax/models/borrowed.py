"""Token embeddings borrowed from another model: a draft that ships a map, not a table.

A draft for a target with the same vocabulary can take its token embedding from the target's,
which is in memory anyway: it ships a projection P [D_base, D] and, for the N tokens the target
emits most often, a learned correction R [N, D]. Its tied embedding is materialized at load time,

    embed = base_embed @ P;   embed[row_ids] += R,

so in memory it is a plain (tied) Llama and nothing downstream knows the difference. The shipped
file holds P and R instead of the 49,152-row table, which frees most of a small draft's size
budget for layers (docs/DRAFT.md, `smollm2-135m-draft-wide`).

On disk: an HF directory whose config.json names the base model under BASE_KEY (a registry name
or a path) and whose safetensors hold the three tensors of TENSORS instead of
`model.embed_tokens.weight`. `tools/distill_draft.py export --hf-out` writes the materialized
table, which HF transformers loads as an ordinary LlamaForCausalLM.
"""

from __future__ import annotations

import numpy as np

BASE_KEY = "ssd_jax_embedding_base"
PROJECTION, ROWS, ROW_IDS = "embed_projection", "embed_rows", "embed_row_ids"
TENSORS = (PROJECTION, ROWS, ROW_IDS)


def materialize(
  base: np.ndarray, projection: np.ndarray, rows: np.ndarray, row_ids: np.ndarray
) -> np.ndarray:
  """The [V, D] embedding: `base @ projection`, plus `rows` at `row_ids` (float32)."""
  V, D_base = base.shape
  if projection.ndim != 2 or projection.shape[0] != D_base:
    raise ValueError(
      f"{PROJECTION} has shape {projection.shape}, the base embedding {base.shape} needs "
      f"({D_base}, D): is the draft paired with the right base model?"
    )
  D = projection.shape[1]
  N = row_ids.shape[0]
  if rows.shape != (N, D):
    raise ValueError(f"{ROWS} has shape {rows.shape}, expected ({N}, {D}) for {N} row ids")
  if N and (row_ids.min() < 0 or row_ids.max() >= V or np.unique(row_ids).size != N):
    raise ValueError(f"{ROW_IDS} must be distinct token ids below the base vocabulary size {V}")
  embed = np.asarray(base, np.float32) @ np.asarray(projection, np.float32)
  embed[np.asarray(row_ids, np.int64)] += np.asarray(rows, np.float32)
  return embed


def factor(
  embed: np.ndarray, base: np.ndarray, row_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
  """(P, R) with `materialize(base, P, R, row_ids)` equal to `embed` on `row_ids` and the
  least-squares fit `base @ P` everywhere else: how a trained draft's own table is carried
  over into this form."""
  base = np.asarray(base, np.float64)
  embed = np.asarray(embed, np.float64)
  projection = np.linalg.lstsq(base, embed, rcond=None)[0]
  rows = embed[row_ids] - base[row_ids] @ projection
  return projection.astype(np.float32), rows.astype(np.float32)
