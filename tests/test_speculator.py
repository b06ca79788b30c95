"""The speculator in a process of its own: exactness through the process path (greedy and
statistical), identical samples to the in-process path, its lifetime (normal end, a speculator
that dies, a parent that dies, Ctrl-C), a speculator another "host" runs, and the CLI's default
layout. Every process a test starts is stopped by the test, also when it fails."""

import contextlib
import dataclasses
import glob
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import exact
import jax
import numpy as np
import pytest

from ssd_jax import ChannelError, Engine, Placement, Sampling
from ssd_jax.config import SpecConfig
from ssd_jax.decode.state import Outcome, Report
from ssd_jax.models.registry import LoadedModel, load_model
from ssd_jax.models.weights import save_hf
from ssd_jax.runtime.requests import Request
from ssd_jax.speculator import auth, handshake
from ssd_jax.speculator.base import Join, Reshape, seed_data
from ssd_jax.speculator.channel import (
  OUTCOME_FIELDS,
  PROTOCOL,
  Connection,
  RefusedError,
  SharedMemoryPipe,
)
from ssd_jax.speculator.process import SpeculatorOptions, SpeculatorProcess, _stop
from ssd_jax.speculator.remote import RemoteSpeculator
from ssd_jax.timing import NullTimer, count_compiles

pytestmark = pytest.mark.skipif(
  (os.cpu_count() or 1) < 2, reason="a speculator process needs a core of its own"
)

PROMPTS = [[5, 17, 99, 3, 42, 8, 8, 120], [7, 1], [200, 201, 202, 203, 204]]
CORE = (1,)
# Seconds to wait for an event (a process gone, an error raised, an exit) before calling it a
# hang: only a hang takes this long, and no test here is about how fast anything happens.
HANG = 120


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


def gone(pid: int, within: float = HANG) -> bool:
  """Whether process `pid` is gone (reaped, if it is our child), waiting for it up to `within`
  seconds."""
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
  monkeypatch.setattr(jax, "device_get", lambda x: reads.append(x) or device_get(x))
  with jax.transfer_guard_device_to_host("disallow"):
    out = run()
  assert out.metrics.loop_rounds >= 4
  # One read per round, of one array (the packed report), and nothing after the loop.
  assert len(reads) == out.metrics.loop_rounds, (len(reads), out.metrics.loop_rounds)
  assert all(isinstance(r, jax.Array) for r in reads), [type(r) for r in reads]


def test_eos_and_budgets_through_a_process(models):
  """EOS mid-stream in some rows, per-row budgets, ragged prompts: every row is AR's tokens cut
  at its first EOS or its budget, exactly (a truncated or empty row fails)."""
  target = models["tiny-llama"]
  budgets = [30, 4, 11]
  free = Engine(target).generate(PROMPTS, max_new_tokens=max(budgets), ignore_eos=True).tokens
  eos = free[0][5]  # row 0 emits it at step 5; the others maybe later or never
  stopping = dataclasses.replace(
    target, config=dataclasses.replace(target.config, eos_token_ids=(eos,))
  )
  spec = SpecConfig(mode="ssd", lookahead=3, fan_out=(2, 2, 1, 1))
  draft = models["tiny-llama-draft"]
  with Engine(stopping, draft, placement=Placement(kind="process", cores=CORE)) as engine:
    out = engine.generate(PROMPTS, spec=spec, max_new_tokens=budgets)
  for row, (tokens, budget) in enumerate(zip(out.tokens, budgets, strict=True)):
    expected = free[row][:budget]
    if eos in expected:
      expected = expected[: expected.index(eos) + 1]
    assert tokens == expected, row
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


@pytest.mark.parametrize("pipe", ["shm", "transfer"])
def test_rounds_served_on_the_targets_side_need_no_program_of_their_own(models, pipe):
  """A speculation served from the sent cache and one the speculator answers are verified by
  the same compiled program of the target: after a run with an unrelated draft (whose cache
  practically never holds every row's outcome, so the speculator answers every round), a run
  with the target as its own draft, which serves most rounds here, compiles nothing in this
  process (the target's programs do not depend on the draft)."""
  jax.clear_caches()  # programs an earlier test compiled must not stand in for a new one
  target = models["tiny-llama"]
  spec = SpecConfig(mode="ssd", lookahead=3, fan_out=(2, 2, 1, 1))
  placement = Placement(kind="process", cores=CORE, pipe=pipe)

  def run(draft):
    with Engine(target, draft, placement=placement) as engine:
      engine.start_speculator()
      with count_compiles() as compiles:
        out = engine.generate(PROMPTS, spec=spec, max_new_tokens=20, ignore_eos=True, capacity=64)
    return out.metrics.extra["rounds_served_by_target"], compiles

  assert run(models["tiny-llama-draft"])[0] == 0
  served, compiles = run(load_model("tiny-llama"))
  assert served > 0
  assert compiles == []


