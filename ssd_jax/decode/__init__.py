"""Decoding: exact sampling and verification, the ar / sd baselines and the ssd engine."""

from ssd_jax.decode.engine import Engine, Generation
from ssd_jax.decode.metrics import Metrics
from ssd_jax.decode.sampling import Sampling

__all__ = ["Engine", "Generation", "Metrics", "Sampling"]
