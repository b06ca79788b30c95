"""The host side of decoding: the `Engine` (meshes, weights, placement, the speculator's site),
the host loops of ar / sd / ssd that dispatch the pure programs of `ssd_jax.decode`, request
validation and the metrics of a run."""

from ssd_jax.runtime.engine import Engine, Generation
from ssd_jax.runtime.metrics import Metrics

__all__ = ["Engine", "Generation", "Metrics"]
