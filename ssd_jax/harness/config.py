"""One run's configuration: what `python -m ssd_jax.run` parses its command line into, once.

Five sections, as the flags are grouped: the models, the decoding, the speculation, the layout
and the output. Every field is the value of one flag (`--fan-out` is `speculation.fan_out`), so
errors name the flag. A field left None was not given: the mode's default applies, and a flag
that no mode of the run reads is refused rather than ignored. The library (`harness.compare`,
the benchmarks) takes this object; nothing below the command line sees argparse.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from ssd_jax.config import DEFAULT_FAN_OUT, DEFAULT_LOOKAHEAD, MODES, SpecConfig
from ssd_jax.decode import tree
from ssd_jax.decode.sampling import Sampling
from ssd_jax.models.registry import default_draft, default_draft_dtype

DEFAULT_TARGET = "smollm2-135m"
GEOMETRIC_BRANCHES_PER_DEPTH = 2  # --geometric spends the branches of a uniform fan-out of 2


def flag(name: str) -> str:
  """The command-line flag of a field: fan_out -> --fan-out."""
  return "--" + name.replace("_", "-")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Models:
  """Which models, and how they sit in memory.

  Attributes:
    target: registry name or path of the verifier.
    draft: name or path of the draft of sd and ssd; None: each mode's default draft for the
      target (`models.registry.DEFAULT_DRAFTS`).
    draft_vocab: the draft's head: its N most frequent tokens, 0 for all; None: the draft's
      default (see `speculator.local.default_draft_vocab`).
    dtype: the target's weights and compute ("float32" or "bfloat16").
    draft_dtype: the draft's weights in memory; None: `registry.default_draft_dtype`.
  """

  target: str = DEFAULT_TARGET
  draft: str | None = None
  draft_vocab: int | None = None
  dtype: str = "float32"
  draft_dtype: str | None = None

  def __post_init__(self):
    if self.draft_vocab is not None and self.draft_vocab < 0:
      raise ValueError("--draft-vocab must be >= 0 (0 = the whole vocabulary)")

  def draft_for(self, mode: str) -> str | None:
    """The draft `mode` runs (None for ar)."""
    if mode == "ar":
      return None
    return self.draft or default_draft(self.target, mode)

  @property
  def resolved_draft_dtype(self) -> str:
    return self.draft_dtype or default_draft_dtype(self.dtype)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Decoding:
  """What to decode and how to sample it.

  Attributes:
    prompts: "bundled", "humaneval", "sharegpt" or a path to a .jsonl file of prompts.
    num_prompts: how many (None: all of the bundled ones, 8 of the others).
    max_new_tokens: tokens to generate per prompt, at most.
    sampling: temperature, top-k and top-p (the same for every prompt).
    batch_size: prompts decoded together.
    seed: the PRNG seed (runs are deterministic per seed and configuration).
    ignore_eos: always generate max_new_tokens.
    chat_template: wrap each prompt in the model's chat template.
  """

  prompts: str = "bundled"
  num_prompts: int | None = None
  max_new_tokens: int = 128
  sampling: Sampling = dataclasses.field(default_factory=Sampling)
  batch_size: int = 1
  seed: int = 0
  ignore_eos: bool = False
  chat_template: bool = True

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError("--max-new-tokens must be >= 1")
    if self.batch_size < 1:
      raise ValueError("--batch-size must be >= 1")
    if self.num_prompts is not None and self.num_prompts < 1:
      raise ValueError("--num-prompts must be >= 1")

  @property
  def prompt_limit(self) -> int | None:
    return self.num_prompts or (None if self.prompts == "bundled" else 8)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Speculation:
  """sd's and ssd's knobs (None: not given; the default applies). See `SpecConfig`.

  Attributes:
    lookahead: draft tokens per round (sd and ssd; default DEFAULT_LOOKAHEAD).
    fan_out: ssd's uniform fan-out (default DEFAULT_FAN_OUT).
    fan_out_list: ssd's fan-out per accept depth 0..lookahead.
    geometric: ssd's fan-out by Theorem 12, the branch budget of a uniform fan-out of 2.
    acceptance_rate, power_law: Theorem 12's inputs (with `geometric`; 0.7 and 0.5).
    fan_out_miss_list: ssd's fan-out after a cache miss.
    saguaro_c: Saguaro sampling's C (ssd; default 1).
    backup: after a cache miss, "neural", "fast" or "auto" (ssd; default neural).
  """

  lookahead: int | None = None
  fan_out: int | None = None
  fan_out_list: tuple[int, ...] | None = None
  geometric: bool = False
  acceptance_rate: float | None = None
  power_law: float | None = None
  fan_out_miss_list: tuple[int, ...] | None = None
  saguaro_c: float | None = None
  backup: str | None = None

  SSD_ONLY = (
    "fan_out",
    "fan_out_list",
    "geometric",
    "acceptance_rate",
    "power_law",
    "fan_out_miss_list",
    "saguaro_c",
    "backup",
  )

  def __post_init__(self):
    if (
      sum(x is not None and x is not False for x in (self.fan_out, self.fan_out_list))
      + bool(self.geometric)
      > 1
    ):
      raise ValueError("give one of --fan-out, --fan-out-list and --geometric")
    if not self.geometric and (self.acceptance_rate is not None or self.power_law is not None):
      raise ValueError("--acceptance-rate and --power-law only apply with --geometric")
    if self.lookahead is not None and self.lookahead < 1:
      raise ValueError("--lookahead must be >= 1")
    if self.fan_out is not None and self.fan_out < 1:
      raise ValueError("--fan-out must be >= 1")
    if self.saguaro_c is not None and not 0.0 <= self.saguaro_c <= 1.0:
      raise ValueError(f"--saguaro-c must be in [0, 1] (1 = off), got {self.saguaro_c}")

  def given(self, names) -> list[str]:
    """The flags among `names` that were given."""
    return [flag(n) for n in names if getattr(self, n) not in (None, False)]

  def fan_outs(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """ssd's hit and miss fan-out lists."""
    lookahead = self.lookahead or DEFAULT_LOOKAHEAD
    if self.fan_out_list:
      hit = tuple(self.fan_out_list)
    elif self.geometric:
      acceptance = 0.7 if self.acceptance_rate is None else self.acceptance_rate
      exponent = 0.5 if self.power_law is None else self.power_law
      budget = GEOMETRIC_BRANCHES_PER_DEPTH * (lookahead + 1)
      hit = tree.geometric(lookahead, budget, acceptance, exponent)
    else:
      hit = tree.uniform(lookahead, self.fan_out or DEFAULT_FAN_OUT)
    return hit, tuple(self.fan_out_miss_list or ())

  def spec(self, mode: str) -> SpecConfig:
    """The `SpecConfig` of `mode` (raises ValueError naming what is wrong)."""
    if mode == "ar":
      return SpecConfig(mode="ar")
    if mode == "sd":
      return SpecConfig(mode="sd", lookahead=self.lookahead)
    hit, miss = self.fan_outs()
    return SpecConfig(
      mode="ssd",
      lookahead=self.lookahead,
      fan_out=hit,
      fan_out_miss=miss,
      saguaro_c=1.0 if self.saguaro_c is None else self.saguaro_c,
      backup=self.backup or "neural",
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Layout:
  """Where the models run.

  Attributes:
    target_devices: the target's tensor-parallel mesh size.
    draft_devices: the draft's mesh size (its own devices).
    draft_placement: where ssd's draft runs: "auto", "device" or "process" (`Placement`).
    target_cores: this process's cores on a CPU host: N (cores [0, N)) or "all"; None: all but
      one with a speculator process, else every core.
    speculator: "host:port" of a speculator another host runs.
    speculator_token_file: the file holding that speculator's token (None: the environment
      variable SSD_JAX_SPECULATOR_TOKEN if set, else no token).
    speculator_pipe: how arrays reach a speculator process: "shm" or "transfer".
    attention_impl: "reference", "xla" or "pallas" (None: the platform's default).
  """

  target_devices: int = 1
  draft_devices: int = 1
  draft_placement: Literal["auto", "device", "process"] | None = None
  target_cores: str | None = None
  speculator: str | None = None
  speculator_token_file: str | None = None
  speculator_pipe: str | None = None
  attention_impl: str | None = None

  SSD_ONLY = ("draft_placement", "speculator", "speculator_token_file", "speculator_pipe")

  def __post_init__(self):
    if self.target_devices < 1 or self.draft_devices < 1:
      raise ValueError("--target-devices and --draft-devices must be >= 1")
    if self.speculator_token_file is not None and self.speculator is None:
      raise ValueError(
        "--speculator-token-file applies only with --speculator (a speculator process this run "
        "starts gets a token of its own)"
      )

  def given(self, names) -> list[str]:
    return [flag(n) for n in names if getattr(self, n) is not None]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Output:
  """What the run writes.

  Attributes:
    json: write every mode's metrics, the configuration and the environment here.
    progress: show a progress bar.
    all_cores: also run ar and sd on every core of the machine (a CPU layout with a speculator
      process): None decides by the run (yes for every mode at once, no for a single mode).
  """

  json: Path | None = None
  progress: bool = True
  all_cores: bool | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
  """One run of `python -m ssd_jax.run` (see the module docstring).

  Attributes:
    modes: the modes to run, in order ("ar", "sd", "ssd").
    chat: talk through the last mode instead (reads stdin); chat_metrics: a line per reply.
  """

  modes: tuple[str, ...] = MODES
  models: Models = Models()
  decoding: Decoding = Decoding()
  speculation: Speculation = Speculation()
  layout: Layout = Layout()
  output: Output = Output()
  chat: bool = False
  chat_metrics: bool = False

  def __post_init__(self):
    if not self.modes or any(m not in MODES for m in self.modes):
      raise ValueError(f"--mode must be one of {', '.join(MODES)} or all, got {self.modes}")
    if self.chat:  # one mode talks: the last (ssd under --mode all)
      object.__setattr__(self, "modes", self.modes[-1:])
    self._refuse_unread_flags()
    for mode in self.speculative_modes:
      if self.models.draft_for(mode) is None:
        raise ValueError(
          f"--target {self.models.target} needs --draft (a draft with its vocabulary)"
        )
    if self.chat and self.output.json is not None:
      raise ValueError("--chat and --json cannot be combined")
    if self.chat_metrics and not self.chat:
      raise ValueError("--metrics only applies to --chat")
    for mode in self.modes:  # every mode's SpecConfig constructs, or the flag is named
      self.spec(mode)

  def _refuse_unread_flags(self) -> None:
    """A flag no mode of the run reads is refused: a silently ignored flag misleads."""
    modes = set(self.modes)
    ssd_only = self.speculation.given(Speculation.SSD_ONLY) + self.layout.given(Layout.SSD_ONLY)
    speculative = self.speculation.given(["lookahead"]) + [
      flag(n) for n in ("draft_vocab", "draft_dtype") if getattr(self.models, n) is not None
    ]
    if self.layout.draft_devices != 1:
      speculative.append("--draft-devices")
    for given, which, absent in (
      (ssd_only, "ssd", "ssd" not in modes),
      (speculative, "sd and ssd", modes == {"ar"}),
    ):
      if absent and given:
        verb = "applies" if len(given) == 1 else "apply"
        raise ValueError(
          f"{', '.join(given)} {verb} only to {which}, which --mode {self.mode_flag} does not run"
        )

  @property
  def mode_flag(self) -> str:
    return "all" if self.modes == MODES else ",".join(self.modes)

  @property
  def speculative_modes(self) -> list[str]:
    return [m for m in self.modes if m != "ar"]

  @property
  def lookahead(self) -> int:
    return self.speculation.lookahead or DEFAULT_LOOKAHEAD

  def spec(self, mode: str) -> SpecConfig:
    """The `SpecConfig` of `mode` (raises ValueError naming what is wrong)."""
    return self.speculation.spec(mode)

  def to_json(self) -> dict:
    """The configuration as JSON, each mode's draft resolved."""
    out = dataclasses.asdict(self)
    out["output"]["json"] = None if self.output.json is None else str(self.output.json)
    out["models"]["drafts"] = {m: self.models.draft_for(m) for m in self.speculative_modes}
    out["models"]["draft_dtype"] = self.models.resolved_draft_dtype
    out["specs"] = {m: dataclasses.asdict(self.spec(m)) for m in self.modes}
    return out
