"""The blocked backend: gather only the key blocks each query block needs, then dense batched matmuls.

Notation: b batch, h head, n query blocks, K key blocks per query block, s block size, d head dim.

Memory is O(N * K * s): the (Nq, Nk) score matrix never exists. It is plain PyTorch, so autograd,
every device and every dtype work without compilation. Query blocks whose key-block count is far above
the rest (the rows of global tokens) would force every block to gather that many, so they form a
separate "heavy" group that attends all keys; the split minimises the total number of scores.
Low-precision inputs are computed in float32 and cast back, so bf16/fp16 results are as exact as
SDPA's (the fast mixed-precision path belongs to the CPU kernel work).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..patterns import Geometry, Pattern
from ..patterns.full import Full
from ..patterns.layout import _LRU, evaluate_blocks, get_plan
from ._inputs import AttentionInputs

DEFAULT_BLOCK = 64


@dataclass(frozen=True, eq=False)
class QueryGroup:
    """Query blocks that share one gather width."""

    q_blocks: Tensor  # (n,) long: which query blocks
    kv_index: Tensor | None  # (B', H', n, K) long key blocks, or None = every key block (heavy rows)
    keep: Tensor  # (B', H', n, s, K * s) bool, or (B', H', 1, n * s, Nk_pad) for heavy rows
    drop: Tensor  # what the pattern alone drops, and its dead rows (see drop_mask)
    dead: Tensor | None


@dataclass(frozen=True, eq=False)
class Schedule:
    block: int
    groups: tuple[QueryGroup, ...]
    order: Tensor | None  # permutation restoring query-block order after concatenating groups

    @property
    def scores_per_head(self) -> int:
        """Scores computed per (example, head): the blocked path's work, padding included."""
        return sum(int(g.keep.shape[-2] * g.keep.shape[-1] * g.keep.shape[2]) for g in self.groups)


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


def build_schedule(pattern: Pattern, geo: Geometry, block: int, device: torch.device) -> Schedule:
    plan = get_plan(pattern, geo, block, device)
    counts = plan.kv_count.amax(dim=(0, 1)).cpu()  # (nQB,)
    n_heavy = _split_heavy(counts, plan.num_kv_blocks)
    by_count = counts.sort(descending=True, stable=True).indices
    heavy = by_count[:n_heavy].sort().values.to(device)
    light = by_count[n_heavy:].sort().values.to(device)
    groups = []
    if light.numel():
        k = max(1, int(counts[light.cpu()].max()))
        keep = plan.token_mask[:, :, light, :, : k * block].contiguous()
        groups.append(QueryGroup(light, plan.kv_index[:, :, light, :k].contiguous(), keep, *drop_mask(keep)))
    if heavy.numel():
        nkb = plan.num_kv_blocks
        all_blocks = torch.arange(nkb, device=device).expand(1, 1, heavy.numel(), nkb)
        keep = evaluate_blocks(pattern, geo, block, all_blocks, torch.full((1, 1, heavy.numel()), nkb, device=device),
                               device, q_blocks=heavy)
        keep = keep.reshape(*keep.shape[:2], 1, heavy.numel() * block, nkb * block)
        groups.append(QueryGroup(heavy, None, keep, *drop_mask(keep)))
    ids = torch.cat([g.q_blocks for g in groups])
    identity = torch.equal(ids, torch.arange(ids.numel(), device=device))
    return Schedule(block, tuple(groups), None if identity else torch.argsort(ids))


_SCHEDULES = _LRU(64)


def get_schedule(pattern: Pattern, geo: Geometry, block: int, device: torch.device) -> Schedule:
    key = None if pattern.key is None else (pattern.key, geo, block, str(device))
    return _SCHEDULES.get_or_build(key, lambda: build_schedule(pattern, geo, block, device))


def drop_mask(keep: Tensor) -> tuple[Tensor, Tensor | None]:
    """From a keep mask (..., m, n): the entries to drop, and (..., m, 1) rows that keep nothing (or None).

    Dead rows keep their scores (so softmax stays finite) and are zeroed after it.
    """
    live = keep.any(-1, keepdim=True)
    if bool(live.all()):
        return ~keep, None
    return ~keep & live, ~live


def masked_attend(q: Tensor, k: Tensor, v: Tensor, drop: Tensor | None, dead: Tensor | None, scale: float,
                  dropout_p: float, bias: Tensor | None = None) -> Tensor:
    """softmax(q k^T * scale + bias, dropping ``drop``) v, with ``dead`` rows giving 0 (no NaN).

    q (..., m, d), k (..., n, d), v (..., n, dv); drop/bias broadcast to (..., m, n), dead to (..., m, 1).
    """
    scores = torch.matmul(q * scale, k.transpose(-1, -2))
    if bias is not None:
        scores = scores + bias
    if drop is not None:
        scores.masked_fill_(drop, float("-inf"))  # matmul saves its inputs, not its output: in-place is safe
    probs = torch.softmax(scores, dim=-1)
    if dead is not None:
        probs = probs.masked_fill(dead, 0.0)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return torch.matmul(probs, v)


