"""Model forward: HF parity, cached decode, tensor parallelism, donation, checkpoints, errors."""

import functools
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssd_jax import sharding
from ssd_jax.config import ModelConfig
from ssd_jax.kernels.xla import DENSE_SLOTS
from ssd_jax.models import (
  KVCache,
  TreeKV,
  checkpoint,
  forward,
  init_params,
  placement,
  transformer,
  tree_forward,
)
from ssd_jax.models.prefill import bucket_length, pad_prompts, prefill
from ssd_jax.models.registry import load_model
from ssd_jax.models.weights import load_hf, save_hf

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("name", ["llama3", "qwen3", "qwen2"])
def test_hf_logit_parity(name):
  config, params = load_hf(FIXTURES / "hf" / name)
  expected = np.load(FIXTURES / "hf" / name / "expected.npz")
  ids = jnp.asarray(expected["input_ids"])
  logits, _ = forward(params, ids, KVCache.init(config, *ids.shape), config=config)
  np.testing.assert_allclose(np.asarray(logits), expected["logits"], atol=1e-4, rtol=0)


def test_hf_fixture_configs_cover_the_families():
  configs = {n: load_hf(FIXTURES / "hf" / n)[0] for n in ("llama3", "qwen3", "qwen2")}
  assert configs["llama3"].rope_scaling is not None and not configs["llama3"].tie_embeddings
  assert configs["qwen3"].qk_norm and configs["qwen3"].head_dim * 6 != 48
  assert configs["qwen3"].tie_embeddings
  assert configs["qwen2"].qkv_bias
  assert all(c.group_size == 3 for c in configs.values())


def test_hf_save_load_round_trip(tmp_path):
  config, params = load_hf(FIXTURES / "hf" / "qwen2")
  save_hf(tmp_path / "out", config, params)
  config2, params2 = load_hf(tmp_path / "out")
  assert config2 == config
  chex.assert_trees_all_equal(params2, params)


@pytest.mark.slow
def test_smollm2_parity_with_transformers():
  """Real model: same top-5 ids at every position, logits within 1e-3 of HF transformers."""
  model = load_model("smollm2-135m")
  fixture = np.load(FIXTURES / "smollm2_parity.npz")
  ids = model.tokenizer.encode(str(fixture["prompt"]))
  assert ids == fixture["input_ids"].tolist()
  for i, text in enumerate(fixture["texts"]):
    assert model.tokenizer.encode(str(text)) == fixture[f"text_ids_{i}"].tolist()
  logits, _ = forward(
    model.params, jnp.asarray([ids]), KVCache.init(model.config, 1, 64), config=model.config
  )
  logits = np.asarray(logits[0])
  top5 = np.argsort(-logits, axis=-1)[:, :5]
  np.testing.assert_array_equal(top5, fixture["top_ids"][:, :5])
  ours = np.take_along_axis(logits, fixture["top_ids"], axis=-1)
  np.testing.assert_allclose(ours, fixture["top_logits"], atol=1e-3, rtol=0)


@pytest.fixture(scope="module")
def tiny():
  config = ModelConfig(
    family="qwen3",
    vocab_size=64,
    hidden_size=32,
    num_layers=2,
    num_heads=8,
    num_kv_heads=4,
    head_dim=8,
    intermediate_size=48,
    qk_norm=True,
    qkv_bias=True,
  )
  return config, init_params(config, jax.random.key(0))


def test_incremental_decode_equals_full_forward(tiny):
  config, params = tiny
  tokens = jax.random.randint(jax.random.key(1), (2, 11), 0, config.vocab_size)
  full, _ = forward(params, tokens, KVCache.init(config, 2, 32), config=config)
  cache, steps = KVCache.init(config, 2, 32), []
  for t in range(tokens.shape[1]):
    logits, cache = forward(params, tokens[:, t : t + 1], cache, config=config)
    cache = cache.with_lengths(cache.lengths + 1)
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5)


