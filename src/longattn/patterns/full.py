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
