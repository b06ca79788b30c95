"""One test suite for every tree-attention implementation against the reference.

Each implementation in IMPLS runs through the public op ("pallas" in interpret mode, which
simulates the GPU program); "pallas_tpu" is the TPU kernel variant, also interpreted. Cache slots
past what any query may see, and tree steps past `tree_step`, hold NaN, so an implementation
that reads (and does not mask) them fails. The Pallas kernels are also cross-lowered for cuda
and tpu with `jax.export`, which needs no accelerator.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.export import DisabledSafetyCheck
from jax.sharding import AbstractDevice, AbstractMesh

from ssd_jax.kernels import (
  IMPLS,
  BlockSizes,
  default_impl,
  tree_attention,
  tree_attention_reference,
)
from ssd_jax.kernels.backend import select_backend
from ssd_jax.kernels.pallas_tree_attention import tree_attention_pallas
from ssd_jax.kernels.xla import tree_attention_xla

ALL_IMPLS = (*IMPLS, "pallas_tpu")
TOLERANCES = {jnp.float32: dict(atol=2e-5, rtol=2e-5), jnp.bfloat16: dict(atol=2e-2, rtol=2e-2)}
TREE_STEPS = 3  # R: tree slots per branch; step 2 is unused (NaN) when tree_step = 1
BATCH = 2


@dataclasses.dataclass(frozen=True)
class Case:
  """A shape bucket: T queries, N query heads over K KV heads, head_dim H, S cache slots."""

  name: str
  T: int
  N: int
  K: int
  H: int
  S: int
  lengths: tuple[int, ...]  # committed prefix per sequence
  max_depth: int  # fork depths are drawn from [0, max_depth]
  per_sequence_depth: bool  # depth i32[B, T] instead of i32[T]
  block_kv: int = 16


CASES = [
  # Causal self-attention over the new tokens only (as `hidden_states` calls it): S below the
  # smallest GPU block, so the wrapper pads the cache; G = 3.
  Case(
    "self_T7_G3", T=7, N=6, K=2, H=64, S=7, lengths=(0, 0), max_depth=6, per_sequence_depth=False
  ),
  # One query per sequence, no GQA, an empty prefix, S not a multiple of the block.
  Case("T1_G1", T=1, N=4, K=4, H=64, S=40, lengths=(0, 21), max_depth=0, per_sequence_depth=False),
  # 24 branches x 8 heads = 192 rows: two row tiles on GPU; per-sequence fork depths; the
  # default block (128) shrunk to the 64-slot cache.
  Case(
    "T24_G8",
    T=24,
    N=8,
    K=1,
    H=128,
    S=64,
    lengths=(5, 30),
    max_depth=8,
    per_sequence_depth=True,
    block_kv=128,
  ),
  # A prefix exactly one block long next to one that is not; head_dim 128, G = 3.
  Case(
    "T7_G3", T=7, N=6, K=2, H=128, S=48, lengths=(16, 33), max_depth=6, per_sequence_depth=False
  ),
]


def _poison_cache(x, limits):
  """NaN in slots >= limits[b] (x [B, S, K, H], limits i32[B])."""
  unused = jnp.arange(x.shape[1])[None, :] >= limits[:, None]  # bool[B, S]
  return jnp.where(unused[:, :, None, None], jnp.nan, x).astype(x.dtype)


def make_inputs(
  case: Case, dtype, *, with_tree: bool, tree_step: int = 1, seed: int = 0, fork_depth=None
):
  """Random inputs with every slot no query may see set to NaN; `fork_depth` (i32[T])
  replaces the random fork depths."""
  rng = np.random.default_rng(seed)
  keys = jax.random.split(jax.random.key(seed), 5)
  B, T, N, K, H, S = BATCH, case.T, case.N, case.K, case.H, case.S
  q = jax.random.normal(keys[0], (B, T, N, H), dtype)
  k = jax.random.normal(keys[1], (B, S, K, H), dtype)
  v = jax.random.normal(keys[2], (B, S, K, H), dtype)
  lengths = jnp.asarray(case.lengths, jnp.int32)
  depth_shape = (B, T) if case.per_sequence_depth else (T,)
  depth = rng.integers(0, case.max_depth + 1, size=depth_shape)
  if fork_depth is not None:
    depth = np.asarray(fork_depth)
  if case.S == case.T:  # plain causal attention over the new tokens
    depth = np.arange(T)
  depth = jnp.asarray(depth, jnp.int32)
  limits = lengths + jnp.broadcast_to(depth, (B, T)).max(axis=1) + 1  # i32[B]
  assert int(limits.max()) <= S, "case must fit its cache"
  k, v = _poison_cache(k, limits), _poison_cache(v, limits)
  if not with_tree:
    return q, k, v, lengths, depth, None, None, None
  tree_k = jax.random.normal(keys[3], (B, TREE_STEPS, T, K, H), dtype)
  tree_v = jax.random.normal(keys[4], (B, TREE_STEPS, T, K, H), dtype)
  unused = (jnp.arange(TREE_STEPS) > tree_step)[None, :, None, None, None]
  tree_k, tree_v = (jnp.where(unused, jnp.nan, x).astype(dtype) for x in (tree_k, tree_v))
  return q, k, v, lengths, depth, tree_k, tree_v, jnp.int32(tree_step)


def _pallas_fn(platform: str, *, interpret: bool, block_sizes: BlockSizes):
  """The Pallas kernel variant for `platform`, with the public op's positional signature."""

  def attend(q, k, v, lengths, depth, *tree):
    depth = jnp.broadcast_to(depth, q.shape[:2])
    return tree_attention_pallas(
      q, k, v, lengths, depth, *tree, scale=q.shape[-1] ** -0.5, block_kv=block_sizes.block_kv,
      interpret=interpret, platform=platform,
    )  # fmt: skip

  return attend


