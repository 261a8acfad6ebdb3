"""The blocked backend: each tile of query rows multiplies only the key blocks it needs.

Notation: b batch, h head, s block size, d head dim, r query blocks per tile, C keys (columns) per tile.

The (Nq, Nk) score matrix never exists. It is plain PyTorch (a custom autograd Function around matmul,
softmax and index_select), so every device and dtype works, forward and backward, without compilation.
Where a tile's keys come from is decided once per pattern and geometry (the ``Schedule``), from the exact
block plan, in three kinds of column segments:

- views: runs of consecutive key blocks the tile needs in every example and head (a sliding window's
  band, every key for a global row) are read in place as slices of k and v: a band costs no copy.
- shared: blocks every tile needs apart from its runs (global tokens) are copied once per call;
- gathered: what is left (random blocks, blocks that differ per head or example) is copied per tile with
  one ``index_select`` of whole blocks. A tile that gathers anyway copies its short views and the shared
  blocks into the same operand, since one matmul beats several small ones.

A tile is r consecutive query blocks, r chosen by a cost model (scores computed plus a measured fixed
cost per tile): Longformer-512 takes two 64-row blocks against a 640-key band, BigBird one block against
its 8 gathered blocks. A tile's scores (b, h, r*s, C) live in a reused workspace that stays in cache
(wider tiles run a few heads at a time), so the mask addition, the in-place softmax and the two matmuls
touch cached memory and no fresh pages. Masks are additive (0 / -inf) biases stored once per distinct
tile (interior tiles of a window share one) and skipped where every column is allowed (BigBird on its
own grid). Backward recomputes each tile's probabilities instead of storing them (FlashAttention's
trade), so training memory is O(N * d) plus one tile; dK and dV of views accumulate transposed
(``q^T @ dS`` is the faster matmul form on CPU); dropout masks are regenerated from a per-group seed.
Low-precision inputs are computed in float32 and cast back: on CPUs without AMX a bf16 matmul runs at
half the fp32 rate (see ``longattn bench``).

Patterns whose keys are block-sparse only in another order (Sparse Transformer's stride and summary
columns, per-head groups of them) do not reach the tiles as they are: ``permuted`` reorders them into
calls of this path or of dense SDPA on short rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from ..patterns import Geometry, Pattern
from ..patterns.full import Full
from ..patterns.layout import LRUCache, compact, evaluate_blocks, get_plan, real_pairs
from . import permuted
from ._inputs import AttentionInputs

DEFAULT_BLOCK = 64
MIN_VIEW_BLOCKS = 2  # shorter runs of common blocks are gathered: a one-block matmul is too small to pay
MERGE_VIEW_KEYS = 1024  # views up to this wide are copied into a tile's gather when it has one
TILE_OVERHEAD_SCORES = 150_000  # a tile's fixed cost (Python, ~40 op launches) in scores of work, all heads together
MAX_TILE_BLOCKS = 8
GATHER_COST = 2  # a gathered column costs about two in-place ones (BigBird vs Longformer, N=1024)
TILE_BYTES = 4 << 20  # wider tiles run a few heads at a time: scores stay in cache, no fresh pages
SCHEDULE_MASK_BYTES = 1 << 30  # larger masks are not kept but evaluated tile by tile, every call
SCHEDULE_CACHE_BYTES = 2 << 30  # all cached schedules together

_LAZY = "lazy"  # a tile's bias that is evaluated on every call instead of stored


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
    bias: Tensor | str | None  # (B', H', r*s, C) 0 / -inf; None: nothing masked; _LAZY: evaluate per call
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
    def copies(self) -> bool:
        """Some columns are copies (shared or gathered): their gradients go back through row-layout dK/dV."""
        return self.shared is not None or any(t.gather is not None for t in self.tiles)

    @property
    def scores_per_head(self) -> int:
        """Scores computed per (example, head): the blocked path's work, padding included."""
        return sum((t.rows.stop - t.rows.start) * t.columns for t in self.tiles)

    @property
    def cost_per_head(self) -> int:
        """Scores per (example, head) with gathered columns counted GATHER_COST times (their keys and
        values are copied per tile): what the ``auto`` rule compares with dense attention."""
        total = 0
        for t in self.tiles:
            gathered = t.gather_blocks * self.block
            total += (t.rows.stop - t.rows.start) * (t.columns + (GATHER_COST - 1) * gathered)
        return total

    def tile_mask(self, tile: Tile) -> tuple[Tensor | None, Tensor | None]:
        """The tile's pattern bias and dead rows (evaluated now when the schedule does not keep them)."""
        if isinstance(tile.bias, str):
            return _bias_and_dead(_tile_keep(self.pattern, self.geometry, self.block, tile, self.exact_layout))
        return tile.bias, tile.dead


