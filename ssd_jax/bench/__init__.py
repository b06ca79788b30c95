"""Benchmarks: sweeps written as JSON, plots and a markdown report, program timings, HF side by
side. `python -m ssd_jax.bench --help`; speed is measured here, never in tests."""
