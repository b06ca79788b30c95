"""The public decoding API: an Engine that owns the meshes and weights and runs ar / sd / ssd.

One SSD round through the files, in order:

1. `Engine.generate` validates the requests (`inputs.prepare`) and fixes the run's static
   `Plan` (`decode/plan.py`): every jitted program below is compiled for its half of it, once.
2. `decode.target.start` and the speculator's `start` (`speculator/local.py`, via
   `decode.draft.start`) prefill the prompts on their meshes; the target's params live on the
   target mesh (tensor-parallel over `target_devices`), the draft's on a mesh of its own devices
   or in a speculator process (`Placement`).
3. `loops.run_ssd` drives the rounds: `decode.target.step` verifies speculation r
   (`decode.verify`) while the speculator's `decode.speculate.expand` forks and decodes the
   likely outcomes of that same speculation; the outcome crosses to the draft (a few ints per
   row), `decode.speculate.lookup` serves speculation r + 1 from the cache or a backup, and it
   crosses back.
4. `loops.drive` reads each round's `Report` (the one host sync per round), a round late, so
   the host never waits for the device. This module turns the reports into tokens and
   `Metrics`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from collections.abc import Callable, Sequence

import jax
import numpy as np

from ssd_jax import sharding
from ssd_jax.config import SpecConfig
from ssd_jax.decode import policy
from ssd_jax.decode.plan import Plan
from ssd_jax.decode.sampling import Sampling
from ssd_jax.kernels import default_impl
from ssd_jax.models import placement as placement_lib
from ssd_jax.models.registry import LoadedModel
from ssd_jax.runtime import inputs
from ssd_jax.runtime.metrics import Metrics
from ssd_jax.runtime.requests import Event, Handle, Request
from ssd_jax.runtime.session import Session
from ssd_jax.speculator import LocalSite, Placement, Site, open_site
from ssd_jax.speculator.local import default_draft_vocab, draft_params, head_size
from ssd_jax.timing import NullTimer, RoundTimer

OnTokens = Callable[[int, list[int]], None]


@dataclasses.dataclass(frozen=True)
class Generation:
  """Tokens generated for each prompt (EOS included when emitted) and the run's metrics."""

  tokens: list[list[int]]
  metrics: Metrics


