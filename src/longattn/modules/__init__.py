"""nn.Modules built on ``longattn.attention``."""

from .sparse_self_attention import SparseSelfAttention

__all__ = ["SparseSelfAttention"]
