"""Local patterns: the sliding window and Longformer's dilated window."""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import AllowedFn, Geometry, Pattern, _check_int, block_ranges


def _band_candidates(geo: Geometry, block: int, device: torch.device, left: int, right: int) -> Tensor:
    q_lo, q_hi, k_lo, k_hi = block_ranges(geo, block, device)
    return (k_hi >= q_lo - left) & (k_lo <= q_hi + right)


class SlidingWindow(Pattern):
    def __init__(self, left: int, right: int):
        self.left = _check_int(left, "left")
        self.right = _check_int(right, "right")
        self.name = f"sliding_window_{left}" if left == right else f"sliding_window_{left}_{right}"

    @property
    def key(self):
        return ("sliding_window", self.left, self.right)

    def _allowed_fn(self, geo: Geometry, device: torch.device) -> AllowedFn:
        left, right = self.left, self.right
        return lambda b, h, i, j: (j >= i - left) & (j <= i + right)

    def _candidates(self, geo: Geometry, block: int, device: torch.device) -> Tensor:
        return _band_candidates(geo, block, device, self.left, self.right)


def sliding_window(left: int, right: int | None = None) -> Pattern:
    """Query i attends keys ``i - left <= j <= i + right`` (``right`` defaults to ``left``).

    ``sliding_window(256)`` is Longformer's window of 512; ``sliding_window(w, 0)`` looks back only.
    """
    return SlidingWindow(left, left if right is None else right)


class Dilated(Pattern):
    def __init__(self, window: int, dilation: int):
        self.window = _check_int(window, "window")
        self.dilation = _check_int(dilation, "dilation", minimum=1)
        self.reach = (window // 2) * dilation
        self.name = f"dilated_{window}_{dilation}"

    @property
    def key(self):
        return ("dilated", self.window, self.dilation)

    def _allowed_fn(self, geo: Geometry, device: torch.device) -> AllowedFn:
        reach, dilation = self.reach, self.dilation

        def allowed(b: Tensor, h: Tensor, i: Tensor, j: Tensor) -> Tensor:
            d = j - i
            return (d.abs() <= reach) & (torch.remainder(d, dilation) == 0)

        return allowed

    def _candidates(self, geo: Geometry, block: int, device: torch.device) -> Tensor:
        return _band_candidates(geo, block, device, self.reach, self.reach)


def dilated(window: int, dilation: int = 1) -> Pattern:
    """Longformer's dilated window: ``j = i + k * dilation`` for ``|k| <= window // 2``.

    ``window`` counts keys (spaced ``dilation`` apart), so ``dilated(512, 1) == sliding_window(256)``.
    """
    return Dilated(window, dilation)
