"""Sparse Transformer factors on the blocked path: head groups, and keys reordered where a factor is sparse.

Notation: b batch, h head, P head period (``per_head`` patterns), i/j absolute query/key positions
(bottom-right aligned: query row r sits at ``i = r + o``, ``o = Nk - Nq``), s stride, l summary block,
c summary columns per block, G about N/s tokens of one residue class.

Child et al.'s second factors, stride columns ``(i - j) % s == 0`` and summary columns
``j % l >= l - c``, touch every 64-token key block, so block layouts cost O(N^2) on them. At token level
both are cheap:

- stride columns: ordered by (position mod s, position div s), query i meets key j only inside its
  residue class, so the factor is s independent attentions of about N/s tokens each, full or causal:
  one dense SDPA call over (b, h * s, G, d). O(N^2 / s) scores instead of O(N^2). For N = 7, s = 3::

      natural order   0 1 2 3 4 5 6
      stride order    0 3 6 | 1 4 . | 2 5 .     (residues 0 | 1 | 2; "." a padding slot, masked)
- summary columns: the same c * N / l keys for every query. They are copied once and every query reads
  them (causal: a prefix of them, on the blocked schedule). O(N * c * N / l) scores.
- summary columns merged with a factor in natural order (``fixed`` with merged heads): one key axis with
  the summary keys, then every key; the second part leaves out the summary pairs so none counts twice.
  A single softmax on the blocked schedule: the summary keys are shared, the local blocks read in place.
- anything else (window, same block, Longformer, ...) runs on the blocked schedule as it is.

A ``per_head`` pattern (Sparse Transformer's split heads) runs as P head groups, ``h % P == k``, each with
its own factor; outputs are put back in head order, and rows back in natural order (``index_select``, so
autograd differentiates the reordering). A head group whose factors need two query orders in one softmax
(strided's window merged with its stride columns) has no such form: the pattern is not factored and the
caller runs its block schedule (O(N^2); joining two softmaxes exactly needs their log-sum-exps, which
neither SDPA nor the tiles return). Nor are natural factors that depend on the head (BigBird's random
blocks inside a ``per_head``): a head group renumbers its heads.

Key padding, ``attn_mask`` (bool or float, with its gradient), dropout and dead rows are handled by the
calls each group makes (dense SDPA or the blocked tiles), on masks reordered the same way as the keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...caches import named_cache
from ...patterns import AllowedFn, Geometry, Pattern, block_ranges
from ...patterns.causal import CausalMask
from ...patterns.compose import Intersection, PerHead, Union
from ...patterns.sparse_transformer import StrideColumns, SummaryColumns
from ..dense import dense_attention
from ..inputs import AttentionInputs
from ..machine import compute_dtype
from .kernel import tiled_attention
from .schedule import DEFAULT_BLOCK


# ---- which factors a pattern is made of ---------------------------------------------------------------------

@dataclass(frozen=True)
class Factor:
    """One term of a head group's union."""

    kind: str  # "natural" (block schedule as is), "stride" or "summary"
    pattern: Pattern  # natural: the term with causality applied; else the bare StrideColumns / SummaryColumns
    causal: bool


def _strip_causal(p: Pattern) -> tuple[Pattern | None, bool]:
    """(p without its CausalMask, whether it had one); None for plain ``causal()``."""
    if isinstance(p, CausalMask):
        return None, True
    if isinstance(p, Intersection):
        rest = [x for x in p.parts if not isinstance(x, CausalMask)]
        if len(rest) < len(p.parts):
            if not rest:
                return None, True
            return (rest[0] if len(rest) == 1 else Intersection(rest)), True
    return p, False


def _head_free(p: Pattern) -> bool:
    return p.head_period is None and p.head_count_free


