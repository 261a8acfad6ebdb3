"""Block plans: the exact block structure of a pattern, in the form kernels consume.

A plan lists, for every query block, the key blocks that hold at least one allowed pair (padded to the
largest count K) and which of them are entirely allowed. It is built from a pattern's conservative
candidate layout by evaluating the token mask on the candidate blocks only, in bounded chunks, so
building costs O(N * K * block) time and no O(N^2) memory. Kernels evaluate the token mask of the
blocks they gather themselves (``evaluate_blocks``), and skip it for block-exact patterns (BigBird).

Shapes: B' and H' are 1 when the pattern does not vary with the example or the head.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..caches import named_cache
from ._base import Geometry, Pattern, _cdiv

# Elements of the (query, gathered key) grid evaluated at once while building a plan.
_EVAL_CHUNK = 1 << 23


@dataclass(frozen=True, eq=False)
class BlockPlan:
    geometry: Geometry
    block: int
    kv_index: Tensor  # (B', H', nQB, K) long: key blocks of each query block; padding slots hold 0
    kv_count: Tensor  # (B', H', nQB) long: how many slots of kv_index are real
    full: Tensor  # (B', H', nQB, K) bool: the block is allowed for every real (query, key) pair
    allowed_pairs: int  # allowed (query, key) pairs summed over B' and H'
    block_exact: bool  # every listed block is entirely allowed: kernels need no token mask

    @property
    def num_kv_blocks(self) -> int:
        return _cdiv(self.geometry.kv_len, self.block)

    @property
    def density(self) -> float:
        b, h = self.kv_index.shape[:2]
        return self.allowed_pairs / (b * h * self.geometry.q_len * self.geometry.kv_len)

    def layout(self) -> Tensor:
        """(B', H', nQB, nKB) bool: True where the block holds an allowed pair."""
        k = self.kv_index.shape[-1]
        return self._scatter(torch.arange(k, device=self.kv_index.device) < self.kv_count[..., None])

    def full_layout(self) -> Tensor:
        """(B', H', nQB, nKB) bool: True where every real pair of the block is allowed."""
        return self._scatter(self.full)

    def _scatter(self, slots: Tensor) -> Tensor:
        """The key blocks of the selected slots (B', H', nQB, K) as a (B', H', nQB, nKB) layout."""
        out = torch.zeros(*self.kv_index.shape[:3], self.num_kv_blocks + 1, dtype=torch.bool,
                          device=self.kv_index.device)
        # Unselected slots write into the spare last column, dropped below.
        out.scatter_(-1, torch.where(slots, self.kv_index, self.num_kv_blocks), True)
        return out[..., :-1]


def gathered_positions(geo: Geometry, block: int, kv_index: Tensor, q_blocks: Tensor | None = None
                       ) -> tuple[Tensor, Tensor]:
    """Absolute query positions (1, 1, n, block, 1) and key positions (B', H', n, 1, K * block) of the
    gathered blocks; ``q_blocks`` selects query blocks (default: all, in order)."""
    device = kv_index.device
    if q_blocks is None:
        q_blocks = torch.arange(kv_index.shape[2], device=device)
    offs = torch.arange(block, device=device)
    i = (q_blocks[:, None] * block + offs + geo.offset).view(1, 1, -1, block, 1)
    j = (kv_index[..., None] * block + offs).flatten(-2).unsqueeze(-2)
    return i, j


def evaluate_blocks(pattern: Pattern, geo: Geometry, block: int, kv_index: Tensor, kv_count: Tensor,
                    device: torch.device, q_blocks: Tensor | None = None) -> Tensor:
    """Token mask of the gathered blocks (B'', H'', n, block, K * block); False outside real pairs.

    ``kv_index`` (B', H', n, K) lists key blocks for the query blocks ``q_blocks`` (default: all).
    """
    period = pattern.head_period
    if period and pattern.head_count_free and geo.num_heads > period and geo.num_heads % period == 0:
        # Head h behaves as h % period: evaluate one period of heads and tile (12 heads of a two-head
        # Sparse Transformer pattern cost 2 evaluations, not 12).
        first = lambda t: t[:, :period] if t.shape[1] == geo.num_heads else t  # noqa: E731
        out = evaluate_blocks(pattern, replace(geo, num_heads=period), block, first(kv_index), first(kv_count),
                              device, q_blocks)
        return out.repeat(1, geo.num_heads // period, 1, 1, 1) if out.shape[1] == period else out
    allowed = pattern.allowed_fn(geo, device)
    bp, hp, nqb, k = kv_index.shape
    b = torch.arange(geo.batch, device=device).view(-1, 1, 1, 1, 1)
    h = torch.arange(geo.num_heads, device=device).view(1, -1, 1, 1, 1)
    slot_real = (torch.arange(k, device=device) < kv_count[..., None])  # (B', H', nQB, K)
    if q_blocks is None:
        q_blocks = torch.arange(nqb, device=device)
    per_chunk = max(1, _EVAL_CHUNK // max(1, bp * hp * block * k * block))
    chunks = []
    for start in range(0, nqb, per_chunk):
        sel = torch.arange(start, min(nqb, start + per_chunk), device=device)
        i, j = gathered_positions(geo, block, kv_index[:, :, sel], q_blocks[sel])
        real = (i - geo.offset < geo.q_len) & (j < geo.kv_len)
        real = real & slot_real[:, :, sel].repeat_interleave(block, -1).unsqueeze(-2)
        chunks.append(allowed(b, h, i, j) & real)
    bb, hh = max(c.shape[0] for c in chunks), max(c.shape[1] for c in chunks)
    return torch.cat([c.expand(bb, hh, *c.shape[2:]) for c in chunks], dim=2)


def compact(flags: Tensor, width: int | None = None) -> tuple[Tensor, Tensor]:
    """Indices of the True entries along the last dim, first and in order, and their count.

    (..., N) -> (..., K): K = ``width``, or the largest count; slots past the count hold 0.
    """
    count = flags.sum(-1)
    k = width if width is not None else max(1, int(count.max()))
    # A stable sort of the negated flags puts True entries first, in increasing index order.
    order = torch.sort((~flags).to(torch.uint8), dim=-1, stable=True).indices[..., :k]
    order = torch.where(torch.arange(k, device=flags.device) < count[..., None], order, 0)
    return order, count


def real_pairs(geo: Geometry, block: int, kv_index: Tensor, kv_count: Tensor, q_blocks: Tensor | None = None
               ) -> Tensor:
    """(B', H', n, block, K * block) bool: which gathered pairs exist (not padding rows, columns or slots)."""
    device = kv_index.device
    i, j = gathered_positions(geo, block, kv_index, q_blocks)
    k = kv_index.shape[-1]
    slot_real = (torch.arange(k, device=device) < kv_count[..., None]).repeat_interleave(block, -1)
    return (i - geo.offset < geo.q_len) & (j < geo.kv_len) & slot_real.unsqueeze(-2)


def _block_flags(pattern: Pattern, geo: Geometry, block: int, idx: Tensor, count: Tensor, device: torch.device
                 ) -> tuple[Tensor, Tensor, int]:
    """Per candidate slot: holds an allowed pair (hit), allows every real pair (full); and the pair count.

    Evaluated in chunks of query blocks, so memory stays bounded whatever the pattern's widest row.
    """
    bp, hp, nqb, k = idx.shape
    per_chunk = max(1, _EVAL_CHUNK // max(1, bp * hp * block * k * block))
    hits, fulls, pairs = [], [], 0
    for start in range(0, nqb, per_chunk):
        sel = torch.arange(start, min(nqb, start + per_chunk), device=device)
        mask = evaluate_blocks(pattern, geo, block, idx[:, :, sel], count[:, :, sel], device, q_blocks=sel)
        real = real_pairs(geo, block, idx[:, :, sel], count[:, :, sel], sel)
        shape = (*mask.shape[:3], block, k, block)
        hits.append(mask.view(shape).any(-1).any(-2))
        fulls.append((mask | ~real).view(shape).all(-1).all(-2))
        pairs += int(mask.count_nonzero())
    bb, hh = max(h.shape[0] for h in hits), max(h.shape[1] for h in hits)
    hit = torch.cat([h.expand(bb, hh, *h.shape[2:]) for h in hits], dim=2)
    full = torch.cat([f.expand(bb, hh, *f.shape[2:]) for f in fulls], dim=2) & hit
    return hit, full, pairs


def build_plan(pattern: Pattern, geo: Geometry, block: int, device: torch.device) -> BlockPlan:
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive int, got {block!r}")
    cand = pattern.candidates(geo, block, device)
    idx, count = compact(cand)
    exact = pattern.block_exact(geo, block)
    if exact:  # candidates are exactly the allowed blocks, each allowed entirely: no token evaluation
        hit = torch.arange(idx.shape[-1], device=device) < count[..., None]
        full = hit
        rows = (torch.clamp(geo.q_len - torch.arange(idx.shape[2], device=device) * block, max=block)
                ).view(1, 1, -1, 1)
        cols = torch.clamp(geo.kv_len - idx * block, max=block)
        pairs = int((rows * cols * hit).sum())
    else:
        hit, full, pairs = _block_flags(pattern, geo, block, idx, count, device)
    bp, hp = hit.shape[:2]
    idx, count = idx.expand(bp, hp, *idx.shape[2:]), count.expand(bp, hp, *count.shape[2:])
    # Drop candidates that turned out empty, keeping the others first and in order.
    keep_idx, keep_count = compact(hit)
    if keep_idx.shape[-1] < idx.shape[-1] or not bool((keep_count == count).all()):
        slot_real = torch.arange(keep_idx.shape[-1], device=device) < keep_count[..., None]
        idx = torch.where(slot_real, torch.gather(idx, -1, keep_idx), 0)
        full = torch.gather(full, -1, keep_idx) & slot_real
        count = keep_count
    return BlockPlan(geo, block, idx.contiguous(), count.contiguous(), full.contiguous(), pairs, exact)


PLANS = named_cache("block_plans", 64)


def get_plan(pattern: Pattern, geo: Geometry, block: int, device: torch.device) -> BlockPlan:
    """The plan for ``pattern`` at ``geo`` and ``block``, cached when the pattern has a key."""
    key = None if pattern.key is None else (pattern.key, geo, block, str(device))
    return PLANS.get_or_build(key, lambda: build_plan(pattern, geo, block, device))
