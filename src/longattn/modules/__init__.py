"""nn.Modules built on ``longattn.attention``."""

from .relative import RelativeAttention, RelativePositions, rel_shift
from .sparse_self_attention import SparseSelfAttention

__all__ = ["RelativeAttention", "RelativePositions", "SparseSelfAttention", "rel_shift"]
