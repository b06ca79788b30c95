"""The command line on tiny random models: every mode, JSON fields, chat over stdin, errors."""

import io
import json
import math
import os
import re
import secrets
import subprocess
import sys
import time
from dataclasses import fields

import numpy as np
import pytest

from ssd_jax import Engine, Sampling, SpecConfig, load_model, run
from ssd_jax.cli import arguments
from ssd_jax.cli.chat import chat_loop
from ssd_jax.harness import compare
from ssd_jax.harness import runs as harness
from ssd_jax.models import registry

# In this process JAX already runs, so the CLI's default layout (a pinned speculator process,
# tested through real processes in test_speculator.py) cannot apply: place the draft here.
TINY = [
  "--target",
  "tiny-llama",
  "--draft",
  "tiny-llama-draft",
  "--no-progress",
  "--draft-placement",
  "device",
]


def tiny(argv: list[str]) -> list[str]:
  """TINY for `argv`: without --draft-placement where no ssd runs (a flag no mode of the run
  reads is refused)."""
  mode = argv[argv.index("--mode") + 1] if "--mode" in argv else "all"
  keep = TINY if mode in ("ssd", "all") else TINY[:-2]
  return [*keep, *argv]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
  path = tmp_path_factory.mktemp("run") / "out.json"
  code = run.main(
    [
      *TINY,
      "--max-new-tokens",
      "12",
      "--lookahead",
      "3",
      "--fan-out",
      "2",
      "--num-prompts",
      "3",
      "--json",
      str(path),
    ]
  )
  assert code == 0
  return json.loads(path.read_text())


def test_json_has_every_mode_and_field(result):
  assert set(result["modes"]) == {"ar", "sd", "ssd"}
  # The default beside a float32 target, and each mode's draft, resolved.
  assert result["config"]["models"]["draft_dtype"] == "float16"
  assert result["config"]["models"]["drafts"] == {
    "sd": "tiny-llama-draft",
    "ssd": "tiny-llama-draft",
  }
  for mode, m in result["modes"].items():
    for field in (
      "tokens_per_second",
      "decode_seconds",
      "generated_tokens",
      "mean_accepted_tokens_per_round",
      "acceptance_per_position",
      "verify_ms_median",
      "generated_token_ids",
    ):
      assert field in m, (mode, field)
    assert len(m["generated_token_ids"]) == 3
    assert m["generated_tokens"] == sum(map(len, m["generated_token_ids"])), mode
    assert m["compiles_after_warmup"] == 0, mode  # every timed program was warm
  ssd = result["modes"]["ssd"]
  assert 0.0 <= ssd["cache_hit_rate"] <= 1.0
  assert "draft_ms_median" in result["modes"]["sd"]
  assert "lookup_ms_median" in ssd and "expand_ms_median" in ssd
  assert 0.0 <= ssd["expand_within_verify_fraction"] <= 1.0
  p10, p50, p90 = ssd["expand_over_verify_p10_p50_p90"]
  assert 0 <= p10 <= p50 <= p90
  assert 0.0 <= ssd["cache_hit_rate_after_first_round"] <= 1.0
  assert result["greedy_outputs_identical"] is True
  assert result["environment"]["jax_version"] and result["config"]["speculation"]["lookahead"] == 3
  speed = {m: v["tokens_per_second"] for m, v in result["modes"].items()}
  assert set(result["ratios"]) == {"ssd/sd", "sd/ar", "ssd/ar"}
  assert result["ratios"]["ssd/sd"] == pytest.approx(speed["ssd"] / speed["sd"])
  assert result["ratios"]["sd/ar"] == pytest.approx(speed["sd"] / speed["ar"])


def test_table_is_printed(capsys, tmp_path):
  """A single mode's run: its table, and a JSON that claims only what was measured."""
  path = tmp_path / "ar.json"
  argv = ["--mode", "ar", "--max-new-tokens", "4", "--num-prompts", "1", "--json", str(path)]
  assert run.main(tiny(argv)) == 0
  captured = capsys.readouterr()
  assert "tok/s" in captured.out and "accepted/round" in captured.out and "sample (" in captured.out
  assert "ar on 1 bundled prompts" in captured.err  # said before it ran
  result = json.loads(path.read_text())
  assert result["ratios"] == {} and "greedy_outputs_identical" not in result
  assert "all_cores" not in result


