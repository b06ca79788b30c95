"""Every jitted program of ar, sd and ssd, exported for GPU ("cuda") and TPU from this host.

`python -m ssd_jax.bench lower` exports each program with `jax.export` at the card's layout: a
4-way tensor-parallel target and a 1-device draft, placed by `ssd_jax.sharding` and
`ssd_jax.models.placement` on 5 virtual CPU devices (for TPU, the same meshes as abstract TPU
devices: Mosaic asks the device kind for its tiling), at real models' shapes in bfloat16, for
each batch size and attention impl. Abstract shapes only: no weight is allocated, so a 70B
target lowers on a laptop. It prints a programs x platforms table per layout, the weights and
KV cache each device holds, and exits non-zero if any program fails to lower.

Lowering is what can be checked without the hardware: shapes, shardings, dtypes and every
kernel's Mosaic / Triton emission. XLA's own compilation for the device (memory, fusion, libtpu's
Mosaic passes) needs the device.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.export import DisabledSafetyCheck
from jax.sharding import AbstractDevice, AbstractMesh, Mesh

from ssd_jax import sharding
from ssd_jax.bench import shapes
from ssd_jax.config import SpecConfig
from ssd_jax.decode import draft as draft_lib
from ssd_jax.decode import slots, speculate
from ssd_jax.decode import target as target_lib
from ssd_jax.decode.plan import Plan
from ssd_jax.decode.state import Admission, Outcome, Speculation
from ssd_jax.models import placement
from ssd_jax.models.kv_cache import KVCache
from ssd_jax.models.prefill import prefill, prefill_window

PLATFORMS = ("cuda", "tpu")
IMPLS = ("xla", "pallas")
TARGET_DEVICES = 4
# Mosaic TPU reads the device kind for its tiling rules; v5e is the kind the kernel is written
# for (backend.py). The lowering does not depend on the chip's memory.
TPU_KIND = "TPU v5 lite"
# The kernels' custom calls: a GPU Triton kernel, a TPU Mosaic kernel. Exporting a custom call
# is refused unless named here (its ABI is not covered by jax.export's compatibility promise).
_CUSTOM_CALLS = ("__gpu$xla.gpu.triton", "tpu_custom_call")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Layout:
  """One point of the matrix: a target / draft pair at a batch size, with an attention impl."""

  pair: str  # a key of shapes.PAIRS
  batch_size: int
  impl: str  # "xla" or "pallas"
  capacity: int = 8192  # KV cache slots per row
  prompt: int = 1024  # the prompt bucket prefilled
  lookahead: int = 3  # the paper's Llama setting is 3-7; the shapes scale with it
  fan_out: int = 4

  def __post_init__(self):
    if self.pair not in shapes.PAIRS:
      raise ValueError(f"unknown pair {self.pair!r}; expected one of {sorted(shapes.PAIRS)}")
    if self.impl not in IMPLS:
      raise ValueError(f"unknown attention impl {self.impl!r}; expected one of {IMPLS}")
    if self.batch_size < 1 or not 0 < self.prompt <= self.capacity:
      raise ValueError("batch_size must be >= 1 and 0 < prompt <= capacity")

  @property
  def name(self) -> str:
    return f"{self.pair} b{self.batch_size} {self.impl}"


def meshes(platform: str) -> tuple[Mesh | AbstractMesh, Mesh | AbstractMesh]:
  """The target and draft meshes of the card on this host's virtual CPU devices; for TPU the
  same meshes with abstract TPU devices (what Mosaic's lowering asks for)."""
  target, draft = sharding.make_meshes(TARGET_DEVICES, 1)
  if platform != "tpu":
    return target, draft
  device = AbstractDevice(device_kind=TPU_KIND, num_cores=1, platform="tpu")
  as_tpu = lambda m: AbstractMesh(
    m.axis_sizes, m.axis_names, axis_types=m.axis_types, abstract_device=device
  )
  return as_tpu(target), as_tpu(draft)


def _on(tree, mesh):
  """Every leaf replicated on `mesh`, as a ShapeDtypeStruct."""
  where = sharding.replicated(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=where), tree)


def _sds(shape, dtype, mesh):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.replicated(mesh))


def _state(config, mesh, batch_size: int, capacity: int, empty: Callable):
  """A decode state of `batch_size` rows: the cache placed by `placement`, the rest replicated."""
  state = jax.eval_shape(lambda: empty(KVCache.init(config, batch_size, capacity, jnp.bfloat16)))
  kv = placement.cache_sharding(config, mesh, batch_size, capacity)
  cache = KVCache(
    k=jax.ShapeDtypeStruct(state.cache.k.shape, state.cache.k.dtype, sharding=kv.k),
    v=jax.ShapeDtypeStruct(state.cache.v.shape, state.cache.v.dtype, sharding=kv.v),
    lengths=_sds(state.cache.lengths.shape, jnp.int32, mesh),
  )
  return dataclasses.replace(_on(state, mesh), cache=cache)


