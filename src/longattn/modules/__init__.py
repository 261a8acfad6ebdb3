"""nn.Modules built on ``longattn.attention``."""

from .bottleneck_attention import BottleneckAttention2d
from .combiner import CombinerAttention, combiner_attention
from .cross_attention import CrossAttention
from .global_local_attention import (QKV, EtcStructure, GlobalLocalAttention, GlobalLocalOutput, GlobalLocalSpec,
                                     RelativeTable, etc_structure, global_local_attention)
from .moba import MoBAAttention
from .native_sparse import NativeSparseAttention, NSAShape, native_sparse_attention
from .relative import RelativeAttention, RelativePositions, rel_shift
from .sparse_self_attention import SparseSelfAttention
from .transformer_block import Block

__all__ = ["QKV", "Block", "BottleneckAttention2d", "CombinerAttention", "CrossAttention", "EtcStructure",
           "GlobalLocalAttention", "GlobalLocalOutput", "GlobalLocalSpec", "MoBAAttention", "NSAShape",
           "NativeSparseAttention", "RelativeAttention", "RelativePositions", "RelativeTable", "SparseSelfAttention",
           "combiner_attention", "etc_structure", "global_local_attention", "native_sparse_attention", "rel_shift"]
