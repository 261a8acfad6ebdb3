"""nn.Modules built on ``longattn.attention``."""

from .bottleneck_attention import BottleneckAttention2d
from .relative import RelativeAttention, RelativePositions, rel_shift
from .sparse_self_attention import SparseSelfAttention

__all__ = ["BottleneckAttention2d", "RelativeAttention", "RelativePositions", "SparseSelfAttention", "rel_shift"]
