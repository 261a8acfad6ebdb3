"""The full pattern: every query attends every key (what ``pattern=None`` means)."""

from __future__ import annotations

import torch

from ._base import AllowedFn, Geometry, Pattern, pattern_dataclass


@pattern_dataclass
class Full(Pattern):
    shift_invariant = True
    _name_format = "full"

    def block_exact(self, geo: Geometry, block: int) -> bool:
        return True

    def _allowed_fn(self, geo: Geometry, device: torch.device) -> AllowedFn:
        return lambda b, h, i, j: j >= 0


def full() -> Pattern:
    """Dense attention as a pattern; ``attention(..., pattern=full())`` equals SDPA."""
    return Full()


@pattern_dataclass
class Empty(Pattern):
    """No query attends any key: what a content-dependent part stands for before it has chosen
    (``topk_blocks.resolve``). Every row is empty, so attention outputs zeros."""

    shift_invariant = True
    _name_format = "empty"

    def block_exact(self, geo: Geometry, block: int) -> bool:
        return True

    def _allowed_fn(self, geo: Geometry, device: torch.device) -> AllowedFn:
        return lambda b, h, i, j: j < 0

    def _candidates(self, geo: Geometry, block: int, device: torch.device) -> torch.Tensor:
        return torch.zeros(1, 1, -(-geo.q_len // block), -(-geo.kv_len // block), dtype=torch.bool, device=device)
