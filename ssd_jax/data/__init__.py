"""Benchmark prompt sets (HumanEval, ShareGPT first turns, bundled, JSONL); see `prompts`."""

from ssd_jax.data.prompts import (
  SHAREGPT_MAX_CHARS,
  Prompt,
  iter_jsonl_prompts,
  iter_sharegpt_first_turns,
  load_prompts,
)

__all__ = [
  "SHAREGPT_MAX_CHARS",
  "Prompt",
  "iter_jsonl_prompts",
  "iter_sharegpt_first_turns",
  "load_prompts",
]
