"""Prompt sets: counts, fields, held-out slices, the truncated-ShareGPT parser, JSONL errors."""

import importlib.util
import json
from pathlib import Path

import pytest

from ssd_jax.data import (
  SHAREGPT_MAX_CHARS,
  Conversation,
  Prompt,
  iter_sharegpt_conversations,
  iter_sharegpt_first_turns,
  load_prompts,
  sharegpt_file,
)
from ssd_jax.data import prompts as prompts_module


def _conversation(conv_id, first_from, first_text):
  return {
    "id": conv_id,
    "conversations": [
      {"from": first_from, "value": first_text},
      {"from": "gpt", "value": "A reply with a brace } and a bracket ] inside."},
    ],
  }


def _write_jsonl(path, lines):
  path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
  return path


def test_humaneval_has_164_problems_without_solutions():
  prompts = load_prompts("humaneval")
  assert len(prompts) == 164
  assert prompts[0].id == "HumanEval/0"
  assert len({p.id for p in prompts}) == 164
  assert all(p.source == "humaneval" and p.text.strip() for p in prompts)
  # The prompt is signature plus docstring: it must not carry the reference tests.
  assert all("def check(" not in p.text for p in prompts)


def test_limit_and_offset_slice_the_same_order():
  everything = load_prompts("humaneval")
  assert load_prompts("humaneval", 5) == everything[:5]
  assert load_prompts("humaneval", 5, offset=160) == everything[160:]
  assert load_prompts("humaneval", offset=200) == []
  assert load_prompts("humaneval", 0) == []


@pytest.mark.parametrize(
  ("kwargs", "match"), [({"limit": -1}, "limit"), ({"offset": -2}, "offset")]
)
def test_negative_limit_or_offset_is_rejected(kwargs, match):
  with pytest.raises(ValueError, match=match):
    load_prompts("humaneval", **kwargs)


def test_sharegpt_first_turns_are_short_unique_human_turns():
  prompts = load_prompts("sharegpt", 200)
  assert len(prompts) == 200
  assert all(p.source == "sharegpt" and p.text and p.text == p.text.strip() for p in prompts)
  assert all(len(p.text) <= prompts_module.SHAREGPT_MAX_CHARS for p in prompts)
  assert len({p.id for p in prompts}) == 200
  assert len({p.text for p in prompts}) == 200


def test_sharegpt_offset_gives_a_disjoint_held_out_slice():
  train = load_prompts("sharegpt", 150)
  held_out = load_prompts("sharegpt", 50, offset=100)
  assert held_out == train[100:]
  assert not {p.text for p in load_prompts("sharegpt", 50, offset=150)} & {p.text for p in train}


def test_sharegpt_max_chars_filters_long_turns():
  prompts = load_prompts("sharegpt", 50, max_chars=100)
  assert len(prompts) == 50
  assert all(len(p.text) <= 100 for p in prompts)


def test_parser_keeps_only_complete_records_of_a_truncated_file(tmp_path, monkeypatch):
  records = [
    _conversation("a_0", "human", "  What is a KV cache?\n"),
    _conversation("b_0", "gpt", "A conversation that starts with the model."),
    _conversation("c_0", "human", "   "),
    {"id": "d_0", "conversations": []},
    _conversation("e_0", "human", 'Quotes " and unicode ✓ survive.'),
    _conversation("f_0", "human", "This record gets cut in half."),
  ]
  text = json.dumps(records, indent=2, ensure_ascii=False)
  cut = text.index("This record gets cut") + 10
  path = tmp_path / "truncated.json"
  path.write_text(text[:cut], encoding="utf-8")

  # A chunk smaller than one record makes the parser retry across chunk boundaries too.
  for chunk_chars in (7, 1 << 20):
    monkeypatch.setattr(prompts_module, "_CHUNK_CHARS", chunk_chars)
    assert list(iter_sharegpt_first_turns(path)) == [
      Prompt("a_0", "What is a KV cache?", "sharegpt"),
      Prompt("e_0", 'Quotes " and unicode ✓ survive.', "sharegpt"),
    ]


def test_parser_reads_a_complete_file_to_the_end(tmp_path):
  path = tmp_path / "complete.json"
  path.write_text(json.dumps([_conversation(f"x_{i}", "human", f"q{i}") for i in range(3)]))
  assert [p.text for p in iter_sharegpt_first_turns(path)] == ["q0", "q1", "q2"]


