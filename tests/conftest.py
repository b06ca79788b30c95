"""Test setup: virtual CPU devices before JAX starts, fail-fast collectives, shared fixtures."""

import os

# Eight virtual CPU devices: a 4-device target mesh plus a draft device, with at least twice the
# largest mesh size so XLA's CPU collectives cannot deadlock (research/jax.md §1.3).
_flags = os.environ.get("XLA_FLAGS", "")
if "collective_call_terminate_timeout" not in _flags:
  os.environ["XLA_FLAGS"] = (
    _flags + " --xla_cpu_collective_call_terminate_timeout_seconds=60"
  ).strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")

# A compilation cache for this test process only (a fresh directory, removed at exit; nothing is
# carried between runs): programs recompiled after `jax.clear_caches()` in the negative controls,
# or rebuilt with identical HLO by another test, load instead of compiling again.
if os.environ.get("SSD_JAX_TEST_CACHE", "1") != "0":
  import atexit
  import shutil
  import tempfile

  _cache = tempfile.mkdtemp(prefix="ssd-jax-test-xla-")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  jax.config.update("jax_compilation_cache_dir", _cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
