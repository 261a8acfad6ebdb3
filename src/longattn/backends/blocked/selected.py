"""The blocked backend for layouts chosen per call (``topk_blocks``, MoBA; NSA's selected branch): every query
row lists its own key blocks.

Notation: P pairs (query row, key block) over all examples and heads, s block size, Qc query rows per chunk.

Rows choose different blocks, so a tile of consecutive rows would read the union of their choices. The pairs
are grouped by key block instead: a chunk holds up to Qc rows of one (example, head) that chose the same key
block, gathered into one (Qc, d) operand, and is one small dense product against that block. The work is the
pairs' scores plus at most one partly filled chunk per key block (on average a key block is chosen by
k * s * Nq / Nk rows, so chunks are nearly full).

A row's pairs lie in several chunks. The forward keeps, for every chunk row, its maximum, sum and
unnormalised output, and merges them per row by scatter once a group of heads is done (the online softmax's
reduction; 16K causal MoBA: one pass instead of two, 300 -> 177 ms). Backward recomputes the probabilities
from each row's log-sum-exp, as the tile kernel does. Chunks whose key block holds no padding and ends before
their first query take no mask; empty slots point at a spare row whose log-sum-exp is +inf. Memory: the pair
list, one group's partial outputs (``GROUP_BYTES``) and one batch of chunks, never a score matrix.
Half-precision inputs compute in float32.
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
from .kernel import TILE_BYTES, _Workspace, dropout_keep

PairMask = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]
GROUP_BYTES = 32 << 20  # partial outputs kept at once (whole heads; one head at least)


@dataclass(frozen=True, eq=False)
class Chunks:
    """A call's pairs grouped by key block: chunk c holds up to Qc query rows of one (example, head) that
    attend key block ``key[c]``. Chunks are ordered by (example, head), then unmasked before masked, then key
    block. Empty slots point at a spare row past the last query row (index BH * Nq), whose log-sum-exp is +inf:
    its probabilities are 0 without a mask, and what is added to it is dropped."""

    rows: Tensor  # (C, Qc) long: flat query row (b * H + h) * Nq + r, or the spare row
    chosen: Tensor | None  # (C, Qc) bool: the pair's block came from the choice (None: all did)
    key: Tensor  # (C,) long: flat key block (b * H + h) * nKB + block
    masked: Tensor  # (C,) bool: some pair of the chunk needs a token mask
    head: Tensor  # (C,) long: b * H + h


def chunk_pairs(blocks: Tensor, chosen: Tensor | None, num_kv_blocks: int, qc: int) -> tuple[Tensor, ...]:
    """Group the pairs of ``blocks`` (B, H, Nq, K) long (-1 = none) into chunks of at most ``qc`` rows ordered
    by key: rows (C, Qc) (-1 for empty slots), chosen flags (C, Qc) or None, and keys (C,)."""
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
    rows = torch.where(live, row[pos], -1) if row.numel() else pos - 1
    flags = None if flag is None else (flag[pos] & live if flag.numel() else live)
    return rows, flags, chunk_key


def build_chunks(blocks: Tensor, chosen: Tensor | None, geo: Geometry, block: int, qc: int, key_real: Tensor,
                 causal_only: bool, mask_all: bool) -> Chunks:
    """The call's chunks, each marked when it needs a token mask: its key block holds padding, the pattern
    has parts besides the choice (``mask_all``), or (``causal_only``) the block reaches past a row's query."""
    nkb = -(-geo.kv_len // block)
    rows, flags, key = chunk_pairs(blocks, chosen, nkb, qc)
    spare = geo.batch * geo.num_heads * geo.q_len
    head, blk = key.div(nkb, rounding_mode="floor"), key % nkb
    b = head.div(geo.num_heads, rounding_mode="floor")
    masked = ~key_real.view(geo.batch, nkb, block).all(-1)[b, blk]
    if mask_all:
        masked = torch.ones_like(masked)
    elif causal_only:
        first_row = torch.where(rows >= 0, rows % geo.q_len, geo.q_len).amin(-1)  # rows are increasing
        masked |= (blk + 1) * block - 1 > first_row + geo.offset
    order = torch.sort(head * 2 + masked.long(), stable=True).indices
    rows = torch.where(rows >= 0, rows, spare)[order]
    return Chunks(rows, None if flags is None else flags[order], key[order], masked[order], head[order])


@dataclass(frozen=True, eq=False)
class PairCall:
    """One call: the chunks, the masks masked chunks evaluate, and the settings forward and backward share."""

    chunks: Chunks
    geo: Geometry
    block: int
    batch_chunks: int  # chunks multiplied at once
    key_real: Tensor  # (B * nKB, s) bool: a real key (not padding, not past Nk)
    mask: PairMask | None  # mask(b, h, i, j, chosen) of the pattern; None: every listed key is allowed
    attn_mask: Tensor | None  # broadcastable to (B, H, Nq, Nk), bool or float
    dropout_p: float
    seed: int

    def groups(self, dv: int) -> list[slice]:
        """Chunk ranges of whole heads whose partial outputs fit ``GROUP_BYTES`` (one head at least)."""
        heads = self.chunks.head
        if not heads.numel():
            return []
        ends = torch.nonzero(torch.diff(heads, append=heads.new_full((1,), -1))).flatten().add(1).tolist()
        per_chunk = self.chunks.rows.shape[1] * (dv + 2) * 4
        out, start = [], 0
        for prev, end in zip([0] + ends[:-1], ends):
            if prev > start and (end - start) * per_chunk > GROUP_BYTES:
                out.append(slice(start, prev))
                start = prev
        out.append(slice(start, ends[-1]))
        return out

    def batches(self, within: slice) -> Iterator[tuple[int, slice, bool]]:
        """Batches of at most ``batch_chunks`` chunks that are all masked or all not, with their first chunk's
        index (a batch's dropout seed)."""
        masked = self.chunks.masked
        start = within.start
        while start < within.stop:
            stop = min(within.stop, start + self.batch_chunks)
            flag = bool(masked[start])
            run = torch.nonzero(masked[start:stop] != flag)
            if run.numel():
                stop = start + int(run[0])
            yield start, slice(start, stop), flag
            start = stop

    def bias(self, sl: slice, dtype: torch.dtype) -> Tensor:
        """Additive mask (c, Qc, s) of a batch of masked chunks: 0 / -inf, plus a float attn_mask."""
        geo, s = self.geo, self.block
        nkb = -(-geo.kv_len // s)
        key, rows = self.chunks.key[sl], self.chunks.rows[sl]
        bh, blk = self.chunks.head[sl], key % nkb
        b, h = bh.div(geo.num_heads, rounding_mode="floor"), bh % geo.num_heads
        keep = self.key_real[b * nkb + blk][:, None, :].expand(-1, rows.shape[1], -1)
        r = (rows % geo.q_len)[:, :, None]  # (c, Qc, 1); the spare row's value is masked by its lse
        j = (blk[:, None] * s + torch.arange(s, device=key.device))[:, None, :]  # (c, 1, s)
        b3, h3 = b.view(-1, 1, 1), h.view(-1, 1, 1)
        if self.mask is not None:
            chosen = torch.ones_like(rows, dtype=torch.bool) if self.chunks.chosen is None else self.chunks.chosen[sl]
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
        return bias.masked_fill_(~keep, float("-inf"))

    def dropout_keep(self, n: int, like: Tensor) -> Tensor | None:
        """The dropout mask of the batch starting at chunk n, regenerated identically in backward."""
        return dropout_keep(self.dropout_p, self.seed + n, like)

    def scores(self, ws: _Workspace, sl: slice, masked: bool, qg: Tensor, kg: Tensor) -> Tensor:
        """A batch's scores (c, Qc, s) in the workspace (queries come scaled), masked chunks' bias added."""
        out = ws.get("scores", (*qg.shape[:2], kg.shape[1]), qg)
        torch.bmm(qg, kg.transpose(1, 2), out=out)
        return out.add_(self.bias(sl, qg.dtype)) if masked else out


def _operands(call: PairCall, sl: slice, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A batch's gathered query rows (c, Qc, d) and key and value blocks (c, s, d)."""
    rows, key = call.chunks.rows[sl], call.chunks.key[sl]
    qg = q.index_select(0, rows.reshape(-1)).view(*rows.shape, q.shape[-1])
    return qg, k.index_select(0, key), v.index_select(0, key)


class _PairAttention(torch.autograd.Function):
    """q (BH * Nq + 1, d) scaled, with the spare row last; k (BH * nKB, s, d), v (BH * nKB, s, dv)
    -> out (BH * Nq + 1, dv) and lse (BH * Nq + 1,) (the spare row's is +inf)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, call: PairCall):
        ws = _Workspace()
        top = torch.full((q.shape[0],), float("-inf"), dtype=q.dtype, device=q.device)
        total = torch.zeros_like(top)
        out = q.new_zeros(q.shape[0], v.shape[-1])
        # One pass per group of heads: each chunk row's maximum, sum and unnormalised output, merged over the
        # row's chunks once the group is done (the online softmax's reduction, by scatter).
        qc = call.chunks.rows.shape[1]
        for group in call.groups(v.shape[-1]):
            size = (group.stop - group.start) * qc
            maxima, sums = q.new_empty(size), q.new_empty(size)
            parts = q.new_empty(size, v.shape[-1])  # unnormalised outputs, each row's part of each chunk
            for n, sl, masked in call.batches(group):
                at = slice((sl.start - group.start) * qc, (sl.stop - group.start) * qc)
                qg, kg, vg = _operands(call, sl, q, k, v)
                scores = call.scores(ws, sl, masked, qg, kg)
                m = scores.amax(-1, keepdim=True)  # (c, Qc, 1)
                if masked:  # rows with no allowed key in this chunk: -inf, weight 0 in the merge
                    scores.sub_(torch.where(m > float("-inf"), m, 0.0)).exp_()
                else:
                    scores.sub_(m).exp_()
                maxima[at] = m.flatten()
                torch.sum(scores, -1, out=sums[at].view(m.shape[:2]))
                keep = call.dropout_keep(n, scores)
                torch.bmm(scores if keep is None else scores * keep, vg, out=parts[at].view(*m.shape[:2], -1))
            rows = call.chunks.rows[group].reshape(-1)
            top.scatter_reduce_(0, rows, maxima, "amax")
            weight = torch.where(maxima > float("-inf"),
                                 torch.exp(maxima - top[rows].clamp(min=torch.finfo(q.dtype).min)), 0.0)
            total.index_add_(0, rows, sums.mul_(weight))
            out.index_add_(0, rows, parts.mul_(weight[:, None]))
        live = total > 0
        out = torch.where(live[:, None], out / torch.where(live, total, 1.0)[:, None], 0.0)
        lse = torch.where(live, top + torch.log(total), float("-inf"))
        lse[-1] = float("inf")  # the spare row: probabilities 0 in backward
        ctx.call = call
        ctx.save_for_backward(q, k, v, out, lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout: Tensor | None, dlse: Tensor | None):
        q, k, v, out, lse = ctx.saved_tensors
        call: PairCall = ctx.call
        ws = _Workspace()
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        if dout is None:
            dout = torch.zeros_like(out)
        delta = (dout * out).sum(-1)  # rowsum(dO * O)
        if dlse is not None:  # d lse / d s = p: it enters as a shift of delta
            delta = delta - torch.where(lse.abs() < float("inf"), dlse, 0.0)
        neg_lse = torch.where(lse > float("-inf"), -lse, float("-inf"))  # empty rows: probabilities 0
        for group in call.groups(v.shape[-1]):
            for n, sl, masked in call.batches(group):
                rows = call.chunks.rows[sl].reshape(-1)
                key = call.chunks.key[sl]
                qg, kg, vg = _operands(call, sl, q, k, v)
                probs = call.scores(ws, sl, masked, qg, kg)
                probs.add_(neg_lse.index_select(0, rows).view(*qg.shape[:2], 1)).exp_()
                dog = dout.index_select(0, rows).view(*qg.shape[:2], -1)
                keep = call.dropout_keep(n, probs)
                dropped = probs if keep is None else probs * keep
                dv.index_add_(0, key, torch.bmm(dropped.transpose(1, 2), dog))
                dp = torch.bmm(dog, vg.transpose(1, 2), out=ws.get("dp", probs.shape, probs))
                if keep is not None:
                    dp *= keep
                ds = dp.sub_(delta.index_select(0, rows).view(*qg.shape[:2], 1)).mul_(probs)
                dq.index_add_(0, rows, torch.bmm(ds, kg).flatten(0, 1))
                dk.index_add_(0, key, torch.bmm(ds.transpose(1, 2), qg))
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
    real = torch.ones(b, nk, dtype=torch.bool, device=device) if inp.key_padding_mask is None \
        else inp.key_padding_mask
    key_real = F.pad(real, (0, nkb * block - nk)).view(b * nkb, block)
    mask = resolved.pair_mask(geo, device)
    blocks, chosen = pair_blocks(resolved, geo, block, device)
    static_parts = resolved.base is not None or resolved.gate is not None
    chunks = build_chunks(blocks, chosen, geo, block, qc, key_real, causal_only=resolved.node.causal,
                          mask_all=static_parts or inp.attn_mask is not None)
    acc = torch.float32 if inp.q.dtype in (torch.float16, torch.bfloat16) else inp.q.dtype
    seed = int(torch.randint(0, 2**62, (1,))) if inp.dropout_p > 0 else 0
    call = PairCall(chunks=chunks, geo=geo, block=block, batch_chunks=max(1, TILE_BYTES // (qc * block * 4)),
                    key_real=key_real, mask=mask, attn_mask=inp.attn_mask, dropout_p=inp.dropout_p, seed=seed)
    q = F.pad((inp.q.to(acc) * inp.scale).reshape(b * h * nq, d), (0, 0, 0, 1))  # scaled, and the spare row
    pad = lambda t: F.pad(t.to(acc), (0, 0, 0, nkb * block - nk)).reshape(b * h * nkb, block, t.shape[-1])  # noqa
    out, lse = _PairAttention.apply(q, pad(inp.k), pad(inp.v), call)
    out = out[:-1].view(b, h, nq, dv).to(inp.q.dtype)
    return (out, lse[:-1].view(b, h, nq)) if return_lse else out
