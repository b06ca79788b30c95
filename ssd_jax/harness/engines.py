"""A run's engines from its configuration: the layout pinned, the models loaded, one Engine per
draft (modes with the same draft share one; ar shares the first)."""

from __future__ import annotations

import contextlib
import warnings

import jax.numpy as jnp

from ssd_jax.harness.config import RunConfig
from ssd_jax.models.registry import load_model
from ssd_jax.runtime import Engine
from ssd_jax.speculator import ChannelError
from ssd_jax.speculator.layout import Layout, resolve_layout


def layout_of(config: RunConfig) -> Layout:
  """The CPU layout the run asks for (not applied yet); ValueError names a flag it cannot
  have."""
  lay = config.layout
  return resolve_layout(
    lay.draft_placement or "auto", lay.target_cores, lay.speculator, ssd="ssd" in config.modes
  )


def build_engines(
  config: RunConfig, layout: Layout, stack: contextlib.ExitStack
) -> dict[str, Engine]:
  """The Engine of each mode, each closed by `stack`. A speculator process starts (and loads its
  draft) now: one that cannot start or be reached is an error before anything decodes.

  Raises:
    ValueError, FileNotFoundError: a model, a flag or the speculator is not as asked.
  """
  models = config.models
  target = load_model(models.target, dtype=jnp.dtype(models.dtype))
  by_draft: dict[str | None, list[str]] = {}
  drafts = [models.draft_for(m) for m in config.speculative_modes]
  for mode in config.modes:  # ar shares the first draft's engine (and its target)
    name = (drafts or [None])[0] if mode == "ar" else models.draft_for(mode)
    by_draft.setdefault(name, []).append(mode)
  engines: dict[str, Engine] = {}
  for name, group in by_draft.items():
    draft = None if name is None else load_model(name, dtype=jnp.dtype(models.resolved_draft_dtype))
    engine = stack.enter_context(_engine(config, target, draft, group, layout))
    engines |= dict.fromkeys(group, engine)
  return engines


def _engine(config: RunConfig, target, draft, modes: list[str], layout: Layout) -> Engine:
  lay = config.layout
  with warnings.catch_warnings():
    warnings.simplefilter("always")
    engine = Engine(
      target,
      draft,
      target_devices=lay.target_devices,
      draft_devices=lay.draft_devices,
      attention_impl=lay.attention_impl,
      draft_vocab=config.models.draft_vocab if draft is not None else None,
      placement=layout.placement_for(lay.speculator_pipe, lay.speculator_token_file)
      if "ssd" in modes
      else "device",
    )
  try:
    engine.start_speculator()
  except ChannelError as e:
    engine.close()
    raise ValueError(f"the speculator process: {e}") from e
  return engine
