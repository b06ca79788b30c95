"""Benchmark prompt sets (HumanEval, ShareGPT first turns, bundled, JSONL); see `prompts`."""

from ssd_jax.data.prompts import (
  SHAREGPT_MAX_CHARS,
  Conversation,
  Prompt,
  iter_jsonl_prompts,
  iter_sharegpt_conversations,
  iter_sharegpt_first_turns,
  load_prompts,
  sharegpt_file,
)

__all__ = [
  "SHAREGPT_MAX_CHARS",
  "Conversation",
  "Prompt",
  "iter_jsonl_prompts",
  "iter_sharegpt_conversations",
  "iter_sharegpt_first_turns",
  "load_prompts",
  "sharegpt_file",
]
