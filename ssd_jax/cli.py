"""What `python -m ssd_jax.run` and `python -m ssd_jax.bench` share: device set-up before JAX
starts, the drafts' defaults (which, their head, their dtype), and argparse value types that
refuse bad numbers early."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import sys
import threading
import time
import warnings

DEFAULT_DRAFT_VOCAB = 8192
# The shipped draft each speculative mode of the default target runs unless --draft says
# otherwise: the benchmark sweep's pick (docs/DRAFT.md, docs/BENCHMARKS.md).
DEFAULT_DRAFTS = {"sd": "smollm2-135m-draft", "ssd": "smollm2-135m-draft-wide"}


def draft_dtype(requested: str | None, target_dtype: str = "float32") -> str:
  """The draft's weights in memory: as asked, else float16 beside a float32 target (the shipped
  drafts' own precision, computed in float32: half the memory traffic of every drafting step,
  which on a CPU a verification on the next core shares), else the target's."""
  if requested is not None:
    return requested
  return "float16" if target_dtype == "float32" else target_dtype


def setup_devices(target_devices: int, draft_devices: int = 1) -> None:
  """Enough virtual CPU devices for the meshes, created before JAX starts its backend: the target
  mesh and the draft's, and at least twice the target mesh (fewer can deadlock XLA's CPU
  collectives)."""
  import jax  # noqa: PLC0415 (the flag must be set before any backend starts)

  need = max(target_devices + draft_devices, 2 * target_devices)
  # Never fewer than asked for already (main() may run inside a process that set more), and
  # keep whatever exists once the backends have started.
  with contextlib.suppress(RuntimeError):
    jax.config.update("jax_num_cpu_devices", max(need, jax.config.jax_num_cpu_devices))


def resolve_draft_vocab(requested: int | None, draft) -> int | None:
  """The draft head's size for Engine (None: the whole vocabulary).

  `requested` is the flag's value: None picks the default (the draft's DEFAULT_DRAFT_VOCAB most
  frequent tokens when it ships a token ranking, capped at the ranking's length; in the default
  run that makes proposals 1.5x and expansions 3x cheaper at the same tokens per round,
  docs/BENCHMARKS.md), 0 the whole vocabulary.
  """
  if draft is None:
    return None
  if requested is None:
    if draft.token_ranking is None:
      return None
    requested = min(DEFAULT_DRAFT_VOCAB, draft.token_ranking.size, draft.config.vocab_size)
  return requested or None


def finite_float(text: str) -> float:
  """argparse type: a finite float (NaN and infinities are refused)."""
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
  if not math.isfinite(value):
    raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
  return value


def pin_cores(cores: list[int] | tuple[int, ...]) -> None:
  """Run this process on `cores` only. Before JAX starts its CPU backend this also sizes XLA's
  thread pool to them (it reads the affinity mask once); afterwards it would not, so refuse."""
  if "jax" in sys.modules:
    from jax._src import xla_bridge  # noqa: PLC0415

    if xla_bridge.backends_are_initialized():
      raise RuntimeError("pin the process before JAX starts its backends")
  os.sched_setaffinity(0, set(cores))


