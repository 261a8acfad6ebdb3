"""Content-chosen blocks (MoBA): each query attends the key blocks whose mean key scores highest with it.

``topk_blocks(k, block, causal=False)``, for query i (absolute position, bottom-right aligned):

- the score of key block b is ``q_i . mean(k_j for the real keys j of b)``: padding is left out of the mean,
  and a block with no real key is never chosen;
- the block holding key position i (the query's own block) always takes one of the k places (one of none but
  padding keeps it and adds no key);
- with ``causal=True`` blocks that start after i are not eligible, and inside the own block only ``j <= i``;
- the other k - 1 places go to the highest-scoring eligible blocks, ties broken by the lower block index
  (all of them when fewer are eligible);
- query i attends every key of its chosen blocks (``j <= i`` where causal).

The choice depends on q and k, so this pattern has no mask before a call: ``resolve`` turns it, inside any
composition (``topk_blocks(4, 64) | sliding_window(256)``, ``& causal()``, ``per_head``), into a concrete
pattern for one call. The choice is not differentiated; attention over the chosen keys is.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass, replace

import torch
from torch import Tensor

from ._base import AllowedFn, Geometry, Pattern, _cdiv, _check_int, pattern_dataclass
from .causal import CausalMask
from .full import Empty, Full

#: scores evaluated at once while choosing (batch x heads x query rows x key blocks)
_SELECT_CHUNK = 1 << 22


@pattern_dataclass
class TopKBlocks(Pattern):
    k: int
    block: int
    causal: bool = False

    def __post_init__(self):
        _check_int(self.k, "k", minimum=1)
        _check_int(self.block, "block", minimum=1)
        if not isinstance(self.causal, bool):
            raise TypeError(f"causal must be a bool, got {type(self.causal).__name__}")

    def _label(self) -> str:
        return f"topk_blocks_{self.k}_{self.block}" + ("_causal" if self.causal else "")

    @property
    def preferred_block(self) -> int:  # type: ignore[override]
        return self.block

    def _allowed_fn(self, geo: Geometry, device: torch.device) -> AllowedFn:
        raise ValueError(f"{self.name} chooses its keys from q and k, so it has no mask before a call: run it "
                         "through longattn.attention, or resolve it for given q and k "
                         "(longattn.patterns.topk_blocks.resolve)")

    def _candidates(self, geo: Geometry, block: int, device: torch.device) -> Tensor:
        return self._allowed_fn(geo, device)

    def select(self, q: Tensor, k: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """The chosen blocks (B, H, Nq, k) long, in increasing order, -1 for places left empty."""
        return select_blocks(q, k, self.k, self.block, causal=self.causal, key_padding_mask=key_padding_mask)


def topk_blocks(k: int, block: int, *, causal: bool = False) -> Pattern:
    """Each query attends the ``k`` key blocks of size ``block`` whose mean key scores highest with it, its own
    block always among them (MoBA's gate; the full definition is in this module's docstring)."""
    return TopKBlocks(k, block, causal)


def block_means(k: Tensor, block: int, key_padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Mean of each key block's real keys (B, H, nKB, D) and whether it has any (B, 1, nKB) bool."""
    b, h, n, d = k.shape
    nkb = _cdiv(n, block)
    real = (torch.ones(b, n, dtype=k.dtype, device=k.device) if key_padding_mask is None
            else key_padding_mask.to(k.dtype))
    real = torch.nn.functional.pad(real, (0, nkb * block - n)).view(b, 1, nkb, block)
    kp = torch.nn.functional.pad(k, (0, 0, 0, nkb * block - n)).view(b, h, nkb, block, d)
    counts = real.sum(-1)  # (B, 1, nKB)
    sums = torch.einsum("bhnsd,bxns->bhnd", kp, real)
    return sums / counts.clamp(min=1).unsqueeze(-1), counts > 0