@pytest.fixture(scope="module")
def exact_pair(tmp_path_factory):
  """The statistical tests' tiny pair, saved so that a speculator process can load the draft."""
  target, draft = exact.tiny_pair()
  path = tmp_path_factory.mktemp("exact-draft")
  save_hf(path, draft.config, draft.params)
  return target, load_model(str(path))


def exact_z(target, draft, placement, spec, sampling) -> tuple[float, float]:
  """The z of 50,000 decodes of the statistical tests' prompt (3 tokens) against the target's
  law (see tests/exact.py), and the run's hit rate after its first round."""
  with Engine(target, draft, placement=placement) as engine:
    out = engine.generate(
      [exact.PROMPT] * 50_000, spec=spec, sampling=sampling, max_new_tokens=3, capacity=24
    )
  law = exact.exact_law(target, exact.PROMPT, 3, sampling)
  z = exact.fit_z(exact.counts(out.tokens, 3), law)
  print(f"z = {z:.2f}")  # seen with -s
  return z, out.metrics.later_hit_rate


def ssd_spec(fan_out, backup="neural") -> SpecConfig:
  return SpecConfig(mode="ssd", lookahead=len(fan_out) - 1, fan_out=fan_out, backup=backup)


@pytest.mark.statistical
@pytest.mark.parametrize(
  ("fan_out", "backup"),
  [((exact.V - 1, exact.V), "neural"), ((1, 1), "fast"), ((2, 2, 2), "neural")],
)
def test_ssd_through_a_process_is_exact(exact_pair, fan_out, backup):
  process = Placement(kind="process", cores=CORE)
  z, hit_rate = exact_z(*exact_pair, process, ssd_spec(fan_out, backup), Sampling(temperature=1.0))
  assert z < exact.Z_MAX, z
  assert hit_rate > 0


@pytest.mark.statistical
def test_ssd_through_a_process_negative_control_fails(exact_pair, monkeypatch):
  """The first case above with q lost on every other row on its way from the speculator (the
  target's copy out of shared memory zeroes it: a strided copy, say). Those rows' draft tokens
  are then verified as if q(x) were 1 and their residual is p. Seed 0, N = 50,000: the mutant
  reaches z = 94.5, the correct path z = 0.21."""
  unpack = SharedMemoryPipe.unpack

  def losing_q(self, header):
    arrays = unpack(self, header)
    if "probs" in arrays:
      arrays["probs"][1::2] = 0.0
    return arrays

  monkeypatch.setattr(SharedMemoryPipe, "unpack", losing_q)
  process = Placement(kind="process", cores=CORE)
  spec = ssd_spec((exact.V - 1, exact.V))
  z, _ = exact_z(*exact_pair, process, spec, Sampling(temperature=1.0))
  assert z > 3 * exact.Z_MAX, z


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
      killed.append(pid)

  pipe = engine.site.process().pipe
  # The error is the event: a run that hung instead would end only at the channel's timeout
  # (STEP_TIMEOUT), with another message.
  try:
    with pytest.raises(
      ChannelError, match=f"speculator \\(pid {pid}\\) was killed by SIGKILL \\(exit status -9\\)"
    ) as error:
      engine.generate(PROMPTS[:1], spec=spec, max_new_tokens=400, on_tokens=kill_after_a_few_tokens)
    segments = [*pipe._out.values(), *pipe._mapped.values()]
    assert len(segments) >= 2  # the target's and the killed speculator's
  finally:
    engine.close()
  assert killed and gone(pid)
  # Nothing of the killed process is left in /dev/shm, and its resource tracker had nothing to
  # warn about (the error quotes the speculator's last output).
  assert not [s.name for s in segments if os.path.exists(f"/dev/shm/{s.name}")]
  assert "leaked" not in str(error.value)
  # The engine starts a fresh speculator for the next run.
  try:
    assert len(engine.generate(PROMPTS[:1], spec=spec, max_new_tokens=6).tokens[0]) == 6
  finally:
    engine.close()


class _Wire:
  """The target's end of a connection in one process: what it sends is kept, and what it
  receives is queued in advance."""

  def __init__(self, answers):
    self.sent, self.answers = [], list(answers)
    self.session_open = False

  def send(self, message):
    self.sent.append(message)

  def receive(self, timeout=None, spin=None):
    return self.answers.pop(0)