class Engine:
  """A target (and optionally a draft) placed on devices, ready to generate.

  Args:
    target: the verifier model (see `ssd_jax.load_model`).
    draft: the drafter; required for "sd" and "ssd". Must share the target's vocabulary.
    target_devices: size of the target's tensor-parallel mesh.
    draft_devices: size of the draft's mesh (its own devices, after the target's).
    attention_impl: "reference", "xla" or "pallas"; default: the fastest correct one here.
    devices: the devices to use (default: all of the default backend).
    draft_vocab: the draft's LM head: N tokens (the first N of the draft's token ranking), an
      explicit list of token ids, or 0 for the whole vocabulary: cheaper drafting, same outputs
      (see `transformer.head_subset`). Default: the draft's DEFAULT_DRAFT_VOCAB most frequent
      tokens when it ships a ranking, else the whole vocabulary (as `python -m ssd_jax.run`).
    placement: where ssd's draft side runs (`Placement`, or "auto", "device", "process" or
      "host:port"). "auto", the default: a speculator process on a CPU host where this process
      leaves a core free for it (`ssd_jax.cpu_layout()`), else a device of this process. sd
      always drafts beside the target, in this process. A speculator at an address that asks
      for a token: `Placement(address=..., token_file=...)`, or SSD_JAX_SPECULATOR_TOKEN.

  An engine with a speculator process owns it: `close()` (or leaving a `with` block, or the
  interpreter's exit) stops it.
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
    placement: Placement | str = "auto",
  ):
    if draft is not None and draft.config.vocab_size != target.config.vocab_size:
      raise ValueError(
        f"draft {draft.name!r} has a vocabulary of {draft.config.vocab_size} tokens but target "
        f"{target.name!r} has {target.config.vocab_size}; speculative decoding needs the same "
        "tokenizer and vocabulary for both"
      )
    if draft is None and draft_vocab is not None:
      raise ValueError("draft_vocab restricts a draft's head, but no draft was given")
    placement = Placement.of(placement)
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
    self.attention_impl = attention_impl or default_impl(devices[0].platform)
    self.target_params = placement_lib.place_params(target.params, target.config, self.target_mesh)
    self.draft_params = None
    self.local: Site | None = None
    self.site: Site | None = None  # where ssd's draft side runs
    if draft is not None:
      vocab = default_draft_vocab(draft, draft_vocab)
      self.draft_params = draft_params(draft, self.draft_mesh, vocab)
      self.local = LocalSite(self.draft_params, self.draft_mesh)
      self.site = open_site(
        placement,
        draft=draft,
        draft_vocab=vocab,
        params=self.draft_params,
        mesh=self.draft_mesh,
        attention_impl=self.attention_impl,
        device=self.target_mesh.devices.flat[0],
      )

  def close(self) -> None:
    """Stop the speculator process, if one runs (the engine can still decode: a later ssd
    run starts a new one)."""
    if self.site is not None:
      self.site.close()

  def __enter__(self) -> Engine:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def start_speculator(self) -> None:
    """Start ssd's speculator process now, if it has one (else it starts with the first ssd
    run): a speculator that cannot start or be reached then fails here, before any decoding."""
    if self.site is not None:
      self.site.start()

  @property
  def speculator_startup(self) -> dict[str, float] | None:
    """Seconds the speculator process took to start and to load its draft (None: none ran)."""
    return None if self.site is None else self.site.startup

  def _to_target(self, tree):
    return sharding.place(tree, self.target_mesh)

  @property
  def draft_head_size(self) -> int | None:
    """Columns of the draft's LM head (its vocabulary unless `draft_vocab` restricted it)."""
    return None if self.draft is None else head_size(self.draft_params, self.draft.config)

  def default_spec(self) -> SpecConfig:
    """What `generate` runs without a `spec`: ssd as configured by default (`SpecConfig()`)
    with a draft, autoregressive decoding without."""
    return SpecConfig() if self.draft is not None else SpecConfig(mode="ar")

  def plan(
    self,
    spec: SpecConfig,
    *,
    greedy: bool,
    ignore_eos: bool = False,
    batch_size: int = 1,
    adapt: bool = False,
  ) -> Plan:
    """The static plan of decoding `batch_size` rows with `spec` (see `decode/plan.py`;
    `adapt`: ssd's fan-out scaled to the rows, `policy.fan_out_for`)."""
    return Plan.make(
      spec,
      target=self.target.config,
      draft=None if self.draft is None else self.draft.config,
      head_size=self.draft_head_size,
      greedy=greedy,
      eos_ids=() if ignore_eos else self.target.config.eos_token_ids,
      attention_impl=self.attention_impl,
      batch_size=batch_size,
      adapt=adapt,
    )

  def generate(
    self,
    prompts: Sequence[Sequence[int]],
    *,
    spec: SpecConfig | None = None,
    sampling: Sampling | Sequence[Sampling] | None = None,
    max_new_tokens: int | Sequence[int] = 64,
    temperatures: Sequence[float] | None = None,
    seed: int = 0,
    ignore_eos: bool = False,
    capacity: int | None = None,
    on_tokens: OnTokens | None = None,
    trace: bool = False,
  ) -> Generation:
    """Generate continuations of token-id prompts (ragged lengths are fine).

    Sampling settings are data: any temperatures, top-k and top-p, per row or for the batch,
    run the same compiled programs (only "every row greedy" or not selects a program).

    Args:
      prompts: B lists of token ids.
      spec: mode and speculation knobs (default: `default_spec()`).
      sampling: one `Sampling` for every row, or one per row (default: greedy).
      max_new_tokens: budget, one int or one per prompt.
      temperatures: per-prompt temperatures overriding those of `sampling`.
      seed: PRNG seed; runs are deterministic per seed and configuration.
      ignore_eos: keep generating past EOS (fixed-length benchmarks).
      capacity: KV-cache slots per sequence (default: enough for prompt + budget + lookahead).
      on_tokens: called as on_tokens(row, new_tokens) after every round (streaming).
      trace: record per-round completion timestamps (a waiter thread per device).

    Raises:
      ValueError: bad input (the message names it); nothing has run on a device yet.
    """
    spec = spec or self.default_spec()
    batch, plan = self.validate(
      prompts,
      spec=spec,
      sampling=sampling,
      max_new_tokens=max_new_tokens,
      temperatures=temperatures,
      ignore_eos=ignore_eos,
      capacity=capacity,
    )
    B = batch.batch_size
    timer = RoundTimer() if trace else NullTimer()
    # One batch of B slots for the whole call, its prompts admitted in one program.
    session = Session(
      self,
      spec,
      max_batch_size=B,
      buckets=(B,),
      max_model_len=batch.capacity,
      max_queue=B,
      timer=timer,
      bulk=True,
      adapt=False,  # the fan-out asked for, as it is
    )
    handles: dict[int, Handle] = {}
    seeds = row_seeds(seed, B).tolist()
    try:
      for i, budget in enumerate(batch.budgets.tolist()):
        if budget <= 0:  # a padding row: nothing to generate
          continue
        stream = None if on_tokens is None else functools.partial(_stream, on_tokens, i)
        request = Request(
          prompt=prompts[i],
          sampling=batch.samplings[i],
          max_new_tokens=budget,
          ignore_eos=ignore_eos,
          seed=seeds[i],
        )
        handles[i] = session.submit(request, on_event=stream)
      metrics = self._decode(session, plan, batch, timer)
    except BaseException:  # a Ctrl-C in a chat, say: the draft side must not keep this run
      self._abandon(session, timer)
      raise
    tokens = [handles[i].tokens if i in handles else [] for i in range(batch.batch_size)]
    extra = metrics.extra | (self._ssd_extra(spec, plan) if plan.mode == "ssd" else {})
    return Generation(tokens=tokens, metrics=dataclasses.replace(metrics, extra=extra))

  def session(self, spec: SpecConfig | None = None, **options) -> Session:
    """A persistent batch of slots decoding with `spec` (default: `default_spec()`), which
    requests enter and leave between rounds: continuous batching (see `runtime.session`;
    `options` are `Session`'s)."""
    return Session(self, spec or self.default_spec(), **options)

  def validate(
    self,
    prompts: Sequence[Sequence[int]],
    *,
    spec: SpecConfig,
    sampling: Sampling | Sequence[Sampling] | None = None,
    max_new_tokens: int | Sequence[int] = 64,
    temperatures: Sequence[float] | None = None,
    ignore_eos: bool = False,
    capacity: int | None = None,
  ) -> tuple[inputs.Batch, Plan]:
    """The host arrays and static plan `generate` would run with these arguments; raises
    ValueError (naming the input) for anything it would refuse. Runs nothing on a device."""
    if spec.mode != "ar" and self.draft is None:
      raise ValueError(f"mode {spec.mode!r} needs a draft model")
    models = [self.target.config] + ([self.draft.config] if spec.mode != "ar" else [])
    batch = inputs.prepare(
      prompts,
      models=models,
      sampling=sampling,
      temperatures=temperatures,
      max_new_tokens=max_new_tokens,
      lookahead=spec.lookahead,
      capacity=capacity,
      meshes=[self.target_mesh, self.draft_mesh][: len(models)],
    )
    plan = self.plan(spec, greedy=batch.greedy, ignore_eos=ignore_eos, batch_size=batch.batch_size)
    return batch, plan

  def _ssd_extra(self, spec: SpecConfig, plan: Plan) -> dict:
    extra = {"fan_out": list(plan.draft.fan_out), "fan_out_miss": list(plan.draft.fan_out_miss)}
    if spec.backup == "auto":
      threshold = policy.backup_threshold(spec, self.target.config, self.draft.config)
      extra |= {"backup": plan.draft.backup, "backup_threshold": threshold}
    return extra

  def _decode(self, session: Session, plan: Plan, batch: inputs.Batch, timer) -> Metrics:
    """Admit every request (prefill both sides), run the rounds until all end, measure."""
    t0 = time.perf_counter()
    session.admit()
    session.ready()
    t1 = time.perf_counter()
    timer.start()
    session.run()
    t2 = time.perf_counter()
    stats, speculator = session.stats, session.close()
    extra = {}
    if speculator is not None and speculator.compiles is not None:
      extra["speculator_compiles"] = speculator.compiles
    if speculator is not None and speculator.served_by_target is not None:
      extra["rounds_served_by_target"] = speculator.served_by_target
    drafted = list(stats.drafted)
    return Metrics(
      mode=plan.mode,
      lookahead=plan.target.lookahead,
      num_sequences=batch.batch_size,
      active_sequences=int((batch.budgets > 0).sum()),
      generated_tokens=stats.generated,
      decode_seconds=t2 - t1,
      prefill_seconds=t1 - t0,
      loop_rounds=stats.dispatched,
      accept_hist=stats.accept_hist.copy(),
      round_times=timer.close(),
      round_drafted=drafted,
      backup_rounds=sum(drafted[1:]) if plan.mode == "ssd" else 0,
      extra=extra,
    )

  def _abandon(self, session: Session, timer) -> None:
    """End an interrupted run: the draft side ends it too (a speculator process that cannot,
    its channel cut mid-message, is stopped; the next run starts another), the timer's threads
    stop."""
    timer.close()
    try:
      session.close()
    except Exception:
      self.close()


def _stream(on_tokens: OnTokens, row: int, event: Event) -> None:
  if event.tokens:
    on_tokens(row, event.tokens)


def row_seeds(seed: int, rows: int) -> np.ndarray:
  """The rows' seeds u32[rows] in a `generate(seed=seed)` call: deterministic per seed, and no
  two rows of a call share a random stream. The call's seed is hashed once (numpy's
  SeedSequence); row i takes that plus i through murmur3's 32-bit finalizer, a bijection of
  u32, so rows differ by construction and neighbouring rows' seeds are well mixed. Vectorized:
  a call of 50,000 rows pays microseconds, not a hash per row in Python."""
  base = np.random.SeedSequence(seed).generate_state(1)[0]
  h = base + np.arange(rows, dtype=np.uint32)  # u32 arithmetic wraps, as the finalizer needs
  h ^= h >> np.uint32(16)
  h *= np.uint32(0x85EBCA6B)
  h ^= h >> np.uint32(13)
  h *= np.uint32(0xC2B2AE35)
  h ^= h >> np.uint32(16)
  return h