@torch.no_grad()
def select_blocks(q: Tensor, k: Tensor, top: int, block: int, *, causal: bool = False,
                  key_padding_mask: Tensor | None = None) -> Tensor:
    """``topk_blocks``' choice for every query row: (B, H, Nq, top) long key blocks, increasing, -1 = none.

    Scores are computed a chunk of query rows at a time (at most ``_SELECT_CHUNK`` of them), never as an
    (Nq, Nk) matrix; they are float32 for half-precision inputs, else the inputs' dtype.
    """
    dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    nkb = _cdiv(nk, block)
    means, has_keys = block_means(k.to(dtype), block, key_padding_mask)
    starts = torch.arange(nkb, device=q.device) * block
    offset = nk - nq
    rows = max(1, _SELECT_CHUNK // max(1, b * h * nkb))
    out = torch.full((b, h, nq, top), -1, dtype=torch.long, device=q.device)
    for r0 in range(0, nq, rows):
        r1 = min(nq, r0 + rows)
        i = torch.arange(r0, r1, device=q.device) + offset  # absolute positions (c,)
        scores = torch.matmul(q[:, :, r0:r1].to(dtype), means.transpose(-1, -2))  # (B, H, c, nKB)
        own = torch.where((i >= 0) & (i < nk), i.div(block, rounding_mode="floor"), -1)  # (c,)
        eligible = has_keys.unsqueeze(2) & (torch.arange(nkb, device=q.device) != own[:, None])  # (B, 1, c, nKB)
        if causal:
            eligible = eligible & (starts <= i[:, None])
        scores = scores.masked_fill(~eligible, float("-inf"))
        chosen = top_indices(scores, top - 1)  # (B, H, c, top - 1)
        own_col = own.view(1, 1, -1, 1).expand(b, h, -1, 1)
        out[:, :, r0:r1] = increasing(torch.cat([own_col, chosen], dim=-1))
    return out


def top_indices(scores: Tensor, n: int) -> Tensor:
    """The n highest entries of each row above -inf (indices, -1 where fewer are), ties broken by the
    lower index: torch.topk's order among equal values is unspecified, so rows whose n-th and (n+1)-th values
    tie are chosen again with a stable sort."""
    width = scores.shape[-1]
    lead = scores.shape[:-1]
    if n == 0:
        return scores.new_empty(*lead, 0, dtype=torch.long)
    take = min(n + 1, width)
    values, index = torch.topk(scores, take, dim=-1)
    if take > n:
        tied = (values[..., n - 1] == values[..., n]) & (values[..., n] > float("-inf"))
        if bool(tied.any()):
            rows = tied.nonzero(as_tuple=True)
            order = torch.sort(scores[rows], dim=-1, descending=True, stable=True)
            values[rows], index[rows] = order.values[..., :take], order.indices[..., :take]
    values, index = values[..., :n], index[..., :n]
    index = torch.where(values > float("-inf"), index, -1)
    if index.shape[-1] < n:  # fewer blocks than places
        index = torch.nn.functional.pad(index, (0, n - index.shape[-1]), value=-1)
    return index


def increasing(index: Tensor) -> Tensor:
    """Sort each row's block indices increasingly with the empty places (-1) last."""
    big = torch.iinfo(torch.long).max
    ordered = torch.sort(torch.where(index < 0, big, index), dim=-1).values
    return ordered.masked_fill_(ordered == big, -1)


class SelectedBlocks(Pattern):
    """Blocks chosen for one call (``TopKBlocks.select``, or by the caller: NSA) as a concrete pattern: query
    row r attends key j when j's block is one of ``blocks[b, h, r]`` (-1 = an empty place) and, where causal,
    ``j <= i``. Held by value, never cached; ``longattn.attention`` runs it on the pair kernel."""

    def __init__(self, blocks: Tensor, block: int, causal: bool = False):
        if not isinstance(blocks, Tensor) or blocks.dim() != 4 or blocks.dtype != torch.long:
            raise ValueError("blocks must be a (B, H, Nq, K) long tensor of key block indices (-1 = none)")
        _check_int(block, "block", minimum=1)
        self.blocks, self.block, self.causal = blocks, block, causal
        self.name = f"selected_blocks_{blocks.shape[-1]}_{block}" + ("_causal" if causal else "")

    def select(self, q: Tensor, k: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        return self.blocks

    @property
    def preferred_block(self) -> int:  # type: ignore[override]
        return self.block

    def validate(self, geo: Geometry) -> None:
        b, h, nq, _ = self.blocks.shape
        if nq != geo.q_len or b not in (1, geo.batch) or h not in (1, geo.num_heads):
            raise ValueError(f"selected blocks of shape {tuple(self.blocks.shape)} do not fit (B, H, Nq) = "
                             f"({geo.batch}, {geo.num_heads}, {geo.q_len})")
        if self.blocks.numel() and int(self.blocks.max()) >= _cdiv(geo.kv_len, self.block):
            raise ValueError(f"selected blocks: block {int(self.blocks.max())} is past the last of "
                             f"{_cdiv(geo.kv_len, self.block)} key blocks")

    def _allowed_fn(self, geo: Geometry, device: torch.device) -> AllowedFn:
        blocks, block, causal, offset = self.blocks.to(device), self.block, self.causal, geo.offset
        last_b, last_h, last_r = blocks.shape[0] - 1, blocks.shape[1] - 1, blocks.shape[2] - 1

        def allowed(b: Tensor, h: Tensor, i: Tensor, j: Tensor) -> Tensor:
            # Indices are clamped: kernels also evaluate padding rows (masked afterwards). Each place is read
            # as a scalar: FlexAttention's compiled kernel gets a vector read per position wrong.
            bb, hh, rr = b.clamp(max=last_b), h.clamp(max=last_h), (i - offset).clamp(0, last_r)
            jb = j.div(block, rounding_mode="floor")
            out = blocks[bb, hh, rr, 0] == jb
            for t in range(1, blocks.shape[-1]):  # a plain loop: FlexAttention traces it
                out = out | (blocks[bb, hh, rr, t] == jb)
            return out & (j <= i) if causal else out

        return allowed

    def _candidates(self, geo: Geometry, block: int, device: torch.device) -> Tensor:
        # The union of the chosen blocks of each query block's rows (at this block size).
        b, h, nq, top = self.blocks.shape
        nqb, nkb = _cdiv(geo.q_len, block), _cdiv(geo.kv_len, block)
        starts = self.blocks.clamp(min=0) * self.block
        lo = starts.div(block, rounding_mode="floor")
        hi = (starts + self.block - 1).clamp(max=geo.kv_len - 1).div(block, rounding_mode="floor")
        out = torch.zeros(b, h, nqb, nkb + 1, dtype=torch.bool, device=device)
        qb = (torch.arange(nq, device=device) // block).view(1, 1, -1, 1).expand(b, h, nq, top)
        for step in range(int((hi - lo).max()) + 1 if self.blocks.numel() else 0):
            col = torch.where((self.blocks >= 0) & (lo + step <= hi), lo + step, nkb).to(device)
            out.view(-1)[((torch.arange(b * h, device=device).view(b, h, 1, 1) * nqb + qb) * (nkb + 1) + col
                          ).reshape(-1)] = True
        return out[..., :nkb]


# ---- resolving a pattern that holds a content-dependent part -------------------------------------------------

@dataclass(frozen=True, eq=False)
class Resolved:
    """A content-dependent pattern made concrete for one call.

    With T the chosen blocks' pairs, the pattern is a monotone function f(T) of them (unions, intersections,
    per-head parts), so ``f(T) = base | (T & gate)`` with ``base = f(nothing)`` and ``gate = f(everything)``.
    ``pattern`` is f(chosen blocks) for the dense and FlexAttention backends; the blocked backend runs the
    pairs of ``base``'s plan and of the choice, masked by ``base | (chosen & gate)``.
    """

    node: TopKBlocks | SelectedBlocks
    blocks: Tensor  # (B', H', Nq, k) the chosen blocks, -1 = none
    pattern: Pattern  # f(chosen blocks)
    base: Pattern | None  # f(nothing); None when it allows nothing
    gate: Pattern | None  # f(everything); None when it allows everything

    def pair_mask(self, geo: Geometry, device: torch.device):
        """``mask(b, h, i, j, chosen)`` for the blocked backend's pairs: ``chosen`` is True where the pair's
        block came from the choice. None when every key of every listed block is allowed."""
        base = None if self.base is None else self.base.allowed_fn(geo, device)
        gate = None if self.gate is None else self.gate.allowed_fn(geo, device)
        causal = self.node.causal
        if base is None and gate is None and not causal:
            return None

        def mask(b: Tensor, h: Tensor, i: Tensor, j: Tensor, chosen: Tensor) -> Tensor:
            out = chosen
            if causal:
                out = out & (j <= i)
            if gate is not None:
                out = out & gate(b, h, i, j)
            if base is not None:
                out = out | base(b, h, i, j)
            return out

        return mask


def content_parts(pattern: Pattern) -> tuple[TopKBlocks | SelectedBlocks, ...]:
    """The content-dependent parts of a pattern (a composition's, recursively): ``topk_blocks``, and blocks
    chosen by the caller (``SelectedBlocks``: NSA's selection), which the same kernels run. Kept on the
    (frozen) pattern, as its ``key`` is: every attention call asks."""
    cached = pattern.__dict__.get("_content_parts")
    if cached is not None:
        return cached
    if isinstance(pattern, (TopKBlocks, SelectedBlocks)):
        out: tuple[TopKBlocks | SelectedBlocks, ...] = (pattern,)
    else:
        found: list[TopKBlocks | SelectedBlocks] = []
        for child in _children(pattern):
            found += [p for p in content_parts(child) if p not in found]
        out = tuple(found)
    object.__setattr__(pattern, "_content_parts", out)
    return out


def is_content_dependent(pattern: Pattern | None) -> bool:
    return pattern is not None and bool(content_parts(pattern))


def resolve(pattern: Pattern, q: Tensor, k: Tensor, key_padding_mask: Tensor | None = None) -> Resolved:
    """Make a pattern holding ``topk_blocks`` concrete for these q and k (see ``Resolved``)."""
    parts = content_parts(pattern)
    if len(parts) != 1:
        raise ValueError(f"pattern {pattern.name}: a pattern may hold one content-dependent part, got "
                         f"{len(parts)} ({', '.join(p.name for p in parts) or 'none'})")
    node = parts[0]
    blocks = node.select(q, k, key_padding_mask)
    base = _substitute(pattern, node, Empty())
    gate = _substitute(pattern, node, Full())
    if node.causal and isinstance(gate, CausalMask):  # causal(topk_blocks(..., causal=True)): nothing to add
        gate = Full()
    chosen = node if isinstance(node, SelectedBlocks) else SelectedBlocks(blocks, node.block, node.causal)
    return Resolved(node, blocks, _substitute(pattern, node, chosen), None if isinstance(base, Empty) else base,
                    None if isinstance(gate, Full) else gate)


def _children(pattern: Pattern) -> list[Pattern]:
    if not is_dataclass(pattern):
        return []
    out = []
    for f in fields(pattern):
        value = getattr(pattern, f.name)
        values = value if isinstance(value, tuple) else (value,)
        out += [v for v in values if isinstance(v, Pattern)]
    return out


def _substitute(pattern: Pattern, node: Pattern, by: Pattern) -> Pattern:
    """``pattern`` with every occurrence of ``node`` replaced by ``by``, unions and intersections with an
    empty or full part simplified (so that ``base`` and ``gate`` are None when they can be)."""
    from .compose import Intersection, Union

    if pattern == node and type(pattern) is type(node):
        return by
    if not is_dataclass(pattern) or not _children(pattern):
        return pattern
    changes = {}
    for f in fields(pattern):
        value = getattr(pattern, f.name)
        if isinstance(value, Pattern):
            changes[f.name] = _substitute(value, node, by)
        elif isinstance(value, tuple) and any(isinstance(v, Pattern) for v in value):
            changes[f.name] = tuple(_substitute(v, node, by) if isinstance(v, Pattern) else v for v in value)
    if isinstance(pattern, (Union, Intersection)):
        parts = changes["parts"]
        absorbing, neutral = (Full, Empty) if isinstance(pattern, Union) else (Empty, Full)
        if any(isinstance(p, absorbing) for p in parts):
            return absorbing()
        parts = tuple(p for p in parts if not isinstance(p, neutral))
        if not parts:
            return neutral()
        if len(parts) == 1:
            return parts[0]
        changes["parts"] = parts
    return replace(pattern, **changes)