def test_a_round_served_here_keeps_its_outcome_until_the_speculator_reads_it():
  """A round whose every row hits is served on the target's side, which sends its outcome and
  waits for no answer; a reshape's joins may then follow before the speculator has copied that
  outcome out of shared memory. They must not overwrite it (in one segment they did: the
  speculator read the joins as the outcome, missed, answered a speculation nobody waited for,
  and the next call failed with "expected the speculator's reshaped, got 'speculation'")."""
  here, there = SharedMemoryPipe(), SharedMemoryPipe()  # the target's and the speculator's
  try:
    cache = {  # one row, two branches; the second is the outcome's
      "keys": np.array([[7, 8]], np.int32),
      "depth": np.array([[2, 2]], np.int32),
      "tokens": np.array([[[1, 2], [3, 4]]], np.int32),
      "valid": np.ones((1, 2), bool),
    }
    reshaped = {
      "tokens": np.zeros((1, 3), np.int32),
      "point_mass": np.zeros(1, bool),
      "hit": np.zeros(1, bool),
    }
    wire = _Wire(
      [
        {"op": "cache", "arrays": there.pack(cache, slot="cache")},
        {"op": "reshaped", "arrays": there.pack(reshaped, slot="speculation")},
      ]
    )
    plans = {(1, True): dataclasses.make_dataclass("Plan", [("greedy", bool)])(True)}
    remote = RemoteSpeculator(wire, here, plans, NullTimer())
    remote.batch_size, remote.greedy = 1, True
    outcome = Outcome.of(
      accepted=np.array([2], np.int32),
      bonus=np.array([8], np.int32),
      committed=np.array([3], np.int32),
      done=np.array([False]),
    )
    report = Report.pack(  # a round's report: its outcome and the rest, in one array
      tokens=np.array([[8, 0, 0]], np.int32),
      count=np.array([1], np.int32),
      hit=np.array([True]),
      drafted=np.bool_(False),
      outcome=outcome,
    )
    speculation, _ = remote.next(report)
    assert remote.served_here == 1 and speculation.tokens.tolist() == [[8, 3, 4]]
    join = Join(
      slot=0,
      tokens=np.full((1, 16), 99, np.int32),
      length=16,
      max_new=5,
      temperature=0.5,
      top_k=0,
      top_p=1.0,
      seed=seed_data(1),
    )
    remote.reshape(Reshape(index=None, free=None, joins=(join,), greedy=True, bulk=False))
    # Only now does the speculator read the round's outcome.
    assert [m["op"] for m in wire.sent] == ["next", "reshape"]
    read = there.unpack(wire.sent[0]["arrays"])
    for name in OUTCOME_FIELDS:
      np.testing.assert_array_equal(read[name], getattr(outcome, name), err_msg=name)
  finally:
    here.close()
    there.close()


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


def test_a_second_session_on_one_speculator_is_refused_until_the_first_closes(process_engine, ar):
  """A speculator process serves one session at a time: a second one opened beside it (a
  `generate` while a server's session runs, say) is refused with a clear error instead of
  mixing its messages with the first's ("expected the speculator's opened, got 'cache'"); the
  first session still decodes exactly, and once it is closed the engine decodes again."""
  spec = SpecConfig(mode="ssd", lookahead=3, fan_out=(2, 2, 1, 1))
  session = process_engine.session(spec, max_batch_size=1, max_model_len=64)
  try:
    with pytest.raises(RuntimeError, match="one session at a time"):
      process_engine.generate(PROMPTS, spec=spec, max_new_tokens=20, ignore_eos=True)
    handle = session.submit(Request(prompt=PROMPTS[0], max_new_tokens=20, ignore_eos=True))
    session.run()
    assert handle.result() == ar[0]
  finally:
    session.close()
  out = process_engine.generate(PROMPTS, spec=spec, max_new_tokens=20, ignore_eos=True)
  assert out.tokens == ar


def test_after_warm_up_neither_process_compiles_as_requests_come_and_go(process_engine):
  """A session's warm-up compiles every program both processes may run: requests of mixed
  prompt lengths, sampling settings and budgets, arriving while the session's thread runs
  rounds (joining and leaving across batch sizes, some cancelled), then compile nothing here
  and nothing in the speculator (which counts its own). Its warm-up once missed rows moving
  between batch sizes after a join, whose pending speculation a program had left on the
  device: a soak found it compiling there, and with that warm-up this test fails (the
  speculator counts 1)."""
  rng = np.random.default_rng(0)
  session = process_engine.session(SpecConfig(mode="ssd"), max_batch_size=4, max_model_len=160)
  try:
    session.warm_up()
    with count_compiles() as compiles:
      session.start()
      handles = []
      for i in range(40):
        request = Request(
          prompt=rng.integers(0, 256, rng.integers(1, 100)).tolist(),
          sampling=Sampling(temperature=(0.0, 0.7)[i % 2]),
          max_new_tokens=int(rng.integers(1, 33)),
          seed=i,
        )
        handles.append(session.submit(request))
        if i % 7 == 3:
          session.cancel(handles[-2])
        while len(session.waiting()) >= 4:
          time.sleep(0.01)
      for handle in handles:
        handle.result(timeout=HANG)
  finally:
    speculator = session.close()
  assert not compiles, len(compiles)
  assert speculator.compiles == 0


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