def test_each_mode_runs_its_default_draft(monkeypatch, tmp_path, capsys):
  """Without --draft, sd and ssd each run their own default draft (one engine per draft, the
  target shared); the table and the JSON name them, and greedy outputs stay those of ar."""
  drafts = {"sd": "tiny-llama-draft", "ssd": "tiny-llama"}
  monkeypatch.setitem(registry.DEFAULT_DRAFTS, "tiny-llama", drafts)
  path = tmp_path / "out.json"
  argv = [a for a in TINY if a not in ("--draft", "tiny-llama-draft")]
  argv += ["--max-new-tokens", "8", "--num-prompts", "2", "--json", str(path)]
  assert run.main(argv) == 0
  out = json.loads(path.read_text())
  drafts = {mode: v["draft"] for mode, v in out["layout"].items()}
  assert drafts == {"ar": None, "sd": "tiny-llama-draft", "ssd": "tiny-llama"}
  # Each draft's head as that engine runs it (the tiny drafts have no ranking: the full head).
  assert {mode: v["draft_head"] for mode, v in out["layout"].items()} == {
    "ar": None,
    "sd": 264,
    "ssd": 264,
  }
  assert out["greedy_outputs_identical"] is True
  # The target as its own draft accepts every proposal: the ssd engine really ran it.
  assert out["modes"]["ssd"]["mean_accepted_tokens_per_round"] > 3.5
  assert out["modes"]["sd"]["mean_accepted_tokens_per_round"] < 3.5
  table = capsys.readouterr().out.splitlines()
  header = next(line for line in table if line.startswith("mode"))
  assert table[0].startswith("ssd / sd ") and "sd / ar" in table[0]  # the headline first
  assert "draft" in header and any("tiny-llama-draft" in line for line in table)


@pytest.mark.parametrize(
  ("flags", "expected"),
  [
    ([], ["--draft", "smollm2-135m-draft"]),  # sd's own default draft, its default head
    (["--draft-vocab", "4096"], ["--draft", "smollm2-135m-draft", "--draft-vocab", "4096"]),
    (["--draft", "tiny-llama-draft"], ["--draft", "tiny-llama-draft"]),
  ],
)
def test_sd_on_all_cores_under_mode_ssd_runs_what_mode_all_would(flags, expected):
  """`--mode ssd` has no sd of its own, yet the table's sd-on-all-cores line runs sd: with
  sd's default draft (or --draft) and the head asked for (else the draft's default), on every
  core, with no ssd flag left."""
  argv = ["--mode", "ssd", "--fan-out", "2", "--all-cores", *flags]
  config = arguments.run_config(arguments.build_parser().parse_args(argv))
  child = compare.all_cores_config(config)
  assert child.modes == ("ar", "sd") and child.layout.target_cores == "all"
  assert child.models.draft_for("sd") == expected[1]
  vocab = int(expected[3]) if "--draft-vocab" in expected else None
  assert child.models.draft_vocab == vocab
  assert child.speculation.fan_out is None and child.output.json is None


def test_another_target_needs_a_draft(capsys):
  with pytest.raises(SystemExit) as exit_info:
    run.main(["--target", "tiny-llama", "--mode", "sd", "--no-progress"])
  assert exit_info.value.code == 2
  assert "--target tiny-llama needs --draft" in capsys.readouterr().err


