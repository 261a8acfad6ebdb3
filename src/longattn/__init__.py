"""longattn: sparse attention for long inputs, exact and fast on CPU and GPU."""

import sys as _sys

from .backends import Choice
from .caches import cache_sizes, clear_caches
from .functional import attention, explain
from .modules import BottleneckAttention2d, MoBAAttention, RelativeAttention, SparseSelfAttention
from .patterns import (
    PRESETS,
    Pattern,
    as_pattern,
    bigbird,
    build_preset,
    causal,
    dilated,
    documents,
    fixed,
    full,
    global_tokens,
    longformer,
    parse_pattern,
    per_head,
    random_blocks,
    sliding_window,
    sparse_transformer,
    strided,
    topk_blocks,
    window_2d,
)

__version__ = "0.1.0"

__all__ = [
    "BottleneckAttention2d",
    "Choice",
    "MoBAAttention",
    "PRESETS",
    "Pattern",
    "RelativeAttention",
    "SparseSelfAttention",
    "as_pattern",
    "attention",
    "bigbird",
    "build_preset",
    "cache_sizes",
    "causal",
    "clear_caches",
    "dilated",
    "documents",
    "explain",
    "fixed",
    "full",
    "global_tokens",
    "longformer",
    "parse_pattern",
    "per_head",
    "random_blocks",
    "sliding_window",
    "sparse_transformer",
    "strided",
    "topk_blocks",
    "window_2d",
]

if "timm" in _sys.modules:  # timm is in use: make longattn's backbones creatable there (timm is never imported here)
    from .integrations.timm import register as _register_timm

    _register_timm()
