"""Interactive chat with the target through any decoding mode, streaming accepted tokens.

Reads one user message per line (a terminal or a pipe), answers each, and keeps the
conversation. Ctrl-C stops a reply (the prompt comes back); Ctrl-D or /quit ends the chat.
Commands: /metrics toggles per-reply statistics, /reset clears the history.
"""

from __future__ import annotations

import contextlib
import sys
from typing import TextIO

from ssd_jax.config import SpecConfig
from ssd_jax.decode.sampling import Sampling
from ssd_jax.harness.config import RunConfig
from ssd_jax.harness.engines import build_engines
from ssd_jax.models.tokenizer import render_messages
from ssd_jax.runtime import Engine
from ssd_jax.speculator import ChannelError

HELP = "commands: /metrics (toggle statistics), /reset (new conversation), /quit (or Ctrl-D)"


class Streamer:
  """Turns accepted token ids into printed text as they arrive (EOS is not printed)."""

  def __init__(self, tokenizer, eos_ids, out: TextIO):
    self.tokenizer, self.eos_ids, self.out = tokenizer, set(eos_ids), out
    self.ids: list[int] = []
    self.ended = False  # an EOS was emitted
    self.text = ""

  def __call__(self, row: int, new: list[int]) -> None:
    del row
    self.ended |= any(t in self.eos_ids for t in new)
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

  def prompt_ids(self, line: str) -> list[int]:
    tokenizer = self.engine.target.tokenizer
    history = [*self.history, ("user", line)]
    template = tokenizer.chat_template
    return tokenizer.encode(render_messages(template, history) if template else line)

  def answer(self, line: str) -> None:
    """Stream the reply to `line`. A conversation grown past the model's context is refused
    (the history is kept, /reset starts over); a Ctrl-C stops the reply, which is kept as far as
    it got."""
    streamer = Streamer(
      self.engine.target.tokenizer, self.engine.target.config.eos_token_ids, self.out
    )
    try:
      out = self.engine.generate(
        [self.prompt_ids(line)],
        spec=self.spec,
        sampling=self.sampling,
        max_new_tokens=self.max_new_tokens,
        seed=self.seed + self.replies,
        on_tokens=streamer,
      )
    except ValueError as e:
      self.out.write(f"[cannot answer: {e}; /reset starts a new conversation]\n")
      return
    except KeyboardInterrupt:
      self.out.write(" [stopped]\n")
      out = None
    else:
      self.out.write("\n")
      if not streamer.ended:
        self.out.write(f"[cut at {self.max_new_tokens} tokens: --max-new-tokens]\n")
    self.history = [*self.history, ("user", line), ("assistant", streamer.text)]
    self.replies += 1
    if self.show_metrics and out is not None:
      self.out.write(_metrics_line(out.metrics, self.spec.mode) + "\n")


def _metrics_line(m, mode: str) -> str:
  hit = f", cache hit rate {m.hit_rate:.2f}" if mode == "ssd" else ""
  return (
    f"[{m.generated_tokens} tokens, {m.tokens_per_second:.1f} tok/s, "
    f"{m.mean_accepted:.2f} accepted tokens/round{hit}]"
  )


def _read(stdin: TextIO, stdout: TextIO, interactive: bool) -> str | None:
  """The next line, None at the end of input. At a terminal's prompt a Ctrl-C asks how to
  leave instead of leaving; Ctrl-D leaves on a fresh line."""
  while True:
    if interactive:
      stdout.write("> ")
      stdout.flush()
    try:
      line = stdin.readline()
    except KeyboardInterrupt:
      stdout.write(f"\n[{HELP}]\n")
      continue
    if not line and interactive:
      stdout.write("\n")
    return line or None


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
  warm: bool = False,
) -> int:
  """Run the conversation until /quit or end of input. Returns the number of replies. `warm`:
  compile the reply programs first (a two-token reply), so the banner comes when replies can."""
  chat = Chat(engine, spec, sampling, max_new_tokens, show_metrics, seed, stdout)
  if warm:
    print("compiling...", file=sys.stderr, flush=True)
    engine.generate([chat.prompt_ids("hi")], spec=spec, sampling=sampling, max_new_tokens=2)
  interactive = stdin.isatty()
  if interactive:
    stdout.write(f"ssd_jax chat ({spec.mode}). {HELP}; Ctrl-C stops a reply\n")
  while (line := _read(stdin, stdout, interactive)) is not None:
    line = line.strip()
    if line.startswith("/") and not chat.command(line):
      break
    if line and not line.startswith("/"):
      chat.answer(line)
    stdout.flush()
  return chat.replies


def main(config: RunConfig, layout, parser) -> int:
  """`python -m ssd_jax.run --chat`: load, compile, then talk through the run's (last) mode."""
  mode = config.modes[-1]
  spec, d = config.spec(mode), config.decoding
  print(f"loading {config.models.target} for a chat through {mode}...", file=sys.stderr, flush=True)
  with contextlib.ExitStack() as stack:
    try:
      engine = build_engines(config, layout, stack)[mode]
      engine.plan(spec, greedy=d.sampling.greedy)  # a bad configuration fails before the chat
      if engine.target.tokenizer is None:
        raise ValueError(f"{engine.target.name} has no tokenizer: chat needs one")
    except (ValueError, FileNotFoundError) as e:
      parser.error(str(e))
    try:
      chat_loop(
        engine,
        spec,
        d.sampling,
        d.max_new_tokens,
        show_metrics=config.chat_metrics,
        seed=d.seed,
        warm=True,
      )
    except ChannelError as e:
      print(f"python -m ssd_jax.run: error: {e}", file=sys.stderr)
      return 1
  return 0