@functools.cache
def _attend_fn(impl: str, block_kv: int):
  """A jitted implementation with the public op's signature (positional tree arguments)."""
  block_sizes = BlockSizes(block_kv=block_kv)
  if impl == "pallas_tpu":
    return jax.jit(_pallas_fn("tpu", interpret=True, block_sizes=block_sizes))

  def attend(q, k, v, lengths, depth, *tree):
    interpret = True if impl == "pallas" else None
    return tree_attention(
      q, k, v, lengths, depth, *tree, impl=impl, block_sizes=block_sizes, interpret=interpret
    )

  # The reference loops over every (sequence, query, head); eager is cheaper than compiling it.
  return attend if impl == "reference" else jax.jit(attend)


def _run(impl, case: Case, args):
  q, k, v, lengths, depth, tree_k, tree_v, tree_step = args
  tree = () if tree_k is None else (tree_k, tree_v, tree_step)
  return _attend_fn(impl, case.block_kv)(q, k, v, lengths, depth, *tree)


@functools.cache
def _expected(case: Case, dtype, with_tree: bool):
  args = make_inputs(case, dtype, with_tree=with_tree)
  depth = jnp.broadcast_to(args[4], (BATCH, case.T))
  return tree_attention_reference(*args[:4], depth, *args[5:], scale=case.H**-0.5)


