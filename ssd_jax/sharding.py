"""Meshes and the logical-axis rule table of the tensor-parallel target.

Model code names axes logically ("heads", "mlp", ...); one rule table maps them to the target
mesh axis. Megatron-style: attention heads and MLP columns are split over "tp", their output
projections (rows) are reduced by XLA's all-reduce. The draft uses a mesh of its own devices.
This module knows nothing of any model: `ssd_jax.models.placement` applies the rules to a
model's params and KV cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

TP = "tp"

# Logical axis -> mesh axis. Everything not listed is replicated.
RULES: dict[str, str | None] = {
  "heads": TP,
  "kv_heads": TP,
  "mlp": TP,
  "vocab": None,
  "embed": None,
  "head_dim": None,
  "layers": None,
  "batch": None,
  "cache_seq": None,
}

CACHE_AXES = ("layers", "batch", "cache_seq", "kv_heads", "head_dim")


def make_meshes(
  target_devices: int,
  draft_devices: int = 1,
  devices: Sequence[jax.Device] | None = None,
  share: bool = False,
) -> tuple[Mesh, Mesh]:
  """A target mesh on the first `target_devices` devices and a draft mesh on the next ones.

  With `share=True` the draft mesh reuses the first device (no overlap is then possible).

  Raises:
    ValueError: too few devices, saying how to get more on CPU.
  """
  devices = list(devices if devices is not None else jax.devices())
  if target_devices < 1 or draft_devices < 1:
    raise ValueError("target_devices and draft_devices must be >= 1")
  need = target_devices + (0 if share else draft_devices)
  if len(devices) < need:
    raise ValueError(
      f"need {need} devices ({target_devices} target + {draft_devices} draft) but only "
      f"{len(devices)} available; on CPU set XLA_FLAGS=--xla_force_host_platform_device_count="
      f"{max(2 * need, 2)} (or jax_num_cpu_devices) before JAX starts, or ask for fewer devices"
    )
  draft_devices = devices[:draft_devices] if share else devices[target_devices:need]
  return mesh_of(devices[:target_devices]), mesh_of(draft_devices)


def mesh_of(devices: Sequence[jax.Device]) -> Mesh:
  """A one-axis ("tp") mesh over `devices`, sharding by the rule table."""
  return jax.make_mesh((len(devices),), (TP,), axis_types=(AxisType.Auto,), devices=devices)


def logical_spec(axes: Sequence[str | None], mesh: Mesh, shape: Sequence[int]) -> PartitionSpec:
  """PartitionSpec for one array; a split dimension must divide evenly over the mesh axis."""
  spec = []
  for name, size in zip(axes, shape, strict=True):
    mesh_axis = RULES.get(name) if name else None
    if mesh_axis is not None and mesh.shape[mesh_axis] > 1:
      n = mesh.shape[mesh_axis]
      if size % n:
        raise ValueError(
          f"cannot split {name!r} of size {size} over {n} devices; choose a device count that "
          f"divides it (e.g. --target-devices {_divisor_hint(size, n)})"
        )
    spec.append(mesh_axis)
  return PartitionSpec(*spec)


def _divisor_hint(size: int, n: int) -> int:
  return max(d for d in range(1, n + 1) if size % d == 0)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def place(tree: Any, mesh: Mesh) -> Any:
  """`tree` replicated on `mesh`, for a jitted program's argument.

  Host (numpy) arrays bound for a one-device mesh are left as they are: the jitted call copies
  them to the device its other arguments are on, on its C++ path, where `jax.device_put` would
  cost ~0.1-0.4 ms of Python per call (a per-round cost in the speculator's exchange).
  """
  leaves = jax.tree.leaves(tree)
  if mesh.devices.size == 1 and all(isinstance(x, np.ndarray) for x in leaves):
    return tree
  return jax.device_put(tree, replicated(mesh))
