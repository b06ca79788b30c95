"""A request's tokens as text, delta by delta: what a stream sends after each round.

The text of the tokens so far is decoded whole each time (the tokenizer's merges and byte
fallback then apply exactly as in one decode); a delta is what it adds. Held back:
  - a text ending in U+FFFD: a multi-byte character split between rounds, its next bytes still
    to come (the end of the request releases whatever is there);
  - with stop strings, the last (longest stop - 1) characters, which a later round may complete
    into a stop string (that text is never sent: the request's text ends before its stop).
EOS tokens (the model's end of turn) are tokens of the request but not of its text.
"""

from __future__ import annotations

from collections.abc import Sequence


class Detokenizer:
  def __init__(self, tokenizer, eos_ids: Sequence[int], stops: Sequence[str] = ()):
    self.tokenizer, self.eos, self.stops = tokenizer, set(eos_ids), tuple(stops)
    self.ids: list[int] = []
    self.sent = 0  # characters of the text sent so far
    self.hold = max((len(s) for s in self.stops), default=1) - 1

  def text(self) -> str:
    """All the tokens' text, cut before the first stop string it holds."""
    text = self.tokenizer.decode([t for t in self.ids if t not in self.eos])
    cut = min((i for s in self.stops if (i := text.find(s)) >= 0), default=None)
    return text if cut is None else text[:cut]

  def add(self, tokens: Sequence[int], final: bool) -> str:
    """The new text these tokens make (`final`: the request ended with them)."""
    self.ids.extend(tokens)
    text = self.text()
    if not final:
      if text.endswith("\ufffd"):
        text = text.rstrip("\ufffd")
      text = text[: max(len(text) - self.hold, self.sent)]
    delta, self.sent = text[self.sent :], max(self.sent, len(text))
    return delta
