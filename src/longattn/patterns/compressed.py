"""Queries over block summaries (NSA's compressed branch): which summaries a token query may attend.

Summary t stands for the tokens ``[t * stride, t * stride + length)`` (overlapping blocks when stride < length).
The keys of an attention call are the summaries, its queries tokens: query row r sits at token position
``r + query_start`` (the queries of a segment after a memory start past 0). Causal: a query attends a summary
once its block has ended, ``t * stride + length - 1 <= r + query_start``: a summary never carries a token from
the query's future.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import AllowedFn, Geometry, Pattern, _check_int, block_ranges, pattern_dataclass


@pattern_dataclass
class CompressedCausal(Pattern):
    length: int  # tokens per summary
    stride: int  # tokens between the starts of consecutive summaries
    query_start: int = 0  # token position of query row 0

    def __post_init__(self):
        _check_int(self.length, "length", minimum=1)
        _check_int(self.stride, "stride", minimum=1)
        _check_int(self.query_start, "query_start")

    def _allowed_fn(self, geo: Geometry, device: torch.device) -> AllowedFn:
        length, stride, shift = self.length, self.stride, self.query_start - geo.offset
        return lambda b, h, i, j: j * stride + length - 1 <= i + shift

    def _candidates(self, geo: Geometry, block: int, device: torch.device) -> Tensor:
        q_lo, q_hi, k_lo, k_hi = block_ranges(geo, block, device)
        return k_lo * self.stride + self.length - 1 <= q_hi + self.query_start - geo.offset


def compressed_causal(length: int, stride: int, query_start: int = 0) -> Pattern:
    """Token queries over summaries of ``length`` tokens every ``stride``: query row r (token
    ``r + query_start``) attends summary t when ``t * stride + length - 1 <= r + query_start``."""
    return CompressedCausal(length, stride, query_start)
