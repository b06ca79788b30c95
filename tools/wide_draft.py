"""The wide draft (`smollm2-135m-draft-wide`): grown from the shipped narrow draft, trained with
its token embedding borrowed from the target (`ssd_jax.models.borrowed`).

Why grow rather than start over: the narrow draft's teacher data (1.4M tokens, 2 hours of
teacher time) is gone, and its weights hold what it learned. Growing is function-preserving:
the grown draft computes exactly the narrow one's logits on the tokens of its restricted head
before its first step, and training only has to find what the new capacity adds.

  * width 192 -> 384: old weights fill the top-left block; the new residual dimensions start at
    zero (every weight that *writes* into the residual stream is zero there) and are read by
    small random weights, so they get gradients from the first step without changing the
    function; norm weights are scaled by sqrt(192 / 384) because RMSNorm now averages over
    twice the dimensions, half of them zero;
  * heads 3 -> 6 (KV heads 1 -> 2, the same 3 query heads per KV head), MLP 512 -> 960: new
    heads and units read with random weights and write with zero ones;
  * the tied embedding: the narrow table factored as `base @ P` (least squares) plus exact
    rows R for the ranking's first N tokens (`borrowed.factor`).

The loss scores only the head's N rows (the ranking's first N tokens, as `--draft-vocab N` does
at inference): teacher mass on other tokens is pooled with the rest of the distribution.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from distill_core import clipped_update, pooled_cross_entropy

from ssd_jax.config import ModelConfig
from ssd_jax.models import borrowed, hidden_states

BASE = "smollm2-135m"


def wide_config(narrow: ModelConfig, width: int, heads: int, kv_heads: int, mlp: int):
  """`narrow` grown; RMSNorm's epsilon scaled with the width, so that norms averaging over the
  new zero dimensions too compute exactly what the narrow ones did."""
  return dataclasses.replace(
    narrow,
    hidden_size=width,
    num_heads=heads,
    num_kv_heads=kv_heads,
    intermediate_size=mlp,
    rms_norm_eps=narrow.rms_norm_eps * narrow.hidden_size / width,
  )


def grow(narrow_params, narrow: ModelConfig, wide: ModelConfig, base, row_ids, seed: int):
  """Factored params {proj, rows, layers, final_norm} of `wide` computing `narrow`'s function
  (see the module docstring); numpy float32."""
  if narrow.num_heads // narrow.num_kv_heads != wide.num_heads // wide.num_kv_heads:
    raise ValueError("growing keeps the query heads per KV head")
  rng = np.random.default_rng(seed)
  D0, D = narrow.hidden_size, wide.hidden_size
  keep = math.sqrt(D0 / D)  # RMSNorm over D dims of which D - D0 are zero

  def block(old, shape, read: bool):
    """`old` in the leading corner of a new array of `shape`: random (std 1/sqrt(D)) where
    the weight reads the residual stream, zero where it writes into it."""
    new = rng.normal(0, 1 / math.sqrt(D), shape) if read else np.zeros(shape)
    new[tuple(slice(0, n) for n in old.shape)] = old
    return new.astype(np.float32)

  lp = {k: np.asarray(v, np.float32) for k, v in narrow_params["layers"].items()}
  L, N, K, H, F = (
    wide.num_layers,
    wide.num_heads,
    wide.num_kv_heads,
    wide.head_dim,
    wide.intermediate_size,
  )
  layers = {
    "attn_norm": block(lp["attn_norm"] * keep, (L, D), read=False) + _fill(L, D0, D, keep),
    "mlp_norm": block(lp["mlp_norm"] * keep, (L, D), read=False) + _fill(L, D0, D, keep),
    "wq": block(lp["wq"], (L, D, N, H), read=True),
    "wk": block(lp["wk"], (L, D, K, H), read=True),
    "wv": block(lp["wv"], (L, D, K, H), read=True),
    "wo": block(lp["wo"], (L, N, H, D), read=False),
    "w_gate": block(lp["w_gate"], (L, D, F), read=True),
    "w_up": block(lp["w_up"], (L, D, F), read=True),
    "w_down": block(lp["w_down"], (L, F, D), read=False),
  }
  proj, rows = borrowed.factor(np.asarray(narrow_params["embed"], np.float32), base, row_ids)
  final = np.asarray(narrow_params["final_norm"], np.float32) * keep
  return {
    "proj": np.pad(proj, ((0, 0), (0, D - D0))),
    "rows": np.pad(rows, ((0, 0), (0, D - D0))),
    "layers": layers,
    "final_norm": np.concatenate([final, np.full(D - D0, keep, np.float32)]),
  }


def _fill(L, D0, D, value):
  """Norm weights of the new dimensions (which start at zero, so any value preserves the
  function): the same scale as the old ones'."""
  out = np.zeros((L, D), np.float32)
  out[:, D0:] = value
  return out


