"""How ssd adapts to the batch it runs: the backup a cache miss falls back to when
`SpecConfig.backup` is "auto" (Theorem 17), and the fan-out at each batch size.

A round in which any of the b rows misses waits for the backup, so the chance that a round pays
for a backup grows with the batch: the neural backup (the draft drafts now) emits more tokens per
miss, the fast one (random tokens) costs nothing. Theorem 17 gives the batch size b* from which
the fast backup wins; "auto" is neural below b*, fast from it on. Everything here is a function
of the configuration and the two models' sizes: the plan is decided before a program runs.
"""

from __future__ import annotations

from typing import Literal

from ssd_jax.config import ModelConfig, SpecConfig
from ssd_jax.decode import theory

TYPICAL_ACCEPTANCE = 0.7  # the per-token acceptance `e_hit` is estimated from when not measured


def backup_threshold(spec: SpecConfig, target: ModelConfig, draft: ModelConfig) -> float:
  """b*: `spec.auto_batch_threshold` if given, else Theorem 17 with `spec.calibration` (each
  field it leaves None estimated: see `config.Calibration`)."""
  if spec.auto_batch_threshold is not None:
    return spec.auto_batch_threshold
  c = spec.calibration
  e_hit = c.e_hit
  if e_hit is None:
    e_hit = theory.expected_tokens_sd(TYPICAL_ACCEPTANCE, spec.lookahead)
  e_miss = e_hit if c.e_miss_neural is None else c.e_miss_neural
  t_neural = c.t_neural
  if t_neural is None:
    t_neural = spec.lookahead * draft.num_params / target.num_params
  return theory.backup_threshold(c.p_hit, e_hit, e_miss, t_neural)


def resolve_backup(
  spec: SpecConfig, batch_size: int, target: ModelConfig, draft: ModelConfig
) -> Literal["neural", "fast"]:
  """The backup `spec` runs at `batch_size` rows: its own, or Theorem 17's choice for "auto"."""
  if spec.backup != "auto":
    return spec.backup
  return theory.choose_backup(batch_size, backup_threshold(spec, target, draft))


def fan_out_for(spec: SpecConfig, batch_size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """The hit and miss fan-outs of `spec` for a round over `batch_size` rows.

  The expansion's work grows with the branches of every row (rows x Σ F_j), the verification's
  far less (it streams the target's weights once for all rows), so a fan-out one row affords
  outgrows the verification it must hide under as the batch fills (on a 2-core CPU, ssd fell
  to 0.79x sd at batch 8 with a fixed fan-out). The rule: every row keeps at least one branch
  per accept depth, and the batch's branches stay at what one row gets alone, F_j / B rounded
  up (F = 4 per depth: 4, 2, 1, 1 at 1, 2, 4, 8 rows). The miss list scales alike, or follows
  the hit list where their sums would differ.
  """
  scale = lambda fan_out: tuple(-(-f // batch_size) if f else 0 for f in fan_out)
  hit = scale(spec.fan_out)
  miss = scale(spec.fan_out_miss) if spec.fan_out_miss else hit
  if sum(miss) != sum(hit):
    miss = hit
  return hit, miss
