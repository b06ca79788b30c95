"""The CPU layout: which cores the target's process and ssd's speculator process run on.

In one process a CPU cannot give the draft hardware of its own: XLA's CPU devices share one
thread pool, sized by the process's cores when JAX starts. So on a CPU host ssd's draft runs in
a speculator process pinned to a core of its own, and this process (ar, sd with its draft beside
the target, ssd's target) keeps the others:

  cores [0, N)   this process          core N   the speculator process

Pinning must happen before JAX starts its CPU backend (the pool is sized then), so it is the
first thing a command line does; from Python, `cpu_layout()` does it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import sys
import warnings

from ssd_jax.speculator.base import Placement


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where a run goes: the draft side's placement and, on CPU, the cores.

  Attributes:
    placement: "device" (ssd's draft on a mesh of this process) or "process" (a speculator).
    target_cores: this process's cores (ar, sd with its draft beside the target, and the target
      of ssd); None: not pinned (whatever this process may use).
    speculator_cores: the speculator process's cores (None: not started here).
    address: "host:port" of a speculator another host runs.
  """

  placement: str
  target_cores: tuple[int, ...] | None
  speculator_cores: tuple[int, ...] | None = None
  address: str | None = None

  def where(self, mode: str) -> str:
    """What `mode` ran on, for a table."""
    target = describe_cores(self.target_cores)
    if mode != "ssd":
      return target
    if self.placement == "device":
      return f"{target} + a device"
    return f"{target} + {self.address or describe_cores(self.speculator_cores)}"

  def cores(self, mode: str) -> int:
    """CPU cores `mode` ran on (the speculator's included for ssd in a process here)."""
    n = len(self.target_cores or os.sched_getaffinity(0))
    return n + (len(self.speculator_cores) if mode == "ssd" and self.speculator_cores else 0)

  def placement_for(self, pipe: str | None = None, token_file: str | None = None) -> Placement:
    """The engine's `Placement` for ssd in this layout (`token_file`: the token of the
    speculator at `address`)."""
    return Placement(
      kind=self.placement,
      cores=self.speculator_cores,
      address=self.address,
      pipe=pipe,
      token_file=token_file,
    )


def describe_cores(cores) -> str:
  if not cores:
    cores = sorted(os.sched_getaffinity(0))
  if len(cores) > 1 and list(cores) == list(range(cores[0], cores[-1] + 1)):
    return f"cores {cores[0]}-{cores[-1]}"
  return f"core{'s' if len(cores) > 1 else ''} {','.join(map(str, cores))}"


def accelerator_present() -> bool:
  """Whether JAX would start on a GPU or TPU here, judged without starting a backend (which
  would fix the CPU thread pool's size before the process is pinned)."""
  platforms = os.environ.get("JAX_PLATFORMS", "").lower()
  if platforms:
    return platforms.split(",")[0] not in ("cpu", "")
  names = ("jax_cuda13_plugin", "jax_cuda12_plugin", "jax_rocm60_plugin", "libtpu")
  return any(importlib.util.find_spec(name) is not None for name in names)


def resolve_layout(
  placement: str = "auto",
  target_cores: int | str | None = None,
  address: str | None = None,
  *,
  ssd: bool = True,
) -> Layout:
  """The layout for a placement ("auto", "device", "process"), this process's cores (N, "all",
  or None: the default) and a remote speculator's "host:port".

  On a CPU host "auto" means a speculator process when the run has ssd: this process on cores
  [0, N), the speculator on core N, N by default all cores but one. A run without ssd keeps
  every core (nothing would use a spare one). Raises ValueError for a layout this machine
  cannot give, naming the flag to change.
  """
  total = os.cpu_count() or 1
  if target_cores in (None, "all"):
    n = None
  elif not str(target_cores).isdigit() or not 1 <= int(target_cores) <= total:
    raise ValueError(f"--target-cores must be 1..{total} or all, got {target_cores!r}")
  else:
    n = int(target_cores)
  every = tuple(range(total)) if target_cores == "all" else None
  if address is not None:
    Placement(kind="process", address=address)  # checks HOST:PORT
    return Layout("process", every if n is None else tuple(range(n)), address=address)
  if placement == "auto":
    spare = ssd and not accelerator_present() and total > 1
    placement = "process" if spare else "device"
  if placement == "device" or not ssd:
    return Layout("device", every if n is None else tuple(range(n)))
  n = total - 1 if n is None else n
  if n >= total:
    raise ValueError(
      f"--target-cores {n} leaves no core for the speculator process on this {total}-core "
      "machine: lower it, or use --draft-placement device"
    )
  return Layout("process", tuple(range(n)), speculator_cores=(n,))


