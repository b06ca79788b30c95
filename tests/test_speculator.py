"""The speculator in a process of its own: exactness through the process path (greedy and
statistical), identical samples to the in-process path, its lifetime (normal end, a speculator
that dies, a parent that dies, Ctrl-C), a speculator another "host" runs, and the CLI's default
layout. Every process a test starts is stopped by the test, also when it fails."""

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import exact
import jax
import numpy as np
import pytest

from ssd_jax import ChannelError, Engine, Placement, Sampling
from ssd_jax.config import SpecConfig
from ssd_jax.models.registry import LoadedModel, load_model
from ssd_jax.models.weights import save_hf
from ssd_jax.speculator.channel import Connection
from ssd_jax.speculator.process import _stop

pytestmark = pytest.mark.skipif(
  (os.cpu_count() or 1) < 2, reason="a speculator process needs a core of its own"
)

PROMPTS = [[5, 17, 99, 3, 42, 8, 8, 120], [7, 1], [200, 201, 202, 203, 204]]
CORE = (1,)


def speculator_pids() -> set[int]:
  """Live speculator processes started from this test process (its descendants, at any depth:
  a CLI run's speculator is a grandchild). Other sessions' speculators are none of our business."""
  parent, command = {}, {}
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    with contextlib.suppress(OSError):
      with open(f"/proc/{entry}/stat") as f:
        parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
      with open(f"/proc/{entry}/cmdline", "rb") as f:
        command[int(entry)] = f.read()
  ours, frontier = set(), {os.getpid()}
  while frontier:
    frontier = {pid for pid, ppid in parent.items() if ppid in frontier} - ours
    ours |= frontier
  return {pid for pid in ours if b"ssd_jax.speculator" in command.get(pid, b"")}


def gone(pid: int, within: float) -> bool:
  deadline = time.monotonic() + within
  while time.monotonic() < deadline:
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return True
    with contextlib.suppress(ChildProcessError):
      os.waitpid(pid, os.WNOHANG)
    time.sleep(0.1)
  return False


@pytest.fixture(scope="module")
def models():
  return {name: load_model(name) for name in ("tiny-llama", "tiny-llama-draft")}


@pytest.fixture(scope="module")
def process_engine(models):
  engine = Engine(
    models["tiny-llama"],
    models["tiny-llama-draft"],
    placement=Placement(kind="process", cores=CORE),
  )
  yield engine
  engine.close()


@pytest.fixture(scope="module")
def ar(models):
  return Engine(models["tiny-llama"]).generate(PROMPTS, max_new_tokens=20, ignore_eos=True).tokens


@pytest.mark.parametrize("backup", ["neural", "fast"])
@pytest.mark.parametrize("fan_out", [(2, 2, 1, 1), (3, 3, 2, 0)])
def test_greedy_ssd_through_a_process_equals_ar(process_engine, ar, backup, fan_out):
  spec = SpecConfig(mode="ssd", lookahead=3, fan_out=fan_out, backup=backup)
  out = process_engine.generate(PROMPTS, spec=spec, max_new_tokens=20, ignore_eos=True)
  assert out.tokens == ar
  assert out.metrics.rounds > 0 and process_engine.speculator_startup["load_seconds"] > 0


def test_one_host_read_per_round_through_a_process(process_engine, monkeypatch):
  """The speculator needs each outcome on the host: the round's report (which carries it) is
  read at once, and is the round's only read; any other implicit transfer would raise."""
  spec = SpecConfig(mode="ssd", lookahead=3, fan_out=(2, 2, 1, 1))
  run = lambda: process_engine.generate(PROMPTS, spec=spec, max_new_tokens=16, ignore_eos=True)
  run()  # warm
  reads, device_get = [], jax.device_get
  monkeypatch.setattr(jax, "device_get", lambda x: reads.append(1) or device_get(x))
  with jax.transfer_guard_device_to_host("disallow"):
    out = run()
  assert out.metrics.loop_rounds >= 4
  assert len(reads) <= out.metrics.loop_rounds + 4, (len(reads), out.metrics.loop_rounds)


def test_eos_and_budgets_through_a_process(models, ar):
  target = models["tiny-llama"]
  eos = ar[0][5]
  stopping = dataclasses.replace(
    target, config=dataclasses.replace(target.config, eos_token_ids=(eos,))
  )
  spec = SpecConfig(mode="ssd", lookahead=3, fan_out=(2, 2, 1, 1))
  draft = models["tiny-llama-draft"]
  with Engine(stopping, draft, placement=Placement(kind="process", cores=CORE)) as engine:
    out = engine.generate(PROMPTS, spec=spec, max_new_tokens=[30, 4, 11])
  for row, (tokens, budget) in enumerate(zip(out.tokens, [30, 4, 11], strict=True)):
    expected = ar[row][:budget] if len(ar[row]) >= budget else ar[row]
    if eos in expected:
      expected = expected[: expected.index(eos) + 1]
    assert tokens[: len(expected)] == expected[: len(tokens)], row
  assert out.tokens[0][-1] == eos and len(out.tokens[1]) == 4


