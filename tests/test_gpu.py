"""On a GPU (`pytest -m gpu` on a machine with one): the Pallas tree-attention kernel compiled
for it, not interpreted, against the reference; and ar, sd and ssd decoding the same greedy
tokens there, through each attention impl. Skipped elsewhere, and in every run that does not ask
for the GPU tests alone (conftest then keeps JAX on the CPU)."""

import chex
import jax
import jax.numpy as jnp
import pytest
from conftest import gpu_tests_asked
from test_tree_attention import CASES, TOLERANCES, _expected, make_inputs

from ssd_jax import Engine, SpecConfig, load_model
from ssd_jax.kernels import BlockSizes, tree_attention


def gpu(test):
  """Marked `gpu`, and skipped where JAX's backend is not a GPU."""
  backend = jax.default_backend()
  reason = f"needs a GPU and `pytest -m gpu` (JAX's backend here: {backend})"
  return pytest.mark.gpu(pytest.mark.skipif(backend != "gpu", reason=reason)(test))


# The kernel's f32 products may run as TF32 on the GPU (10-bit mantissas): its f32 results are
# then within ~1e-3 of the full-precision reference, not 2e-5.
GPU_TOLERANCES = TOLERANCES | {jnp.float32: dict(atol=5e-3, rtol=5e-3)}
_TRITON_CALL = "__gpu$xla.gpu.triton"


@gpu
@pytest.mark.parametrize("with_tree", [False, True], ids=["main", "tree"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_compiled_pallas_kernel_matches_reference(case, dtype, with_tree):
  """The kernel compiled by Triton (its program holds the Triton call: not the interpreter),
  against the reference computed on the CPU at full f32 precision."""
  q, k, v, lengths, depth, *tree = make_inputs(case, dtype, with_tree=with_tree)
  block_sizes = BlockSizes(block_kv=case.block_kv)

  def attend(q, k, v, lengths, depth, *tree):
    return tree_attention(
      q, k, v, lengths, depth, *tree, impl="pallas", block_sizes=block_sizes, interpret=False
    )

  compiled = jax.jit(attend)
  assert _TRITON_CALL in compiled.lower(q, k, v, lengths, depth, *tree).as_text()
  out = compiled(q, k, v, lengths, depth, *tree)
  assert out.devices() == {jax.devices("gpu")[0]}
  with jax.default_device(jax.devices("cpu")[0]):
    expected = _expected(case, dtype, with_tree)
  chex.assert_tree_all_finite(out)
  chex.assert_trees_all_close(jax.device_get(out), expected, **GPU_TOLERANCES[dtype])


PROMPTS = [[5, 17, 99, 3, 42, 8, 8, 120], [7, 1], [200, 201, 202, 203, 204]]
SPECS = {
  "ar": SpecConfig(mode="ar", lookahead=0),
  "sd": SpecConfig(mode="sd", lookahead=3),
  "ssd": SpecConfig(mode="ssd", lookahead=3, fan_out=(2, 2, 1, 1)),
}


@gpu
@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_greedy_modes_agree_on_the_gpu(impl):
  """ar, sd and ssd (its draft beside the target on the one GPU) emit the same greedy tokens.
  At full f32 matmul precision: TF32 rounding could flip a near-tie between the argmaxes of a
  one-token and a four-token forward, which is no fault of the decoding."""
  engine = Engine(
    load_model("tiny-llama"), load_model("tiny-llama-draft"), attention_impl=impl,
    placement="device",
  )  # fmt: skip
  assert engine.target_mesh.devices.flat[0].platform == "gpu"
  with jax.default_matmul_precision("highest"):
    tokens = {
      mode: engine.generate(PROMPTS, spec=spec, max_new_tokens=20, ignore_eos=True).tokens
      for mode, spec in SPECS.items()
    }
  assert tokens["sd"] == tokens["ar"] and tokens["ssd"] == tokens["ar"]
  assert all(len(row) == 20 for row in tokens["ar"])


@pytest.mark.parametrize(
  ("expression", "asked"),
  [
    ("", False),
    ("gpu", True),
    ("gpu and not slow", True),
    ("not gpu", False),
    ("not slow", False),
    ("gpu or statistical", True),
    ("gpu or not slow", False),
  ],
)
def test_only_a_run_of_the_gpu_tests_alone_leaves_the_cpu(expression, asked):
  """Which -m expressions keep JAX off the CPU (conftest), and that this run, which is not one
  of them, is on the CPU."""

  class Config:
    def getoption(self, name):
      assert name == "markexpr"
      return expression

  assert gpu_tests_asked(Config()) is asked
  assert jax.default_backend() == "cpu"
