"""Causality: ``causal(p)`` keeps the pairs of ``p`` whose key is not after the query."""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import AllowedFn, Geometry, Pattern, _check_pattern, block_ranges, pattern_dataclass


@pattern_dataclass
class CausalMask(Pattern):
    shift_invariant = True
    _name_format = "causal"

    def _allowed_fn(self, geo: Geometry, device: torch.device) -> AllowedFn:
        return lambda b, h, i, j: j <= i

    def _candidates(self, geo: Geometry, block: int, device: torch.device) -> Tensor:
        q_lo, q_hi, k_lo, k_hi = block_ranges(geo, block, device)
        return k_lo <= q_hi


def causal(pattern: Pattern | None = None) -> Pattern:
    """``pattern`` restricted to ``j <= i`` (absolute positions, bottom-right aligned when Nq != Nk).

    For Nq=2, Nk=5 plain ``causal()`` allows::

        j: 0 1 2 3 4
        i=3  1 1 1 1 0      (query row 0)
        i=4  1 1 1 1 1      (query row 1)
    """
    if pattern is None:
        return CausalMask()
    from .compose import Intersection

    return Intersection([_check_pattern(pattern, "pattern"), CausalMask()], label=f"causal({pattern.name})")