@pytest.mark.parametrize(
  ("argv", "message"),
  [
    (["--mode", "fast"], "invalid choice"),
    (["--fan-out-list", "1", "2"], "fan_out needs lookahead \\+ 1 = 4 entries"),
    (
      ["--fan-out-list", "1", "1", "1", "1", "--fan-out-miss-list", "2", "2", "2", "2"],
      "equal sums",
    ),
    (["--target", "no-such-model"], "unknown model 'no-such-model'"),
    (["--saguaro-c", "1.5"], "--saguaro-c must be in"),
    (["--mode", "sdd"], "invalid choice: 'sdd'"),
    (["--mode", "sd", "--speculator", "127.0.0.1:7100"], "--speculator applies only to ssd"),
    (["--speculator", "nowhere"], "must be HOST:PORT"),
    (
      ["--speculator", "127.0.0.1:7100", "--speculator-token-file", "/no/such/token"],
      "--speculator-token-file: token file /no/such/token: cannot read it .*secrets.token_hex",
    ),
    (
      ["--speculator-token-file", "tests/fixtures"],
      "--speculator-token-file: token file tests/fixtures: cannot read it",
    ),
    (["--prompts", "missing.jsonl"], "missing.jsonl"),
    (["--fan-out", "2", "--geometric"], "not allowed with argument"),
    (["--draft-vocab", "100"], "has no token ranking"),
    (["--draft-vocab", "-1"], "--draft-vocab must be >= 0"),
    (["--temperature", "nan"], "--temperature: expected a finite number"),
    (["--temperature", "inf"], "--temperature: expected a finite number"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["--top-p", "0"], "--top-p must be in \\(0, 1\\] \\(1 = off\\), got 0.0"),
    (["--top-p", "1.5"], "--top-p must be in"),
    (["--top-k", "-3"], "--top-k must be an int >= 0"),
    (["--saguaro-c", "nan"], "--saguaro-c: expected a finite number"),
    (["--max-new-tokens", "9000"], "exceed the model's context of 8192"),
    (["--batch-size", "100000", "--max-new-tokens", "4000"], "need .* GiB but"),
    (["--mode", "sd", "--fan-out-list", "1", "1", "1", "1"], "--fan-out-list applies only to ssd"),
    (["--mode", "sd", "--saguaro-c", "0.5"], "--saguaro-c applies only to ssd, which --mode sd"),
    (
      ["--mode", "sd", "--backup", "fast", "--geometric"],
      "--geometric, --backup apply only to ssd",
    ),
    (["--mode", "ar", "--lookahead", "4"], "--lookahead applies only to sd and ssd"),
    (["--mode", "ar", "--fan-out", "2"], "--fan-out applies only to ssd"),
    (["--mode", "ar", "--draft-dtype", "float16"], "--draft-dtype applies only to sd and ssd"),
    (["--draft-dtype", "float64"], "--draft-dtype: invalid choice"),
    (["--chat", "--batch-size", "4"], "--batch-size cannot be combined with --chat"),
    (["--chat", "--prompts", "humaneval"], "--prompts cannot be combined with --chat"),
    (["--acceptance-rate", "0.5"], "only apply with --geometric"),
    (["--fan-out", "300"], "fan-out of 300 forks more tokens than the draft's head scores \\(264"),
    (["--mode", "ssd", "--lookahead", "2", "--fan-out-list", "1", "0", "600"], "fan-out of 600"),
    (["--json", "/proc/no/such/dir/out.json"], "--json .*cannot write there"),
  ],
)
def test_bad_flags_exit_2_with_a_message(capsys, argv, message):
  """One line naming the flag (not 27 lines of usage first), exit status 2."""
  with pytest.raises(SystemExit) as exit_info:
    run.main(tiny(argv))
  assert exit_info.value.code == 2
  err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
  assert len(err) == 1 and re.search(message, err[0]), err
  assert err[0].startswith("python -m ssd_jax.run: error: ") and "--help" in err[0]


def _exit_2(capsys, argv) -> str:
  with pytest.raises(SystemExit) as exit_info:
    run.main([*TINY, *argv])
  assert exit_info.value.code == 2
  return capsys.readouterr().err


def test_a_speculator_token_file_is_checked_before_anything_loads(capsys, tmp_path):
  token = tmp_path / "token"
  token.write_text("short\n")
  token.chmod(0o600)
  err = _exit_2(capsys, ["--speculator", "127.0.0.1:7100", "--speculator-token-file", str(token)])
  assert "a token needs at least 32 characters, it has 5" in err and "token_hex(32)" in err
  token.write_text(secrets.token_hex(32))
  err = _exit_2(capsys, ["--speculator-token-file", str(token)])
  assert "--speculator-token-file applies only with --speculator (a speculator process" in err


