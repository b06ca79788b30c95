"""ssd_jax: Speculative Speculative Decoding (SSD / Saguaro) in JAX.

The public API, one import away:

  from ssd_jax import Engine, Sampling, SpecConfig, load_model

`cpu_layout()` pins a CPU host's layout (ssd's draft on a core of its own) before JAX starts.
"""

from ssd_jax.config import ModelConfig, SpecConfig
from ssd_jax.decode import Plan, Sampling
from ssd_jax.models.registry import load_model
from ssd_jax.runtime import Engine, Generation, Metrics
from ssd_jax.speculator import ChannelError, Placement, cpu_layout

__version__ = "0.1.0"

__all__ = [
  "ChannelError",
  "Engine",
  "Generation",
  "Metrics",
  "ModelConfig",
  "Placement",
  "Plan",
  "Sampling",
  "SpecConfig",
  "cpu_layout",
  "load_model",
]
