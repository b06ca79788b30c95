"""The shipped drafts: they load, match their recorded configurations, reproduce their recorded
agreement with the target on a fixed held-out slice, and round-trip through an HF export."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from ssd_jax.models import KVCache, borrowed, forward
from ssd_jax.models.agreement import greedy_agreement
from ssd_jax.models.registry import ASSETS, SHIPPED_DRAFTS, load_model
from ssd_jax.models.weights import load_hf, save_hf

pytestmark = pytest.mark.slow  # the shipped drafts, and the real target's tokenizer and weights

FIXTURE = Path(__file__).parent / "fixtures" / "draft_slice.npz"
# name -> (width, layers, query heads, KV heads, MLP width)
SHAPES = {
  "smollm2-135m-draft": (192, 6, 3, 1, 512),
  "smollm2-135m-draft-wide": (384, 6, 6, 2, 960),
}


@pytest.fixture(scope="module", params=SHIPPED_DRAFTS)
def draft(request):
  return load_model(request.param)


def test_every_shipped_draft_is_described_here():
  assert set(SHAPES) == set(SHIPPED_DRAFTS)


def test_shipped_files_and_config(draft):
  directory = ASSETS / draft.name
  files = {p.name: p.stat().st_size for p in directory.iterdir()}
  assert set(files) == {"config.json", "model.safetensors", "token_ranking.npy"}
  assert files["model.safetensors"] <= 25 * 2**20
  hf = json.loads((directory / "config.json").read_text())
  assert hf["model_type"] == "llama" and hf["torch_dtype"] == "float16"
  tensors = load_file(directory / "model.safetensors")
  assert all(x.dtype == np.float16 for k, x in tensors.items() if k != borrowed.ROW_IDS)
  if draft.name.endswith("-wide"):  # its embedding is the target's, projected, plus rows
    assert hf[borrowed.BASE_KEY] == "smollm2-135m"
    assert "model.embed_tokens.weight" not in tensors
    np.testing.assert_array_equal(tensors[borrowed.ROW_IDS], draft.token_ranking[:8192])
  c = draft.config
  shape = (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.intermediate_size)
  assert shape == SHAPES[draft.name]
  assert c.vocab_size == 49152 and c.tie_embeddings and c.eos_token_ids == (2,)
  assert draft.params["embed"].shape == (49152, c.hidden_size)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(draft.params))


def test_token_ranking_covers_held_out_target_tokens(draft):
  """The ranking orders every token id, EOS near the top, and its first 8,192 cover most of
  what the target generates on held-out prompts (so `--draft-vocab 8192` loses little)."""
  ranking = draft.token_ranking
  np.testing.assert_array_equal(np.sort(ranking), np.arange(draft.config.vocab_size))
  assert 2 in ranking[:64]
  f = np.load(FIXTURE)
  held_out = np.concatenate([f[f"continuation_{i}"] for i in range(int(f["n"]))])
  assert np.isin(held_out, ranking[:8192]).mean() >= 0.9


def test_recorded_agreement_on_the_fixed_slice(draft):
  f = np.load(FIXTURE)
  n = int(f["n"])
  prompts = [f[f"prompt_{i}"] for i in range(n)]
  continuations = [f[f"continuation_{i}"] for i in range(n)]
  recorded = dict(zip(f["drafts"].tolist(), f["agreeing"].tolist(), strict=True))
  hits, total = greedy_agreement(draft, prompts, continuations)
  assert total == int(f["tokens"])
  assert abs(hits - recorded[draft.name]) <= 2  # float round-off may flip a near-tie or two


def test_the_wide_draft_agrees_more_than_the_narrow_one():
  f = np.load(FIXTURE)
  recorded = dict(zip(f["drafts"].tolist(), f["agreeing"].tolist(), strict=True))
  assert recorded["smollm2-135m-draft-wide"] > recorded["smollm2-135m-draft"]


def test_target_reproduces_the_fixed_slice():
  """The real model's greedy decoding is the same as when the fixture was recorded."""
  from ssd_jax import Engine  # noqa: PLC0415

  f = np.load(FIXTURE)
  n = int(f["n"])
  out = Engine(load_model("smollm2-135m")).generate(
    [f[f"prompt_{i}"].tolist() for i in range(n)], max_new_tokens=48
  )
  for i in range(n):
    assert out.tokens[i] == f[f"continuation_{i}"].tolist(), i


def test_hf_export_round_trips(draft, tmp_path):
  """An HF directory with the materialized table (what `distill_draft.py export --hf-out`
  writes, and HF transformers loads as a plain Llama) gives the same logits."""
  save_hf(tmp_path / "hf", draft.config, draft.params)
  hf = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert borrowed.BASE_KEY not in hf
  config, params = load_hf(tmp_path / "hf")
  assert config == draft.config
  tokens = jnp.asarray([[1, 9690, 198, 2683, 359, 253]])
  a, _ = forward(draft.params, tokens, KVCache.init(config, 1, 8), config=config)
  b, _ = forward(params, tokens, KVCache.init(config, 1, 8), config=config)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