@pytest.mark.parametrize("text", ["", "\n  \n\t\n"])
def test_an_empty_prompt_file_exits_2(capsys, tmp_path, text):
  path = tmp_path / "empty.jsonl"
  path.write_text(text)
  assert "has no prompts" in _exit_2(capsys, ["--prompts", str(path)])


def test_a_draft_config_missing_keys_exits_2(capsys, tmp_path):
  from ssd_jax.models.weights import save_hf  # noqa: PLC0415

  model = load_model("tiny-llama-draft")
  save_hf(tmp_path, model.config, model.params)
  config = json.loads((tmp_path / "config.json").read_text())
  del config["num_attention_heads"]
  (tmp_path / "config.json").write_text(json.dumps(config))
  err = _exit_2(capsys, ["--draft", str(tmp_path)])
  assert "config.json lacks num_attention_heads" in err


def test_an_unwritable_json_path_fails_before_decoding(capsys, tmp_path):
  (tmp_path / "file").write_text("")  # a file where the JSON's folder should be
  err = _exit_2(capsys, ["--json", str(tmp_path / "file" / "out.json")])
  assert "--json" in err and "cannot write there" in err
  assert "decoding" not in capsys.readouterr().out


def test_a_small_ranked_draft_gets_a_head_it_can_have(tmp_path, capsys):
  """The default draft vocabulary (8,192 with a ranking) is capped at the draft's ranking, so
  an HF-directory draft of the tiny 264-token vocabulary runs without --draft-vocab; a top-k and
  a fan-out wider than its restricted head run too (nothing to cut there), or are named."""
  import numpy as np  # noqa: PLC0415

  from ssd_jax.models.weights import save_hf  # noqa: PLC0415

  model = load_model("tiny-llama-draft")
  save_hf(tmp_path, model.config, model.params)
  np.save(tmp_path / "token_ranking.npy", np.arange(264, dtype=np.int32)[::-1].copy())
  draft = ["--draft", str(tmp_path), "--max-new-tokens", "6", "--num-prompts", "1"]
  assert run.main([*TINY, *draft]) == 0
  assert re.search(r"^ssd\s.*\s264\s+\d+$", capsys.readouterr().out, re.M)  # its head
  sampled = ["--draft-vocab", "100", "--top-k", "150", "--temperature", "0.8"]
  assert run.main([*TINY, *draft, *sampled]) == 0
  err = _exit_2(capsys, [*draft, "--draft-vocab", "2", "--fan-out", "3"])
  assert "fan-out of 3 forks more tokens than the draft's head scores (2" in err
  assert "--draft-vocab" in err


def test_modes_are_interleaved_batch_by_batch_and_decode_as_they_would_alone():
  """`--mode all` warms every mode up, then decodes batch i with every mode, the order rotated
  by i, so host drift slows every mode alike; each mode's tokens (seeds included) are those of
  running it alone, and nothing compiles after the warm-up."""
  engine = Engine(load_model("tiny-llama"), load_model("tiny-llama-draft"))
  calls, spans = [], []

  class Spy:  # the engine, logging which mode decodes, whether warm-up or timed, and when
    def generate(self, prompts, *, spec, max_new_tokens, **kw):
      calls.append((spec.mode, "timed" if isinstance(max_new_tokens, list) else "warm"))
      start = time.perf_counter()
      out = engine.generate(prompts, spec=spec, max_new_tokens=max_new_tokens, **kw)
      spans.append((start, time.perf_counter()))
      return out

  specs = {
    "ar": SpecConfig(mode="ar", lookahead=0),
    "sd": SpecConfig(mode="sd", lookahead=2),
    "ssd": SpecConfig(mode="ssd", lookahead=2, fan_out=(2, 2, 1)),
  }
  prompts = [[1, 5, 9, 2], [7, 3], [4, 4, 8, 1, 6], [2, 9, 9], [3, 1]]
  settings = harness.Settings(Sampling(temperature=1.0), 6, 2, 3, True, 128)
  results = harness.run_interleaved({m: (Spy(), s) for m, s in specs.items()}, prompts, settings)
  warm = [m for m, kind in calls if kind == "warm"]
  assert calls[: len(warm)] == [(m, "warm") for m in warm] and set(warm) == set(specs)
  timed = [m for m, kind in calls[len(warm) :]]
  assert timed == ["ar", "sd", "ssd", "sd", "ssd", "ar", "ssd", "ar", "sd"]  # 3 batches of 2
  for mode, spec in specs.items():
    alone = harness.run_mode(
      engine, prompts, spec, **{f.name: getattr(settings, f.name) for f in fields(settings)}
    )
    assert results[mode].tokens == alone.tokens, mode
    assert len(results[mode].metrics) == 3 and results[mode].compiles == 0, mode
    # The warm-up time spans this mode's warm-up calls and nothing of the calls around them.
    mine = [i for i, (m, kind) in enumerate(calls) if (m, kind) == (mode, "warm")]
    before = spans[mine[0] - 1][1] if mine[0] else -math.inf
    after = spans[mine[-1] + 1][0]
    inside = sum(spans[i][1] - spans[i][0] for i in mine)
    assert inside <= results[mode].warmup_seconds <= after - before, mode


