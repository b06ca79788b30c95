"""Statistical exactness harness: exact laws by enumeration, and a goodness-of-fit test.

Tiny-vocabulary random models make the law of the first `n` generated tokens computable by
enumerating all V**n continuations. Decoding many copies of one prompt (one batch, vectorized)
gives empirical counts; a chi-square test with small cells pooled decides.

Test design: N samples over V**n cells; cells with expected count < 5 are pooled; the
statistic X² is mapped to a standard normal by the Wilson–Hilferty transform and the test
fails when z > Z_MAX = 4.5, a false-failure probability of about 3.4e-6 per test (and a fixed
seed makes every run identical).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from ssd_jax.config import ModelConfig
from ssd_jax.decode.sampling import Sampling
from ssd_jax.models import KVCache, forward, init_params
from ssd_jax.models.registry import LoadedModel

V = 8
Z_MAX = 4.5
PROMPT = [3, 1, 4, 1, 5]


def tiny_pair(
  seed: int = 0, noise: float = 0.3, heads: int = 2, kv_heads: int = 1
) -> tuple[LoadedModel, LoadedModel]:
  """A V = 8 target and a draft that is the target with noisy weights: they agree often but
  not always, so acceptance, rejection and full acceptance all happen. `heads` and `kv_heads`
  must divide by a tensor-parallel target's device count."""
  config = ModelConfig(
    vocab_size=V,
    hidden_size=16,
    num_layers=2,
    num_heads=heads,
    num_kv_heads=kv_heads,
    head_dim=8,
    intermediate_size=32,
  )
  kt, kd = jax.random.split(jax.random.key(seed))
  params = init_params(config, kt, scale=2.0)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(kd, len(leaves))
  noisy = [
    x + noise * x.std() * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)
  ]
  target = LoadedModel("exact-target", config, jax.device_get(params), None)
  draft = LoadedModel(
    "exact-draft", config, jax.device_get(jax.tree.unflatten(treedef, noisy)), None
  )
  return target, draft


def oracle_probs(logits: np.ndarray, sampling: Sampling) -> np.ndarray:
  """The warped distribution f64[..., V], computed independently of ssd_jax (plain numpy, f64)
  from the semantics in ssd_jax.decode.sampling's docstring:

  - temperature 0: a point mass on the argmax (ties: the lowest id);
  - top-k: keep every token whose probability is >= the k-th largest (ties at the cut kept);
  - top-p (after top-k): keep token x when the mass of the tokens strictly more likely than x
    is < top_p (so ties at the cut are all kept).
  """
  logits = np.asarray(logits, np.float64)
  if sampling.temperature == 0:
    return np.eye(logits.shape[-1])[np.argmax(logits, axis=-1)]
  z = logits / sampling.temperature
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  if sampling.top_k and sampling.top_k < p.shape[-1]:
    kth = np.sort(p, axis=-1)[..., -sampling.top_k, None]
    p = np.where(p >= kth, p, 0.0)
    p /= p.sum(-1, keepdims=True)
  if sampling.top_p < 1.0:
    above = (p[..., None, :] * (p[..., None, :] > p[..., :, None])).sum(-1)  # mass above x
    p = np.where(above < sampling.top_p, p, 0.0)
    p /= p.sum(-1, keepdims=True)
  return p


def exact_law(
  model: LoadedModel,
  prompt: list[int],
  n: int,
  sampling: Sampling,
  eos: int | None = None,
) -> np.ndarray:
  """P(first n generated tokens = cell) for every cell, f64[V**n] (row-major cells).

  With `eos`, generation stops after it: a cell then stands for the sequence up to its first
  EOS padded with EOS (see `counts`), and cells with anything else after an EOS are impossible.
  """
  prefixes = list(itertools.product(range(V), repeat=n - 1))
  tokens = jnp.asarray([prompt + list(p) for p in prefixes], jnp.int32)
  logits, _ = forward(
    model.params, tokens, KVCache.init(model.config, *tokens.shape), config=model.config
  )
  probs = oracle_probs(np.asarray(logits), sampling)
  start = len(prompt) - 1
  law = np.zeros([V] * n)
  for i, prefix in enumerate(prefixes):
    p, stopped = 1.0, False
    for j, tok in enumerate(prefix):
      if stopped:
        p *= tok == eos
      else:
        p *= probs[i, start + j, tok]
        stopped = tok == eos
    last = probs[i, start + n - 1]
    law[prefix] = p * (np.eye(V)[eos] if stopped else last)
  return law.reshape(-1)


def counts(sequences: list[list[int]], n: int, eos: int | None = None) -> np.ndarray:
  """Observed counts per cell of the first n tokens; sequences that stopped at `eos` are padded
  with it."""
  padded = [list(s[:n]) + [eos] * (n - len(s[:n])) for s in sequences]
  cells = np.ravel_multi_index(np.asarray(padded).T, [V] * n)
  return np.bincount(cells, minlength=V**n)


def fit_z(observed: np.ndarray, law: np.ndarray) -> float:
  """Wilson–Hilferty z of the chi-square statistic, small cells pooled."""
  N = observed.sum()
  expected = N * law
  small = expected < 5
  obs = np.append(observed[~small], observed[small].sum())
  exp = np.append(expected[~small], expected[small].sum())
  if exp[-1] == 0:
    obs, exp = obs[:-1], exp[:-1]
  if (observed[law == 0] > 0).any():
    return float("inf")  # an impossible sequence was produced
  chi2 = float(((obs - exp) ** 2 / exp).sum())
  df = len(exp) - 1
  if df == 0:  # a point mass (a greedy row): only an impossible sequence, caught above, fails
    return 0.0
  return ((chi2 / df) ** (1 / 3) - (1 - 2 / (9 * df))) / (2 / (9 * df)) ** 0.5


def total_variation(observed: np.ndarray, law: np.ndarray) -> float:
  return 0.5 * float(np.abs(observed / observed.sum() - law).sum())
