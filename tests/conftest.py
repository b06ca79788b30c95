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
