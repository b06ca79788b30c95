"""How logits become the distributions tokens are drawn from, as data, and Saguaro sampling.

`Sampling` is what a user asks for (per request); `Warp` is the same settings as per-row arrays,
the form every jitted program takes. Because temperature, top-k and top-p are array data, one
compiled program serves any mix of requests; the only thing the programs are compiled for is
whether every row is greedy (`TargetPlan.greedy`, `DraftPlan.greedy`), which removes
distributions altogether.

Semantics (the exactness tests' numpy oracle implements the same text independently):
  1. temperature T: p = softmax(logits / T); T = 0 is greedy (a point mass on the argmax,
     ties to the lowest id);
  2. top-k (0 = off): keep every token whose probability is at least the k-th largest one (ties
     at the cut are all kept), renormalize;
  3. top-p (1 = off): keep every token x for which the mass of the tokens strictly more likely
     than x is below top_p (the smallest such set, with ties at the cut all kept), renormalize.
Exactness rule: the target's p and the draft's q of a row are warped by the same `Warp`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

_ONE_BITS = 0x3F800000  # the int32 bit pattern of f32 1.0; non-negative floats order as ints
_BISECTIONS = 31  # enough to pin any threshold in [0, 1] to one float


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sampling:
  """One request's sampling settings.

  Attributes:
    temperature: 0 = greedy.
    top_k: keep the k most likely tokens (0 = off).
    top_p: keep the smallest set of most likely tokens with mass >= top_p (1.0 = off).
  """

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    t, k, p = self.temperature, self.top_k, self.top_p
    if not isinstance(t, int | float) or not math.isfinite(t) or t < 0:
      raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 0:
      raise ValueError(f"top_k must be an int >= 0 (0 = off), got {k!r}")
    if not isinstance(p, int | float) or not math.isfinite(p) or not 0.0 < p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1] (1 = off), got {p!r}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class Warp:
  """Per-row sampling settings, the data form of `Sampling` (rows are the leading axis).

  Attributes:
    temperature: f32[B], 0 = greedy.
    top_k: i32[B], 0 = off.
    top_p: f32[B], 1 = off.
  """

  temperature: jax.Array  # f32[B]
  top_k: jax.Array  # i32[B]
  top_p: jax.Array  # f32[B]

  @classmethod
  def of(cls, rows: Sequence[Sampling]) -> Warp:
    """Host arrays (numpy) for one `Sampling` per row."""
    return cls(
      temperature=np.asarray([s.temperature for s in rows], np.float32),
      top_k=np.asarray([s.top_k for s in rows], np.int32),
      top_p=np.asarray([s.top_p for s in rows], np.float32),
    )


def _per_row(x: jax.Array, logits: jax.Array) -> jax.Array:
  """A per-row value [B, ...] shaped to broadcast against logits [B, ..., V]."""
  x = jnp.asarray(x)
  return x.reshape(x.shape + (1,) * (logits.ndim - x.ndim))


def _bits(x: jax.Array) -> jax.Array:
  return jax.lax.bitcast_convert_type(x, jnp.float32)


def _bisect(pred, shape, lo: int, hi: int) -> jax.Array:
  """The int32 float pattern where `pred` (monotone: False below, True from there on) first
  holds, searched in (lo, hi] with pred(hi) True; `pred(t)` takes f32 thresholds of `shape`."""

  def body(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    ok = pred(_bits(mid))
    open_ = hi - lo > 1  # a settled search stays put (`lo` itself is never evaluated)
    return jnp.where(open_ & ~ok, mid, lo), jnp.where(open_ & ok, mid, hi)

  init = (jnp.full(shape, lo, jnp.int32), jnp.full(shape, hi, jnp.int32))
  return jax.lax.fori_loop(0, _BISECTIONS, body, init)[1]


def top_k_mask(probs: jax.Array, top_k: jax.Array) -> jax.Array:
  """Tokens whose probability is at least the k-th largest (all tokens where k = 0 or k >= V).

  Found by bisection on the threshold (31 passes of compare-and-count over V), not a sort:
  top-k is then data, and costs a fraction of sorting a 49,152-token vocabulary on CPU.
  """
  k = jnp.broadcast_to(top_k, probs.shape[:-1])
  # First threshold at which fewer than k tokens remain; the cut is the float just below it.
  fewer = lambda t: (probs >= t[..., None]).sum(-1) < k
  first = _bisect(fewer, probs.shape[:-1], 0, _ONE_BITS + 1)
  threshold = jnp.where(k > 0, _bits(first - 1), 0.0)
  return probs >= threshold[..., None]


def top_p_mask(probs: jax.Array, top_p: jax.Array) -> jax.Array:
  """Tokens x with mass(tokens strictly more likely than x) < top_p (all where top_p >= 1)."""
  top_p = jnp.broadcast_to(top_p, probs.shape[:-1])
  below = lambda t: jnp.where(probs > t[..., None], probs, 0.0).sum(-1) < top_p
  threshold = _bits(_bisect(below, probs.shape[:-1], -1, _ONE_BITS))
  return probs >= jnp.where(top_p < 1.0, threshold, 0.0)[..., None]


def _renormalized(probs: jax.Array, keep: jax.Array) -> jax.Array:
  kept = jnp.where(keep, probs, 0.0)
  return kept / kept.sum(-1, keepdims=True)


def _filter(probs: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  probs = _renormalized(probs, top_k_mask(probs, top_k))
  return _renormalized(probs, top_p_mask(probs, top_p))


def warped_probs(logits: jax.Array, warp: Warp) -> jax.Array:
  """The distribution f32[B, ..., V] each row samples from (see the module docstring); rows with
  temperature 0 get a point mass on the argmax. Filtering runs only when some row asks for it
  (`lax.cond`: one program either way)."""
  logits = logits.astype(jnp.float32)
  t = _per_row(warp.temperature, logits)
  # Shifted by the max before dividing: at a tiny temperature (1e-38, say) logits / T would
  # overflow to inf and the softmax to NaN; shifted, the scores stay <= 0 (-inf at worst).
  shifted = logits - jnp.max(logits, axis=-1, keepdims=True)
  probs = jax.nn.softmax(shifted / jnp.where(t > 0, t, 1.0), axis=-1)
  top_k, top_p = _per_row(warp.top_k, logits[..., 0]), _per_row(warp.top_p, logits[..., 0])
  filtering = jnp.any(warp.top_k > 0) | jnp.any(warp.top_p < 1.0)
  probs = jax.lax.cond(filtering, _filter, lambda p, *_: p, probs, top_k, top_p)
  greedy = jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
  return jnp.where(t > 0, probs, greedy)


def saguaro(probs: jax.Array, fan_out: jax.Array, c: float, max_fan_out: int) -> jax.Array:
  """Saguaro sampling σ_{F,C} (paper Definition 14): the mass of the top-`fan_out` tokens is
  multiplied by `c` in [0, 1] and the distribution renormalized.

  Lowering q on the tokens the speculation cache will hold raises the residual max(0, p - q)
  there, so bonus tokens concentrate on cached outcomes. Where nothing outside the top-F has mass
  (e.g. c = 0 on a distribution supported on F tokens) the distribution is left unchanged; the
  verifier uses whatever q really produced the token, so exactness never depends on this choice.

  Args:
    probs: f32[..., V].
    fan_out: F, an int array broadcasting against probs[..., 0] (0 = no scaling).
    c: the scale C (static).
    max_fan_out: static upper bound of `fan_out` (at most V).
  """
  if c == 1.0:
    return probs
  fan_out = jnp.asarray(fan_out)
  values = jax.lax.top_k(probs, max_fan_out)[0]  # [..., max_fan_out], descending
  index = jnp.broadcast_to(jnp.maximum(fan_out - 1, 0), probs.shape[:-1])[..., None]
  kth = jnp.take_along_axis(values, index, axis=-1)
  top = (probs >= kth) & (fan_out[..., None] > 0)
  scaled = jnp.where(top, probs * c, probs)
  total = scaled.sum(-1, keepdims=True)
  return jnp.where(total > 0, scaled / jnp.where(total > 0, total, 1.0), probs)


# What each per-row key is for (`row_keys`): a row's draws for one use never reuse another's.
VERIFY, PROPOSE, EXPAND, BACKUP = 1, 2, 3, 4


def row_keys(seeds: jax.Array, positions: jax.Array, use: int) -> jax.Array:
  """One key per row, key[B], for one `use` at each row's position i32[B].

  Every random draw of a row comes from its own seed (its request's) and the position it decodes
  at, never from a key shared by the batch or split per round: a request's tokens are then the
  same whatever other requests share its rounds, whichever slot it sits in, and however often a
  program that draws for it runs (a speculator re-expanding after a join draws the same again).
  """
  return jax.vmap(lambda k, p: jax.random.fold_in(jax.random.fold_in(k, use), p))(seeds, positions)


def fold_rows(keys: jax.Array, i) -> jax.Array:
  """key[B] -> key[B] for sub-step `i` (an i32 scalar) of the same use."""
  return jax.vmap(lambda k: jax.random.fold_in(k, i))(keys)


def sample(keys: jax.Array, probs: jax.Array) -> jax.Array:
  """Draw token ids i32[B, ...] from f32[B, ..., V] distributions, row b with keys[b] (exact:
  Gumbel-max on log p; the draws of a row's several distributions are independent)."""
  draw = lambda k, p: jax.random.categorical(k, jnp.log(p), axis=-1)
  return jax.vmap(draw)(keys, probs).astype(jnp.int32)
