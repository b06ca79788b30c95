"""The OpenAI-compatible server as a client sees it: `python -m ssd_jax.serve` on tiny models in a
subprocess on a free port of 127.0.0.1, driven by the official `openai` client (and httpx for
what the client hides: statuses, raw chunks, /health, /metrics).

One server (ssd, its speculator a process of its own, an API key) serves most tests; the last
of them kills its speculator. A second, one slot and one queue place, takes a full queue and
SIGTERM with streams open; the ar and sd servers, Ctrl-C with one open. Every greedy answer is
compared token for token with offline decoding (`Engine.generate` on the same tiny target in
this process).
"""

import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from ssd_jax import Engine, SpecConfig, load_model
from ssd_jax.models import tiny
from ssd_jax.models.tokenizer import render_messages
from ssd_jax.runtime.requests import Request
from ssd_jax.serve.text import Detokenizer

MODEL = "tiny-llama"
KEY = "test-key"
LOOKAHEAD = 3
MAX_MODEL_LEN = 128
# The small draft, which the target rarely agrees with: about a token a round, so that a long
# stream is still open when a test drops it or signals.
TINY = ["--target", "tiny-llama", "--draft", "tiny-llama-draft", "--mode", "ssd"]
COMMON = [*TINY, "--lookahead", str(LOOKAHEAD), "--max-model-len", str(MAX_MODEL_LEN)]
START = 900  # seconds for a server to compile and listen (a loaded two-core machine)
# One compilation cache for this module's servers (and their speculators): the second server
# loads what the first compiled.
_CACHE = tempfile.mkdtemp(prefix="ssd-jax-serve-xla-")