class _InterruptedListener:
  """A listener whose wait for the speculator's connection meets a Ctrl-C."""

  def __init__(self, listener: socket.socket):
    self.listener = listener

  def getsockname(self):
    return self.listener.getsockname()

  def settimeout(self, seconds):
    pass

  def accept(self):
    raise KeyboardInterrupt

  def close(self):
    self.listener.close()


def test_a_ctrl_c_while_the_speculator_starts_leaves_no_process_and_no_log(monkeypatch):
  """A Ctrl-C while the child starts (before it connected: it is still importing JAX) kills it
  and removes its log. Left running, it found the listener closed, died and kept its log."""
  started, popen, create_server = [], subprocess.Popen, socket.create_server
  logs = lambda: set(glob.glob(os.path.join(tempfile.gettempdir(), "ssd_jax-speculator-*.log")))
  before = logs()
  monkeypatch.setattr(
    subprocess, "Popen", lambda *a, **k: started.append(popen(*a, **k)) or started[-1]
  )
  monkeypatch.setattr(socket, "create_server", lambda *a: _InterruptedListener(create_server(*a)))
  with pytest.raises(KeyboardInterrupt):
    SpeculatorProcess(SpeculatorOptions(draft="tiny-llama-draft"), jax.devices()[0])
  [child] = started
  assert child.returncode is not None  # killed and reaped, not left to start
  assert logs() == before


_PARENT = """
import json, os, sys, time, jax
jax.config.update("jax_num_cpu_devices", 2)
from ssd_jax import Engine, Placement, SpecConfig, load_model
engine = Engine(load_model("tiny-llama"), load_model("tiny-llama-draft"),
                placement=Placement(kind="process", cores=(1,)))
spec = SpecConfig(mode="ssd", lookahead=2, fan_out=(1, 1, 1))
engine.generate([[1, 2, 3]], spec=spec, max_new_tokens=4)
process = engine.site.process()
segments = [s.name for s in (*process.pipe._out.values(), *process.pipe._mapped.values())]
print(json.dumps([process.pid, segments]), flush=True)
if sys.argv[1] == "hang":
  time.sleep(600)
else:
  engine.generate([[1, 2, 3]], spec=spec, max_new_tokens=8_000, ignore_eos=True, capacity=8192)
  sys.exit("the decode ended before the interrupt")
"""


