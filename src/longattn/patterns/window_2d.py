"""The 2-D sliding window: local attention on an image's feature map, read row-major as a sequence.

A ``height x width`` map is flattened row-major (token ``i`` sits at row ``i // width``, column
``i % width``). Query ``(y, x)`` attends key ``(y', x')`` when ``|y' - y| <= radius`` and
``|x' - x| <= radius``: a ``(2 radius + 1)^2`` neighbourhood, cut at the map's border (no wrap-around from
one row's end to the next row's start, which a 1-D window on the flattened map would allow).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import AllowedFn, Geometry, Pattern, _check_int
from .window import _band_candidates


class Window2d(Pattern):
    def __init__(self, radius: int, height: int, width: int):
        self.radius = _check_int(radius, "radius")
        self.height = _check_int(height, "height", minimum=1)
        self.width = _check_int(width, "width", minimum=1)
        self.name = f"window_2d_{radius}_{height}x{width}"

    @property
    def key(self):
        return ("window_2d", self.radius, self.height, self.width)

    def validate(self, geo: Geometry) -> None:
        n = self.height * self.width
        if geo.q_len != n or geo.kv_len != n:
            raise ValueError(f"window_2d: a {self.height}x{self.width} map needs q_len = kv_len = {n} tokens, "
                             f"got q_len={geo.q_len}, kv_len={geo.kv_len}")

    def _allowed_fn(self, geo: Geometry, device: torch.device) -> AllowedFn:
        radius, width = self.radius, self.width

        def allowed(b: Tensor, h: Tensor, i: Tensor, j: Tensor) -> Tensor:
            dy = torch.div(j, width, rounding_mode="floor") - torch.div(i, width, rounding_mode="floor")
            dx = torch.remainder(j, width) - torch.remainder(i, width)
            return (dy.abs() <= radius) & (dx.abs() <= radius)

        return allowed

    def _candidates(self, geo: Geometry, block: int, device: torch.device) -> Tensor:
        # Rows y - r .. y + r of the flattened map lie within r * width + r positions of i: a band that holds
        # every allowed pair (a superset; the plan keeps only the blocks with one).
        reach = self.radius * self.width + self.radius
        return _band_candidates(geo, block, device, reach, reach)


def window_2d(radius: int, height: int, width: int) -> Pattern:
    """Local attention on a ``height x width`` feature map flattened row-major: each position attends the
    ``(2 radius + 1) x (2 radius + 1)`` neighbourhood around it, cut at the border.

    ``window_2d(1, 3, 4)`` lets token 5 (row 1, column 1) attend rows 0-2, columns 0-2; token 4 (row 1,
    column 0) attends columns 0-1 only, never column 3 of row 0.
    """
    return Window2d(radius, height, width)