def _group_factors(p: Pattern, causal: bool) -> list[Factor] | None:
    """The terms of one head group's pattern; None where a term depends on the head."""
    inner, own = _strip_causal(p)
    causal = causal or own
    if inner is None:  # plain causal attention
        return [Factor("natural", CausalMask(), True)]
    out = []
    for term in inner.parts if isinstance(inner, Union) else [inner]:
        bare, term_causal = _strip_causal(term)
        c = causal or term_causal
        if isinstance(bare, StrideColumns):
            out.append(Factor("stride", bare, c))
        elif isinstance(bare, SummaryColumns):
            out.append(Factor("summary", bare, c))
        elif not _head_free(term):
            return None
        else:
            out.append(Factor("natural", Intersection([term, CausalMask()]) if causal else term, c))
    return out


def decompose(pattern: Pattern) -> tuple[tuple[Factor, ...], ...] | None:
    """The factors of every head group (P groups for a ``per_head`` pattern, else one), or None when
    reordering cannot help or cannot be exact (no stride/summary factor; two query orders in one group;
    head-dependent natural terms)."""
    base, causal = _strip_causal(pattern)
    if base is None:
        return None
    if isinstance(base, PerHead):
        heads = base.parts
        if any(not _head_free(p) and p.head_period is not None for p in heads):
            return None
    elif not _head_free(base):
        return None
    else:
        heads = [base]
    groups = []
    for p in heads:
        factors = _group_factors(p, causal)
        if factors is None:
            return None
        kinds = [f.kind for f in factors]
        if kinds.count("stride") > 1 or kinds.count("summary") > 1:
            return None
        if "stride" in kinds and len(kinds) > 1:  # the stride order and the natural order in one softmax
            return None
        groups.append(tuple(factors))
    if all(f.kind == "natural" for g in groups for f in g):
        return None
    return tuple(groups)


# ---- the pattern of a summary call ----------------------------------------------------------------------

