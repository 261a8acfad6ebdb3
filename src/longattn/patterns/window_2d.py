"""The 2-D sliding window: local attention on an image's feature map, read as a sequence.

Query ``(y, x)`` attends key ``(y', x')`` when ``|y' - y| <= radius`` and ``|x' - x| <= radius``: a
``(2 radius + 1)^2`` neighbourhood, cut at the map's border (no wrap-around from one row's end to the next
row's start, which a 1-D window on the flattened map would allow).

Token order: row-major by default (token ``i`` at row ``i // width``, column ``i % width``). With
``tile=t`` the map is read tile by tile: ``t x t`` tiles in row-major order, row-major inside each tile
(border tiles are smaller). A block of ``t^2`` tokens is then a square patch whose neighbourhood is a few
patches, instead of a row segment whose neighbourhood spans ``2 radius + 1`` rows: far fewer key blocks
per query block on wide maps (HaloNet's blocking). ``order()`` gives the permutation to apply to the
tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import AllowedFn, Geometry, Pattern, _cdiv, _check_int, pattern_dataclass


@pattern_dataclass
class Window2d(Pattern):
    radius: int  # row and column reach on each side
    height: int
    width: int
    tile: int | None = None  # read the map in tile x tile tiles (see the module docstring)

    def __post_init__(self):
        _check_int(self.radius, "radius")
        _check_int(self.height, "height", minimum=1)
        _check_int(self.width, "width", minimum=1)
        if self.tile is not None:
            _check_int(self.tile, "tile", minimum=1)

    def _label(self) -> str:
        tile = "" if self.tile is None else f"_tile{self.tile}"
        return f"window_2d_{self.radius}_{self.height}x{self.width}{tile}"

    @property
    def preferred_block(self) -> int | None:
        return None if self.tile is None else self.tile * self.tile  # one block = one tile

    def order(self, device: torch.device | str = "cpu") -> Tensor:
        """``(N,)``: the row-major index of the token at each position of this pattern's order."""
        n = self.height * self.width
        if self.tile is None:
            return torch.arange(n, device=device)
        t = self.tile
        y = torch.arange(self.height, device=device)[:, None]
        x = torch.arange(self.width, device=device)[None, :]
        tile_id = (y // t) * _cdiv(self.width, t) + x // t
        within = (y % t) * t + x % t
        return torch.argsort((tile_id * t * t + within).flatten())

    def coordinates(self, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """Row and column ``(N,)`` of the token at each position of this pattern's order."""
        order = self.order(device)
        return order // self.width, order % self.width

    def validate(self, geo: Geometry) -> None:
        n = self.height * self.width
        if geo.q_len != n or geo.kv_len != n:
            raise ValueError(f"window_2d: a {self.height}x{self.width} map needs q_len = kv_len = {n} tokens, "
                             f"got q_len={geo.q_len}, kv_len={geo.kv_len}")

    def _allowed_fn(self, geo: Geometry, device: torch.device) -> AllowedFn:
        radius, last = self.radius, self.height * self.width - 1
        rows, cols = self.coordinates(device)

        def allowed(b: Tensor, h: Tensor, i: Tensor, j: Tensor) -> Tensor:
            # Block evaluation also asks about the padding past the last token (masked later): clamp the lookup.
            i, j = i.clamp(max=last), j.clamp(max=last)
            return ((rows[j] - rows[i]).abs() <= radius) & ((cols[j] - cols[i]).abs() <= radius)

        return allowed

    def _candidates(self, geo: Geometry, block: int, device: torch.device) -> Tensor:
        # Each block's bounding box of rows and columns; two blocks may hold an allowed pair when their boxes
        # are at most `radius` apart along both axes (a superset; the plan keeps only the blocks with one).
        n, nb = geo.q_len, _cdiv(geo.q_len, block)
        boxes = []
        for coord in self.coordinates(device):
            padded = torch.cat([coord, coord[-1:].expand(nb * block - n)]).view(nb, block)
            boxes.append((padded.amin(1), padded.amax(1)))
        near = torch.ones(nb, nb, dtype=torch.bool, device=device)
        for lo, hi in boxes:
            gap = torch.maximum(lo[None, :] - hi[:, None], lo[:, None] - hi[None, :])  # (query block, key block)
            near &= gap <= self.radius
        return near


def window_2d(radius: int, height: int, width: int, *, tile: int | None = None) -> Pattern:
    """Local attention on a ``height x width`` feature map: each position attends the
    ``(2 radius + 1) x (2 radius + 1)`` neighbourhood around it, cut at the border.

    Tokens are row-major, or ``tile x tile`` tiles in turn with ``tile`` (see the module docstring; permute
    the tokens with ``pattern.order()``). ``window_2d(1, 3, 4)`` lets token 5 (row 1, column 1) attend rows
    0-2, columns 0-2; token 4 (row 1, column 0) attends columns 0-1 only, never column 3 of row 0.
    """
    return Window2d(radius, height, width, tile)
