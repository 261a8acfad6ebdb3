"""The blocked backend's kernel: each tile of query rows multiplies only the key columns its schedule
names (``schedule.py``), forward and backward.

Notation: b batch, h head, s block size, d head dim, r query blocks per tile, C keys (columns) per tile.

The (Nq, Nk) score matrix never exists. It is plain PyTorch (a custom autograd Function around matmul,
softmax and index_select), so every device and dtype works, forward and backward, without compilation.
A tile's scores (b, h, r*s, C) live in a reused workspace that stays in cache (wider tiles run a few
heads at a time), so the mask addition, the in-place softmax and the two matmuls touch cached memory and
no fresh pages. Backward recomputes each tile's probabilities instead of storing them (FlashAttention's
trade), so training memory is O(N * d) plus one tile; dK and dV of views accumulate in place in row
layout with one BLAS call each (beta = 1); dropout masks are regenerated from a per-group seed.
Low-precision inputs (bf16, fp16) multiply in their own dtype in the forward where the machine's matmul
is faster in it (``machine.compute_dtype``: AVX512-BF16, AMX, GPUs), with softmax in float32 and a row
offset that keeps the scores' digits (``BlockedCall.row_offsets``); their backward, and both directions
elsewhere (bf16 at half the fp32 rate without a bf16 unit), compute in float32 and cast back.

Where the machine's calibration chose it, the same tiles run in the fused C++ step (``native/``): one
parallel region per call instead of ~20 operations per tile. This module stays the reference and runs what
the fused step leaves out (dropout, float masks that want a gradient, non-float32 products, other devices).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, replace
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from ...patterns.full import Full
from ..inputs import AttentionInputs
from .. import machine
from ..machine import compute_dtype
from . import native
from .schedule import Schedule, Tile, bias_and_dead, choose_block, get_schedule

TILE_BYTES = 4 << 20  # wider tiles run a few heads at a time: scores stay in cache, no fresh pages
ROW_OFFSETS_ALWAYS = False  # tests: the low-precision path's extra columns in any dtype (gradcheck in float64)
NATIVE: bool | None = None  # the fused tile step (native/): None as the machine profile says; True where built


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

    def get(self, name: str, shape: tuple[int, ...], like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """A (shape) view of buffer ``name`` in ``dtype`` (default: ``like``'s), grown when too small."""
        numel, dtype = math.prod(shape), dtype or like.dtype
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = self._buffers[name] = like.new_empty(numel, dtype=dtype)
        return buf[:numel].view(shape)

    def cast(self, name: str, t: Tensor, dtype: torch.dtype) -> Tensor:
        """``t`` in ``dtype``, converted into a reused buffer when it is not already."""
        return t if t.dtype == dtype else self.get(name, tuple(t.shape), t, dtype).copy_(t)


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
class BlockedCall:
    """One call of the kernel: the schedule, this call's own masks and settings, and the per-tile steps that
    forward and backward share (backward recomputes what forward computed, from the same steps)."""

    sched: Schedule
    b: int
    h: int
    kpm: Tensor | None  # (b, Nk_pad) bool
    attn_mask: Tensor | None  # (B?, H?, Nq_pad, Nk_pad) bool or float
    scale: float
    dropout_p: float
    seed: int
    acc: torch.dtype  # softmax and accumulation dtype (float32 when the forward's matmuls run in bf16/fp16)
    # A low-precision matmul rounds each score to 8 bits, an error relative to the score's size (3.5x
    # SDPA's error: SDPA keeps its scores in fp32). With one extra column (q: -m_i, k: 1) the product gives
    # s_ij - m_i, m_i the row's largest score (from a first product), summed in fp32 before the rounding:
    # the scores that carry the softmax's weight are then near 0 and keep their digits (1.5-1.9x SDPA's
    # error). The shift leaves softmax unchanged and is not differentiated. Backward runs in acc.
    row_offsets: bool
    native: object | None = None  # the fused tile step's module (native/), when this call runs it

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
        bias, dead = bias_and_dead(keep)
        if picked is not None:
            bias = picked if bias is None else bias + picked
        return bias, dead

    def probabilities(self, scores: Tensor, bias: Tensor | None, dead: Tensor | None) -> Tensor:
        """Softmax probabilities (b, h, r*s, C) of a tile (group), in place over its scores (float32 for
        low-precision inputs); dead rows are 0.

        Backward recomputes them the same way rather than storing them or a log-sum-exp: one fused
        softmax over cached scores is cheaper on CPU than log-sum-exp plus exp passes.
        """
        if bias is not None:
            scores += bias
        if scores.device.type == "cpu":  # the CPU kernel finishes each row before the next: safe in place
            probs = torch.ops.aten._softmax.out(scores, -1, False, out=scores)
        else:
            probs = torch.softmax(scores, dim=-1)
        return probs if dead is None else probs.masked_fill_(dead, 0.0)

    def dropout_keep(self, n: int, like: Tensor) -> Tensor | None:
        """Group n's dropout mask, scaled by 1/(1-p); regenerated identically in backward from its seed."""
        return dropout_keep(self.dropout_p, self.seed + n, like)

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

    def native_layout(self) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor | None], list[Tensor | None]]:
        """The tiles as the fused step reads them: rows (T, 2), and per tile kv_index, kv_count, bias and
        dead rows with this call's masks folded in (kept with the schedule when the call adds none)."""
        own = self.kpm is not None or self.attn_mask is not None
        layout = None if own else _NATIVE_LAYOUTS.get(self.sched)
        if layout is not None:
            return layout
        rows = torch.tensor([[t.rows.start, t.rows.stop] for t in self.sched.tiles], dtype=torch.long)
        index, count, biases, deads = [], [], [], []
        for tile in self.sched.tiles:
            bias, dead = self.sched.tile_mask(tile)
            if own:
                bias, dead = self._fold_call_masks(tile, bias, dead)
            index.append(tile.kv_index.contiguous())
            count.append(tile.kv_count.contiguous())
            biases.append(None if bias is None else bias.float().contiguous())
            deads.append(None if dead is None else dead.contiguous())
        layout = (rows, index, count, biases, deads)
        if not own and not any(isinstance(t.bias, str) for t in self.sched.tiles):  # lazy masks stay lazy
            _NATIVE_LAYOUTS[self.sched] = layout
        return layout

    def tile_probabilities(self, ws: _Workspace, q: Tensor, n: int, tile: Tile, g: tuple[slice, slice],
                           parts: list[Part], bias: Tensor | None, dead: Tensor | None
                           ) -> tuple[Tensor, Tensor, Tensor | None]:
        """A group's queries, probabilities (in the workspace) and dropout mask: the forward pass, and its
        recomputation in backward.

        The queries come back scaled, except with row offsets: there the scale is applied to the float32
        scores, since a non-power-of-2 scale would round every query to 8 bits."""
        if not self.row_offsets:
            qt = q[g][:, :, tile.rows] * self.scale
            scores = _scores(qt, parts, "k", ws.get("scores", (*qt.shape[:-1], parts[-1].cols.stop), q))
        else:
            qt = q[g][:, :, tile.rows].clone()  # (b, h, r*s, d + 1), unscaled; the last column is 0
            shape = (*qt.shape[:-1], parts[-1].cols.stop)
            raw, scores = ws.get("scores", shape, q), ws.get("scores_acc", shape, q, self.acc)
            plain = torch.mul(_scores(qt, parts, "k", raw), self.scale, out=scores)
            if bias is not None:  # the maximum over allowed keys: a masked key's larger score would waste digits
                plain += bias
            top = plain.amax(dim=-1, keepdim=True).clamp_(min=-1e30)  # (b, h, r*s, 1); rows with no key: finite
            qt[..., -1:] = top.div_(-self.scale)
            torch.mul(_scores(qt, parts, "k", raw), self.scale, out=scores)
        probs = self.probabilities(scores, bias, dead)
        return qt, probs, self.dropout_keep(n, probs)


