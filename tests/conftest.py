"""Test setup: virtual CPU devices before JAX starts, fail-fast collectives, shared fixtures."""

import os

# Eight virtual CPU devices: a 4-device target mesh plus a draft device, with at least twice the
# largest mesh size: with fewer, XLA's CPU collectives were seen to deadlock on this JAX.
_flags = os.environ.get("XLA_FLAGS", "")
if "collective_call_terminate_timeout" not in _flags:
  os.environ["XLA_FLAGS"] = (
    _flags + " --xla_cpu_collective_call_terminate_timeout_seconds=60"
  ).strip()

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

# A temporary directory of this test process's own, inherited by the processes it starts (CLI
# runs, speculators): what they leave behind is seen here, not mixed with another worker's.
_TMP = tempfile.mkdtemp(prefix="ssd-jax-tests-")
os.environ["TMPDIR"] = tempfile.tempdir = _TMP
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

# A compilation cache for this test process only (a fresh directory, removed at exit; nothing is
# carried between runs): programs recompiled after `jax.clear_caches()` in the negative controls,
# or rebuilt with identical HLO by another test, load instead of compiling again.
if os.environ.get("SSD_JAX_TEST_CACHE", "1") != "0":
  _cache = tempfile.mkdtemp(prefix="ssd-jax-test-xla-")
  jax.config.update("jax_compilation_cache_dir", _cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

import glob  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402
from _pytest.mark.expression import Expression  # noqa: E402 (how pytest itself reads -m)


def gpu_tests_asked(config: pytest.Config) -> bool:
  """Whether this run asks for the GPU tests alone: its -m expression selects a test marked
  `gpu` and no unmarked test (`-m gpu`, not `-m "not slow"` nor no -m at all)."""
  expression = config.getoption("markexpr")
  if not expression:
    return False
  compiled = Expression.compile(expression)
  return compiled.evaluate(lambda name, **_: name == "gpu") and not compiled.evaluate(
    lambda name, **_: False
  )


def pytest_configure(config: pytest.Config) -> None:
  """Every run but one of the GPU tests alone runs on the CPU, whatever the machine has: the
  suite's device layouts assume the 8 virtual CPU devices above. A `-m gpu` run leaves JAX its
  default backend (a GPU where one is present; else its tests are skipped). No JAX backend has
  started yet at this point, so the choice still takes effect."""
  if not gpu_tests_asked(config):
    jax.config.update("jax_platforms", "cpu")


_SPECULATOR_LOGS = os.path.join(_TMP, "ssd_jax-speculator-*.log")
HANG = 120  # seconds to wait for an event before calling it a hang (nothing here is timed)


@pytest.fixture(scope="module", autouse=True)
def _no_speculator_log_left_behind():
  """A module's speculators, stopped however they stopped, leave no log behind: each one's log
  goes with it (the parent removes it, or the speculator when its parent is gone first, which
  it checks every 0.5 s). Waited for, up to a bound that only a hang reaches."""
  before = set(glob.glob(_SPECULATOR_LOGS))
  yield
  deadline = time.monotonic() + HANG
  while (left := set(glob.glob(_SPECULATOR_LOGS)) - before) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert not left, f"speculator logs left behind: {sorted(left)}"


@pytest.fixture(scope="module", autouse=True)
def _compiled_programs_released_after_each_module():
  """Each module's compiled programs are released when it ends (they reload from the
  compilation cache above where a later module builds the same one).

  XLA's CPU client maps every compiled program's code into memory, about 1,500 mappings for one
  SSD engine's programs, and frees them only with the programs. A worker that runs several
  modules (`-n auto --dist loadfile`) kept them all and reached the kernel's limit of 65,530
  mappings (vm.max_map_count) midway through test_speculator: LLVM then aborts linking the next
  program (seen as 'Fatal Python error: Aborted' or a segmentation fault in a compile)."""
  yield
  jax.clear_caches()