def test_multi_token_forward_after_prefill_equals_single_steps(tiny):
  """The verify path: T tokens in one call equal T single-token calls, with ragged lengths."""
  config, params = tiny
  tokens = jax.random.randint(jax.random.key(2), (3, 12), 0, config.vocab_size)
  lengths = jnp.array([3, 7, 5])
  base = prefill(params, tokens, lengths, KVCache.init(config, 3, 32), config=config)
  new = jax.random.randint(jax.random.key(3), (3, 5), 0, config.vocab_size)
  multi, _ = forward(params, new, base, config=config)
  cache, steps = prefill(params, tokens, lengths, KVCache.init(config, 3, 32), config=config), []
  for t in range(new.shape[1]):
    logits, cache = forward(params, new[:, t : t + 1], cache, config=config)
    cache = cache.with_lengths(cache.lengths + 1)
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), multi, atol=1e-5)
  # And equal to a fresh full forward of each row's prompt + new tokens.
  for b, n in enumerate(np.asarray(lengths)):
    row = jnp.concatenate([tokens[b, :n], new[b]])[None]
    full, _ = forward(params, row, KVCache.init(config, 1, 32), config=config)
    np.testing.assert_allclose(full[0, n:], multi[b], atol=1e-5)


@pytest.mark.parametrize(("vocab", "blocks"), [(5 * 1024, 5), (3000, 2), (1500, 1)])
def test_blocked_tied_head_equals_the_single_product(vocab, blocks):
  """The tied head's block-by-block product (a few rows, on CPU) scores every token as the
  single product does, through a verification-sized forward too."""
  assert transformer._head_blocks(vocab) == blocks
  config = ModelConfig(
    family="llama",
    vocab_size=vocab,
    hidden_size=32,
    num_layers=1,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    intermediate_size=48,
    tie_embeddings=True,
  )
  params = init_params(config, jax.random.key(4))
  single = lambda x: jnp.einsum("...D,VD->...V", x, params["embed"])
  for rows in (1, 4, transformer.BLOCKED_HEAD_MAX_ROWS, transformer.BLOCKED_HEAD_MAX_ROWS + 1):
    x = jax.random.normal(jax.random.key(rows), (1, rows, 32))
    logits = jax.jit(transformer.tied_head)(params["embed"], x)
    chex.assert_shape(logits, (1, rows, vocab))
    np.testing.assert_allclose(logits, single(x), atol=1e-5, rtol=1e-5)
  tokens = jax.random.randint(jax.random.key(5), (2, 4), 0, vocab)
  logits, _ = forward(params, tokens, KVCache.init(config, 2, 8), config=config)
  cache, steps = KVCache.init(config, 2, 8), []
  for t in range(4):
    step, cache = forward(params, tokens[:, t : t + 1], cache, config=config)
    cache = cache.with_lengths(cache.lengths + 1)
    steps.append(step)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), logits, atol=1e-5)


def test_tree_forward_matches_linear_continuations(tiny):
  """A branch forked at depth d after glue tokens sees exactly its own path."""
  config, params = tiny
  seq = jax.random.randint(jax.random.key(4), (1, 10), 0, config.vocab_size)
  full, _ = forward(params, seq, KVCache.init(config, 1, 32), config=config)
  cache = prefill(params, seq[:, :4], jnp.array([4]), KVCache.init(config, 1, 32), config=config)
  _, glue = forward(params, seq[:, 4:8], cache, config=config)  # glue: 4 tokens, lengths stay 4
  depth = jnp.array([0, 1, 2], jnp.int32)
  tree = TreeKV.init(config, 1, 2, 3)
  logits, tree = tree_forward(params, seq[:, 5:8], glue, tree, depth, jnp.int32(0), config=config)
  np.testing.assert_allclose(logits[0], full[0, 5:8], atol=1e-5)
  # Step 1: branch forked at depth 0 continues with seq[6]: its path is seq[:7].
  logits, _ = tree_forward(params, seq[:, 6:9], glue, tree, depth, jnp.int32(1), config=config)
  np.testing.assert_allclose(logits[0, 0], full[0, 6], atol=1e-5)