def dropout_keep(p: float, seed: int, like: Tensor) -> Tensor | None:
    """A dropout mask shaped as ``like``, scaled by 1/(1-p), drawn from ``seed`` (None when p is 0): the same
    mask again in backward, without storing it."""
    if p == 0:
        return None
    gen = torch.Generator(device=like.device).manual_seed(seed)
    keep = torch.rand(like.shape, generator=gen, device=like.device, dtype=like.dtype) >= p
    return keep.to(like.dtype) / (1 - p)


def _mix(weights: Tensor, parts: list[Part], operand: str, acc: torch.dtype | None = None) -> Tensor:
    """sum over parts of weights[..., part columns] @ part.<operand>, summed in ``acc`` when given
    (low-precision products are then rounded once each, not once per partial sum)."""
    out = None
    for p in parts:
        term = torch.matmul(weights[..., p.cols], getattr(p, operand))
        if out is None:
            out = term if acc is None or len(parts) == 1 else term.to(acc)
        else:
            out.add_(term)
    return out


_NATIVE_LAYOUTS: "weakref.WeakKeyDictionary[Schedule, tuple]" = weakref.WeakKeyDictionary()


def _native_for(q: Tensor, mm: torch.dtype, dropout_p: float, attn_mask: Tensor | None):
    """The fused tile step when this call can use it: CPU, float32 products, no dropout, no float mask that
    wants a gradient (those run the tile loop below)."""
    if NATIVE is False or ROW_OFFSETS_ALWAYS or q.device.type != "cpu" or dropout_p > 0 or mm != torch.float32:
        return None
    if NATIVE is None and not machine.current().fused_tiles:
        return None
    if attn_mask is not None and attn_mask.requires_grad:
        return None
    return native.load()


