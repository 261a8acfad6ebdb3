"""The blocked backend's schedule: which key columns each tile of query rows reads, decided once per
pattern and geometry from the exact block plan.

Notation: b batch, h head, s block size, r query blocks per tile, C keys (columns) per tile.

A tile's keys come in three kinds of column segments:

- views: runs of consecutive key blocks the tile needs in (at least half of) its examples and heads (a
  sliding window's band, every key for a global row) are read in place as slices of k and v, masked where
  an example does not need them: a band costs no copy.
- shared: blocks every tile needs apart from its runs (global tokens) are copied once per call;
- gathered: what is left (random blocks, blocks that differ per head or example) is copied per tile with
  one ``index_select`` of whole blocks. A tile that gathers anyway copies its short views and the shared
  blocks into the same operand, since one matmul beats several small ones.

A tile is r consecutive query blocks, r chosen by a cost model (scores computed plus a measured fixed
cost per tile): Longformer-512 takes two 64-row blocks against a 640-key band, BigBird one block against
its 8 gathered blocks. Masks are additive (0 / -inf) biases stored once per distinct tile (interior
tiles of a window share one) and skipped where every column is allowed (BigBird on its own grid).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from ...caches import named_cache
from .. import machine
from ...patterns import Geometry, Pattern
from ...patterns.layout import compact, evaluate_blocks, get_plan, real_pairs

DEFAULT_BLOCK = 64
MIN_VIEW_BLOCKS = 2  # shorter runs of common blocks are gathered: a one-block matmul is too small to pay
# A block needed by at least this share of a tile's (example, head) pairs is read in place by all of them and
# masked where not needed, rather than gathered per example: packed documents (a pattern per row) went from
# 34.8 to 25.9 ms per row (docs/longdoc.md, "Packed batches")
VIEW_SHARE = 0.5
MERGE_VIEW_KEYS = 1024  # views up to this wide are copied into a tile's gather when it has one
TILE_OVERHEAD_SCORES: int | None = None  # a tile's fixed cost in scores of work; None: the machine profile's
MAX_TILE_BLOCKS = 8
SCHEDULE_MASK_BYTES = 1 << 30  # larger masks are not kept but evaluated tile by tile, every call
SCHEDULE_CACHE_BYTES = 2 << 30  # all cached schedules together

LAZY = "lazy"  # a tile's bias that is evaluated on every call instead of stored


@dataclass(frozen=True, eq=False)
class Tile:
    """r consecutive query blocks and the key columns they read, in order: views, shared, gathered.

    A tile that must gather blocks anyway copies short views and the shared blocks into the same
    operand: one matmul on 512 columns beats three on 192, 128 and 192 (BigBird 8K forward+backward:
    507 vs 628 ms)."""

    rows: slice  # padded query rows of the tile
    q_blocks: Tensor  # (r,) long
    views: tuple[tuple[int, int], ...]  # key row ranges [start, stop) read in place
    uses_shared: bool  # reads the shared blocks' copy (tiles with a gather copy them in it instead)
    gather: Tensor | None  # (b * h * G,) rows of the (b * h * nKB, s, d) block view of k/v, or None
    gather_blocks: int  # G
    kv_index: Tensor  # (B', H', K) key block of every column block (gathered padding slots hold 0)
    kv_count: Tensor  # (B', H') real column blocks; the padding slots are last
    bias: Tensor | str | None  # (B', H', r*s, C) 0 / -inf; None: nothing masked; LAZY: evaluate per call
    dead: Tensor | None  # (B', H', r*s, 1) bool rows that keep nothing (zeroed after softmax), or None

    @property
    def columns(self) -> int:
        return self.kv_index.shape[-1] * (self.rows.stop - self.rows.start) // self.q_blocks.numel()


@dataclass(frozen=True, eq=False)
class Schedule:
    pattern: Pattern
    geometry: Geometry
    block: int
    mask_batch: int  # B' of the pattern (1 unless global tokens are chosen per example)
    mask_heads: int  # H' of the pattern (1 unless it differs per head)
    shared: Tensor | None  # (b * h * S,) rows of the block view gathered once per call, or None
    shared_blocks: Tensor  # (S,) long key blocks every tile reads from the shared copy
    tiles: tuple[Tile, ...]
    exact_layout: Tensor | None  # (B', H', nQB, nKB) block layout of a block-exact pattern (lazy tile masks)

    @property
    def scores_per_head(self) -> int:
        """Scores computed per (example, head): the blocked path's work, padding included."""
        return sum((t.rows.stop - t.rows.start) * t.columns for t in self.tiles)

    def tile_mask(self, tile: Tile) -> tuple[Tensor | None, Tensor | None]:
        """The tile's pattern bias and dead rows (evaluated now when the schedule does not keep them)."""
        if isinstance(tile.bias, str):
            return bias_and_dead(tile_keep(self.pattern, self.geometry, self.block, tile, self.exact_layout))
        return tile.bias, tile.dead