class Server:
  """A server process: its base URL, and how to stop it leaving nothing behind."""

  def __init__(self, tmp: Path, *flags: str, common: tuple[str, ...] = tuple(COMMON)):
    self.log = tmp / "server.log"
    env = os.environ | {
      "JAX_PLATFORMS": "cpu",
      "JAX_COMPILATION_CACHE_DIR": _CACHE,
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
      "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    with self.log.open("w") as out:
      self.process = subprocess.Popen(
        [sys.executable, "-m", "ssd_jax.serve", *common, "--port", "0", *flags],
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,  # its own process group: the finally below can end it all
      )
    self.children: set[int] = set()
    try:
      self.url = self._wait_until_listening()
    except BaseException:
      self.stop()
      raise
    self.children = descendants(self.process.pid)

  def _wait_until_listening(self) -> str:
    deadline = time.monotonic() + START
    while time.monotonic() < deadline:
      if (m := re.search(r" on (http://\S+)/v1\n", self.log.read_text())) is not None:
        return m.group(1)
      if self.process.poll() is not None:
        pytest.fail(f"the server exited ({self.process.returncode}):\n{self.log.read_text()}")
      time.sleep(0.5)
    pytest.fail(f"the server did not listen within {START} s:\n{self.log.read_text()}")

  def client(self, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=120)

  def stop(self, sig: int = signal.SIGTERM, within: float = 30.0) -> float:
    """Signal it; seconds until it exited. Whatever is left then is killed (by PID)."""
    t0 = time.monotonic()
    try:
      self.process.send_signal(sig)
      self.process.wait(timeout=within)
      return time.monotonic() - t0
    except subprocess.TimeoutExpired:
      return float("inf")
    finally:
      if self.process.poll() is None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
      for pid in self.children:
        kill(pid)


def descendants(pid: int) -> set[int]:
  """The processes below `pid` (from /proc)."""
  parents: dict[int, int] = {}
  for stat in Path("/proc").glob("[0-9]*/stat"):
    try:
      fields = stat.read_text().rpartition(")")[2].split()
    except OSError:
      continue
    parents[int(stat.parent.name)] = int(fields[1])
  out, frontier = set(), {pid}
  while frontier:
    frontier = {p for p, parent in parents.items() if parent in frontier} - out
    out |= frontier
  return out


def cmdline(pid: int) -> str:
  try:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
  except OSError:
    return ""


def alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  stat = Path(f"/proc/{pid}/stat")
  return not (stat.exists() and stat.read_text().rpartition(")")[2].split()[0] == "Z")


def kill(pid: int) -> None:
  if alive(pid):
    os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  s = Server(tmp_path_factory.mktemp("serve"), "--max-batch-size", "2", "--api-key", KEY)
  try:
    yield s
  finally:
    s.stop()


@pytest.fixture(scope="module")
def offline():
  """Greedy tokens of prompts (token ids) as `Engine.generate` decodes them, one call for
  many: rows never mix, so each is the prompt decoded alone."""
  engine = Engine(load_model(MODEL), placement="device")

  def greedy(prompts: list[list[int]], budgets: list[int]) -> list[list[int]]:
    spec = SpecConfig(mode="ar")
    return engine.generate(prompts, spec=spec, max_new_tokens=budgets).tokens

  greedy.engine, greedy.tokenizer = engine, engine.target.tokenizer
  greedy.eos = set(engine.target.config.eos_token_ids)
  return greedy


def chunks(response: httpx.Response) -> list[dict | str]:
  """A stream's data lines: JSON chunks, then "[DONE]"."""
  out = []
  for line in response.iter_lines():
    if line.startswith("data: "):
      data = line[len("data: ") :]
      out.append(data if data == "[DONE]" else json.loads(data))
  return out


def post(server: Server, path: str, **kwargs) -> httpx.Response:
  headers = {"Authorization": f"Bearer {KEY}"} | kwargs.pop("headers", {})
  return httpx.post(f"{server.url}{path}", headers=headers, timeout=120, **kwargs)


def metrics(server: Server) -> dict[str, float]:
  text = httpx.get(f"{server.url}/metrics", timeout=30).text
  return {
    m.group(1): float(m.group(2))
    for m in re.finditer(r"^(ssd_jax_\w+(?:\{[^}]*\})?) (\S+)$", text, re.M)
  }


# -- without a server ------------------------------------------------------------------------


def test_a_character_split_between_rounds_comes_out_whole():
  tokenizer = tiny.byte_tokenizer()
  check = tokenizer.encode("✓")
  assert len(check) == 3  # one token per byte
  detok = Detokenizer(tokenizer, eos_ids=[257])
  assert detok.add(tokenizer.encode("a") + check[:1], final=False) == "a"
  assert detok.add(check[1:2], final=False) == ""
  assert detok.add(check[2:], final=False) == "✓"
  assert detok.add([257], final=True) == ""  # EOS: a token, not text
  assert detok.text() == "a✓"


def test_text_a_stop_string_may_complete_is_held_back():
  tokenizer = tiny.byte_tokenizer()
  detok = Detokenizer(tokenizer, eos_ids=[], stops=["END"])
  assert detok.add(tokenizer.encode("xyEN"), final=False) == "xy"  # "EN" may become "END"
  assert detok.add(tokenizer.encode("D"), final=True) == ""  # it did: the text ends before it
  assert detok.text() == "xy"
  detok = Detokenizer(tokenizer, eos_ids=[], stops=["END"])
  assert detok.add(tokenizer.encode("xyEN"), final=False) == "xy"
  assert detok.add(tokenizer.encode("d"), final=True) == "ENd"  # it did not


@pytest.mark.parametrize(
  ("argv", "message"),
  [
    (["--max-batch-size", "0"], "--max-batch-size must be >= 1"),
    (["--port", "-1"], "--port must be >= 0"),
    (["--mode", "ar", "--fan-out", "3"], "--fan-out applies only to ssd"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
  ],
)
def test_usage_errors_are_one_line(argv, message, capsys):
  from ssd_jax.serve.__main__ import main  # noqa: PLC0415

  with pytest.raises(SystemExit) as exit_:
    main(argv)
  assert exit_.value.code == 2
  err = capsys.readouterr().err
  assert message in err and len(err.strip().splitlines()) == 1, err


def test_a_failed_session_thread_ends_its_requests(offline, monkeypatch):
  """A session whose thread fails (a speculator that died, say) ends every request it holds
  with the error and refuses new ones: nothing waits forever (a server's /health says so)."""
  session = offline.engine.session(SpecConfig(mode="ar"), max_batch_size=1, max_model_len=64)

  def fail():
    raise RuntimeError("boom")

  monkeypatch.setattr(session, "step", fail)
  handle = session.submit(Request(prompt=[1, 2, 3], max_new_tokens=4))
  session.start()
  with pytest.raises(RuntimeError, match="boom"):
    handle.result(timeout=30)
  assert not session.alive and "boom" in session.failure
  with pytest.raises(RuntimeError, match="the session has stopped"):
    session.submit(Request(prompt=[1, 2, 3], max_new_tokens=4))
  session.close()


# -- one server -----------------------------------------------------------------------------


PROMPTS = ["The quick brown fox", "héllo wörld ✓ — ünïcödé", "def f(x):\n  return"]


def test_models_are_listed(server):
  models = server.client().models.list().data
  assert [m.id for m in models] == [MODEL]


def test_completions_equal_offline_decoding_streamed_or_not(server, offline):
  client = server.client()
  ids = [offline.tokenizer.encode(p) for p in PROMPTS]
  budgets = [24, 40, 12]
  want = offline(ids, budgets)
  for prompt, prompt_ids, budget, tokens in zip(PROMPTS, ids, budgets, want, strict=True):
    args = dict(model=MODEL, prompt=prompt, max_tokens=budget, temperature=0)
    whole = client.completions.create(**args, extra_body={"return_token_ids": True})
    choice = whole.choices[0]
    assert choice.token_ids == tokens, prompt
    assert choice.prompt_token_ids == prompt_ids
    assert whole.usage.prompt_tokens == len(prompt_ids)
    assert whole.usage.completion_tokens == len(tokens)
    assert whole.usage.total_tokens == len(prompt_ids) + len(tokens)
    ended = tokens[-1] in offline.eos or len(tokens) < budget
    assert choice.finish_reason == ("stop" if ended else "length")
    stream = client.completions.create(
      **args,
      stream=True,
      stream_options={"include_usage": True},
      extra_body={"return_token_ids": True},
    )
    parts = list(stream)
    *rounds, last = parts
    assert last.choices == [] and last.usage.completion_tokens == len(tokens)
    assert "".join(c.choices[0].text for c in rounds) == choice.text
    assert [t for c in rounds for t in c.choices[0].token_ids] == tokens
    assert len(rounds) <= len(tokens)  # one chunk per round, each with its round's tokens
    reasons = [c.choices[0].finish_reason for c in rounds]
    assert reasons[-1] == choice.finish_reason and reasons[:-1] == [None] * (len(rounds) - 1)


def test_text_is_whole_across_rounds(server, offline):
  """Multi-byte characters split between rounds arrive whole: every streamed delta is valid
  text, and together they are the text of the tokens decoded at once."""
  # The tiny model speaks bytes: with ignore_eos its random bytes split UTF-8 sequences often.
  r = post(
    server,
    "/v1/completions",
    json={"prompt": "ü✓", "max_tokens": 60, "temperature": 0, "stream": True, "ignore_eos": True}
    | {"return_token_ids": True},
  )
  parts = chunks(r)
  assert parts[-1] == "[DONE]"
  texts = [c["choices"][0]["text"] for c in parts[:-1]]
  tokens = [t for c in parts[:-1] for t in c["choices"][0]["token_ids"]]
  assert len(tokens) == 60
  # The whole text, decoded at once, is the concatenation of what was streamed.
  assert "".join(texts) == offline.tokenizer.decode([t for t in tokens if t not in offline.eos])
  assert all(not t.endswith("\ufffd") for t in texts[:-1])


def test_chat_equals_offline_decoding_streamed_or_not(server, offline):
  client = server.client()
  messages = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
  ]
  tokenizer = offline.tokenizer
  text = render_messages(tokenizer.chat_template, [("user", "Hi there")], "Be brief.")
  prompt_ids = tokenizer.encode(text)
  [tokens] = offline([prompt_ids], [30])
  args = dict(model=MODEL, messages=messages, max_completion_tokens=30, temperature=0)
  whole = client.chat.completions.create(**args, extra_body={"return_token_ids": True})
  assert whole.choices[0].token_ids == tokens
  assert whole.usage.prompt_tokens == len(prompt_ids)
  assert whole.usage.completion_tokens == len(tokens)
  parts = list(
    client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True})
  )
  assert parts[0].choices[0].delta.role == "assistant"
  assert parts[-1].usage.total_tokens == whole.usage.total_tokens
  text = "".join(c.choices[0].delta.content or "" for c in parts if c.choices)
  assert text == whole.choices[0].message.content
  finishes = [c.choices[0].finish_reason for c in parts if c.choices and c.choices[0].finish_reason]
  assert finishes == [whole.choices[0].finish_reason]