@pytest.mark.parametrize("pipe", ["shm", "transfer"])
def test_samples_are_the_in_process_samples(models, pipe):
  """Same seed, same programs: the process path draws exactly the tokens of the local one, per
  row settings included (any protocol slip in q, keys or flags would change them)."""
  target, draft = models["tiny-llama"], models["tiny-llama-draft"]
  spec = SpecConfig(mode="ssd", lookahead=3, fan_out=(2, 2, 1, 1), saguaro_c=0.5)
  sampling = [Sampling(temperature=0.9), Sampling(temperature=0.5, top_k=7), Sampling()]
  run = lambda e: e.generate(PROMPTS, spec=spec, sampling=sampling, max_new_tokens=16, seed=5)
  local = run(Engine(target, draft))
  with Engine(target, draft, placement=Placement(kind="process", cores=CORE, pipe=pipe)) as engine:
    remote = run(engine)
  assert remote.tokens == local.tokens
  np.testing.assert_array_equal(remote.metrics.accept_hist, local.metrics.accept_hist)


@pytest.mark.parametrize("pipe", ["shm", "transfer"])
def test_greedy_hits_are_served_on_the_targets_side(models, ar, pipe):
  """Greedy: the speculator sends each expansion's cache and the target serves the rounds whose
  every row hits without waiting for it. A draft that is the target itself hits nearly every
  round; tokens and per-round hit flags (the acceptance histogram) equal the in-process run's.
  Sampled runs do not take this path."""
  target, draft = models["tiny-llama"], load_model("tiny-llama")  # the target as its own draft
  spec = SpecConfig(mode="ssd", lookahead=3, fan_out=(2, 2, 1, 1))
  run = lambda e, **kw: e.generate(PROMPTS, spec=spec, max_new_tokens=20, ignore_eos=True, **kw)
  local = run(Engine(target, draft))
  with Engine(target, draft, placement=Placement(kind="process", cores=CORE, pipe=pipe)) as engine:
    out = run(engine)
    sampled = run(engine, sampling=Sampling(temperature=0.8))
  assert out.tokens == local.tokens == ar
  np.testing.assert_array_equal(out.metrics.accept_hist, local.metrics.accept_hist)
  assert out.metrics.hit_rate > 0.5
  assert 0 < out.metrics.extra["rounds_served_by_target"] <= out.metrics.loop_rounds
  assert "rounds_served_by_target" not in sampled.metrics.extra


@pytest.fixture(scope="module")
def exact_pair(tmp_path_factory):
  """The statistical tests' tiny pair, saved so that a speculator process can load the draft."""
  target, draft = exact.tiny_pair()
  path = tmp_path_factory.mktemp("exact-draft")
  save_hf(path, draft.config, draft.params)
  return target, load_model(str(path))


@pytest.mark.statistical
@pytest.mark.parametrize(
  ("fan_out", "backup"),
  [((exact.V - 1, exact.V), "neural"), ((1, 1), "fast"), ((2, 2, 2), "neural")],
)
def test_ssd_through_a_process_is_exact(exact_pair, fan_out, backup):
  target, draft = exact_pair
  spec = SpecConfig(mode="ssd", lookahead=len(fan_out) - 1, fan_out=fan_out, backup=backup)
  sampling = Sampling(temperature=1.0)
  with Engine(target, draft, placement=Placement(kind="process", cores=CORE)) as engine:
    out = engine.generate(
      [exact.PROMPT] * 50_000, spec=spec, sampling=sampling, max_new_tokens=3, capacity=24
    )
  law = exact.exact_law(target, exact.PROMPT, 3, sampling)
  z = exact.fit_z(exact.counts(out.tokens, 3), law)
  assert z < exact.Z_MAX, z
  assert out.metrics.later_hit_rate > 0


def test_a_speculator_that_dies_mid_run_is_an_error_not_a_hang(models):
  target, draft = models["tiny-llama"], models["tiny-llama-draft"]
  engine = Engine(target, draft, placement=Placement(kind="process", cores=CORE))
  spec = SpecConfig(mode="ssd", lookahead=2, fan_out=(1, 1, 1))
  engine.generate(PROMPTS[:1], spec=spec, max_new_tokens=8)  # started and warm
  pid = engine.site.process().pid
  killed = []

  def kill_after_a_few_tokens(row, tokens):
    if not killed:
      os.kill(pid, signal.SIGKILL)
      killed.append(time.monotonic())

  try:
    with pytest.raises(
      ChannelError, match=f"speculator \\(pid {pid}\\) was killed by SIGKILL \\(exit status -9\\)"
    ):
      engine.generate(PROMPTS[:1], spec=spec, max_new_tokens=400, on_tokens=kill_after_a_few_tokens)
    assert time.monotonic() - killed[0] < 5
  finally:
    engine.close()
  assert gone(pid, within=1)
  # The engine starts a fresh speculator for the next run.
  try:
    assert len(engine.generate(PROMPTS[:1], spec=spec, max_new_tokens=6).tokens[0]) == 6
  finally:
    engine.close()


