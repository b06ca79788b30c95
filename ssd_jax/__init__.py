"""ssd_jax: Speculative Speculative Decoding (SSD / Saguaro) in JAX.

from ssd_jax import Engine, SpecConfig, Sampling, load_model
"""

from ssd_jax.config import ModelConfig, SpecConfig
from ssd_jax.decode import Engine, Generation, Metrics, Sampling
from ssd_jax.models.registry import load_model

__version__ = "0.1.0"

__all__ = ["Engine", "Generation", "Metrics", "ModelConfig", "Sampling", "SpecConfig", "load_model"]