def test_chat_loop_answers_each_line():
  target = load_model("tiny-llama")
  engine = Engine(target, load_model("tiny-llama-draft"))
  stdin = io.StringIO("hello\n/metrics\nhow are you?\n/quit\nnever read\n")
  stdout = io.StringIO()
  spec = SpecConfig(mode="ssd", lookahead=2, fan_out=(1, 1, 1))
  replies = chat_loop(engine, spec, Sampling(), 6, stdin=stdin, stdout=stdout)
  assert replies == 2
  assert "[metrics on]" in stdout.getvalue() and "tok/s" in stdout.getvalue()
  # The tiny random model never says EOS in 6 tokens: each reply says it was cut.
  assert stdout.getvalue().count("[cut at 6 tokens: --max-new-tokens]") == 2


def test_ctrl_c_stops_a_reply_and_the_chat_goes_on(monkeypatch):
  """Ctrl-C during a reply stops that reply and the next line is answered in full, exactly as
  a run of its own with the same prompt (the history with the partial reply) and seed."""
  from ssd_jax.cli import chat  # noqa: PLC0415

  target = load_model("tiny-llama")
  engine = Engine(target, load_model("tiny-llama-draft"), placement="device")
  spec = SpecConfig(mode="ssd", lookahead=2, fan_out=(1, 1, 1))
  calls, generate = [], engine.generate

  def recorded(prompts, **kwargs):
    calls.append((prompts, kwargs))
    out = generate(prompts, **kwargs)
    calls[-1] += (out.tokens,)
    return out

  def interrupt_once(row, new):
    if len(calls) == 1:
      raise KeyboardInterrupt

  monkeypatch.setattr(engine, "generate", recorded)
  stream = chat.Streamer.__call__
  monkeypatch.setattr(
    chat.Streamer,
    "__call__",
    lambda self, row, new: stream(self, row, new) or interrupt_once(row, new),
  )
  stdout = io.StringIO()
  replies = chat_loop(engine, spec, Sampling(), 8, stdin=io.StringIO("one\ntwo\n"), stdout=stdout)
  assert replies == 2 and stdout.getvalue().count(" [stopped]") == 1
  assert len(calls) == 2 and len(calls[0]) == 2  # the first never returned
  prompts, kwargs, tokens = calls[1]
  alone = generate(prompts, **{k: v for k, v in kwargs.items() if k != "on_tokens"})
  assert tokens == alone.tokens and len(tokens[0]) == 8


def test_chat_from_a_pipe():
  """The real CLI, stdin not a terminal: one answer per line, then exit 0."""
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "ssd_jax.run",
      *tiny(["--chat", "--mode", "sd", "--lookahead", "2", "--max-new-tokens", "5", "--metrics"]),
    ],
    input="first question\nsecond question\n",
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.count("tok/s") == 2