def test_token_id_prompts_and_several_prompts(server, offline):
  client = server.client()
  ids = [offline.tokenizer.encode(p) for p in PROMPTS[:2]]
  want = offline(ids, [10, 10])
  one = client.completions.create(
    model=MODEL, prompt=ids[0], max_tokens=10, temperature=0, extra_body={"return_token_ids": True}
  )
  assert one.choices[0].token_ids == want[0]
  both = client.completions.create(
    model=MODEL,
    prompt=PROMPTS[:2],
    max_tokens=10,
    temperature=0,
    extra_body={"return_token_ids": True},
  )
  assert [c.index for c in both.choices] == [0, 1]
  assert [c.token_ids for c in both.choices] == want
  assert both.usage.prompt_tokens == sum(map(len, ids))
  assert both.usage.completion_tokens == sum(map(len, want))


def test_n_choices_per_prompt(server, offline):
  """`n`: each prompt's choices in OpenAI's order (prompt k's choice j at index k * n + j),
  greedy ones all offline decoding's; each prompt's tokens counted once in usage."""
  client = server.client()
  ids = [offline.tokenizer.encode(p) for p in PROMPTS[:2]]
  want = offline(ids, [10, 10])
  extra = {"return_token_ids": True}
  many = client.completions.create(
    model=MODEL, prompt=PROMPTS[:2], max_tokens=10, temperature=0, n=3, extra_body=extra
  )
  assert [c.index for c in many.choices] == list(range(6))
  assert [c.token_ids for c in many.choices] == [want[0]] * 3 + [want[1]] * 3
  assert [c.prompt_token_ids for c in many.choices] == [ids[0]] * 3 + [ids[1]] * 3
  assert many.usage.prompt_tokens == sum(map(len, ids))
  assert many.usage.completion_tokens == 3 * sum(map(len, want))


