"""Sparse Transformer (Child et al., 2019): strided and fixed factorized patterns, one factor per head."""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import AllowedFn, Geometry, Pattern, _check_int, block_ranges, pattern_dataclass
from .causal import causal as _causal
from .compose import Union, per_head
from .window import sliding_window


@pattern_dataclass
class StrideColumns(Pattern):
    """``(i - j) % stride == 0``: the strided factor that reaches back across the sequence."""

    stride: int
    _name_format = "stride_columns_{stride}"

    def __post_init__(self):
        _check_int(self.stride, "stride", minimum=1)

    def _allowed_fn(self, geo: Geometry, device: torch.device) -> AllowedFn:
        s = self.stride
        return lambda b, h, i, j: torch.remainder(i - j, s) == 0

    def _candidates(self, geo: Geometry, block: int, device: torch.device) -> Tensor:
        q_lo, q_hi, k_lo, k_hi = block_ranges(geo, block, device)
        lo, hi = q_lo - k_hi, q_hi - k_lo  # the differences i - j the block pair covers
        return torch.div(hi, self.stride, rounding_mode="floor") * self.stride >= lo


@pattern_dataclass
class SameBlock(Pattern):
    """``i // block == j // block``: the fixed pattern's local factor."""

    block: int
    _name_format = "same_block_{block}"

    def __post_init__(self):
        _check_int(self.block, "block", minimum=1)

    def _allowed_fn(self, geo: Geometry, device: torch.device) -> AllowedFn:
        l = self.block
        return lambda b, h, i, j: torch.div(i, l, rounding_mode="floor") == torch.div(j, l, rounding_mode="floor")

    def _candidates(self, geo: Geometry, block: int, device: torch.device) -> Tensor:
        q_lo, q_hi, k_lo, k_hi = block_ranges(geo, block, device)
        fl = lambda t: torch.div(t, self.block, rounding_mode="floor")  # noqa: E731
        return (fl(k_hi) >= fl(q_lo)) & (fl(k_lo) <= fl(q_hi))


@pattern_dataclass
class SummaryColumns(Pattern):
    """``j % block >= block - c``: the fixed pattern's summary factor (last c keys of every block)."""

    block: int
    c: int  # summary keys at the end of every block
    _name_format = "summary_columns_{block}_{c}"

    def __post_init__(self):
        _check_int(self.block, "block", minimum=1)
        _check_int(self.c, "c", minimum=1)
        if self.c > self.block:
            raise ValueError(f"c must be <= block ({self.block}), got {self.c}")

    def _allowed_fn(self, geo: Geometry, device: torch.device) -> AllowedFn:
        l, c = self.block, self.c
        return lambda b, h, i, j: torch.remainder(j, l) >= l - c

    def _candidates(self, geo: Geometry, block: int, device: torch.device) -> Tensor:
        q_lo, q_hi, k_lo, k_hi = block_ranges(geo, block, device)
        l, c = self.block, self.c
        rem = torch.remainder(k_lo, l)
        first = torch.where(rem >= l - c, k_lo, k_lo - rem + (l - c))  # first summary key >= k_lo
        return (first <= k_hi).expand(q_lo.shape[0], -1)


def _factors(kind: str, stride: int, block: int, c: int) -> tuple[list[Pattern], str]:
    if kind == "strided":
        _check_int(stride, "stride", minimum=1)
        return [sliding_window(stride - 1, 0), StrideColumns(stride)], f"strided_{stride}"
    if kind == "fixed":
        return [SameBlock(block), SummaryColumns(block, c)], f"fixed_{block}_{c}"
    raise ValueError(f"kind must be 'strided' or 'fixed', got {kind!r}")


def strided(stride: int) -> Pattern:
    """Two heads: A ``i - stride < j <= i`` and B ``(i - j) % stride == 0`` (heads alternate A, B)."""
    return sparse_transformer("strided", stride=stride, causal=False)


def fixed(block: int, c: int = 1) -> Pattern:
    """Two heads: A ``j // block == i // block`` and B ``j % block >= block - c`` (alternating)."""
    return sparse_transformer("fixed", block=block, c=c, causal=False)


def sparse_transformer(kind: str = "strided", *, stride: int = 128, block: int = 128, c: int = 8,
                       heads: str = "split", causal: bool = True) -> Pattern:
    """Sparse Transformer preset: ``kind`` in {"strided", "fixed"}.

    ``heads="split"`` gives each factor to alternate heads (the paper's multi-head factorization);
    ``heads="merged"`` lets every head attend the union of both factors. Causal by default (the paper's
    autoregressive setting).
    """
    factors, name = _factors(kind, stride, block, c)
    if heads == "split":
        pattern = per_head(factors, name=name)
    elif heads == "merged":
        pattern = Union(factors, label=f"{name}_merged")
    else:
        raise ValueError(f"heads must be 'split' or 'merged', got {heads!r}")
    return _causal(pattern) if causal else pattern
