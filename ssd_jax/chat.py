"""Interactive chat with the target through any decoding mode, streaming accepted tokens.

Reads one user message per line (a terminal or a pipe), answers each, and keeps the
conversation. Commands: /metrics toggles per-reply statistics, /reset clears the history,
/quit ends.
"""

from __future__ import annotations

import sys
from typing import TextIO

from ssd_jax.config import SpecConfig
from ssd_jax.decode import Engine, Sampling
from ssd_jax.models.tokenizer import render_messages

HELP = "commands: /metrics (toggle statistics), /reset (new conversation), /quit"


class Streamer:
  """Turns accepted token ids into printed text as they arrive (EOS is not printed)."""

  def __init__(self, tokenizer, eos_ids, out: TextIO):
    self.tokenizer, self.eos_ids, self.out = tokenizer, set(eos_ids), out
    self.ids: list[int] = []
    self.text = ""

  def __call__(self, row: int, new: list[int]) -> None:
    del row
    self.ids.extend(t for t in new if t not in self.eos_ids)
    text = self.tokenizer.decode(self.ids)
    if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next bytes
      return
    self.out.write(text[len(self.text) :])
    self.out.flush()
    self.text = text


def chat_loop(
  engine: Engine,
  spec: SpecConfig,
  sampling: Sampling,
  max_new_tokens: int,
  *,
  show_metrics: bool = False,
  seed: int = 0,
  stdin: TextIO = sys.stdin,
  stdout: TextIO = sys.stdout,
) -> int:
  """Run the conversation until /quit or end of input. Returns the number of replies."""
  tokenizer = engine.target.tokenizer
  if tokenizer is None:
    raise ValueError(f"{engine.target.name} has no tokenizer: chat needs one")
  template = tokenizer.chat_template
  history: list[tuple[str, str]] = []
  replies = 0
  interactive = stdin.isatty()
  if interactive:
    stdout.write(f"ssd_jax chat ({spec.mode}). {HELP}\n")
  while True:
    if interactive:
      stdout.write("> ")
      stdout.flush()
    line = stdin.readline()
    if not line:
      break
    line = line.strip()
    if not line:
      continue
    if line in ("/quit", "/exit"):
      break
    if line == "/metrics":
      show_metrics = not show_metrics
      stdout.write(f"[metrics {'on' if show_metrics else 'off'}]\n")
      continue
    if line == "/reset":
      history = []
      stdout.write("[new conversation]\n")
      continue
    if line.startswith("/"):
      stdout.write(f"[unknown command {line}; {HELP}]\n")
      continue
    history.append(("user", line))
    prompt = render_messages(template, history) if template else line
    streamer = Streamer(tokenizer, engine.target.config.eos_token_ids, stdout)
    out = engine.generate(
      [tokenizer.encode(prompt)],
      spec=spec,
      sampling=sampling,
      max_new_tokens=max_new_tokens,
      seed=seed + replies,
      on_tokens=streamer,
    )
    stdout.write("\n")
    history.append(("assistant", streamer.text))
    replies += 1
    if show_metrics:
      m = out.metrics
      hit = f", cache hit rate {m.hit_rate:.2f}" if spec.mode == "ssd" else ""
      stdout.write(
        f"[{m.generated_tokens} tokens, {m.tokens_per_second:.1f} tok/s, "
        f"{m.mean_accepted:.2f} accepted tokens/round{hit}]\n"
      )
    stdout.flush()
  return replies
