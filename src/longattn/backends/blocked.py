"""The blocked backend: gather only the key blocks each query block needs, then dense batched matmuls.

Notation: b batch, h head, n query blocks, K key blocks per query block, s block size, d head dim.

The (Nq, Nk) score matrix never exists. It is plain PyTorch (a custom autograd Function around matmul,
softmax and index_select), so every device and dtype works, forward and backward, without compilation.

- Query blocks whose key-block count is far above the rest (the rows of global tokens) would force every
  block to gather that many, so they form a separate "heavy" group that attends all keys; the split
  minimises the total number of scores.
- Query blocks run in chunks whose scores take ~8 MB: temporaries stay in cache and below glibc's mmap
  threshold, so they are reused instead of page-faulted afresh on every call (a 2x effect on CPU).
- Backward recomputes each chunk's probabilities instead of storing them (FlashAttention's trade), so
  training memory is O(N * d) plus one chunk; dropout masks are regenerated from a per-chunk seed.
- Low-precision inputs are computed in float32 and cast back, so bf16/fp16 results are as exact as
  SDPA's (the fast mixed-precision path belongs to the CPU kernel work).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from ..patterns import Geometry, Pattern
from ..patterns.full import Full
from ..patterns.layout import LRUCache, evaluate_blocks, get_plan, real_pairs
from ._inputs import AttentionInputs

DEFAULT_BLOCK = 64
CHUNK_SCORES = 1 << 21  # scores per chunk (8 MB in float32)
SCHEDULE_MASK_BYTES = 1 << 30  # larger token masks are not kept but evaluated chunk by chunk, every call
SCHEDULE_CACHE_BYTES = 2 << 30  # all cached schedules together


@dataclass(frozen=True, eq=False)
class ChunkLayout:
    """Where one chunk of a group reads and writes; fixed by the schedule, shared by every call."""

    sel: slice  # which of the group's query blocks
    q_index: Tensor | slice  # those query blocks, as a slice when contiguous (views instead of copies)
    rows: Tensor  # (c, s) padded query rows
    cols: Tensor  # (B', H', c, 1, C) padded key columns, or (1, 1, 1, 1, Nk_pad) for heavy rows
    flat_index: Tensor | None  # gathered k/v block rows (see _flat_block_index), None for heavy rows


@dataclass(frozen=True, eq=False)
class QueryGroup:
    """Query blocks that share one gather width; heavy groups attend every key block."""

    q_blocks: Tensor  # (n,) long: which query blocks
    kv_index: Tensor  # (B', H', n, K) long key blocks (every block, in order, for heavy rows)
    kv_count: Tensor  # (B', H', n) long: real slots of kv_index
    heavy: bool  # True: one dense matrix against all keys, no gather
    exact: bool  # every listed block is entirely allowed: only padding needs masking
    columns: int  # C = K * block: keys per query row
    chunks: tuple[ChunkLayout, ...]
    drop: Tensor | None  # (B', H', n, s, C) bool pairs to drop (see drop_mask); None: evaluated per chunk
    dead: Tensor | None  # (B', H', n, s, 1) bool rows that keep nothing, or None


@dataclass(frozen=True, eq=False)
class Schedule:
    pattern: Pattern
    geometry: Geometry
    block: int
    mask_batch: int  # B' of the pattern (1 unless global tokens are chosen per example)
    mask_heads: int  # H' of the pattern (1 unless it differs per head)
    groups: tuple[QueryGroup, ...]

    @property
    def scores_per_head(self) -> int:
        """Scores computed per (example, head): the blocked path's work, padding included."""
        return sum(g.q_blocks.numel() * self.block * g.columns for g in self.groups)

    def masks(self, g: QueryGroup, sel: slice) -> tuple[Tensor, Tensor | None]:
        """The drop mask and dead rows of query blocks ``sel`` of group ``g``."""
        if g.drop is not None:
            return g.drop[:, :, sel], None if g.dead is None else g.dead[:, :, sel]
        return drop_mask(_keep(self, g.exact, g.q_blocks[sel], g.kv_index[:, :, sel], g.kv_count[:, :, sel]))


def choose_block(pattern: Pattern | None) -> int:
    return (pattern.preferred_block if pattern is not None else None) or DEFAULT_BLOCK