def test_chat_under_mode_all_builds_only_the_mode_it_talks_through(monkeypatch):
  """--chat --mode all talks through ssd: only ssd's engine is built (not ar's and sd's too)."""
  from ssd_jax.cli import chat  # noqa: PLC0415

  built, talked = [], []
  build_engines = chat.build_engines
  monkeypatch.setattr(
    chat,
    "build_engines",
    lambda config, *rest: built.append(config.modes) or build_engines(config, *rest),
  )
  monkeypatch.setattr(chat, "chat_loop", lambda engine, spec, *a, **k: talked.append(spec.mode))
  assert run.main([*TINY, "--chat", "--mode", "all", "--lookahead", "2"]) == 0
  assert built == [("ssd",)] and talked == ["ssd"]


def test_bench_quick_sweep_writes_json_plots_and_report(tmp_path):
  from ssd_jax.bench import cli  # noqa: PLC0415

  assert (
    cli.main(
      [
        "sweep",
        "--quick",
        "--draft-placement",
        "device",
        "--target",
        "tiny-llama",
        "--draft",
        "tiny-llama-draft",
        "--out",
        str(tmp_path),
      ]
    )
    == 0
  )
  result = json.loads((tmp_path / "sweep.json").read_text())
  modes = {r["mode"] for r in result["runs"]}
  assert modes == {"ar", "sd", "ssd"}
  assert all(r["greedy_equal_to_ar"] for r in result["runs"])
  assert all(r["predicted_tokens_per_second"] > 0 for r in result["runs"])
  assert {"verify", "propose", "expand", "together", "lookup", "ar_step"} <= set(
    result["latency"][0]
  )
  for png in (
    "tokens_per_mode",
    "accepted_histogram",
    "miss_rate_vs_fan_out",
    "batch_scaling",
    "predicted_vs_measured",
  ):
    assert (tmp_path / f"{png}.png").read_bytes()[:4] == b"\x89PNG"
  report = (tmp_path / "report.md").read_text()
  assert "### Performance goals, bundled" in report
  assert "| compilations after warm-up (target 0) | 0 |" in report
  assert "best ssd / best sd" in report
  assert "with this machine's overlap" in report


def test_bench_overlap_reports_the_machine_share(tmp_path):
  from ssd_jax.bench import cli  # noqa: PLC0415

  argv = ["overlap", "--target", "tiny-llama", "--draft", "tiny-llama-draft", "--out"]
  assert cli.main([*argv, str(tmp_path), "--lookaheads", "2", "--fan-outs", "2"]) == 0
  row, *processes = json.loads((tmp_path / "overlap.json").read_text())["rows"]
  if os.cpu_count() > 1:  # two pinned processes: the speculator layout, both kinds of work
    assert [p["work"] for p in processes] == ["compute", "memory"]
    for pinned in processes:
      assert pinned["layout"] == "processes on cores 0,1"
      assert pinned["alone_ms"] > 0 and pinned["pair_ms"] > 0
      assert pinned["independence"] == pytest.approx(2 * pinned["alone_ms"] / pinned["pair_ms"])
  for key in ("verify_ms", "expand_ms", "together_ms", "alone_ms", "pair_ms"):
    assert row[key] > 0, key
  # The ratios from the times the row records (what they come to on this machine is the
  # benchmark's to say, not a test's).
  assert row["efficiency"] == pytest.approx(
    (row["verify_ms"] + row["expand_ms"]) / row["together_ms"]
  )
  assert row["independence"] == pytest.approx(2 * row["alone_ms"] / row["pair_ms"])
  assert math.isfinite(row["verify_cores"]) and row["verify_cores"] > 0


def test_work_kinds_run_and_an_unknown_one_is_refused():
  from ssd_jax.bench.probes import run_work  # noqa: PLC0415

  assert run_work(64, "compute") > 0 and run_work(64, "memory") > 0
  with pytest.raises(ValueError, match="work kind must be one of"):
    run_work(64, "disk")