def test_an_interrupted_run_leaves_the_speculator_ready_for_the_next(process_engine, ar):
  """A KeyboardInterrupt mid-run (a chat's Ctrl-C) ends the run on both sides: the next run
  through the same speculator process is exact."""
  spec = SpecConfig(mode="ssd", lookahead=3, fan_out=(2, 2, 1, 1))

  def interrupt(row, tokens):
    raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    process_engine.generate(
      PROMPTS, spec=spec, max_new_tokens=20, ignore_eos=True, on_tokens=interrupt
    )
  out = process_engine.generate(PROMPTS, spec=spec, max_new_tokens=20, ignore_eos=True)
  assert out.tokens == ar


class _Failing:
  """A connection or pipe whose every step fails."""

  closed = False

  def send(self, message):
    raise ChannelError("the peer is gone")

  def close(self):
    self.closed = True
    raise OSError("cannot close")


def test_stopping_finishes_every_step_when_one_fails(tmp_path):
  """Stopping runs from a finalizer, which would swallow an error: a failing step must not keep
  the later ones (reap the process, release the pipe, remove the log) from running."""
  process = subprocess.Popen([sys.executable, "-c", "pass"])
  conn, pipe, log = _Failing(), _Failing(), tmp_path / "speculator.log"
  log.touch()
  with pytest.raises(OSError, match="cannot close"):
    _stop(process, conn, pipe, log)
  assert conn.closed and pipe.closed
  assert process.returncode is not None  # reaped
  assert not log.exists()


_PARENT = """
import os, sys, time, jax
jax.config.update("jax_num_cpu_devices", 2)
from ssd_jax import Engine, Placement, SpecConfig, load_model
engine = Engine(load_model("tiny-llama"), load_model("tiny-llama-draft"),
                placement=Placement(kind="process", cores=(1,)))
spec = SpecConfig(mode="ssd", lookahead=2, fan_out=(1, 1, 1))
engine.generate([[1, 2, 3]], spec=spec, max_new_tokens=4)
print(engine.site.process().pid, flush=True)
if sys.argv[1] == "hang":
  time.sleep(600)
else:
  engine.generate([[1, 2, 3]], spec=spec, max_new_tokens=100_000, ignore_eos=True, capacity=8192)
"""


