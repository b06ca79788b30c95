"""The pure jitted programs of decoding and the data they take: no I/O, no threads, no processes.

Read in this order to follow one SSD round: plan (what every program is compiled for), state
(what crosses between the two sides), target (prefill and the verification step), draft
(proposing), speculate (SSD's expansion and lookup), verify (the exact acceptance test), sampling
(logits to distributions, as data), tree (fan-out layouts), policy and theory (the paper's
analytical model: Theorem 12's fan-out, Theorem 17's backup).
"""

from ssd_jax.decode.plan import DraftPlan, Plan, TargetPlan
from ssd_jax.decode.sampling import Sampling, Warp

__all__ = ["DraftPlan", "Plan", "Sampling", "TargetPlan", "Warp"]
