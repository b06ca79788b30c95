"""Time tree attention per implementation (reference, xla, pallas) and write JSON.

  python tools/bench_tree_attention.py                 # realistic decode shapes (for a GPU)
  python tools/bench_tree_attention.py --quick         # tiny shapes; runs on CPU in seconds

On a GPU or TPU the Pallas kernel is compiled; anywhere else it runs in interpret mode, which
measures the interpreter, not the kernel (the JSON and the table say which). The reference loops
over every (sequence, query, head) and is skipped above --reference-max-heads.

Each shape: B sequences with a committed prefix of P tokens in a cache of --capacity slots, T
branches forked at depths t % (lookahead + 1), G query heads per KV head, tree steps 0..R-1 all
visible. The bandwidth floor is the bytes of visible K/V (main cache and tree, read once)
divided by --peak-bandwidth (default: H200's 4.8 TB/s).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from ssd_jax.kernels import tree_attention

DTYPES = {"bf16": jnp.bfloat16, "f32": jnp.float32}


@dataclasses.dataclass(frozen=True)
class Shape:
  batch: int
  prefix: int  # committed tokens per sequence
  capacity: int  # S: cache slots (dense implementations read all of them)
  branches: int  # T
  kv_heads: int  # K
  group: int  # G: query heads per KV head
  head_dim: int  # H
  lookahead: int  # fork depths 0..lookahead
  tree_steps: int  # R (0: no tree)
  dtype: str


def make_inputs(shape: Shape, seed: int = 0):
  """Random q, cache, lengths, depth and tree for one shape (positional args of the op)."""
  B, T, K, H = shape.batch, shape.branches, shape.kv_heads, shape.head_dim
  N, S, R, dtype = K * shape.group, shape.capacity, shape.tree_steps, DTYPES[shape.dtype]
  keys = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(keys[0], (B, T, N, H), dtype)
  k = jax.random.normal(keys[1], (B, S, K, H), dtype)
  v = jax.random.normal(keys[2], (B, S, K, H), dtype)
  lengths = jnp.full((B,), shape.prefix, jnp.int32)
  depth = jnp.arange(T, dtype=jnp.int32) % (shape.lookahead + 1)
  if not R:
    return (q, k, v, lengths, depth)
  tree_k = jax.random.normal(keys[3], (B, R, T, K, H), dtype)
  tree_v = jax.random.normal(keys[4], (B, R, T, K, H), dtype)
  return (q, k, v, lengths, depth, tree_k, tree_v, jnp.int32(R - 1))


def kv_bytes(shape: Shape) -> int:
  """Bytes of K and V every query needs, each read once: visible main slots plus the tree."""
  visible = min(shape.prefix + shape.lookahead + 1, shape.capacity)
  per_slot = 2 * shape.kv_heads * shape.head_dim * jnp.dtype(DTYPES[shape.dtype]).itemsize
  return shape.batch * per_slot * (visible + shape.tree_steps * shape.branches)


def time_impl(impl: str, args, iters: int) -> dict:
  """Compile time and per-call wall times (ms) of one implementation."""
  fn = lambda *a: tree_attention(*a, impl=impl)  # interpret=None: compiled on GPU/TPU only
  if impl != "reference":  # the reference is the spec, traced eagerly: jit would unroll it
    fn = jax.jit(fn)
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - start) * 1e3)
  return dict(
    out=out,
    compile_s=round(compile_s, 3),
    ms_median=statistics.median(times),
    ms_min=min(times),
  )


def bench_shape(shape: Shape, impls, args_cli) -> list[dict]:
  args = make_inputs(shape)
  floor_us = kv_bytes(shape) / args_cli.peak_bandwidth * 1e6
  rows, baseline = [], None
  for impl in impls:
    heads = shape.batch * shape.branches * shape.kv_heads * shape.group
    row = dict(**dataclasses.asdict(shape), impl=impl, kv_bytes=kv_bytes(shape))
    row["floor_us"] = round(floor_us, 3)
    if impl == "reference" and heads > args_cli.reference_max_heads:
      row["skipped"] = f"reference loops over {heads} (sequence, query, head) triples"
      rows.append(row)
      continue
    # The reference runs eagerly, op by op: a few calls say all there is to say.
    iters = min(args_cli.iters, 3) if impl == "reference" else args_cli.iters
    result = time_impl(impl, args, iters)
    out = result.pop("out").astype(jnp.float32)
    if baseline is None:
      baseline = out
    row.update(result)
    row["max_abs_diff_vs_first"] = float(jnp.max(jnp.abs(out - baseline)))
    row["achieved_gb_per_s"] = round(kv_bytes(shape) / (result["ms_median"] * 1e-3) / 1e9, 2)
    row["x_floor"] = round(result["ms_median"] * 1e3 / floor_us, 1)
    rows.append(row)
  return rows


def shapes(args) -> list[Shape]:
  product = itertools.product(args.prefix, args.branches, args.head_dim)
  capacity = args.capacity or _round_up(max(args.prefix) + args.lookahead + 1, 128)
  return [
    Shape(
      batch=args.batch,
      prefix=prefix,
      capacity=capacity,
      branches=branches,
      kv_heads=args.kv_heads,
      group=args.group,
      head_dim=head_dim,
      lookahead=args.lookahead,
      tree_steps=args.tree_steps,
      dtype=args.dtype,
    )
    for prefix, branches, head_dim in product
  ]


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--quick", action="store_true", help="tiny f32 shapes, 3 iterations (CPU)")
  p.add_argument("--impls", nargs="+", default=["reference", "xla", "pallas"])
  p.add_argument("--prefix", type=int, nargs="+", default=[512, 2048, 8192])
  p.add_argument("--branches", type=int, nargs="+", default=[24, 96])
  p.add_argument("--head-dim", type=int, nargs="+", default=[64, 128])
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--kv-heads", type=int, default=8)
  p.add_argument("--group", type=int, default=8, help="query heads per KV head")
  p.add_argument("--lookahead", type=int, default=5)
  p.add_argument("--tree-steps", type=int, default=4, help="R; 0 benchmarks without a tree")
  p.add_argument("--capacity", type=int, default=0, help="cache slots (default: fits prefix)")
  p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
  p.add_argument("--iters", type=int, default=20)
  p.add_argument(
    "--reference-max-heads", type=int, default=512, help="skip the reference above B*T*N"
  )
  p.add_argument("--peak-bandwidth", type=float, default=4.8e12, help="bytes/s (H200: 4.8e12)")
  p.add_argument("--json", type=Path, default=Path("bench_tree_attention.json"))
  args = p.parse_args(argv)
  if args.quick:
    args.prefix, args.branches, args.head_dim = [40, 200], [7], [64]
    args.kv_heads, args.group, args.dtype, args.iters = 2, 3, "f32", 3
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  platform = jax.default_backend()
  compiled = platform in ("gpu", "cuda", "tpu")
  meta = dict(platform=platform, device=str(jax.devices()[0].device_kind), pallas_compiled=compiled)
  if not compiled:
    print(f"{platform}: Pallas runs in interpret mode; its times measure the interpreter.")
  rows = []
  header = f"{'impl':>9} {'B':>2} {'P':>5} {'S':>5} {'T':>3} {'KxG':>5} {'H':>3}  "
  print(header + f"{'ms':>9} {'floor us':>9} {'x floor':>8} {'GB/s':>8} {'diff':>8}")
  for shape in shapes(args):
    for row in bench_shape(shape, args.impls, args):
      rows.append(row)
      print(_format(row))
  args.json.write_text(json.dumps(dict(meta=meta, args=_jsonable(args), rows=rows), indent=1))
  print(f"wrote {args.json}")
  return 0


def _format(row: dict) -> str:
  s = f"{row['impl']:>9} {row['batch']:>2} {row['prefix']:>5} {row['capacity']:>5} "
  s += f"{row['branches']:>3} {row['kv_heads']}x{row['group']:<3} {row['head_dim']:>3}  "
  if "skipped" in row:
    return s + f"skipped: {row['skipped']}"
  s += f"{row['ms_median']:>9.3f} {row['floor_us']:>9.2f} {row['x_floor']:>8.1f} "
  return s + f"{row['achieved_gb_per_s']:>8.1f} {row['max_abs_diff_vs_first']:>8.1e}"


def _jsonable(args: argparse.Namespace) -> dict:
  return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


if __name__ == "__main__":
  sys.exit(main())
