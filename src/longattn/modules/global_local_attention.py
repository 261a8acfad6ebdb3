"""ETC's global-local attention (Ainslie et al. 2020, "ETC: Encoding Long and Structured Inputs in Transformers").

Two inputs: a long input ``x_long (B, N, C)`` and a small global input ``x_global (B, G, C)``, with one
global token per segment (sentence, paragraph) built by ``etc_structure``. Attention has four pieces:

==========  =============================  ==========================================
piece       query -> key                   allowed when
==========  =============================  ==========================================
g2g         global g -> global g'          always (padding aside)
g2l         global g -> long j             always, or only ``seg(j) == g`` (hard g2l)
l2g         long i   -> global g           always, or only ``seg(i) == g`` (hard l2g)
l2l         long i   -> long j             ``|i - j| <= r`` (the local radius)
==========  =============================  ==========================================

Each query runs one softmax over all of its keys (l2g and l2l share a softmax, as do g2g and g2l).
Relative positions follow ETC (Shaw et al.): every (query, key) pair has a label, and the score is
``scale * (q . k + q . E[label]) + bias[label]`` with a learned key embedding ``E (V, H, D)`` and bias
``(V, H)`` per label (a ``RelativeTable``). Labels (``V = 2k + 3``): ``clip(j - i, -k, k) + k`` for l2l and
for g2g (global positions are the segment indices), ``2k + 2`` for an l2g/g2l pair of a token and its own
segment's global token, ``2k + 1`` for any other l2g/g2l pair. Global and long queries have separate tables,
as in ETC.

Memory is linear in N: long queries run blocked (blocks of ``w = max(r, 1)`` queries score the three key
blocks around them plus the G globals, O(N (3w + G))); global queries score all G + N keys, O(G (G + N)).
Without relative labels or hard masks the computation is exactly ``longattn.attention`` over the
concatenation ``[globals; longs]`` with ``sliding_window(r) | global_tokens(range(G))``, and that path is
used (any longattn backend). ``attention()`` cannot add a per-pair label term without a dense ``(N, N)``
float mask, which is why the labelled path has its own banded kernel here.

Notation: B batch, H heads, D head dim, C model width, N long tokens, G global tokens, r local radius,
k max relative distance, w block length, nb number of blocks, V relative vocabulary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functional import attention
from ..patterns import global_tokens, sliding_window

# ---- structure: global tokens from segment ids -----------------------------------------------------


@dataclass
class EtcStructure:
    """How long tokens relate to global tokens (one global token per segment)."""

    long_to_global: Tensor  # (B, N) int64: the global token (= segment id) of each long token, -1 = padding
    long_mask: Tensor  # (B, N) bool, True = real long token
    global_mask: Tensor  # (B, G) bool, True = real global token (its segment has at least one token)

    @property
    def num_global(self) -> int:
        return self.global_mask.shape[1]


def etc_structure(segment_ids: Tensor, *, max_global: int | None = None) -> EtcStructure:
    """Global structure from ``segment_ids (B, N)`` int: the segment (sentence, paragraph) of each token.

    Segment ids are ``0 .. S - 1`` within each example, one global token per id (global token ``g`` stands
    for segment ``g``); a negative id marks padding. ``G`` is the largest number of segments in the batch
    (at least 1); examples with fewer segments get padding global tokens (``global_mask`` False), as do ids
    that no token uses. Raises ValueError when an example has more than ``max_global`` segments.
    """
    if not isinstance(segment_ids, Tensor) or segment_ids.is_floating_point() or segment_ids.is_complex() \
            or segment_ids.dtype == torch.bool:
        raise TypeError(f"segment_ids must be an integer tensor of shape (B, N), got {_describe(segment_ids)}")
    if segment_ids.dim() != 2:
        raise ValueError(f"segment_ids must have shape (B, N), got {tuple(segment_ids.shape)}")
    ids = segment_ids.long()
    long_mask = ids >= 0
    num = int(ids.max().item()) + 1 if ids.numel() else 0
    if max_global is not None and num > max_global:
        raise ValueError(f"segment_ids has {num} segments (ids 0..{num - 1}), more than max_global={max_global}")
    g = max(num, 1)
    b = ids.shape[0]
    long_to_global = torch.where(long_mask, ids, -1)
    counts = torch.zeros(b, g + 1, dtype=torch.long, device=ids.device)  # the last bucket collects padding
    counts.scatter_add_(1, torch.where(long_mask, ids, g), torch.ones_like(ids))
    return EtcStructure(long_to_global, long_mask, counts[:, :g] > 0)


def _describe(t: object) -> str:
    return f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__


# ---- inputs, settings and result of the functional core --------------------------------------------


@dataclass(frozen=True, eq=False)
class QKV:
    """The queries, keys and values of one input, each ``(B, H, N, D)`` (values ``(B, H, N, Dv)``)."""

    q: Tensor
    k: Tensor
    v: Tensor


@dataclass(frozen=True, eq=False)
class RelativeTable:
    """One side's label table: a pair with label ``l`` scores ``scale * q . embedding[l] + bias[l]`` extra."""

    embedding: Tensor  # (V, H, D), V = 2k + 3 (relative_vocab_size(k))
    bias: Tensor  # (V, H)

    @property
    def max_distance(self) -> int:
        """k: offsets are clipped to ``[-k, k]``."""
        return (self.embedding.shape[0] - 3) // 2