def test_prediction_with_this_machines_overlap():
  from ssd_jax.bench.sweep import predict  # noqa: PLC0415

  record = {
    "mode": "ssd",
    "mean_accepted_tokens_per_round": 2.0,
    "cache_hit_rate_after_first_round": 0.5,
    "mean_accepted_on_hit": 2.5,
    "mean_accepted_on_miss": 1.5,
    "backup": "neural",
  }
  latency = {"verify": 30.0, "expand": 10.0, "lookup": 0.0, "propose": 5.0, "ar_step": 25.0}
  # Perfect overlap measured (together = max(verify, expand)): both predictions agree.
  perfect = predict(record, latency | {"together": 30.0}, 1)
  assert perfect["predicted_overlap_tokens_per_second"] == pytest.approx(
    perfect["predicted_tokens_per_second"]
  )
  assert perfect["predicted_tokens_per_second"] == pytest.approx(2e3 / (0.5 * 30 + 0.5 * 35))
  # No overlap (together = verify + expand): hit rounds take 40 ms, misses 40 + the 5 ms backup.
  serial = predict(record, latency | {"together": 40.0}, 1)
  assert serial["predicted_overlap_tokens_per_second"] == pytest.approx(2e3 / (0.5 * 40 + 0.5 * 45))
  assert serial["predicted_tokens_per_second"] == perfect["predicted_tokens_per_second"]


def test_bench_ab_alternates_configurations_and_keeps_per_pass_ratios(tmp_path, capsys):
  from ssd_jax.bench import cli  # noqa: PLC0415

  configs = ["sd:tiny-llama-draft:2", "ar", "ssd:tiny-llama-draft:2:2"]
  argv = ["ab", "--target", "tiny-llama", "--configs", *configs, "--draft-placement", "device"]
  argv += ["--passes", "2", "--num-prompts", "1", "--max-new-tokens", "6", "--out", str(tmp_path)]
  assert cli.main(argv) == 0
  result = json.loads((tmp_path / "ab.json").read_text())
  rows = result["rows"]
  assert [r["mode"] for r in rows] == ["sd", "ar", "ssd"]
  assert result["greedy_equal"]  # every pass of every configuration gave ar's tokens
  assert rows[0]["ratio_to_first"] == [1.0, 1.0]
  for r in rows:
    assert len(r["tokens_per_second"]) == 2 and min(r["tokens_per_second"]) > 0
    assert r["compiles_after_warmup"] == 0
  ratios = np.array(rows[2]["tokens_per_second"]) / np.array(rows[0]["tokens_per_second"])
  np.testing.assert_allclose(rows[2]["ratio_to_first"], ratios)
  assert rows[2]["hit_rate_after_first_round"] is not None and rows[1]["accepted_per_round"] == 1
  assert "| ssd tiny-llama-draft k=2, F=2 |" in capsys.readouterr().out


@pytest.mark.parametrize(
  ("text", "error"),
  [
    ("beam", "the mode must be one of"),
    ("ar:tiny-llama-draft", "ar takes no draft"),
    ("sd:tiny-llama-draft:2:2", "sd takes at most 2 fields"),
    ("ssd:tiny-llama-draft:x", "must be integers"),
    ("ssd:tiny-llama-draft:3:0", "must be >= 1"),
    ("ssd:tiny-llama-draft:3:2:x", "C: expected a number"),
    ("ssd:tiny-llama-draft:3:2:1.5", "C: saguaro_c must be in [0, 1]"),
    ("ssd:tiny-llama-draft:3:2:nan", "C: expected a finite number"),
    ("ssd:tiny-llama-draft:3:2:0.5:1", "ssd takes at most 4 fields"),
  ],
)
def test_bench_ab_refuses_a_bad_configuration(text, error, capsys):
  from ssd_jax.bench import cli  # noqa: PLC0415

  with pytest.raises(SystemExit):
    cli.main(["ab", "--configs", "sd", text])
  assert error in capsys.readouterr().err