def choose_block(pattern: Pattern | None) -> int:
    return (pattern.preferred_block if pattern is not None else None) or DEFAULT_BLOCK


# ---- building a schedule ------------------------------------------------------------------------------------

def _runs(flags: Tensor) -> list[tuple[int, int]]:
    """[start, stop) runs of consecutive True entries of a 1-D bool tensor."""
    edges = torch.diff(flags.to(torch.int8), prepend=flags.new_zeros(1, dtype=torch.int8),
                       append=flags.new_zeros(1, dtype=torch.int8))
    starts = (edges == 1).nonzero().flatten().tolist()
    stops = (edges == -1).nonzero().flatten().tolist()
    return list(zip(starts, stops))


def _tile_blocks(layout: Tensor, geo: Geometry, block: int) -> int:
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
        cost = scores + TILE_OVERHEAD_SCORES * tiles
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


def _tile_keep(pattern: Pattern, geo: Geometry, block: int, tile: Tile, layout: Tensor | None) -> Tensor:
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


def _bias_and_dead(keep: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """Additive bias (0 / -inf) and dead rows of a keep mask; dead rows keep their scores (so softmax stays
    finite) and are zeroed after it. None where nothing needs masking."""
    alive = keep.any(-1, keepdim=True)
    dead = None if bool(alive.all()) else ~alive
    drop = ~keep & alive
    if not bool(drop.any()):
        return None, dead
    return torch.zeros(drop.shape, device=keep.device).masked_fill_(drop, float("-inf")), dead


def build_schedule(pattern: Pattern, geo: Geometry, block: int, device: torch.device) -> Schedule:
    plan = get_plan(pattern, geo, block, device)
    layout = plan.layout()  # (B', H', nQB, nKB)
    bp, hp, nqb, nkb = layout.shape
    exact_layout = layout if plan.block_exact else None
    r = _tile_blocks(layout, geo, block)
    spans = [(t, min(nqb, t + r)) for t in range(0, nqb, r)]
    unions = [layout[:, :, a:z].any(2) for a, z in spans]  # (B', H', nKB) per tile
    commons = [u.all(0).all(0) for u in unions]  # (nKB,): needed in every example and head
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
        tile = Tile(slice(a * block, z * block), torch.arange(a, z, device=device), tuple(views), uses_shared,
                    _flat_rows(g_index, geo, nkb) if g else None, g, kv_index, kv_count, None, None)
        if kept_bytes > SCHEDULE_MASK_BYTES:  # block-dense patterns at large N: bounded memory, re-evaluated
            tiles.append(replace(tile, bias=_LAZY))
            continue
        bias, dead = _bias_and_dead(_tile_keep(pattern, geo, block, tile, exact_layout))
        if prev is not None and bias is not None and prev.shape == bias.shape and torch.equal(prev, bias):
            bias = prev  # interior tiles of a window share one mask
        elif bias is not None:
            kept_bytes += bias.numel() * bias.element_size()
        prev = bias
        tiles.append(replace(tile, bias=bias, dead=dead))
    if kept_bytes > SCHEDULE_MASK_BYTES:  # stop keeping masks as soon as they pass the budget
        tiles = [replace(t, bias=_LAZY, dead=None) for t in tiles]
    if not any(t.uses_shared for t in tiles):
        shared_blocks = shared_blocks[:0]
    shared_rows = _flat_rows(shared_blocks.view(1, 1, -1), geo, nkb) if shared_blocks.numel() else None
    return Schedule(pattern, geo, block, bp, hp, shared_rows, shared_blocks, tuple(tiles), exact_layout)


def _schedule_bytes(sched: Schedule) -> int:
    seen, total = set(), 0
    for t in sched.tiles:
        for x in (t.bias, t.dead, t.gather, t.kv_index):
            if isinstance(x, Tensor) and id(x) not in seen:
                seen.add(id(x))
                total += x.numel() * x.element_size()
    return total


_SCHEDULES = LRUCache(64, max_bytes=SCHEDULE_CACHE_BYTES, size_of=_schedule_bytes)


def get_schedule(pattern: Pattern, geo: Geometry, block: int, device: torch.device) -> Schedule:
    key = None if pattern.key is None else (pattern.key, geo, block, str(device))
    return _SCHEDULES.get_or_build(key, lambda: build_schedule(pattern, geo, block, device))


# ---- one call ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Part:
    """One column segment of a tile, for a group of examples and heads."""

    cols: slice  # its columns among the tile's C
    k: Tensor  # (b, h, w, d)
    v: Tensor  # (b, h, w, dv)
    view: tuple[int, int] | None  # key rows read in place; None: a copy (shared or gathered)
    rows: Tensor | None  # (b, h, G) gathered rows of the block view of k/v; None for views and the shared copy

    def select(self, g: tuple[slice, slice]) -> "Part":
        return Part(self.cols, self.k[g], self.v[g], self.view, None if self.rows is None else self.rows[g])


@dataclass(frozen=True, eq=False)
class _Operands:
    """A call's padded k/v and the shared blocks' copy (gathered once per call)."""

    k: Tensor  # (b, h, Nk_pad, d)
    v: Tensor  # (b, h, Nk_pad, dv)
    shared: tuple[Tensor, Tensor] | None  # k and v of the shared blocks

    @staticmethod
    def of(sched: Schedule, k: Tensor, v: Tensor) -> "_Operands":
        shared = None
        if sched.shared is not None:
            shared = (gather_blocks(k, sched.shared, sched.block), gather_blocks(v, sched.shared, sched.block))
        return _Operands(k, v, shared)

    def parts(self, sched: Schedule, tile: Tile) -> list[Part]:
        parts, col = [], 0
        for a, z in tile.views:
            parts.append(Part(slice(col, col + z - a), self.k[:, :, a:z], self.v[:, :, a:z], (a, z), None))
            col += z - a
        if tile.uses_shared:
            ks, vs = self.shared
            parts.append(Part(slice(col, col + ks.shape[2]), ks, vs, None, None))
            col += ks.shape[2]
        if tile.gather is not None:
            kg, vg = gather_blocks(self.k, tile.gather, sched.block), gather_blocks(self.v, tile.gather, sched.block)
            rows = tile.gather.view(*kg.shape[:2], -1)
            parts.append(Part(slice(col, col + kg.shape[2]), kg, vg, None, rows))
        return parts


def gather_blocks(x: Tensor, rows: Tensor, block: int) -> Tensor:
    """Copy whole key blocks: x (b, h, N_pad, d) -> (b, h, G * block, d) for rows (b * h * G,).

    index_select over contiguous blocks is far faster than advanced indexing with three index tensors.
    """
    b, h = x.shape[:2]
    return x.reshape(-1, block, x.shape[-1]).index_select(0, rows).view(b, h, -1, x.shape[-1])


def _pad_rows(t: Tensor, rows: int) -> Tensor:
    return F.pad(t, (0, 0, 0, rows - t.shape[-2])) if rows != t.shape[-2] else t


class _Workspace:
    """Reused flat buffers for a call's per-tile temporaries.

    A fresh multi-megabyte tensor per tile is a fresh mmap or a re-grown heap on glibc: page faults
    that cost as much as the tile's arithmetic (BigBird 8K forward+backward: 600 vs 700-900 ms)."""

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        numel = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel:
            buf = self._buffers[name] = like.new_empty(numel)
        return buf[:numel].view(shape)


def _scores(q: Tensor, parts: list[Part], operand: str, out: Tensor) -> Tensor:
    """q @ part.<operand>^T for every part, side by side in ``out`` (b, h, m, C)."""
    if len(parts) == 1:
        return torch.matmul(q, getattr(parts[0], operand).transpose(-1, -2), out=out)
    # Each product straight into its column slice: BLAS writes with a leading dimension, where a cat of
    # separate products would allocate and copy them (Longformer + global CLS at 4K: 8-15% of the call).
    for p in parts:
        torch.matmul(q, getattr(p, operand).transpose(-1, -2), out=out[..., p.cols])
    return out


def _select(t: Tensor | None, g: tuple[slice, slice]) -> Tensor | None:
    """The (example, head) group g of a mask whose leading dims may be broadcast (size 1)."""
    if t is None:
        return None
    return t[g[0] if t.shape[0] > 1 else slice(None), g[1] if t.shape[1] > 1 else slice(None)]


@dataclass(frozen=True, eq=False)
class _Call:
    """One call's schedule and per-call masks."""

    sched: Schedule
    b: int
    h: int
    kpm: Tensor | None  # (b, Nk_pad) bool
    attn_mask: Tensor | None  # (B?, H?, Nq_pad, Nk_pad) bool or float
    scale: float
    dropout_p: float
    seed: int

    def groups(self, tile: Tile) -> list[tuple[slice, slice]]:
        """(example, head) groups whose scores fit TILE_BYTES; one group for all but the widest tiles."""
        per_head = (tile.rows.stop - tile.rows.start) * tile.columns * 4
        if self.b * self.h * per_head <= TILE_BYTES:
            return [(slice(None), slice(None))]
        step = max(1, TILE_BYTES // per_head)
        return [(slice(e, e + 1), slice(h, min(self.h, h + step))) for e in range(self.b) for h in range(0, self.h, step)]

    def cols(self, tile: Tile) -> Tensor:
        """(B', H', 1, C) key position of every column."""
        s = self.sched.block
        return (tile.kv_index[..., None] * s + torch.arange(s, device=tile.kv_index.device)).flatten(-2).unsqueeze(-2)

    def _fold_call_masks(self, tile: Tile, bias: Tensor | None, dead: Tensor | None):
        keep = torch.ones((), dtype=torch.bool, device=tile.kv_index.device) if bias is None else bias == 0
        if dead is not None:
            keep = keep & ~dead
        cols, picked = self.cols(tile), None
        if self.kpm is not None:
            bi = torch.arange(self.b, device=cols.device).view(self.b, 1, 1, 1)
            keep = keep & self.kpm[bi, cols]
        if self.attn_mask is not None:
            am = self.attn_mask  # size-1 (broadcast) query and key dims stay unpadded
            rows = am if am.shape[2] == 1 else am[:, :, tile.rows]  # (B?, H?, r*s | 1, Nk_pad | 1)
            lead = torch.broadcast_shapes(rows.shape[:2], cols.shape[:2])
            picked = rows if rows.shape[3] == 1 else torch.gather(
                rows.expand(*lead, *rows.shape[2:]), -1, cols.expand(*lead, rows.shape[2], cols.shape[-1]))
            if picked.dtype == torch.bool:
                keep, picked = keep & picked, None
            else:
                keep = keep & (picked > float("-inf"))
        bias, dead = _bias_and_dead(keep)
        if picked is not None:
            bias = picked if bias is None else bias + picked
        return bias, dead

    def probabilities(self, qg: Tensor, parts: list[Part], bias: Tensor | None, dead: Tensor | None,
                      out: Tensor) -> Tensor:
        """Softmax probabilities (b, h, r*s, C) of a tile (group) from pre-scaled queries, computed in
        ``out``; dead rows are 0.

        Backward recomputes them the same way rather than storing them or a log-sum-exp: one fused
        softmax over cached scores is cheaper on CPU than log-sum-exp plus exp passes.
        """
        scores = _scores(qg, parts, "k", out)
        if bias is not None:
            scores += bias
        if scores.device.type == "cpu":  # the CPU kernel finishes each row before the next: safe in place
            probs = torch.ops.aten._softmax.out(scores, -1, False, out=scores)
        else:
            probs = torch.softmax(scores, dim=-1)
        return probs if dead is None else probs.masked_fill_(dead, 0.0)

    def dropout_keep(self, n: int, like: Tensor) -> Tensor | None:
        """Group n's dropout mask, scaled by 1/(1-p); regenerated identically in backward from its seed."""
        if self.dropout_p == 0:
            return None
        gen = torch.Generator(device=like.device).manual_seed(self.seed + n)
        keep = torch.rand(like.shape, generator=gen, device=like.device, dtype=like.dtype) >= self.dropout_p
        return keep.to(like.dtype) / (1 - self.dropout_p)

    def work(self, ops: _Operands) -> Iterator[tuple[int, Tile, tuple[slice, slice], list[Part], Tensor | None,
                                                     Tensor | None]]:
        """Every (tile, example/head group) with its parts and masks (this call's folded in); n numbers
        the groups (dropout seeds)."""
        n = 0
        for tile in self.sched.tiles:
            bias, dead = self.sched.tile_mask(tile)
            if self.kpm is not None or self.attn_mask is not None:
                bias, dead = self._fold_call_masks(tile, bias, dead)
            parts = ops.parts(self.sched, tile)
            for g in self.groups(tile):
                yield n, tile, g, [p.select(g) for p in parts], _select(bias, g), _select(dead, g)
                n += 1

    def tile_probabilities(self, ws: _Workspace, q: Tensor, n: int, tile: Tile, g: tuple[slice, slice],
                           parts: list[Part], bias: Tensor | None, dead: Tensor | None
                           ) -> tuple[Tensor, Tensor, Tensor | None]:
        """A group's scaled queries, probabilities (in the workspace) and dropout mask: the forward pass,
        and its recomputation in backward."""
        qt = q[g][:, :, tile.rows] * self.scale
        scores = ws.get("scores", (*qt.shape[:-1], parts[-1].cols.stop), q)
        probs = self.probabilities(qt, parts, bias, dead, scores)
        return qt, probs, self.dropout_keep(n, probs)


def _mix(weights: Tensor, parts: list[Part], operand: str) -> Tensor:
    """sum over parts of weights[..., part columns] @ part.<operand>."""
    out = None
    for p in parts:
        term = torch.matmul(weights[..., p.cols], getattr(p, operand))
        out = term if out is None else out.add_(term)
    return out


class _BlockedAttention(torch.autograd.Function):
    """Tile-by-tile forward that keeps only the output; backward recomputes each tile's probabilities
    (FlashAttention's trade) and accumulates dk/dv in place, so training memory is O(N * d) beyond the
    tile being processed."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, call: _Call) -> Tensor:
        ops = _Operands.of(call.sched, k, v)
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ws = _Workspace()
        for n, tile, g, parts, tile_bias, dead in call.work(ops):
            o = out[g][:, :, tile.rows]
            if not parts:  # no key at all: the rows output zeros
                o.zero_()
                continue
            _, probs, keep = call.tile_probabilities(ws, q, n, tile, g, parts, tile_bias, dead)
            if keep is not None:
                probs *= keep
            o.copy_(_mix(probs, parts, "v"))
        ctx.save_for_backward(q, k, v, out)
        ctx.call, ctx.bias_shape = call, None if bias is None else bias.shape
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        q, k, v, out = ctx.saved_tensors
        call: _Call = ctx.call
        sched, block = call.sched, call.sched.block
        ops = _Operands.of(sched, k, v)
        ws = _Workspace()
        dq = torch.empty_like(q)
        # Views accumulate into transposed gradients: q^T @ dS runs ~1.3x faster than dS^T @ q on CPU.
        dkt, dvt = q.new_zeros(*k.shape[:2], k.shape[3], k.shape[2]), q.new_zeros(*v.shape[:2], v.shape[3], v.shape[2])
        # Copied columns (shared, gathered) scatter back into row-layout gradients.
        dk, dv = (torch.zeros_like(k), torch.zeros_like(v)) if sched.copies else (None, None)
        dkst = dvst = None
        if ops.shared is not None:
            dkst, dvst = (x.new_zeros(*x.shape[:2], x.shape[3], x.shape[2]) for x in ops.shared)
        want_bias = ctx.bias_shape is not None and ctx.needs_input_grad[3]
        dbias = q.new_zeros(q.shape[0], q.shape[1], q.shape[2], k.shape[2]) if want_bias else None
        for n, tile, g, parts, tile_bias, dead in call.work(ops):
            dq_t = dq[g][:, :, tile.rows]
            if not parts:
                dq_t.zero_()
                continue
            qt, probs, keep = call.tile_probabilities(ws, q, n, tile, g, parts, tile_bias, dead)
            dout_t = dout[g][:, :, tile.rows]
            dropped = probs * keep if keep is not None else probs
            dp = _scores(dout_t, parts, "v", ws.get("dp", probs.shape, q))
            if keep is not None:
                dp *= keep
            delta = (dout_t * out[g][:, :, tile.rows]).sum(-1, keepdim=True)  # rowsum(dO * O)
            ds = dp.sub_(delta).mul_(probs)  # softmax backward, in place
            dq_t.copy_(_mix(ds, parts, "k").mul_(call.scale))
            for p in parts:
                if p.rows is None:  # views and the shared copy: transposed accumulators
                    acc_k, acc_v = (dkt, dvt) if p.view is not None else (dkst, dvst)
                    a, z = p.view if p.view is not None else (0, acc_k.shape[-1])
                    grad = ws.get("grad", (*qt.shape[:2], qt.shape[-1], z - a), q)
                    acc_k[g][..., a:z] += torch.matmul(qt.transpose(-1, -2), ds[..., p.cols], out=grad)
                    grad = ws.get("grad", (*dout_t.shape[:2], dout_t.shape[-1], z - a), q)
                    acc_v[g][..., a:z] += torch.matmul(dout_t.transpose(-1, -2), dropped[..., p.cols], out=grad)
                    continue
                _scatter_blocks(dk, p.rows.reshape(-1), torch.matmul(ds[..., p.cols].transpose(-1, -2), qt), block)
                _scatter_blocks(dv, p.rows.reshape(-1), torch.matmul(dropped[..., p.cols].transpose(-1, -2), dout_t),
                                block)
            if dbias is not None:
                cols = _select(call.cols(tile), g)
                dbias[g][:, :, tile.rows].scatter_add_(-1, cols.expand(ds.shape), ds)
        if dkst is not None:
            _scatter_blocks(dk, sched.shared, dkst.transpose(-1, -2), block)
            _scatter_blocks(dv, sched.shared, dvst.transpose(-1, -2), block)
        dk = dkt.transpose(-1, -2) if dk is None else dk.add_(dkt.transpose(-1, -2))
        dv = dvt.transpose(-1, -2) if dv is None else dv.add_(dvt.transpose(-1, -2))
        if dbias is not None:  # back to the bias's own (broadcast, padded) shape
            dims = [d for d in range(4) if ctx.bias_shape[d] == 1]
            dbias = dbias.sum(dim=dims, keepdim=True) if dims else dbias  # sum(dim=[]) would sum everything
        return dq, dk, dv, dbias, None


def _scatter_blocks(target: Tensor, rows: Tensor, grad: Tensor, block: int) -> None:
    """Add the gradient of gathered blocks (b, h, G * block, d) into target (b, h, Nk_pad, d)."""
    target.view(-1, block, target.shape[-1]).index_add_(0, rows, grad.reshape(-1, block, grad.shape[-1]))


def blocked_attention(inp: AttentionInputs, *, block: int | None = None) -> Tensor:
    """The blocked path. Sparse Transformer factors (stride and summary columns, ``per_head`` groups) run
    reordered (``permuted``): their keys are block-sparse only in another order. ``block`` forces the
    plain tile schedule at that block size."""
    if block is None and inp.sparse_pattern is not None:
        plan = permuted.get_plan(inp.pattern, inp.geometry, inp.q.device)
        if plan is not None:
            return permuted.factored_attention(plan, inp, _tiled_attention)
    return _tiled_attention(inp, block=block)


def _tiled_attention(inp: AttentionInputs, *, block: int | None = None) -> Tensor:
    pattern = inp.pattern if inp.pattern is not None else Full()
    geo = inp.geometry
    device = inp.q.device
    block = block or choose_block(inp.pattern)
    sched = get_schedule(pattern, geo, block, device)
    b, h, nq, d = inp.q.shape
    nk = inp.k.shape[2]
    nqb, nkb = -(-nq // block), -(-nk // block)
    compute = torch.float32 if inp.q.dtype in (torch.float16, torch.bfloat16) else inp.q.dtype
    q = _pad_rows(inp.q.to(compute), nqb * block)  # (b, h, Nq_pad, d)
    k = _pad_rows(inp.k.to(compute), nkb * block)  # (b, h, Nk_pad, d)
    v = _pad_rows(inp.v.to(compute), nkb * block)  # (b, h, Nk_pad, dv)
    am, bias = inp.attn_mask, None
    if am is not None:
        am = am.to(compute) if am.is_floating_point() else am
        while am.dim() < 4:
            am = am.unsqueeze(0)
        pad_k, pad_q = (nkb * block - nk) * (am.shape[3] > 1), (nqb * block - nq) * (am.shape[2] > 1)
        am = F.pad(am, (0, pad_k, 0, pad_q))  # (B?, H?, Nq_pad | 1, Nk_pad | 1)
        bias = am if am.is_floating_point() else None
    kpm = None if inp.key_padding_mask is None else F.pad(inp.key_padding_mask, (0, nkb * block - nk))
    seed = int(torch.randint(0, 2**62, (1,))) if inp.dropout_p > 0 else 0
    call = _Call(sched, b, h, kpm, am, inp.scale, inp.dropout_p, seed)
    out = _BlockedAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), bias, call)
    return out[:, :, :nq].to(inp.q.dtype)
