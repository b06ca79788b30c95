"""Pallas tree attention: grouped-query flash attention over a shared prefix and private tree slots.

One program serves one (sequence, KV head) and a tile of its query rows: the T queries times the
G query heads that share the KV head, folded into rows (row = t * G + g). Every branch and head of
the group then reads the shared prefix once, so arithmetic intensity grows with T * G.

Per program:
  1. online softmax over main-cache blocks of `block_kv` slots; the trip count is dynamic,
     cdiv(largest visible length of the tile, block_kv), so slots nobody sees are never read;
  2. then the tree: R private slots per query, diagonal (query t only sees column t of tree
     step r <= tree_step), gathered per row by a one-hot matmul and merged into the same
     softmax state.
Masks come from per-row visible lengths (lengths[b] + depth[b, t] + 1) and iota arithmetic; no
[T, S] mask is ever streamed.

Two kernel bodies share these steps (see backend.py for why): `_loop_kernel` (GPU, Triton; also
what interpret mode runs by default) walks the cache with a `fori_loop`, and `_grid_kernel`
(TPU, Mosaic) makes the cache blocks the last grid axis with the softmax state in VMEM scratch.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

from ssd_jax.kernels.backend import PallasBackend, select_backend

_NEG = -1e30  # finite: exp(_NEG - m) is 0 and never NaN
_F32 = jnp.float32


def _dot(a, b, contract_b: int):
  """a [M, D] @ b (contracting b's axis `contract_b`) in f32; contract_b=1 is a @ b.T."""
  return lax.dot_general(a, b, (((1,), (contract_b,)), ((), ())), preferred_element_type=_F32)


def _softmax_step(carry, s, v):
  """Online-softmax update with scores s f32[M, n] (masked entries at _NEG) and values v [n, H]."""
  row_max, row_sum, acc = carry  # f32[M, 1], f32[M, 1], f32[M, H]
  new_max = jnp.maximum(row_max, jnp.max(s, axis=1, keepdims=True))
  alpha = jnp.exp(row_max - new_max)
  p = jnp.exp(s - new_max)
  row_sum = alpha * row_sum + jnp.sum(p, axis=1, keepdims=True)
  return new_max, row_sum, alpha * acc + _dot(p.astype(v.dtype), v, 0)


def _block_scores(q, k_blk, start, lower, limits, scale):
  """Masked scores f32[M, n] of one main-cache block whose first slot is `start`.

  Slot s is visible to a row if lower <= s < its limit; `lower` > `start` only when the last
  block was shifted back to stay inside the cache and its first slots were already counted.
  """
  pos = start + lax.broadcasted_iota(jnp.int32, (1, k_blk.shape[0]), 1)  # i32[1, n]
  visible = (pos >= lower) & (pos < limits)  # bool[M, n]
  return jnp.where(visible, _dot(q, k_blk, 1) * scale, _NEG)


def _zero_unused(v_blk, start, max_limit):
  """Zero the value rows no query of the tile sees: they may hold anything (NaN in tests), and
  a zero softmax weight times NaN is still NaN."""
  pos = start + lax.broadcasted_iota(jnp.int32, (v_blk.shape[0], 1), 0)  # i32[n, 1]
  return jnp.where(pos < max_limit, v_blk, jnp.zeros_like(v_blk))


def _merge_tree(carry, q, tk_ref, tv_ref, count, row0, group, scale):
  """Fold tree slots (r, t), r < count, into the softmax state; query row i belongs to branch
  (row0 + i) // group. tk_ref, tv_ref: [R, T_pad, H]."""
  rows, branches = q.shape[0], tk_ref.shape[1]
  row = row0 + lax.broadcasted_iota(jnp.int32, (rows, branches), 0)
  branch_start = group * lax.broadcasted_iota(jnp.int32, (rows, branches), 1)
  # One-hot [M, T_pad]: a matmul with it gathers each row's branch (exact: one term per sum).
  onehot = ((row >= branch_start) & (row < branch_start + group)).astype(tk_ref.dtype)
  qf = q.astype(_F32)

  def body(r, carry):
    row_max, row_sum, acc = carry
    k_rows = _dot(onehot, tk_ref[r], 0)  # f32[M, H]
    v_rows = _dot(onehot, tv_ref[r], 0)
    s = jnp.sum(qf * k_rows, axis=1, keepdims=True) * scale  # f32[M, 1]
    new_max = jnp.maximum(row_max, s)
    alpha, p = jnp.exp(row_max - new_max), jnp.exp(s - new_max)
    return new_max, alpha * row_sum + p, alpha * acc + p * v_rows

  return lax.fori_loop(0, count, body, carry)


def _init_state(rows, head_dim):
  """Empty online-softmax state: running max, running sum, unnormalized output."""
  return (
    jnp.full((rows, 1), _NEG, _F32),
    jnp.zeros((rows, 1), _F32),
    jnp.zeros((rows, head_dim), _F32),
  )


def _loop_kernel(count_ref, limit_ref, q_ref, k_ref, v_ref, *refs, block_kv, group, scale):
  """GPU (Triton) variant: the whole cache slice is addressable and a loop walks its blocks.

  count_ref: i32[1] visible tree steps; limit_ref: i32[M, 1] visible main slots per row;
  q_ref: [M, H]; k_ref, v_ref: [S, H]; refs: (tk_ref, tv_ref [R, T_pad, H],) o_ref [M, H].
  """
  *tree_refs, o_ref = refs
  num_slots = k_ref.shape[0]
  aligned, last_start = num_slots % block_kv == 0, num_slots - block_kv
  q = q_ref[...]
  limits = limit_ref[...]
  max_limit = jnp.max(limits)

  def body(j, carry):
    lower = j * block_kv
    # A last block that would run past the cache is shifted back; its repeats are masked.
    start = pl.multiple_of(lower, block_kv) if aligned else jnp.minimum(lower, last_start)
    k_blk = k_ref[pl.ds(start, block_kv), :]
    v_blk = _zero_unused(v_ref[pl.ds(start, block_kv), :], start, max_limit)
    return _softmax_step(carry, _block_scores(q, k_blk, start, lower, limits, scale), v_blk)

  carry = lax.fori_loop(0, pl.cdiv(max_limit, block_kv), body, _init_state(*q.shape))
  if tree_refs:
    row0 = pl.program_id(2) * q.shape[0]
    carry = _merge_tree(carry, q, *tree_refs, count_ref[0], row0, group, scale)
  _, row_sum, acc = carry
  o_ref[...] = (acc / row_sum).astype(o_ref.dtype)


def _grid_kernel(max_limit_ref, count_ref, limit_ref, q_ref, k_ref, v_ref, *refs, group, scale):
  """TPU (Mosaic) variant: main-cache blocks are the last grid axis, softmax state in scratch.

  Mosaic tiles the last two block dimensions by (8, 128), so the cache is viewed as
  [B, S, K * H] and a block takes the lanes of `heads` adjacent KV heads: one head when H is a
  multiple of 128, else the fewest heads that fill whole lane tiles (all K at worst).
  max_limit_ref: i32[B, tiles] and count_ref: i32[1] (scalar prefetch); limit_ref: i32[M, 1];
  q_ref: [heads, M, H]; k_ref, v_ref: [n, heads * H] (block j); refs: (tk_ref, tv_ref
  [R, T_pad, heads * H],) o_ref [heads, M, H], then scratch f32 [heads, M, 1] x2, [heads, M, H].
  """
  *tree_refs, o_ref, m_ref, l_ref, acc_ref = refs
  b, tile, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  heads, rows, head_dim = q_ref.shape
  block_kv = k_ref.shape[0]
  max_limit = max_limit_ref[b, tile]
  start = j * block_kv
  lanes = [pl.ds(h * head_dim, head_dim) for h in range(heads)]  # static, per head

  @pl.when(j == 0)
  def _():
    for h in range(heads):
      m_ref[h], l_ref[h], acc_ref[h] = _init_state(rows, head_dim)

  @pl.when(start < max_limit)
  def _():
    limits = limit_ref[...]
    for h in range(heads):
      s = _block_scores(q_ref[h], k_ref[:, lanes[h]], start, start, limits, scale)
      v_blk = _zero_unused(v_ref[:, lanes[h]], start, max_limit)
      carry = (m_ref[h], l_ref[h], acc_ref[h])
      m_ref[h], l_ref[h], acc_ref[h] = _softmax_step(carry, s, v_blk)

  @pl.when(j == pl.num_programs(3) - 1)
  def _():
    for h in range(heads):
      carry = (m_ref[h], l_ref[h], acc_ref[h])
      if tree_refs:
        tk, tv = (x.at[:, :, lanes[h]] for x in tree_refs)
        carry = _merge_tree(carry, q_ref[h], tk, tv, count_ref[0], tile * rows, group, scale)
      _, row_sum, acc = carry
      o_ref[h] = (acc / row_sum).astype(o_ref.dtype)


def _heads_per_block(num_kv_heads: int, head_dim: int) -> int:
  """Fewest adjacent KV heads whose lanes fill whole 128-lane tiles (all of them at worst)."""
  for heads in range(1, num_kv_heads):
    if num_kv_heads % heads == 0 and heads * head_dim % 128 == 0:
      return heads
  return num_kv_heads


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def _dim(n: int, backend: PallasBackend) -> int:
  """Smallest array dimension >= n the backend accepts."""
  n = max(n, backend.min_dim)
  return pl.next_power_of_2(n) if backend.pow2 else _round_up(n, backend.min_dim)


def _tiling(rows: int, num_slots: int, block_kv: int, backend: PallasBackend):
  """(rows per program, padded rows, main-cache block) for T * G query rows and S slots."""
  tile = min(_dim(rows, backend), backend.max_rows)
  if backend.platform == "tpu":  # the last block may overhang the cache (masked); a short
    return tile, _round_up(rows, tile), min(block_kv, num_slots)  # cache is one whole block
  # The loop kernel slides its last block back inside the cache, so a block must fit in S
  # (the wrapper pads S only when S is below the smallest block).
  block = block_kv
  while block > num_slots and block > backend.min_dim:
    block //= 2
  return tile, _round_up(rows, tile), block


def _pad_axis(x, axis: int, size: int, value=0):
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


def _query_rows(q, num_kv_heads: int, padded_rows: int):
  """[B, T, N, H] -> [B, K, M_pad, H], row t * G + g of KV head k holding query head k * G + g."""
  B, T, N, H = q.shape
  G = N // num_kv_heads
  rows = q.reshape(B, T, num_kv_heads, G, H).transpose(0, 2, 1, 3, 4)
  return _pad_axis(rows.reshape(B, num_kv_heads, T * G, H), 2, padded_rows)


def _output(out, T: int, N: int):
  """[B, K, M_pad, H] -> [B, T, N, H]."""
  B, K, _, H = out.shape
  out = out[:, :, : T * (N // K)].reshape(B, K, T, N // K, H)
  return out.transpose(0, 2, 1, 3, 4).reshape(B, T, N, H)


def _row_limits(lengths, depth, group: int, padded_rows: int, num_slots: int):
  """i32[B, M_pad, 1]: main slots each row sees. Padding rows see slot 0, so that every row has
  a finite softmax; callers guarantee lengths[b] + depth[b, t] + 1 >= 1."""
  limits = jnp.clip(lengths[:, None] + depth + 1, 1, num_slots).astype(jnp.int32)  # i32[B, T]
  limits = jnp.repeat(limits, group, axis=1)
  return _pad_axis(limits, 1, padded_rows, value=1)[:, :, None]


def tree_attention_pallas(
  q: jax.Array,  # [B, T, N, H]
  k: jax.Array,  # [B, S, K, H]
  v: jax.Array,  # [B, S, K, H]
  lengths: jax.Array,  # i32[B]
  depth: jax.Array,  # i32[B, T]
  tree_k: jax.Array | None = None,  # [B, R, T, K, H]
  tree_v: jax.Array | None = None,  # [B, R, T, K, H]
  tree_step: jax.Array | int | None = None,  # i32[]
  *,
  scale: float,
  block_kv: int = 128,
  interpret: bool | None = None,
  platform: str | None = None,
) -> jax.Array:
  """Tree attention as a Pallas kernel; same contract as `tree_attention_reference`.

  Args:
    block_kv: main-cache slots per step (a power of two; shrunk for short caches).
    interpret: run in the Pallas interpreter.
    platform: "cuda"/"gpu" or "tpu" kernel variant.
    With neither given, the platform the program is lowered for decides: compiled on cuda,
    rocm and tpu, the cuda variant interpreted elsewhere (CPU).

  The main cache is never copied, except when S is below the smallest GPU block (16); query rows
  and the tree's branch axis are padded to the backend's sizes, which copies q and (when T is
  not already such a size) the tree.
  """
  mesh = _heads_mesh(k)
  if mesh is not None:
    kernel = functools.partial(
      _dispatch, scale=scale, block_kv=block_kv, interpret=interpret, platform=platform
    )
    return _over_heads(kernel, mesh, q, k, v, lengths, depth, tree_k, tree_v, tree_step)
  args = (q, k, v, lengths, depth, tree_k, tree_v, tree_step)
  return _dispatch(*args, scale=scale, block_kv=block_kv, interpret=interpret, platform=platform)


def _dispatch(
  q, k, v, lengths, depth, tree_k, tree_v, tree_step, *, scale, block_kv, interpret, platform
):
  """The kernel on one device's operands."""
  if platform is None and interpret is None:
    # Which kernel is decided when the program is lowered, not when it is traced: a program
    # exported from a CPU host for "cuda" or "tpu" (`python -m ssd_jax.bench lower`) then
    # carries that platform's compiled kernel, and elsewhere the interpreted GPU program runs,
    # as `select_backend` would choose on each platform.
    step = None if tree_k is None else jnp.asarray(tree_step, jnp.int32)
    branch = lambda backend: functools.partial(_attend, backend, scale=scale, block_kv=block_kv)
    return lax.platform_dependent(
      q,
      k,
      v,
      lengths,
      depth,
      tree_k,
      tree_v,
      step,
      cuda=branch(select_backend("cuda", interpret=False)),
      rocm=branch(select_backend("rocm", interpret=False)),
      tpu=branch(select_backend("tpu", interpret=False)),
      default=branch(select_backend("cuda", interpret=True)),
    )
  backend = select_backend(platform, interpret)
  args = (q, k, v, lengths, depth, tree_k, tree_v, tree_step)
  return _attend(backend, *args, scale=scale, block_kv=block_kv)


def _heads_mesh(k: jax.Array):
  """The mesh of `k`'s sharding when it spans several devices (a tensor-parallel target), else
  None. A Pallas kernel is a custom call the SPMD partitioner cannot split: Mosaic TPU refuses to
  lower it ("cannot be automatically partitioned"), and elsewhere XLA would gather every
  device's heads to run it whole. The caller shards it over the heads instead."""
  sharding = getattr(jax.typeof(k), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or mesh.empty or mesh.size == 1:
    return None
  return mesh


def _over_heads(kernel, mesh, q, k, v, lengths, depth, tree_k, tree_v, tree_step):
  """`kernel` run per device on its own query and KV heads (the placement splits both over every
  mesh axis, heads of one group together: query head n reads KV head n // G on each device)."""
  axes = tuple(mesh.axis_names)
  heads = P(None, None, axes, None)  # q [B, T, N, H], k and v [B, S, K, H]
  tree_heads = P(None, None, None, axes, None)  # [B, R, T, K, H]
  step = None if tree_k is None else jnp.asarray(tree_step, jnp.int32)
  tree_spec = None if tree_k is None else tree_heads
  step_spec = None if tree_k is None else P()

  def local(q, k, v, lengths, depth, tree_k, tree_v, step):
    return kernel(q, k, v, lengths, depth, tree_k, tree_v, step)

  return jax.shard_map(
    local,
    mesh=mesh,
    in_specs=(heads, heads, heads, P(), P(), tree_spec, tree_spec, step_spec),
    out_specs=heads,
    check_vma=False,  # the kernel's outputs carry no varying-axes types
  )(q, k, v, lengths, depth, tree_k, tree_v, step)


def _attend(backend, q, k, v, lengths, depth, tree_k, tree_v, tree_step, *, scale, block_kv):
  """`tree_attention_pallas` with its backend chosen."""
  _, T, N, _ = q.shape
  num_slots, K = k.shape[1], k.shape[2]
  group = N // K
  tile, padded_rows, block_kv = _tiling(T * group, num_slots, block_kv, backend)
  if backend.platform == "cuda" and num_slots < block_kv:
    k, v = _pad_axis(k, 1, block_kv), _pad_axis(v, 1, block_kv)
  limits = _row_limits(lengths, depth, group, padded_rows, num_slots)
  q_rows = _query_rows(q, K, padded_rows)
  tree = ()
  count = jnp.zeros((1,), jnp.int32)
  if tree_k is not None:
    branches = _dim(T, backend)
    tree = (_pad_axis(tree_k, 2, branches), _pad_axis(tree_v, 2, branches))
    count = jnp.clip(jnp.asarray(tree_step, jnp.int32) + 1, 0, tree_k.shape[1]).reshape(1)
  call = _call_tpu if backend.platform == "tpu" else _call_loop
  sizes = dict(tile=tile, block_kv=block_kv, group=group, scale=scale)
  out = call(backend, count, limits, q_rows, k, v, tree, **sizes)
  return _output(out, T, N)


def _call_loop(backend, count, limits, q_rows, k, v, tree, *, tile, block_kv, group, scale):
  B, K, M, H = q_rows.shape
  S = k.shape[1]
  row_spec = pl.BlockSpec((None, None, tile, H), lambda b, h, i: (b, h, i, 0))
  # The whole cache slice of one KV head: on GPU a pointer, read only as far as the loop goes.
  cache_spec = pl.BlockSpec((None, S, None, H), lambda b, h, i: (b, 0, h, 0))
  tree_specs = [
    pl.BlockSpec((None, *x.shape[1:3], None, H), lambda b, h, i: (b, 0, 0, h, 0)) for x in tree
  ]
  kernel = functools.partial(_loop_kernel, block_kv=block_kv, group=group, scale=scale)
  return pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct(q_rows.shape, q_rows.dtype),
    grid=(B, K, M // tile),
    in_specs=[
      pl.BlockSpec((1,), lambda b, h, i: (0,)),
      pl.BlockSpec((None, tile, 1), lambda b, h, i: (b, i, 0)),
      row_spec,
      cache_spec,
      cache_spec,
      *tree_specs,
    ],
    out_specs=row_spec,
    interpret=backend.interpret,
    compiler_params=backend.compiler_params(
      rows=tile, block_kv=block_kv, head_dim=H, itemsize=k.dtype.itemsize
    ),
    name="tree_attention",
  )(count, limits, q_rows, k, v, *tree)


def _call_tpu(backend, count, limits, q_rows, k, v, tree, *, tile, block_kv, group, scale):
  B, K, M, H = q_rows.shape
  S = k.shape[1]
  heads = _heads_per_block(K, H)
  num_tiles, num_blocks = M // tile, math.ceil(S / block_kv)
  max_limits = jnp.max(limits.reshape(B, num_tiles, tile), axis=2)  # i32[B, tiles]
  # Heads side by side in the lane dimension: free reshapes of contiguous arrays.
  k, v = k.reshape(B, S, K * H), v.reshape(B, S, K * H)
  tree = tuple(x.reshape(*x.shape[:3], K * H) for x in tree)

  def cache_index(b, g, i, j, max_limit_ref, count_ref):
    # Past the tile's last visible block, stay on it: an unchanged block index is not copied.
    last = pl.cdiv(max_limit_ref[b, i], block_kv) - 1
    return b, jnp.minimum(j, last), g

  cache_spec = pl.BlockSpec((None, block_kv, heads * H), cache_index)
  row_spec = pl.BlockSpec((None, heads, tile, H), lambda b, g, i, j, *_: (b, g, i, 0))
  tree_specs = [
    pl.BlockSpec((None, *x.shape[1:3], heads * H), lambda b, g, i, j, *_: (b, 0, 0, g))
    for x in tree
  ]
  grid_spec = pltpu.PrefetchScalarGridSpec(
    num_scalar_prefetch=2,
    grid=(B, K // heads, num_tiles, num_blocks),
    in_specs=[
      pl.BlockSpec((None, tile, 1), lambda b, g, i, j, *_: (b, i, 0)),
      row_spec,
      cache_spec,
      cache_spec,
      *tree_specs,
    ],
    out_specs=row_spec,
    scratch_shapes=[
      pltpu.VMEM((heads, tile, 1), _F32),
      pltpu.VMEM((heads, tile, 1), _F32),
      pltpu.VMEM((heads, tile, H), _F32),
    ],
  )
  kernel = functools.partial(_grid_kernel, group=group, scale=scale)
  return pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct(q_rows.shape, q_rows.dtype),
    grid_spec=grid_spec,
    interpret=backend.interpret,
    compiler_params=backend.compiler_params(
      rows=tile, block_kv=block_kv, head_dim=H, itemsize=k.dtype.itemsize
    ),
    name="tree_attention_tpu",
  )(max_limits, count, limits, q_rows, k, v, *tree)