def core_list(text: str) -> list[int]:
  """argparse type: "1" or "0,1" or "0-3" -> sorted core ids that exist here."""
  cores: set[int] = set()
  try:
    for part in text.split(","):
      lo, _, hi = part.partition("-")
      cores |= set(range(int(lo), int(hi or lo) + 1))
  except ValueError:
    raise argparse.ArgumentTypeError(
      f"expected core ids like 1 or 0,1 or 0-3, got {text!r}"
    ) from None
  missing = cores - set(range(os.cpu_count() or 1))
  if missing or not cores:
    raise argparse.ArgumentTypeError(f"no such cores here: {sorted(missing) or text}")
  return sorted(cores)


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where a command line's run goes: the draft side's placement and, on CPU, the cores.

  Attributes:
    placement: "device" (ssd's draft on a mesh of this process) or "process" (a speculator).
    target_cores: this process's cores (ar, sd with its draft beside the target, and the target
      of ssd); None: not pinned (every core).
    speculator_cores: the speculator process's cores (None: not started here).
    address: "host:port" of a remote speculator.
  """

  placement: str
  target_cores: tuple[int, ...] | None
  speculator_cores: tuple[int, ...] | None = None
  address: str | None = None

  def where(self, mode: str) -> str:
    """What `mode` ran on, for the table."""
    target = _cores(self.target_cores)
    if mode != "ssd" or self.placement == "device":
      return target if mode != "ssd" else f"{target} + a device"
    return f"{target} + {self.address or _cores(self.speculator_cores)}"

  def cores(self, mode: str) -> int:
    """CPU cores `mode` ran on (the speculator's one included for ssd in a process here)."""
    n = len(self.target_cores) if self.target_cores else os.cpu_count() or 1
    return n + (len(self.speculator_cores) if mode == "ssd" and self.speculator_cores else 0)


def _cores(cores) -> str:
  if not cores:
    return f"cores 0-{(os.cpu_count() or 1) - 1}"
  return f"core{'s' if len(cores) > 1 else ''} {','.join(map(str, cores))}"


def accelerator_present() -> bool:
  """Whether JAX would start on a GPU or TPU here, judged without starting a backend (which
  would fix the CPU thread pool's size before the process is pinned)."""
  platforms = os.environ.get("JAX_PLATFORMS", "").lower()
  if platforms:
    return platforms.split(",")[0] not in ("cpu", "")
  import importlib.util  # noqa: PLC0415

  names = ("jax_cuda13_plugin", "jax_cuda12_plugin", "jax_rocm60_plugin", "libtpu")
  return any(importlib.util.find_spec(name) is not None for name in names)


def resolve_layout(placement: str, target_cores: str | None, address: str | None) -> Layout:
  """The layout for --draft-placement, --target-cores N|all and --speculator HOST:PORT.

  On a CPU host "auto" (the default) means a speculator process: the target (and ar, and sd
  with its draft beside the target) on cores [0, N), the speculator on core N; N defaults to
  all cores but one. Raises ValueError for a layout this machine cannot give.
  """
  total = os.cpu_count() or 1
  if target_cores in (None, "all"):
    n = None
  elif not target_cores.isdigit() or not 1 <= int(target_cores) <= total:
    raise ValueError(f"--target-cores must be 1..{total} or all, got {target_cores!r}")
  else:
    n = int(target_cores)
  if address is not None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise ValueError(f"--speculator must be HOST:PORT, got {address!r}")
    return Layout("process", None if n is None else tuple(range(n)), address=address)
  if placement == "auto":
    placement = "device" if accelerator_present() or total < 2 else "process"
  if placement == "device":
    return Layout("device", None if n in (None, total) else tuple(range(n)))
  n = total - 1 if n is None else n
  if n >= total:
    raise ValueError(
      f"--target-cores {n} leaves no core for the speculator process on this {total}-core "
      "machine: lower it, or use --draft-placement device"
    )
  return Layout("process", tuple(range(n)), speculator_cores=(n,))


def exit_with_parent(parent: int, remove: str | None = None) -> None:
  """Exit at once when process `parent` is gone (removing the file `remove`, this process's
  log), watched by a daemon thread: a child started by another process never outlives it."""

  def watch():
    while os.getppid() == parent:
      time.sleep(0.5)
    if remove:
      with contextlib.suppress(OSError):
        os.unlink(remove)
    os._exit(3)

  threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def apply_layout(layout: Layout) -> Layout:
  """Pin this process to the layout's target cores, before JAX starts. In a process whose JAX
  already runs (a command line's main() called from Python) that is too late: warn and fall
  back to the draft on a device of this process, on every core."""
  if not layout.target_cores:
    return layout
  try:
    pin_cores(layout.target_cores)
  except RuntimeError:
    warnings.warn(
      "JAX already runs in this process, so the CPU layout cannot be pinned: ssd's draft runs on "
      "a device of this process",
      stacklevel=2,
    )
    return Layout("device", None)
  return layout
