"""Every program of ar, sd and ssd lowers for GPU and TPU at the card's layout, from this CPU.

One real layout per platform at batch 16 (the Llama pair for cuda, the Qwen3 pair, with its q/k
norm, for tpu), with the xla and the Pallas attention: every program, as `python -m ssd_jax.bench
lower` exports it (that command runs the whole matrix: both pairs, batch 1 and 16). The suite's
8 virtual CPU devices (conftest) hold the 4 + 1 layout.
"""

import math

import jax
import pytest

from ssd_jax import Engine, SpecConfig, load_model
from ssd_jax.bench import cli, lower, shapes

# The programs whose forward attends (so the Pallas impl puts a kernel in them).
ATTENDS = {
  "prefill",
  "prefill_window",
  "ar_step",
  "verify",
  "draft_prefill_window",
  "propose",
  "expand",
  "lookup_neural_backup",
}
ROUNDS = ("ar_step", "verify", "propose", "expand", "lookup_fast_backup")
PAIR_FOR = {"cuda": "llama-70b/1b", "tpu": "qwen3-32b/0.6b"}


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_every_program_lowers(platform, impl):
  layout = lower.Layout(pair=PAIR_FOR[platform], batch_size=16, impl=impl)
  programs = lower.programs(layout, platform)
  names = [p.name for p in programs]
  assert len(set(names)) == len(names) and set(names) > ATTENDS
  for mode in ("ar", "sd", "ssd"):
    assert any(mode in p.modes for p in programs)
  results = [lower.lower(p, platform, layout) for p in programs]
  failed = [f"{r.program}: {r.error}" for r in results if not r.ok]
  assert not failed, failed
  kernels = {r.program: r.kernels for r in results}
  assert {n + "_greedy" for n in ROUNDS} < set(kernels)  # all-greedy batches' programs too
  if impl == "pallas":  # the platform's compiled kernel, not the interpreter's plain HLO
    attending = [n for n in kernels if n.removesuffix("_greedy") in ATTENDS]
    assert all(kernels[n] > 0 for n in attending), kernels
  else:
    assert not any(kernels.values()), kernels


def test_bytes_per_device_at_the_card_layout():
  """70B over 4 devices: a quarter of every split matrix, the vocabulary tables and norms whole
  on each device; the KV cache split by KV heads (8 over 4)."""
  layout = lower.Layout(pair="llama-70b/1b", batch_size=16, impl="xla")
  m = lower.memory(layout)
  c = shapes.MODELS["llama-3.1-70b"]
  # Replicated: the embedding and LM head, and the norms' weights.
  whole = 2 * c.vocab_size * c.hidden_size + (2 * c.num_layers + 1) * c.hidden_size
  assert m["target"]["weights"] == 2 * ((c.num_params - whole) // 4 + whole)
  kv = 2 * c.num_layers * 16 * 8192 * c.num_kv_heads * c.head_dim
  assert m["target"]["kv_cache"] == 2 * kv // 4
  d = shapes.MODELS["llama-3.2-1b"]
  assert m["draft"]["weights"] == 2 * d.num_params  # one device holds it all
  assert 30 * 2**30 < m["target"]["weights"] < 40 * 2**30  # ~36 GiB: fits 80 GB with 10 of KV
  assert math.isclose(m["target"]["kv_cache"], 10 * 2**30)


def test_the_command_exits_non_zero_when_a_program_fails(tmp_path, monkeypatch, capsys):
  """A program that does not lower is a failure of the command, with its reason printed."""
  real = lower.programs

  def broken(layout, platform):
    programs = real(layout, platform)[:2]
    return [
      *programs,
      lower.Program("broken", ("ar",), jax.jit(_unlowerable), (), {}, programs[0].mesh),
    ]

  monkeypatch.setattr(lower, "programs", broken)
  argv = ["lower", "--out", str(tmp_path), "--pairs", "qwen3-32b/0.6b", "--batch-sizes", "1"]
  assert cli.main([*argv, "--impls", "xla", "--platforms", "cuda"]) == 1
  out = capsys.readouterr().out
  assert "broken on cuda: " in out and "no such program" in out
  assert "2 of 3 exports lowered; FAILED: 1" in out
  assert (tmp_path / "lower.json").exists()


def _unlowerable(*_):
  raise NotImplementedError("no such program")


def test_pallas_on_the_tensor_parallel_target_runs_per_device():
  """The kernel on a 4-device target runs on each device's own heads (a shard_map: neither
  Mosaic nor Triton kernels can be split by XLA; the tpu lowering above fails without it) and
  decodes as the xla impl does on one device. ar: the target's programs are the sharded ones."""
  target = load_model("tiny-qwen3")  # 4 query heads, 4 KV heads: one of each per device
  run = dict(spec=SpecConfig(mode="ar"), max_new_tokens=8, ignore_eos=True)
  alone = Engine(target, attention_impl="xla").generate([[5, 17, 99, 3]], **run)
  four = Engine(target, attention_impl="pallas", target_devices=4)
  assert four.target_mesh.size == 4
  assert four.generate([[5, 17, 99, 3]], **run).tokens == alone.tokens