def test_sampled_choices_differ_and_repeat_with_their_seed(server):
  """At temperature 1 with a seed, a prompt's choices differ from one another, choice j is the
  one choice of seed + j, and the same call gives the same choices, streamed or not."""
  client = server.client()
  extra = {"return_token_ids": True, "ignore_eos": True}
  args = dict(model=MODEL, prompt="Once", max_tokens=16, temperature=1.0, extra_body=extra)
  three = [c.token_ids for c in client.completions.create(**args, n=3, seed=7).choices]
  assert len({tuple(t) for t in three}) == 3, three
  alone = [client.completions.create(**args, seed=7 + j).choices[0].token_ids for j in range(3)]
  assert alone == three
  streamed: dict[int, list[int]] = {0: [], 1: [], 2: []}
  for chunk in client.completions.create(**args, n=3, seed=7, stream=True):
    for c in chunk.choices:
      streamed[c.index] += c.token_ids
  assert [streamed[j] for j in range(3)] == three
  # Chat: every choice opens with its role; the streamed text of each is the whole one's.
  chat = dict(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=12)
  chat |= dict(temperature=1.0, seed=3, n=2, extra_body=extra)
  whole = client.chat.completions.create(**chat)
  assert [c.index for c in whole.choices] == [0, 1]
  assert whole.usage.completion_tokens == sum(len(c.token_ids) for c in whole.choices)
  texts, roles = {0: "", 1: ""}, set()
  for chunk in client.chat.completions.create(**chat, stream=True):
    for c in chunk.choices:
      roles |= {c.index} if c.delta.role == "assistant" else set()
      texts[c.index] += c.delta.content or ""
  assert roles == {0, 1}
  assert [texts[0], texts[1]] == [c.message.content for c in whole.choices]


def test_stop_strings_end_the_text_before_them(server, offline):
  client = server.client()
  args = dict(model=MODEL, prompt="abc", max_tokens=40, temperature=0)
  full = client.completions.create(**args, extra_body={"ignore_eos": True}).choices[0].text
  # Not a character of a special token's name (`<|im_end|>`: an EOS inside the text).
  candidates = [c for c in full[3:] if c not in "\ufffd<|im_end>" and not c.isspace()]
  assert candidates, f"no printable character to stop at in {full!r}"
  stop = candidates[0]
  cut = full[: full.index(stop)]
  for stream in (False, True):
    out = client.completions.create(
      **args, stop=[stop], stream=stream, extra_body={"ignore_eos": True}
    )
    parts = list(out) if stream else [out]
    text = "".join(p.choices[0].text for p in parts if p.choices)
    assert text == cut, stream
    assert [p.choices[0].finish_reason for p in parts if p.choices][-1] == "stop"


