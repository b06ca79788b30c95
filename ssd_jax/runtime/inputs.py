"""A generate() call's requests, validated and turned into the arrays the programs take.

Every check here runs on the host before anything is allocated on a device, and each error names
the input that is wrong and how to fix it (the CLI turns them into exit status 2).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence

import jax
import numpy as np

from ssd_jax.config import ModelConfig
from ssd_jax.decode.sampling import Sampling, Warp
from ssd_jax.models.prefill import bucket_length, pad_prompts


@dataclasses.dataclass(frozen=True)
class Batch:
  """Host arrays of one batch of requests.

  Attributes:
    tokens: i32[B, P] prompts, right-padded to a length bucket; lengths: i32[B].
    budgets: i32[B] tokens to generate per row (0: a padding row that generates nothing).
    samplings: each row's sampling settings; warp: the same as arrays.
    capacity: KV-cache slots per sequence.
  """

  tokens: np.ndarray
  lengths: np.ndarray
  budgets: np.ndarray
  samplings: list[Sampling]
  warp: Warp
  capacity: int

  @property
  def batch_size(self) -> int:
    return self.tokens.shape[0]

  @property
  def greedy(self) -> bool:
    """Every row has temperature 0: the programs then skip distributions altogether."""
    return not (self.warp.temperature > 0).any()


def _prompts(prompts, vocab_size: int) -> list[np.ndarray]:
  if isinstance(prompts, str | bytes) or not isinstance(prompts, Sequence) or not prompts:
    raise ValueError(
      f"prompts must be a non-empty list of token-id lists, got {type(prompts).__name__} "
      f"{prompts!r:.60}"
    )
  out = []
  for i, prompt in enumerate(prompts):
    ids = np.asarray(prompt)
    if ids.ndim != 1 or ids.size == 0 or ids.dtype.kind not in "iu":
      raise ValueError(f"prompt {i} must be a non-empty list of int token ids, got {prompt!r:.60}")
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.size:
      raise ValueError(
        f"prompt {i} has token id {int(bad[0])} outside the vocabulary [0, {vocab_size}); "
        "encode prompts with the target's tokenizer"
      )
    out.append(ids.astype(np.int32))
  return out


def _per_row(name: str, value, B: int) -> list:
  if isinstance(value, np.ndarray):
    value = value.tolist()
  if isinstance(value, Sequence) and not isinstance(value, str):
    if len(value) != B:
      raise ValueError(f"{name} has {len(value)} entries for {B} prompts; give one per prompt")
    return list(value)
  return [value] * B


def _sampling(sampling, temperatures, B: int) -> list[Sampling]:
  rows = _per_row("sampling", sampling if sampling is not None else Sampling(), B)
  if not all(isinstance(s, Sampling) for s in rows):
    raise ValueError("sampling must be a Sampling or one Sampling per prompt")
  if temperatures is not None:
    temps = _per_row("temperatures", temperatures, B)
    try:  # Sampling validates each value (finite, >= 0)
      rows = [
        dataclasses.replace(s, temperature=float(t)) for s, t in zip(rows, temps, strict=True)
      ]
    except (TypeError, ValueError) as e:
      raise ValueError(f"temperatures: {e}") from None
  return rows


def _budgets(max_new_tokens, B: int) -> np.ndarray:
  budgets = _per_row("max_new_tokens", max_new_tokens, B)
  if not all(isinstance(b, int | np.integer) and not isinstance(b, bool) for b in budgets):
    raise ValueError(f"max_new_tokens must be an int or one int per prompt, got {max_new_tokens!r}")
  if min(budgets) < 0:
    raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens!r}")
  return np.asarray(budgets, np.int32)


def prepare(
  prompts: Sequence[Sequence[int]],
  *,
  models: Sequence[ModelConfig],
  sampling: Sampling | Sequence[Sampling] | None,
  temperatures: Sequence[float] | None,
  max_new_tokens: int | Sequence[int],
  lookahead: int,
  capacity: int | None = None,
  meshes: Sequence[jax.sharding.Mesh] | None = None,
) -> Batch:
  """Validate a batch of requests for `models` (the target first, then the draft if any),
  whose caches live on `meshes` (one per model; default: this process's first device)."""
  ids = _prompts(prompts, models[0].vocab_size)
  B = len(ids)
  samplings = _sampling(sampling, temperatures, B)
  budgets = _budgets(max_new_tokens, B)
  longest, most = max(map(len, ids)), int(budgets.max())
  # Positions the longest row may write: a round that ends at its budget still writes its
  # lookahead draft tokens and the pending token after the last emitted one.
  reach = longest + most + lookahead + 1
  for config in models:
    if reach > config.max_position_embeddings:
      raise ValueError(
        f"the longest prompt ({longest} tokens) + max_new_tokens ({most}) + lookahead + 1 = "
        f"{reach} positions exceed the model's context of {config.max_position_embeddings} "
        "(max_position_embeddings); lower max_new_tokens or shorten the prompt"
      )
  if capacity is None:  # the prefill's padded length, one spare slot, rounded to 128 slots
    capacity = -(-(bucket_length(longest) + most + lookahead + 2) // 128) * 128
  if capacity < reach:
    raise ValueError(
      f"capacity {capacity} cannot hold the longest prompt ({longest} tokens) + "
      f"max_new_tokens ({most}) + lookahead + 1; raise it"
    )
  check_memory(models, B, capacity, meshes)
  tokens, lengths = pad_prompts([p.tolist() for p in ids], capacity)
  return Batch(
    tokens=tokens,
    lengths=lengths,
    budgets=budgets,
    samplings=samplings,
    warp=Warp.of(samplings),
    capacity=capacity,
  )


def cache_bytes(config: ModelConfig, batch_size: int, capacity: int, itemsize: int = 4) -> int:
  """Bytes of one model's KV cache (keys and values of every layer)."""
  per_slot = 2 * config.num_layers * config.num_kv_heads * config.head_dim * itemsize
  return per_slot * batch_size * capacity


def _memory_limit(device: jax.Device) -> float:
  """Bytes `device` may allocate: an accelerator's limit, or this host's physical memory."""
  stats = device.memory_stats() or {}
  if "bytes_limit" in stats:
    return float(stats["bytes_limit"])
  try:
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
  except (ValueError, OSError):
    return math.inf


def check_memory(
  models: Sequence[ModelConfig],
  batch_size: int,
  capacity: int,
  meshes: Sequence[jax.sharding.Mesh] | None = None,
) -> None:
  """Refuse KV caches that cannot fit, before anything is allocated.

  Each model's cache is split over its mesh (tensor parallelism shards the KV heads) and
  checked against its devices' limit; CPU devices share the host's memory, so there the caches
  of every model count together.
  """
  per_device, host = [], 0
  for config, mesh in zip(models, meshes or [None] * len(models), strict=True):
    device = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
    need = cache_bytes(config, batch_size, capacity)
    if device.platform == "cpu":
      host += need
    else:
      per_device.append((need / mesh.devices.size if mesh else need, _memory_limit(device)))
  if host:
    per_device.append((host, _memory_limit(jax.devices("cpu")[0])))
  for need, limit in per_device:
    if need > limit:
      raise ValueError(
        f"the KV caches of batch {batch_size} x {capacity} slots need {need / 2**30:.1f} GiB but "
        f"a device has {limit / 2**30:.1f} GiB; lower the batch size or max_new_tokens"
      )
