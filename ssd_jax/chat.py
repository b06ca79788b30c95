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


class Chat:
  """One conversation's state and how it answers a line."""

  def __init__(self, engine, spec, sampling, max_new_tokens, show_metrics, seed, stdout):
    if engine.target.tokenizer is None:
      raise ValueError(f"{engine.target.name} has no tokenizer: chat needs one")
    self.engine, self.spec, self.sampling = engine, spec, sampling
    self.max_new_tokens, self.show_metrics, self.seed = max_new_tokens, show_metrics, seed
    self.out: TextIO = stdout
    self.history: list[tuple[str, str]] = []
    self.replies = 0

  def command(self, line: str) -> bool:
    """Run a /command; returns False for /quit."""
    if line in ("/quit", "/exit"):
      return False
    if line == "/metrics":
      self.show_metrics = not self.show_metrics
      self.out.write(f"[metrics {'on' if self.show_metrics else 'off'}]\n")
    elif line == "/reset":
      self.history = []
      self.out.write("[new conversation]\n")
    else:
      self.out.write(f"[unknown command {line}; {HELP}]\n")
    return True

  def answer(self, line: str) -> None:
    """Stream the reply to `line`; a conversation grown past the model's context is refused
    (the history is kept, /reset starts over)."""
    tokenizer = self.engine.target.tokenizer
    history = [*self.history, ("user", line)]
    template = tokenizer.chat_template
    prompt = render_messages(template, history) if template else line
    streamer = Streamer(tokenizer, self.engine.target.config.eos_token_ids, self.out)
    try:
      out = self.engine.generate(
        [tokenizer.encode(prompt)],
        spec=self.spec,
        sampling=self.sampling,
        max_new_tokens=self.max_new_tokens,
        seed=self.seed + self.replies,
        on_tokens=streamer,
      )
    except ValueError as e:
      self.out.write(f"[cannot answer: {e}; /reset starts a new conversation]\n")
      return
    self.out.write("\n")
    self.history = [*history, ("assistant", streamer.text)]
    self.replies += 1
    if self.show_metrics:
      self.out.write(_metrics_line(out.metrics, self.spec.mode) + "\n")


def _metrics_line(m, mode: str) -> str:
  hit = f", cache hit rate {m.hit_rate:.2f}" if mode == "ssd" else ""
  return (
    f"[{m.generated_tokens} tokens, {m.tokens_per_second:.1f} tok/s, "
    f"{m.mean_accepted:.2f} accepted tokens/round{hit}]"
  )


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
  chat = Chat(engine, spec, sampling, max_new_tokens, show_metrics, seed, stdout)
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
    if line.startswith("/") and not chat.command(line):
      break
    if line and not line.startswith("/"):
      chat.answer(line)
    stdout.flush()
  return chat.replies