def gather_blocks(x: Tensor, kv_index: Tensor, block: int) -> Tensor:
    """x (b, h, N_pad, d), kv_index (B', H', n, K) -> (b, h, n, K * block, d), copying whole blocks."""
    b, h, n_pad, d = x.shape
    nkb = n_pad // block
    n, k = kv_index.shape[2:]
    # index_select over flattened (b, h, block) rows copies contiguous blocks, far faster than
    # advanced indexing with three index tensors.
    base = (torch.arange(b, device=x.device).view(b, 1, 1, 1) * h
            + torch.arange(h, device=x.device).view(1, h, 1, 1)) * nkb
    flat = (base + kv_index).reshape(-1)  # (b * h * n * K,)
    out = x.reshape(b * h * nkb, block, d).index_select(0, flat)
    return out.view(b, h, n, k * block, d)


def _pad_rows(t: Tensor, rows: int) -> Tensor:
    return F.pad(t, (0, 0, 0, rows - t.shape[-2])) if rows != t.shape[-2] else t


def blocked_attention(inp: AttentionInputs, *, block: int | None = None) -> Tensor:
    pattern = inp.pattern if inp.pattern is not None else Full()
    geo = inp.geometry
    device = inp.q.device
    block = block or choose_block(inp.pattern)
    sched = get_schedule(pattern, geo, block, device)
    b, h, nq, d = inp.q.shape
    nk, dv = inp.k.shape[2], inp.v.shape[-1]
    nqb, nkb = -(-nq // block), -(-nk // block)
    compute = torch.float32 if inp.q.dtype in (torch.float16, torch.bfloat16) else inp.q.dtype
    q = _pad_rows(inp.q.to(compute), nqb * block).view(b, h, nqb, block, d)  # (b, h, n, s, d)
    k = _pad_rows(inp.k.to(compute), nkb * block)  # (b, h, Nk_pad, d)
    v = _pad_rows(inp.v.to(compute), nkb * block)  # (b, h, Nk_pad, dv)
    kpm = None if inp.key_padding_mask is None else F.pad(inp.key_padding_mask, (0, nkb * block - nk))
    am = None
    if inp.attn_mask is not None:
        am = inp.attn_mask.to(compute) if inp.attn_mask.is_floating_point() else inp.attn_mask
        while am.dim() < 4:
            am = am.unsqueeze(0)
        am = F.pad(am, (0, nkb * block - nk, 0, nqb * block - nq))  # (B?, H?, Nq_pad, Nk_pad)
    bi = torch.arange(b, device=device).view(b, 1, 1, 1)

    outs = []
    for g in sched.groups:
        n = g.q_blocks.numel()
        qg = q[:, :, g.q_blocks]  # (b, h, n, s, d)
        if g.kv_index is None:  # heavy rows: all keys, one group of n * s rows
            qg = qg.reshape(b, h, 1, n * block, d)
            kg, vg = k.unsqueeze(2), v.unsqueeze(2)  # (b, h, 1, Nk_pad, d)
            cols = torch.arange(nkb * block, device=device).view(1, 1, 1, 1, -1)
        else:
            kg, vg = gather_blocks(k, g.kv_index, block), gather_blocks(v, g.kv_index, block)
            cols = (g.kv_index[..., None] * block + torch.arange(block, device=device)).flatten(-2).unsqueeze(-2)
        keep, bias, drop, dead = g.keep, None, g.drop, g.dead
        if kpm is not None:
            keep = keep & kpm[bi.unsqueeze(-1), cols]  # (b, H', n, 1, cols)
        if am is not None:
            rows = (g.q_blocks[:, None] * block + torch.arange(block, device=device)).reshape(qg.shape[2], -1)
            am_rows = am[:, :, rows]  # (B?, H?, n, s, Nk_pad)
            shape = torch.broadcast_shapes(am_rows.shape[:2], cols.shape[:2]) + (qg.shape[2], qg.shape[3], cols.shape[-1])
            picked = torch.gather(am_rows.expand(*shape[:2], *am_rows.shape[2:]), -1, cols.expand(shape))
            if picked.dtype == torch.bool:
                keep = keep & picked
            else:
                bias = picked
        if kpm is not None or am is not None:
            drop, dead = drop_mask(keep if bias is None else keep & (bias > float("-inf")))
        out = masked_attend(qg, kg, vg, drop, dead, inp.scale, inp.dropout_p, bias)
        outs.append(out.reshape(b, h, n, block, dv))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)  # (b, h, n, s, dv)
    if sched.order is not None:
        out = out[:, :, sched.order]
    return out.reshape(b, h, nqb * block, dv)[:, :, :nq].to(inp.q.dtype)