@dataclass(frozen=True, eq=False)
class GlobalLocalSpec:
    """Which (query, key) pairs of ``[globals; longs]`` attend, and with which relative labels."""

    local_radius: int  # r: long token i attends long tokens |i - j| <= r
    structure: EtcStructure | None = None  # masks and the long-to-global relation; None = no padding, no segments
    long_relative: RelativeTable | None = None  # labels of long queries; None = no relative term
    global_relative: RelativeTable | None = None  # labels of global queries; None = no relative term
    hard_g2l: bool = False  # a global token attends only its own segment's long tokens (needs structure)
    hard_l2g: bool = False  # a long token attends only its own segment's global token (needs structure)

    @property
    def plain(self) -> bool:
        """No labels and no hard masks: exactly ``attention()`` over ``[globals; longs]``."""
        return self.long_relative is None and self.global_relative is None and not (self.hard_g2l or self.hard_l2g)


@dataclass
class GlobalLocalOutput:
    """Both streams' outputs: ``(B, H, N, Dv)`` / ``(B, H, G, Dv)`` from the function, ``(B, N, C)`` /
    ``(B, G, C)`` from the module."""

    long: Tensor
    global_: Tensor


# ---- relative labels -------------------------------------------------------------------------------

def relative_vocab_size(max_distance: int) -> int:
    """Labels: ``2k + 1`` clipped offsets, then "other segment" and "own segment" for the cross pieces."""
    return 2 * max_distance + 3


def _offset_labels(delta: Tensor, k: int) -> Tensor:
    return delta.clamp(-k, k) + k


def _cross_labels(own: Tensor, k: int) -> Tensor:
    return torch.where(own, 2 * k + 2, 2 * k + 1)


def _relative_scores(rq: Tensor, bias: Tensor, labels: Tensor) -> Tensor:
    """Read ``rq (B, H, ..., M, V)`` (scaled ``q . E[v]`` for every label v) at ``labels (B', 1, ..., M, K)``
    and add the label's per-head bias: ``(B, H, ..., M, K)``."""
    idx = labels.expand(*rq.shape[:-1], labels.shape[-1])
    return rq.gather(-1, idx) + bias[labels.squeeze(1)].movedim(-1, 1)


# ---- functional core -------------------------------------------------------------------------------

def _masked_softmax(scores: Tensor, keep: Tensor, dropout_p: float) -> Tensor:
    # The final product zeroes rows that keep nothing (a uniform softmax over the fill value otherwise).
    p = torch.softmax(scores.masked_fill(~keep, torch.finfo(scores.dtype).min), dim=-1) * keep
    return F.dropout(p, dropout_p) if dropout_p > 0 else p


