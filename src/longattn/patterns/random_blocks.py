"""Seeded random key blocks (BigBird's random attention)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import AllowedFn, Geometry, Pattern, _cdiv, _check_int, any_in_rect, block_ranges, pattern_dataclass


def draw_random_table(num_heads: int, num_blocks: int, num_random: int, seed: int,
                      exclude: Tensor | None = None) -> Tensor:
    """(H, nb, nb) bool: ``num_random`` distinct key blocks per (head, query block), drawn from ``seed``.

    Blocks in ``exclude`` (nb, nb) are never drawn (BigBird excludes its window and global blocks); a
    row with fewer free blocks than ``num_random`` takes them all. Drawn on the CPU so that every device
    and every run sees the same table for the same seed.
    """
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(num_heads, num_blocks, num_blocks, generator=gen)
    if exclude is not None:
        scores = scores.masked_fill(exclude.cpu(), -1.0)
    k = min(num_random, num_blocks)
    table = torch.zeros(num_heads, num_blocks, num_blocks, dtype=torch.bool)
    if k > 0:
        table.scatter_(-1, scores.topk(k, dim=-1).indices, True)
    if exclude is not None:
        table &= ~exclude.cpu()
    return table


class BlockTablePattern(Pattern):
    """A pattern defined by a (H', nb, nb) table over absolute blocks of ``self.block`` tokens, drawn per
    head when ``num_random`` is not 0 (subclasses are dataclasses with these two fields)."""

    block: int
    num_random: int

    @property
    def preferred_block(self) -> int:
        return self.block

    @property
    def head_count_free(self) -> bool:
        return self.num_random == 0  # random tables are drawn for H heads

    def table(self, geo: Geometry) -> Tensor:
        raise NotImplementedError

    def _allowed_fn(self, geo: Geometry, device: torch.device) -> AllowedFn:
        table = self.table(geo).to(device)
        block, last = self.block, table.shape[-1] - 1
        if table.shape[0] == 1:
            t0 = table[0]
            return lambda b, h, i, j: t0[(i // block).clamp(0, last), (j // block).clamp(0, last)] & (i >= 0)
        return lambda b, h, i, j: table[h, (i // block).clamp(0, last), (j // block).clamp(0, last)] & (i >= 0)

    def block_exact(self, geo: Geometry, block: int) -> bool:
        return block == self.block and geo.offset % block == 0

    def _candidates(self, geo: Geometry, block: int, device: torch.device) -> Tensor:
        table = self.table(geo).to(device)
        q_lo, q_hi, k_lo, k_hi = block_ranges(geo, block, device)
        pb = self.block
        # Negative absolute positions (Nq > Nk) attend nothing here: an empty row range.
        r_lo = torch.where(q_hi < 0, q_hi.new_tensor(1), q_lo.clamp(min=0) // pb)
        r_hi = torch.where(q_hi < 0, q_hi.new_tensor(0), q_hi // pb)
        return any_in_rect(table, r_lo, r_hi, k_lo // pb, k_hi // pb).unsqueeze(0)


@pattern_dataclass
class RandomBlocks(BlockTablePattern):
    num_random: int  # key blocks drawn per query block
    block: int
    seed: int = 0
    _name_format = "random_blocks_{num_random}x{block}_seed{seed}"

    def __post_init__(self):
        _check_int(self.num_random, "num_random")
        _check_int(self.block, "block", minimum=1)
        _check_int(self.seed, "seed", maximum=2**63 - 1)

    def table(self, geo: Geometry) -> Tensor:
        nb = _cdiv(geo.kv_len, self.block)
        return draw_random_table(geo.num_heads, nb, self.num_random, self.seed)


def random_blocks(num_random: int, block: int, seed: int = 0) -> Pattern:
    """Each query block attends ``num_random`` key blocks drawn once from ``seed`` per head.

    The draw depends only on (seed, heads, number of blocks), so training and evaluation agree.
    """
    return RandomBlocks(num_random, block, seed)