def choose_block(pattern: Pattern | None, geo: Geometry | None = None) -> int:
    """The pattern's own block (``DEFAULT_BLOCK`` without one), at most the sequence rounded up to 16: a wider
    block only pads the inputs (``bigbird(block=10**6)`` on 130 tokens), and plans are exact at any block."""
    block = (pattern.preferred_block if pattern is not None else None) or DEFAULT_BLOCK
    if geo is not None:
        block = min(block, -(-max(geo.q_len, geo.kv_len, 1) // 16) * 16)
    return block


# ---- building a schedule ------------------------------------------------------------------------------------

def _runs(flags: Tensor) -> list[tuple[int, int]]:
    """[start, stop) runs of consecutive True entries of a 1-D bool tensor."""
    edges = torch.diff(flags.to(torch.int8), prepend=flags.new_zeros(1, dtype=torch.int8),
                       append=flags.new_zeros(1, dtype=torch.int8))
    starts = (edges == 1).nonzero().flatten().tolist()
    stops = (edges == -1).nonzero().flatten().tolist()
    return list(zip(starts, stops))


def tile_overhead_scores() -> int:
    """A tile's fixed cost in scores of work: measured by ``longattn calibrate`` (``machine.py``)."""
    return TILE_OVERHEAD_SCORES if TILE_OVERHEAD_SCORES is not None else machine.current().tile_overhead_scores


def _tile_blocks(layout: Tensor, geo: Geometry, block: int, overhead: int) -> int:
    """r minimising the scores computed plus a per-tile overhead (wider tiles read more unused keys)."""
    bp, hp, nqb, nkb = layout.shape
    best, best_cost = 1, None
    for r in (1, 2, 4, 8):
        if r > MAX_TILE_BLOCKS or (r > 1 and r > nqb):
            break
        tiles = -(-nqb // r)
        padded = F.pad(layout, (0, 0, 0, tiles * r - nqb))
        width = padded.view(bp, hp, tiles, r, nkb).any(3).sum(-1).amax(dim=(0, 1))  # (tiles,) key blocks
        scores = int(width.sum()) * r * block * block * geo.batch * geo.num_heads
        cost = scores + overhead * tiles
        if best_cost is None or cost < best_cost:
            best, best_cost = r, cost
    return best


def _flat_rows(index: Tensor, geo: Geometry, nkb: int) -> Tensor:
    """(B', H', G) key blocks -> the (b * h * G,) rows of the (b * h * nKB, s, d) block view of k/v."""
    b, h = geo.batch, geo.num_heads
    index = index.expand(b, h, index.shape[-1])
    base = (torch.arange(b, device=index.device).view(b, 1, 1) * h
            + torch.arange(h, device=index.device).view(1, h, 1)) * nkb
    return (base + index).reshape(-1)


def tile_keep(pattern: Pattern, geo: Geometry, block: int, tile: Tile, layout: Tensor | None) -> Tensor:
    """(B'', H'', r*s, C) bool: which (query, column) pairs of the tile the pattern allows.

    ``layout`` (the plan's block layout) is given for block-exact patterns: membership of whole blocks
    then decides, with no token evaluation."""
    r = tile.q_blocks.numel()
    index = tile.kv_index.unsqueeze(2).expand(-1, -1, r, -1)
    count = tile.kv_count.unsqueeze(2).expand(-1, -1, r)
    if layout is not None:
        member = layout[:, :, tile.q_blocks].gather(-1, index)  # (B', H', r, K)
        keep = real_pairs(geo, block, index, count, tile.q_blocks)
        keep = keep & member.repeat_interleave(block, -1).unsqueeze(-2)
    else:
        keep = evaluate_blocks(pattern, geo, block, index, count, index.device, q_blocks=tile.q_blocks)
    return keep.flatten(2, 3)


def bias_and_dead(keep: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """Additive bias (0 / -inf) and dead rows of a keep mask; dead rows keep their scores (so softmax stays
    finite) and are zeroed after it. None where nothing needs masking."""
    alive = keep.any(-1, keepdim=True)
    dead = None if bool(alive.all()) else ~alive
    drop = ~keep & alive
    if not bool(drop.any()):
        return None, dead
    return torch.zeros(drop.shape, device=keep.device).masked_fill_(drop, float("-inf")), dead


def build_schedule(pattern: Pattern, geo: Geometry, block: int, device: torch.device, overhead: int) -> Schedule:
    plan = get_plan(pattern, geo, block, device)
    layout = plan.layout()  # (B', H', nQB, nKB)
    bp, hp, nqb, nkb = layout.shape
    exact_layout = layout if plan.block_exact else None
    r = _tile_blocks(layout, geo, block, overhead)
    spans = [(t, min(nqb, t + r)) for t in range(0, nqb, r)]
    unions = [layout[:, :, a:z].any(2) for a, z in spans]  # (B', H', nKB) per tile
    # (nKB,): blocks read by every example and head: needed by at least VIEW_SHARE of them (the others mask
    # them), so that a pattern that differs a little per example (packed documents) keeps its band in place
    commons = [u.float().mean((0, 1)) >= VIEW_SHARE for u in unions]
    shared = torch.stack(commons).all(0)
    if int(shared.sum()) == nkb:  # everything shared (full attention, short inputs): plain views instead
        shared = torch.zeros_like(shared)
    shared_blocks = shared.nonzero().flatten()
    n_shared = shared_blocks.numel()
    tiles, kept_bytes, prev = [], 0, None
    for (a, z), union, common in zip(spans, unions, commons):
        views, view_flags = [], torch.zeros_like(common)
        for start, stop in _runs(common & ~shared):
            if stop - start >= MIN_VIEW_BLOCKS:
                views.append((start * block, stop * block))
                view_flags[start:stop] = True
        rest = union & ~view_flags & ~shared  # (B', H', nKB): gathered per example and head
        uses_shared = n_shared > 0
        if rest.any():  # a copy is made anyway: one operand beats several small matmuls
            if int(view_flags.sum()) * block <= MERGE_VIEW_KEYS:
                rest, views, view_flags = rest | view_flags, [], torch.zeros_like(view_flags)
            rest, uses_shared = rest | shared, False
        g_index, g_count = compact(rest)
        g = int(g_count.max()) if rest.any() else 0
        g_index = g_index[..., :g]
        view_blocks = view_flags.nonzero().flatten()
        fixed = torch.cat([view_blocks, shared_blocks]) if uses_shared else view_blocks
        fixed = fixed.expand(bp, hp, -1)
        kv_index = torch.cat([fixed, g_index], dim=-1)
        kv_count = g_count + fixed.shape[-1]
        tile = Tile(rows=slice(a * block, z * block), q_blocks=torch.arange(a, z, device=device), views=tuple(views),
                    uses_shared=uses_shared, gather=_flat_rows(g_index, geo, nkb) if g else None, gather_blocks=g,
                    kv_index=kv_index, kv_count=kv_count, bias=None, dead=None)
        if kept_bytes > SCHEDULE_MASK_BYTES:  # block-dense patterns at large N: bounded memory, re-evaluated
            tiles.append(replace(tile, bias=LAZY))
            continue
        bias, dead = bias_and_dead(tile_keep(pattern, geo, block, tile, exact_layout))
        if prev is not None and bias is not None and prev.shape == bias.shape and torch.equal(prev, bias):
            bias = prev  # interior tiles of a window share one mask
        elif bias is not None:
            kept_bytes += bias.numel() * bias.element_size()
        prev = bias
        tiles.append(replace(tile, bias=bias, dead=dead))
    if kept_bytes > SCHEDULE_MASK_BYTES:  # stop keeping masks as soon as they pass the budget
        tiles = [replace(t, bias=LAZY, dead=None) for t in tiles]
    if not any(t.uses_shared for t in tiles):
        shared_blocks = shared_blocks[:0]
    shared_rows = _flat_rows(shared_blocks.view(1, 1, -1), geo, nkb) if shared_blocks.numel() else None
    return Schedule(pattern=pattern, geometry=geo, block=block, mask_batch=bp, mask_heads=hp, shared=shared_rows,
                    shared_blocks=shared_blocks, tiles=tuple(tiles), exact_layout=exact_layout)


def _schedule_bytes(sched: Schedule) -> int:
    seen, total = set(), 0
    for t in sched.tiles:
        for x in (t.bias, t.dead, t.gather, t.kv_index):
            if isinstance(x, Tensor) and id(x) not in seen:
                seen.add(id(x))
                total += x.numel() * x.element_size()
    return total


SCHEDULES = named_cache("blocked_schedules", 64, max_bytes=SCHEDULE_CACHE_BYTES, size_of=_schedule_bytes)


def get_schedule(pattern: Pattern, geo: Geometry, block: int, device: torch.device) -> Schedule:
    overhead = tile_overhead_scores()
    key = None if pattern.key is None else (pattern.key, geo, block, str(device), overhead)
    return SCHEDULES.get_or_build(key, lambda: build_schedule(pattern, geo, block, device, overhead))