@contextlib.contextmanager
def sigint_at_its_default():
  """Children started here begin with SIGINT at its default, as a terminal's foreground job
  does. A suite started in the background of a non-interactive shell (`sh -c '... &'`) ignores
  SIGINT, which children inherit, and Python then installs no KeyboardInterrupt handler: a
  Ctrl-C test would send a signal that nothing can hear. (A handler, unlike an ignored signal,
  is reset to the default in the child.)"""
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize(("how", "what"), [("kill", "hang"), ("interrupt", "decode")])
def test_the_speculator_never_outlives_its_parent(how, what):
  """SIGKILL to an idle parent (nothing can clean up) and Ctrl-C to a decoding one. Neither
  leaves a shared-memory segment behind (after a SIGKILL the speculator unlinks the parent's)."""
  with sigint_at_its_default():
    parent = subprocess.Popen(
      [sys.executable, "-c", _PARENT, what],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
  pid = None
  try:
    pid, segments = json.loads(parent.stdout.readline())
    assert len(segments) >= 2  # the parent's and the speculator's
    sig = signal.SIGKILL if how == "kill" else signal.SIGINT
    os.kill(parent.pid, sig)
    # Ended by the signal (an uncaught KeyboardInterrupt ends Python by SIGINT), not otherwise.
    assert parent.wait(timeout=HANG) == -sig, parent.stderr.read()
    assert gone(pid), f"speculator {pid} outlived its parent"
    assert not [n for n in segments if os.path.exists(f"/dev/shm/{n}")]
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


def _token_file(folder, name: str = "token") -> str:
  path = folder / name
  path.write_text(secrets.token_hex(32) + "\n")
  path.chmod(0o600)
  return str(path)


class _Listener:
  """A `python -m ssd_jax.speculator --listen 127.0.0.1:PORT` and its log (stdout and stderr)."""

  def __init__(self, process: subprocess.Popen, address: str, log, token: str | None = None):
    self.process, self.address, self.log, self.token = process, address, log, token

  def output(self, since: int = 0) -> str:
    """The log from character `since` on (`mark()`: what one test made it say)."""
    return self.log.read_text(errors="replace")[since:]

  def mark(self) -> int:
    return len(self.output())

  def wait_for(self, text: str, count: int = 1, since: int = 0, within: float = 60) -> str:
    """The log (from `since`) once `text` appears `count` times in it (a hang guard only, not a
    speed bound)."""
    deadline = time.monotonic() + within
    while (out := self.output(since)).count(text) < count:
      assert self.process.poll() is None, f"the speculator exited:\n{out}"
      assert time.monotonic() < deadline, f"no {text!r} x{count} in the speculator's log:\n{out}"
      time.sleep(0.1)
    return out


@contextlib.contextmanager
def _listening(folder, *flags: str):
  """A listening speculator on a free loopback port with `flags`, killed at the end (also when
  the test fails). Its environment has no token but what the flags give it."""
  port = _free_port()
  log = folder / f"speculator-{port}.log"
  env = {k: v for k, v in os.environ.items() if k != auth.TOKEN_ENV}
  with log.open("w") as out:
    process = subprocess.Popen(
      [sys.executable, "-m", "ssd_jax.speculator", "--listen", f"127.0.0.1:{port}", *flags],
      stdin=subprocess.DEVNULL,
      stdout=out,
      stderr=subprocess.STDOUT,
      env=env,
    )
  try:
    listener = _Listener(process, f"127.0.0.1:{port}", log, token=_flag(flags, "--token-file"))
    listener.wait_for("listening", within=300)
    yield listener
  finally:
    process.kill()
    process.wait()


def _flag(flags, name: str) -> str | None:
  return flags[flags.index(name) + 1] if name in flags else None


def _remote(models, address: str, token_file: str | None = None, draft: str = "tiny-llama-draft"):
  draft_model = models[draft] if draft in models else load_model(draft)
  placement = Placement(address=address, token_file=token_file)
  return Engine(models["tiny-llama"], draft_model, placement=placement)


def _local_tokens(models) -> list[list[int]]:
  """Greedy ssd with the draft on a device of this process: what a speculator must reproduce."""
  engine = Engine(models["tiny-llama"], models["tiny-llama-draft"], placement="device")
  return engine.generate(PROMPTS, spec=REMOTE_SPEC, max_new_tokens=20, ignore_eos=True).tokens


REMOTE_SPEC = SpecConfig(mode="ssd", lookahead=3, fan_out=(2, 2, 1, 1))


def test_a_speculator_another_host_runs(models, ar, tmp_path):
  """Two local processes on 127.0.0.1: one listens (python -m ssd_jax.speculator --listen, with
  a token and one draft), the target connects to it with the same token; arrays move on
  jax.experimental.transfer. It decodes exactly as the draft on a device of this process."""
  token = _token_file(tmp_path)
  flags = ("--draft", "tiny-llama-draft", "--token-file", token, "--once")
  with _listening(tmp_path, *flags) as server:
    with _remote(models, server.address, token) as engine:
      assert engine.site.options.pipe == "transfer"
      assert engine.site.child_pid is None  # not this process's child: its memory is its host's
      out = engine.generate(PROMPTS, spec=REMOTE_SPEC, max_new_tokens=20, ignore_eos=True)
    assert out.tokens == _local_tokens(models) == ar
    assert server.process.wait(timeout=60) == 0  # --once: it exits after its target said bye


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
  """One listening speculator for the tests of what it lets in: a token, one draft."""
  folder = tmp_path_factory.mktemp("guarded")
  token = _token_file(folder)
  with _listening(folder, "--draft", "tiny-llama-draft", "--token-file", token) as server:
    yield server


def _closed_by_peer(sock: socket.socket, within: float = 30) -> bytes:
  """What the speculator sent before closing `sock` (a hang guard: fails if it stays open)."""
  sock.settimeout(within)
  received = b""
  with contextlib.suppress(ConnectionResetError):
    while chunk := sock.recv(1 << 16):
      received += chunk
  return received


def test_a_wrong_or_missing_token_is_refused_by_the_speculator(models, guarded):
  """Nothing is loaded for a target that does not prove the token: each is refused, saying so on
  both ends, and the listener goes on."""
  mark = guarded.mark()
  with pytest.raises(RefusedError, match="asks for a token and the target sent none: give the"):
    _remote(models, guarded.address).start_speculator()
  other = _token_file(guarded.log.parent, "another-token")
  with pytest.raises(RefusedError, match="the target's token is not this speculator's"):
    _remote(models, guarded.address, other).start_speculator()
  out = guarded.wait_for("refused", count=2, since=mark)
  assert "sent none" in out and "is not this speculator's" in out
  assert "serving" not in out  # no draft loaded for either


def test_a_draft_the_speculator_does_not_serve_is_refused(models, guarded, tmp_path):
  """A target with the token that asks for another draft (a registry name, or a path) is refused
  by name, and nothing is loaded."""
  mark = guarded.mark()
  with pytest.raises(RefusedError, match="draft 'tiny-llama' is not served here: this speculator "):
    _remote(models, guarded.address, guarded.token, draft="tiny-llama").start_speculator()
  draft = models["tiny-llama-draft"]
  save_hf(tmp_path / "copy", draft.config, draft.params)  # the same weights, not a served path
  with pytest.raises(RefusedError, match="copy' is not served here: this speculator serves tiny"):
    _remote(models, guarded.address, guarded.token, draft=str(tmp_path / "copy")).start_speculator()
  assert "serving" not in guarded.wait_for("is not served here", count=2, since=mark)


def test_the_target_refuses_a_speculator_without_its_token(models, tmp_path):
  """A target that holds a token refuses a speculator that runs without one."""
  token = _token_file(tmp_path)
  with _listening(tmp_path, "--draft", "tiny-llama-draft") as server:
    server.wait_for("no token: any process that reaches")
    with pytest.raises(RefusedError, match="runs without a token but this target holds one"):
      _remote(models, server.address, token).start_speculator()
    out = server.wait_for("dropped")
    assert "the peer closed the connection" in out and "serving" not in out


def test_the_target_refuses_a_speculator_that_cannot_prove_the_token(models, tmp_path):
  """A peer that says it holds a token, and takes the target's proof, but cannot prove its own:
  the target sends it nothing more (no draft, no transfer address)."""
  listener = socket.create_server(("127.0.0.1", 0))
  received = []

  def pose_as_a_speculator():
    sock, _ = listener.accept()
    conn = Connection(sock)
    try:
      received.append(conn.receive(timeout=60))
      challenge = {"op": "challenge", "protocol": PROTOCOL, "token": True}
      conn.send(challenge | {"challenge": auth.new_challenge()})
      received.append(conn.receive(timeout=60))
      conn.send({"op": "proof", "proof": "0" * 64})
      while True:
        received.append(conn.receive(timeout=60))
    except ChannelError as e:
      received.append(e)
    finally:
      conn.close()

  thread = threading.Thread(target=pose_as_a_speculator, daemon=True)
  thread.start()
  address = f"127.0.0.1:{listener.getsockname()[1]}"
  try:
    with pytest.raises(RefusedError, match="did not prove it holds this target's token"):
      _remote(models, address, _token_file(tmp_path)).start_speculator()
    thread.join(timeout=60)
  finally:
    listener.close()
  hello, proof, *after = received
  assert hello["op"] == "hello" and hello["token"] is True and proof["op"] == "proof"
  assert len(after) == 1 and isinstance(after[0], ChannelError), after  # hung up: no load


def test_a_listener_drops_what_is_not_a_target_and_serves_the_next(models, guarded):
  """Garbage, a line over the size limit, invalid JSON, another operation, a half-sent hello and
  a silent connection each end with a log line; the next good target decodes exactly, while the
  silent and half-sent ones are still open, and those are dropped within seconds."""
  address = ("127.0.0.1", int(guarded.address.rpartition(":")[2]))
  silent, half = socket.create_connection(address), socket.create_connection(address)
  half.sendall(b'{"op": "hello", "proto')
  mark = guarded.mark()
  try:
    sent = [
      bytes(range(256)) * 4 + b"\n",
      b"x" * (1 << 16),
      b"{not json\n",
      b"[1, 2, 3]\n",
      b'{"op": "shutdown"}\n',
    ]
    for data in sent:
      with socket.create_connection(address) as sock:
        with contextlib.suppress(ConnectionError):  # it may close before all is sent
          sock.sendall(data)
        answer = _closed_by_peer(sock)
        assert data != sent[-1] or b"expected the target's hello" in answer, answer
    with _remote(models, guarded.address, guarded.token) as engine:
      out = engine.generate(PROMPTS, spec=REMOTE_SPEC, max_new_tokens=20, ignore_eos=True)
    assert out.tokens == _local_tokens(models)
    assert _closed_by_peer(silent) == b"" and _closed_by_peer(half) == b""
  finally:
    silent.close()
    half.close()
  log = guarded.wait_for("is done", since=mark)
  assert log.count("dropped") + log.count("refused") == len(sent) + 2, log
  assert "longer than 4096 bytes" in log and "not JSON" in log and "not an object" in log
  assert log.count("the handshake did not complete within 5 s") == 2, log


def test_listening_beyond_loopback_needs_a_token(tmp_path):
  """Refused at start-up, before anything listens, with how to make a token."""
  env = {k: v for k, v in os.environ.items() if k != auth.TOKEN_ENV}
  speculator = [sys.executable, "-m", "ssd_jax.speculator", "--draft", "tiny-llama-draft"]
  port = str(_free_port())
  proc = subprocess.run(
    [*speculator, "--listen", f"0.0.0.0:{port}"],
    capture_output=True,
    text=True,
    timeout=300,
    env=env,
  )
  assert proc.returncode == 2, proc.stderr
  assert "refusing to listen on 0.0.0.0:" in proc.stderr and "without a token" in proc.stderr
  assert "secrets.token_hex(32)" in proc.stderr and "--token-file" in proc.stderr
  short = tmp_path / "short"
  short.write_text("secret")
  proc = subprocess.run(
    [*speculator, "--listen", f"0.0.0.0:{port}", "--token-file", str(short)],
    capture_output=True,
    text=True,
    timeout=300,
    env=env,
  )
  assert proc.returncode == 2 and "a token needs at least 32 characters" in proc.stderr


def test_the_engines_own_speculator_gets_a_fresh_token_off_its_command_line(process_engine):
  """A child speculator: a secret of its own through its environment (`ps` shows a command line,
  which names only its one draft)."""
  link = process_engine.site.process()
  with open(f"/proc/{link.pid}/cmdline", "rb") as f:
    command = f.read().split(b"\0")
  with open(f"/proc/{link.pid}/environ", "rb") as f:
    environment = f.read().split(b"\0")
  assert link.token and all(link.token.encode() not in part for part in command)
  assert f"{auth.TOKEN_ENV}={link.token}".encode() in environment
  assert command[command.index(b"--draft") + 1] == b"tiny-llama-draft"
  # Its pid as this process knows it (what the serving bench's soak reads the memory of).
  assert process_engine.site.child_pid == link.pid == link.process.pid


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


def test_proofs_bind_the_token_the_role_and_both_challenges():
  token, other = secrets.token_hex(32), secrets.token_hex(32)
  sc, tc = auth.new_challenge(), auth.new_challenge()
  proof = auth.prove(token, "target", sc, tc)
  assert auth.verify(token, "target", sc, tc, proof)
  assert token not in proof and len(proof) == 64
  assert not auth.verify(other, "target", sc, tc, proof)
  assert not auth.verify(token, "speculator", sc, tc, proof)  # not reflected as the other end's
  assert not auth.verify(token, "target", auth.new_challenge(), tc, proof)  # nor replayed
  assert not auth.verify(token, "target", sc, tc, None)
  assert not auth.verify(token, "target", sc, tc, "é" * 64)


def test_a_speculator_serves_names_and_resolved_paths_only(tmp_path):
  served, other = tmp_path / "served", tmp_path / "other"
  served.mkdir()
  other.mkdir()
  (tmp_path / "link").symlink_to(served)
  known = ["tiny-llama", "tiny-llama-draft"]
  drafts = auth.Drafts.of(["tiny-llama-draft", str(served)], known=known)
  assert drafts.find("tiny-llama-draft") == "tiny-llama-draft"
  for spelling in (served, tmp_path / "link", other / ".." / "served"):
    assert drafts.find(str(spelling)) == str(served.resolve())
  for refused in ("tiny-llama", str(other), "", None, 7, "a\0b", "x" * 5000):
    assert drafts.find(refused) is None, refused
  with pytest.raises(ValueError, match="neither a registry name nor a path that exists"):
    auth.Drafts.of([str(tmp_path / "missing")], known=[])


def test_a_load_request_is_checked_field_by_field():
  drafts = auth.Drafts.of(["tiny-llama-draft"], known=["tiny-llama-draft"])
  good = {"draft": "tiny-llama-draft", "dtype": "float32", "draft_vocab": 8, "pipe": "shm"}
  assert handshake.request(good, drafts, "127.0.0.1").draft == "tiny-llama-draft"
  transfer = good | {"pipe": "transfer", "transfer_address": "127.0.0.1:4000"}
  assert handshake.request(transfer, drafts, "127.0.0.1").transfer_address == "127.0.0.1:4000"
  for change, peer, message in [
    ({"transfer_address": "10.1.2.3:4000"}, "127.0.0.1", "not the target's own address"),
    ({"transfer_address": "127.0.0.1:0"}, "127.0.0.1", "not the target's own address"),
    ({"transfer_address": None}, "127.0.0.1", "not the target's own address"),
    ({"pipe": "shm"}, "10.1.2.3", "shared memory needs the target on this host"),
    ({"dtype": "int8"}, "127.0.0.1", "dtype must be one of"),
    ({"draft_vocab": [1, "2"]}, "127.0.0.1", "draft_vocab must be"),
    ({"pipe": "carrier pigeon"}, "127.0.0.1", "pipe must be shm or transfer"),
  ]:
    with pytest.raises(ValueError, match=message):
      handshake.request(transfer | change, drafts, peer)


def test_a_token_needs_an_address_and_a_listener_beyond_loopback_needs_a_token(tmp_path):
  with pytest.raises(ValueError, match="a token file is for a speculator at an address"):
    Placement(kind="process", token_file=str(tmp_path / "token"))
  assert all(auth.is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "localhost", "[::1]", "::1"))
  assert not any(auth.is_loopback(h) for h in ("0.0.0.0", "", "10.0.0.1", "::", "example.org"))
  with pytest.raises(ValueError, match="cannot read it"):
    auth.read_token(tmp_path / "missing")


