"""The one place that decides how the Pallas tree-attention kernel runs on each platform.

GPU (cuda): the Triton backend, chosen explicitly with `pallas.triton.CompilerParams`.
  - On jax 0.10.2 it is the backend that lowers this kernel through plain `pl.pallas_call`:
    the cross-lowering test exports it for "cuda" to the `__gpu$xla.gpu.triton` custom call
    on a CPU host, and 0.10.2 emits no deprecation warning for it.
  - The alternative, Mosaic GPU, is what `pl.pallas_call` picks when no compiler params are
    given (`jax_pallas_use_mosaic_gpu` defaults to True), but that route is itself deprecated
    ("migrate to `plgpu.kernel`") and fails for this kernel: it stages each program's whole
    cache slice in shared memory (exported at S=1024, H=128, bf16 it asks for 594 KB of the
    232 KB there are). A Mosaic GPU kernel is a different
    program (warpgroups, explicit SMEM staging, `plgpu.kernel`), worth writing only once a
    device run shows the need.
  - JAX 0.11 deprecates the Triton backend; the Triton kernel body uses only `pl` and `jnp`
    operations, so the cuda plan below is the only thing to revisit then.
  - Triton needs every in-kernel array to have power-of-two sizes and matmul dimensions of at
    least 16, and keeps the accumulator in registers, so query rows are tiled by 128.

TPU: Mosaic TPU with `pltpu.CompilerParams`, and a kernel variant of its own. The loop kernel's
  blocks do not fit Mosaic: it tiles the last two block dimensions by (8, 128), so a block cannot
  single out one KV head of the [B, S, K, H] cache, and it copies each program's whole block into
  VMEM before the body runs, so a loop inside would save compute but not bandwidth. The TPU
  variant views the cache as [B, S, K * H] (a free reshape) so a block takes whole 128-lane tiles
  of one KV head (H = 128) or of a few adjacent heads (H = 64: pairs), puts main-cache blocks on
  the last grid axis ("arbitrary"), keeps m/l/acc in VMEM scratch, and scalar-prefetches each
  row tile's largest visible length so the block index map clamps: blocks past it map to the
  block already resident, which is not copied again. Cross-lowering checks only that Mosaic MLIR
  is emitted; libtpu's own compilation (layouts, VMEM limits) needs a TPU, and the per-head
  64-lane slices of H = 64 are the least certain part.

Interpret mode (CPU): either kernel body runs through the Pallas interpreter. By default it
  simulates the cuda plan (same padding, tiling and loop), so CPU tests exercise exactly the
  program a GPU would compile.

The default attention impl is `tree_attention.default_impl`'s ("xla" everywhere until a device
benchmark shows the kernel faster), chosen without importing this module.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

Platform = Literal["cuda", "tpu"]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class PallasBackend:
  """How the kernel is shaped and compiled for one platform."""

  platform: Platform  # which kernel variant and compiler params
  interpret: bool  # run through the Pallas interpreter instead of compiling
  max_rows: int  # query rows (branches x query heads of a group) per program
  min_dim: int  # smallest array dimension the platform's matmuls accept
  pow2: bool  # every in-kernel array dimension must be a power of two

  def compiler_params(self, *, rows: int, block_kv: int, head_dim: int, itemsize: int):
    """Compiler params for `pl.pallas_call`; None in interpret mode."""
    if self.interpret:
      return None
    if self.platform == "tpu":
      # Sequences, KV heads and row tiles are independent; main-cache blocks carry the
      # online-softmax state in scratch, so that axis must run in order.
      return pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
      )
    # Two pipelined stages of K and V blocks if they fit the ~228 KiB of shared memory on
    # Hopper with room to spare; the wide f32 blocks get one. Eight warps once the f32
    # accumulator of a tile (rows x head_dim) would crowd four warps' registers.
    stage_bytes = 2 * block_kv * head_dim * itemsize
    return pltriton.CompilerParams(
      num_warps=8 if rows * head_dim >= 128 * 128 else 4,
      num_stages=2 if 2 * stage_bytes <= 160 * 1024 else 1,
    )


def select_backend(platform: str | None = None, interpret: bool | None = None) -> PallasBackend:
  """The backend for `platform` ("cuda", "gpu", "rocm" or "tpu"; default: the default backend).

  `interpret=None` compiles on GPU and TPU and interprets everywhere else. Asking for a
  platform that is not the default backend (as cross-lowering does) needs `interpret=False`.
  """
  default = jax.default_backend()
  if interpret is None:
    interpret = default not in ("gpu", "cuda", "tpu")
  name = platform or default
  if name == "tpu":
    # Mosaic's minimum tile is (8, 128) for 32-bit and (16, 128) for packed 16-bit dtypes; 16
    # serves both. Rows live in VMEM, which holds a far larger tile than GPU registers.
    return PallasBackend(platform="tpu", interpret=interpret, max_rows=512, min_dim=16, pow2=False)
  if name in ("gpu", "cuda", "rocm") or interpret:  # elsewhere, interpret the GPU program
    return PallasBackend(platform="cuda", interpret=interpret, max_rows=128, min_dim=16, pow2=True)
  raise ValueError(
    f"no compiled Pallas backend for platform {name!r}; use 'cuda', 'gpu', 'tpu' or interpret=True"
  )
