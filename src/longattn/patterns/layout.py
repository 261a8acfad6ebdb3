"""Block plans: the exact block structure of a pattern, in the form kernels consume.

A plan lists, for every query block, the key blocks that hold at least one allowed pair (padded to the
largest count K), the token mask inside those gathered blocks, and which blocks are entirely allowed.
It is built from a pattern's conservative candidate layout by evaluating the token mask on the
candidate blocks only, so building costs O(N * K * block), never O(N^2) for sparse patterns.

Shapes: B' and H' are 1 when the pattern does not vary with the example or the head.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from threading import Lock

import torch
from torch import Tensor

from ._base import Geometry, Pattern, _cdiv

# Elements of the (query, gathered key) grid evaluated at once while building a plan.
_EVAL_CHUNK = 1 << 23


@dataclass(frozen=True, eq=False)
class BlockPlan:
    geometry: Geometry
    block: int
    kv_index: Tensor  # (B', H', nQB, K) long: key blocks of each query block; padding slots hold 0
    kv_count: Tensor  # (B', H', nQB) long: how many slots of kv_index are real
    token_mask: Tensor  # (B', H', nQB, block, K * block) bool: allowed pairs in the gathered blocks
    full: Tensor  # (B', H', nQB, K) bool: the block is allowed for every real (query, key) pair
    allowed_pairs: int  # allowed (query, key) pairs summed over B' and H'

    @property
    def num_q_blocks(self) -> int:
        return self.kv_index.shape[2]

    @property
    def num_kv_blocks(self) -> int:
        return _cdiv(self.geometry.kv_len, self.block)

    @property
    def density(self) -> float:
        b, h = self.kv_index.shape[:2]
        return self.allowed_pairs / (b * h * self.geometry.q_len * self.geometry.kv_len)

    def layout(self) -> Tensor:
        """(B', H', nQB, nKB) bool: True where the block holds an allowed pair."""
        bp, hp, nqb, k = self.kv_index.shape
        out = torch.zeros(bp, hp, nqb, self.num_kv_blocks + 1, dtype=torch.bool, device=self.kv_index.device)
        slot_real = torch.arange(k, device=out.device) < self.kv_count[..., None]
        # Padding slots write into the spare last column, dropped below.
        out.scatter_(-1, torch.where(slot_real, self.kv_index, self.num_kv_blocks), True)
        return out[..., :-1]

    def full_layout(self) -> Tensor:
        """(B', H', nQB, nKB) bool: True where every real pair of the block is allowed."""
        bp, hp, nqb, k = self.kv_index.shape
        out = torch.zeros(bp, hp, nqb, self.num_kv_blocks + 1, dtype=torch.bool, device=self.kv_index.device)
        out.scatter_(-1, torch.where(self.full, self.kv_index, self.num_kv_blocks), True)
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


def _compact(flags: Tensor) -> tuple[Tensor, Tensor]:
    """Indices of the True entries along the last dim, first, and their count. (..., N) -> (..., K)."""
    count = flags.sum(-1)
    k = max(1, int(count.max()))
    # A stable sort of the negated flags puts True entries first, in increasing index order.
    order = torch.sort((~flags).to(torch.uint8), dim=-1, stable=True).indices[..., :k]
    order = torch.where(torch.arange(k, device=flags.device) < count[..., None], order, 0)
    return order, count


def build_plan(pattern: Pattern, geo: Geometry, block: int, device: torch.device) -> BlockPlan:
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive int, got {block!r}")
    cand = pattern.candidates(geo, block, device)
    idx, count = _compact(cand)
    mask = evaluate_blocks(pattern, geo, block, idx, count, device)
    bp, hp = mask.shape[:2]
    idx, count = idx.expand(bp, hp, *idx.shape[2:]), count.expand(bp, hp, *count.shape[2:])
    nqb, k = idx.shape[2:]
    per_block = mask.view(bp, hp, nqb, block, k, block)
    hit = per_block.any(-1).any(-2)  # (B', H', nQB, K)
    # "Full" ignores rows/columns past the ends, which exist only as padding.
    q_real = (torch.arange(nqb * block, device=device) < geo.q_len).view(1, 1, nqb, block, 1, 1)
    k_real = ((idx[..., None] * block + torch.arange(block, device=device)) < geo.kv_len).unsqueeze(3)
    full = (per_block | ~(q_real & k_real)).all(-1).all(-2) & hit
    # Drop candidates that turned out empty, keeping the others first and in order.
    keep_idx, keep_count = _compact(hit)
    if keep_idx.shape[-1] < k or not bool((keep_count == count).all()):
        new_k = keep_idx.shape[-1]
        idx = torch.gather(idx, -1, keep_idx)
        full = torch.gather(full, -1, keep_idx)
        sel = keep_idx.view(bp, hp, nqb, 1, new_k, 1).expand(-1, -1, -1, block, -1, block)
        mask = torch.gather(per_block, 4, sel).reshape(bp, hp, nqb, block, new_k * block)
        slot_real = torch.arange(new_k, device=device) < keep_count[..., None]
        idx = torch.where(slot_real, idx, 0)
        full = full & slot_real
        mask = mask & slot_real.repeat_interleave(block, -1).unsqueeze(-2)
        count = keep_count
    return BlockPlan(geo, block, idx.contiguous(), count.contiguous(), mask.contiguous(), full.contiguous(),
                     int(mask.sum()))


class _LRU:
    """A small thread-safe LRU cache for plans and compiled artefacts keyed by hashable tuples."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._data: OrderedDict = OrderedDict()
        self._lock = Lock()

    def get_or_build(self, key, build):
        if key is None:
            return build()
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
        value = build()
        with self._lock:
            self._data[key] = value
            while len(self._data) > self.capacity:
                self._data.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


_PLANS = _LRU(64)


def get_plan(pattern: Pattern, geo: Geometry, block: int, device: torch.device) -> BlockPlan:
    """The plan for ``pattern`` at ``geo`` and ``block``, cached when the pattern has a key."""
    key = None if pattern.key is None else (pattern.key, geo, block, str(device))
    return _PLANS.get_or_build(key, lambda: build_plan(pattern, geo, block, device))


def clear_caches() -> None:
    _PLANS.clear()
