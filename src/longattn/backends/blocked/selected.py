"""The blocked backend for layouts chosen per call (``topk_blocks``, MoBA; NSA's selected branch): every query
row lists its own key blocks.

Notation: P pairs (query row, key block) over all examples and heads, s block size, Qc query rows per chunk.

Rows choose different blocks, so a tile of consecutive rows would read the union of their choices. The pairs
are grouped by key block instead: a chunk holds up to Qc rows of one (example, head) that chose the same key
block, gathered into one (Qc, d) operand, and is one small dense product against that block. The work is the
pairs' scores plus at most one partly filled chunk per key block (on average a key block is chosen by
k * s * Nq / Nk rows, so chunks are nearly full).

A row's pairs lie in several chunks. Two passes make its softmax exact without keeping partial outputs: the
first finds each row's log-sum-exp (maximum and sum per chunk row, merged by scatter), the second adds
``exp(s - lse) @ V`` into the output rows. Backward recomputes the probabilities the same way, as the tile
kernel does. Memory: the pair list and one batch of chunks, never a score matrix. Half-precision inputs
compute in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from ...patterns import Geometry
from ...patterns.layout import get_plan
from ...patterns.topk_blocks import Resolved
from ..inputs import AttentionInputs
from .kernel import TILE_BYTES

PairMask = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True, eq=False)
class Chunks:
    """A call's pairs grouped by key block: chunk c holds up to Qc query rows of one (example, head) that
    attend key block ``key[c]``."""

    rows: Tensor  # (C, Qc) long: flat query row (b * H + h) * Nq + r; empty slots hold 0
    live: Tensor  # (C, Qc) bool: the slot holds a pair
    chosen: Tensor | None  # (C, Qc) bool: the pair's block came from the choice (None: all did)
    key: Tensor  # (C,) long: flat key block (b * H + h) * nKB + block

    @property
    def pairs(self) -> int:
        return int(self.live.sum())


def chunk_pairs(blocks: Tensor, chosen: Tensor | None, num_kv_blocks: int, qc: int) -> Chunks:
    """Group the pairs of ``blocks`` (B, H, Nq, K) long (-1 = none) into chunks of at most ``qc`` rows."""
    b, h, nq, width = blocks.shape
    device = blocks.device
    flat = blocks.reshape(b * h, nq * width)
    valid = flat >= 0
    bh = torch.arange(b * h, device=device).view(-1, 1)
    key = (bh * num_kv_blocks + flat)[valid]
    row = (bh * nq + torch.arange(nq, device=device).repeat_interleave(width))[valid]
    order = torch.sort(key, stable=True).indices  # rows stay in order inside a key block
    key, row = key[order], row[order]
    flag = None if chosen is None else chosen.reshape(b * h, nq * width)[valid][order]
    counts = torch.bincount(key, minlength=b * h * num_kv_blocks)
    starts = torch.cumsum(counts, 0) - counts
    per_key = (counts + qc - 1) // qc
    chunk_key = torch.repeat_interleave(torch.arange(counts.numel(), device=device), per_key)  # (C,)
    first_chunk = torch.cumsum(per_key, 0) - per_key
    within = torch.arange(chunk_key.numel(), device=device) - first_chunk[chunk_key]
    pos = (starts[chunk_key] + within * qc)[:, None] + torch.arange(qc, device=device)  # (C, Qc)
    live = pos < (starts + counts)[chunk_key][:, None]
    pos = torch.where(live, pos, 0)
    rows = torch.where(live, row[pos], 0) if row.numel() else pos
    flags = None if flag is None else (flag[pos] & live if flag.numel() else live)
    return Chunks(rows, live, flags, chunk_key)


@dataclass(frozen=True, eq=False)
class PairCall:
    """One call: the chunks, the masks every chunk evaluates, and the settings forward and backward share."""

    chunks: Chunks
    geo: Geometry
    block: int
    batch_chunks: int  # chunks multiplied at once
    key_real: Tensor  # (B * nKB, s) bool: a real key (not padding, not past Nk)
    mask: PairMask | None  # mask(b, h, i, j, chosen) of the pattern; None: every listed key is allowed
    attn_mask: Tensor | None  # broadcastable to (B, H, Nq, Nk), bool or float
    scale: float
    dropout_p: float
    seed: int

    def batches(self) -> Iterator[tuple[int, slice]]:
        total = self.chunks.key.numel()
        for n, start in enumerate(range(0, total, self.batch_chunks)):
            yield n, slice(start, min(total, start + self.batch_chunks))

    def bias(self, sl: slice, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Additive mask (c, Qc, s) (0 / -inf, plus a float attn_mask) and the allowed pairs of a batch."""
        geo, s = self.geo, self.block
        nkb = -(-geo.kv_len // s)
        key, rows, live = self.chunks.key[sl], self.chunks.rows[sl], self.chunks.live[sl]
        bh, blk = key.div(nkb, rounding_mode="floor"), key % nkb
        b, h = bh.div(geo.num_heads, rounding_mode="floor"), bh % geo.num_heads
        keep = live[:, :, None] & self.key_real[b * nkb + blk][:, None, :]
        r = (rows % geo.q_len)[:, :, None]  # (c, Qc, 1)
        j = (blk[:, None] * s + torch.arange(s, device=key.device))[:, None, :]  # (c, 1, s)
        b3, h3 = b.view(-1, 1, 1), h.view(-1, 1, 1)
        if self.mask is not None:
            chosen = live if self.chunks.chosen is None else self.chunks.chosen[sl]
            keep = keep & self.mask(b3, h3, r + geo.offset, j, chosen[:, :, None])
        bias = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
        if self.attn_mask is not None:
            am = self.attn_mask
            while am.dim() < 4:
                am = am.unsqueeze(0)
            am = am.expand(geo.batch, geo.num_heads, geo.q_len, geo.kv_len)
            picked = am[b3, h3, r, j.clamp(max=geo.kv_len - 1)]
            if picked.dtype == torch.bool:
                keep = keep & picked
            else:
                bias += picked.to(dtype)
                keep = keep & (picked > float("-inf"))
        return bias.masked_fill_(~keep, float("-inf")), keep

    def dropout_keep(self, n: int, like: Tensor) -> Tensor | None:
        """Batch n's dropout mask scaled by 1/(1-p), regenerated identically in backward from its seed."""
        if self.dropout_p == 0:
            return None
        gen = torch.Generator(device=like.device).manual_seed(self.seed + n)
        keep = torch.rand(like.shape, generator=gen, device=like.device, dtype=like.dtype) >= self.dropout_p
        return keep.to(like.dtype) / (1 - self.dropout_p)


def _operands(call: PairCall, sl: slice, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A batch's gathered query rows (c, Qc, d) and key and value blocks (c, s, d)."""
    rows, key = call.chunks.rows[sl], call.chunks.key[sl]
    qg = q.index_select(0, rows.reshape(-1)).view(*rows.shape, q.shape[-1])
    return qg, k.index_select(0, key), v.index_select(0, key)


def _probabilities(call: PairCall, sl: slice, qg: Tensor, kg: Tensor, lse: Tensor) -> Tensor:
    """exp(s - lse) of a batch (c, Qc, s): the exact probabilities, 0 where masked or the row is empty."""
    bias, keep = call.bias(sl, qg.dtype)
    scores = torch.baddbmm(bias, qg, kg.transpose(1, 2), alpha=call.scale)
    row_lse = lse.index_select(0, call.chunks.rows[sl].reshape(-1)).view(*qg.shape[:2], 1)
    return torch.where(keep, torch.exp(scores - row_lse.clamp(min=torch.finfo(scores.dtype).min)), 0.0)


def _log_sum_exp(call: PairCall, q: Tensor, k: Tensor) -> Tensor:
    """Pass 1: every row's log-sum-exp over all its pairs (BH * Nq,), -inf for rows with no allowed key."""
    maxima, sums = [], []
    for _, sl in call.batches():
        qg, kg, _ = _operands(call, sl, q, k, k)
        bias, _ = call.bias(sl, qg.dtype)
        scores = torch.baddbmm(bias, qg, kg.transpose(1, 2), alpha=call.scale)
        m = scores.amax(-1)  # (c, Qc)
        safe = torch.where(m > float("-inf"), m, 0.0)
        maxima.append(m.reshape(-1))
        sums.append(torch.exp(scores - safe[..., None]).sum(-1).reshape(-1))
    rows = call.chunks.rows.reshape(-1)
    m, l = torch.cat(maxima), torch.cat(sums)
    top = torch.full((q.shape[0],), float("-inf"), dtype=q.dtype, device=q.device)
    top.scatter_reduce_(0, rows, m, "amax")
    weight = torch.where(m > float("-inf"), torch.exp(m - top[rows].clamp(min=torch.finfo(q.dtype).min)), 0.0)
    total = torch.zeros_like(top).index_add_(0, rows, l * weight)
    return torch.where(total > 0, top + torch.log(total), float("-inf"))


class _PairAttention(torch.autograd.Function):
    """q (BH * Nq, d), k (BH * nKB, s, d), v (BH * nKB, s, dv) -> out (BH * Nq, dv) and lse (BH * Nq,)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, call: PairCall):
        lse = _log_sum_exp(call, q, k)
        out = torch.zeros(q.shape[0], v.shape[-1], dtype=q.dtype, device=q.device)
        for n, sl in call.batches():
            qg, kg, vg = _operands(call, sl, q, k, v)
            probs = _probabilities(call, sl, qg, kg, lse)
            keep = call.dropout_keep(n, probs)
            if keep is not None:
                probs = probs * keep
            out.index_add_(0, call.chunks.rows[sl].reshape(-1), torch.bmm(probs, vg).view(-1, v.shape[-1]))
        ctx.call = call
        ctx.save_for_backward(q, k, v, out, lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout: Tensor | None, dlse: Tensor | None):
        q, k, v, out, lse = ctx.saved_tensors
        call: PairCall = ctx.call
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        if dout is None:
            dout = torch.zeros_like(out)
        delta = (dout * out).sum(-1)  # rowsum(dO * O)
        if dlse is not None:  # d lse / d s = p: it enters as a shift of delta
            delta = delta - torch.where(lse > float("-inf"), dlse, 0.0)
        for n, sl in call.batches():
            rows = call.chunks.rows[sl].reshape(-1)
            qg, kg, vg = _operands(call, sl, q, k, v)
            probs = _probabilities(call, sl, qg, kg, lse)
            dog = dout.index_select(0, rows).view(*qg.shape[:2], -1)
            keep = call.dropout_keep(n, probs)
            dropped = probs if keep is None else probs * keep
            dv.index_add_(0, call.chunks.key[sl], torch.bmm(dropped.transpose(1, 2), dog))
            dp = torch.bmm(dog, vg.transpose(1, 2))
            if keep is not None:
                dp *= keep
            ds = probs * (dp - delta.index_select(0, rows).view(*qg.shape[:2], 1))
            dq.index_add_(0, rows, torch.bmm(ds, kg).view(-1, q.shape[-1]), alpha=call.scale)
            dk.index_add_(0, call.chunks.key[sl], torch.bmm(ds.transpose(1, 2), qg), alpha=call.scale)
        return dq, dk, dv, None


def pair_blocks(resolved: Resolved, geo: Geometry, block: int, device: torch.device
                ) -> tuple[Tensor, Tensor | None]:
    """Every query row's key blocks (B, H, Nq, K), -1 = none: the choice, and the blocks of the pattern's part
    that does not depend on it (``Resolved.base``), each listed once; and which came from the choice (None
    when all did)."""
    chosen = resolved.blocks.expand(geo.batch, geo.num_heads, -1, -1)
    if resolved.base is None:
        return chosen, None
    plan = get_plan(resolved.base, geo, block, device)
    q_block = torch.arange(geo.q_len, device=device).div(block, rounding_mode="floor")
    slots = plan.kv_index[:, :, q_block]  # (B', H', Nq, Ka)
    real = torch.arange(slots.shape[-1], device=device) < plan.kv_count[:, :, q_block, None]
    base = torch.where(real, slots, -1).expand(geo.batch, geo.num_heads, -1, -1)
    both = torch.cat([chosen, base], dim=-1)
    flags = torch.cat([torch.ones_like(chosen, dtype=torch.bool), torch.zeros_like(base, dtype=torch.bool)], -1)
    # Sort by block, a chosen copy before a base copy of the same block, and keep the first of each block.
    big = torch.iinfo(torch.long).max // 4
    order = torch.sort(torch.where(both < 0, big, both * 2 + (~flags).long()), dim=-1).indices
    both, flags = both.gather(-1, order), flags.gather(-1, order)
    repeat = F.pad(both[..., 1:] == both[..., :-1], (1, 0))
    return torch.where(repeat, -1, both), flags


def selected_attention(inp: AttentionInputs, resolved: Resolved, *, qc: int | None = None,
                       return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Attention of a resolved content-dependent pattern on the pair kernel; ``qc``: query rows per chunk
    (default: the block size). With ``return_lse`` also each row's log-sum-exp (B, H, Nq)."""
    if inp.attn_mask is not None and inp.attn_mask.requires_grad:
        raise ValueError("attn_mask: a float mask that needs a gradient is not supported with a content-dependent "
                         "pattern on the blocked backend; use backend='dense'")
    geo = inp.geometry
    device = inp.q.device
    block = resolved.node.block
    b, h, nq, d = inp.q.shape
    nk, dv = inp.k.shape[2], inp.v.shape[-1]
    nkb = -(-nk // block)
    qc = qc or block
    blocks, chosen = pair_blocks(resolved, geo, block, device)
    chunks = chunk_pairs(blocks, chosen, nkb, qc)
    real = torch.ones(b, nk, dtype=torch.bool, device=device) if inp.key_padding_mask is None \
        else inp.key_padding_mask
    key_real = F.pad(real, (0, nkb * block - nk)).view(b * nkb, block)
    acc = torch.float32 if inp.q.dtype in (torch.float16, torch.bfloat16) else inp.q.dtype
    seed = int(torch.randint(0, 2**62, (1,))) if inp.dropout_p > 0 else 0
    call = PairCall(chunks=chunks, geo=geo, block=block, batch_chunks=max(1, TILE_BYTES // (qc * block * 4)),
                    key_real=key_real, mask=resolved.pair_mask(geo, device), attn_mask=inp.attn_mask,
                    scale=inp.scale, dropout_p=inp.dropout_p, seed=seed)
    pad = lambda t: F.pad(t.to(acc), (0, 0, 0, nkb * block - nk)).reshape(b * h * nkb, block, t.shape[-1])  # noqa
    out, lse = _PairAttention.apply(inp.q.to(acc).reshape(b * h * nq, d), pad(inp.k), pad(inp.v), call)
    out = out.view(b, h, nq, dv).to(inp.q.dtype)
    return (out, lse.view(b, h, nq)) if return_lse else out