def test_decode_past_the_dense_slots_equals_the_reference(tiny):
  """A cache longer than the XLA impl reads at once (kernels.xla.DENSE_SLOTS): verification,
  glue and tree steps over ragged rows, one reaching past the dense slots, one not, equal the
  reference attention's (which reads the whole cache)."""
  config, params = tiny
  capacity = DENSE_SLOTS + 200
  seq = jax.random.randint(jax.random.key(6), (2, DENSE_SLOTS + 150), 0, config.vocab_size)
  lengths = jnp.array([DENSE_SLOTS + 140, 37])
  cache = prefill(params, seq, lengths, KVCache.init(config, 2, capacity), config=config)
  new = jax.random.randint(jax.random.key(7), (2, 4), 0, config.vocab_size)
  depth = jnp.array([[0, 1, 2], [2, 0, 1]], jnp.int32)
  results = {}
  for impl in ("xla", "reference"):
    logits, glue = forward(params, new, cache, config=config, attention_impl=impl)
    tree = TreeKV.init(config, 2, 2, 3)
    branch, _ = tree_forward(
      params, new[:, 1:], glue, tree, depth, jnp.int32(0), config=config, attention_impl=impl
    )
    results[impl] = (logits, branch)
  chex.assert_trees_all_close(results["xla"], results["reference"], atol=1e-5, rtol=1e-5)


def test_float16_weights_are_storage_and_compute_in_float32(tiny):
  """Half-precision params (a draft's default) give the f32 model's logits on the same weight
  values: only storage is half precision (an f32 cache keeps K and V unrounded)."""
  config, params = tiny
  half = jax.tree.map(lambda x: x.astype(jnp.float16), params)
  same = jax.tree.map(lambda x: x.astype(jnp.float32), half)
  tokens = jax.random.randint(jax.random.key(8), (2, 6), 0, config.vocab_size)
  logits, _ = forward(half, tokens, KVCache.init(config, 2, 16), config=config)
  chex.assert_type(logits, jnp.float32)
  expected, _ = forward(same, tokens, KVCache.init(config, 2, 16), config=config)
  np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=1e-5)


def test_float16_refuses_weights_beyond_its_range(tmp_path, tiny):
  config, params = tiny
  params = jax.tree.map(np.array, params)  # writable copies
  params["layers"]["w_up"][0, 0, 0] = 1e6
  save_hf(tmp_path, config, params)
  assert load_model(str(tmp_path), dtype=jnp.float32).params["layers"]["w_up"][0, 0, 0] == 1e6
  with pytest.raises(ValueError, match=r"\['layers'\]\['w_up'\] holds values beyond float16"):
    load_model(str(tmp_path), dtype=jnp.float16)


def test_tensor_parallel_equals_single_device(tiny):
  config, params = tiny
  target, draft = sharding.make_meshes(4, 1)
  assert not set(target.devices.flat) & set(draft.devices.flat)
  tokens = jax.random.randint(jax.random.key(5), (2, 9), 0, config.vocab_size)
  ref, _ = forward(params, tokens, KVCache.init(config, 2, 16), config=config)
  sharded = placement.place_params(params, config, target)
  assert sharded["layers"]["wq"].sharding.spec[2] == "tp"
  cache = placement.init_cache(config, target, 2, 16, jnp.float32)
  step = jax.jit(functools.partial(forward, config=config), donate_argnames="cache")
  logits, cache = step(sharded, tokens, cache)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), atol=1e-5)
  assert cache.k.sharding.spec[3] == "tp"
  assert set(cache.k.sharding.device_set) == set(target.devices.flat)


def test_sharding_rejects_indivisible_heads(tiny):
  config, _ = tiny
  target, _ = sharding.make_meshes(3, 1)
  with pytest.raises(ValueError, match="cannot split '(kv_)?heads' of size [48] over 3"):
    placement.param_shardings(config, target)


def test_too_few_devices_is_a_clear_error():
  with pytest.raises(ValueError, match="need 9 devices .* only 8 available"):
    sharding.make_meshes(8, 1)


def test_donation_frees_the_old_cache(tiny):
  config, params = tiny
  step = jax.jit(functools.partial(forward, config=config), donate_argnames="cache")
  cache = KVCache.init(config, 1, 16)
  _, new = step(params, jnp.zeros((1, 2), jnp.int32), cache)
  assert cache.k.is_deleted() and cache.v.is_deleted()
  assert not new.k.is_deleted()