class _BlockedAttention(torch.autograd.Function):
    """Tile-by-tile forward that keeps only the output; backward recomputes each tile's probabilities
    (FlashAttention's trade) and accumulates dk/dv in place, so training memory is O(N * d) beyond the
    tile being processed. q, k, v arrive in the forward's matmul dtype (with the offset column when
    ``call.row_offsets``); the output and the float-mask bias are in ``call.acc``."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, call: BlockedCall) -> Tensor:
        ctx.call, ctx.bias_shape = call, None if bias is None else bias.shape
        ctx.native = call.native
        if ctx.native is not None:
            out, lse = ctx.native.forward(q, k, v, *call.native_layout(), call.sched.block, call.scale)
            ctx.save_for_backward(q, k, v, out, lse)
            return out
        ops = _Operands.of(call.sched, k, v)
        out = q.new_empty(*q.shape[:-1], v.shape[-1], dtype=call.acc)
        ws = _Workspace()
        for n, tile, g, parts, tile_bias, dead in call.work(ops):
            o = out[g][:, :, tile.rows]
            if not parts:  # no key at all: the rows output zeros
                o.zero_()
                continue
            _, probs, keep = call.tile_probabilities(ws, q, n, tile, g, parts, tile_bias, dead)
            if keep is not None:
                probs *= keep
            o.copy_(_mix(ws.cast("probs_mm", probs, q.dtype), parts, "v", call.acc))
        ctx.save_for_backward(q, k, v, out)
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        q, k, v, out = ctx.saved_tensors[:4]
        call: BlockedCall = ctx.call
        want_bias = ctx.bias_shape is not None and ctx.needs_input_grad[3]
        if ctx.native is not None:
            dq, dk, dv = ctx.native.backward(q, k, v, out, ctx.saved_tensors[4], dout.contiguous(),
                                             *call.native_layout(), call.sched.block, call.scale)
            return dq, dk, dv, None, None
        if not call.row_offsets:
            dq, dk, dv, dbias = _backward(q, k, v, out, dout, call, want_bias)
        else:
            # A low-precision forward: gradients are formed in acc from the same inputs. In bf16 every
            # product's rounding (scores, dP, dS) survives the softmax backward's cancellations: 3x SDPA's
            # error on dQ and dK at best, where float32 products stay within its tolerance.
            d = q.shape[-1] - 1
            exact = replace(call, row_offsets=False)
            # The forward's output came from rounded scores: delta is taken from the recomputed probabilities
            # instead, or dS would not sum to 0 over a row (2-4x SDPA's error on dQ of long rows).
            dq, dk, dv, dbias = _backward(q[..., :d].to(call.acc), k[..., :d].to(call.acc), v.to(call.acc), None,
                                          dout, exact, want_bias)
            dq, dk = F.pad(dq, (0, 1)), F.pad(dk, (0, 1))  # the offset columns get no gradient
        if dbias is not None:  # back to the bias's own (broadcast, padded) shape
            dims = [d for d in range(4) if ctx.bias_shape[d] == 1]
            dbias = dbias.sum(dim=dims, keepdim=True) if dims else dbias  # sum(dim=[]) would sum everything
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias, None


def _backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor | None, dout: Tensor, call: BlockedCall, want_bias: bool
              ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """dq, dk, dv and the float mask's gradient (b, h, Nq_pad, Nk_pad), recomputing each tile's probabilities
    (``out``: the forward's output for rowsum(dO * O); None: that sum from the recomputed probabilities)."""
    sched, block = call.sched, call.sched.block
    ops = _Operands.of(sched, k, v)
    ws = _Workspace()
    dq = torch.empty_like(q)
    # Every key gradient accumulates in row layout: a band's rows are contiguous. (A transposed (d, N)
    # accumulator makes each product q^T @ dS a little faster, but its rows lie N apart: 8-23% slower
    # forward+backward at 8K-16K, Longformer-512 on 2 cores.)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    dkst = dvst = None
    if ops.shared is not None:
        dkst, dvst = (x.new_zeros(*x.shape[:2], x.shape[3], x.shape[2]) for x in ops.shared)
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
        if out is None:  # rowsum(dO * O) from the recomputed probabilities (the forward's O is not theirs)
            delta = (dp * dropped).sum(-1, keepdim=True)
        else:
            delta = (dout_t * out[g][:, :, tile.rows]).sum(-1, keepdim=True)  # rowsum(dO * O)
        if keep is not None:
            dp *= keep
        ds = dp.sub_(delta).mul_(probs)  # softmax backward, in place
        dq_t.copy_(_mix(ds, parts, "k").mul_(call.scale))
        for p in parts:
            if p.view is not None:
                a, z = p.view
                _accumulate(dk[g][:, :, a:z], ds[..., p.cols].transpose(-1, -2), qt, ws)
                _accumulate(dv[g][:, :, a:z], dropped[..., p.cols].transpose(-1, -2), dout_t, ws)
            elif p.rows is None:  # the shared copy: transposed accumulators (few columns, every tile)
                _accumulate(dkst[g], qt.transpose(-1, -2), ds[..., p.cols], ws)
                _accumulate(dvst[g], dout_t.transpose(-1, -2), dropped[..., p.cols], ws)
            else:
                _scatter_blocks(dk, p.rows.reshape(-1), torch.matmul(ds[..., p.cols].transpose(-1, -2), qt), block)
                _scatter_blocks(dv, p.rows.reshape(-1), torch.matmul(dropped[..., p.cols].transpose(-1, -2), dout_t),
                                block)
        if dbias is not None:
            cols = _select(call.cols(tile), g)
            dbias[g][:, :, tile.rows].scatter_add_(-1, cols.expand(ds.shape), ds)
    if dkst is not None:
        _scatter_blocks(dk, sched.shared, dkst.transpose(-1, -2), block)
        _scatter_blocks(dv, sched.shared, dvst.transpose(-1, -2), block)
    return dq, dk, dv, dbias


def _accumulate(acc: Tensor, a: Tensor, b: Tensor, ws: _Workspace) -> None:
    """acc += a @ b for (b, h, m, n) views: one BLAS call with beta = 1 where the view allows (no product
    buffer, no separate add pass), otherwise a product then an add."""
    try:
        acc3 = acc.view(-1, *acc.shape[-2:])
    except RuntimeError:  # the leading dims do not merge in place
        acc += torch.matmul(a, b, out=ws.get("grad", (*a.shape[:-1], b.shape[-1]), a))
        return
    acc3.baddbmm_(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]))


