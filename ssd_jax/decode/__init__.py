"""Decoding: exact sampling and verification, the host loops of ar / sd / ssd, and the Engine.

Read in this order to follow one SSD round: engine (the API), plan (what is static), inputs,
target / speculator (each side), speculate (expand, lookup), verify, loops (the rounds).
"""

from ssd_jax.decode.engine import Engine, Generation
from ssd_jax.decode.metrics import Metrics
from ssd_jax.decode.plan import Plan
from ssd_jax.decode.sampling import Sampling, Warp

__all__ = ["Engine", "Generation", "Metrics", "Plan", "Sampling", "Warp"]
