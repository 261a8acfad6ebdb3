"""longattn: sparse attention for long inputs, exact and fast on CPU and GPU."""

from .backends import Choice, clear_caches
from .functional import attention, explain
from .modules import RelativeAttention, SparseSelfAttention
from .patterns import (
    Pattern,
    bigbird,
    causal,
    dilated,
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
)

__version__ = "0.1.0"

__all__ = [
    "Choice",
    "Pattern",
    "RelativeAttention",
    "SparseSelfAttention",
    "attention",
    "bigbird",
    "causal",
    "clear_caches",
    "dilated",
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
]