def test_prefill_does_not_retrace_within_a_bucket(tiny):
  config, params = tiny

  @chex.assert_max_traces(n=1)
  def run(tokens, lengths, cache):
    return prefill.__wrapped__(params, tokens, lengths, cache, config=config)

  run = jax.jit(run, donate_argnames="cache")
  for n in (5, 9, 16):  # all in the 16 bucket
    tokens, lengths = pad_prompts([list(range(1, n + 1)), [3, 4]], capacity=64)
    assert tokens.shape == (2, 16)
    run(tokens, lengths, KVCache.init(config, 2, 64))
  assert bucket_length(17) == 32


def test_prompt_longer_than_cache_is_a_clear_error():
  with pytest.raises(ValueError, match="prompt has 40 tokens but the KV cache holds 32"):
    pad_prompts([list(range(40))], capacity=32)


def test_orbax_round_trip_is_bit_identical(tmp_path, tiny):
  config, params = tiny
  checkpoint.save(tmp_path / "ckpt", config, params)
  config2, restored = checkpoint.restore(tmp_path / "ckpt")
  assert config2 == config
  chex.assert_trees_all_equal(restored, jax.device_get(params))
  target, _ = sharding.make_meshes(4, 1)
  _, placed = checkpoint.restore(tmp_path / "ckpt", placement.param_shardings(config, target))
  assert placed["layers"]["w_up"].sharding.spec == jax.P(None, None, "tp")
  chex.assert_trees_all_equal(jax.device_get(placed), jax.device_get(params))


def test_unknown_model_name_lists_the_choices():
  with pytest.raises(ValueError, match="unknown model 'no-such-model'.*smollm2-135m"):
    load_model("no-such-model")


def test_corrupt_and_mismatched_files_are_clear_errors(tmp_path):
  config, params = load_hf(FIXTURES / "hf" / "llama3")
  save_hf(tmp_path / "m", config, params)
  (tmp_path / "m" / "model.safetensors").write_bytes(b"not a safetensors file")
  with pytest.raises(ValueError, match="missing or corrupt"):
    load_model(str(tmp_path / "m"))
  save_hf(tmp_path / "m2", config, params)
  text = (
    (tmp_path / "m2" / "config.json").read_text().replace('"hidden_size": 48', '"hidden_size": 64')
  )
  (tmp_path / "m2" / "config.json").write_text(text)
  with pytest.raises(ValueError, match="has shape .* config implies"):
    load_model(str(tmp_path / "m2"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="neither an HF model directory"):
    load_model(str(tmp_path / "empty"))
  (tmp_path / "x.gguf").write_bytes(b"GGUF garbage")
  with pytest.raises(ValueError, match="cannot read GGUF"):
    load_model(str(tmp_path / "x.gguf"))


def test_config_validation():
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    ModelConfig(
      vocab_size=8,
      hidden_size=8,
      num_layers=1,
      num_heads=3,
      num_kv_heads=2,
      head_dim=4,
      intermediate_size=8,
    )
  with pytest.raises(ValueError, match="vocab_size must be a positive int"):
    ModelConfig(
      vocab_size=0,
      hidden_size=8,
      num_layers=1,
      num_heads=2,
      num_kv_heads=2,
      head_dim=4,
      intermediate_size=8,
    )


def test_bf16_close_to_f32(tiny):
  """bf16 weights and cache: f32 logits within bf16's precision of the f32 forward's, and not
  equal to them (the bf16 arithmetic did run)."""
  config, params = tiny
  tokens = jax.random.randint(jax.random.key(6), (1, 6), 0, config.vocab_size)
  ref, _ = forward(params, tokens, KVCache.init(config, 1, 8), config=config)
  cast = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  out, cache = forward(cast, tokens, KVCache.init(config, 1, 8, jnp.bfloat16), config=config)
  assert out.dtype == jnp.float32 and cache.k.dtype == jnp.bfloat16
  np.testing.assert_allclose(out, ref, atol=0.1)
  assert not np.array_equal(out, ref)