class _SummaryKeys(Pattern):
    """The key axis [summary keys | padding to a block | every key (when merged)] of a summary call.

    The first segment holds summary columns (causal: only those ``j <= i``); the second, when
    ``natural`` is given, the natural factor minus the summary columns (they are in the first segment).
    Queries keep their natural rows."""

    def __init__(self, summary: SummaryColumns, causal: bool, natural: Pattern | None, geo: Geometry,
                 positions: Tensor, m_pad: int, block: int):
        self.summary, self.causal, self.natural, self.orig = summary, causal, natural, geo
        self.positions, self.m_pad, self.preferred_block = positions.cpu(), m_pad, block
        self.name = f"summary_keys({summary.name}{', causal' if causal else ''}" + (
            f" | {natural.name})" if natural is not None else ")")
        self._tables: dict[str, Tensor] = {}

    @property
    def key(self):
        nat = None if self.natural is None else self.natural.key
        if self.natural is not None and nat is None:
            return None
        return ("summary_keys", self.summary.key, self.causal, nat, self.orig, self.m_pad, self.preferred_block)

    def _table(self, device: torch.device) -> Tensor:
        """(Nk',) absolute key position of every column; -1 for padding."""
        t = self._tables.get(str(device))
        if t is None:
            pad = torch.full((self.m_pad - self.positions.numel(),), -1, dtype=torch.long)
            parts = [self.positions, pad]
            if self.natural is not None:
                parts.append(torch.arange(self.orig.kv_len))
            t = self._tables[str(device)] = torch.cat(parts).to(device)
        return t

    def _allowed_fn(self, geo: Geometry, device: torch.device) -> AllowedFn:
        table, m_pad, causal = self._table(device), self.m_pad, self.causal
        shift = geo.kv_len - self.orig.kv_len  # i = i' - shift: the natural absolute query position
        nat = None if self.natural is None else self.natural._allowed_fn(self.orig, device)
        summ = self.summary._allowed_fn(self.orig, device)

        def allowed(b: Tensor, h: Tensor, i: Tensor, j: Tensor) -> Tensor:
            i = i - shift
            pos = table[j.clamp(0, table.numel() - 1)]
            ok = pos >= 0
            if causal:
                ok = ok & (pos <= i)
            if nat is not None:
                ok = torch.where(j < m_pad, ok, (pos >= 0) & nat(b, h, i, pos) & ~summ(b, h, i, pos))
            return ok

        return allowed

    def _candidates(self, geo: Geometry, block: int, device: torch.device) -> Tensor:
        q_lo, q_hi, k_lo, k_hi = block_ranges(geo, block, device)
        table = self._table(device)
        first = table[k_lo.clamp(max=table.numel() - 1)]  # (1, nKB): the smallest position of a summary block
        seg = (first >= 0) & (k_lo < self.m_pad)
        if self.causal:
            seg = seg & (first <= q_hi - (geo.kv_len - self.orig.kv_len))
        seg = seg.expand(q_lo.shape[0], -1)  # (nQB, nKB)
        if self.natural is None:
            return seg
        nat = self.natural.candidates(self.orig, block, device)  # (B', H', nQB, nKB of the natural keys)
        nat = nat.expand(*nat.shape[:2], seg.shape[0], nat.shape[-1])
        return torch.cat([seg[..., : self.m_pad // block].expand(*nat.shape[:2], -1, -1), nat], dim=-1)


# ---- one head group's call ----------------------------------------------------------------------------------

def _stride_regroup(am: Tensor, qidx: Tensor, kidx: Tensor, s: int) -> Tensor:
    """A (B?, H?, Nq|1, Nk|1) mask in the stride order: (B?, H?, s|1, Gq|1, Gk|1), each residue's own
    (query, key) block (a gather: O(N * G), not the O(N^2) of reordering both axes)."""
    lead = am.shape[:2]
    if am.shape[2] > 1:
        am = am.index_select(2, qidx).view(*lead, s, -1, am.shape[3])  # (B?, H?, s, Gq, Nk|1)
    else:
        am = am.unsqueeze(2)  # (B?, H?, 1, 1, Nk|1)
    if am.shape[-1] == 1:
        return am
    idx = kidx.view(s, 1, -1)
    if am.shape[2] == 1:  # rows broadcast: the columns alone, per residue
        return am.squeeze(2).index_select(-1, kidx).view(*lead, s, 1, idx.shape[-1])
    return am.gather(-1, idx.expand(*lead, s, am.shape[3], idx.shape[-1]))


@dataclass(frozen=True, eq=False)
class GroupCall:
    """How one head group is computed: inputs reordered, one attention call, output put back."""

    kind: str  # "natural", "stride" or "summary"
    sub_geo: Geometry  # the call's own geometry
    pattern: Pattern | None  # the call's pattern (None: full)
    dense: bool  # dense SDPA (short full/causal rows) rather than the blocked tiles
    stride: int = 0
    qidx: Tensor | None = None  # stride: (s * Gq,) query row of every slot (padding: any row)
    kidx: Tensor | None = None  # (Nk',) key row of every slot (padding: any row, masked)
    key_pad: Tensor | None = None  # stride: (s, Gk) bool real key slots, None when all are (or causal)
    inverse: Tensor | None = None  # stride: (Nq,) slot of every query row

    def inputs(self, inp: AttentionInputs, q: Tensor, k: Tensor, v: Tensor, am: Tensor | None) -> AttentionInputs:
        b, hg = q.shape[:2]
        kpm = inp.key_padding_mask
        if self.kind == "natural":
            return AttentionInputs(q, k, v, self.pattern, am, kpm, inp.scale, inp.dropout_p)
        if self.kind == "summary":
            kpm = None if kpm is None else kpm.index_select(1, self.kidx)
            if am is not None and am.shape[3] > 1:
                am = am.index_select(3, self.kidx)
            k, v = k.index_select(2, self.kidx), v.index_select(2, self.kidx)  # (b, hg, Nk', d)
            return AttentionInputs(q, k, v, self.pattern, am, kpm, inp.scale, inp.dropout_p)
        s, gq, gk = self.stride, self.sub_geo.q_len, self.sub_geo.kv_len
        q = q.index_select(2, self.qidx).view(b, hg * s, gq, q.shape[-1])  # (b, h * s, Gq, d)
        k = k.index_select(2, self.kidx).view(b, hg * s, gk, k.shape[-1])  # (b, h * s, Gk, d)
        v = v.index_select(2, self.kidx).view(b, hg * s, gk, v.shape[-1])
        return AttentionInputs(q, k, v, self.pattern, self._stride_mask(am, kpm, hg), None, inp.scale,
                               inp.dropout_p)

    def _stride_mask(self, am: Tensor | None, kpm: Tensor | None, hg: int) -> Tensor | None:
        """Key padding, real key slots and attn_mask in the stride order: (B?, h * s, Gq|1, Gk|1)."""
        s, gq, gk = self.stride, self.sub_geo.q_len, self.sub_geo.kv_len
        keep = None if self.key_pad is None else self.key_pad.view(1, 1, s, 1, gk)
        if kpm is not None:
            kp = kpm.index_select(1, self.kidx).view(kpm.shape[0], 1, s, 1, gk)
            keep = kp if keep is None else keep & kp
        bias = None
        if am is not None:
            m = _stride_regroup(am, self.qidx, self.kidx, s)
            if m.dtype == torch.bool:
                keep = m if keep is None else keep & m
            else:
                bias = m
        if bias is not None and keep is not None:
            bias = torch.where(keep, bias, float("-inf"))
        mask = bias if bias is not None else keep
        if mask is None:
            return None
        mask = mask.expand(mask.shape[0], hg, s, *mask.shape[3:])
        return mask.reshape(mask.shape[0], hg * s, *mask.shape[3:])

    def output(self, out: Tensor, hg: int) -> Tensor:
        if self.kind != "stride":
            return out
        b, dv = out.shape[0], out.shape[-1]
        return out.reshape(b, hg, -1, dv).index_select(2, self.inverse)  # (b, hg, Nq, dv)


def _stride_call(s: int, causal: bool, geo: Geometry, device: torch.device) -> GroupCall:
    """Slots (r, a) of residue r = position mod s and a = position div s. Keys: j = a * s + r, a < Gk.
    Queries are bottom-aligned with the keys of their residue: slot a' holds i = (a' + Gk - Gq) * s + r,
    so the call's own bottom-right alignment is causality inside a residue class."""
    nq, nk = geo.q_len, geo.kv_len
    o = nk - nq
    gk = -(-nk // s)
    gq = gk - o // s  # query slots from the first query's a = o div s up to the last key's
    r = torch.arange(s, device=device).view(s, 1)
    j = torch.arange(gk, device=device) * s + r  # (s, Gk)
    i = (torch.arange(gq, device=device) + gk - gq) * s + r  # (s, Gq) absolute
    real_k = j < nk
    # Causal pairs never reach a padding key: its position is past every query of its residue.
    key_pad = None if causal or bool(real_k.all()) else real_k
    rows = torch.arange(nq, device=device) + o
    inverse = (rows % s) * gq + rows // s - (gk - gq)
    return GroupCall("stride", Geometry(gq, gk, geo.num_heads * s, geo.batch), CausalMask() if causal else None,
                      True, s, (i - o).clamp(0, nq - 1).flatten(), j.clamp(max=nk - 1).flatten(), key_pad, inverse)


def _summary_call(summary: SummaryColumns, causal: bool, natural: Pattern | None, geo: Geometry,
                  device: torch.device) -> GroupCall | None:
    l, c = summary.block, summary.c
    positions = torch.arange(geo.kv_len, device=device)
    positions = positions[positions % l >= l - c]
    m = positions.numel()
    if m == 0:
        return None
    if natural is None and not causal:  # every query reads every summary key: full attention over them
        return GroupCall("summary", Geometry(geo.q_len, m, geo.num_heads, geo.batch), None, True, kidx=positions)
    block = (natural.preferred_block if natural is not None else None) or DEFAULT_BLOCK
    m_pad = -(-m // block) * block if natural is not None else m
    pattern = _SummaryKeys(summary, causal, natural, geo, positions, m_pad, block)
    kidx = [positions, positions.new_zeros(m_pad - m)]
    if natural is not None:
        kidx.append(torch.arange(geo.kv_len, device=device))
    kidx = torch.cat(kidx)
    return GroupCall("summary", Geometry(geo.q_len, kidx.numel(), geo.num_heads, geo.batch), pattern, False,
                      kidx=kidx)


def _natural(factors: tuple[Factor, ...]) -> Pattern | None:
    nat = [f.pattern for f in factors if f.kind == "natural"]
    return None if not nat else nat[0] if len(nat) == 1 else Union(nat)


def _group_call(factors: tuple[Factor, ...], geo: Geometry, device: torch.device) -> GroupCall | None:
    by_kind = {f.kind: f for f in factors}
    if "stride" in by_kind:
        f = by_kind["stride"]
        return _stride_call(f.pattern.stride, f.causal, geo, device)
    if "summary" in by_kind:
        f = by_kind["summary"]
        return _summary_call(f.pattern, f.causal, _natural(factors), geo, device)
    return GroupCall("natural", geo, _natural(factors), False)


# ---- the plan and the call ----------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class FactoredPlan:
    """Head groups (head h runs ``calls[h % P]``) and the work they do, for one geometry."""

    geometry: Geometry
    device: torch.device
    calls: tuple[GroupCall, ...]
    mask_batch: int  # B' of the dense mask the pattern would need (auto's memory guard)

    @property
    def period(self) -> int:
        return len(self.calls)

    def describe(self) -> str:
        """The head groups in words, for ``longattn.explain``."""
        words = []
        for call in self.calls:
            if call.kind == "stride":
                words.append(f"stride columns by residue mod {call.stride}")
            elif call.kind == "summary":
                words.append("summary keys gathered" + (" + blocks" if call.sub_geo.kv_len > self.geometry.kv_len
                                                        else ""))
            else:
                words.append("blocks")
        return ("head groups: " if len(words) > 1 else "") + " | ".join(words)


def build_factored_plan(pattern: Pattern, geo: Geometry, device: torch.device) -> FactoredPlan | None:
    groups = decompose(pattern)
    if groups is None:
        return None
    period = len(groups)
    if geo.num_heads % period:
        return None
    sub = Geometry(geo.q_len, geo.kv_len, geo.num_heads // period, geo.batch)
    calls = []
    for factors in groups:
        call = _group_call(factors, sub, device)
        if call is None:
            return None
        calls.append(call)
    mask_batch = max((c.pattern.candidates(c.sub_geo, DEFAULT_BLOCK, device).shape[0] for c in calls
                      if c.kind == "natural"), default=1)
    return FactoredPlan(geo, device, tuple(calls), mask_batch)


FACTORED_PLANS = named_cache("factored_plans", 32)
_NONE = object()  # cached answer "no factored plan": a pattern the tiles run as it is


def factored_plan(pattern: Pattern, geo: Geometry, device: torch.device) -> FactoredPlan | None:
    """The factored plan of ``pattern`` at ``geo``, or None (cached when the pattern has a key)."""
    key = None if pattern.key is None else (pattern.key, geo, str(device))
    plan = FACTORED_PLANS.get_or_build(key, lambda: build_factored_plan(pattern, geo, device) or _NONE)
    return None if plan is _NONE else plan


def factored_attention(plan: FactoredPlan, inp: AttentionInputs) -> Tensor:
    """Run every head group (dense SDPA or the tiles) and put heads and rows back in order."""
    compute = compute_dtype(inp.q.dtype, inp.q.device)  # the tiles' matmul dtype (float32 where bf16 is slower)
    q, k, v = (t.to(compute) for t in (inp.q, inp.k, inp.v))
    am = inp.attn_mask
    if am is not None:
        am = am.to(compute) if am.is_floating_point() else am
        am = am[(None,) * (4 - am.dim())]  # (B?, H?, Nq|1, Nk|1)
    p = plan.period
    outs = []
    for g, call in enumerate(plan.calls):
        heads = slice(g, None, p)
        amg = am[:, heads] if am is not None and am.shape[1] > 1 else am
        sub = call.inputs(inp, q[:, heads], k[:, heads], v[:, heads], amg)
        out = dense_attention(sub) if call.dense else tiled_attention(sub)
        outs.append(call.output(out, q.shape[1] // p))
    out = outs[0] if p == 1 else torch.stack(outs, dim=2).flatten(1, 2)  # (b, H, Nq, dv): head m * P + g
    return out.to(inp.q.dtype)