@pytest.mark.parametrize("with_tree", [False, True], ids=["main", "tree"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_matches_reference(impl, case, dtype, with_tree):
  args = make_inputs(case, dtype, with_tree=with_tree)
  out = _run(impl, case, args)
  chex.assert_shape(out, args[0].shape)
  chex.assert_type(out, dtype)
  chex.assert_tree_all_finite(out)
  chex.assert_trees_all_close(out, _expected(case, dtype, with_tree), **TOLERANCES[dtype])


def _stacked(x, layer: int, layers: int = 3):
  """x [B, S, K, H] as layer `layer` of a stacked cache whose other layers are all NaN."""
  stack = jnp.full((layers, *x.shape), jnp.nan, x.dtype)
  return stack.at[layer].set(x)


@pytest.mark.parametrize("with_tree", [False, True], ids=["main", "tree"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", [c for c in CASES if c.S > 8], ids=lambda c: c.name)
@pytest.mark.parametrize(("dense", "block"), [(8, 8), (16, 16), (8, 24)])
def test_xla_blocks_of_a_stacked_cache_match_reference(dense, block, case, dtype, with_tree):
  """A decode step's layer read from the stacked cache, the slots past `dense` block by block
  (the last block shifted back when the cache does not hold a whole one): the reference's
  result, with NaN in every other layer and in every slot no query sees."""
  q, k, v, lengths, depth, *tree = make_inputs(case, dtype, with_tree=with_tree)
  depth = jnp.broadcast_to(depth, (BATCH, case.T))
  attend = jax.jit(
    functools.partial(tree_attention_xla, scale=case.H**-0.5, dense_slots=dense, block_slots=block)
  )
  out = attend(q, _stacked(k, 1), _stacked(v, 1), lengths, depth, *tree, layer=jnp.int32(1))
  chex.assert_tree_all_finite(out)
  chex.assert_trees_all_close(out, _expected(case, dtype, with_tree), **TOLERANCES[dtype])


@pytest.mark.parametrize("impl", IMPLS)
def test_a_layer_of_the_stacked_cache_is_the_layer_alone(impl):
  """The public op's `layer`: every impl reads that layer of [L, B, S, K, H] (the XLA impl's
  blocked path included: S = 600 slots, more than it reads at once)."""
  case = Case("long", T=4, N=4, K=2, H=16, S=600, lengths=(520, 3), max_depth=3,
              per_sequence_depth=False)  # fmt: skip
  q, k, v, lengths, depth, *tree = make_inputs(case, jnp.float32, with_tree=True)
  alone = tree_attention(q, k, v, lengths, depth, *tree, impl="reference")
  stacked = jax.jit(
    functools.partial(tree_attention, impl=impl, interpret=True), static_argnames=()
  )(q, _stacked(k, 2), _stacked(v, 2), lengths, depth, *tree, layer=jnp.int32(2))
  chex.assert_trees_all_close(stacked, alone, **TOLERANCES[jnp.float32])
  with pytest.raises(ValueError, match="k and v must be"):
    tree_attention(q, k, v, lengths, depth, layer=0)


def test_poisoned_slots_would_leak():
  """Negative control: masking the scores of unused slots is not enough, their values must not
  be read (or must be zeroed) either, so the NaN poisoning does catch out-of-bounds reads."""
  case = CASES[1]  # N = K: no grouping
  q, k, v, lengths, depth, *_ = make_inputs(case, jnp.float32, with_tree=False)
  limit = lengths[:, None] + depth[None, :] + 1  # i32[B, T]
  visible = jnp.arange(case.S)[None, None, :] < limit[:, :, None]  # bool[B, T, S]
  scores = jnp.einsum("BTNH,BSNH->BNTS", q, k)
  weights = jax.nn.softmax(jnp.where(visible[:, None], scores, -jnp.inf), axis=-1)
  assert bool(jnp.isnan(jnp.einsum("BNTS,BSNH->BTNH", weights, v)).all())


# 25 examples: each is one call of an already compiled program (the shape is fixed), so they add
# seconds, and 5 left most (impl, tree step, depth) combinations untried in any one run.
@hypothesis.settings(
  max_examples=int(os.environ.get("SSD_HYPOTHESIS_EXAMPLES", "25")),
  deadline=None,
  suppress_health_check=[hypothesis.HealthCheck.too_slow],
)
@hypothesis.given(
  impl=st.sampled_from(["xla", "pallas", "pallas_tpu"]),
  depth=st.lists(st.integers(0, 4), min_size=8, max_size=8),
  lengths=st.lists(st.integers(0, 40), min_size=BATCH, max_size=BATCH),
  tree_step=st.integers(0, TREE_STEPS - 1),
  seed=st.integers(0, 2**16),
)
def test_random_fork_depths(impl, depth, lengths, tree_step, seed):
  """Any fork-depth vector, prefix length and tree step; one fixed shape, so no recompiles."""
  case = Case(
    "prop", T=8, N=4, K=2, H=64, S=48, lengths=tuple(lengths), max_depth=4, per_sequence_depth=False
  )
  args = make_inputs(
    case, jnp.float32, with_tree=True, tree_step=tree_step, seed=seed, fork_depth=depth
  )
  out = _run(impl, case, args)
  full_depth = jnp.broadcast_to(args[4], (BATCH, case.T))
  expected = tree_attention_reference(*args[:4], full_depth, *args[5:], scale=case.H**-0.5)
  chex.assert_trees_all_close(out, expected, **TOLERANCES[jnp.float32])


def _valid_args():
  return make_inputs(CASES[1], jnp.float32, with_tree=True)


# (argument made invalid, what the error must start with)
BAD_ARGUMENTS = {
  "q": lambda a: dict(q=a["q"][0]),
  "k": lambda a: dict(k=a["k"][..., :32]),
  "v": lambda a: dict(v=a["v"][:, :8]),
  "query heads": lambda a: dict(q=a["q"][:, :, :3]),
  "lengths": lambda a: dict(lengths=a["lengths"][:1]),
  "depth": lambda a: dict(depth=jnp.zeros((5,), jnp.int32)),
  "tree_k and tree_v": lambda a: dict(tree_v=None),
  "tree_k": lambda a: dict(tree_k=a["tree_k"][:, :, :, :1], tree_v=a["tree_v"][:, :, :, :1]),
  "tree_step": lambda a: dict(tree_step=None),
}


@pytest.mark.parametrize("name", list(BAD_ARGUMENTS))
@pytest.mark.parametrize("impl", IMPLS)
def test_validation_names_the_argument(impl, name):
  names = ("q", "k", "v", "lengths", "depth", "tree_k", "tree_v", "tree_step")
  args = dict(zip(names, _valid_args(), strict=True))
  args.update(BAD_ARGUMENTS[name](args))
  with pytest.raises(ValueError, match=f"^{name}"):
    tree_attention(**args, impl=impl, interpret=True)


def test_bad_impl_and_block_sizes_are_named():
  q, k, v, lengths, depth, *_ = _valid_args()
  with pytest.raises(ValueError, match="impl"):
    tree_attention(q, k, v, lengths, depth, impl="triton")
  with pytest.raises(ValueError, match="block_kv"):
    BlockSizes(block_kv=48)
  with pytest.raises(ValueError, match="platform"):
    select_backend("metal", interpret=False)


def test_backend_choice_on_cpu():
  assert default_impl("cpu") == "xla"
  backend = select_backend()
  assert backend.interpret and backend.platform == "cuda"  # the GPU program, interpreted
  assert backend.compiler_params(rows=128, block_kv=128, head_dim=128, itemsize=2) is None
  compiled = select_backend("cuda", interpret=False)
  params = compiled.compiler_params(rows=128, block_kv=128, head_dim=128, itemsize=2)
  assert params.num_warps == 8 and params.num_stages == 2


_CUSTOM_CALLS = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}


def _export(platform, args):
  attend = _pallas_fn(platform, interpret=False, block_sizes=BlockSizes())
  checks = [DisabledSafetyCheck.custom_call(_CUSTOM_CALLS[platform])]
  export = jax.export.export(jax.jit(attend), platforms=[platform], disabled_checks=checks)
  if platform != "tpu":
    return export(*args)
  # Mosaic TPU lowering asks the device kind for its tiling; an abstract TPU stands in for it.
  device = AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
  with jax.sharding.use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=device)):
    return export(*args)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize(
  ("dtype", "H", "with_tree"), [(jnp.bfloat16, 128, True), (jnp.float32, 64, False)]
)
def test_pallas_cross_lowers(platform, dtype, H, with_tree):
  """Lowers for the real platform without its hardware, at a realistic decode shape: 24 branches,
  8 query heads per KV head, a cache of 1000 slots (not a multiple of the block)."""
  B, T, N, K, S, R = 2, 24, 16, 2, 1000, 4
  sds = jax.ShapeDtypeStruct
  args = [sds((B, T, N, H), dtype), sds((B, S, K, H), dtype), sds((B, S, K, H), dtype)]
  args += [sds((B,), jnp.int32), sds((B, T), jnp.int32)]
  if with_tree:
    args += [sds((B, R, T, K, H), dtype), sds((B, R, T, K, H), dtype), sds((), jnp.int32)]
  exported = _export(platform, args)
  assert _CUSTOM_CALLS[platform] in exported.mlir_module()
  assert exported.out_avals[0].shape == (B, T, N, H)
