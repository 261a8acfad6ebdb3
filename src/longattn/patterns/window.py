"""Local patterns: the sliding window and Longformer's dilated window.

One meaning of ``window`` in longattn: Longformer's w, the number of keys around the query, w/2 on each
side (w + 1 with the query itself). It must be even; an odd window raises instead of being rounded.
``sliding_window(left, right)`` takes per-side reaches instead (``sliding_window(w // 2)`` is window w).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import AllowedFn, Geometry, Pattern, _check_int, block_ranges, pattern_dataclass


def _band_candidates(geo: Geometry, block: int, device: torch.device, left: int, right: int) -> Tensor:
    q_lo, q_hi, k_lo, k_hi = block_ranges(geo, block, device)
    return (k_hi >= q_lo - left) & (k_lo <= q_hi + right)


@pattern_dataclass
class SlidingWindow(Pattern):
    shift_invariant = True
    left: int  # keys attended before the query
    right: int  # keys attended after the query

    def __post_init__(self):
        _check_int(self.left, "left")
        _check_int(self.right, "right")

    def _label(self) -> str:
        both = f"{self.left}" if self.left == self.right else f"{self.left}_{self.right}"
        return f"sliding_window_{both}"

    def _allowed_fn(self, geo: Geometry, device: torch.device) -> AllowedFn:
        left, right = self.left, self.right
        return lambda b, h, i, j: (j >= i - left) & (j <= i + right)

    def _candidates(self, geo: Geometry, block: int, device: torch.device) -> Tensor:
        return _band_candidates(geo, block, device, self.left, self.right)


def sliding_window(left: int, right: int | None = None) -> Pattern:
    """Query i attends keys ``i - left <= j <= i + right`` (``right`` defaults to ``left``).

    The arguments are per-side reaches, not a window: ``sliding_window(256)`` attends 256 keys on each
    side (513 with the query itself) and is exactly the window of ``longformer(window=512)``.
    ``sliding_window(w, 0)`` looks back only.
    """
    return SlidingWindow(left, left if right is None else right)


def check_window(window: object, name: str = "window") -> int:
    """``window`` as Longformer's w: a non-negative even int (w/2 keys on each side of the query)."""
    _check_int(window, name)
    if window % 2:
        raise ValueError(f"{name} must be even: it counts the keys on both sides of the query ({name} // 2 "
                         f"each side), so {window} cannot be centred; use {window - 1} or {window + 1}, or "
                         f"sliding_window(left, right) for uneven reaches")
    return window


@pattern_dataclass
class Dilated(Pattern):
    shift_invariant = True
    window: int  # Longformer's w: w/2 keys on each side of the query, spaced `dilation` apart
    dilation: int
    _name_format = "dilated_{window}_{dilation}"

    def __post_init__(self):
        check_window(self.window)
        _check_int(self.dilation, "dilation", minimum=1)

    @property
    def reach(self) -> int:
        """The farthest key on either side, in positions."""
        return self.window // 2 * self.dilation

    def _allowed_fn(self, geo: Geometry, device: torch.device) -> AllowedFn:
        reach, dilation = self.reach, self.dilation

        def allowed(b: Tensor, h: Tensor, i: Tensor, j: Tensor) -> Tensor:
            d = j - i
            return (d.abs() <= reach) & (torch.remainder(d, dilation) == 0)

        return allowed

    def _candidates(self, geo: Geometry, block: int, device: torch.device) -> Tensor:
        return _band_candidates(geo, block, device, self.reach, self.reach)


def dilated(window: int, dilation: int = 1) -> Pattern:
    """Longformer's dilated window: ``j = i + k * dilation`` for ``|k| <= window / 2``.

    ``window`` is Longformer's w, as everywhere in longattn: the query attends ``window / 2`` keys on each
    side (spaced ``dilation`` apart; ``window + 1`` keys with itself), so it must be even, and
    ``dilated(512, 1) == sliding_window(256)``. An odd ``window`` raises ValueError.
    """
    return Dilated(window, dilation)