def _split_heavy(counts: Tensor, num_kv_blocks: int) -> int:
    """How many of the blocks, sorted by count descending, to run densely: argmin of the score count."""
    sorted_counts = counts.sort(descending=True).values
    n = sorted_counts.numel()
    t = torch.arange(n + 1)
    light_width = torch.cat([sorted_counts, sorted_counts.new_zeros(1)])
    cost = t * num_kv_blocks + (n - t) * light_width
    return int(cost.argmin())


def drop_mask(keep: Tensor) -> tuple[Tensor, Tensor | None]:
    """From a keep mask (..., m, n): the entries to drop, and (..., m, 1) rows that keep nothing (or None).

    Dead rows keep their scores (so softmax stays finite) and are zeroed after it.
    """
    live = keep.any(-1, keepdim=True)
    if bool(live.all()):
        return ~keep, None
    return ~keep & live, ~live


def _keep(sched: Schedule, exact: bool, q_blocks: Tensor, kv_index: Tensor, kv_count: Tensor) -> Tensor:
    if exact:  # block-exact patterns allow whole blocks: only padding is dropped
        return real_pairs(sched.geometry, sched.block, kv_index, kv_count, q_blocks)
    return evaluate_blocks(sched.pattern, sched.geometry, sched.block, kv_index, kv_count, kv_index.device,
                           q_blocks=q_blocks)


def _flat_block_index(index: Tensor, b: int, h: int, nkb: int) -> Tensor:
    """Rows of the (b * h * nkb, s, d) view of k/v that kv_index (B', H', c, K) names, flattened."""
    base = (torch.arange(b, device=index.device).view(b, 1, 1, 1) * h
            + torch.arange(h, device=index.device).view(1, h, 1, 1)) * nkb
    return (base + index).reshape(-1)