def test_conversations_keep_every_turn_in_order_with_positions(tmp_path):
  records = [
    {
      "id": "m_0",
      "conversations": [
        {"from": "human", "value": " first "},
        {"from": "gpt", "value": "reply"},
        "not a turn",
        {"from": "human", "value": 7},
        {"from": "human", "value": "later\n"},
      ],
    },
    ["not a record"],
    {"conversations": []},
  ]
  path = tmp_path / "multi.json"
  path.write_text(json.dumps(records))
  assert list(iter_sharegpt_conversations(path)) == [
    Conversation(
      "m_0",
      (("human", "first"), ("gpt", "reply"), ("", ""), ("human", ""), ("human", "later")),
    ),
    Conversation("", ()),
  ]


def test_distillation_later_turns_avoid_the_held_out_slice_and_first_turns(monkeypatch):
  # tools/distill_draft.py trains on these; none may come from an evaluated conversation.
  tools = Path(__file__).resolve().parent.parent / "tools"
  monkeypatch.syspath_prepend(str(tools))
  spec = importlib.util.spec_from_file_location("distill_draft", tools / "distill_draft.py")
  tool = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tool)
  turns = tool.later_turns(10**6)  # all of them: the held-out conversations are at the end
  assert tool.later_turns(20, offset=40) == turns[40:60]
  assert len(set(turns)) == len(turns) > 20_000
  assert all(40 <= len(t) <= SHAREGPT_MAX_CHARS for t in turns)
  first = load_prompts("sharegpt")
  assert not set(turns) & {p.text for p in first}
  # Long conversations are split into records "<id>_0", "<id>_1", ...: none of them may train.
  held_out = {p.id.rsplit("_", 1)[0] for p in first[tool.EVAL_SHAREGPT_OFFSET :]}
  later_of_held_out = set()
  for conv in iter_sharegpt_conversations(sharegpt_file()):
    if conv.id.rsplit("_", 1)[0] in held_out:
      later_of_held_out |= {text for speaker, text in conv.turns[1:] if speaker == "human"}
  assert later_of_held_out and not set(turns) & later_of_held_out


def test_jsonl_file_loads_with_default_ids_and_source(tmp_path):
  path = _write_jsonl(
    tmp_path / "mine.jsonl",
    ['{"prompt": "first"}', "", '{"prompt": "second", "id": 7, "source": "hand"}'],
  )
  assert load_prompts(str(path)) == [
    Prompt("mine/1", "first", "mine.jsonl"),
    Prompt("7", "second", "hand"),
  ]
  assert load_prompts(path, 1, offset=1) == [Prompt("7", "second", "hand")]


@pytest.mark.parametrize(
  ("lines", "match"),
  [
    (['{"prompt": "ok"}', "{not json"], r"bad\.jsonl:2: not valid JSON"),
    (['{"prompt": "ok"}', '{"text": "x"}'], r"bad\.jsonl:2: no 'prompt' field"),
    (['{"prompt": 3}'], r"bad\.jsonl:1: 'prompt' = 3; every line needs a non-empty string"),
    (['["prompt"]'], r"bad\.jsonl:1: expected a JSON object"),
    (['{"prompt": "a", "id": [1]}'], r"bad\.jsonl:1: 'id' must be a string or an integer"),
    (['{"prompt": "a", "id": "x"}', '{"prompt": "b", "id": "x"}'], r":2: id 'x' already used"),
  ],
)
def test_bad_jsonl_lines_name_the_file_and_line(tmp_path, lines, match):
  path = _write_jsonl(tmp_path / "bad.jsonl", lines)
  with pytest.raises(ValueError, match=match):
    load_prompts(str(path))


def test_missing_jsonl_file_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    load_prompts(str(tmp_path / "nope.jsonl"))


def test_unknown_spec_lists_the_choices():
  with pytest.raises(ValueError, match="humaneval, sharegpt, bundled, PATH.jsonl"):
    load_prompts("mbpp")


def test_bundled_prompts_load_and_match_their_sources():
  bundled = load_prompts("bundled")
  assert 6 <= len(bundled) <= 8
  assert {p.source for p in bundled} == {"humaneval", "sharegpt"}
  humaneval = {p.id: p for p in load_prompts("humaneval")}
  for prompt in bundled:
    if prompt.source == "humaneval":
      assert prompt == humaneval[prompt.id]