def _long_side(long_qkv: QKV, global_qkv: QKV, spec: GlobalLocalSpec, scale: float, dropout_p: float) -> Tensor:
    """Long queries: l2g + l2l in one softmax, blocked so that memory is O(N (3w + G))."""
    q, k, v = long_qkv.q, long_qkv.k, long_qkv.v
    k_g, v_g, st, radius = global_qkv.k, global_qkv.v, spec.structure, spec.local_radius
    b, h, n, d = q.shape
    g = k_g.shape[2]
    w = max(radius, 1)  # a block of w queries needs keys from its own block and the two beside it
    nb = -(-n // w)
    pad = nb * w - n
    qb = F.pad(q, (0, 0, 0, pad)).view(b, h, nb, w, d)  # (B, H, nb, w, D)

    def windows(t: Tensor) -> Tensor:  # (B, H, N, E) -> (B, H, nb, 3w, E), keys (blk - 1) w ..< (blk + 2) w
        return F.pad(t, (0, 0, w, pad + w)).unfold(2, 3 * w, w).transpose(-1, -2)

    key_ok = F.pad(st.long_mask, (w, pad + w)).unfold(1, 3 * w, w)  # (B, nb, 3w)
    pos = torch.arange(3 * w, device=q.device)
    delta = pos[None, :] - w - pos[:w, None]  # (w, 3w): key position minus query position
    local_ok = (delta.abs() <= radius) & key_ok[:, None, :, None, :]  # (B, 1, nb, w, 3w)
    seg = F.pad(st.long_to_global, (0, pad), value=-1).view(b, 1, nb, w, 1)
    own = seg == torch.arange(g, device=q.device)  # (B, 1, nb, w, G)
    global_ok = st.global_mask[:, None, None, None, :] & (own if spec.hard_l2g else True)  # (B, 1, nb|1, w|1, G)

    s_local = qb @ windows(k).transpose(-1, -2) * scale  # (B, H, nb, w, 3w)
    s_global = qb @ k_g.transpose(-1, -2)[:, :, None] * scale  # (B, H, nb, w, G)
    if spec.long_relative is not None:
        table, kd = spec.long_relative, spec.long_relative.max_distance
        rq = torch.einsum("bhnwd,vhd->bhnwv", qb, table.embedding) * scale  # (B, H, nb, w, V)
        s_local = s_local + _relative_scores(rq, table.bias, _offset_labels(delta, kd).view(1, 1, 1, w, 3 * w))
        s_global = s_global + _relative_scores(rq, table.bias, _cross_labels(own, kd))
    scores = torch.cat([s_global, s_local], dim=-1)  # (B, H, nb, w, G + 3w)
    keep = torch.cat([global_ok.expand(b, 1, nb, w, g), local_ok], dim=-1)  # (B, 1, nb, w, G + 3w)
    p = _masked_softmax(scores, keep, dropout_p)
    out = p[..., :g] @ v_g[:, :, None] + p[..., g:] @ windows(v)  # (B, H, nb, w, Dv)
    return out.reshape(b, h, nb * w, -1)[:, :, :n]  # (B, H, N, Dv)


def _global_side(global_qkv: QKV, long_qkv: QKV, spec: GlobalLocalSpec, scale: float, dropout_p: float) -> Tensor:
    """Global queries: g2g + g2l in one softmax over all G + N keys, O(G (G + N)) memory."""
    q_g, k_g, v_g = global_qkv.q, global_qkv.k, global_qkv.v
    k, v, st = long_qkv.k, long_qkv.v, spec.structure
    b, _, g, _ = q_g.shape
    scores = q_g @ torch.cat([k_g, k], dim=2).transpose(-1, -2) * scale  # (B, H, G, G + N)
    gi = torch.arange(g, device=q_g.device)
    own = gi[None, :, None] == st.long_to_global[:, None, :]  # (B, G, N)
    keep = torch.cat([st.global_mask, st.long_mask], dim=-1)[:, None, None, :]  # (B, 1, 1, G + N)
    if spec.hard_g2l:
        keep = keep & torch.cat([own.new_ones(b, g, g), own], dim=-1)[:, None]  # (B, 1, G, G + N)
    if spec.global_relative is not None:
        table, kd = spec.global_relative, spec.global_relative.max_distance
        g2g = _offset_labels(gi[None, :] - gi[:, None], kd).expand(b, g, g)
        labels = torch.cat([g2g, _cross_labels(own, kd)], dim=-1)[:, None]  # (B, 1, G, G + N)
        rq = torch.einsum("bhgd,vhd->bhgv", q_g, table.embedding) * scale  # (B, H, G, V)
        scores = scores + _relative_scores(rq, table.bias, labels)
    p = _masked_softmax(scores, keep, dropout_p)
    return p @ torch.cat([v_g, v], dim=2)  # (B, H, G, Dv)


def global_local_attention(long_qkv: QKV, global_qkv: QKV, spec: GlobalLocalSpec, *, scale: float | None = None,
                           dropout_p: float = 0.0, backend: str = "auto") -> GlobalLocalOutput:
    """ETC's global-local attention (the table in the module docstring).

    Args:
        long_qkv: the long input's ``q, k (B, H, N, D)`` and ``v (B, H, N, Dv)``.
        global_qkv: the global input's ``q, k (B, H, G, D)`` and ``v (B, H, G, Dv)``.
        spec: the local radius, the structure (``etc_structure``; None = no padding and no segments, so
            neither the "own segment" label nor hard masks apply), the label tables of long and of global
            queries (``RelativeTable`` with ``V = relative_vocab_size(k)`` rows; None = no relative term)
            and the hard g2l / l2g restrictions (``GlobalLocalSpec``).
        scale: score scale, default ``1 / sqrt(D)``.
        dropout_p: dropout on the attention probabilities.
        backend: ``longattn.attention`` backend for the unlabelled, unrestricted case (see module docstring).

    Returns:
        ``GlobalLocalOutput(long (B, H, N, Dv), global_ (B, H, G, Dv))``. A query with no allowed key gives zeros.
    """
    if not isinstance(long_qkv, QKV) or not isinstance(global_qkv, QKV):
        raise TypeError(f"long_qkv and global_qkv must be QKV(q, k, v), got {type(long_qkv).__name__} and "
                        f"{type(global_qkv).__name__}")
    if not isinstance(spec, GlobalLocalSpec):
        raise TypeError(f"spec must be a GlobalLocalSpec, got {type(spec).__name__}")
    b, h, n, d = _check_qkv("long_qkv", long_qkv, None)
    g = _check_qkv("global_qkv", global_qkv, (b, h, d, long_qkv.v.shape[-1]))[2]
    spec = _checked_spec(spec, long_qkv.q, g)
    scale = d ** -0.5 if scale is None else scale
    if spec.plain:
        # [globals; longs]: global rows see every key, long rows see the globals and their window.
        pattern = sliding_window(spec.local_radius) | global_tokens(list(range(g)))
        real = torch.cat([spec.structure.global_mask, spec.structure.long_mask], dim=1)  # (B, G + N)
        out = attention(*(torch.cat(pair, dim=2) for pair in ((global_qkv.q, long_qkv.q), (global_qkv.k, long_qkv.k),
                                                               (global_qkv.v, long_qkv.v))),
                        pattern=pattern, key_padding_mask=None if bool(real.all()) else real, scale=scale,
                        dropout_p=dropout_p, backend=backend)  # (B, H, G + N, Dv)
        return GlobalLocalOutput(out[:, :, g:], out[:, :, :g])
    return GlobalLocalOutput(_long_side(long_qkv, global_qkv, spec, scale, dropout_p),
                             _global_side(global_qkv, long_qkv, spec, scale, dropout_p))


def _check_qkv(name: str, qkv: QKV, like: tuple | None) -> torch.Size:
    for part in ("q", "k", "v"):
        t = getattr(qkv, part)
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name}.{part} must be a floating-point tensor of shape (B, H, N, D), "
                            f"got {_describe(t)}")
        if t.dim() != 4:
            raise ValueError(f"{name}.{part} must have shape (B, H, N, D), got {tuple(t.shape)}")
    q, k, v = qkv.q, qkv.k, qkv.v
    b, h, n, d = q.shape
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{name}.k must have shape {tuple(q.shape)} and {name}.v (B, H, N, Dv) = ({b}, {h}, {n}, "
                         f"Dv), got {tuple(k.shape)} and {tuple(v.shape)}")
    if like is not None and (b, h, d, v.shape[-1]) != like:
        raise ValueError(f"{name}.q/{name}.v must have shape (B, H, G, D) = ({like[0]}, {like[1]}, G, {like[2]}) "
                         f"and Dv = {like[3]} to match the long input, got {tuple(q.shape)} and {tuple(v.shape)}")
    return q.shape


