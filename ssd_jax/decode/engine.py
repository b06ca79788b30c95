"""The public decoding API: an Engine that owns the meshes and weights and runs ar / sd / ssd.

How a run is driven (one controller thread, JAX async dispatch doing the overlap):

1. The target's params live on the target mesh (tensor-parallel over `target_devices`), the
   draft's on a mesh of its own devices. A jitted program never mixes the two meshes; small
   pytrees cross with `jax.device_put`: the verification `Outcome` (a few ints per sequence)
   towards the draft, the `Speculation` (tokens, and q when sampling) towards the target.
2. Every round the controller dispatches that round's programs and returns immediately; it then
   reads the *previous* round's `Report` (emitted tokens, done flags): the one host sync per
   round, lagging a round so the devices never wait for Python.
3. The loops themselves live in `baselines` (ar, sd) and `ssd`; this module prepares inputs,
   places them, times prefill and decode, and assembles tokens and metrics.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ssd_jax import sharding
from ssd_jax.config import SpecConfig
from ssd_jax.decode import draft as draft_lib
from ssd_jax.decode import target as target_lib
from ssd_jax.decode import theory
from ssd_jax.decode.metrics import Metrics, RoundTimer
from ssd_jax.decode.sampling import Sampling
from ssd_jax.decode.state import Report
from ssd_jax.models.prefill import bucket_length, pad_prompts
from ssd_jax.models.registry import LoadedModel
from ssd_jax.models.transformer import head_subset

OnTokens = Callable[[int, list[int]], None]


@dataclasses.dataclass(frozen=True)
class Generation:
  """Tokens generated for each prompt (EOS included when emitted) and the run's metrics."""

  tokens: list[list[int]]
  metrics: Metrics


@dataclasses.dataclass
class Run:
  """Everything one generate() call's loop needs (host-side; not a pytree)."""

  engine: Engine
  spec: SpecConfig
  sampling: Sampling
  eos_ids: tuple[int, ...]
  capacity: int
  batch_size: int
  timer: RoundTimer | None
  on_report: Callable[[Report], bool]  # returns True when every sequence is done

  @property
  def target_kwargs(self) -> dict:
    e = self.engine
    return dict(
      config=e.target.config,
      sampling=self.sampling,
      eos_ids=self.eos_ids,
      attention_impl=e.attention_impl,
    )

  def to_draft(self, tree):
    return jax.device_put(tree, sharding.replicated(self.engine.draft_mesh))

  def to_target(self, tree):
    return jax.device_put(tree, sharding.replicated(self.engine.target_mesh))


def drive(run: Run, dispatch_round: Callable[[], Report]) -> int:
  """Dispatch rounds until every sequence is done, reading each report one round late."""
  pending, rounds = None, 0
  while True:
    report = dispatch_round()
    rounds += 1
    if pending is not None and run.on_report(jax.device_get(pending)):
      return rounds
    pending = report


