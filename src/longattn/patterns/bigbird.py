"""BigBird's ITC pattern: global + sliding window + random blocks, all at block level."""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import Geometry, Pattern, _cdiv, _check_int
from .random_blocks import BlockTablePattern, draw_random_table


class BigBird(BlockTablePattern):
    def __init__(self, block: int, window_blocks: int = 3, global_blocks: int = 2, random_blocks: int = 3,
                 seed: int = 0):
        self.block = _check_int(block, "block", minimum=1)
        self.window_blocks = _check_int(window_blocks, "window_blocks")
        self.global_blocks = _check_int(global_blocks, "global_blocks")
        self.random_blocks = _check_int(random_blocks, "random_blocks")
        self.seed = _check_int(seed, "seed")
        self.preferred_block = block
        self.head_count_free = random_blocks == 0  # random tables are drawn for H heads
        self.name = f"bigbird_{block}_w{window_blocks}_g{global_blocks}_r{random_blocks}_seed{seed}"

    @property
    def key(self):
        return ("bigbird", self.block, self.window_blocks, self.global_blocks, self.random_blocks, self.seed)

    def table(self, geo: Geometry) -> Tensor:
        nb = _cdiv(geo.kv_len, self.block)
        qb = torch.arange(nb)[:, None]
        kb = torch.arange(nb)[None, :]
        window = (qb - kb).abs() <= self.window_blocks // 2
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
    blocks per query block drawn from ``seed`` per head (excluding window and global blocks)."""
    return BigBird(block, window_blocks, global_blocks, random_blocks, seed)
