"""Sparse attention patterns: one algebra for the patterns of the literature.

Every pattern gives a FlexAttention ``mask_mod``, a dense oracle, an exact block layout, its density and
a readable name; ``|``, ``&`` and ``per_head`` compose them. ``presets`` is the one table of named patterns
(``build_preset("longformer_512")``); ``as_pattern`` takes a pattern, a preset name or an expression.
"""

from ._base import AllowedFn, Geometry, Pattern, Snapshot, block_ranges, dense_mask, pattern_dataclass
from .bigbird import bigbird
from .causal import causal
from .compressed import compressed_causal
from .compose import per_head
from .documents import documents, segment_ids
from .full import full
from .global_tokens import global_tokens
from .layout import BlockPlan, get_plan
from .longformer import longformer
from .parse import parse_pattern
from .presets import PRESETS, Preset, as_pattern, build_preset
from .random_blocks import random_blocks
from .sparse_transformer import fixed, sparse_transformer, strided
from .topk_blocks import SelectedBlocks, topk_blocks
from .window import dilated, sliding_window
from .window_2d import window_2d

__all__ = [
    "AllowedFn",
    "BlockPlan",
    "Geometry",
    "PRESETS",
    "Pattern",
    "Preset",
    "SelectedBlocks",
    "Snapshot",
    "as_pattern",
    "bigbird",
    "block_ranges",
    "build_preset",
    "causal",
    "compressed_causal",
    "dense_mask",
    "dilated",
    "documents",
    "fixed",
    "full",
    "get_plan",
    "global_tokens",
    "longformer",
    "parse_pattern",
    "pattern_dataclass",
    "per_head",
    "random_blocks",
    "segment_ids",
    "sliding_window",
    "sparse_transformer",
    "strided",
    "topk_blocks",
    "window_2d",
]