BAD = [
  ({"prompt": "x", "temperature": -1}, 400, "temperature"),
  ({"prompt": "x", "top_p": 0}, 400, "top_p"),
  ({"prompt": "x", "top_p": 1.5}, 400, "top_p"),
  ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
  ({"prompt": "x", "max_tokens": MAX_MODEL_LEN}, 400, "max_tokens"),
  ({"prompt": [300]}, 400, "prompt"),
  ({"prompt": [-1]}, 400, "prompt"),
  ({"prompt": []}, 400, "prompt"),
  ({"prompt": "x", "n": 0}, 400, "n"),
  ({"prompt": "x", "n": 129}, 400, "n"),
  ({"prompt": ["x", "y"], "n": 33}, 400, "n"),  # 66 requests: more than the queue's 64
  ({"prompt": "x", "best_of": 2}, 400, "best_of"),
  ({"prompt": "x", "logprobs": 2}, 400, None),
  ({"prompt": "x", "model": "nope"}, 404, "model"),
  ({"temperature": 0}, 400, "prompt"),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD)
def test_bad_requests_get_their_status_and_the_server_still_serves(server, body, status, param):
  r = post(server, "/v1/completions", json=body)
  assert r.status_code == status, r.text
  error = r.json()["error"]
  assert error["code"] == status and error["message"] and error["type"]
  if param is not None:
    assert error["param"] == param
  ok = post(server, "/v1/completions", json={"prompt": "x", "max_tokens": 2, "temperature": 0})
  assert ok.status_code == 200


