"""What `python -m ssd_jax.run` and `python -m ssd_jax.bench` share: device set-up before JAX
starts, the draft-vocabulary default, and argparse value types that refuse bad numbers early."""

from __future__ import annotations

import argparse
import contextlib
import math

DEFAULT_DRAFT_VOCAB = 8192


def setup_devices(target_devices: int, draft_devices: int = 1) -> None:
  """Enough virtual CPU devices for the meshes, created before JAX starts its backend: the target
  mesh and the draft's, and at least twice the target mesh (fewer can deadlock XLA's CPU
  collectives)."""
  import jax  # noqa: PLC0415 (the flag must be set before any backend starts)

  need = max(target_devices + draft_devices, 2 * target_devices)
  # Never fewer than asked for already (main() may run inside a process that set more), and
  # keep whatever exists once the backends have started.
  with contextlib.suppress(RuntimeError):
    jax.config.update("jax_num_cpu_devices", max(need, jax.config.jax_num_cpu_devices))


def resolve_draft_vocab(requested: int | None, draft) -> int | None:
  """The draft head's size for Engine (None: the whole vocabulary).

  `requested` is the flag's value: None picks the default (the draft's DEFAULT_DRAFT_VOCAB most
  frequent tokens when it ships a token ranking, capped at the ranking's length; in the default
  run that makes proposals 1.5x and expansions 3x cheaper at the same tokens per round,
  docs/BENCHMARKS.md), 0 the whole vocabulary.
  """
  if draft is None:
    return None
  if requested is None:
    if draft.token_ranking is None:
      return None
    requested = min(DEFAULT_DRAFT_VOCAB, draft.token_ranking.size, draft.config.vocab_size)
  return requested or None


def finite_float(text: str) -> float:
  """argparse type: a finite float (NaN and infinities are refused)."""
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
  if not math.isfinite(value):
    raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
  return value