def _admission(mesh, rows: int = 1) -> Admission:
  """`rows` requests entering slots (one at a time, as a session admits them)."""
  i32 = lambda: _sds((rows,), jnp.int32, mesh)
  return Admission(
    slot=i32(),
    length=i32(),
    last=i32(),
    max_new=i32(),
    warp=_on(jax.eval_shape(lambda: slots.empty_warp(rows)), mesh),
    seed=_sds((rows, 2), jnp.uint32, mesh),
    ignore_eos=_sds((rows,), bool, mesh),
  )


@dataclasses.dataclass(frozen=True)
class Program:
  """One program to export: its name, the modes that run it, the function and its arguments."""

  name: str
  modes: tuple[str, ...]
  fn: Callable  # a jitted function
  args: tuple
  kwargs: dict  # its static arguments (the plan, the config)
  mesh: object  # the mesh its arguments live on (the abstract mesh set while lowering for TPU)


def _plans(layout: Layout, greedy: bool) -> dict[str, Plan]:
  """The plans of ar, sd and ssd (with each backup) at `layout`: sampled (`greedy=False`), whose
  programs also carry distributions, or for an all-greedy batch, whose programs drop them."""
  target_name, draft_name = shapes.PAIRS[layout.pair]
  tcfg, dcfg = shapes.MODELS[target_name], shapes.MODELS[draft_name]
  make = functools.partial(
    Plan.make,
    target=tcfg,
    draft=dcfg,
    head_size=None,
    greedy=greedy,
    eos_ids=tcfg.eos_token_ids,
    attention_impl=layout.impl,
    batch_size=layout.batch_size,
  )
  K, fan_out = layout.lookahead, (layout.fan_out,) * (layout.lookahead + 1)
  ssd = SpecConfig(mode="ssd", lookahead=K, fan_out=fan_out)
  return {
    "ar": make(SpecConfig(mode="ar")),
    "sd": make(SpecConfig(mode="sd", lookahead=K)),
    "ssd_neural": make(dataclasses.replace(ssd, backup="neural")),
    "ssd_fast": make(dataclasses.replace(ssd, backup="fast")),
  }


@dataclasses.dataclass(frozen=True)
class _Sides:
  """Both sides' abstract params and states at one layout."""

  tmesh: object
  dmesh: object
  tparams: dict
  dparams: dict
  tstate: object  # TargetState
  dstate: object  # DraftState
  batch_size: int


_EVERY, _DRAFTED, _SSD, _SD = ("ar", "sd", "ssd"), ("sd", "ssd"), ("ssd",), ("sd",)


def _rounds(plans: dict[str, Plan], x: _Sides, suffix: str):
  """The round programs of one sampling kind (table rows), and the proposal and outcome they
  exchange (for the slot programs)."""
  B, dmesh, tmesh = x.batch_size, x.dmesh, x.tmesh
  nothing = _on(jax.eval_shape(lambda: Outcome.nothing(B)), dmesh)  # a round's outcome's shape
  draft_in = (x.dparams, x.dstate, nothing, _sds((B,), jnp.int32, dmesh), _sds((B,), bool, dmesh))
  sd, ssd = plans["sd"], plans["ssd_neural"].draft
  proposal = _on(jax.eval_shape(_bind(draft_lib.propose, sd.draft), *draft_in)[1], dmesh)
  verify_in = (x.tparams, x.tstate, _on(proposal, tmesh))
  report = jax.eval_shape(_bind(target_lib.step, sd.target), *verify_in)[1]
  outcome = _on(report.outcome, dmesh)
  expand_in = (x.dparams, x.dstate, proposal)
  cache = _on(jax.eval_shape(_bind(speculate.expand, ssd), *expand_in)[1], dmesh)
  empty = _on(jax.eval_shape(lambda: Speculation.empty(B)), tmesh)
  rows = [  # name, program, arguments, static arguments, mesh, modes that run it
    ("ar_step", target_lib.step, (x.tparams, x.tstate, empty), {"plan": plans["ar"].target},
     tmesh, ("ar",)),
    ("verify", target_lib.step, verify_in, {"plan": sd.target}, tmesh, _DRAFTED),
    ("propose", draft_lib.propose, (*draft_in[:2], outcome, *draft_in[3:]), {"plan": sd.draft},
     dmesh, _DRAFTED),
    ("expand", speculate.expand, expand_in, {"plan": ssd}, dmesh, _SSD),
    *(
      (f"lookup_{b}_backup", speculate.lookup, (x.dparams, x.dstate, cache, outcome),
       {"plan": plans[f"ssd_{b}"].draft}, dmesh, _SSD)
      for b in ("neural", "fast")
    ),
  ]  # fmt: skip
  return [(name + suffix, *rest) for name, *rest in rows], proposal, outcome