def test_malformed_json_nan_and_keys(server):
  headers = {"Content-Type": "application/json"}
  for raw in (b"{not json", b'{"prompt": "x", "temperature": NaN}'):
    r = post(server, "/v1/completions", content=raw, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["code"] == 400, r.text
  r = post(server, "/v1/chat/completions", json={"messages": []})
  assert r.status_code == 400
  for key in ("wrong", None):
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    r = httpx.get(f"{server.url}/v1/models", headers=headers)
    assert r.status_code == 401 and r.json()["error"]["type"] == "AuthenticationError"
  with pytest.raises(openai.AuthenticationError):
    server.client("wrong").models.list()
  assert httpx.get(f"{server.url}/health").status_code == 200  # open without a key


def wait_idle(server: Server, within: float = 30.0) -> dict[str, float]:
  deadline = time.monotonic() + within
  while True:
    m = metrics(server)
    if m["ssd_jax_requests_running"] == m["ssd_jax_requests_waiting"] == 0:
      return m
    assert time.monotonic() < deadline, m
    time.sleep(0.2)


def test_dropped_streams_free_their_slots(server):
  body = {"prompt": "drop", "max_tokens": 100, "temperature": 0, "stream": True, "ignore_eos": True}
  headers = {"Authorization": f"Bearer {KEY}"}
  with httpx.Client(timeout=60) as http:
    streams = [
      http.stream("POST", f"{server.url}/v1/completions", json=body, headers=headers)
      for _ in range(4)
    ]
    responses = [s.__enter__() for s in streams]
    first = next(responses[0].iter_lines())  # one of them has started
    assert first.startswith("data: ")
    for s in streams:
      s.__exit__(None, None, None)  # the client goes away mid-stream
  m = wait_idle(server, within=20)
  assert m["ssd_jax_slots_free"] == 2
  t0 = time.monotonic()
  r = post(server, "/v1/completions", json={"prompt": "next", "max_tokens": 4, "temperature": 0})
  assert r.status_code == 200 and time.monotonic() - t0 < 20


def test_concurrent_clients_each_get_exactly_their_tokens(server, offline):
  """3 x max-batch-size clients, random prompt and output lengths, streamed and not: each
  answer is its prompt's greedy decoding token for token, no 5xx, the queue drained."""
  rng = np.random.default_rng(0)
  n = 12
  prompts = [rng.integers(0, 256, rng.integers(1, 40)).tolist() for _ in range(n)]
  budgets = rng.integers(1, 48, n).tolist()
  want = offline(prompts, budgets)
  client = server.client()

  def ask(i: int) -> list[int]:
    args = dict(model=MODEL, prompt=prompts[i], max_tokens=budgets[i], temperature=0)
    args["extra_body"] = {"return_token_ids": True}
    if i % 2:
      return client.completions.create(**args).choices[0].token_ids
    parts = client.completions.create(**args, stream=True)
    return [t for p in parts for t in p.choices[0].token_ids]

  with concurrent.futures.ThreadPoolExecutor(6) as pool:
    got = list(pool.map(ask, range(n)))
  for i in range(n):
    assert got[i] == want[i], i
  m = wait_idle(server, within=10)
  assert m["ssd_jax_compiles_since_warmup_total"] == 0
  assert m["ssd_jax_rounds_total"] > 0 and m["ssd_jax_generation_tokens_total"] > 0
  assert 'ssd_jax_acceptance_by_position{position="1"}' in m
  assert m["ssd_jax_time_to_first_token_seconds_count"] >= n
  assert m["ssd_jax_time_per_output_token_seconds_count"] > 0
  assert m["ssd_jax_accepted_tokens_per_round"] >= 1
  assert m['ssd_jax_requests_total{finish_reason="length"}'] > 0


def test_the_serving_benchmark_runs_over_http(server):
  from ssd_jax.bench import serving  # noqa: PLC0415

  options = serving.ServingOptions(
    http=f"{server.url}/v1",
    api_key=KEY,
    target=MODEL,
    modes=("ssd",),
    prompt_sets=("bundled",),
    num_prompts=2,
    max_new_tokens=8,
    concurrencies=(1, 2),
    requests=3,
    static=False,
  )
  result = serving.serving(options)
  assert [p["load"] for p in result["points"]] == ["concurrency 1", "concurrency 2"]
  for point in result["points"]:
    assert point["requests"] == 3 and point["tokens"] > 0 and point["tokens_per_second"] > 0
    assert point["ttft_ms_p50"] > 0


def test_a_killed_speculator_fails_requests_clearly(server):
  """Last on this server: its speculator dies mid-stream; the stream ends with an error chunk,
  /health says 503 and new requests are refused with 503, nothing hangs."""
  [speculator] = [pid for pid in server.children if "ssd_jax.speculator" in cmdline(pid)]
  body = {"prompt": "kill", "max_tokens": 100, "temperature": 0, "stream": True, "ignore_eos": True}
  headers = {"Authorization": f"Bearer {KEY}"}
  with httpx.stream(
    "POST", f"{server.url}/v1/completions", json=body, headers=headers, timeout=60
  ) as r:
    lines = r.iter_lines()
    assert next(lines).startswith("data: ")
    os.kill(speculator, signal.SIGKILL)
    rest = [line[6:] for line in lines if line.startswith("data: ")]
  assert rest[-1] == "[DONE]"
  assert "error" in json.loads(rest[-2]), rest[-2:]
  deadline = time.monotonic() + 20
  while (health := httpx.get(f"{server.url}/health", timeout=10)).status_code != 503:
    assert time.monotonic() < deadline
    time.sleep(0.2)
  assert "speculator" in health.json()["error"]["message"]
  r = post(server, "/v1/completions", json={"prompt": "x", "max_tokens": 2})
  assert r.status_code == 503 and "speculator" in r.json()["error"]["message"]
  assert server.stop() < 15  # and it still stops on SIGTERM


# -- ar and sd: the same server without a speculator process -----------------------------------


@pytest.mark.parametrize("mode", ["ar", "sd"])
def test_ar_and_sd_servers_answer_as_offline_decoding(tmp_path, server, offline, mode):
  """Without ssd's speculator process there is no speculator to watch: /health says 200 and
  concurrent greedy requests get offline decoding's tokens. Then Ctrl-C with a stream open."""
  del server  # after the main server: its compilations are in the shared cache
  common = ("--target", MODEL, "--max-model-len", str(MAX_MODEL_LEN), "--mode", mode)
  if mode == "sd":
    common += ("--draft", "tiny-llama-draft", "--lookahead", str(LOOKAHEAD))
  s = Server(tmp_path, "--max-batch-size", "2", common=common)
  try:
    assert httpx.get(f"{s.url}/health", timeout=30).status_code == 200
    ids = [offline.tokenizer.encode(p) for p in PROMPTS]
    want = offline(ids, [16] * len(ids))
    client = s.client()
    extra = {"return_token_ids": True}
    send = lambda prompt: client.completions.create(
      model=MODEL, prompt=prompt, max_tokens=16, temperature=0, extra_body=extra
    )
    with concurrent.futures.ThreadPoolExecutor(len(ids)) as pool:
      got = [c.choices[0].token_ids for c in pool.map(send, ids)]
    assert got == want
    # Ctrl-C (SIGINT) with a stream open: the stream ends with its error chunk, the server exits
    # cleanly, and nothing it started is left. The stream is one call of 64 prompts (the queue's
    # default size) of 120 tokens each, queued at once for two slots: 32 waves, seconds of work
    # here where one prompt's 120 tokens took 50 ms and could end before the signal landed.
    children = descendants(s.process.pid)
    body = {"prompt": [f"c{i}" for i in range(64)], "max_tokens": 120, "temperature": 0}
    body |= {"stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{s.url}/v1/completions", json=body, timeout=60) as r:
      lines = r.iter_lines()
      assert next(lines).startswith("data: ")
      seconds = s.stop(signal.SIGINT)
      rest = [line[6:] for line in lines if line.startswith("data: ")]
    assert seconds < 15 and s.process.returncode == 0, s.log.read_text()
    assert rest[-1] == "[DONE]" and "shutting down" in json.loads(rest[-2])["error"]["message"]
    deadline = time.monotonic() + 5  # a resource tracker ends when it reads its parent's end
    while (left := [pid for pid in children if alive(pid)]) and time.monotonic() < deadline:
      time.sleep(0.05)
    assert not left, [cmdline(pid) for pid in left]
    assert "Traceback" not in s.log.read_text()
  finally:
    s.stop()


# -- a one-slot server: a full queue, and SIGTERM with streams open ----------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory, server):
  del server  # after the main server: its compilations are in the shared cache
  s = Server(tmp_path_factory.mktemp("small"), "--max-batch-size", "1", "--max-queue", "1")
  try:
    yield s
  finally:
    s.stop()


def test_a_full_queue_is_429(small):
  """One slot and one place in the queue: of a burst of long requests, those beyond are
  refused with 429 at once, the others answered."""
  body = {"prompt": "q", "max_tokens": 120, "temperature": 0, "ignore_eos": True}
  send = lambda _: httpx.post(f"{small.url}/v1/completions", json=body, timeout=120)
  with concurrent.futures.ThreadPoolExecutor(6) as pool:
    answers = list(pool.map(send, range(6)))
  statuses = sorted(r.status_code for r in answers)
  assert set(statuses) == {200, 429} and statuses.count(200) <= 4, statuses
  refused = next(r for r in answers if r.status_code == 429).json()["error"]
  assert refused["type"] == "RateLimitError" and "queue is full" in refused["message"]
  wait_idle(small)


def test_sigterm_with_streams_open_stops_everything_in_seconds(small):
  body = {"prompt": "t", "max_tokens": 120, "temperature": 0, "stream": True, "ignore_eos": True}
  children = descendants(small.process.pid)
  assert any("ssd_jax.speculator" in cmdline(pid) for pid in children)
  results: dict[int, list] = {}
  started, queued = threading.Event(), threading.Event()

  def stream(i: int) -> None:
    with httpx.stream("POST", f"{small.url}/v1/completions", json=body, timeout=60) as r:
      results[i] = []
      queued.set()  # its headers come back once its request is queued
      for line in r.iter_lines():
        if line.startswith("data: "):
          results[i].append(line[6:])
          started.set()

  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    running = pool.submit(stream, 0)
    assert started.wait(60)  # in the slot
    queued.clear()
    waiting = pool.submit(stream, 1)
    assert queued.wait(60)  # in the queue (or in the slot, if the first has just ended)
    seconds = small.stop(signal.SIGTERM)
    running.result(timeout=30)
    waiting.result(timeout=30)
  assert seconds < 15
  assert small.process.returncode == 0, small.log.read_text()
  # The second stream, signalled as soon as it was queued, ends with the error chunk. The first
  # too, unless its 120 tokens ran out before the signal landed (on a loaded host): then whole.
  ends = [json.loads(results[i][-2]) for i in (0, 1)]
  assert all(results[i][-1] == "[DONE]" for i in (0, 1))
  assert "shutting down" in ends[1]["error"]["message"]
  if "error" not in ends[0]:
    assert ends[0]["choices"][0]["finish_reason"] == "length", ends[0]
  else:
    assert "shutting down" in ends[0]["error"]["message"]
  # Its children (the speculator, reaped; Python's resource tracker, which ends when it reads
  # its parent's end) are gone within moments.
  deadline = time.monotonic() + 5
  while (left := [pid for pid in children if alive(pid)]) and time.monotonic() < deadline:
    time.sleep(0.05)
  assert not left, [cmdline(pid) for pid in left]
  assert "Traceback" not in small.log.read_text()
