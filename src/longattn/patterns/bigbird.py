"""BigBird's ITC pattern: global + sliding window + random blocks, all at block level."""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import Geometry, Pattern, _cdiv, _check_int, pattern_dataclass
from .random_blocks import BlockTablePattern, draw_random_table


@pattern_dataclass
class BigBird(BlockTablePattern):
    block: int  # tokens per block; the whole pattern is defined on this grid
    window_blocks: int = 3  # odd: the query's own block and (window_blocks - 1) / 2 on each side
    global_blocks: int = 2  # the first ceil(g/2) and last floor(g/2) blocks are global
    random_blocks: int = 3  # random key blocks per query block, drawn per head from `seed`
    seed: int = 0
    _name_format = "bigbird_{block}_w{window_blocks}_g{global_blocks}_r{random_blocks}_seed{seed}"

    def __post_init__(self):
        _check_int(self.block, "block", minimum=1)
        _check_int(self.window_blocks, "window_blocks", minimum=1)
        if self.window_blocks % 2 == 0:
            raise ValueError(f"window_blocks must be odd: it counts the query's own block and the same number "
                             f"on each side, so {self.window_blocks} cannot be centred; use "
                             f"{self.window_blocks - 1 or 1} or {self.window_blocks + 1}")
        _check_int(self.global_blocks, "global_blocks")
        _check_int(self.random_blocks, "random_blocks")
        _check_int(self.seed, "seed", maximum=2**63 - 1)

    @property
    def num_random(self) -> int:
        return self.random_blocks

    def table(self, geo: Geometry) -> Tensor:
        nb = _cdiv(geo.kv_len, self.block)
        qb = torch.arange(nb)[:, None]
        kb = torch.arange(nb)[None, :]
        window = (qb - kb).abs() <= (self.window_blocks - 1) // 2
        # Global blocks: the first ceil(g/2) and the last floor(g/2) blocks (BigBird-ITC uses first+last).
        front, back = (self.global_blocks + 1) // 2, self.global_blocks // 2
        is_global = torch.zeros(nb, dtype=torch.bool)
        is_global[:front] = True
        if back:
            is_global[nb - back:] = True
        structural = window | is_global[:, None] | is_global[None, :]
        if self.random_blocks == 0:
            return structural.unsqueeze(0)
        rand = draw_random_table(geo.num_heads, nb, self.random_blocks, self.seed, exclude=structural)
        # Global query blocks already see everything; random blocks belong to the other rows only.
        rand &= ~is_global[:, None]
        return structural.unsqueeze(0) | rand


def bigbird(block: int = 64, window_blocks: int = 3, global_blocks: int = 2, random_blocks: int = 3,
            seed: int = 0) -> Pattern:
    """BigBird-ITC: the union, at block level, of ``window_blocks`` neighbouring blocks (centred), the
    first/last ``global_blocks`` blocks as global rows and columns, and ``random_blocks`` random key
    blocks per query block drawn from ``seed`` per head (excluding window and global blocks).

    ``window_blocks`` counts blocks including the query's own, so it must be odd (3: the own block and one
    on each side, BigBird's setting); an even value raises ValueError."""
    return BigBird(block, window_blocks, global_blocks, random_blocks, seed)
