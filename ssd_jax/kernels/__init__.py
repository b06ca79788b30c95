"""Attention kernels: one public op, a plain-jnp reference beside it, implementations behind
`impl=`."""

from ssd_jax.kernels.reference import tree_attention_reference
from ssd_jax.kernels.tree_attention import IMPLS, BlockSizes, default_impl, tree_attention

__all__ = ["IMPLS", "BlockSizes", "default_impl", "tree_attention", "tree_attention_reference"]