def test_bench_ab_configuration_defaults_are_runs():
  from ssd_jax.bench.cli import parse_config  # noqa: PLC0415
  from ssd_jax.config import DEFAULT_FAN_OUT  # noqa: PLC0415

  drafts = registry.DEFAULT_DRAFTS["smollm2-135m"]
  ssd = parse_config("ssd")
  assert (ssd.draft, ssd.lookahead, ssd.fan_out) == (drafts["ssd"], 3, DEFAULT_FAN_OUT)
  sd = parse_config("sd::5")
  assert (sd.draft, sd.lookahead) == (drafts["sd"], 5)
  assert ssd.spec().fan_out == (DEFAULT_FAN_OUT,) * 4
  assert ssd.spec().saguaro_c == 1.0 and "C=" not in ssd.label
  saguaro = parse_config("ssd::3:2:0.25")
  assert (saguaro.fan_out, saguaro.spec().saguaro_c) == (2, 0.25)
  assert saguaro.label.endswith("F=2, C=0.25")


def test_bench_serving_writes_the_curve_and_compiles_nothing_after_warm_up(tmp_path):
  """Every mode at two concurrencies and a Poisson rate, tiny models: JSON with each point's
  tokens/s and latency percentiles, the static batches beside them, no compilation after the
  sessions' warm-up in this process, memory marks after the soak, and the plot."""
  from ssd_jax.bench import cli  # noqa: PLC0415

  argv = ["serving", "--target", "tiny-llama", "--draft", "tiny-llama-draft"]
  argv += ["--concurrencies", "1", "2", "--rates", "4", "--requests", "3", "--max-batch-size", "2"]
  argv += ["--prompt-sets", "bundled", "--num-prompts", "2", "--max-new-tokens", "6"]
  argv += ["--temperatures", "0", "0.8", "--soak", "4", "--draft-placement", "device"]
  assert cli.main([*argv, "--out", str(tmp_path)]) == 0
  result = json.loads((tmp_path / "serving.json").read_text())
  points = {(p["mode"], p["load"]) for p in result["points"]}
  loads = {"concurrency 1", "concurrency 2", "rate 4"}
  assert points == {(m, load) for m in ("ar", "sd", "ssd") for load in loads}
  for p in result["points"]:
    assert p["requests"] == 3 and p["tokens"] > 0 and p["tokens_per_second"] > 0
    assert 0 <= p["ttft_ms_p50"] <= p["ttft_ms_p99"]
    assert sum(p["occupancy"].values()) > 0
  assert result["compiles_after_warmup"]["this process"] == 0
  assert {s["batch_size"] for s in result["static"]} == {1, 2}
  assert set(result["memory"]["ssd"]) == {"rss_mib_after_4"}
  assert (tmp_path / "serving.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_rounds_reports_each_configurations_round(tmp_path):
  from ssd_jax.bench import cli  # noqa: PLC0415

  argv = ["rounds", "--out", str(tmp_path), "--batch-sizes", "1", "2", "--max-new-tokens", "12"]
  assert cli.main([*argv, "--repeats", "1", "--lookahead", "2"]) == 0
  result = json.loads((tmp_path / "rounds.json").read_text())
  got = [(r["mode"], r["placement"], r["batch_size"]) for r in result["rows"]]
  here = "this process"
  assert got == [
    ("ar", here, 1), ("ar", here, 2), ("sd", here, 1), ("sd", here, 2),
    ("ssd", "device", 1), ("ssd", "device", 2), ("ssd", "process", 1), ("ssd", "process", 2),
  ]  # fmt: skip
  ar = {r["batch_size"]: r["rounds"] for r in result["rows"] if r["mode"] == "ar"}
  for row in result["rows"]:
    # 12 tokens a row: ar commits one a round, speculation one to three (lookahead 2).
    most = 1 if row["mode"] == "ar" else 3
    assert 12 / most <= row["rounds"] <= ar[row["batch_size"]], row
    assert row["round_ms"] > 0 and row["main_thread_ms"] > 0, row
  assert result["command"].startswith("python -m ssd_jax.bench rounds")


def test_bench_rounds_refuses_bad_options(capsys):
  from ssd_jax.bench import cli  # noqa: PLC0415

  with pytest.raises(SystemExit):
    cli.main(["rounds", "--repeats", "0"])
  assert "--repeats" in capsys.readouterr().err