def _checked_spec(spec: GlobalLocalSpec, q_long: Tensor, g: int) -> GlobalLocalSpec:
    """``spec`` validated against the inputs' shapes (``q_long (B, H, N, D)``, G global tokens), with the
    structure filled in when it was None."""
    (b, h, n, d), device = q_long.shape, q_long.device
    structure = spec.structure
    if structure is None:
        if spec.hard_g2l or spec.hard_l2g:
            raise ValueError("spec.hard_g2l/hard_l2g need a structure (which long tokens belong to which global)")
        structure = EtcStructure(torch.full((b, n), -1, device=device),
                                 torch.ones(b, n, dtype=torch.bool, device=device),
                                 torch.ones(b, g, dtype=torch.bool, device=device))
    _check_structure(structure, b, n, g)
    radius = spec.local_radius
    if not isinstance(radius, int) or isinstance(radius, bool) or radius < 0:
        raise ValueError(f"spec.local_radius must be an int >= 0, got {radius!r}")
    for name in ("long_relative", "global_relative"):
        _check_relative(f"spec.{name}", getattr(spec, name), h, d)
    return dataclasses.replace(spec, structure=structure)


def _check_structure(st: EtcStructure, b: int, n: int, g: int) -> None:
    for name, t, shape in (("long_to_global", st.long_to_global, (b, n)), ("long_mask", st.long_mask, (b, n)),
                           ("global_mask", st.global_mask, (b, g))):
        if not isinstance(t, Tensor) or tuple(t.shape) != shape:
            raise ValueError(f"structure.{name} must have shape {shape} (B, N long or G global), got {_describe(t)}")
        if (t.dtype == torch.bool) != name.endswith("mask") or t.is_floating_point():
            raise TypeError(f"structure.{name} must be a {'bool' if name.endswith('mask') else 'int64'} tensor, "
                            f"got {t.dtype}")