def _scatter_blocks(target: Tensor, rows: Tensor, grad: Tensor, block: int) -> None:
    """Add the gradient of gathered blocks (b, h, G * block, d) into target (b, h, Nk_pad, d)."""
    target.view(-1, block, target.shape[-1]).index_add_(0, rows, grad.reshape(-1, block, grad.shape[-1]))


def tiled_attention(inp: AttentionInputs, *, block: int | None = None) -> Tensor:
    """Attention over the pattern's block schedule (``block``: its block size, default the pattern's own)."""
    pattern = inp.pattern if inp.pattern is not None else Full()
    geo = inp.geometry
    device = inp.q.device
    block = block or choose_block(inp.pattern, geo)
    sched = get_schedule(pattern, geo, block, device)
    b, h, nq, d = inp.q.shape
    nk = inp.k.shape[2]
    nqb, nkb = -(-nq // block), -(-nk // block)
    mm = compute_dtype(inp.q.dtype, device)  # the matmuls' dtype
    acc = torch.float32 if mm in (torch.float16, torch.bfloat16) else mm  # softmax and accumulation
    fused = _native_for(inp.q, mm, inp.dropout_p, inp.attn_mask)
    offsets = acc != mm or ROW_OFFSETS_ALWAYS
    q = _pad_rows(inp.q.to(mm), nqb * block)  # (b, h, Nq_pad, d)
    k = _pad_rows(inp.k.to(mm), nkb * block)  # (b, h, Nk_pad, d)
    v = _pad_rows(inp.v.to(mm), nkb * block)  # (b, h, Nk_pad, dv)
    if offsets:  # the row-offset columns (BlockedCall.row_offsets); their gradients are dropped by the cat
        q = torch.cat([q, q.new_zeros(*q.shape[:-1], 1)], dim=-1)  # (b, h, Nq_pad, d + 1)
        k = torch.cat([k, k.new_ones(*k.shape[:-1], 1)], dim=-1)  # (b, h, Nk_pad, d + 1)
    am, bias = inp.attn_mask, None
    if am is not None:
        am = am.to(acc) if am.is_floating_point() else am
        while am.dim() < 4:
            am = am.unsqueeze(0)
        pad_k, pad_q = (nkb * block - nk) * (am.shape[3] > 1), (nqb * block - nq) * (am.shape[2] > 1)
        am = F.pad(am, (0, pad_k, 0, pad_q))  # (B?, H?, Nq_pad | 1, Nk_pad | 1)
        bias = am if am.is_floating_point() else None
    kpm = None if inp.key_padding_mask is None else F.pad(inp.key_padding_mask, (0, nkb * block - nk))
    seed = int(torch.randint(0, 2**62, (1,))) if inp.dropout_p > 0 else 0
    call = BlockedCall(sched=sched, b=b, h=h, kpm=kpm, attn_mask=am, scale=inp.scale, dropout_p=inp.dropout_p,
                       seed=seed, acc=acc, row_offsets=offsets, native=fused)
    out = _BlockedAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), bias, call)
    return out[:, :, :nq].to(inp.q.dtype)
