"""Borrowed token embeddings (`ssd_jax.models.borrowed`): the factored form, its files, and the
wide draft's growth (tools/wide_draft.py), which must not change the grown draft's function."""

import dataclasses
import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from ssd_jax.models import KVCache, borrowed, forward, hidden_states
from ssd_jax.models.registry import base_embedding, load_model
from ssd_jax.models.weights import load_hf, save_hf

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def tied_draft():
  """tiny-llama-draft with a tied embedding (the shape of the shipped drafts)."""
  draft = load_model("tiny-llama-draft")
  config = dataclasses.replace(draft.config, tie_embeddings=True)
  params = {k: v for k, v in draft.params.items() if k != "lm_head"}
  return config, params


def test_factor_is_exact_on_its_rows_and_a_fit_elsewhere():
  rng = np.random.default_rng(0)
  base = rng.normal(size=(300, 24)).astype(np.float32)
  embed = rng.normal(size=(300, 16)).astype(np.float32)
  row_ids = rng.permutation(300)[:40].astype(np.int32)
  projection, rows = borrowed.factor(embed, base, row_ids)
  out = borrowed.materialize(base, projection, rows, row_ids)
  np.testing.assert_allclose(out[row_ids], embed[row_ids], atol=1e-5)
  others = np.setdiff1d(np.arange(300), row_ids)
  np.testing.assert_allclose(out[others], (base @ projection)[others], atol=1e-5)
  fit = np.linalg.lstsq(base, embed, rcond=None)[0]
  np.testing.assert_allclose(projection, fit, atol=1e-5)


def test_materialize_refuses_mismatched_parts():
  base = np.zeros((50, 8), np.float32)
  with pytest.raises(ValueError, match="right base model"):
    borrowed.materialize(base, np.zeros((6, 4)), np.zeros((2, 4)), np.array([0, 1]))
  with pytest.raises(ValueError, match="expected"):
    borrowed.materialize(base, np.zeros((8, 4)), np.zeros((3, 4)), np.array([0, 1]))
  with pytest.raises(ValueError, match="distinct token ids"):
    borrowed.materialize(base, np.zeros((8, 4)), np.zeros((2, 4)), np.array([0, 50]))
  with pytest.raises(ValueError, match="distinct token ids"):
    borrowed.materialize(base, np.zeros((8, 4)), np.zeros((2, 4)), np.array([3, 3]))


def test_a_borrowing_directory_loads_as_the_model_it_materializes(tmp_path):
  config, params = tied_draft()
  base = base_embedding("tiny-llama")
  row_ids = np.arange(0, config.vocab_size, 3, dtype=np.int32)
  projection, rows = borrowed.factor(np.asarray(params["embed"]), base, row_ids)
  parts = {borrowed.PROJECTION: projection, borrowed.ROWS: rows, borrowed.ROW_IDS: row_ids}
  embed = borrowed.materialize(base, projection, rows, row_ids)
  save_hf(tmp_path, config, params | {"embed": embed}, borrowed_embedding=("tiny-llama", parts))
  assert json.loads((tmp_path / "config.json").read_text())[borrowed.BASE_KEY] == "tiny-llama"
  tensors = load_file(tmp_path / "model.safetensors")
  assert "model.embed_tokens.weight" not in tensors and set(borrowed.TENSORS) <= set(tensors)

  loaded = load_model(str(tmp_path))
  assert loaded.config == config
  np.testing.assert_array_equal(loaded.params["embed"], embed)
  tokens = jnp.asarray([[256, 72, 105, 33, 10]])
  a, _ = forward(loaded.params, tokens, KVCache.init(config, 1, 8), config=config)
  b, _ = forward(params | {"embed": embed}, tokens, KVCache.init(config, 1, 8), config=config)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)

  with pytest.raises(ValueError, match="borrows its token embedding from 'tiny-llama'"):
    load_hf(tmp_path)  # without a way to find the base's table


def test_a_borrowing_draft_paired_with_the_wrong_base_is_refused(tmp_path):
  config, params = tied_draft()
  base = base_embedding("tiny-llama")  # width 64
  row_ids = np.arange(4, dtype=np.int32)
  projection, rows = borrowed.factor(np.asarray(params["embed"]), base, row_ids)
  parts = {borrowed.PROJECTION: projection, borrowed.ROWS: rows, borrowed.ROW_IDS: row_ids}
  save_hf(tmp_path, config, params, borrowed_embedding=("tiny-llama-draft", parts))  # width 32
  with pytest.raises(ValueError, match="right base model"):
    load_model(str(tmp_path))


def _wide_draft_module(monkeypatch):
  monkeypatch.syspath_prepend(str(TOOLS))  # as when the tool runs: its neighbours import
  spec = importlib.util.spec_from_file_location("wide_draft", TOOLS / "wide_draft.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_growing_the_draft_keeps_its_logits_on_the_heads_tokens(monkeypatch):
  """Width x2, heads x2, a wider MLP: the grown draft scores the head's rows as the narrow one
  did (before any training), so training starts from what the narrow draft learned."""
  wide = _wide_draft_module(monkeypatch)
  narrow, params = tied_draft()
  config = wide.wide_config(narrow, width=64, heads=4, kv_heads=2, mlp=96)
  base = np.asarray(base_embedding("tiny-llama"), np.float32)
  row_ids = np.random.default_rng(1).permutation(narrow.vocab_size)[:120].astype(np.int32)
  grown = jax.tree.map(jnp.asarray, wide.grow(params, narrow, config, base, row_ids, seed=0))
  consts = (jnp.asarray(base), jnp.asarray(row_ids), jnp.asarray(wide.slots(row_ids, 264)))
  tokens = jnp.asarray(row_ids[np.random.default_rng(2).integers(0, 120, (2, 20))])
  new = wide.head_logits(grown, config, *consts, tokens)
  old = hidden_states(params, tokens, config=narrow) @ jnp.asarray(params["embed"])[row_ids].T
  np.testing.assert_allclose(np.asarray(new), np.asarray(old), atol=2e-4)
  # The new capacity is there: new heads read with random weights and write with zero ones.
  assert float(jnp.abs(grown["layers"]["wq"][:, :, 2:]).min()) > 0
  assert float(jnp.abs(grown["layers"]["wo"][:, 2:]).max()) == 0