def test_a_target_takes_its_token_from_a_file_or_the_environment(models, tmp_path, monkeypatch):
  """Read when the engine is built (a missing or short token fails then, before any run); a file
  others may read is warned about; never part of the options' repr."""
  token = secrets.token_hex(32)
  monkeypatch.setenv(auth.TOKEN_ENV, f"  {token}\n")
  engine = Engine(models["tiny-llama"], models["tiny-llama-draft"], placement="127.0.0.1:7100")
  assert engine.site.options.token == token and token not in repr(engine.site.options)
  loose = tmp_path / "loose"
  loose.write_text(token)
  loose.chmod(0o644)
  with pytest.warns(UserWarning, match=f"can be read by other users: chmod 600 {loose}"):
    assert auth.read_token(loose) == token
  monkeypatch.setenv(auth.TOKEN_ENV, "short")
  with pytest.raises(ValueError, match="SSD_JAX_SPECULATOR_TOKEN: a token needs at least 32"):
    _remote(models, "127.0.0.1:7100")


@pytest.mark.statistical
def test_a_speculator_another_host_runs_is_exact(exact_pair, tmp_path):
  """The remote path at T > 0 with top-k: q crosses on jax.experimental.transfer (the process
  tests' shared memory is not on this path), hits and neural backups both frequent."""
  target, draft = exact_pair
  token = _token_file(tmp_path)
  flags = ("--draft", draft.source, "--token-file", token, "--once")
  with _listening(tmp_path, *flags) as server:
    placement = Placement(address=server.address, token_file=token)
    spec = ssd_spec((2, 2, 2))
    z, hit_rate = exact_z(target, draft, placement, spec, Sampling(temperature=0.8, top_k=5))
    assert server.process.wait(timeout=HANG) == 0
  assert z < exact.Z_MAX, z
  assert 0 < hit_rate < 1