def _window(params, config, mesh, prompt: int):
  """The KV window `prefill_window` makes of one prompt, as it enters a slot."""
  fn = functools.partial(prefill_window, config=config)
  return _on(jax.eval_shape(fn, params, _sds((1, prompt), jnp.int32, mesh)), mesh)


def programs(layout: Layout, platform: str) -> list[Program]:
  """Every program of ar, sd and ssd at `layout`, with abstract arguments for `platform`: the
  target's on the target mesh, the draft's (and what it exchanges) on the draft's. The round
  programs twice: sampled, and for an all-greedy batch ("_greedy")."""
  sampled = _plans(layout, greedy=False)
  tcfg, dcfg = sampled["sd"].target.config, sampled["sd"].draft.config
  tmesh, dmesh = meshes(platform)
  B, S, P = layout.batch_size, layout.capacity, layout.prompt
  half = max(1, B // 2)  # the bucket a lightly loaded batch moves to
  tparams, dparams = shapes.abstract_params(tcfg, tmesh), shapes.abstract_params(dcfg, dmesh)
  tstate = _state(tcfg, tmesh, B, S, slots.empty_target)
  dstate = _state(dcfg, dmesh, B, S, slots.empty_draft)
  sides = _Sides(tmesh, dmesh, tparams, dparams, tstate, dstate, B)
  rounds, proposal, outcome = _rounds(sampled, sides, "")
  greedy_rounds, _, _ = _rounds(_plans(layout, greedy=True), sides, "_greedy")
  i32, flags = lambda n, m: _sds((n,), jnp.int32, m), lambda n, m: _sds((n,), bool, m)
  tokens = lambda n, m: _sds((n, P), jnp.int32, m)
  impl = {"attention_impl": layout.impl}
  t_window, d_window = _window(tparams, tcfg, tmesh, P), _window(dparams, dcfg, dmesh, P)
  slot_programs = [
    ("prefill", prefill, (tparams, tokens(B, tmesh), i32(B, tmesh), tstate.cache),
     {"config": tcfg} | impl, tmesh, _EVERY),
    ("prefill_window", prefill_window, (tparams, tokens(1, tmesh)), {"config": tcfg} | impl,
     tmesh, _EVERY),
    ("admit_target", slots.admit_target, (tstate, t_window, _admission(tmesh)), {}, tmesh,
     _EVERY),
    ("retire", slots.retire, (tstate, flags(B, tmesh)), {}, tmesh, _EVERY),
    ("take_target", slots.take_target, (tstate, i32(half, tmesh), flags(half, tmesh)), {}, tmesh,
     _EVERY),
    ("draft_prefill_window", prefill_window, (dparams, tokens(1, dmesh)),
     {"config": dcfg} | impl, dmesh, _DRAFTED),
    ("admit_draft", slots.admit_draft, (dstate, d_window, _admission(dmesh)), {}, dmesh,
     _DRAFTED),
    ("take_draft", slots.take_draft, (dstate, i32(half, dmesh)), {}, dmesh, _DRAFTED),
    ("take_outcome", slots.take_outcome, (outcome, i32(half, dmesh), flags(half, dmesh)), {},
     dmesh, _SD),
    ("take_speculation", slots.take_speculation, (proposal, i32(half, dmesh)), {}, dmesh,
     _DRAFTED),
    ("patch_speculation", slots.patch_speculation, (proposal, proposal, flags(B, dmesh)), {},
     dmesh, _DRAFTED),
  ]  # fmt: skip
  table = slot_programs + rounds + greedy_rounds
  return [Program(n, modes, fn, args, kwargs, mesh) for n, fn, args, kwargs, mesh, modes in table]


def _bind(fn, plan):
  return functools.partial(fn, plan=plan)


@dataclasses.dataclass(frozen=True)
class Lowered:
  """One program's export for one platform: whether it lowered, in how long, and why not."""

  program: str
  modes: tuple[str, ...]
  platform: str
  layout: str
  ok: bool
  seconds: float
  kernels: int  # Pallas kernels in the module (custom calls of the platform's backend)
  error: str  # the exception, type and message ("" when it lowered)


def lower(program: Program, platform: str, layout: Layout) -> Lowered:
  """Export `program` for `platform`; any exception is the result, not raised."""
  checks = [DisabledSafetyCheck.custom_call(name) for name in _CUSTOM_CALLS]
  start = time.perf_counter()
  try:
    export = jax.export.export(program.fn, platforms=(platform,), disabled_checks=checks)
    if isinstance(program.mesh, AbstractMesh):
      with jax.sharding.use_abstract_mesh(program.mesh):
        exported = export(*program.args, **program.kwargs)
    else:
      exported = export(*program.args, **program.kwargs)
    text = exported.mlir_module()
    kernels = sum(text.count(f"@{name}") for name in _CUSTOM_CALLS)
    ok, error = True, ""
  except Exception as e:  # every failure is reported with its reason, not raised
    kernels, ok = 0, False
    error = f"{type(e).__name__}: {e}".strip()
  seconds = time.perf_counter() - start
  return Lowered(program.name, program.modes, platform, layout.name, ok, seconds, kernels, error)


def memory(layout: Layout) -> dict[str, dict[str, int]]:
  """Bytes per device of each side's weights and KV cache at `layout` (bfloat16)."""
  target_name, draft_name = shapes.PAIRS[layout.pair]
  tmesh, dmesh = meshes("cuda")
  B, S = layout.batch_size, layout.capacity
  return {
    "target": shapes.device_bytes(shapes.MODELS[target_name], tmesh, B, S),
    "draft": shapes.device_bytes(shapes.MODELS[draft_name], dmesh, B, S),
  }


def matrix(pairs, batch_sizes, impls, capacity: int = 8192) -> list[Layout]:
  """Every combination, pair-major."""
  return [
    Layout(pair=p, batch_size=b, impl=i, capacity=capacity)
    for p in pairs
    for b in batch_sizes
    for i in impls
  ]


def run(layouts: list[Layout], platforms=PLATFORMS, echo=print) -> dict:
  """Lower every program of every layout for every platform; the results and the memory."""
  results, sizes = [], {}
  for layout in layouts:
    per_platform = {}
    for platform in platforms:
      per_platform[platform] = [lower(p, platform, layout) for p in programs(layout, platform)]
      results += per_platform[platform]
    key = f"{layout.pair} b{layout.batch_size} S{layout.capacity}"
    sizes.setdefault(key, memory(layout))
    echo(_table(layout, per_platform))
  echo(_memory_table(sizes))
  failed = [r for r in results if not r.ok]
  echo(
    f"{len(results) - len(failed)} of {len(results)} exports lowered"
    + ("" if not failed else f"; FAILED: {len(failed)}")
  )
  return {
    "results": [dataclasses.asdict(r) for r in results],
    "memory": sizes,
    "failed": len(failed),
  }


def _table(layout: Layout, per_platform: dict[str, list[Lowered]]) -> str:
  platforms = list(per_platform)
  lines = [
    f"\n{layout.name} (KV cache {layout.capacity} slots, prompt {layout.prompt})",
    f"  {'program':28} {'modes':11} " + " ".join(f"{p:>16}" for p in platforms),
  ]
  for i, first in enumerate(per_platform[platforms[0]]):
    cells = []
    for p in platforms:
      r = per_platform[p][i]
      mark = f"ok {r.seconds:4.1f}s" + (f" k{r.kernels}" if r.kernels else "")
      cells.append(f"{mark if r.ok else 'FAILED':>16}")
    lines.append(f"  {first.program:28} {'/'.join(first.modes):11} " + " ".join(cells))
  for p in platforms:
    for r in per_platform[p]:
      if not r.ok:
        lines.append(f"  {r.program} on {p}: {r.error[:500]}")
  return "\n".join(lines)


def _gib(n: int) -> str:
  return f"{n / 2**30:7.2f}"


def _memory_table(sizes: dict) -> str:
  lines = [
    "\nper device, bfloat16 (GiB): target on each of its devices, draft on its own",
    f"  {'layout':28} {'target W':>9} {'target KV':>9} {'total':>8} {'draft W':>8} "
    f"{'draft KV':>8} {'total':>8}",
  ]
  for key, m in sizes.items():
    t, d = m["target"], m["draft"]
    lines.append(
      f"  {key:28} {_gib(t['weights']):>9} {_gib(t['kv_cache']):>9} "
      f"{_gib(t['weights'] + t['kv_cache']):>8} {_gib(d['weights']):>8} "
      f"{_gib(d['kv_cache']):>8} {_gib(d['weights'] + d['kv_cache']):>8}"
    )
  return "\n".join(lines)
