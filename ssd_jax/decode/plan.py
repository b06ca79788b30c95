"""The static plan of one run: the one argument every jitted decode program is compiled for.

Everything that changes a program's shape or structure lives here and nowhere else (models,
lookahead, fan-outs, Saguaro's C, the backup, the attention implementation, whether every row
is greedy, the EOS ids); everything that varies per request (temperatures, top-k, top-p, budgets,
prompts, seeds) is array data. A `Plan` has two halves, one per side of the loop, so the target's
programs are not recompiled for a draft-only change and the draft side can be sent, as it is, to
a speculator in another process.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from ssd_jax.config import ModelConfig, SpecConfig
from ssd_jax.decode import policy


@dataclasses.dataclass(frozen=True, kw_only=True)
class TargetPlan:
  """What the target's programs (`target.start`, `target.step`) are compiled for.

  Attributes:
    config: the target's architecture.
    lookahead: draft tokens verified per round (0: autoregressive).
    greedy: every row has temperature 0 (no distributions are computed or moved).
    eos_ids: tokens that end a sequence (empty: generate the whole budget).
    attention_impl: tree-attention implementation ("reference", "xla" or "pallas").
  """

  config: ModelConfig
  lookahead: int
  greedy: bool
  eos_ids: tuple[int, ...]
  attention_impl: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class DraftPlan:
  """What the draft's programs (`draft.*`, `speculate.*`) are compiled for.

  Attributes:
    config: the draft's architecture.
    head_size: columns of the draft's LM head (the vocabulary, or fewer when restricted).
    lookahead: tokens per speculation.
    fan_out: fork candidates per accept depth 0..lookahead after a cache hit (F^p); () when
      nothing forks (sd without Saguaro sampling).
    fan_out_miss: the same after a miss (F^b); equal to `fan_out` unless given.
    saguaro_c: Saguaro sampling's C (1 = plain draft sampling).
    backup: what a cache miss falls back to, resolved: "neural" or "fast".
    expands: ssd: every proposal (the first, and the neural backup's) is followed by an
      expansion whose glue forward writes the keys and values of all its tokens, so drafting
      need not write its last token's.
    greedy, attention_impl: as in `TargetPlan`.
  """

  config: ModelConfig
  head_size: int
  lookahead: int
  fan_out: tuple[int, ...]
  fan_out_miss: tuple[int, ...]
  saguaro_c: float
  backup: Literal["neural", "fast"]
  expands: bool
  greedy: bool
  attention_impl: str

  def __post_init__(self):
    widest = max((*self.fan_out, *self.fan_out_miss), default=0)
    if widest > self.head_size:
      raise ValueError(
        f"a fan-out of {widest} forks more tokens than the draft's head scores "
        f"({self.head_size}: its vocabulary, or --draft-vocab / Engine(draft_vocab=)); lower "
        "--fan-out / --fan-out-list / --fan-out-miss-list or raise --draft-vocab"
      )

  def to_json(self) -> dict:
    """Every field but the config (a speculator process has its own, from the same files)."""
    fields = dataclasses.asdict(self)
    del fields["config"]
    return fields

  @classmethod
  def from_json(cls, fields: dict, config: ModelConfig) -> DraftPlan:
    tuples = {k: tuple(v) for k, v in fields.items() if isinstance(v, list)}
    return cls(config=config, **(fields | tuples))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
  """One run's static plan: the mode and each side's half."""

  mode: Literal["ar", "sd", "ssd"]
  target: TargetPlan
  draft: DraftPlan | None

  @classmethod
  def make(
    cls,
    spec: SpecConfig,
    *,
    target: ModelConfig,
    draft: ModelConfig | None,
    head_size: int | None,
    greedy: bool,
    eos_ids: tuple[int, ...],
    attention_impl: str,
    batch_size: int = 1,
    adapt: bool = False,
  ) -> Plan:
    """The plan for decoding `batch_size` rows with `spec` ("auto" backup resolved for that
    many rows: `policy.resolve_backup`; with `adapt`, the fan-out too: `policy.fan_out_for`)."""
    target_plan = TargetPlan(
      config=target,
      lookahead=spec.lookahead,
      greedy=greedy,
      eos_ids=tuple(eos_ids),
      attention_impl=attention_impl,
    )
    if spec.mode == "ar":
      return cls(mode="ar", target=target_plan, draft=None)
    if draft is None:
      raise ValueError(f"mode {spec.mode!r} needs a draft model")
    fan_out, fan_out_miss = spec.fan_out, spec.fan_out_miss or spec.fan_out
    if adapt and spec.mode == "ssd":
      fan_out, fan_out_miss = policy.fan_out_for(spec, batch_size)
    draft_plan = DraftPlan(
      config=draft,
      head_size=head_size or draft.vocab_size,
      lookahead=spec.lookahead,
      fan_out=fan_out,
      fan_out_miss=fan_out_miss,
      saguaro_c=spec.saguaro_c,
      backup=policy.resolve_backup(spec, batch_size, target, draft)
      if spec.mode == "ssd"
      else "neural",
      expands=spec.mode == "ssd",
      greedy=greedy,
      attention_impl=attention_impl,
    )
    return cls(mode=spec.mode, target=target_plan, draft=draft_plan)