def test_the_cli_runs_with_a_speculator_another_host_runs(tmp_path):
  """`python -m ssd_jax.run --speculator HOST:PORT` against a listening speculator: ssd's
  rounds go through it (it serves this one target, then exits), greedy outputs equal ar's and
  sd's, and nothing compiles after the warm-up on either side."""
  out, token = tmp_path / "run.json", _token_file(tmp_path)
  with _listening(
    tmp_path, "--draft", "tiny-llama-draft", "--token-file", token, "--once"
  ) as server:
    address = server.address
    proc = subprocess.run(
      [
        *(sys.executable, "-m", "ssd_jax.run", "--speculator", address, "--json", str(out)),
        *("--speculator-token-file", token),
        *("--target", "tiny-llama", "--draft", "tiny-llama-draft", "--target-cores", "1"),
        *("--max-new-tokens", "12", "--ignore-eos", "--num-prompts", "2", "--no-progress"),
      ],
      capture_output=True,
      text=True,
      timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert server.process.wait(timeout=HANG) == 0, server.output()
    served = server.output()
  assert "serving 127.0.0.1:" in served, served
  result = json.loads(out.read_text())
  assert address in result["layout"]["ssd"]["ran_on"], result["layout"]
  assert result["greedy_outputs_identical"] is True
  assert result["modes"]["ssd"]["compiles_after_warmup"] == 0  # both sides warm
  assert result["modes"]["ssd"]["generated_tokens"] == 24


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


# A run that decodes for a while: one bundled prompt (367 tokens) and 7,000 new tokens fit the
# tiny models' context of 8,192 positions (a budget beyond it is a usage error, exit status 2,
# which a fast start reaches before any Ctrl-C).
_LONG_TINY_SSD_RUN = [
  *("--mode", "ssd", "--target", "tiny-llama", "--draft", "tiny-llama-draft"),
  *("--max-new-tokens", "7000", "--ignore-eos", "--num-prompts", "1", "--target-cores", "1"),
]


def test_ctrl_c_to_the_cli_stops_it_and_its_speculator_cleanly():
  """Ctrl-C as a terminal sends it (SIGINT to the whole process group) to a decoding
  `python -m ssd_jax.run`: exit status 130, one line saying so and no traceback, the
  speculator gone."""
  before = speculator_pids()
  with sigint_at_its_default():
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
    _, err = proc.communicate(timeout=HANG)
    assert proc.returncode == 130, err
    assert "python -m ssd_jax.run: interrupted" in err and "Traceback" not in err, err
    assert all(gone(pid) for pid in spawned)
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