def _chunk_layouts(geo: Geometry, block: int, q_blocks: Tensor, kv_index: Tensor, heavy: bool
                   ) -> tuple[ChunkLayout, ...]:
    """Split a group into chunks whose scores take about CHUNK_SCORES elements."""
    device = q_blocks.device
    offsets = torch.arange(block, device=device)
    nkb = -(-geo.kv_len // block)
    columns = kv_index.shape[-1] * block
    per_chunk = max(1, CHUNK_SCORES // (geo.batch * geo.num_heads * block * columns))
    layouts = []
    for start in range(0, q_blocks.numel(), per_chunk):
        sel = slice(start, min(q_blocks.numel(), start + per_chunk))
        ids = q_blocks[sel]
        first = int(ids[0])
        contiguous = torch.equal(ids, torch.arange(first, first + ids.numel(), device=device))
        q_index = slice(first, first + ids.numel()) if contiguous else ids
        if heavy:
            cols, flat = torch.arange(nkb * block, device=device).view(1, 1, 1, 1, -1), None
        else:
            index = kv_index[:, :, sel]
            cols = (index[..., None] * block + offsets).flatten(-2).unsqueeze(-2)
            flat = _flat_block_index(index, geo.batch, geo.num_heads, nkb)
        layouts.append(ChunkLayout(sel, q_index, ids[:, None] * block + offsets, cols, flat))
    return tuple(layouts)


def _group(sched: Schedule, q_blocks: Tensor, kv_index: Tensor, kv_count: Tensor, heavy: bool, exact: bool
           ) -> QueryGroup:
    columns = kv_index.shape[-1] * sched.block
    kv_index, kv_count = kv_index.contiguous(), kv_count.contiguous()
    chunks = _chunk_layouts(sched.geometry, sched.block, q_blocks, kv_index, heavy)
    mask_bytes = sched.mask_batch * sched.mask_heads * q_blocks.numel() * sched.block * columns
    if mask_bytes > SCHEDULE_MASK_BYTES:  # block-dense patterns at large N: bounded memory, re-evaluated
        return QueryGroup(q_blocks, kv_index, kv_count, heavy, exact, columns, chunks, None, None)
    drop, dead = drop_mask(_keep(sched, exact, q_blocks, kv_index, kv_count))
    return QueryGroup(q_blocks, kv_index, kv_count, heavy, exact, columns, chunks, drop, dead)


def build_schedule(pattern: Pattern, geo: Geometry, block: int, device: torch.device) -> Schedule:
    plan = get_plan(pattern, geo, block, device)
    counts = plan.kv_count.amax(dim=(0, 1)).cpu()  # (nQB,)
    nkb = plan.num_kv_blocks
    n_heavy = _split_heavy(counts, nkb)
    by_count = counts.sort(descending=True, stable=True).indices
    heavy = by_count[:n_heavy].sort().values.to(device)
    light = by_count[n_heavy:].sort().values.to(device)
    sched = Schedule(pattern, geo, block, *plan.kv_index.shape[:2], ())
    groups = []
    if light.numel():
        k = max(1, int(counts[light.cpu()].max()))
        groups.append(_group(sched, light, plan.kv_index[:, :, light, :k], plan.kv_count[:, :, light],
                             heavy=False, exact=plan.block_exact))
    if heavy.numel():  # every key block, so not block-exact even when the pattern is
        every = torch.arange(nkb, device=device).expand(1, 1, heavy.numel(), nkb)
        groups.append(_group(sched, heavy, every, torch.full((1, 1, heavy.numel()), nkb, device=device),
                             heavy=True, exact=False))
    return replace(sched, groups=tuple(groups))


def _schedule_bytes(sched: Schedule) -> int:
    tensors = [t for g in sched.groups for t in (g.drop, g.dead, g.kv_index, *(c.flat_index for c in g.chunks))]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


_SCHEDULES = LRUCache(64, max_bytes=SCHEDULE_CACHE_BYTES, size_of=_schedule_bytes)


def get_schedule(pattern: Pattern, geo: Geometry, block: int, device: torch.device) -> Schedule:
    key = None if pattern.key is None else (pattern.key, geo, block, str(device))
    return _SCHEDULES.get_or_build(key, lambda: build_schedule(pattern, geo, block, device))


def gather_blocks(x: Tensor, flat_index: Tensor, block: int, shape: tuple[int, ...]) -> Tensor:
    """Copy whole key blocks: x (b, h, N_pad, d) -> ``shape`` = (b, h, c, K * block, d).

    index_select over contiguous blocks is far faster than advanced indexing with three index tensors.
    """
    return x.reshape(-1, block, x.shape[-1]).index_select(0, flat_index).view(shape)


def _pad_rows(t: Tensor, rows: int) -> Tensor:
    return F.pad(t, (0, 0, 0, rows - t.shape[-2])) if rows != t.shape[-2] else t


@dataclass(frozen=True, eq=False)
class Chunk:
    """A chunk's layout with this call's masks folded in; 5-D shapes (.., c', m, C)."""

    layout: ChunkLayout
    drop: Tensor  # (B', H', c', m, C) bool
    dead: Tensor | None  # (B', H', c', m, 1) bool
    bias: Tensor | None  # (B?, H?, c', m, C) float, from a float attn_mask
    seed: int  # dropout stream of this chunk

    @property
    def size(self) -> int:
        """Query blocks in the chunk."""
        return self.layout.rows.shape[0]


@dataclass(frozen=True, eq=False)
class _Call:
    """One call's padded inputs and per-call masks."""

    sched: Schedule
    b: int
    h: int
    kpm: Tensor | None  # (b, Nk_pad) bool
    attn_mask: Tensor | None  # (B?, H?, Nq_pad, Nk_pad) bool or float
    scale: float
    dropout_p: float
    seed: int

    def chunks(self):
        """Every chunk of every group, with the pattern's and this call's masks."""
        n_chunk = 0
        for g in self.sched.groups:
            for lay in g.chunks:
                drop, dead = self.sched.masks(g, lay.sel)
                drop, dead, bias = self._fold_call_masks(drop, dead, lay.cols, lay.rows)
                if g.heavy:  # heavy rows: one matrix of c*s rows against all keys
                    drop, dead, bias = (None if t is None else t.flatten(2, 3).unsqueeze(2) for t in (drop, dead, bias))
                yield Chunk(lay, drop, dead, bias, self.seed + n_chunk)
                n_chunk += 1

    def _fold_call_masks(self, drop: Tensor, dead: Tensor | None, cols: Tensor, rows: Tensor):
        if self.kpm is None and self.attn_mask is None:
            return drop, dead, None
        keep, bias = (~drop if dead is None else ~drop & ~dead), None
        if self.kpm is not None:
            bi = torch.arange(self.b, device=cols.device).view(self.b, 1, 1, 1, 1)
            keep = keep & self.kpm[bi, cols]
        if self.attn_mask is not None:
            am_rows = self.attn_mask[:, :, rows]  # (B?, H?, c, s, Nk_pad)
            lead = torch.broadcast_shapes(am_rows.shape[:2], cols.shape[:2])
            picked = torch.gather(am_rows.expand(*lead, *am_rows.shape[2:]), -1,
                                  cols.expand(*lead, *am_rows.shape[2:4], cols.shape[-1]))
            if picked.dtype == torch.bool:
                keep = keep & picked
            else:
                bias = picked
                keep = keep & (bias > float("-inf"))
        return (*drop_mask(keep), bias)

    def operands(self, chunk: Chunk, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q (b, h, c', m, d), k (b, h, c', C, d), v (b, h, c', C, dv) for a chunk."""
        lay = chunk.layout
        qc = q[:, :, lay.q_index]  # (b, h, c, s, d)
        if lay.flat_index is None:
            return qc.flatten(2, 3).unsqueeze(2), k.unsqueeze(2), v.unsqueeze(2)
        width = lay.cols.shape[-1]
        kc = gather_blocks(k, lay.flat_index, self.sched.block, (self.b, self.h, chunk.size, width, k.shape[-1]))
        vc = gather_blocks(v, lay.flat_index, self.sched.block, (self.b, self.h, chunk.size, width, v.shape[-1]))
        return qc, kc, vc

    def probabilities(self, chunk: Chunk, qc: Tensor, kc: Tensor) -> Tensor:
        """Softmax probabilities (b, h, c', m, C) of a chunk; dead rows are exactly 0.

        Backward recomputes them the same way rather than storing them or a log-sum-exp: one fused
        softmax is cheaper on CPU than log-sum-exp plus exp passes.
        """
        scores = torch.matmul(qc * self.scale, kc.transpose(-1, -2))
        if chunk.bias is not None:
            scores += chunk.bias
        scores.masked_fill_(chunk.drop, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        return probs if chunk.dead is None else probs.masked_fill_(chunk.dead, 0.0)

    def dropout_keep(self, chunk: Chunk, like: Tensor) -> Tensor | None:
        """The chunk's dropout mask, scaled by 1/(1-p); regenerated identically in backward from its seed."""
        if self.dropout_p == 0:
            return None
        gen = torch.Generator(device=like.device).manual_seed(chunk.seed)
        keep = torch.rand(like.shape, generator=gen, device=like.device, dtype=like.dtype) >= self.dropout_p
        return keep.to(like.dtype) / (1 - self.dropout_p)


def _scatter_blocks(target: Tensor, chunk: Chunk, grad: Tensor, block: int) -> None:
    """Add a chunk's gradient of gathered k/v blocks (b, h, c', C, d) into target (b, h, Nk_pad, d)."""
    flat = chunk.layout.flat_index
    if flat is None:
        target += grad.squeeze(2)
    else:
        target.view(-1, block, target.shape[-1]).index_add_(0, flat, grad.reshape(-1, block, grad.shape[-1]))


def _scatter_bias_grad(dbias: Tensor, chunk: Chunk, ds: Tensor, block: int) -> None:
    """Add ds (b, h, c', m, C) into the padded dense bias gradient (b, h, Nq_pad, Nk_pad)."""
    lay = chunk.layout
    ds = ds.reshape(*ds.shape[:2], chunk.size, block, ds.shape[-1])
    rows = dbias[:, :, lay.rows]  # (b, h, c, s, Nk_pad): a copy, written back below
    rows.scatter_add_(-1, lay.cols.expand(ds.shape), ds)
    dbias[:, :, lay.rows] = rows


class _BlockedAttention(torch.autograd.Function):
    """Chunked forward that keeps only the output; backward recomputes each chunk's probabilities
    (FlashAttention's trade) and accumulates dk/dv with index_add_ in place, so training memory is
    O(N * d) beyond the chunk being processed."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, call: _Call) -> Tensor:
        b, h, nqb, block, _ = q.shape
        out = q.new_empty(b, h, nqb, block, v.shape[-1])
        for chunk in call.chunks():
            qc, kc, vc = call.operands(chunk, q, k, v)
            probs = call.probabilities(chunk, qc, kc)
            keep = call.dropout_keep(chunk, probs)
            if keep is not None:
                probs *= keep
            out[:, :, chunk.layout.q_index] = torch.matmul(probs, vc).view(b, h, chunk.size, block, -1)
        ctx.save_for_backward(q, k, v, out)
        ctx.call, ctx.bias_shape = call, None if bias is None else bias.shape
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        q, k, v, out = ctx.saved_tensors
        call: _Call = ctx.call
        b, h, nqb, block, _ = q.shape
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        want_bias = ctx.bias_shape is not None and ctx.needs_input_grad[3]
        dbias = q.new_zeros(b, h, nqb * block, k.shape[2]) if want_bias else None
        delta = (dout * out).sum(-1, keepdim=True)  # (b, h, n, s, 1): rowsum(dO * O)
        for chunk in call.chunks():
            qc, kc, vc = call.operands(chunk, q, k, v)
            as_chunk = lambda t: t[:, :, chunk.layout.q_index].reshape(*qc.shape[:-1], t.shape[-1])  # noqa: E731
            probs = call.probabilities(chunk, qc, kc)
            keep = call.dropout_keep(chunk, probs)
            dout_c = as_chunk(dout)
            dropped = probs * keep if keep is not None else probs
            _scatter_blocks(dv, chunk, torch.matmul(dropped.transpose(-1, -2), dout_c), block)
            dp = torch.matmul(dout_c, vc.transpose(-1, -2))
            if keep is not None:
                dp *= keep
            ds = dp.sub_(as_chunk(delta)).mul_(probs)  # softmax backward, in place
            dq[:, :, chunk.layout.q_index] = (torch.matmul(ds, kc) * call.scale).view(b, h, chunk.size, block, -1)
            _scatter_blocks(dk, chunk, torch.matmul(ds.transpose(-1, -2), qc) * call.scale, block)
            if dbias is not None:
                _scatter_bias_grad(dbias, chunk, ds, block)
        if dbias is not None:  # back to the bias's own (broadcast, padded) shape
            dbias = dbias.sum(dim=[d for d in (0, 1) if ctx.bias_shape[d] == 1], keepdim=True)
        return dq, dk, dv, dbias, None


def blocked_attention(inp: AttentionInputs, *, block: int | None = None) -> Tensor:
    pattern = inp.pattern if inp.pattern is not None else Full()
    geo = inp.geometry
    device = inp.q.device
    block = block or choose_block(inp.pattern)
    sched = get_schedule(pattern, geo, block, device)
    b, h, nq, d = inp.q.shape
    nk = inp.k.shape[2]
    nqb, nkb = -(-nq // block), -(-nk // block)
    compute = torch.float32 if inp.q.dtype in (torch.float16, torch.bfloat16) else inp.q.dtype
    q = _pad_rows(inp.q.to(compute), nqb * block).view(b, h, nqb, block, d)  # (b, h, n, s, d)
    k = _pad_rows(inp.k.to(compute), nkb * block)  # (b, h, Nk_pad, d)
    v = _pad_rows(inp.v.to(compute), nkb * block)  # (b, h, Nk_pad, dv)
    am, bias = inp.attn_mask, None
    if am is not None:
        am = am.to(compute) if am.is_floating_point() else am
        while am.dim() < 4:
            am = am.unsqueeze(0)
        am = F.pad(am, (0, nkb * block - nk, 0, nqb * block - nq))  # (B?, H?, Nq_pad, Nk_pad)
        bias = am if am.is_floating_point() else None
    kpm = None if inp.key_padding_mask is None else F.pad(inp.key_padding_mask, (0, nkb * block - nk))
    seed = int(torch.randint(0, 2**62, (1,))) if inp.dropout_p > 0 else 0
    call = _Call(sched, b, h, kpm, am, inp.scale, inp.dropout_p, seed)
    out = _BlockedAttention.apply(q, k, v, bias, call)  # (b, h, n, s, dv)
    return out.reshape(b, h, nqb * block, -1)[:, :, :nq].to(inp.q.dtype)
