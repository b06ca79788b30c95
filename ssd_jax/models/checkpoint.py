"""Orbax (v1 API) checkpoints of a model: params pytree + its HF-style config.json.

Layout of a checkpoint directory:
  config.json     the architecture (same fields as an HF config, see models.weights)
  params/         the orbax checkpoint of the params pytree
Restoring can place the params directly into target shardings (no host round trip).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
from orbax.checkpoint import v1 as ocp

from ssd_jax.config import ModelConfig
from ssd_jax.models.transformer import Params, param_shapes
from ssd_jax.models.weights import config_from_hf, config_to_hf

_MARKER = "ssd_jax_checkpoint.json"


def is_checkpoint(path: str | os.PathLike) -> bool:
  return (Path(path) / _MARKER).exists()


def save(path: str | os.PathLike, config: ModelConfig, params: Params) -> Path:
  """Write `params` (host or device arrays) and `config` to a new directory `path`."""
  path = Path(path).absolute()
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(json.dumps(config_to_hf(config), indent=2))
  ocp.save(path / "params", params)
  (path / _MARKER).write_text(json.dumps({"format": 1}))
  return path


def restore(path: str | os.PathLike, shardings: Params | None = None) -> tuple[ModelConfig, Params]:
  """Read a checkpoint; with `shardings` (a pytree of NamedSharding) the arrays land there."""
  path = Path(path).absolute()
  if not is_checkpoint(path):
    raise ValueError(f"{path} is not an ssd_jax checkpoint (no {_MARKER})")
  config = config_from_hf(json.loads((path / "config.json").read_text()))
  host = shardings is None
  if host:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(
      lambda _: device, param_shapes(config), is_leaf=lambda x: isinstance(x, tuple)
    )
  abstract = jax.tree.map(
    lambda shape, s: jax.ShapeDtypeStruct(shape, _dtype_of(path), sharding=s),
    param_shapes(config),
    shardings,
    is_leaf=lambda x: isinstance(x, tuple),
  )
  params = ocp.load(path / "params", abstract)
  return config, jax.device_get(params) if host else params


def _dtype_of(path: Path):
  """The dtype of the stored params (all leaves share one dtype)."""
  meta = ocp.metadata(path / "params")
  leaves = jax.tree.leaves(getattr(meta, "metadata", meta))
  return leaves[0].dtype