@pytest.mark.parametrize(("how", "what"), [("kill", "hang"), ("interrupt", "decode")])
def test_the_speculator_never_outlives_its_parent(how, what):
  """SIGKILL to an idle parent (nothing can clean up) and Ctrl-C to a decoding one."""
  parent = subprocess.Popen(
    [sys.executable, "-c", _PARENT, what], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  pid = None
  try:
    pid = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL if how == "kill" else signal.SIGINT)
    assert parent.wait(timeout=20) != 0
    assert gone(pid, within=3), f"speculator {pid} outlived its parent"
  finally:
    parent.kill()
    parent.wait()
    if pid is not None:  # a speculator this test started and that outlived the check
      with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_a_speculator_another_host_runs(models, ar):
  """Two local processes on 127.0.0.1: one listens (python -m ssd_jax.speculator --listen), the
  target connects to it; arrays move on jax.experimental.transfer."""
  port = _free_port()
  server = subprocess.Popen(
    [sys.executable, "-m", "ssd_jax.speculator", "--listen", f"127.0.0.1:{port}", "--once"],
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  try:
    assert "listening" in server.stdout.readline()
    target, draft = models["tiny-llama"], models["tiny-llama-draft"]
    spec = SpecConfig(mode="ssd", lookahead=3, fan_out=(2, 2, 1, 1))
    with Engine(target, draft, placement=f"127.0.0.1:{port}") as engine:
      assert engine.site.options.pipe == "transfer"
      out = engine.generate(PROMPTS, spec=spec, max_new_tokens=20, ignore_eos=True)
    assert out.tokens == ar
    assert server.wait(timeout=20) == 0  # --once: it exits after its target said bye
  finally:
    server.kill()
    server.wait()


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
  with socket.create_server(("127.0.0.1", 0)) as listener:
    there = socket.create_connection(listener.getsockname())
    here, _ = listener.accept()
  return here, there


def test_a_connection_ends_on_what_is_not_a_message():
  """A line over the limit, one that trickles in past the timeout, invalid JSON and JSON that is
  not an object each end the connection's receive with a ChannelError (never a hang)."""
  cases = [
    (b"x" * 5000, {"limit": 4096}, "longer than 4096 bytes"),
    (b"y" * 5000 + b"\n", {"limit": 4096}, "longer than 4096 bytes"),
    (b"{not json\n", {}, "not JSON"),
    (b"\xff\xfe\n", {}, "not JSON"),
    (b"[1]\n", {}, "not an object"),
    (b'{"op": "hel', {"timeout": 1.0}, "no answer from the peer within 1 s"),
  ]
  for data, kwargs, message in cases:
    here, there = _tcp_pair()
    with here, there:
      there.sendall(data)
      with pytest.raises(ChannelError, match=message):
        Connection(here).receive(**kwargs)
  here, there = _tcp_pair()
  with here, there:  # a byte now and then does not keep a receiver past its timeout

    def trickle():
      with contextlib.suppress(OSError):
        for _ in range(30):
          there.sendall(b" ")
          time.sleep(0.1)

    threading.Thread(target=trickle, daemon=True).start()
    with pytest.raises(ChannelError, match="no answer from the peer within 1 s"):
      Connection(here).receive(timeout=1.0)


def test_the_cli_default_layout_pins_and_reports(tmp_path):
  """`python -m ssd_jax.run` on a CPU host: ar and sd on core 0, ssd's speculator on core 1,
  sd on all cores beside them; greedy outputs identical; no process left behind."""
  out = tmp_path / "run.json"
  before = speculator_pids()
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "ssd_jax.run",
      "--target",
      "tiny-llama",
      "--draft",
      "tiny-llama-draft",
      "--max-new-tokens",
      "12",
      "--num-prompts",
      "2",
      "--target-cores",
      "1",
      "--no-progress",
      "--json",
      str(out),
    ],
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr
  assert "core 0 + core 1" in proc.stdout and "all " in proc.stdout
  result = json.loads(out.read_text())
  assert result["layout"]["ssd"] == {
    "ran_on": "core 0 + core 1",
    "cores": 2,
    "draft": "tiny-llama-draft",
    "draft_head": 264,
  }
  assert result["layout"]["sd"]["cores"] == 1
  assert result["greedy_outputs_identical"] is True
  for mode in ("ar", "sd"):  # the same tokens on every core
    all_cores = result["all_cores"][mode]
    assert all_cores["generated_tokens"] == result["modes"][mode]["generated_tokens"]
  assert result["modes"]["ssd"]["compiles_after_warmup"] == 0  # both processes warm
  # The target's own stages: verification, then the wait for the next speculation.
  assert {"verify_ms_median", "next_ms_median"} <= set(result["modes"]["ssd"])
  assert set(result["speculator_startup"]) == {"spawn_seconds", "load_seconds"}
  assert speculator_pids() <= before


_LONG_TINY_SSD_RUN = [
  *("--mode", "ssd", "--target", "tiny-llama", "--draft", "tiny-llama-draft"),
  *("--max-new-tokens", "100000", "--ignore-eos", "--num-prompts", "1", "--target-cores", "1"),
]


def test_ctrl_c_to_the_cli_stops_it_and_its_speculator_cleanly():
  """Ctrl-C as a terminal sends it (SIGINT to the whole process group) to a decoding
  `python -m ssd_jax.run`: exit status 130, one line saying so and no traceback, the
  speculator gone."""
  before = speculator_pids()
  proc = subprocess.Popen(
    [sys.executable, "-m", "ssd_jax.run", *_LONG_TINY_SSD_RUN],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    start_new_session=True,  # its own group, as a terminal's foreground job
  )
  spawned: set[int] = set()
  try:
    deadline = time.monotonic() + 300
    while not spawned and proc.poll() is None and time.monotonic() < deadline:
      spawned = speculator_pids() - before
      time.sleep(0.2)
    assert spawned, "no speculator started"
    time.sleep(3)  # into the warm-up or the decoding
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "python -m ssd_jax.run: interrupted" in err and "Traceback" not in err, err
    assert all(gone(pid, within=3) for pid in spawned)
  finally:
    proc.kill()
    proc.communicate()
    for pid in spawned:  # a speculator that outlived the checks
      with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def test_a_draft_built_in_memory_cannot_go_to_a_process(models):
  draft = models["tiny-llama-draft"]
  built = LoadedModel(draft.name, draft.config, draft.params, None)
  with pytest.raises(ValueError, match="cannot load it too"):
    Engine(models["tiny-llama"], built, placement="process")


def test_placement_names_are_checked(models):
  with pytest.raises(ValueError, match="placement must be auto, device or process"):
    Engine(models["tiny-llama"], models["tiny-llama-draft"], placement="gpu")
  assert jax.devices()[0].platform == "cpu"