def set_cpu_devices(target_devices: int, draft_devices: int = 1) -> None:
  """Enough virtual CPU devices for the meshes, set before JAX starts its backend: the target
  mesh and the draft's, and at least twice the target mesh (with fewer, XLA's CPU collectives
  were seen to deadlock). Never fewer than already asked for; too late once JAX runs (then the
  devices that exist stay)."""
  import jax  # noqa: PLC0415 (the flag must be set before any backend starts)

  need = max(target_devices + draft_devices, 2 * target_devices)
  with contextlib.suppress(RuntimeError):
    jax.config.update("jax_num_cpu_devices", max(need, jax.config.jax_num_cpu_devices))


def pin_cores(cores) -> None:
  """Run this process on `cores` only. Before JAX starts its CPU backend this also sizes XLA's
  thread pool to them (it reads the affinity mask once); afterwards it would not, so refuse."""
  if "jax" in sys.modules:
    from jax._src import xla_bridge  # noqa: PLC0415

    if xla_bridge.backends_are_initialized():
      raise RuntimeError(
        "JAX has already started in this process, so its CPU thread pool can no longer be "
        "sized to the layout's cores: pin the layout first (ssd_jax.cpu_layout() before any "
        "JAX computation)"
      )
  os.sched_setaffinity(0, set(cores))


def apply_layout(layout: Layout) -> Layout:
  """Pin this process to the layout's target cores, before JAX starts. In a process whose JAX
  already runs (a command line's main() called from Python) that is too late: warn and fall
  back to the draft on a device of this process."""
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


def cpu_layout(target_cores: int | None = None) -> Layout:
  """Pin this process to cores [0, N) (default: all but the last), leaving core N to ssd's
  speculator process, which `Engine(placement="auto")` then starts there. Call it before JAX
  computes anything (`python -m ssd_jax.run` does it for you). A no-op on an accelerator host
  or a one-core machine, where the draft gets a device of this process.

  Raises:
    RuntimeError: JAX has already started in this process.
  """
  layout = resolve_layout("auto", target_cores)
  if layout.target_cores:
    pin_cores(layout.target_cores)
  return layout


def spare_cores() -> tuple[int, ...]:
  """The first core this process may not use (left for a speculator), else its last (shared,
  with a warning that says how to give the speculator a core of its own)."""
  mine = os.sched_getaffinity(0)
  spare = sorted(set(range(os.cpu_count() or 1)) - mine)
  if spare:
    return (spare[0],)
  warnings.warn(
    "the speculator process shares a core with the target (this process may use every core): "
    "call ssd_jax.cpu_layout() before JAX starts to give it one (python -m ssd_jax.run does)",
    stacklevel=3,
  )
  return (max(mine),)


def resolve_placement(placement: Placement, platform: str) -> str:
  """ "device" or "process" for an engine on `platform` (see `Placement.kind`)."""
  if placement.address is not None or placement.kind != "auto":
    return "process" if placement.address is not None else placement.kind
  mine = os.sched_getaffinity(0)
  has_spare = bool(set(range(os.cpu_count() or 1)) - mine)
  return "process" if platform == "cpu" and has_spare else "device"