class Engine:
  """A target (and optionally a draft) placed on devices, ready to generate.

  Args:
    target: the verifier model (see `ssd_jax.models.registry.load_model`).
    draft: the drafter; required for "sd" and "ssd". Must share the target's vocabulary.
    target_devices: size of the target's tensor-parallel mesh.
    draft_devices: size of the draft's mesh (its own devices, after the target's).
    attention_impl: "reference", "xla" or "pallas"; default: the fastest correct one here.
    devices: the devices to use (default: all of the default backend).
    draft_vocab: restrict the draft's LM head to N tokens (the first N of the draft's token
      ranking) or to an explicit list of token ids: cheaper drafting, same outputs (see
      `transformer.head_subset`); default: the whole vocabulary.
  """

  def __init__(
    self,
    target: LoadedModel,
    draft: LoadedModel | None = None,
    *,
    target_devices: int = 1,
    draft_devices: int = 1,
    attention_impl: str | None = None,
    devices: Sequence[jax.Device] | None = None,
    draft_vocab: int | Sequence[int] | None = None,
  ):
    if draft is not None and draft.config.vocab_size != target.config.vocab_size:
      raise ValueError(
        f"draft {draft.name!r} has a vocabulary of {draft.config.vocab_size} tokens but target "
        f"{target.name!r} has {target.config.vocab_size}; speculative decoding needs the same "
        "tokenizer and vocabulary for both"
      )
    devices = list(devices if devices is not None else jax.devices())
    # One device in all: the draft shares it (allowed, with a warning). Otherwise too few
    # devices is an error from make_meshes.
    self.shared = draft is not None and len(devices) == 1 and target_devices == 1
    if self.shared:
      warnings.warn(
        "only one device: the draft shares the target's device, so ssd cannot overlap drafting "
        "with verification (on CPU, ask for more virtual devices: see --help)",
        stacklevel=2,
      )
    self.target, self.draft = target, draft
    self.target_mesh, self.draft_mesh = sharding.make_meshes(
      target_devices, draft_devices, devices, share=self.shared or draft is None
    )
    if attention_impl is None:
      from ssd_jax.kernels.backend import default_impl  # noqa: PLC0415 (imports Pallas)

      attention_impl = default_impl(devices[0].platform)
    self.attention_impl = attention_impl
    self.target_params = sharding.place_params(target.params, target.config, self.target_mesh)
    self.calibration: dict[str, float] = {}
    self.draft_params = None
    if draft is not None:
      self.draft_params = sharding.place_params(draft.params, draft.config, self.draft_mesh)
      if draft_vocab is not None:
        head = head_subset(draft.params, _vocab_ids(draft, draft_vocab), draft.config)
        replicated = sharding.replicated(self.draft_mesh)
        self.draft_params = self.draft_params | jax.device_put(head, replicated)
    elif draft_vocab is not None:
      raise ValueError("draft_vocab restricts a draft's head, but no draft was given")

  def backup_threshold(self, spec: SpecConfig) -> float:
    """b* of Theorem 17 for this pair: the batch size from which the fast backup wins.

    Uses `self.calibration` when set (measured: p_hit, e_hit, e_miss_neural, t_neural = backup
    drafting time / verify time, e.g. from a previous run's metrics); otherwise estimates the
    backup's cost from parameter counts (lookahead draft steps, each costing the draft/target
    parameter ratio of a verification) with the paper's typical p_hit = 0.85 and a = 0.7.
    """
    c = dict(self.calibration)
    ratio = self.draft.config.num_params / self.target.config.num_params
    c.setdefault("t_neural", spec.lookahead * ratio)
    c.setdefault("p_hit", 0.85)
    c.setdefault("e_hit", theory.expected_tokens_sd(0.7, spec.lookahead))
    c.setdefault("e_miss_neural", c["e_hit"])
    return theory.backup_threshold(c["p_hit"], c["e_hit"], c["e_miss_neural"], c["t_neural"])

  def generate(
    self,
    prompts: Sequence[Sequence[int]],
    *,
    spec: SpecConfig | None = None,
    sampling: Sampling | None = None,
    max_new_tokens: int | Sequence[int] = 64,
    temperatures: Sequence[float] | None = None,
    seed: int = 0,
    ignore_eos: bool = False,
    capacity: int | None = None,
    on_tokens: OnTokens | None = None,
    trace: bool = False,
  ) -> Generation:
    """Generate continuations of token-id prompts (ragged lengths are fine).

    Args:
      prompts: B lists of token ids.
      spec: mode and speculation knobs (default: autoregressive).
      sampling: warp (top-k / top-p) and default temperature (default: greedy).
      max_new_tokens: budget, one int or one per prompt.
      temperatures: per-prompt temperatures overriding `sampling.temperature`.
      seed: PRNG seed; runs are deterministic per seed and configuration.
      ignore_eos: keep generating past EOS (fixed-length benchmarks).
      capacity: KV-cache slots per sequence (default: enough for prompt + budget + lookahead).
      on_tokens: called as on_tokens(row, new_tokens) after every round (streaming).
      trace: record per-round completion timestamps (a waiter thread per device).
    """
    spec = spec or SpecConfig(mode="ar", lookahead=0)
    sampling = sampling or Sampling()
    if spec.mode != "ar" and self.draft is None:
      raise ValueError(f"mode {spec.mode!r} needs a draft model")
    B = len(prompts)
    temps = (
      np.full(B, sampling.temperature, np.float32)
      if temperatures is None
      else (np.asarray(temperatures, np.float32))
    )
    budgets = np.broadcast_to(np.asarray(max_new_tokens, np.int32), (B,)).copy()
    if temps.shape != (B,) or (temps < 0).any():
      raise ValueError(f"temperatures must be {B} values >= 0, got {list(temps)}")
    if (budgets < 0).any():
      raise ValueError("max_new_tokens must be >= 0")
    sampling = dataclasses.replace(sampling, temperature=float(temps.max()))
    lookahead = spec.lookahead if spec.mode != "ar" else 0
    need = bucket_length(max(len(p) for p in prompts)) + int(budgets.max()) + lookahead + 2
    capacity = capacity or -(-need // 128) * 128
    if capacity < max(len(p) for p in prompts) + int(budgets.max()) + lookahead + 1:
      raise ValueError(
        f"capacity {capacity} cannot hold the longest prompt ({max(len(p) for p in prompts)} "
        f"tokens) + max_new_tokens ({int(budgets.max())}) + lookahead + 1; raise it"
      )
    tokens, lengths = pad_prompts(prompts, capacity)
    outputs: list[list[int]] = [[] for _ in range(B)]

    round_misses: list[bool] = []  # per round: did any active sequence miss the cache

    def on_report(report: Report) -> bool:
      round_misses.append(bool(((report.count > 0) & ~report.hit).any()))
      for b in np.nonzero(report.count)[0]:
        new = report.tokens[b, : report.count[b]].tolist()
        outputs[b].extend(new)
        if on_tokens is not None:
          on_tokens(int(b), new)
      return bool(report.done.all())

    eos = () if ignore_eos else self.target.config.eos_token_ids
    run = Run(self, spec, sampling, eos, capacity, B, RoundTimer() if trace else None, on_report)
    key = jax.random.key(seed)
    metrics = self._run(run, tokens, lengths, budgets, temps, key)
    return Generation(
      tokens=outputs, metrics=dataclasses.replace(metrics, round_misses=round_misses)
    )

  def _run(self, run: Run, tokens, lengths, budgets, temps, key) -> Metrics:
    from ssd_jax.decode import baselines, ssd  # noqa: PLC0415 (they import this module)

    spec, t0 = run.spec, time.perf_counter()
    key_target, key_draft = jax.random.split(key)
    tstate = target_lib.start(
      self.target_params,
      *run.to_target((tokens, lengths)),
      sharding.init_cache(
        self.target.config,
        self.target_mesh,
        run.batch_size,
        run.capacity,
        _dtype(self.target_params),
      ),
      *run.to_target((budgets, temps, key_target)),
      config=self.target.config,
      lookahead=spec.lookahead if spec.mode != "ar" else 0,
      attention_impl=self.attention_impl,
    )
    dstate = None
    if spec.mode != "ar":
      dstate = draft_lib.start(
        self.draft_params,
        *run.to_draft((tokens, lengths)),
        sharding.init_cache(
          self.draft.config,
          self.draft_mesh,
          run.batch_size,
          run.capacity,
          _dtype(self.draft_params),
        ),
        *run.to_draft((temps, key_draft)),
        config=self.draft.config,
        attention_impl=self.attention_impl,
      )
    jax.block_until_ready((tstate, dstate))
    t1 = time.perf_counter()
    if run.timer is not None:
      run.timer.t0 = t1
    loop = {"ar": baselines.run_ar, "sd": baselines.run_sd, "ssd": ssd.run_ssd}[spec.mode]
    tstate, loop_rounds, extra = loop(run, tstate, dstate)
    t2 = time.perf_counter()
    hist = np.asarray(jax.device_get(tstate.accept_hist)).sum(0)
    return Metrics(
      mode=spec.mode,
      lookahead=spec.lookahead if spec.mode != "ar" else 0,
      num_sequences=run.batch_size,
      active_sequences=int((budgets > 0).sum()),
      generated_tokens=int(jax.device_get(tstate.num_out).sum()),
      decode_seconds=t2 - t1,
      prefill_seconds=t1 - t0,
      loop_rounds=loop_rounds,
      accept_hist=hist,
      round_times=run.timer.close() if run.timer else {},
      extra=extra,
    )


def _dtype(params) -> jnp.dtype:
  return params["embed"].dtype


def _vocab_ids(draft: LoadedModel, draft_vocab: int | Sequence[int]) -> np.ndarray:
  """The token ids a restricted draft head scores: the first N of the draft's token ranking,
  or an explicit list."""
  if not isinstance(draft_vocab, int | np.integer):
    return np.asarray(draft_vocab)
  vocab = draft.config.vocab_size
  if not 1 <= draft_vocab <= vocab:
    raise ValueError(
      f"draft_vocab must be in [1, {vocab}] (the vocabulary size), got {draft_vocab}"
    )
  if draft.token_ranking is None:
    raise ValueError(
      f"draft {draft.name!r} has no token ranking (token_ranking.npy in its directory), so "
      "draft_vocab=N cannot pick its N most frequent tokens: pass explicit token ids, or omit "
      "draft_vocab to score the whole vocabulary"
    )
  if draft_vocab > draft.token_ranking.size:
    raise ValueError(
      f"draft_vocab={draft_vocab} but the token ranking of {draft.name!r} lists only "
      f"{draft.token_ranking.size} tokens"
    )
  return draft.token_ranking[:draft_vocab]