def shipped(name_or_path: str, row_ids) -> dict:
  """The factored params {proj, rows, layers, final_norm} of a saved wide draft (a shipped name
  or a directory; numpy float32): where a later stage starts when the earlier one's training
  state is gone. Its rows must be `row_ids`'s (the loss scores the head's rows in that order)."""
  from safetensors import safe_open  # noqa: PLC0415

  from ssd_jax.models.registry import ASSETS, SHIPPED_DRAFTS, load_model  # noqa: PLC0415

  directory = ASSETS / name_or_path if name_or_path in SHIPPED_DRAFTS else name_or_path
  with safe_open(f"{directory}/model.safetensors", "numpy") as f:  # only P, R and the row ids:
    proj, rows, ids = (f.get_tensor(k) for k in borrowed.TENSORS)  # load_model reads the rest
  if not np.array_equal(ids, row_ids):
    raise ValueError(f"{directory}: its embedding rows are not the first {len(row_ids)} ranked")
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), load_model(name_or_path).params)
  proj, rows = np.asarray(proj, np.float32), np.asarray(rows, np.float32)
  return {"proj": proj, "rows": rows} | {k: params[k] for k in ("layers", "final_norm")}


def slots(row_ids, vocab_size: int) -> np.ndarray:
  """slot[token] = its row in R, or len(row_ids) (a zero row) for tokens without one."""
  slot = np.full(vocab_size, len(row_ids), np.int32)
  slot[row_ids] = np.arange(len(row_ids), dtype=np.int32)
  return slot


def materialized(params, base, row_ids) -> dict:
  """Plain tied-Llama params (the table materialized), as the package loads them."""
  embed = borrowed.materialize(
    np.asarray(base), np.asarray(params["proj"]), np.asarray(params["rows"]), row_ids
  )
  return {"embed": embed, "layers": params["layers"], "final_norm": params["final_norm"]}


def head_logits(params, config, base, row_ids, slot, tokens):
  """Logits [B, T, N] over the head's rows (the ranking's first N tokens)."""
  B, T = tokens.shape
  rows = jnp.concatenate([params["rows"], jnp.zeros((1, config.hidden_size))])
  x0 = base[tokens] @ params["proj"] + rows[slot[tokens]]  # [B, T, D]
  # The batch's own embeddings as a B*T-row "vocabulary": hidden_states embeds by lookup.
  flat = {"embed": x0.reshape(B * T, -1), "layers": params["layers"]}
  x = hidden_states(
    flat | {"final_norm": params["final_norm"]}, jnp.arange(B * T).reshape(B, T), config=config
  )
  head = base[row_ids] @ params["proj"] + params["rows"]  # [N, D]
  return jnp.einsum("BTD,ND->BTN", x, head)


def loss(params, config, base, row_ids, slot, tokens, pos, ids, logp, mask):
  """`pooled_cross_entropy` over the head's rows (teacher mass on other tokens pooled with the
  rest), and greedy agreement with the teacher."""
  logits = head_logits(params, config, base, row_ids, slot, tokens)
  logits = jnp.take_along_axis(logits, pos[..., None], axis=1)  # [B, G, N]
  student = jax.nn.log_softmax(logits, -1)
  column = slot[ids]  # [B, G, k]: the teacher's top-k as head columns (N: not in the head)
  in_head = column < row_ids.shape[0]
  top = jnp.take_along_axis(student, jnp.minimum(column, row_ids.shape[0] - 1), axis=-1)
  return pooled_cross_entropy(student, top, jnp.exp(logp) * in_head, in_head, column[..., 0], mask)


@functools.partial(
  jax.jit, static_argnames=("config", "total", "peak", "warmup"), donate_argnums=(0, 1)
)
def train_step(params, opt, step, consts, batch, *, config, total, peak, warmup):
  """One clipped AdamW step on the schedule (`distill_core`, as for the narrow draft)."""
  (value, agree), grads = jax.value_and_grad(loss, has_aux=True)(params, config, *consts, *batch)
  params, opt = clipped_update(params, opt, grads, step, total=total, peak=peak, warmup=warmup)
  return params, opt, value, agree


@functools.partial(jax.jit, static_argnames="config")
def eval_step(params, consts, batch, *, config):
  return loss(params, config, *consts, *batch)