def _check_relative(name: str, table: RelativeTable | None, h: int, d: int) -> None:
    if table is None:
        return
    if not isinstance(table, RelativeTable):
        raise TypeError(f"{name} must be a RelativeTable(embedding (V, H, D), bias (V, H)), "
                        f"got {type(table).__name__}")
    emb, bias = table.embedding, table.bias
    v = emb.shape[0]
    if emb.shape != (v, h, d) or bias.shape != (v, h) or v < 3 or v % 2 == 0:
        raise ValueError(f"{name} must be RelativeTable(embedding (V, H={h}, D={d}), bias (V, H={h})) with "
                         f"V = 2k + 3, got {tuple(emb.shape)} and {tuple(bias.shape)}")


# ---- module ----------------------------------------------------------------------------------------

class GlobalLocalAttention(nn.Module):
    """Multi-head global-local attention over ``x_long (B, N, C)`` and ``x_global (B, G, C)``.

    As ETC's defaults: one q/k/v projection shared by both streams (``share_qkv_projections``), separate
    output projections and separate relative tables for long and global queries. ``max_relative_distance``
    k (None = no relative labels) gives ``V = 2k + 3`` labels. ``forward`` returns a ``GlobalLocalOutput``
    of ``(B, N, C)`` and ``(B, G, C)``.
    """

    def __init__(self, dim: int, heads: int, *, local_radius: int, max_relative_distance: int | None = None,
                 hard_g2l: bool = False, hard_l2g: bool = False, dropout: float = 0.0, backend: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        factory = {"device": device, "dtype": dtype}
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.local_radius, self.max_relative_distance = local_radius, max_relative_distance
        self.hard_g2l, self.hard_l2g, self.dropout, self.backend = hard_g2l, hard_l2g, dropout, backend
        self.qkv = nn.Linear(dim, 3 * dim, **factory)
        self.long_proj = nn.Linear(dim, dim, **factory)
        self.global_proj = nn.Linear(dim, dim, **factory)
        if max_relative_distance is None:
            self.long_rel_emb = self.long_rel_bias = self.global_rel_emb = self.global_rel_bias = None
        else:
            v = relative_vocab_size(max_relative_distance)
            self.long_rel_emb = nn.Parameter(torch.empty(v, heads, self.head_dim, **factory))
            self.long_rel_bias = nn.Parameter(torch.empty(v, heads, **factory))
            self.global_rel_emb = nn.Parameter(torch.empty(v, heads, self.head_dim, **factory))
            self.global_rel_bias = nn.Parameter(torch.empty(v, heads, **factory))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """BERT's initialisation (ETC's ``initializer_range``); relative biases start at zero as in ETC."""
        for lin in (self.qkv, self.long_proj, self.global_proj):
            nn.init.normal_(lin.weight, std=std)
            nn.init.zeros_(lin.bias)
        if self.max_relative_distance is not None:
            nn.init.normal_(self.long_rel_emb, std=std)
            nn.init.normal_(self.global_rel_emb, std=std)
            nn.init.zeros_(self.long_rel_bias)
            nn.init.zeros_(self.global_rel_bias)

    def _heads(self, x: Tensor) -> QKV:
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.heads, self.head_dim)  # (B, N, 3, H, D)
        return QKV(*qkv.permute(2, 0, 3, 1, 4).unbind(0))  # 3 x (B, H, N, D)

    def spec(self, structure: EtcStructure | None = None) -> GlobalLocalSpec:
        """This module's ``GlobalLocalSpec`` for one batch's structure."""
        relative = self.max_relative_distance is not None
        return GlobalLocalSpec(self.local_radius, structure,
                               RelativeTable(self.long_rel_emb, self.long_rel_bias) if relative else None,
                               RelativeTable(self.global_rel_emb, self.global_rel_bias) if relative else None,
                               self.hard_g2l, self.hard_l2g)

    def forward(self, x_long: Tensor, x_global: Tensor, structure: EtcStructure | None = None) -> GlobalLocalOutput:
        for name, x in (("x_long", x_long), ("x_global", x_global)):
            if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
                raise ValueError(f"{name} must have shape (B, N, C={self.dim}), got {_describe(x)}")
        if x_global.shape[0] != x_long.shape[0]:
            raise ValueError(f"x_global must have shape (B={x_long.shape[0]}, G, C) to match x_long, "
                             f"got {tuple(x_global.shape)}")
        out = global_local_attention(self._heads(x_long), self._heads(x_global), self.spec(structure),
                                     dropout_p=self.dropout if self.training else 0.0, backend=self.backend)
        b, n, g = x_long.shape[0], x_long.shape[1], x_global.shape[1]
        return GlobalLocalOutput(self.long_proj(out.long.transpose(1, 2).reshape(b, n, self.dim)),  # (B, N, C)
                                 self.global_proj(out.global_.transpose(1, 2).reshape(b, g, self.dim)))  # (B, G, C)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, local_radius={self.local_radius}, "
                f"max_relative_distance={self.max_relative_distance}, hard_g2l={self.hard_g2l}, "
                f"hard_l2g={self.hard_l2g}")
